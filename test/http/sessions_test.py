"""
http/sessions.py end to end: a proxy with [proxy] signed_tickets on (the
engine's 50-engine.conf, make_proxy) in front of a real daemon whose
ticket vdsm added; tickets signed by a throw-away engine PKI
(test/signing.py). Each flow uploads and downloads through the proxy; the
refusals; no credential in any log line.
"""

import base64
import http.client
import json
import logging
import math
import os
import subprocess
import threading
import time
import ssl
import urllib.parse

import pytest

import signing
import testutil
from ovirt_imageio import clock
from ovirt_imageio import errors

MiB = 1024**2
SIZE = 2 * MiB
TICKET_ID = "daemon-ticket-secret"


@pytest.fixture(scope="module")
def engine_pki(tmp_path_factory):
    return signing.EnginePKI(tmp_path_factory.mktemp("engine-pki"))


@pytest.fixture
def logs(caplog):
    """Every log line of the proxy and the daemon (both in process)."""
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(local={"enable": "false"})


@pytest.fixture
def image(make_image):
    return make_image(size=SIZE)


@pytest.fixture
def make_signed_proxy(make_proxy, engine_pki):
    def make(**proxy_conf):
        p = make_proxy(proxy=engine_pki.proxy_conf(**proxy_conf))
        # The signed tickets' wall clock, moved by tests; on a whole
        # second, as the envelope's dates are.
        p.wall = clock.FakeClock(start=math.floor(time.time()))
        p.signed.verifier.clock = p.wall
        return p
    return make


@pytest.fixture
def proxy(make_signed_proxy):
    return make_signed_proxy()


def daemon_base(daemon):
    return f"https://localhost:{daemon.remote.server.address()[1]}"


def add_daemon_ticket(daemon, image, ops=("read", "write"),
                      ticket_id=TICKET_ID):
    """vdsm adds the daemon's ticket."""
    resp, data = daemon.api.put({
        "uuid": ticket_id, "size": SIZE, "ops": list(ops), "timeout": 300,
        "url": f"file://{image}", "transfer_id": "tr-daemon"})
    assert resp.status == 200, data


def sign(engine_pki, daemon, proxy, ticket_id=TICKET_ID, **kw):
    kw.setdefault("start", proxy.wall.now())
    return signing.sign(engine_pki, ticket_id, daemon_base(daemon), **kw)


class Client:
    """A keep-alive HTTPS client of the proxy's remote service."""

    def __init__(self, proxy, ca_file):
        port = proxy.remote.server.address()[1]
        ctx = ssl.create_default_context(cafile=ca_file)
        self.conn = http.client.HTTPSConnection(
            "localhost", port, context=ctx, timeout=30)

    def request(self, method, path, body=None, headers=None):
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def close(self):
        self.conn.close()


@pytest.fixture
def client(proxy, proxy_pki):
    c = Client(proxy, proxy_pki["ca_file"])
    yield c
    c.close()


def images(ticket_id=TICKET_ID, query=""):
    return f"/images/{ticket_id}" + (f"?{query}" if query else "")


def upload(client, data, headers=None, query=""):
    """PUT data in two requests (the browser's chunks)."""
    half = len(data) // 2
    for offset, chunk in ((0, data[:half]), (half, data[half:])):
        h = {"Content-Range": f"bytes {offset}-{offset + len(chunk) - 1}/"
                              f"{len(data)}"}
        h.update(headers or {})
        resp, body = client.request("PUT", images(query=query), chunk, h)
        assert resp.status == 200, body


def download(client, headers=None, query=""):
    resp, body = client.request("GET", images(query=query),
                                headers=headers or {})
    assert resp.status == 200, body
    return body


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def assert_no_secrets(logs, *secrets):
    """No log line, traceback included, holds a secret."""
    formatter = logging.Formatter()
    text = "\n".join(formatter.format(r) for r in logs.records)
    assert text, "no log lines captured"
    for secret in secrets:
        assert secret not in text


def random_data():
    return os.urandom(SIZE)


# Flow (a): Authorization on every request.

def test_authorization_flow(daemon, proxy, client, image, engine_pki,
                            logs):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    auth = {"Authorization": token}
    data = random_data()
    upload(client, data, auth)
    assert file_bytes(image) == data
    assert download(client, auth) == data
    # Once added, the ticket id in the path serves it.
    assert download(client) == data
    # Operations and size are the daemon's.
    ticket = proxy.signed.store.lookup(TICKET_ID)
    assert ticket.ops == ["read", "write"]
    assert ticket.size == SIZE
    assert ticket.transfer_id == "tr-signed"
    assert proxy.store.lookup(TICKET_ID) is None
    assert_no_secrets(logs, TICKET_ID, token)


