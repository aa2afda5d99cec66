"""
ovirt_imageio/http/relay.py: the proxy's backend, and how services makes
it from the configuration (API.md section 5). End-to-end behaviour
through a proxy is in proxy_test.py.
"""

import errno
import http.client
import os
import socket
import ssl

import pytest

import testutil
from ovirt_imageio import config
from ovirt_imageio import errors
from ovirt_imageio import tickets
from ovirt_imageio.http import relay
from ovirt_imageio.http import router
from ovirt_imageio.http import services
from ovirt_imageio.nbd import extents

MiB = 1024**2


# Errors

@pytest.mark.parametrize("error,reason", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
     "Connection refused"),
    (socket.timeout("timed out"), "timed out"),
    (http.client.RemoteDisconnected(
        "Remote end closed connection without response"),
     "RemoteDisconnected: Remote end closed connection without response"),
    (http.client.IncompleteRead(b"x", 10),
     "IncompleteRead: IncompleteRead(1 bytes read, 10 more expected)"),
    (ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
     "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"),
], ids=["refused", "timeout", "disconnected", "incomplete", "tls"])
def test_describe(error, reason):
    assert relay.describe(error) == reason


def test_unreachable_is_502_passed_through():
    e = relay.Unreachable("host:54322", ConnectionRefusedError(
        errno.ECONNREFUSED, "Connection refused"))
    assert isinstance(e, errors.PeerError)
    assert router.classify(e) == (
        502, "Cannot reach daemon host:54322: Connection refused", {}, False)


# Runs of a GET: zero runs are not fetched from the daemon.

def z(start, length, zero):
    return extents.ZeroExtent(start, length, zero=zero, hole=False)


@pytest.mark.parametrize("found,offset,length,expected", [
    ([], 0, 20, [(0, 20, False)]),
    ([z(0, 10, False), z(10, 10, False), z(20, 5, True), z(25, 5, False)],
     0, 30, [(0, 20, False), (20, 5, True), (25, 5, False)]),
    ([z(0, 10, False), z(10, 10, True)], 5, 10,
     [(5, 5, False), (10, 5, True)]),
    ([z(0, 10, True), z(10, 10, True)], 3, 4, [(3, 4, True)]),
    ([z(0, 10, True)], 0, 20, [(0, 10, True), (10, 10, False)]),
    ([z(5, 5, True)], 0, 20, [(0, 5, False), (5, 5, True), (10, 10, False)]),
    ([z(0, 4, True), z(4, 4, False), z(8, 4, True)], 0, 12,
     [(0, 4, True), (4, 4, False), (8, 4, True)]),
], ids=["no-extents", "merge", "clip", "inside-one", "short-list", "gaps",
        "alternating"])
def test_runs(found, offset, length, expected):
    assert relay.runs(found, offset, length) == expected


# The relay made for proxy tickets, from the configuration.

def load_config(tmp_path, sections):
    testutil.write_conf(str(tmp_path), sections)
    return config.load(str(tmp_path), vendor_dir=str(tmp_path / "vendor"))


def proxy_ticket(url="https://host.example:54322/images/secret-id"):
    return tickets.Ticket({
        "uuid": "secret-id", "size": MiB, "ops": ["read"], "timeout": 300,
        "url": url, "transfer_id": "tr-1"})


@pytest.mark.parametrize("backend_ca,tls_ca,expected", [
    ("/engine/ca.pem", "/apache/ca.pem", "/engine/ca.pem"),
    ("", "/apache/ca.pem", "/apache/ca.pem"),
    ("", "", None),
], ids=["backend-http", "tls", "system"])
def test_exporter_ca(tmp_path, backend_ca, tls_ca, expected):
    cfg = load_config(tmp_path, {
        "backend_http": {"ca_file": backend_ca, "buffer_size": str(MiB)},
        "tls": {"ca_file": tls_ca}})
    r = services.exporter(cfg)(proxy_ticket())
    assert isinstance(r, relay.Relay)
    assert r.cafile == expected
    assert r.buffer_size == MiB
    assert r.url == "https://host.example:54322/images/secret-id"
    # Never the path in what may be logged: it holds the ticket id.
    assert r.netloc == "host.example:54322"
    assert "secret-id" not in repr(r)


@pytest.mark.parametrize("url", [
    "https:///images/x", "https://host:port/images/x", "http://:80/x"],
    ids=["no-host", "bad-port", "empty-host"])
