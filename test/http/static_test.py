"""The page at / and the CA at /ca.pem (http/static.py), served by real
daemons and proxies over HTTPS, checked with http.client and curl."""

import http.client
import json
import os
import re
import socket
import ssl
import subprocess

import pytest

import testutil
from ovirt_imageio import errors
from ovirt_imageio.http import static


def connect(daemon, ca_file=None):
    ctx = ssl.create_default_context(cafile=ca_file or daemon.cfg.tls.ca_file)
    port = daemon.remote.server.address()[1]
    return http.client.HTTPSConnection("localhost", port, context=ctx,
                                       timeout=10)


def request(daemon, method, path, headers=None, ca_file=None):
    conn = connect(daemon, ca_file)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def packaged(name):
    with open(os.path.join(static.DIRECTORY, name), "rb") as f:
        return f.read()


# The page

@pytest.mark.parametrize("path", ["/", "/index.html", "/?x=1"])
def test_index(daemon, path):
    resp, body = request(daemon, "GET", path)
    assert resp.status == 200
    assert body == packaged("index.html")
    assert resp.getheader("content-type") == "text/html; charset=utf-8"
    assert resp.getheader("content-length") == str(len(body))
    assert resp.getheader("cache-control") == "no-cache"
    assert resp.getheader("x-content-type-options") == "nosniff"
    assert resp.getheader("x-frame-options") == "DENY"
    csp = resp.getheader("content-security-policy")
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self' https:"
    assert directives["frame-ancestors"] == "'none'"
    etag = resp.getheader("etag")
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 10


def test_every_packaged_file(daemon):
    # What page-ui puts in static/, each with its type.
    names = [n for n in os.listdir(static.DIRECTORY)
             if not n.startswith(".")]
    assert "index.html" in names
    conn = connect(daemon)
    try:
        for name in names:
            conn.request("GET", "/" + name)
            resp = conn.getresponse()
            assert resp.status == 200, name
            assert resp.read() == packaged(name)
            suffix = os.path.splitext(name)[1]
            assert resp.getheader("content-type") == static.TYPES.get(
                suffix, "application/octet-stream")
    finally:
        conn.close()


