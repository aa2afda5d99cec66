"""The daemon's services: file-ticket exports, HTTPS, the local socket."""

import array
import fcntl
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import termios
import threading

import pytest

import testutil
from ovirt_imageio.nbd import client as nbd_client


def file_ticket(path, **kw):
    d = {"uuid": "file-ticket-1", "size": 1 << 20, "ops": ["write"],
         "timeout": 300, "url": f"file://{path}", "transfer_id": "tr-file"}
    d.update(kw)
    return d


def raw_image(tmp_path, name="disk.raw", size=1 << 20):
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def own_exports():
    """qemu-nbd processes started by this process (the in-process daemon),
    whatever other processes on the machine run."""
    return set(testutil.children(os.getpid())) & set(testutil.qemu_nbd_pids())


def export_pids(daemon, ticket_id):
    server = daemon.store.lookup(ticket_id).resource.server
    return [server.pid]


# File tickets: the daemon owns a qemu-nbd per ticket.

def test_file_ticket_lifecycle(daemon, tmp_path):
    path = raw_image(tmp_path)
    before = own_exports()
    resp, data = daemon.api.put(file_ticket(path))
    assert resp.status == 200, data
    started = own_exports() - before
    assert started == set(export_pids(daemon, "file-ticket-1"))

    # The export serves the file's bytes, and takes several connections.
    backend = daemon.store.lookup("file-ticket-1").resource
    with backend.open() as c1, backend.open() as c2:
        c1.write(b"x" * 4096, 0)
        c1.flush()
        assert c2.read(4096, 0) == b"x" * 4096
        assert c2.size == 1 << 20
    with open(path, "rb") as f:
        assert f.read(4096) == b"x" * 4096

    resp, _ = daemon.api.delete("file-ticket-1")
    assert resp.status == 204
    testutil.wait_for(lambda: not (set(testutil.qemu_nbd_pids()) & started),
                      message="qemu-nbd stopped")
    # Its socket is gone from the run dir too.
    assert [n for n in os.listdir(daemon.cfg.daemon.run_dir)
            if n.endswith(".sock")] == []


def test_file_ticket_socket_hides_ticket_id(daemon, tmp_path):
    daemon.api.put(file_ticket(raw_image(tmp_path)))
    names = os.listdir(daemon.cfg.daemon.run_dir)
    assert names
    assert not any("file-ticket-1" in n for n in names)


def test_file_ticket_read_only(daemon, tmp_path):
    daemon.api.put(file_ticket(raw_image(tmp_path), ops=["read"]))
    backend = daemon.store.lookup("file-ticket-1").resource
    with backend.open() as c:
        assert c.read_only
        with pytest.raises(nbd_client.Error):
            c.write(b"x" * 512, 0)


def test_file_ticket_raw_never_probed(daemon, tmp_path):
    # A qcow2 file is served as its bytes, not as the guest disk it holds.
    path = str(tmp_path / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", path, "1G"],
                   check=True, capture_output=True)
    daemon.api.put(file_ticket(path, ops=["read"]))
    backend = daemon.store.lookup("file-ticket-1").resource
    with backend.open() as c:
        assert c.read(4, 0) == b"QFI\xfb"
        assert c.size < 1 << 30


def test_file_ticket_replace_stops_old(daemon, tmp_path):
    path = raw_image(tmp_path)
    daemon.api.put(file_ticket(path))
    old = export_pids(daemon, "file-ticket-1")
    daemon.api.put(file_ticket(path))
    new = export_pids(daemon, "file-ticket-1")
    assert old != new
    testutil.wait_for(lambda: not set(old) & set(testutil.qemu_nbd_pids()),
                      message="old qemu-nbd stopped")
    assert set(new) <= set(testutil.qemu_nbd_pids())


def test_file_ticket_delete_all_stops_exports(daemon, tmp_path):
    pids = []
    for i in range(2):
        daemon.api.put(file_ticket(raw_image(tmp_path, f"{i}.raw"),
                                   uuid=f"t{i}"))
        pids += export_pids(daemon, f"t{i}")
    daemon.api.request("DELETE", "/tickets/")
    testutil.wait_for(lambda: not set(pids) & set(testutil.qemu_nbd_pids()),
                      message="qemu-nbd stopped")


