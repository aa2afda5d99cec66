"""
An HTTP connection's link to its ticket's NBD export (http/link.py): one
NBD connection per HTTP connection, kept across data and metadata
requests; cancellation and failures of the NBD connection under a
request. Real qemu-nbd and nbdkit exports.
"""

import http.client
import json
import os
import ssl
import threading

import pytest

import imagesutil
import testutil
from imagesutil import (
    MiB, Client, add_ticket, image_bytes, raw_client, url,
    wait_until_stalled)


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(**imagesutil.DAEMON_CONF)


@pytest.fixture(params=["unix", "https"])
def client(request, daemon):
    c = Client(daemon, request.param)
    yield c
    c.close()


@pytest.fixture
def image(make_image):
    """4 MiB raw: data at 0 and 2 MiB, a zero range at 1 MiB, holes."""
    return make_image(size=4 * MiB, commands=[
        "write -P 0x41 0 1M", "write -P 0x42 2M 512k",
        "write -P 0x43 3M 4k"])


@pytest.fixture
def export(qemu_nbd, image):
    return qemu_nbd(image, fmt="raw")


def test_connections_released(daemon, export):
    add_ticket(daemon, url(export))
    clients = [Client(daemon) for _ in range(3)]
    for c in clients:
        c.request("GET", "/images/tid-secret", headers={"range": "bytes=0-0"})
    assert daemon.api.get("tid-secret")["connections"] == 3
    for c in clients:
        c.close()
    testutil.wait_for(
        lambda: daemon.api.get("tid-secret")["connections"] == 0,
        message="connections closed")


def test_inactivity_timeout(daemon, client, export):
    add_ticket(daemon, url(export), inactivity_timeout=1)
    client.request("GET", "/images/tid-secret", headers={"range": "bytes=0-0"})
    assert daemon.api.get("tid-secret")["connections"] == 1
    # The server closes the idle connection after the ticket's timeout.
    testutil.wait_for(
        lambda: daemon.api.get("tid-secret")["connections"] == 0,
        timeout=20, message="idle connection closed")


def nbd_connections(server, listening):
    """The sockets of qemu-nbd's client connections: its socket
    descriptors other than the listening ones."""
    found = set()
    fd_dir = f"/proc/{server.pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, name))
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found - listening


def alternate(client, server, requests):
    """
    Run (method, path, body, headers) requests on one HTTP connection;
    after each, qemu-nbd must have the same one client connection as
    after the first: no second connection, no reconnect. Returns the
    responses (status, data).
    """
    listening = nbd_connections(server, set())
    held = None
    results = []
    for method, path, body, headers in requests:
        resp, data = client.request(method, path, body=body, headers=headers)
        assert resp.status in (200, 206), (method, path, resp.status, data)
        results.append((resp.status, data))
        conns = nbd_connections(server, listening)
        assert len(conns) == 1, (method, path)
        if held is None:
            held = conns
        assert conns == held, f"{method} {path} reconnected to NBD"
    return results


def test_one_nbd_connection_alternating(daemon, client, qemu_nbd, image):
    # --shared 1: qemu-nbd serves one client, and a second would wait.
    srv = qemu_nbd(image, fmt="raw", shared=1)
    add_ticket(daemon, url(srv), ops=["write"])
    data = os.urandom(MiB)
    path = "/images/tid-secret"
    results = alternate(client, srv, [
        ("GET", path, None, {"range": "bytes=0-1048575"}),
        ("GET", path + "/extents", None, None),
        ("GET", path, None, {"range": "bytes=2097152-2097161"}),
        ("GET", path + "/checksum", None, None),
        ("PUT", path, data, {"content-range": "bytes 1048576-2097151/*"}),
        ("GET", path + "/extents", None, None),
        ("PATCH", path, {"op": "zero", "offset": 0, "size": 65536}, None),
        ("GET", path, None, {"range": "bytes=1048576-2097151"}),
        ("GET", path + "/checksum", None, None),
        ("OPTIONS", path, None, None),
        ("GET", path, None, None),
    ])
    assert results[0][1] == b"\x41" * MiB
    assert results[2][1] == b"\x42" * 10
    assert results[7][1] == data
    after = json.loads(results[5][1])
    assert after[0] == {"start": 0, "length": 2 * MiB + 512 * 1024,
                        "zero": False, "hole": False}
    assert json.loads(results[3][1]) != json.loads(results[8][1])
    assert results[10][1] == image_bytes(image)
    assert daemon.api.get("tid-secret")["connections"] == 1