def test_options_from_daemon_read_only(daemon, proxy, client, image,
                                       engine_pki):
    add_daemon_ticket(daemon, image, ops=["read"])
    auth = {"Authorization": sign(engine_pki, daemon, proxy)}
    resp, body = client.request("OPTIONS", images(), headers=auth)
    assert resp.status == 200, body
    assert resp.getheader("allow") == "OPTIONS,GET"
    assert json.loads(body)["features"] == ["checksum", "extents"]
    resp, body = client.request(
        "PUT", images(), b"x" * 4096,
        {"Content-Range": "bytes 0-4095/*", **auth})
    assert resp.status == 403
    assert b"forbids write" in body


def test_daemon_without_ticket(daemon, proxy, client, engine_pki):
    # The daemon's answer reaches the client; nothing is added.
    auth = {"Authorization": sign(engine_pki, daemon, proxy)}
    resp, body = client.request("GET", images(), headers=auth)
    assert resp.status == 403
    assert b"No such ticket" in body
    assert proxy.signed.store.lookup(TICKET_ID) is None


# Flow (b): sessions.

def test_session_flow(daemon, proxy, client, image, engine_pki, logs):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    resp, body = client.request("POST", "/sessions/",
                                headers={"Authorization": token})
    assert resp.status == 200, body
    session_id = resp.getheader("session-id")
    assert session_id
    data = random_data()
    upload(client, data, {"Session-Id": session_id})
    assert file_bytes(image) == data
    # The old browser download: the session in the query.
    query = urllib.parse.urlencode({"session_id": session_id})
    assert download(client, query=query) == data
    resp, body = client.request("DELETE", f"/sessions/{session_id}")
    assert resp.status == 204
    resp, body = client.request("GET", images(),
                                headers={"Session-Id": session_id})
    assert resp.status == 401
    assert body == b"No such session, or it expired\n"
    assert_no_secrets(logs, TICKET_ID, token, session_id)


def test_session_requires_authorization(proxy, client):
    resp, body = client.request("POST", "/sessions/")
    assert resp.status == 401
    assert b"requires a signed ticket in the Authorization header" in body


def test_session_refuses_invalid_ticket(daemon, proxy, client, engine_pki):
    token = sign(engine_pki, daemon, proxy, key_file=engine_pki.other_key_file,
                 cert_file=engine_pki.other_cert_file)
    resp, body = client.request("POST", "/sessions/",
                                headers={"Authorization": token})
    assert resp.status == 403
    assert body.startswith(b"Invalid signed ticket: signature does not "
                           b"verify")
    assert resp.getheader("session-id") is None


def test_session_wrong_ticket_in_path(daemon, proxy, client, image,
                                      engine_pki):
    add_daemon_ticket(daemon, image)
    add_daemon_ticket(daemon, image, ticket_id="another-ticket")
    resp, _ = client.request("POST", "/sessions/", headers={
        "Authorization": sign(engine_pki, daemon, proxy)})
    session_id = resp.getheader("session-id")
    resp, body = client.request("GET", images("another-ticket"),
                                headers={"Session-Id": session_id})
    assert resp.status == 403
    assert b"not the signed ticket's transfer-ticket" in body


def test_session_expires_with_ticket(daemon, proxy, client, image,
                                     engine_pki):
    add_daemon_ticket(daemon, image)
    resp, _ = client.request("POST", "/sessions/", headers={
        "Authorization": sign(engine_pki, daemon, proxy, lifetime=60)})
    session_id = resp.getheader("session-id")
    assert len(download(client, {"Session-Id": session_id})) == SIZE
    proxy.wall.advance(61)
    resp, body = client.request("GET", images(),
                                headers={"Session-Id": session_id})
    assert resp.status == 401


def test_session_id_in_query_only_when_signed(daemon, make_proxy, proxy_pki,
                                              image, logs):
    # Signed tickets off: no /sessions/, and session_id means nothing; it
    # is never logged either (no query string is).
    plain = make_proxy()
    c = Client(plain, proxy_pki["ca_file"])
    try:
        resp, body = c.request("POST", "/sessions/")
        assert resp.status == 404
        resp, body = c.request(
            "GET", images(query="session_id=session-secret"))
        assert resp.status == 403
        assert b"No such ticket" in body
    finally:
        c.close()
    assert_no_secrets(logs, "session-secret", TICKET_ID)