@pytest.mark.parametrize("url,message", [
    ("file:///no/such/dir/", "Cannot serve transfer tr-file"),
    ("file://relative/path", "Invalid ticket: Invalid value for 'url'"),
], ids=["not-a-file", "relative"])
def test_file_ticket_bad_file(daemon, url, message, tmp_path):
    if url.startswith("file:///no/such/dir"):
        # Exists, but qemu-nbd cannot serve a directory.
        url = f"file://{tmp_path}"
    before = own_exports()
    t = file_ticket("/x", url=url)
    resp, data = daemon.api.put(t)
    assert resp.status in (400, 500)
    assert data.decode().startswith(message)
    assert daemon.store.lookup(t["uuid"]) is None
    # Nothing left running: a failed qemu-nbd was reaped.
    assert own_exports() <= before
    assert [n for n in os.listdir(daemon.cfg.daemon.run_dir)
            if n.endswith(".sock")] == []


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_no_export_outlives_daemon(tmp_path, pki, signo):
    d = testutil.DaemonProcess(tmp_path / "d", pki).wait_ready()
    try:
        path = raw_image(tmp_path)
        resp, data = d.api.put(file_ticket(path))
        assert resp.status == 200, data
        pids = testutil.children(d.proc.pid)
        assert pids and set(pids) <= set(testutil.qemu_nbd_pids())
    finally:
        d.stop(signo)
    testutil.wait_for(lambda: not set(pids) & set(testutil.qemu_nbd_pids()),
                      message="qemu-nbd gone with the daemon")


# The remote service: HTTPS.

def https_get(daemon, path, context):
    host, port = daemon.remote.server.address()[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        with context.wrap_socket(s, server_hostname="localhost") as tls:
            tls.sendall(f"GET {path} HTTP/1.1\r\nconnection: close\r\n\r\n"
                        .encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            return data, tls.version()


def client_context(pki, version=None):
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def test_info(daemon, pki):
    data, _ = https_get(daemon, "/info/", client_context(pki))
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"content-type: application/json" in head
    assert json.loads(body) == {"version": "2.5.1"}


@pytest.mark.parametrize("path,status", [
    ("/info", 404), ("/info/anything", 200), ("/tickets/x", 404)])
def test_remote_routes(daemon, pki, path, status):
    data, _ = https_get(daemon, path, client_context(pki))
    assert data.startswith(b"HTTP/1.1 %d " % status)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2,
                                     ssl.TLSVersion.TLSv1_3])
def test_tls_accepted(daemon, pki, version):
    data, got = https_get(daemon, "/info/", client_context(pki, version))
    assert data.startswith(b"HTTP/1.1 200")
    assert got == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                   ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]


def test_tls_floor(daemon, pki):
    # A TLS 1.1 client is refused, whatever the client's OpenSSL allows.
    host, port = daemon.remote.server.address()[:2]
    r = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}", "-tls1_1",
         "-CAfile", pki["ca_file"], "-cipher", "DEFAULT:@SECLEVEL=0"],
        input=b"", capture_output=True, timeout=30)
    assert r.returncode != 0
    assert b"no peer certificate available" in r.stdout
    # And the server keeps serving.
    assert https_get(daemon, "/info/", client_context(pki))[0].startswith(
        b"HTTP/1.1 200")


def test_stalled_handshake_does_not_block_others(daemon, pki):
    host, port = daemon.remote.server.address()[:2]
    stalled = [socket.create_connection((host, port)) for _ in range(3)]
    try:
        data, _ = https_get(daemon, "/info/", client_context(pki))
        assert data.startswith(b"HTTP/1.1 200")
    finally:
        for s in stalled:
            s.close()


def test_plain_http_on_tls_port(daemon, pki):
    host, port = daemon.remote.server.address()[:2]
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(b"GET /info/ HTTP/1.1\r\n\r\n")
        # The handshake fails and the server drops the connection.
        try:
            reply = s.recv(65536)
        except ConnectionResetError:
            reply = b""
        assert b"HTTP/1.1" not in reply
    assert https_get(daemon, "/info/", client_context(pki))[0].startswith(
        b"HTTP/1.1 200")