def test_one_nbd_connection_dirty(daemon, client, qemu_nbd, make_image):
    path = make_image(fmt="qcow2", size=4 * MiB, bitmaps=["b1"], commands=[
        "write -P 0x55 1M 64k"])
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1", shared=1)
    add_ticket(daemon, url(srv), dirty=True)
    ticket = "/images/tid-secret"
    results = alternate(client, srv, [
        ("GET", ticket + "/extents?context=dirty", None, None),
        ("GET", ticket, None, {"range": "bytes=1048576-1114111"}),
        ("GET", ticket + "/extents?context=zero", None, None),
        ("GET", ticket + "/checksum", None, None),
        ("GET", ticket + "/extents?context=dirty", None, None),
    ])
    dirty = json.loads(results[0][1])
    assert dirty[1] == {"start": MiB, "length": 65536, "dirty": True,
                        "zero": False}
    assert results[4][1] == results[0][1]
    assert results[1][1] == b"\x55" * 65536
    assert json.loads(results[2][1])[1] == {
        "start": MiB, "length": 65536, "zero": False, "hole": False}


# Cancellation and failures

def test_delete_cancels_get(daemon, nbdkit):
    srv = nbdkit("pattern", "size=64M", "rdelay=100ms", filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=64 * MiB)
    c = Client(daemon)
    c.conn.request("GET", "/images/tid-secret")
    resp = c.conn.getresponse()
    assert resp.status == 200
    outcome = []

    def read():
        try:
            resp.read()
            outcome.append("complete")
        except (http.client.IncompleteRead, ConnectionError):
            outcome.append("cut")

    reader = threading.Thread(target=read)
    reader.start()
    testutil.wait_for(lambda: daemon.api.get("tid-secret")["transferred"],
                      message="transfer started")
    r, _ = daemon.api.delete("tid-secret")
    assert r.status == 204
    reader.join(30)
    # Cut at the next piece: far from the 64 MiB requested.
    assert outcome == ["cut"]
    c.close()