def test_exporter_invalid_url(tmp_path, url):
    cfg = load_config(tmp_path, {})
    with pytest.raises(errors.InvalidTicket):
        services.exporter(cfg)(proxy_ticket(url))


def test_exporter_http_url(tmp_path):
    cfg = load_config(tmp_path, {})
    r = services.exporter(cfg)(proxy_ticket("http://host:80/images/x"))
    assert isinstance(r, relay.Relay)


def test_engine_conf_as_written(tmp_path, make_proxy, pki):
    # The proxies of the tests start from 50-engine.conf as engine-setup
    # writes it; alone, it gives the engine's ports and CA.
    proxy = make_proxy()
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    src = os.path.join(proxy.tmp, "conf.d", "50-engine.conf")
    with open(src) as f:
        (conf_d / "50-engine.conf").write_text(f.read())
    cfg = config.load(str(tmp_path), vendor_dir=str(tmp_path / "vendor"))
    assert cfg.remote.port == 54323
    assert cfg.local.enable is False
    assert cfg.control.transport == "tcp"
    assert cfg.control.port == 54324
    assert cfg.backend_http.ca_file == pki["ca_file"]
    r = services.exporter(cfg)(proxy_ticket())
    assert r.cafile == pki["ca_file"]


# Relay against a real daemon.

@pytest.fixture
def daemon(make_daemon):
    return make_daemon(local={"enable": "false"},
                       daemon={"max_connections": "3"})


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(b"a" * MiB)
        f.truncate(2 * MiB)
    return path


def add_ticket(daemon, image, ops=("read",)):
    t = {"uuid": "relay-secret", "size": 2 * MiB, "ops": list(ops),
         "timeout": 300, "url": f"file://{image}", "transfer_id": "tr-r"}
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    port = daemon.remote.server.address()[1]
    return f"https://localhost:{port}/images/relay-secret"


def test_image(daemon, pki, image):
    url = add_ticket(daemon, image, ops=["write"])
    r = relay.Relay(url, cafile=pki["ca_file"])
    with r.open() as img:
        assert img.size == 2 * MiB
        assert img.max_readers == 3
        assert img.max_writers == 3
        assert img.transport == "https"
        buf = bytearray(4096)
        img.read_into(buf, MiB - 2048)
        assert buf == b"a" * 2048 + bytes(2048)
        img.write(b"b" * 4096, 0)
        img.zero(4096, 4096)
        img.flush()
        # Extents after writing: what was written, not a cached answer.
        assert [e.to_dict() for e in img.extents("zero", 0, 8192)] == [
            {"start": 0, "length": 4096, "zero": False, "hole": False},
            {"start": 4096, "length": 4096, "zero": True, "hole": False}]
        assert "relay-secret" not in repr(img)
    with open(image, "rb") as f:
        data = f.read(8192)
    assert data == b"b" * 4096 + bytes(4096)


def test_open_daemon_refuses_ticket(daemon, pki, image):
    add_ticket(daemon, image)
    port = daemon.remote.server.address()[1]
    r = relay.Relay(f"https://localhost:{port}/images/other",
                    cafile=pki["ca_file"])
    with pytest.raises(errors.PeerError) as e:
        r.open()
    assert e.value.status == 403
    assert str(e.value) == ("You are not allowed to access this resource: "
                            "No such ticket other")


def test_open_daemon_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = relay.Relay(f"https://localhost:{port}/images/x")
    with pytest.raises(relay.Unreachable) as e:
        r.open()
    assert e.value.status == 502
    assert str(e.value) == (
        f"Cannot reach daemon localhost:{port}: Connection refused")


def test_io_daemon_gone(daemon, pki, image):
    url = add_ticket(daemon, image)
    r = relay.Relay(url, cafile=pki["ca_file"])
    img = r.open()
    try:
        daemon.stop()
        # The in-process daemon keeps serving connections it accepted;
        # break ours as a dead daemon would.
        img._remote._con.sock.shutdown(socket.SHUT_RDWR)
        with pytest.raises(relay.Unreachable) as e:
            img.read_into(bytearray(4096), 0)
        assert e.value.status == 502
        assert "Connection refused" in str(e.value)
    finally:
        img.close()


def test_relay_close_is_noop(tmp_path):
    r = relay.Relay("https://localhost:1/images/x")
    r.close()
    r.close()
    # It owns no connection: open() still makes a new one (and fails here,
    # nothing listens on port 1) instead of using a closed one.
    with pytest.raises(Exception) as e:
        r.open()
    assert not isinstance(e.value, (AttributeError, TypeError))