def test_tls_disabled(make_daemon):
    daemon = make_daemon(tls={"enable": "false"})
    host, port = daemon.remote.server.address()[:2]
    reply = testutil.raw_request((host, port), b"GET /info/ HTTP/1.1\r\n\r\n",
                                 family=socket.AF_INET)
    assert reply.startswith(b"HTTP/1.1 200 OK")


# The local service.

def test_local_socket_path(daemon):
    path = daemon.cfg.local.socket
    assert daemon.local.server.address() == path
    reply = testutil.raw_request(path, b"GET /info/ HTTP/1.1\r\n\r\n")
    # /info/ is on the remote service only.
    assert reply.startswith(b"HTTP/1.1 404 ")


def test_local_socket_random_abstract(make_daemon):
    daemon = make_daemon(local={"socket": ""})
    address = daemon.local.server.address()
    assert address.startswith("\0")
    reply = testutil.raw_request(address, b"GET /x HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404 ")


def test_local_disabled(make_daemon):
    daemon = make_daemon(local={"enable": "false"})
    assert daemon.local is None


# A file ticket's qemu-nbd: a missing file, an export that dies.

class Images:
    """A keep-alive client of the local service's /images."""

    def __init__(self, daemon):
        self.conn = testutil.UnixHTTPConnection(daemon.cfg.local.socket)

    def request(self, method, path="/images/file-ticket-1", body=None,
                headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def close(self):
        self.conn.close()


def reaped(pid):
    return not os.path.exists(f"/proc/{pid}")


def threads_and_fds():
    return (len(os.listdir("/proc/self/task")),
            len(os.listdir("/proc/self/fd")))


def wait_for_baseline(baseline):
    testutil.wait_for(
        lambda: all(n <= b for n, b in zip(threads_and_fds(), baseline)),
        timeout=20,
        message=f"threads and fds back to {baseline} from "
                f"{threads_and_fds()}")


def test_file_ticket_missing_file(daemon, tmp_path):
    # Upstream accepts it (API.md 2.1) and fails data requests until the
    # file exists.
    path = str(tmp_path / "later.raw")
    before = own_exports()
    resp, data = daemon.api.put(file_ticket(path))
    assert resp.status == 200, data
    assert own_exports() == before
    message = f"Cannot export {path}: No such file or directory"
    assert daemon.api.get("file-ticket-1")["error"] == message
    c = Images(daemon)
    try:
        resp, data = c.request("GET", headers={"range": "bytes=0-4095"})
        assert resp.status == 500
        assert data.decode() == message + "\n"
        raw_image(tmp_path, "later.raw")
        # The same connection, now that the file is there.
        resp, data = c.request("PUT", body=b"z" * 4096)
        assert resp.status == 200, data
        resp, data = c.request("GET", headers={"range": "bytes=0-4095"})
        assert resp.status == 206
        assert data == b"z" * 4096
    finally:
        c.close()
    assert "error" not in daemon.api.get("file-ticket-1")


def test_file_ticket_export_killed(daemon, tmp_path, caplog):
    import logging
    caplog.set_level(logging.INFO)
    path = raw_image(tmp_path)
    daemon.api.put(file_ticket(path))
    c = Images(daemon)
    try:
        resp, data = c.request("PUT", body=b"a" * 65536)
        assert resp.status == 200, data
        healthy = daemon.api.get("file-ticket-1")
        assert "error" not in healthy
        [pid] = export_pids(daemon, "file-ticket-1")
        os.kill(pid, signal.SIGKILL)
        # Reaped at once, not a zombie until DELETE; and logged.
        testutil.wait_for(lambda: reaped(pid), message=f"{pid} reaped")
        testutil.wait_for(
            lambda: f"qemu-nbd pid={pid} exited unexpectedly" in caplog.text,
            message="exit logged")
        status = daemon.api.get("file-ticket-1")
        assert status["error"] == f"qemu-nbd pid={pid} exited with code -9"
        del status["error"]
        assert status == healthy
        # The next request, on the same connection, restarts the export.
        resp, data = c.request("GET", headers={"range": "bytes=0-65535"})
        assert resp.status == 206, data
        assert data == b"a" * 65536
        [new] = export_pids(daemon, "file-ticket-1")
        assert new != pid
        resp, data = c.request("PUT", body=b"b" * 4096)
        assert resp.status == 200, data
    finally:
        c.close()
    assert "error" not in daemon.api.get("file-ticket-1")
    with open(path, "rb") as f:
        assert f.read(8192) == b"b" * 4096 + b"a" * 4096


def test_file_ticket_export_restart_fails(daemon, tmp_path):
    path = raw_image(tmp_path)
    daemon.api.put(file_ticket(path))
    healthy = daemon.api.get("file-ticket-1")
    [pid] = export_pids(daemon, "file-ticket-1")
    os.unlink(path)
    os.kill(pid, signal.SIGKILL)
    testutil.wait_for(lambda: reaped(pid), message=f"{pid} reaped")
    c = Images(daemon)
    try:
        resp, data = c.request("GET", headers={"range": "bytes=0-4095"})
    finally:
        c.close()
    message = f"Cannot export {path}: No such file or directory"
    assert resp.status == 500
    assert data.decode() == message + "\n"
    # The failed GET is counted once its response is out.
    status = testutil.wait_for_ticket(daemon.api, "file-ticket-1",
                                      failed_requests=1)
    assert status.pop("error") == message
    status.pop("failed_requests")
    healthy.pop("failed_requests")
    assert status == healthy
    resp, _ = daemon.api.delete("file-ticket-1")
    assert resp.status == 204
    assert daemon.store.lookup("file-ticket-1") is None


def start_export(daemon, tmp_path, size):
    """A file ticket for size bytes; its first MiB uploaded and flushed.
    Returns (path, baseline of threads and fds)."""
    path = raw_image(tmp_path, size=size)
    resp, data = daemon.api.put(file_ticket(path, size=size))
    assert resp.status == 200, data
    c = Images(daemon)
    resp, data = c.request("PUT", body=b"f" * MiB,
                           headers={"content-range": f"bytes 0-{MiB - 1}/*"})
    assert resp.status == 200, data
    c.close()
    testutil.wait_for_ticket(daemon.api, "file-ticket-1", connections=0)
    return path, threads_and_fds()


def finish_export(daemon, baseline):
    """The flushed MiB is intact (a new qemu-nbd serves it); the ticket
    goes, with every thread, fd and qemu-nbd of it."""
    c = Images(daemon)
    try:
        resp, data = c.request("GET", headers={"range": f"bytes=0-{MiB - 1}"})
    finally:
        c.close()
    assert resp.status == 206, data
    assert data == b"f" * MiB
    resp, _ = daemon.api.delete("file-ticket-1")
    assert resp.status == 204
    assert own_exports() == set()
    wait_for_baseline(baseline)


MiB = 1 << 20


def test_export_killed_mid_download(daemon, tmp_path):
    size = 64 * MiB
    path, baseline = start_export(daemon, tmp_path, size)
    with open(path, "r+b") as f:
        f.seek(MiB)
        f.write(b"d" * (size - MiB))
    conn = testutil.UnixHTTPConnection(daemon.cfg.local.socket)
    conn.request("GET", "/images/file-ticket-1")
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.read(MiB) == b"f" * MiB
    [pid] = export_pids(daemon, "file-ticket-1")
    os.kill(pid, signal.SIGKILL)
    testutil.wait_for(lambda: reaped(pid), message=f"{pid} reaped")
    # The response is cut short, and the connection closed.
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        resp.read()
    conn.close()
    finish_export(daemon, baseline)


def unread(sock):
    """Bytes sent on a unix socket that the peer did not read yet."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock, termios.TIOCOUTQ, buf)
    return buf[0]


def test_export_killed_mid_upload(daemon, tmp_path):
    size = 64 * MiB
    path, baseline = start_export(daemon, tmp_path, size)
    # One NBD write of 5 MiB, of which the client sends 4 MiB, then stops
    # until qemu-nbd is dead. The rest is small enough for the server to
    # drain before it closes (an unread body would reset the connection,
    # and the response with it), so the first 4 MiB must have been read.
    length = 5 * MiB
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(daemon.cfg.local.socket)
    head = (f"PUT /images/file-ticket-1 HTTP/1.1\r\nhost: x\r\n"
            f"content-length: {length}\r\n"
            f"content-range: bytes {MiB}-{MiB + length - 1}/*\r\n\r\n")
    sock.sendall(head.encode() + b"u" * 4 * MiB)
    testutil.wait_for_ticket(daemon.api, "file-ticket-1", active=True)
    testutil.wait_for(lambda: unread(sock) == 0,
                      message="the daemon read what was sent")
    [pid] = export_pids(daemon, "file-ticket-1")
    os.kill(pid, signal.SIGKILL)
    testutil.wait_for(lambda: reaped(pid), message=f"{pid} reaped")

    def send_rest():
        try:
            sock.sendall(b"u" * (length - 4 * MiB))
        except OSError:
            pass

    sender = threading.Thread(target=send_rest)
    sender.start()
    reply = b""
    try:
        while chunk := sock.recv(65536):
            reply += chunk
    except ConnectionResetError:
        # Body bytes the server never read reset the connection; on a
        # unix socket what it sent before is still read first.
        pass
    sender.join(30)
    sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 500 ")
    assert b"connection: close" in head
    message = body.decode()
    assert message.startswith("NBD export of transfer tr-file failed: ")
    assert f"(qemu-nbd pid={pid} exited with code -9)" in message
    finish_export(daemon, baseline)


# What clients see of a failing export: what failed, never the daemon's
# internal NBD sockets (run_dir/<random>.sock) nor vdsm's.

def assert_no_internals(daemon, message, *sockets):
    assert daemon.cfg.daemon.run_dir not in message
    assert ".sock" not in message
    for s in sockets:
        assert s not in message


def test_file_ticket_socket_removed_message(daemon, tmp_path):
    # Someone removed the export's socket: qemu-nbd runs, nothing can
    # connect to it.
    path = raw_image(tmp_path)
    resp, data = daemon.api.put(file_ticket(path))
    assert resp.status == 200, data
    socket_path = daemon.store.lookup("file-ticket-1").resource.server.socket
    os.unlink(socket_path)
    c = Images(daemon)
    try:
        resp, data = c.request("GET", headers={"range": "bytes=0-4095"})
    finally:
        c.close()
    assert resp.status == 500
    message = data.decode()
    assert message.startswith(f"Cannot connect to NBD export of {path}: ")
    assert_no_internals(daemon, message, socket_path)


def test_file_ticket_cannot_export_message(daemon, tmp_path):
    # qemu-nbd refuses a directory: its own words, without the socket it
    # was told to serve on.
    resp, data = daemon.api.put(file_ticket("/x", url=f"file://{tmp_path}"))
    assert resp.status == 500
    message = data.decode()
    assert message.startswith(
        f"Cannot serve transfer tr-file: Cannot export {tmp_path}: ")
    assert_no_internals(daemon, message)


def test_nbd_ticket_unreachable_message(daemon, tmp_path):
    missing = str(tmp_path / "vdsm-nbd.sock")
    t = file_ticket("/x", url=f"nbd:unix:{missing}", ops=["read"])
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    c = Images(daemon)
    try:
        resp, data = c.request("GET", headers={"range": "bytes=0-4095"})
    finally:
        c.close()
    assert resp.status == 500
    message = data.decode()
    assert message.startswith(
        "Cannot connect to NBD export of transfer tr-file: ")
    assert_no_internals(daemon, message, missing)


def test_file_ticket_export_closed_message(daemon, tmp_path):
    # A request that opens the export after its ticket's export closed.
    path = raw_image(tmp_path)
    daemon.api.put(file_ticket(path))
    backend = daemon.store.lookup("file-ticket-1").resource
    socket_path = backend.server.socket
    with pytest.raises(Exception) as e:
        backend.close()
        backend.open()
    assert_no_internals(daemon, str(e.value), socket_path)
