"""
CORS (http/cors.py) on a real daemon and through a real proxy: upstream's
answers to webadmin's requests unchanged, and what a page of another
origin sends (PATCH, /checksum, /extents, preflights of /info/).
"""

import http.client
import json
import os
import ssl
import subprocess

import pytest

from ovirt_imageio.http import cors

MiB = 1024**2
SIZE = 4 * MiB
TICKET_ID = "cors-ticket-secret"
ORIGIN = "https://other.example:54322"

PREFLIGHT = {"origin": ORIGIN, "access-control-request-method": "PUT",
             "access-control-request-headers": "content-range,content-type"}


@pytest.fixture
def target(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        f.write(b"\xab" * SIZE)
    return path


@pytest.fixture
def daemon(make_daemon, target):
    d = make_daemon()
    add_ticket(d, f"file://{target}")
    return d


def add_ticket(daemon, url, **kw):
    t = {"uuid": TICKET_ID, "size": SIZE, "ops": ["write"], "timeout": 300,
         "url": url, "transfer_id": "tr-cors"}
    t.update(kw)
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    return t


class Client:

    def __init__(self, service, ca_file=None):
        ctx = ssl.create_default_context(
            cafile=ca_file or service.cfg.tls.ca_file)
        port = service.remote.server.address()[1]
        self.conn = http.client.HTTPSConnection(
            "localhost", port, context=ctx, timeout=30)

    def request(self, method, path, body=None, headers=None):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def close(self):
        self.conn.close()


@pytest.fixture
def client(daemon):
    c = Client(daemon)
    yield c
    c.close()


def cors_headers(resp):
    return {k.lower(): v for k, v in resp.getheaders()
            if k.lower().startswith("access-control-")}


# Upstream's answers, unchanged

def test_preflight_put_as_upstream(client):
    resp, _ = client.request("OPTIONS", f"/images/{TICKET_ID}",
                             headers=PREFLIGHT)
    assert resp.status == 200
    assert cors_headers(resp) == {
        "access-control-allow-origin": "*",
        "access-control-allow-headers": "*",
        "access-control-allow-methods": "OPTIONS,GET,PUT",
        "access-control-max-age": "86400",
        "access-control-expose-headers": cors.EXPOSE,
    }


def test_no_cors_headers_without_origin(client):
    for method, path, body in [
            ("OPTIONS", f"/images/{TICKET_ID}", None),
            ("GET", f"/images/{TICKET_ID}", None),
            ("PATCH", f"/images/{TICKET_ID}", {"op": "flush"}),
            ("GET", f"/images/{TICKET_ID}/checksum", None),
            ("GET", "/info/", None)]:
        resp, _ = client.request(method, path, body=body)
        assert resp.status == 200, (method, path)
        assert cors_headers(resp) == {}, (method, path)


def test_options_info_without_preflight(client):
    # Not a preflight: 405, as upstream.
    resp, body = client.request("OPTIONS", "/info/",
                                headers={"origin": ORIGIN})
    assert resp.status == 405
    assert body == b"Method 'OPTIONS' not defined for '/info/'\n"


# What the page sends

def test_preflight_patch(client):
    headers = dict(PREFLIGHT, **{"access-control-request-method": "PATCH",
                                 "access-control-request-headers":
                                 "content-type"})
    resp, _ = client.request("OPTIONS", f"/images/{TICKET_ID}",
                             headers=headers)
    assert resp.status == 200
    h = cors_headers(resp)
    assert h["access-control-allow-methods"] == "OPTIONS,GET,PUT,PATCH"
    assert h["access-control-allow-headers"] == "*"
    assert h["access-control-allow-origin"] == "*"


def test_preflight_bad_ticket(client):
    # A preflight is OPTIONS on the ticket: a bad ticket fails it.
    resp, _ = client.request("OPTIONS", "/images/nope", headers=PREFLIGHT)
    assert resp.status == 403
    assert cors_headers(resp)["access-control-allow-origin"] == "*"


def test_patch(client, target):
    resp, body = client.request(
        "PATCH", f"/images/{TICKET_ID}", headers={
            "origin": ORIGIN, "content-type": "application/json"},
        body={"op": "zero", "offset": 0, "size": MiB, "flush": True})
    assert resp.status == 200, body
    h = cors_headers(resp)
    assert h["access-control-allow-origin"] == "*"
    assert h["access-control-expose-headers"] == cors.EXPOSE
    with open(target, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


def test_patch_error(client):
    # The page reads the message of a failed PATCH too.
    resp, body = client.request("PATCH", f"/images/{TICKET_ID}",
                                headers={"origin": ORIGIN},
                                body={"op": "trim"})
    assert resp.status == 400
    assert b"Unsupported value 'trim'" in body
    assert cors_headers(resp)["access-control-allow-origin"] == "*"
    resp, body = client.request("PATCH", "/images/nope",
                                headers={"origin": ORIGIN},
                                body={"op": "flush"})
    assert resp.status == 403
    assert cors_headers(resp)["access-control-allow-origin"] == "*"


def test_put_exposes_headers(client, target):
    data = os.urandom(4096)
    resp, body = client.request(
        "PUT", f"/images/{TICKET_ID}?flush=n", body=data,
        headers={"origin": ORIGIN, "content-range": "bytes 0-4095/*"})
    assert resp.status == 200, body
    assert cors_headers(resp)["access-control-allow-origin"] == "*"


def test_get_exposes_headers(client):
    resp, body = client.request("GET", f"/images/{TICKET_ID}", headers={
        "origin": ORIGIN, "range": "bytes=0-9"})
    assert resp.status == 206
    assert body == b"\xab" * 10
    exposed = [h.strip() for h in
               resp.getheader("access-control-expose-headers").split(",")]
    for name in ("content-range", "content-length", "content-disposition",
                 "etag", "retry-after"):
        assert name in exposed


@pytest.mark.parametrize("path", [
    f"/images/{TICKET_ID}/checksum",
    f"/images/{TICKET_ID}/checksum?algorithm=sha256",
    f"/images/{TICKET_ID}/checksum/algorithms",
    f"/images/{TICKET_ID}/extents",
    "/info/",
])
def test_get_routes(client, path):
    resp, body = client.request("GET", path, headers={"origin": ORIGIN})
    assert resp.status == 200, body
    assert cors_headers(resp)["access-control-allow-origin"] == "*"
    json.loads(body)


def test_checksum_error(client):
    resp, _ = client.request("GET", "/images/nope/checksum",
                             headers={"origin": ORIGIN})
    assert resp.status == 403
    assert cors_headers(resp)["access-control-allow-origin"] == "*"


@pytest.mark.parametrize("path", [
    "/info/",
    f"/images/{TICKET_ID}/checksum",
    f"/images/{TICKET_ID}/checksum/algorithms",
    f"/images/{TICKET_ID}/extents",
])
def test_preflight_get_routes(client, path):
    headers = {"origin": ORIGIN, "access-control-request-method": "GET",
               "access-control-request-headers": "cache-control"}
    resp, body = client.request("OPTIONS", path, headers=headers)
    assert resp.status == 200
    assert body == b""
    h = cors_headers(resp)
    assert h["access-control-allow-origin"] == "*"
    assert h["access-control-allow-methods"] == "OPTIONS,GET"
    assert h["access-control-allow-headers"] == "*"
    assert h["access-control-max-age"] == "86400"
    # The connection is still good after the empty response.
    resp, body = client.request("GET", "/info/")
    assert resp.status == 200


def test_private_network(client):
    headers = dict(PREFLIGHT, **{
        "access-control-request-private-network": "true"})
    resp, _ = client.request("OPTIONS", f"/images/{TICKET_ID}",
                             headers=headers)
    assert resp.status == 200
    assert cors_headers(resp)[
        "access-control-allow-private-network"] == "true"
    resp, _ = client.request("OPTIONS", f"/images/{TICKET_ID}",
                             headers=PREFLIGHT)
    assert "access-control-allow-private-network" not in cors_headers(resp)


def test_preflight_curl(daemon):
    # As a browser's preflight comes: one request, no body.
    port = daemon.remote.server.address()[1]
    r = subprocess.run(
        ["curl", "-sS", "--cacert", daemon.cfg.tls.ca_file, "-X", "OPTIONS",
         "-o", "/dev/null", "-D", "-",
         "-H", f"Origin: {ORIGIN}",
         "-H", "Access-Control-Request-Method: PATCH",
         "-H", "Access-Control-Request-Headers: content-type",
         f"https://localhost:{port}/images/{TICKET_ID}"],
        capture_output=True, timeout=30, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("HTTP/1.1 200 OK")
    assert ("access-control-allow-methods: OPTIONS,GET,PUT,PATCH\n"
            in r.stdout)


# Through the proxy

def test_proxy(make_daemon, make_proxy, proxy_pki, target):
    daemon = make_daemon(local={"enable": "false"})
    add_ticket(daemon, f"file://{target}")
    proxy = make_proxy()
    port = daemon.remote.server.address()[1]
    add_ticket(proxy, f"https://localhost:{port}/images/{TICKET_ID}")
    c = Client(proxy, proxy_pki["ca_file"])
    try:
        headers = dict(PREFLIGHT, **{"access-control-request-method":
                                     "PATCH"})
        resp, _ = c.request("OPTIONS", f"/images/{TICKET_ID}",
                            headers=headers)
        assert resp.status == 200
        assert cors_headers(resp)["access-control-allow-methods"] == (
            "OPTIONS,GET,PUT,PATCH")
        resp, body = c.request(
            "PATCH", f"/images/{TICKET_ID}", headers={"origin": ORIGIN},
            body={"op": "zero", "offset": MiB, "size": MiB, "flush": True})
        assert resp.status == 200, body
        assert cors_headers(resp)["access-control-allow-origin"] == "*"
        resp, body = c.request("GET", f"/images/{TICKET_ID}/checksum",
                               headers={"origin": ORIGIN})
        assert resp.status == 200, body
        assert cors_headers(resp)["access-control-allow-origin"] == "*"
    finally:
        c.close()
    with open(target, "rb") as f:
        data = f.read()
    assert data[MiB:2 * MiB] == bytes(MiB)
    assert data[:MiB] == b"\xab" * MiB
