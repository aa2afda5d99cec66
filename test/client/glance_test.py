"""
ovirt_imageio/client/glance.py against a real glance-api on loopback (the
glance fixture, test/glance.py).
"""

import hashlib
import os

import pytest

from ovirt_imageio.client import glance as _glance

import testutil

MiB = 1 << 20


@pytest.fixture
def g(glance):
    with _glance.Client(glance.url, glance.token) as c:
        yield c


def upload(g, image_id, data, chunk=MiB):
    def write(send):
        for i in range(0, len(data), chunk):
            send(data[i:i + chunk])
    g.upload(image_id, len(data), write)


def test_create_upload_get_delete(glance, g):
    data = os.urandom(3 * MiB + 123)
    image = g.create("client-test", "raw", ovirt_disk_id="d1")
    assert (image["status"], image["size"], image["disk_format"],
            image["container_format"]) == ("queued", None, "raw", "bare")
    upload(g, image["id"], data)
    image = g.get(image["id"])
    assert (image["status"], image["size"]) == ("active", len(data))
    assert image["checksum"] == hashlib.md5(data).hexdigest()
    assert image["os_hash_value"] == hashlib.sha512(data).hexdigest()
    assert image["ovirt_disk_id"] == "d1"
    assert glance.data(image["id"]) == data
    g.delete(image["id"])
    assert glance.image(image["id"]) is None
    # Gone already: not an error.
    g.delete(image["id"])
    with pytest.raises(_glance.NotFound):
        g.get(image["id"])


def test_create_with_id(glance, g):
    image_id = "0d1f7e3a-5b7c-4b8e-9d2a-3f4e5a6b7c8d"
    try:
        assert g.create("x", "qcow2", id=image_id)["id"] == image_id
        assert glance.image(image_id)["disk_format"] == "qcow2"
    finally:
        glance.delete(image_id)


def test_create_invalid_format(g):
    with pytest.raises(ValueError):
        g.create("x", "qcow3")


@pytest.mark.parametrize("offset,length", [
    (0, 72), (MiB - 1, 2), (2 * MiB - 10, 10), (12345, MiB)],
    ids=["head", "across", "tail", "large"])
def test_read_into(glance, g, offset, length):
    data = os.urandom(2 * MiB)
    image_id = glance.create(data)
    buf = bytearray(length)
    g.read_into(image_id, buf, offset)
    assert buf == data[offset:offset + length]
    # The connection is kept and reused.
    g.read_into(image_id, buf, 0)
    assert buf == data[:length]


def test_read_past_end(glance, g):
    image_id = glance.create(b"x" * 100)
    with pytest.raises(_glance.Error) as e:
        g.read_into(image_id, bytearray(10), 200)
    assert e.value.status == 416
    # Clamped by Glance: fewer bytes than asked for is an error.
    with pytest.raises(_glance.Error) as e:
        g.read_into(image_id, bytearray(10), 95)
    assert "Content-Range" in str(e.value)
    # The client still works.
    buf = bytearray(5)
    g.read_into(image_id, buf, 95)
    assert buf == b"xxxxx"


def test_read_no_data(glance, g):
    """A ranged GET of an image without data: Glance fails (500; 204
    without Range). import-glance checks the status first."""
    image_id = glance.create(None)
    with pytest.raises(_glance.Error) as e:
        g.read_into(image_id, bytearray(10), 0)
    assert e.value.status in (204, 500)


def queued(glance, image_id):
    testutil.wait_for(
        lambda: glance.image(image_id)["status"] == "queued", timeout=60,
        message="the image to be queued again")


def test_upload_twice(glance, g):
    image_id = glance.create(b"first")
    with pytest.raises(_glance.Conflict):
        upload(g, image_id, b"second")
    assert glance.data(image_id) == b"first"


def test_upload_short_body(glance, g):
    image = g.create("short", "raw")
    with pytest.raises(ValueError):
        g.upload(image["id"], 10, lambda send: send(b"12345"))
    # The connection was closed: Glance never takes the 5 bytes for the
    # image (it drops them when it sees the connection closed), and the
    # client goes on on a new connection.
    assert glance.image(image["id"])["status"] in ("queued", "saving")
    g.check()


def test_upload_write_fails(glance, g):
    image = g.create("fails", "raw")

    def write(send):
        send(b"x" * MiB)
        raise RuntimeError("source failed")

    with pytest.raises(RuntimeError):
        g.upload(image["id"], 4 * MiB, write)
    queued(glance, image["id"])
    g.check()


def test_wrong_token(glance):
    with _glance.Client(glance.url, "bad") as g:
        with pytest.raises(_glance.Unauthorized) as e:
            g.check()
    assert e.value.status == 401
    assert "bad" not in str(e.value)


def test_token_asked_again(glance):
    """A 401 asks for the token again, and the request is sent once more
    with the new one; the same token again is Unauthorized."""
    tokens = ["old", glance.token]
    asked = []

    def token():
        asked.append(tokens[0])
        return tokens.pop(0) if len(tokens) > 1 else tokens[0]

    with _glance.Client(glance.url, token) as g:
        g.check()
        assert asked == ["old", glance.token]
        assert g.current_token() == glance.token
        # Expired: the source gives the same one again.
        glance.set_tokens("newer")
        with pytest.raises(_glance.Unauthorized):
            g.check()
        # The source has the new one now.
        tokens[0] = "newer"
        g.check()


def test_upload_after_token_expired(glance):
    """An upload whose token Glance refuses fails before sending its body
    (Glance answers at once)."""
    data = b"y" * (8 * MiB)
    with _glance.Client(glance.url, lambda: "stale") as g:
        image_id = glance.create(None)
        with pytest.raises(_glance.Unauthorized):
            upload(g, image_id, data)
    assert glance.image(image_id)["status"] == "queued"


def test_unreachable():
    with _glance.Client("http://127.0.0.1:1", "t", timeout=5) as g:
        with pytest.raises(_glance.Error) as e:
            g.check()
    assert str(e.value) == ("Cannot connect to Glance at 127.0.0.1:1: "
                            "Connection refused")
    assert isinstance(e.value.__cause__, ConnectionRefusedError)


def test_reconnects_after_restart(glance, g):
    """A kept-alive connection that Glance closed (it restarted) is
    replaced."""
    image_id = glance.create(b"abc")
    assert g.get(image_id)["size"] == 3
    glance.stop()
    glance.start()
    assert g.get(image_id)["size"] == 3


def test_prefix_and_invalid_url(glance):
    with pytest.raises(ValueError):
        _glance.Client("ftp://host", "t")
    # Glance behind a path: the prefix is kept.
    with _glance.Client(glance.url + "/", glance.token) as g:
        g.check()
    # A wrong one: Glance's version negotiation answers 300.
    with _glance.Client(glance.url + "/nothing", glance.token) as g:
        with pytest.raises(_glance.Error) as e:
            g.check()
        assert e.value.status == 300


def test_error_message():
    assert _glance._message(
        b'{"message": "No image  found", "code": 404}') == "No image found"
    assert _glance._message(
        b"<html><body><h1>409 Conflict</h1>There was a conflict.<br />"
        b"<br />\nImage status transition not allowed\n\n </body></html>"
    ) == "Image status transition not allowed"
    assert _glance._message(b"") == ""
