"""
Proxy mode (API.md section 5) end to end: a client talks HTTPS to a proxy
configured by the engine's 50-engine.conf, which relays to a daemon with
its own PKI, on loopback. Whatever a client does directly works through
the proxy, byte for byte; the daemon's errors reach the client unchanged.
"""

import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import urllib.parse

import pytest

import testutil
from ovirt_imageio import tls

MiB = 1024**2
SIZE = 4 * MiB

# Small buffers: a few MiB image goes through many pieces of the copy
# loops in both directions.
BUFFER_SIZE = 256 * 1024

TICKET_ID = "proxy-ticket-secret"


@pytest.fixture
def daemon(make_daemon):
    # The local socket is disabled, so the proxy talks HTTPS to the daemon
    # as it does to a daemon on another host (test_unix_socket below
    # covers the same-host case).
    return make_daemon(
        backend_nbd={"buffer_size": str(BUFFER_SIZE)},
        daemon={"max_connections": "4"},
        local={"enable": "false"})


@pytest.fixture
def proxy(make_proxy):
    return make_proxy(backend_http={"buffer_size": str(BUFFER_SIZE)})


@pytest.fixture
def image(make_image):
    """4 MiB raw: data, a zeroed range, holes, an unaligned data tail."""
    return make_image(size=SIZE, commands=[
        "write -P 0x41 0 1M", "write -z 1M 512k", "write -P 0x42 2M 512k",
        "write -P 0x43 3M 4k", "write -P 0x44 4190000 4000"])


def daemon_url(daemon, ticket_id=TICKET_ID, host="localhost"):
    port = daemon.remote.server.address()[1]
    return f"https://{host}:{port}/images/{ticket_id}"


def add_tickets(daemon, proxy, url, ticket_id=TICKET_ID, daemon_ticket=None,
                proxy_ticket=None, **kw):
    """
    Add the daemon's ticket (vdsm) and the proxy's ticket (engine): the
    same dict, but the proxy's URL is the daemon's /images URL.
    """
    t = {"uuid": ticket_id, "size": SIZE, "ops": ["read"], "timeout": 300,
         "url": url, "transfer_id": "tr-proxy"}
    t.update(kw)
    d = dict(t, **(daemon_ticket or {}))
    if daemon is not None:
        resp, data = daemon.api.put(d)
        assert resp.status == 200, data
    p = dict(t, url=daemon_url(daemon) if daemon is not None else url)
    p.update(proxy_ticket or {})
    resp, data = proxy.api.put(p)
    assert resp.status == 200, data
    return p