# Flow (c): the engine PUTs the signed ticket to the proxy's port.

def test_tickets_flow(daemon, proxy, client, image, engine_pki, logs):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    resp, body = client.request("PUT", f"/tickets/{TICKET_ID}",
                                token.encode())
    assert resp.status == 200, body
    data = random_data()
    upload(client, data)
    assert file_bytes(image) == data
    assert download(client) == data
    # DELETE needs the same signed ticket.
    resp, body = client.request("DELETE", f"/tickets/{TICKET_ID}")
    assert resp.status == 401
    resp, body = client.request("DELETE", f"/tickets/{TICKET_ID}",
                                headers={"Authorization": token})
    assert resp.status == 204, body
    resp, body = client.request("GET", images())
    assert resp.status == 403
    assert b"No such ticket" in body
    # A replay of the removed ticket is refused; the engine may add it.
    resp, body = client.request("GET", images(),
                                headers={"Authorization": token})
    assert resp.status == 403
    assert body == b"Transfer tr-signed was removed\n"
    resp, body = client.request("PUT", "/tickets/", token.encode())
    assert resp.status == 200, body
    assert download(client) == data
    assert_no_secrets(logs, TICKET_ID, token)


def test_tickets_put_refuses_invalid(daemon, proxy, client, image,
                                     engine_pki):
    add_daemon_ticket(daemon, image)
    env = json.loads(base64.b64decode(
        sign(engine_pki, daemon, proxy)))
    env["data"] = env["data"].replace("tr-signed", "tr-tampered")
    resp, body = client.request("PUT", f"/tickets/{TICKET_ID}",
                                signing.encode(env).encode())
    assert resp.status == 403
    assert b"signature does not verify" in body
    resp, body = client.request("GET", images())
    assert resp.status == 403


def test_tickets_put_wrong_id(daemon, proxy, client, image, engine_pki):
    add_daemon_ticket(daemon, image)
    resp, body = client.request("PUT", "/tickets/another-ticket",
                                sign(engine_pki, daemon, proxy).encode())
    assert resp.status == 403
    assert b"not the signed ticket's transfer-ticket" in body


def test_tickets_delete_with_another_tickets_signature(
        daemon, proxy, client, image, engine_pki):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    client.request("PUT", "/tickets/", token.encode())
    other = sign(engine_pki, daemon, proxy, ticket_id="another-ticket")
    resp, body = client.request("DELETE", f"/tickets/{TICKET_ID}",
                                headers={"Authorization": other})
    assert resp.status == 403
    assert proxy.signed.store.lookup(TICKET_ID) is not None


@pytest.mark.parametrize("method,path,body,status", [
    ("PUT", f"/tickets/{TICKET_ID}",
     json.dumps({"uuid": TICKET_ID, "size": SIZE, "ops": ["read"],
                 "timeout": 300, "url": "https://localhost:1/images/x"}),
     403),
    ("DELETE", "/tickets/", None, 403),
    ("GET", f"/tickets/{TICKET_ID}", None, 405),
    ("PATCH", f"/tickets/{TICKET_ID}", json.dumps({"timeout": 1}), 405),
], ids=["unsigned-put", "delete-all", "get", "patch"])
def test_tickets_control_calls_refused(proxy, client, method, path, body,
                                       status):
    resp, data = client.request(method, path,
                                body.encode() if body else None)
    assert resp.status == status, data


def test_delete_all_keeps_signed_tickets(daemon, proxy, client, image,
                                         engine_pki):
    add_daemon_ticket(daemon, image)
    client.request("PUT", "/tickets/", sign(engine_pki, daemon,
                                            proxy).encode())
    resp, _ = client.request("DELETE", "/tickets/")
    assert resp.status == 403
    assert len(download(client)) == SIZE


# Refusals on /images.

@pytest.mark.parametrize("how", ["tampered", "other-ca", "expired",
                                 "not-yet-valid", "sha1-only-salt"])
