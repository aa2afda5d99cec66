"""
ETag and If-Range of image downloads (http/etag.py) on real daemons, on
the unix socket and over HTTPS, through a real proxy (the daemon's tag,
passed on), and in front of upstream's daemon (no tag); with http.client
and curl.
"""

import http.client
import json
import os
import re
import ssl
import subprocess
import urllib.parse

import pytest

import testutil
from ovirt_imageio import tickets
from ovirt_imageio.http import etag

MiB = 1024**2
SIZE = 4 * MiB
TICKET_ID = "etag-ticket-secret"


@pytest.fixture
def target(tmp_path):
    path = str(tmp_path / "disk.raw")
    with open(path, "wb") as f:
        for i in range(SIZE // MiB):
            f.write(bytes([0x41 + i]) * MiB)
    return path


def file_bytes(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(-1 if length is None else length)


def ticket(url, **kw):
    t = {"uuid": TICKET_ID, "size": SIZE, "ops": ["write"], "timeout": 300,
         "url": url, "transfer_id": "tr-etag"}
    t.update(kw)
    return t


def add_ticket(service, url, **kw):
    t = ticket(url, **kw)
    resp, data = service.api.put(t)
    assert resp.status == 200, data
    return t


class Client:
    """Keep-alive client of /images/TICKET_ID: over HTTPS to url, or on a
    unix socket."""

    def __init__(self, url=None, ca_file=None, unix=None):
        if unix is not None:
            self.conn = testutil.UnixHTTPConnection(unix)
            self.path = f"/images/{TICKET_ID}"
            return
        u = urllib.parse.urlsplit(url)
        ctx = ssl.create_default_context(cafile=ca_file)
        self.conn = http.client.HTTPSConnection(
            u.hostname, u.port, context=ctx, timeout=30)
        self.path = u.path

    def request(self, method, body=None, headers=None, query=""):
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        self.conn.request(method, self.path + query, body=body,
                          headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def etag(self):
        resp, _ = self.request("HEAD")
        assert resp.status == 200
        return resp.getheader("etag")

    def close(self):
        self.conn.close()


def images_url(service, ticket_id=TICKET_ID):
    port = service.remote.server.address()[1]
    return f"https://localhost:{port}/images/{ticket_id}"


@pytest.fixture
def daemon(make_daemon, target):
    d = make_daemon()
    add_ticket(d, f"file://{target}")
    return d


@pytest.fixture(params=["https", "unix"])
def client(request, daemon):
    if request.param == "unix":
        c = Client(unix=daemon.cfg.local.socket)
    else:
        c = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    yield c
    c.close()


# The tag

def test_get_has_etag(client, target):
    resp, body = client.request("GET")
    assert resp.status == 200
    assert body == file_bytes(target)
    tag = resp.getheader("etag")
    assert re.fullmatch(r'"[A-Za-z0-9_-]{16}-[0-9]+"', tag)
    # Not the ticket id, in any form.
    assert TICKET_ID not in tag
    # The same for HEAD, ranges, and later requests.
    assert client.etag() == tag
    resp, body = client.request("GET", headers={"range": "bytes=10-19"})
    assert resp.status == 206
    assert resp.getheader("etag") == tag
    resp, body = client.request("GET")
    assert resp.getheader("etag") == tag


def test_same_tag_on_every_service(daemon):
    https = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    unix = Client(unix=daemon.cfg.local.socket)
    try:
        assert https.etag() == unix.etag()
    finally:
        https.close()
        unix.close()


def test_put_changes_tag(client, target):
    before = client.etag()
    data = os.urandom(4096)
    resp, body = client.request(
        "PUT", body=data, query="?flush=n",
        headers={"content-range": "bytes 4096-8191/*"})
    assert resp.status == 200, body
    after = client.etag()
    assert after != before
    assert file_bytes(target, 4096, 4096) == data
    # Stable again while nobody writes.
    assert client.etag() == after


def test_patch_zero_changes_tag(client):
    before = client.etag()
    resp, body = client.request("PATCH", body={
        "op": "zero", "offset": 0, "size": 4096})
    assert resp.status == 200, body
    assert client.etag() != before


def test_flush_keeps_tag(client):
    before = client.etag()
    resp, body = client.request("PATCH", body={"op": "flush"})
    assert resp.status == 200, body
    assert client.etag() == before


def test_refused_write_keeps_tag(client):
    # Refused before writing anything.
    before = client.etag()
    resp, _ = client.request("PATCH", body={
        "op": "zero", "offset": SIZE, "size": 4096})
    assert resp.status == 416
    assert client.etag() == before


def test_replaced_ticket_new_tag(daemon, target, tmp_path):
    c = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    try:
        before = c.etag()
    finally:
        c.close()
    other = str(tmp_path / "other.raw")
    with open(other, "wb") as f:
        f.write(b"\x01" * SIZE)
    add_ticket(daemon, f"file://{other}")
    c = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    try:
        resp, body = c.request("GET", headers={
            "range": "bytes=0-9", "if-range": before})
        # The old tag does not match the new ticket's image.
        assert resp.status == 200
        assert body == b"\x01" * SIZE
        assert resp.getheader("etag") != before
    finally:
        c.close()


def test_tickets_differ(daemon, target):
    add_ticket(daemon, f"file://{target}", uuid="second-ticket")
    a = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    b = Client(images_url(daemon, "second-ticket"), daemon.cfg.tls.ca_file)
    try:
        assert a.etag() != b.etag()
    finally:
        a.close()
        b.close()


def test_not_on_errors(client):
    c = client
    c.path = "/images/nope"
    resp, _ = c.request("GET")
    assert resp.status == 403
    assert resp.getheader("etag") is None


# If-Range

def test_if_range_match(client, target):
    tag = client.etag()
    resp, body = client.request("GET", headers={
        "range": f"bytes={MiB}-", "if-range": tag})
    assert resp.status == 206
    assert resp.getheader("content-range") == f"bytes {MiB}-{SIZE - 1}/{SIZE}"
    assert body == file_bytes(target, MiB)


@pytest.mark.parametrize("if_range", [
    '"other-0"', "W/{tag}", "Wed, 02 Dec 2026 17:00:00 GMT", "{tag}x"])
def test_if_range_mismatch(client, target, if_range):
    tag = client.etag()
    resp, body = client.request("GET", headers={
        "range": f"bytes={MiB}-", "if-range": if_range.format(tag=tag)})
    # The whole image, with the current tag.
    assert resp.status == 200
    assert resp.getheader("content-range") is None
    assert resp.getheader("content-length") == str(SIZE)
    assert body == file_bytes(target)
    assert resp.getheader("etag") == tag


def test_if_range_after_write(client, target):
    # A download broken off, a write, then the browser resumes.
    resp, head = client.request("GET", headers={"range": "bytes=0-99"})
    tag = resp.getheader("etag")
    resp, _ = client.request("PUT", body=b"\xff" * 100, query="?flush=n",
                             headers={"content-range": "bytes 0-99/*"})
    assert resp.status == 200
    resp, body = client.request("GET", headers={
        "range": "bytes=100-", "if-range": tag})
    assert resp.status == 200
    assert body[:100] == b"\xff" * 100
    assert body == file_bytes(target)


def test_if_range_without_range(client, target):
    resp, body = client.request("GET", headers={"if-range": '"x"'})
    assert resp.status == 200
    assert body == file_bytes(target)


def test_if_range_invalid_range_still_416(client):
    # Range is validated first, as upstream.
    resp, _ = client.request("GET", headers={
        "range": "bytes=5-1", "if-range": '"x"'})
    assert resp.status == 416


def test_curl_resume(daemon, target, tmp_path):
    # curl -C - as a browser resumes: the rest of the file, if unchanged.
    url = images_url(daemon)
    out = tmp_path / "out"
    with open(out, "wb") as f:
        f.write(file_bytes(target, 0, MiB + 5))
    resp_head = subprocess.run(
        ["curl", "-sS", "--cacert", daemon.cfg.tls.ca_file, "-I", url],
        capture_output=True, text=True, timeout=30)
    assert resp_head.returncode == 0, resp_head.stderr
    tag = re.search(r"^etag: (.*?)\r?$", resp_head.stdout, re.M).group(1)
    r = subprocess.run(
        ["curl", "-sS", "--fail", "--cacert", daemon.cfg.tls.ca_file,
         "-C", "-", "-H", f"If-Range: {tag}", "-o", str(out), url],
        capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == file_bytes(target)


# etag.writing(): a download during a write

def test_tag_during_write():
    t = tickets.Ticket(ticket("nbd:unix:/nowhere"))
    before = etag.of(t)
    with etag.writing(t):
        during = etag.of(t)
    after = etag.of(t)
    assert len({before, during, after}) == 3


def test_tag_after_failed_write():
    t = tickets.Ticket(ticket("nbd:unix:/nowhere"))
    before = etag.of(t)
    with pytest.raises(OSError):
        with etag.writing(t):
            raise OSError("broken")
    assert etag.of(t) != before


def test_checked():
    assert etag.checked('"abc-1"') == '"abc-1"'
    for bad in [None, "abc", 'W/"abc"', '"a"b"', '"' + "a" * 200 + '"',
                '"a\r\nx: y"', '""']:
        assert etag.checked(bad) is None, bad


# Through the proxy: the daemon's tag

@pytest.fixture
def relayed(make_daemon, make_proxy, proxy_pki, target):
    daemon = make_daemon(local={"enable": "false"})
    add_ticket(daemon, f"file://{target}")
    proxy = make_proxy()
    add_ticket(proxy, images_url(daemon))
    via_proxy = Client(images_url(proxy), proxy_pki["ca_file"])
    direct = Client(images_url(daemon), daemon.cfg.tls.ca_file)
    yield via_proxy, direct
    via_proxy.close()
    direct.close()


def test_proxy_passes_tag(relayed, target):
    via_proxy, direct = relayed
    resp, body = via_proxy.request("GET")
    assert resp.status == 200
    assert body == file_bytes(target)
    assert resp.getheader("etag") == direct.etag()
    assert via_proxy.etag() == direct.etag()


def test_proxy_write_changes_tag(relayed):
    via_proxy, direct = relayed
    before = via_proxy.etag()
    resp, body = via_proxy.request(
        "PUT", body=b"x" * 4096, headers={"content-range": "bytes 0-4095/*"})
    assert resp.status == 200, body
    assert via_proxy.etag() != before
    assert via_proxy.etag() == direct.etag()


def test_proxy_sees_direct_writes(relayed):
    # A client writing to the daemon directly changes the proxy's tag.
    via_proxy, direct = relayed
    before = via_proxy.etag()
    resp, body = direct.request("PATCH", body={
        "op": "zero", "offset": 0, "size": 4096})
    assert resp.status == 200, body
    assert via_proxy.etag() != before


def test_proxy_if_range(relayed, target):
    via_proxy, direct = relayed
    tag = via_proxy.etag()
    resp, body = via_proxy.request("GET", headers={
        "range": f"bytes={MiB}-", "if-range": tag})
    assert resp.status == 206
    assert body == file_bytes(target, MiB)
    resp, _ = direct.request("PATCH", body={
        "op": "zero", "offset": 0, "size": 4096})
    assert resp.status == 200
    resp, body = via_proxy.request("GET", headers={
        "range": f"bytes={MiB}-", "if-range": tag})
    assert resp.status == 200
    assert body == file_bytes(target)


# In front of upstream's daemon: no HEAD, no tag

def test_proxy_upstream_daemon(upstream_venv, make_proxy, proxy_pki, pki,
                               target, tmp_path):
    import upstream
    with upstream.UpstreamDaemon(tmp_path / "up", pki,
                                 local={"enable": "false"}) as up:
        resp, data = up.api.put(ticket(f"file://{target}"))
        assert resp.status == 200, data
        proxy = make_proxy()
        add_ticket(proxy, up.url(TICKET_ID))
        c = Client(images_url(proxy), proxy_pki["ca_file"])
        try:
            for _ in range(2):
                resp, body = c.request("GET")
                assert resp.status == 200
                assert resp.getheader("etag") is None
                assert body == file_bytes(target)
            resp, body = c.request("GET", headers={
                "range": "bytes=0-9", "if-range": '"x"'})
            assert resp.status == 200
            assert body == file_bytes(target)
        finally:
            c.close()
