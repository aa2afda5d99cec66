"""The daemon's services: file-ticket exports, HTTPS, the local socket."""

import json
import os
import signal
import socket
import ssl
import subprocess

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
    ("file:///no/such/file", "Cannot serve transfer tr-file"),
    ("file://relative/path", "Invalid ticket: Invalid value for 'url'"),
], ids=["missing", "relative"])
def test_file_ticket_bad_file(daemon, url, message):
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