def test_images_refused(daemon, proxy, client, image, engine_pki, how,
                        logs):
    add_daemon_ticket(daemon, image)
    now = proxy.wall.now()
    if how == "tampered":
        env = json.loads(base64.b64decode(
            sign(engine_pki, daemon, proxy)))
        env["data"] = env["data"].replace('"exp": ', '"exp": 1')
        token = signing.encode(env)
    elif how == "other-ca":
        token = sign(engine_pki, daemon, proxy,
                     key_file=engine_pki.other_key_file,
                     cert_file=engine_pki.other_cert_file)
    elif how == "expired":
        token = sign(engine_pki, daemon, proxy, start=now - 600)
    elif how == "not-yet-valid":
        token = sign(engine_pki, daemon, proxy, start=now + 60)
    else:
        token = sign(engine_pki, daemon, proxy, fields=("salt",))
    resp, body = client.request("GET", images(),
                                headers={"Authorization": token})
    assert resp.status == 403
    assert body.startswith(b"Invalid signed ticket: ")
    assert proxy.signed.store.lookup(TICKET_ID) is None
    refusals = [r for r in logs.records
                if r.getMessage().startswith("Refused signed ticket")]
    assert refusals
    assert_no_secrets(logs, TICKET_ID, token)


def test_images_wrong_ticket_in_path(daemon, proxy, client, image,
                                     engine_pki):
    add_daemon_ticket(daemon, image)
    add_daemon_ticket(daemon, image, ticket_id="another-ticket")
    token = sign(engine_pki, daemon, proxy)
    resp, body = client.request("GET", images("another-ticket"),
                                headers={"Authorization": token})
    assert resp.status == 403
    assert b"not the signed ticket's transfer-ticket" in body
    assert proxy.signed.store.lookup("another-ticket") is None


def test_skew(daemon, make_signed_proxy, proxy_pki, image, engine_pki):
    add_daemon_ticket(daemon, image)
    proxy = make_signed_proxy(allowed_skew_seconds="60")
    c = Client(proxy, proxy_pki["ca_file"])
    try:
        token = sign(engine_pki, daemon, proxy, start=proxy.wall.now() + 30)
        assert len(download(c, {"Authorization": token})) == SIZE
        token = sign(engine_pki, daemon, proxy, start=proxy.wall.now() + 90)
        resp, body = c.request("GET", images(),
                               headers={"Authorization": token})
        assert resp.status == 403
        assert b"not valid before" in body
    finally:
        c.close()


def test_replay_after_expiry(daemon, proxy, client, image, engine_pki):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy, lifetime=60)
    auth = {"Authorization": token}
    assert len(download(client, auth)) == SIZE
    proxy.wall.advance(61)
    # The added ticket ended with its signed ticket, and is gone.
    resp, body = client.request("GET", images())
    assert resp.status == 403
    assert proxy.signed.store.lookup(TICKET_ID) is None
    resp, body = client.request("GET", images(), headers=auth)
    assert resp.status == 403
    assert b"Invalid signed ticket: expired at" in body


def test_expired_while_swept_recently(daemon, proxy, client, image,
                                      engine_pki):
    # Between sweeps, an ended ticket is refused all the same.
    add_daemon_ticket(daemon, image)
    download(client, {"Authorization": sign(engine_pki, daemon, proxy,
                                            lifetime=60)})
    proxy.wall.advance(59.5)
    proxy.signed._sweep()
    proxy.wall.advance(0.9)
    resp, body = client.request("GET", images())
    assert resp.status == 403
    assert body.endswith(b"Transfer=tr-signed expired\n")


def test_later_ticket_extends(daemon, proxy, client, image, engine_pki):
    add_daemon_ticket(daemon, image)
    download(client, {"Authorization": sign(engine_pki, daemon, proxy,
                                            lifetime=60)})
    download(client, {"Authorization": sign(engine_pki, daemon, proxy,
                                            lifetime=600)})
    # Both clocks: the signed end, and the relay ticket's own timer.
    proxy.wall.advance(120)
    proxy.clock.advance(120)
    assert len(download(client)) == SIZE