def test_head(daemon):
    get, body = request(daemon, "GET", "/")
    conn = connect(daemon)
    try:
        conn.request("HEAD", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == b""
        assert resp.getheader("content-length") == str(len(body))
        assert resp.getheader("etag") == get.getheader("etag")
        # The connection is still good: no body bytes were sent.
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.read() == body
    finally:
        conn.close()


@pytest.mark.parametrize("tags", ["{etag}", "W/{etag}", '"x", {etag}', "*"])
def test_not_modified(daemon, tags):
    resp, body = request(daemon, "GET", "/")
    etag = resp.getheader("etag")
    conn = connect(daemon)
    try:
        conn.request("GET", "/", headers={
            "if-none-match": tags.format(etag=etag)})
        resp = conn.getresponse()
        assert resp.status == 304
        assert resp.read() == b""
        assert resp.getheader("etag") == etag
        assert resp.getheader("cache-control") == "no-cache"
        # Keep-alive: the next response is framed right.
        conn.request("GET", "/index.html")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.read() == body
    finally:
        conn.close()


def test_modified(daemon):
    resp, body = request(daemon, "GET", "/", headers={
        "if-none-match": '"other"'})
    assert resp.status == 200
    assert body == packaged("index.html")


@pytest.mark.parametrize("path", [
    "/nope.js", "/index.html/", "/index.htm", "/static/index.html",
    "/../static.py", "/%2e%2e/static.py", "/..%2fstatic.py",
    "/..%2Fhttp%2Fstatic.py", "//etc/passwd", "/.", "/..", "/info",
    "/ca.pem"])
def test_other_paths(daemon, path):
    resp, body = request(daemon, "GET", path)
    assert resp.status == 404
    assert body.startswith(b"No handler for ")


def test_methods(daemon):
    resp, _ = request(daemon, "PUT", "/")
    assert resp.status == 405
    resp, _ = request(daemon, "DELETE", "/index.html")
    assert resp.status == 405


def test_disabled(make_daemon):
    daemon = make_daemon(remote={"page": "false"})
    resp, body = request(daemon, "GET", "/")
    assert resp.status == 404
    assert body == b"No handler for '/'\n"
    # The rest of the service as it was.
    resp, body = request(daemon, "GET", "/info/")
    assert resp.status == 200


def test_not_on_local_or_control(daemon):
    for address in (daemon.cfg.local.socket, daemon.cfg.control.socket):
        reply = testutil.raw_request(
            address, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 "), address
        reply = testutil.raw_request(
            address, b"GET /index.html HTTP/1.1\r\nconnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 404 "), address


def test_curl(daemon):
    port = daemon.remote.server.address()[1]
    r = subprocess.run(
        ["curl", "-sS", "--cacert", daemon.cfg.tls.ca_file, "-D", "-",
         f"https://localhost:{port}/"],
        capture_output=True, timeout=30)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"\r\ncontent-type: text/html; charset=utf-8" in head
    assert body == packaged("index.html")


def test_proxy(make_proxy, proxy_pki):
    proxy = make_proxy()
    resp, body = request(proxy, "GET", "/", ca_file=proxy_pki["ca_file"])
    assert resp.status == 200
    assert body == packaged("index.html")


# load(): what a directory serves

def test_load(tmp_path):
    (tmp_path / "index.html").write_bytes(b"<p>")
    (tmp_path / "app.js").write_bytes(b"1;")
    (tmp_path / "app.css").write_bytes(b"p{}")
    (tmp_path / "blob.bin").write_bytes(b"\0")
    (tmp_path / ".hidden").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.js").write_bytes(b"x")
    files = static.load(str(tmp_path))
    assert sorted(files) == ["app.css", "app.js", "blob.bin", "index.html"]
    assert files["app.js"].content_type == "text/javascript; charset=utf-8"
    assert files["app.css"].content_type == "text/css; charset=utf-8"
    assert files["blob.bin"].content_type == "application/octet-stream"
    assert files["app.js"].body == b"1;"
    assert files["app.js"].etag != files["app.css"].etag


def test_load_missing(tmp_path):
    assert static.load(str(tmp_path / "nope")) == {}


def test_page_route(tmp_path):
    (tmp_path / "index.html").write_bytes(b"<p>")
    (tmp_path / "a.b.js").write_bytes(b"1;")
    pattern, _ = static.page_route(static.load(str(tmp_path)))
    regex = re.compile(pattern)
    assert regex.match("/").groups() == (None,)
    assert regex.match("/a.b.js").groups() == ("a.b.js",)
    # A dot in a name is a dot.
    assert regex.match("/aXb.js") is None
    assert regex.match("/index.html/x") is None


# The CA

def test_ca(make_daemon, pki):
    daemon = make_daemon(remote={"offer_ca_file": pki["ca_file"]})
    resp, body = request(daemon, "GET", "/ca.pem")
    assert resp.status == 200
    with open(pki["ca_file"], "rb") as f:
        assert body == f.read()
    assert resp.getheader("content-type") == "application/x-pem-file"
    assert resp.getheader("content-disposition") == (
        'attachment; filename="ca.pem"')
    assert resp.getheader("x-content-type-options") == "nosniff"
    assert resp.getheader("etag")
    resp, body = request(daemon, "GET", "/info/")
    assert json.loads(body) == {"version": "2.5.1", "ca_url": "/ca.pem"}


def test_ca_with_page_disabled(make_daemon, pki):
    daemon = make_daemon(remote={"offer_ca_file": pki["ca_file"],
                                 "page": "false"})
    assert request(daemon, "GET", "/ca.pem")[0].status == 200
    assert request(daemon, "GET", "/")[0].status == 404


def test_ca_not_offered(daemon):
    resp, body = request(daemon, "GET", "/info/")
    assert json.loads(body) == {"version": "2.5.1"}


def test_ca_not_on_local(make_daemon, pki):
    daemon = make_daemon(remote={"offer_ca_file": pki["ca_file"]})
    reply = testutil.raw_request(
        daemon.cfg.local.socket,
        b"GET /ca.pem HTTP/1.1\r\nconnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 404 ")


@pytest.mark.parametrize("content,error", [
    (None, "No such file or directory"),
    (b"hello\n", "not a PEM certificate file"),
    (b"-----BEGIN CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\n",
     "not a PEM certificate file"),
])
def test_ca_bad_file(make_daemon, tmp_path, pki, content, error):
    path = tmp_path / "offered.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(errors.Error) as e:
        make_daemon(remote={"offer_ca_file": str(path)})
    assert str(e.value) == (
        f"[remote] offer_ca_file {str(path)!r}: {error}"
        if content is not None else
        f"[remote] offer_ca_file {str(path)!r}: [Errno 2] {error}")


def test_ca_key_file_refused(make_daemon, pki):
    # The private key by mistake: never served.
    with pytest.raises(errors.Error, match="not a PEM certificate"):
        make_daemon(remote={"offer_ca_file": pki["key_file"]})


def test_ca_raw_socket(make_daemon, pki):
    daemon = make_daemon(remote={"offer_ca_file": pki["ca_file"]})
    host, port = daemon.remote.server.address()[:2]
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    with socket.create_connection((host, port), timeout=10) as s:
        with ctx.wrap_socket(s, server_hostname="localhost") as t:
            t.sendall(b"HEAD /ca.pem HTTP/1.1\r\nconnection: close\r\n\r\n")
            data = b""
            while chunk := t.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b""