class Client:
    """A keep-alive HTTPS client, trusting one CA."""

    def __init__(self, url, ca_file):
        u = urllib.parse.urlsplit(url)
        ctx = ssl.create_default_context(cafile=ca_file)
        self.conn = http.client.HTTPSConnection(
            u.hostname, u.port, context=ctx, timeout=30)
        self.path = u.path

    def request(self, method, suffix="", body=None, headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.conn.request(method, self.path + suffix, body=body,
                          headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def close(self):
        self.conn.close()


@pytest.fixture
def clients(proxy, proxy_pki, pki):
    """clients(url, ca) -> Client, closed at teardown."""
    made = []

    def make(url, ca_file):
        c = Client(url, ca_file)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def pair(daemon, proxy, clients, pki, proxy_pki):
    """
    A client of the proxy and a client of the daemon (direct), for the
    same ticket added by the test; compare their answers.
    """
    via_proxy = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    direct = clients(daemon_url(daemon), pki["ca_file"])
    return via_proxy, direct


def file_bytes(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(-1 if length is None else length)


def link_transports(proxy, ticket_id=TICKET_ID):
    """How the proxy's links for a ticket reach the daemon."""
    ticket = proxy.store.lookup(ticket_id)
    return [lk.image.transport for lk in list(ticket._contexts)]


def nbd_url(server):
    return f"nbd:unix:{server.socket}"


# OPTIONS

def test_options_star(proxy, clients, proxy_pki):
    c = clients(proxy.url("*"), proxy_pki["ca_file"])
    resp, data = c.request("OPTIONS")
    assert resp.status == 200
    assert resp.getheader("allow") == "OPTIONS,GET,PUT,PATCH"
    # No unix_socket: the engine's config disables the local service.
    assert json.loads(data) == {
        "features": ["checksum", "extents", "flush", "zero"]}


@pytest.mark.parametrize("ops,allow,features", [
    (["read"], "OPTIONS,GET", ["checksum", "extents"]),
    (["write"], "OPTIONS,GET,PUT,PATCH",
     ["checksum", "extents", "flush", "zero"]),
], ids=["read", "write"])
def test_options_ticket(daemon, proxy, pair, image, ops, allow, features):
    add_tickets(daemon, proxy, f"file://{image}", ops=ops)
    via_proxy, _ = pair
    resp, data = via_proxy.request("OPTIONS")
    assert resp.status == 200
    assert resp.getheader("allow") == allow
    # max_readers/max_writers: the daemon's (4), not the proxy's (8).
    assert json.loads(data) == {
        "features": features, "max_readers": 4, "max_writers": 4}
    assert proxy.api.get(TICKET_ID)["connections"] == 1
    assert daemon.api.get(TICKET_ID)["connections"] == 1


def test_options_features_from_proxy_ticket(daemon, proxy, pair, image):
    # As upstream: features follow the proxy ticket's ops, not the daemon's.
    add_tickets(daemon, proxy, f"file://{image}", ops=["read"],
                proxy_ticket={"ops": ["write"]})
    via_proxy, _ = pair
    resp, data = via_proxy.request("OPTIONS")
    assert resp.status == 200
    assert json.loads(data)["features"] == [
        "checksum", "extents", "flush", "zero"]
    # Writing fails with the daemon's answer.
    resp, data = via_proxy.request(
        "PUT", body=b"x" * 4096, headers={"Content-Range": "bytes 0-4095/*"})
    assert resp.status == 403
    assert data == b"You are not allowed to access this resource: " \
                   b"Transfer=tr-proxy forbids write\n"


# Download

def test_download_full(daemon, proxy, pair, image):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    resp, data = via_proxy.request("GET")
    assert resp.status == 200
    assert resp.getheader("content-length") == str(SIZE)
    assert data == file_bytes(image)
    # Over TLS: the daemon has no local socket to switch to.
    assert link_transports(proxy) == ["https"]
    # Accounting on the proxy ticket, as on the daemon.
    info = testutil.wait_for_ticket(proxy.api, TICKET_ID, transferred=SIZE,
                                    active=False)
    assert info["connections"] == 1


@pytest.mark.parametrize("header", [
    "bytes=0-4095",
    "bytes=1000-1999",
    "bytes=0-1048575",
    "bytes=100-3000000",
    "bytes=1048576-1572863",
    "bytes=4000000-",
    "bytes=4194303-4194303",
    "bytes=-100",
    "bytes=4000000-4194304",
], ids=["first-block", "unaligned", "one-mib", "many-pieces", "zero-range",
        "open-ended", "last-byte", "suffix", "past-end"])
def test_download_range(daemon, proxy, pair, image, header):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    theirs = direct.request("GET", headers={"Range": header})
    ours = via_proxy.request("GET", headers={"Range": header})
    assert ours[0].status == theirs[0].status == 206
    for name in ("content-length", "content-range", "content-type",
                 "content-disposition"):
        assert ours[0].getheader(name) == theirs[0].getheader(name)
    assert ours[1] == theirs[1]


def test_download_skips_zero_extents(daemon, proxy, pair, image):
    # Zero runs are sent from the proxy's zero buffer: the daemon is asked
    # only for data (its ticket counts what it sent).
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    resp, body = direct.request("GET", "/extents")
    data = sum(e["length"] for e in json.loads(body) if not e["zero"])
    assert 0 < data < SIZE
    resp, body = via_proxy.request("GET")
    assert body == file_bytes(image)
    testutil.wait_for_ticket(daemon.api, TICKET_ID, transferred=data)
    testutil.wait_for_ticket(proxy.api, TICKET_ID, transferred=SIZE)


def test_download_client_disconnects(daemon, proxy, clients, proxy_pki,
                                     make_image, caplog):
    size = 32 * MiB
    big = make_image(name="big", size=size)
    with open(big, "wb") as f:
        f.write(os.urandom(size))
    add_tickets(daemon, proxy, f"file://{big}", size=size)
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    c.conn.request("GET", c.path)
    resp = c.conn.getresponse()
    assert resp.status == 200
    resp.read(MiB)
    c.conn.sock.shutdown(socket.SHUT_RDWR)
    c.close()
    testutil.wait_for(
        lambda: proxy.api.get(TICKET_ID)["connections"] == 0,
        message="proxy connection closed")
    # The client went away; the daemon is not blamed.
    assert "Cannot reach daemon" not in caplog.text
    assert proxy.api.get(TICKET_ID)["active"] is False
    # The daemon's connection was released too.
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="daemon connection closed")


@pytest.mark.parametrize("header", [
    "bytes=10-5", "bytes=4194304-4194304", "bytes=0-1,5-6", "bytes=-0"])
def test_download_range_errors(daemon, proxy, pair, image, header):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    theirs = direct.request("GET", headers={"Range": header})
    ours = via_proxy.request("GET", headers={"Range": header})
    assert ours[0].status == theirs[0].status == 416
    assert ours[1] == theirs[1]
    assert ours[0].getheader("content-range") == \
        theirs[0].getheader("content-range")


def test_download_ticket_larger_than_image(daemon, proxy, pair, image):
    # The daemon's image (its size from the daemon's extents) limits the
    # proxy's answer, as a small export limits the daemon's.
    add_tickets(daemon, proxy, f"file://{image}", size=SIZE,
                proxy_ticket={"size": 2 * SIZE})
    via_proxy, _ = pair
    resp, data = via_proxy.request("GET")
    assert resp.status == 200
    assert data == file_bytes(image)
    # A range past the end is served up to the end.
    resp, data = via_proxy.request(
        "GET", headers={"Range": f"bytes=0-{SIZE}"})
    assert resp.status == 206
    assert resp.getheader("content-range") == f"bytes 0-{SIZE - 1}/{SIZE}"
    assert data == file_bytes(image)
    resp, data = via_proxy.request(
        "GET", headers={"Range": f"bytes={SIZE}-{SIZE}"})
    assert resp.status == 416
    assert data == (f"Requested more bytes than available: {SIZE + 1} > "
                    f"{SIZE}\n").encode()


def test_download_many_connections(daemon, proxy, clients, proxy_pki,
                                   image):
    add_tickets(daemon, proxy, f"file://{image}")
    expected = file_bytes(image)
    results = {}

    def worker(i):
        c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
        start = i * MiB
        resp, data = c.request(
            "GET", headers={"Range": f"bytes={start}-{start + MiB - 1}"})
        results[i] = (resp.status, data)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i] == (206, expected[i * MiB:(i + 1) * MiB])
    # One daemon connection per client connection.
    assert proxy.api.get(TICKET_ID)["connections"] == 4
    assert daemon.api.get(TICKET_ID)["connections"] == 4
    testutil.wait_for_ticket(proxy.api, TICKET_ID, transferred=SIZE)


# Upload, zero, flush

@pytest.fixture
def target(tmp_path):
    path = str(tmp_path / "target.raw")
    with open(path, "wb") as f:
        f.truncate(SIZE)
    return path


@pytest.mark.parametrize("flush", ["y", "n"])
def test_upload(daemon, proxy, pair, target, flush):
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    via_proxy, _ = pair
    data = os.urandom(3 * MiB + 1000)
    resp, body = via_proxy.request(
        "PUT", f"?flush={flush}", body=data,
        headers={"Content-Range": f"bytes 1000-{1000 + len(data) - 1}/*"})
    assert resp.status == 200, body
    assert body == b""
    assert file_bytes(target, 1000, len(data)) == data
    assert file_bytes(target, 0, 1000) == bytes(1000)
    info = proxy.api.get(TICKET_ID)
    assert info["transferred"] == len(data)
    assert info["active"] is False


def test_upload_whole_image_then_download(daemon, proxy, pair, target):
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    via_proxy, direct = pair
    data = os.urandom(SIZE)
    resp, body = via_proxy.request("PUT", body=data)
    assert resp.status == 200, body
    resp, body = via_proxy.request("GET")
    assert body == data
    resp, body = direct.request("GET")
    assert body == data


def test_upload_empty_body(daemon, proxy, pair, target):
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    via_proxy, _ = pair
    resp, body = via_proxy.request(
        "PUT", "?flush=y", body=b"",
        headers={"Content-Range": f"bytes {SIZE}-{SIZE}/*"})
    assert resp.status == 200, body


def short_put(port, ca_file, ticket_id):
    """PUT announcing 1 MiB, send 1000 bytes, half-close; the reply."""
    ctx = ssl.create_default_context(cafile=ca_file)
    with socket.create_connection(("localhost", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            s.sendall(
                f"PUT /images/{ticket_id} HTTP/1.1\r\n"
                f"Content-Length: {MiB}\r\n\r\n".encode() + b"x" * 1000)
            # Half-close the TCP connection under TLS.
            with socket.socket(fileno=os.dup(s.fileno())) as dup:
                dup.shutdown(socket.SHUT_WR)
            reply = b""
            while True:
                try:
                    chunk = s.recv(65536)
                except (ssl.SSLError, OSError):
                    break
                if not chunk:
                    break
                reply += chunk
    return reply


def test_upload_short_body(daemon, proxy, pki, proxy_pki, target):
    # The client announces more than it sends, then half-closes: the same
    # answer as the daemon's, and the daemon's PUT is abandoned.
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    theirs = short_put(daemon.remote.server.address()[1], pki["ca_file"],
                       TICKET_ID)
    ours = short_put(proxy.remote.server.address()[1], proxy_pki["ca_file"],
                     TICKET_ID)
    assert theirs.startswith(b"HTTP/1.1 400 ")
    assert ours.split(b"\r\n")[0] == theirs.split(b"\r\n")[0]
    assert ours.split(b"\r\n\r\n", 1)[1] == \
        theirs.split(b"\r\n\r\n", 1)[1] == \
        f"Requested {MiB} bytes, available 1000 bytes\n".encode()
    testutil.wait_for(
        lambda: not proxy.store.lookup(TICKET_ID).active,
        message="proxy operation ended")
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="daemon connection released")


def test_daemon_busy_503_passed_on(make_daemon, proxy, clients, pki,
                                   proxy_pki, image):
    # The daemon's buffer pool holds one piece and answers 503 at once
    # when it is taken: the proxy's client gets the daemon's 503 and its
    # Retry-After, not a 502, and both serve on.
    piece = BUFFER_SIZE // 2
    daemon = make_daemon(
        backend_nbd={"buffer_size": str(BUFFER_SIZE)},
        backend_http={"buffer_size": str(BUFFER_SIZE)},
        daemon={"buffer_memory": str(piece), "buffer_wait_timeout": "0"},
        local={"enable": "false"})
    add_tickets(daemon, proxy, f"file://{image}", ops=["read", "write"])
    holder = clients(daemon_url(daemon), pki["ca_file"])
    holder.conn.putrequest("PUT", holder.path)
    holder.conn.putheader("Content-Length", str(piece))
    holder.conn.putheader("Content-Range", f"bytes 0-{piece - 1}/*")
    holder.conn.endheaders()
    holder.conn.send(b"x" * (piece // 2))
    testutil.wait_for(lambda: daemon.buffers.stats()["in_use"] == 1,
                      message="the daemon's only buffer is held")
    via_proxy = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, body = via_proxy.request(
        "GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 503
    assert resp.getheader("retry-after") == "5"
    assert body == b"Too many transfers in progress, retry later\n"
    holder.conn.send(b"x" * (piece - piece // 2))
    reply = holder.conn.getresponse()
    assert reply.status == 200
    reply.read()
    resp, body = via_proxy.request(
        "GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    assert body == b"x" * 4096


def test_zero_and_flush(daemon, proxy, pair, target):
    with open(target, "wb") as f:
        f.write(b"\xff" * SIZE)
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    via_proxy, _ = pair
    resp, body = via_proxy.request(
        "PATCH", body={"op": "zero", "offset": 4096, "size": 2 * MiB,
                       "flush": True})
    assert resp.status == 200, body
    resp, body = via_proxy.request("PATCH", body={"op": "flush"})
    assert resp.status == 200, body
    data = file_bytes(target)
    assert data[:4096] == b"\xff" * 4096
    assert data[4096:4096 + 2 * MiB] == bytes(2 * MiB)
    assert data[4096 + 2 * MiB:] == b"\xff" * (SIZE - 4096 - 2 * MiB)
    assert proxy.api.get(TICKET_ID)["transferred"] == 2 * MiB


def test_upload_out_of_daemon_range(daemon, proxy, pair, target):
    # The proxy's ticket allows more than the daemon's: the daemon's 416
    # reaches the client.
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"],
                size=SIZE, proxy_ticket={"size": 2 * SIZE})
    via_proxy, _ = pair
    resp, body = via_proxy.request(
        "PUT", body=b"x" * 4096,
        headers={"Content-Range": f"bytes {SIZE}-{SIZE + 4095}/*"})
    assert resp.status == 416
    assert body == b"Requested range out of allowed range\n"
    # The daemon's Content-Range comes along with its status.
    assert resp.getheader("content-range") == f"bytes */{SIZE}"
    resp, body = via_proxy.request(
        "PATCH", body={"op": "zero", "offset": SIZE, "size": 4096})
    assert resp.status == 416
    assert resp.getheader("content-range") == f"bytes */{SIZE}"
    # The connection still works.
    resp, body = via_proxy.request("PATCH", body={"op": "flush"})
    assert resp.status == 200


# Extents

def test_extents_zero(daemon, proxy, pair, image):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    ours = via_proxy.request("GET", "/extents")
    theirs = direct.request("GET", "/extents")
    assert ours[0].status == theirs[0].status == 200
    assert json.loads(ours[1]) == json.loads(theirs[1])
    assert ours[1] == theirs[1]
    # Not an operation, but the connection counts.
    info = proxy.api.get(TICKET_ID)
    assert info["transferred"] == 0
    assert info["connections"] == 1


@pytest.fixture
def dirty_export(make_image, qemu_nbd):
    """A qcow2 with a bitmap recording one 64 KiB write, by qemu-nbd."""
    path = make_image(fmt="qcow2", size=SIZE, bitmaps=["b1"], commands=[
        "write -P 0x55 1M 64k"])
    return qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1")


def test_extents_dirty(daemon, proxy, pair, dirty_export):
    add_tickets(daemon, proxy, nbd_url(dirty_export), dirty=True)
    via_proxy, direct = pair
    ours = via_proxy.request("GET", "/extents?context=dirty")
    theirs = direct.request("GET", "/extents?context=dirty")
    assert ours[0].status == theirs[0].status == 200
    assert ours[1] == theirs[1]
    assert json.loads(ours[1]) == [
        {"start": 0, "length": MiB, "dirty": False, "zero": True},
        {"start": MiB, "length": 65536, "dirty": True, "zero": False},
        {"start": MiB + 65536, "length": 3 * MiB - 65536, "dirty": False,
         "zero": True},
    ]
    ours = via_proxy.request("GET", "/extents?context=zero")
    theirs = direct.request("GET", "/extents?context=zero")
    assert ours[1] == theirs[1]


def test_extents_dirty_needs_dirty_proxy_ticket(daemon, proxy, pair,
                                                dirty_export):
    add_tickets(daemon, proxy, nbd_url(dirty_export), dirty=True,
                proxy_ticket={"dirty": False})
    via_proxy, _ = pair
    resp, data = via_proxy.request("GET", "/extents?context=dirty")
    assert resp.status == 404
    assert data == b"Ticket does not support dirty extents\n"


def test_extents_dirty_daemon_404(daemon, proxy, pair, dirty_export):
    # The daemon's ticket has no dirty: its 404 and message pass through.
    add_tickets(daemon, proxy, nbd_url(dirty_export), dirty=True,
                daemon_ticket={"dirty": False})
    via_proxy, direct = pair
    ours = via_proxy.request("GET", "/extents?context=dirty")
    theirs = direct.request("GET", "/extents?context=dirty")
    assert ours[0].status == theirs[0].status == 404
    assert ours[1] == theirs[1]


# Checksum: computed on the proxy, reading through the relay.

@pytest.mark.parametrize("query", [
    "", "?algorithm=sha1&block_size=1048576"], ids=["default", "sha1"])
def test_checksum(daemon, proxy, pair, image, query):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, direct = pair
    ours = via_proxy.request("GET", "/checksum" + query)
    theirs = direct.request("GET", "/checksum" + query)
    assert ours[0].status == theirs[0].status == 200
    assert json.loads(ours[1]) == json.loads(theirs[1])
    assert proxy.api.get(TICKET_ID)["transferred"] == SIZE


# Errors from the daemon pass through.

def test_daemon_has_no_such_ticket(daemon, proxy, clients, proxy_pki,
                                   image):
    # The engine's proxy ticket points at a ticket the daemon lacks.
    t = {"uuid": TICKET_ID, "size": SIZE, "ops": ["read"], "timeout": 300,
         "url": daemon_url(daemon, "missing"), "transfer_id": "tr-proxy"}
    resp, data = proxy.api.put(t)
    assert resp.status == 200, data
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    for method in ("OPTIONS", "GET"):
        resp, data = c.request(method)
        assert resp.status == 403
        assert data == (b"You are not allowed to access this resource: "
                        b"No such ticket missing\n")
        # As upstream, the proxy keeps the client's connection.
        assert resp.getheader("connection") is None
    # No link was kept: nothing counts.
    assert proxy.api.get(TICKET_ID)["connections"] == 0


def test_unknown_proxy_ticket(proxy, clients, proxy_pki):
    c = clients(proxy.url("nope"), proxy_pki["ca_file"])
    resp, data = c.request("GET")
    assert resp.status == 403
    assert data == (b"You are not allowed to access this resource: "
                    b"No such ticket nope\n")
    assert resp.getheader("connection") == "close"


def test_daemon_ticket_deleted_during_transfer(daemon, proxy, pair, image):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, _ = pair
    resp, data = via_proxy.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    resp, _ = daemon.api.delete(TICKET_ID)
    assert resp.status == 204
    resp, data = via_proxy.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 403
    assert data == (b"You are not allowed to access this resource: "
                    b"No such ticket " + TICKET_ID.encode() + b"\n")


# TLS to the daemon, verified with [backend_http] ca_file.

def test_daemon_certificate_not_trusted(daemon, make_proxy, clients,
                                        proxy_pki, image):
    # The proxy trusts only its own CA, not the one that signed the
    # daemon's certificate.
    proxy = make_proxy(backend_http={"ca_file": proxy_pki["ca_file"]})
    add_tickets(daemon, proxy, f"file://{image}")
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET")
    assert resp.status == 502
    port = daemon.remote.server.address()[1]
    assert data.startswith(
        f"Cannot reach daemon localhost:{port}: ".encode())
    assert b"CERTIFICATE_VERIFY_FAILED" in data
    # The daemon never saw an authorized request.
    assert daemon.api.get(TICKET_ID)["connections"] == 0


def test_daemon_hostname_verified(make_daemon, proxy, clients, proxy_pki,
                                  image):
    # The daemon listens on every IPv4 address; its certificate names
    # localhost and 127.0.0.1, not 127.0.0.2, which reaches it too.
    daemon = make_daemon(remote={"host": "0.0.0.0"},
                         local={"enable": "false"})
    add_tickets(daemon, proxy, f"file://{image}", proxy_ticket={
        "url": daemon_url(daemon, host="127.0.0.2")})
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET")
    assert resp.status == 502
    assert b"CERTIFICATE_VERIFY_FAILED" in data
    assert b"mismatch" in data


def test_ca_falls_back_to_tls_ca_file(daemon, make_proxy, clients, pki,
                                      proxy_pki, image):
    # Without [backend_http] ca_file, the proxy trusts [tls] ca_file: here
    # a bundle with both CAs.
    bundle = os.path.join(str(daemon.tmp), "bundle.pem")
    with open(bundle, "w") as f:
        for path in (proxy_pki["ca_file"], pki["ca_file"]):
            with open(path) as ca:
                f.write(ca.read())
    proxy = make_proxy(backend_http={"ca_file": ""},
                       tls={"ca_file": bundle})
    add_tickets(daemon, proxy, f"file://{image}")
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET")
    assert resp.status == 200
    assert data == file_bytes(image)


def test_unix_socket(make_daemon, proxy, clients, proxy_pki, image,
                     caplog):
    # A daemon on the proxy's host with its local service: the relay
    # switches to the unix socket after OPTIONS, as upstream's proxy.
    daemon = make_daemon(backend_nbd={"buffer_size": str(BUFFER_SIZE)})
    add_tickets(daemon, proxy, f"file://{image}")
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET")
    assert resp.status == 200
    assert data == file_bytes(image)
    assert link_transports(proxy) == ["unix"]


# A daemon that is down, or goes down.

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_down(proxy, clients, proxy_pki):
    port = free_port()
    t = {"uuid": TICKET_ID, "size": SIZE, "ops": ["read"], "timeout": 300,
         "url": f"https://localhost:{port}/images/{TICKET_ID}",
         "transfer_id": "tr-proxy"}
    resp, data = proxy.api.put(t)
    assert resp.status == 200, data
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    for method in ("OPTIONS", "GET"):
        resp, data = c.request(method)
        assert resp.status == 502
        assert data == (f"Cannot reach daemon localhost:{port}: "
                        f"Connection refused\n").encode()
    # The ticket id (a credential) never appears in the message.
    assert TICKET_ID.encode() not in data
    # The proxy keeps serving, on the same connection too.
    resp, data = c.request("GET", "/checksum/algorithms")
    assert resp.status == 200
    info = proxy.api.get(TICKET_ID)
    assert info["connections"] == 0
    assert info["active"] is False


@pytest.fixture
def daemon_process(tmp_path, pki):
    """Our daemon in a child process, to kill it mid transfer."""
    import upstream
    d = testutil.DaemonProcess(
        tmp_path / "dp", pki, local={"enable": "false"},
        backend_nbd={"buffer_size": str(BUFFER_SIZE)})
    try:
        d.wait_ready()
        d.port = upstream.listening_ports(d.proc.pid)[0]
        yield d
    finally:
        d.stop(signal.SIGKILL)


def test_daemon_killed_mid_download(daemon_process, proxy, clients,
                                    proxy_pki, make_image, image):
    size = 64 * MiB
    big = make_image(name="big", size=size)
    with open(big, "wb") as f:
        f.write(os.urandom(size))
    port = daemon_process.port
    t = {"uuid": TICKET_ID, "size": size, "ops": ["read"], "timeout": 300,
         "url": f"file://{big}", "transfer_id": "tr-proxy"}
    resp, data = daemon_process.api.put(t)
    assert resp.status == 200, data
    resp, data = proxy.api.put(dict(
        t, url=f"https://localhost:{port}/images/{TICKET_ID}"))
    assert resp.status == 200, data

    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    c.conn.request("GET", c.path)
    resp = c.conn.getresponse()
    assert resp.status == 200
    first = resp.read(MiB)
    assert first == file_bytes(big, 0, MiB)
    daemon_process.proc.kill()
    daemon_process.proc.wait()
    # The client gets a short body: the proxy closes the connection.
    got = len(first)
    while True:
        try:
            chunk = resp.read(MiB)
        except (http.client.IncompleteRead, OSError):
            break
        if not chunk:
            break
        got += len(chunk)
    assert got < size
    testutil.wait_for(
        lambda: not proxy.store.lookup(TICKET_ID).active,
        message="proxy operation ended")

    # The proxy keeps serving: a new request on the ticket gets a clear
    # error, and other tickets work.
    c2 = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c2.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 502
    assert data == (f"Cannot reach daemon localhost:{port}: "
                    f"Connection refused\n").encode()
    c3 = clients(proxy.url("*"), proxy_pki["ca_file"])
    resp, data = c3.request("OPTIONS")
    assert resp.status == 200


def test_daemon_killed_mid_upload(daemon_process, proxy, clients,
                                  proxy_pki, target):
    port = daemon_process.port
    t = {"uuid": TICKET_ID, "size": SIZE, "ops": ["write"], "timeout": 300,
         "url": f"file://{target}", "transfer_id": "tr-proxy"}
    resp, data = daemon_process.api.put(t)
    assert resp.status == 200, data
    resp, data = proxy.api.put(dict(
        t, url=f"https://localhost:{port}/images/{TICKET_ID}"))
    assert resp.status == 200, data
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    # OPTIONS opens the link to the daemon; then the daemon dies.
    resp, data = c.request("OPTIONS")
    assert resp.status == 200
    daemon_process.proc.kill()
    daemon_process.proc.wait()
    resp, data = c.request("PUT", body=os.urandom(MiB))
    assert resp.status == 502
    assert data.startswith(f"Cannot reach daemon localhost:{port}: ".encode())
    testutil.wait_for(
        lambda: not proxy.store.lookup(TICKET_ID).active,
        message="proxy operation ended")


# Connections and tickets on the proxy.

def test_daemon_closes_idle_connection(make_daemon, proxy, clients,
                                       proxy_pki, image):
    # The daemon closes the relay's idle connection after its ticket's
    # inactivity timeout; the next request through the proxy reconnects.
    daemon = make_daemon(local={"enable": "false"})
    add_tickets(daemon, proxy, f"file://{image}",
                daemon_ticket={"inactivity_timeout": 1})
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="daemon closed the idle connection")
    resp, data = c.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    assert data == file_bytes(image, 0, 4096)


def test_delete_proxy_ticket_closes_daemon_connection(daemon, proxy, pair,
                                                      image):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, _ = pair
    resp, _ = via_proxy.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 206
    assert daemon.api.get(TICKET_ID)["connections"] == 1
    resp, _ = proxy.api.delete(TICKET_ID)
    assert resp.status == 204
    # The idle link was released: the daemon sees its connection close.
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="relay connection closed")
    resp, data = via_proxy.request("GET", headers={"Range": "bytes=0-4095"})
    assert resp.status == 403


def test_cancel_proxy_ticket_mid_download(daemon, proxy, clients,
                                          proxy_pki, make_image):
    size = 32 * MiB
    big = make_image(name="big", size=size)
    with open(big, "wb") as f:
        f.write(os.urandom(size))
    add_tickets(daemon, proxy, f"file://{big}", size=size)
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    c.conn.request("GET", c.path)
    resp = c.conn.getresponse()
    assert resp.status == 200
    got = len(resp.read(MiB))
    result = {}
    deleter = threading.Thread(
        target=lambda: result.update(
            status=proxy.api.delete(TICKET_ID)[0].status))
    deleter.start()
    testutil.wait_for(lambda: proxy.store.lookup(TICKET_ID) is None
                      or proxy.store.lookup(TICKET_ID).canceled,
                      message="ticket canceled")
    # The transfer stops within a piece once the client reads on.
    while True:
        try:
            chunk = resp.read(MiB)
        except (http.client.IncompleteRead, OSError):
            break
        if not chunk:
            break
        got += len(chunk)
    deleter.join()
    assert result["status"] == 204
    assert got < size
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="daemon connection released")


def test_client_disconnect_releases_daemon_connection(daemon, proxy, pair,
                                                      image):
    add_tickets(daemon, proxy, f"file://{image}")
    via_proxy, _ = pair
    via_proxy.request("OPTIONS")
    assert daemon.api.get(TICKET_ID)["connections"] == 1
    via_proxy.close()
    testutil.wait_for(
        lambda: proxy.api.get(TICKET_ID)["connections"] == 0,
        message="proxy connection closed")
    testutil.wait_for(
        lambda: daemon.api.get(TICKET_ID)["connections"] == 0,
        message="daemon connection closed")


def test_engine_config(proxy):
    # 50-engine.conf as written, ports moved by 99-test.conf only.
    cfg = proxy.cfg
    assert cfg.local.enable is False
    assert cfg.control.transport == "tcp"
    assert proxy.local is None
    assert cfg.tls.enable is True


# curl and upstream's client library 2.5.1 through the proxy.

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_curl_download(daemon, proxy, proxy_pki, image, tmp_path):
    add_tickets(daemon, proxy, f"file://{image}")
    out = str(tmp_path / "out")
    r = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--http1.1",
         "--cacert", proxy_pki["ca_file"], "-o", out, proxy.url(TICKET_ID)],
        capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sha256(out) == sha256(image)


@pytest.fixture
def up(upstream_venv):
    import upstream
    return upstream


def qemu_img_compare(a, b, fmt_a="raw", fmt_b="raw"):
    r = subprocess.run(["qemu-img", "compare", "-f", fmt_a, "-F", fmt_b,
                        a, b], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_upstream_download(daemon, proxy, proxy_pki, image, tmp_path, up):
    add_tickets(daemon, proxy, f"file://{image}")
    out = str(tmp_path / "out.raw")
    up.run_client(
        "import sys\n"
        "from ovirt_imageio import client\n"
        "client.download(sys.argv[1], sys.argv[2], sys.argv[3], fmt='raw')\n",
        proxy.url(TICKET_ID), out, proxy_pki["ca_file"], timeout=120)
    assert sha256(out) == sha256(image)
    assert proxy.api.get(TICKET_ID)["transferred"] > 0


def test_upstream_upload(daemon, proxy, proxy_pki, image, target, up):
    add_tickets(daemon, proxy, f"file://{target}", ops=["write"])
    up.run_client(
        "import sys\n"
        "from ovirt_imageio import client\n"
        "client.upload(sys.argv[1], sys.argv[2], sys.argv[3])\n",
        image, proxy.url(TICKET_ID), proxy_pki["ca_file"], timeout=120)
    qemu_img_compare(image, target)
    assert proxy.api.get(TICKET_ID)["transferred"] == SIZE


def test_upstream_checksum(daemon, proxy, clients, proxy_pki, image, up):
    # What the SDK's checksum_disk.py compares: upstream's client over the
    # local file, the proxy's /checksum over the daemon's image.
    add_tickets(daemon, proxy, f"file://{image}")
    theirs = up.run_json(
        "import sys, json\n"
        "from ovirt_imageio import client\n"
        "print(json.dumps(client.checksum(sys.argv[1])))\n",
        image, timeout=120)
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    resp, data = c.request("GET", "/checksum")
    assert resp.status == 200
    assert json.loads(data) == theirs


def test_upstream_incremental(daemon, proxy, proxy_pki, make_image,
                              qemu_nbd, tmp_path, up):
    # A full backup, writes recorded by a dirty bitmap, then an
    # incremental backup through the proxy on top of the full one.
    path = make_image(name="vm", fmt="qcow2", size=SIZE, commands=[
        "write -P 0x01 0 4M"])
    full = str(tmp_path / "full.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                    path, full], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b1"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 64k",
                    "-c", "write -z 3M 512k", path], check=True,
                   capture_output=True)
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1")
    add_tickets(daemon, proxy, nbd_url(srv), dirty=True)
    incr = str(tmp_path / "incr.qcow2")
    up.run_client(
        "import sys\n"
        "from ovirt_imageio import client\n"
        "client.download(sys.argv[1], sys.argv[2], sys.argv[3], "
        "fmt='qcow2', incremental=True)\n",
        proxy.url(TICKET_ID), incr, proxy_pki["ca_file"], timeout=120)
    subprocess.run(["qemu-img", "rebase", "-u", "-b", full, "-F", "qcow2",
                    incr], check=True)
    qemu_img_compare(path, incr, "qcow2", "qcow2")
    r = subprocess.run(["qemu-img", "map", "--output=json", incr],
                       capture_output=True, check=True)
    top = [e for e in json.loads(r.stdout) if e["depth"] == 0 and e["data"]]
    assert sum(e["length"] for e in top) <= MiB


# The daemon's errors pass through even when it closes mid-body.

def put_via_proxy(proxy, proxy_pki, ticket_id, length):
    """
    PUT length bytes to the proxy until it stops taking the body (it
    answered, lingered and closed); return the response (status, body).
    One thread, and TLS through memory BIOs (ovirt_imageio.tls): a failed
    write does not poison reading the response that came first.
    """
    ctx = ssl.create_default_context(cafile=proxy_pki["ca_file"])
    port = proxy.remote.server.address()[1]
    raw = socket.create_connection(("localhost", port), timeout=30)
    with raw:
        s = tls.Socket(raw, ctx, "localhost")
        s.sendall(f"PUT /images/{ticket_id}?flush=n HTTP/1.1\r\n"
                  f"content-length: {length}\r\n\r\n".encode())
        piece = b"x" * MiB
        try:
            for _ in range(length // MiB):
                s.sendall(piece)
        except OSError:
            pass
        resp = http.client.HTTPResponse(s)
        resp.begin()
        return resp.status, resp.read()


@pytest.mark.parametrize("buffer_size", [BUFFER_SIZE, None],
                         ids=["small-buffer", "default-buffer"])
@pytest.mark.parametrize("local", ["false", "true"], ids=["https", "unix"])
def test_upload_daemon_error_mid_body(make_daemon, make_proxy, proxy_pki,
                                      nbdkit, local, buffer_size):
    # The daemon fails the first write (ENOSPC), answers 500 and closes
    # after draining at most server.LINGER_MAX bytes, while the proxy is
    # still relaying a body far larger than that: the proxy's send fails
    # (EPIPE or ECONNRESET), but the daemon's answer is on the socket.
    daemon = make_daemon(local={"enable": local})
    proxy = make_proxy(**({"backend_http": {"buffer_size": str(buffer_size)}}
                          if buffer_size else {}))
    size = 64 * MiB
    # Small NBD requests: the daemon sees the first error early.
    srv = nbdkit("memory", f"size={size}", "error-pwrite=ENOSPC",
                 "error-pwrite-rate=100%", "blocksize-maximum=65536",
                 filters=["blocksize-policy", "error"])
    add_tickets(daemon, proxy, nbd_url(srv), ops=["write"], size=size)
    status, body = put_via_proxy(proxy, proxy_pki, TICKET_ID, size)
    assert status == 500
    assert body == b"Server failed to perform the request, check logs\n"


@pytest.mark.parametrize("local", ["false", "true"], ids=["https", "unix"])
def test_upload_daemon_ticket_canceled_mid_body(make_daemon, proxy,
                                                proxy_pki, nbdkit, local):
    # The daemon's writes stall; deleting its ticket interrupts them, and
    # the daemon answers 403 and closes while the proxy is still relaying.
    daemon = make_daemon(local={"enable": local})
    size = 64 * MiB
    srv = nbdkit("memory", f"size={size}", "wdelay=60", filters=["delay"])
    add_tickets(daemon, proxy, nbd_url(srv), ops=["write"], size=size)
    result = {}

    def delete():
        testutil.wait_for(lambda: daemon.api.get(TICKET_ID)["active"],
                          message="PUT in flight on the daemon")
        result["delete"] = daemon.api.delete(TICKET_ID)[0].status

    deleter = threading.Thread(target=delete)
    deleter.start()
    try:
        status, body = put_via_proxy(proxy, proxy_pki, TICKET_ID, size)
    finally:
        deleter.join(60)
    assert result["delete"] == 204
    assert status == 403
    assert body.endswith(b" was canceled\n"), body


def test_delete_409_when_daemon_hangs(daemon, make_proxy, clients, proxy_pki,
                                      nbdkit):
    # API.md 2.4: DELETE interrupts what a transfer waits on in this
    # process (NBD I/O, its client), not a daemon that does not answer:
    # the proxy's GET waits for the daemon's response up to its timeout
    # ([backend_http], 60 s). DELETE says 409 and the ticket stays,
    # canceled, until a later DELETE finds it idle.
    proxy = make_proxy(control={"remove_timeout": "1"})
    # The pattern plugin has no zero extents: the proxy asks the daemon.
    srv = nbdkit("pattern", f"size={SIZE}", "delay-read=60",
                 filters=["delay"])
    add_tickets(daemon, proxy, nbd_url(srv))
    c = clients(proxy.url(TICKET_ID), proxy_pki["ca_file"])
    c.conn.request("GET", c.path, headers={"Range": "bytes=0-4095"})
    testutil.wait_for_ticket(daemon.api, TICKET_ID, active=True)
    resp, data = proxy.api.delete(TICKET_ID)
    assert resp.status == 409
    assert data == b"Timeout cancelling transfer tr-proxy\n"
    assert proxy.api.get(TICKET_ID)["canceled"] is True
    # The daemon's ticket goes: its NBD read is interrupted, it answers,
    # and the proxy's transfer ends.
    resp, _ = daemon.api.delete(TICKET_ID)
    assert resp.status == 204
    reply = c.conn.getresponse()
    reply.read()
    assert reply.status == 403

    def removed():
        r, _ = proxy.api.delete(TICKET_ID)
        return r.status == 204

    testutil.wait_for(removed, message="proxy ticket removed")
    assert proxy.store.lookup(TICKET_ID) is None


@pytest.mark.parametrize("local", ["false", "true"], ids=["https", "unix"])
def test_upload_daemon_ticket_canceled_client_waiting(make_daemon, proxy,
                                                      proxy_pki, nbdkit,
                                                      local):
    # The client sent half its body and waits, so do the proxy and the
    # daemon. Deleting the daemon's ticket unblocks the daemon's receive:
    # it answers 403 and closes. The client sends the rest, the proxy's
    # send to the daemon fails, and the daemon's 403 reaches the client.
    daemon = make_daemon(local={"enable": local},
                         control={"remove_timeout": "20"})
    size = 64 * MiB
    srv = nbdkit("memory", f"size={size}")
    add_tickets(daemon, proxy, nbd_url(srv), ops=["write"], size=size)
    ctx = ssl.create_default_context(cafile=proxy_pki["ca_file"])
    port = proxy.remote.server.address()[1]
    with socket.create_connection(("localhost", port), timeout=30) as raw:
        s = tls.Socket(raw, ctx, "localhost")
        s.sendall(f"PUT /images/{TICKET_ID}?flush=n HTTP/1.1\r\n"
                  f"content-length: {size}\r\n\r\n".encode())
        piece = b"x" * MiB
        for _ in range(8):
            s.sendall(piece)
        testutil.wait_for_ticket(daemon.api, TICKET_ID, active=True)
        resp, data = daemon.api.delete(TICKET_ID)
        assert resp.status == 204, data
        try:
            for _ in range(size // MiB - 8):
                s.sendall(piece)
        except OSError:
            pass
        reply = http.client.HTTPResponse(s)
        reply.begin()
        body = reply.read()
    # The daemon's words (the proxy's own cancel says "Transfer=...").
    assert reply.status == 403
    assert body == (b"You are not allowed to access this resource: "
                    b"Transfer tr-proxy was canceled\n")