def test_concurrent_first_requests(daemon, proxy, proxy_pki, image,
                                   engine_pki, logs):
    # Many connections bring the same signed ticket at once: one relay
    # ticket is added, every request is served.
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    results = []

    def run():
        c = Client(proxy, proxy_pki["ca_file"])
        try:
            resp, body = c.request("GET", images(), headers={
                "Authorization": token, "Range": "bytes=0-4095"})
            results.append((resp.status, len(body)))
        finally:
            c.close()

    threads = [threading.Thread(target=run) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [(206, 4096)] * 6
    added = [r for r in logs.records
             if r.getMessage().startswith("Added signed ticket")]
    assert len(added) == 1


def test_session_of_removed_transfer(daemon, proxy, client, image,
                                     engine_pki):
    add_daemon_ticket(daemon, image)
    token = sign(engine_pki, daemon, proxy)
    resp, _ = client.request("POST", "/sessions/",
                             headers={"Authorization": token})
    session_id = resp.getheader("session-id")
    assert len(download(client, {"Session-Id": session_id})) == SIZE
    resp, _ = client.request("DELETE", f"/tickets/{TICKET_ID}",
                             headers={"Authorization": token})
    assert resp.status == 204
    # The transfer's sessions went with it, and no new one opens.
    resp, _ = client.request("GET", images(),
                             headers={"Session-Id": session_id})
    assert resp.status == 401
    resp, body = client.request("POST", "/sessions/",
                                headers={"Authorization": token})
    assert resp.status == 403
    assert body == b"Transfer tr-signed was removed\n"


def test_control_ticket_wins(daemon, proxy, client, image, engine_pki):
    add_daemon_ticket(daemon, image)
    port = daemon.remote.server.address()[1]
    resp, body = proxy.api.put({
        "uuid": TICKET_ID, "size": SIZE, "ops": ["read"], "timeout": 300,
        "url": f"https://localhost:{port}/images/{TICKET_ID}",
        "transfer_id": "tr-control"})
    assert resp.status == 200, body
    # Its credentials are not even looked at.
    resp, body = client.request("GET", images(),
                                headers={"Authorization": "garbage"})
    assert resp.status == 200
    assert proxy.signed.store.lookup(TICKET_ID) is None
    # Nor can the remote port remove it.
    resp, body = client.request(
        "DELETE", f"/tickets/{TICKET_ID}",
        headers={"Authorization": sign(engine_pki, daemon, proxy)})
    assert resp.status == 204
    assert proxy.store.lookup(TICKET_ID) is not None


# CORS.

def test_cors_preflight(proxy, client):
    resp, body = client.request("OPTIONS", images(), headers={
        "Origin": "https://engine.test",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "authorization,content-range"})
    assert resp.status == 200
    assert resp.getheader("access-control-allow-origin") == "*"
    assert resp.getheader("access-control-allow-headers") == \
        "*, authorization, session-id"
    assert resp.getheader("access-control-allow-methods") == \
        "OPTIONS,GET,PUT"


def test_cors_session_id_exposed(daemon, proxy, client, engine_pki):
    resp, _ = client.request("POST", "/sessions/", headers={
        "Origin": "https://engine.test",
        "Authorization": sign(engine_pki, daemon, proxy)})
    assert resp.status == 200
    assert resp.getheader("access-control-expose-headers") == "session-id"


# Start-up.

def test_refuses_to_start_without_certificate(make_proxy):
    with pytest.raises(errors.Error) as e:
        make_proxy(proxy={"signed_tickets": "true"})
    assert "needs the engine's certificate" in str(e.value)


def test_program_refuses_to_start(tmp_path):
    testutil.write_conf(str(tmp_path), {
        "proxy": {"signed_tickets": "true"},
        "daemon": {"drop_privileges": "false", "systemd_enable": "false",
                   "run_dir": str(tmp_path / "run")},
        "handlers": {"keys": "stderr"},
        "logger_root": {"handlers": "stderr"},
    })
    out = subprocess.run(
        [testutil.bin_path("ovirt-imageio"), "-c", str(tmp_path)],
        capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Cannot start: [proxy] signed_tickets = true needs the " \
           "engine's certificate" in out.stderr


@pytest.fixture
def no_cryptography(tmp_path):
    """The environment of a host without python3-cryptography."""
    blocked = tmp_path / "blocked" / "cryptography"
    blocked.mkdir(parents=True)
    (blocked / "__init__.py").write_text(
        "raise ImportError(\"No module named 'cryptography'\")\n")
    return dict(os.environ, PYTHONPATH=str(blocked.parent))


def test_cryptography_not_needed_when_off(tmp_path, pki, no_cryptography):
    d = testutil.DaemonProcess(tmp_path / "off", pki, env=no_cryptography)
    try:
        d.wait_ready()
    finally:
        d.stop()


def test_cryptography_missing(tmp_path, pki, engine_pki, no_cryptography):
    d = testutil.DaemonProcess(tmp_path / "on", pki, env=no_cryptography,
                               proxy=engine_pki.proxy_conf())
    assert d.wait_exit() != 0
    assert "Cannot start: [proxy] signed_tickets = true needs the " \
           "cryptography package (python3-cryptography)" in d.stderr