def test_nbd_error(daemon, client, nbdkit, export):
    srv = nbdkit("memory", "size=4M", "error-pread=EIO",
                 "error-pread-rate=100%", filters=["error"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=4 * MiB)
    resp, data = client.request("GET", "/images/tid-secret",
                                headers={"range": "bytes=0-4095"})
    assert resp.status == 500
    assert data == b"Server failed to perform the request, check logs\n"
    # Other tickets are served.
    add_ticket(daemon, url(export), uuid="other")
    c = Client(daemon)
    resp, _ = c.request("GET", "/images/other", headers={"range": "bytes=0-0"})
    assert resp.status == 206
    c.close()


def test_nbd_server_dies(daemon, nbdkit, export):
    srv = nbdkit("pattern", "size=64M", "rdelay=100ms", filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=64 * MiB)
    c = Client(daemon)
    c.conn.request("GET", "/images/tid-secret")
    resp = c.conn.getresponse()
    srv.stop()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    c.close()
    add_ticket(daemon, url(export), uuid="other")
    c = Client(daemon)
    resp, _ = c.request("GET", "/images/other", headers={"range": "bytes=0-0"})
    assert resp.status == 206
    c.close()


def test_export_unreachable(daemon, client):
    add_ticket(daemon, "nbd:unix:/no/such.sock")
    resp, data = client.request("GET", "/images/tid-secret")
    assert resp.status == 500


# Hung exports: DELETE interrupts blocked NBD I/O, and NBD I/O times out.
# nbdkit's delay filter stalls the chosen requests for 1000 s.

def threads_and_fds():
    """The in-process daemon's (and the test's) threads and open fds."""
    return (len(os.listdir("/proc/self/task")),
            len(os.listdir("/proc/self/fd")))


def wait_for_baseline(baseline):
    """Poll until threads and fds are back to the baseline."""
    testutil.wait_for(
        lambda: all(n <= b for n, b in zip(threads_and_fds(), baseline)),
        timeout=20,
        message=f"threads and fds back to {baseline} from "
                f"{threads_and_fds()}")


STALLS = {
    "get": ("delay-read=1000", "GET", "/images/tid-secret",
            {"range": "bytes=0-65535"}, None),
    "put": ("delay-write=1000", "PUT", "/images/tid-secret", {},
            b"x" * MiB),
    "extents": ("delay-extents=1000", "GET", "/images/tid-secret/extents",
                {}, None),
    # The memory plugin's image is all zeros: only block status is asked.
    "checksum": ("delay-extents=1000", "GET", "/images/tid-secret/checksum",
                 {}, None),
}


@pytest.mark.parametrize("transport", ["unix", "https"])
@pytest.mark.parametrize("stall", ["get", "put", "extents", "checksum"])
def test_delete_interrupts_stalled_request(make_daemon, nbdkit, stall,
                                           transport):
    daemon = make_daemon(control={"remove_timeout": "20"})
    delay, method, path, headers, body = STALLS[stall]
    srv = nbdkit("memory", "size=4M", delay, filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"])
    baseline = threads_and_fds()
    c = Client(daemon, transport)
    c.conn.request(method, path, body=body, headers=headers)
    if stall == "extents":
        # Not a ticket operation: wait for the request's NBD connection.
        testutil.wait_for_ticket(daemon.api, "tid-secret", connections=1)
    elif stall == "put":
        # The whole body went to the export (a body cut short would end
        # the request by itself): the write's reply is what stalls.
        testutil.wait_for_ticket(daemon.api, "tid-secret", active=True,
                                 transferred=MiB)
    else:
        testutil.wait_for_ticket(daemon.api, "tid-secret", active=True)
    # The client gives up.
    c.close()
    resp, data = daemon.api.delete("tid-secret")
    assert resp.status == 204, data
    assert daemon.store.lookup("tid-secret") is None
    wait_for_baseline(baseline)


def test_delete_interrupts_stalled_handshake(make_daemon, nbdkit):
    daemon = make_daemon(control={"remove_timeout": "20"})
    srv = nbdkit("memory", "size=4M", "delay-open=1000", filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    baseline = threads_and_fds()
    c = Client(daemon)
    c.conn.request("GET", "/images/tid-secret",
                   headers={"range": "bytes=0-4095"})
    testutil.wait_for_ticket(daemon.api, "tid-secret", connections=1)
    c.close()
    resp, data = daemon.api.delete("tid-secret")
    assert resp.status == 204, data
    wait_for_baseline(baseline)


def test_delete_during_stall_answers_client(make_daemon, nbdkit):
    # The client waits: it learns that the transfer was canceled.
    daemon = make_daemon(control={"remove_timeout": "20"})
    srv = nbdkit("memory", "size=4M", "delay-read=1000", filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    c = Client(daemon)
    c.conn.request("GET", "/images/tid-secret",
                   headers={"range": "bytes=0-65535"})
    testutil.wait_for_ticket(daemon.api, "tid-secret", active=True)
    resp, _ = daemon.api.delete("tid-secret")
    assert resp.status == 204
    resp = c.conn.getresponse()
    data = resp.read()
    assert resp.status == 403
    assert data == b"You are not allowed to access this resource: " \
                   b"Transfer tr-1 was canceled\n"
    assert resp.getheader("connection") == "close"
    c.close()


@pytest.mark.parametrize("transport", ["unix", "https"])
@pytest.mark.parametrize("stall", ["get", "put", "extents", "checksum",
                                   "handshake"])
def test_nbd_timeout(make_daemon, nbdkit, stall, transport):
    daemon = make_daemon(backend_nbd={"timeout": "0.5"})
    if stall == "handshake":
        delay, method, path, headers, body = (
            "delay-open=1000", "GET", "/images/tid-secret",
            {"range": "bytes=0-4095"}, None)
    else:
        delay, method, path, headers, body = STALLS[stall]
    srv = nbdkit("memory", "size=4M", delay, filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"])
    baseline = threads_and_fds()
    c = Client(daemon, transport)
    resp, data = c.request(method, path, body=body, headers=headers)
    assert resp.status == 500
    message = data.decode()
    assert message.startswith("NBD export of transfer tr-1 failed: ")
    assert "NBD server did not respond within 0.5 seconds" in message
    assert resp.getheader("connection") == "close"
    c.close()
    # The ticket is still usable, and removable.
    assert daemon.api.get("tid-secret")["active"] is False
    resp, _ = daemon.api.delete("tid-secret")
    assert resp.status == 204
    wait_for_baseline(baseline)


# Transfers blocked on their client, not on NBD: DELETE unblocks the
# client's socket too (API.md 2.4).

@pytest.mark.parametrize("transport", ["unix", "https"])
def test_delete_stops_get_client_not_reading(make_daemon, nbdkit, transport):
    # The client stopped reading: the daemon's send blocks, for the
    # ticket's inactivity timeout (virt-v2v sets 3600 s) before.
    daemon = make_daemon(control={"remove_timeout": "20"})
    size = 64 * MiB
    srv = nbdkit("pattern", f"size={size}")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=size,
               inactivity_timeout=3600)
    baseline = threads_and_fds()
    s = raw_client(daemon, transport, rcvbuf=4096)
    try:
        s.sendall(b"GET /images/tid-secret HTTP/1.1\r\n"
                  b"host: localhost\r\n\r\n")
        wait_until_stalled(daemon)
        resp, data = daemon.api.delete("tid-secret")
        assert resp.status == 204, data
        assert daemon.store.lookup("tid-secret") is None
        # The response was cut: the client reads less than the image.
        got = 0
        while True:
            try:
                chunk = s.recv(MiB)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            got += len(chunk)
        assert got < size
    finally:
        s.close()
    wait_for_baseline(baseline)


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_delete_stops_put_client_not_sending(make_daemon, nbdkit, transport):
    # The client sent half the body and waits: the daemon's receive
    # blocks. It learns that the transfer was canceled, then the
    # connection closes.
    daemon = make_daemon(control={"remove_timeout": "20"})
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"],
               inactivity_timeout=3600)
    baseline = threads_and_fds()
    s = raw_client(daemon, transport)
    try:
        s.sendall(b"PUT /images/tid-secret?flush=n HTTP/1.1\r\n"
                  b"host: localhost\r\n"
                  b"content-length: 4194304\r\n\r\n" + b"x" * (2 * MiB))
        wait_until_stalled(daemon)
        resp, data = daemon.api.delete("tid-secret")
        assert resp.status == 204, data
        assert daemon.store.lookup("tid-secret") is None
        reply = http.client.HTTPResponse(s)
        reply.begin()
        assert reply.status == 403
        assert reply.read() == (b"You are not allowed to access this "
                                b"resource: Transfer tr-1 was canceled\n")
        assert reply.getheader("connection") == "close"
        # Then the daemon closes the connection.
        try:
            assert s.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
    finally:
        s.close()
    wait_for_baseline(baseline)
