"""
RemoteImage against our daemon (HTTPS and its unix socket), and against a
stub server for what our daemon never does (legacy servers, broken and
dropped responses).
"""

import json
import os
import socket
import ssl

import pytest

from ovirt_imageio import errors
from ovirt_imageio.client import remote
from ovirt_imageio.nbd import extents as nbd_extents

MiB = 1024**2
SIZE = 4 * MiB


def add_ticket(daemon, url, ops=("read", "write"), size=SIZE, **kw):
    t = {"uuid": "remote-secret", "size": size, "ops": list(ops),
         "timeout": 300, "url": url, "transfer_id": "tr-remote"}
    t.update(kw)
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    return t


def https_url(daemon, ticket_id="remote-secret"):
    port = daemon.remote.server.address()[1]
    return f"https://localhost:{port}/images/{ticket_id}"


def image_bytes(path, offset=0, length=-1):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture
def daemon(client_daemon):
    return client_daemon


@pytest.fixture
def image(make_image):
    """4 MiB raw: data at 0 and 2 MiB, a zero range at 1 MiB, holes."""
    return make_image(size=SIZE, commands=[
        "write -P 0x41 0 1M", "write -z 1M 512k", "write -P 0x42 2M 512k",
        "write -P 0x43 3M 4k"])


@pytest.fixture
def export(qemu_nbd, image):
    return qemu_nbd(image, fmt="raw", shared=8)


@pytest.fixture(params=["https", "unix"])
def transport(request):
    return request.param


def open_image(daemon, pki, transport, **kw):
    img = remote.RemoteImage(https_url(daemon), cafile=pki["ca_file"],
                             use_unix_socket=transport == "unix", **kw)
    assert img.transport == transport
    return img


# OPTIONS and the transport.

def test_options(daemon, pki, export, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        assert img.features == {"checksum", "extents", "flush", "zero"}
        assert img.max_readers == 4
        assert img.max_writers == 4
        assert img.url == https_url(daemon)
        assert img.size == SIZE
        assert "remote-secret" not in repr(img)


def test_options_read_only(daemon, pki, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}", ops=["read"])
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        assert img.features == {"checksum", "extents"}
        assert not img.can_zero and not img.can_flush


def test_unix_socket_not_advertised(make_daemon, pki, export):
    daemon = make_daemon(local={"enable": "false"})
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        assert img.transport == "https"
        buf = bytearray(4096)
        img.read_into(buf, 0)
        assert buf == image_bytes(export.path, 0, 4096)


def test_unix_socket_unreachable(stub_server, Response):
    # Advertised, local, but nothing listens there: HTTP stays.
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, json.dumps({
                "features": ["extents"], "unix_socket": "\0/no/such/socket",
                "max_readers": 2, "max_writers": 3}).encode())
        return Response(200, json.dumps(
            [{"start": 0, "length": 8192, "zero": True, "hole": True}]
        ).encode())

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        assert img.transport == "http"
        assert img.max_readers == 2 and img.max_writers == 3
        assert img.size == 8192


def test_unix_socket_abstract(make_daemon, pki, export):
    daemon = make_daemon(local={"socket": ""})
    assert daemon.local.server.address().startswith("\0")
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        assert img.transport == "unix"
        assert img.extents()[0].start == 0


def test_secure_false(daemon, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), secure=False,
                            use_unix_socket=False) as img:
        assert img.size == SIZE


def test_untrusted_certificate(daemon, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    # The system CAs do not know the test CA.
    with pytest.raises(ssl.SSLCertVerificationError):
        remote.RemoteImage(https_url(daemon))


def test_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        remote.RemoteImage(f"https://127.0.0.1:{port}/images/x")


def test_bad_url():
    with pytest.raises(ValueError):
        remote.RemoteImage("nbd://localhost/images/x")


# Data

def test_read_into(daemon, pki, export, image, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        # Unaligned, crossing data, zero and hole ranges, larger than the
        # daemon's buffer.
        buf = bytearray(3 * MiB + 12345)
        img.read_into(buf, 777)
        assert buf == image_bytes(image, 777, len(buf))
        # Memoryview slices and other buffer objects.
        view = memoryview(bytearray(8192))
        img.read_into(view[100:200], 2 * MiB)
        assert view[100:200] == image_bytes(image, 2 * MiB, 100)
        img.read_into(bytearray(0), 0)


def test_write(daemon, pki, export, image, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        data = os.urandom(2 * MiB + 3)
        img.write(data, 1000)
        img.write(memoryview(b"xyz"), SIZE - 3, flush=True)
        img.flush()
    assert image_bytes(image, 1000, len(data)) == data
    assert image_bytes(image, SIZE - 3) == b"xyz"


def test_zero(daemon, pki, export, image, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        img.zero(100_000, 1000)
        img.zero(MiB, 2 * MiB, punch_hole=True, flush=True)
        img.zero(0, 0)
    assert image_bytes(image, 1000, 100_000) == bytes(100_000)
    assert image_bytes(image, 2 * MiB, MiB) == bytes(MiB)
    assert image_bytes(image, 0, 1000) == b"\x41" * 1000


def test_extents(daemon, pki, export, image, transport, qemu_img_map):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        found = img.extents()
        assert all(isinstance(e, nbd_extents.ZeroExtent) for e in found)
        assert found[0] == nbd_extents.ZeroExtent(0, MiB, False, False)
        assert found[-1].start + found[-1].length == SIZE
        expected = [(e["start"], e["length"], e["zero"])
                    for e in qemu_img_map(image, "raw")]
        assert [(e.start, e.length, e.zero) for e in found] == expected
        # Clipped to the range asked for.
        part = img.extents("zero", MiB - 10, 20)
        assert part == [nbd_extents.ZeroExtent(MiB - 10, 10, False, False),
                        nbd_extents.ZeroExtent(MiB, 10, True, False)]
        assert img.extents("zero", SIZE, 100) == []
        tail = img.extents("zero", 3 * MiB)
        assert tail[0].start == 3 * MiB
        assert sum(e.length for e in tail) == MiB


def test_extents_cached(daemon, pki, export, image):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        first = img.extents()
        # Another writer changes the image; this connection's list does
        # not (one GET /extents per transfer, shared by the workers).
        with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as other:
            other.zero(MiB, 0)
        assert img.extents() == first
        clone = img.clone()
        with clone:
            assert clone.extents() == first
        # Our own writes do change it (upstream keeps the stale list).
        img.zero(MiB, 0)
        assert img.extents()[0] == nbd_extents.ZeroExtent(
            0, 2 * MiB, True, False)
        img.write(b"x" * 4096, 0)
        assert img.extents()[0] == nbd_extents.ZeroExtent(
            0, 4096, False, False)


def test_extents_dirty(daemon, pki, qemu_nbd, make_image):
    path = make_image(fmt="qcow2", size=SIZE, bitmaps=["b1"], commands=[
        "write -P 0x01 0 64k", "write -z 1M 64k"])
    srv = qemu_nbd(path, fmt="qcow2", bitmap="b1", read_only=True)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], dirty=True)
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        found = img.extents("dirty")
        assert all(isinstance(e, nbd_extents.DirtyExtent) for e in found)
        assert found[0] == nbd_extents.DirtyExtent(0, 64 * 1024, True, False)
        assert nbd_extents.DirtyExtent(MiB, 64 * 1024, True, True) in found
        assert sum(e.length for e in found) == SIZE


def test_extents_dirty_unsupported(daemon, pki, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        with pytest.raises(errors.Unsupported) as e:
            img.extents("dirty")
        assert isinstance(e.value, errors.PeerError)
        assert e.value.status == 404
        assert str(e.value) == "Ticket does not support dirty extents"
        # The connection is still good.
        assert img.size == SIZE


def test_extents_bad_context(daemon, pki, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        with pytest.raises(ValueError):
            img.extents("nope")


def test_checksum(daemon, pki, export, image, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        result = img.checksum()
        assert result["algorithm"] == "blake2b"
        assert result["block_size"] == 4 * MiB
        assert img.checksum("sha1", MiB)["algorithm"] == "sha1"
        # The connection's timeout is back.
        assert img._con.sock.gettimeout() == 60


def test_send_and_receive(daemon, pki, export, image, transport):
    # One request for a whole range, through a reused buffer, to and from
    # callables (the Image contract, ovirt_imageio/image.py).
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    data = os.urandom(SIZE)
    pos = 1000

    def read_into(view):
        nonlocal pos
        view[:] = data[pos:pos + len(view)]
        pos += len(view)

    received = bytearray()
    done = []
    buf = bytearray(300_000)
    with open_image(daemon, pki, transport) as img:
        assert not img.can_splice
        img.receive(read_into, 1000, 2 * MiB, buf=buf, done=done.append)
        assert sum(done) == 2 * MiB
        assert max(done) == len(buf)
        done.clear()
        img.send(lambda b: received.extend(b), 500, 3 * MiB, buf=buf,
                 done=done.append)
        assert sum(done) == 3 * MiB
    assert image_bytes(image, 1000, 2 * MiB) == data[1000:1000 + 2 * MiB]
    assert received == image_bytes(image, 500, 3 * MiB)


def test_clone(daemon, pki, export, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        with img.clone() as other:
            assert other.transport == transport
            assert other.features == img.features
            assert other.max_writers == img.max_writers
            other.write(b"clone", 0)
            buf = bytearray(5)
            img.read_into(buf, 0)
            assert buf == b"clone"
            assert daemon.api.get("remote-secret")["connections"] == 2


def test_close_twice(daemon, pki, export):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    img = remote.RemoteImage(https_url(daemon), pki["ca_file"])
    img.close()
    img.close()
    with pytest.raises(ValueError):
        img.read_into(bytearray(1), 0)


# Errors: the server's status and message, as they are.

def test_error_no_such_ticket(daemon, pki, transport):
    with pytest.raises(errors.PeerError) as e:
        remote.RemoteImage(https_url(daemon, "nope"), pki["ca_file"],
                           use_unix_socket=transport == "unix")
    assert e.value.status == 403
    assert str(e.value) == (
        "You are not allowed to access this resource: No such ticket nope")


def test_error_no_handler(daemon, pki):
    port = daemon.remote.server.address()[1]
    with pytest.raises(errors.PeerError) as e:
        remote.RemoteImage(f"https://localhost:{port}/nope", pki["ca_file"])
    assert e.value.status == 404
    assert str(e.value) == "No handler for '/nope'"


def test_error_out_of_range(daemon, pki, export, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        # A GET past the end is served up to the end; one starting past
        # it is refused.
        with pytest.raises(errors.PeerError) as e:
            img.read_into(bytearray(10), SIZE)
        assert e.value.status == 416
        assert str(e.value) == "Requested range out of allowed range"
        # The server closed the connection after rejecting a PUT body it
        # did not read; the next request reconnects.
        with pytest.raises(errors.PeerError) as e:
            img.write(b"x" * 10, SIZE - 5)
        assert e.value.status == 416
        with pytest.raises(errors.PeerError) as e:
            img.zero(10, SIZE - 5)
        assert e.value.status == 416
        img.write(b"ok", 0)
        buf = bytearray(2)
        img.read_into(buf, 0)
        assert buf == b"ok"


def test_error_forbidden(daemon, pki, export, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}", ops=["read"])
    with open_image(daemon, pki, transport) as img:
        with pytest.raises(errors.PeerError) as e:
            img.write(b"x" * MiB, 0)
        assert e.value.status == 403
        assert str(e.value) == (
            "You are not allowed to access this resource: "
            "Transfer=tr-remote forbids write")
        # 403 closes the connection; reads still work on a new one.
        buf = bytearray(4)
        img.read_into(buf, 0)
        assert buf == b"AAAA"


def test_error_ticket_removed(daemon, pki, export, transport):
    add_ticket(daemon, f"nbd:unix:{export.socket}")
    with open_image(daemon, pki, transport) as img:
        img.read_into(bytearray(4), 0)
        resp, _ = daemon.api.delete("remote-secret")
        assert resp.status == 204
        with pytest.raises(errors.PeerError) as e:
            img.read_into(bytearray(4), 0)
        assert e.value.status == 403
        assert "No such ticket remote-secret" in str(e.value)


# Legacy and misbehaving servers.

@pytest.fixture
def Response(stub_server):
    return stub_server.Response


class LegacyImage:
    """A server without OPTIONS (405), extents, zero or flush."""

    def __init__(self, Response, size, options_status=405):
        self.Response = Response
        self.data = bytearray(size)
        self.options_status = options_status

    def __call__(self, req):
        Response = self.Response
        if req.method == "OPTIONS":
            return Response(self.options_status,
                            b"Method not allowed\n"
                            if self.options_status == 405 else b"")
        if req.method == "GET":
            first, last = req.headers["range"][6:].split("-")
            first, last = int(first), int(last)
            return Response(206, bytes(self.data[first:last + 1]), {
                "content-range": f"bytes {first}-{last}/{len(self.data)}"})
        if req.method == "PUT":
            first = int(req.headers["content-range"][6:].split("-")[0])
            self.data[first:first + len(req.body)] = req.body
            return Response(200)
        return Response(405, b"Method not allowed\n")


@pytest.mark.parametrize("status", [405, 204])
def test_legacy_server(stub_server, Response, status):
    legacy = LegacyImage(Response, MiB, status)
    legacy.data[:] = b"\xff" * MiB
    stub = stub_server(legacy)
    with remote.RemoteImage(stub.url) as img:
        assert img.features == set()
        assert img.max_readers == img.max_writers == 1
        assert img.size == MiB
        assert img.extents() == [nbd_extents.ZeroExtent(0, MiB, False, False)]
        with pytest.raises(errors.Unsupported):
            img.extents("dirty")
        img.write(b"abc", 10, flush=True)
        img.zero(300_000, 1000)
        img.flush()
    assert legacy.data[10:13] == b"abc"
    assert legacy.data[1000:301_000] == bytes(300_000)
    assert legacy.data[301_000] == 0xff
    puts = [r for r in stub.requests if r.method == "PUT"]
    # No flush query for a server without flush; zeros were sent as data.
    assert [r.path for r in puts] == ["/images/stub"] * 2
    assert puts[1].headers["content-range"] == "bytes 1000-300999/*"
    assert "PATCH" not in stub.methods()


def test_new_server_put_query(stub_server, Response, wait_for):
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": ["flush", "zero"]}')
        return Response(200)

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        img.write(b"a", 0)
        img.write(b"b", 1, flush=True)
        img.zero(5, 6, flush=True)
        img.flush()
        with img.clone():
            pass
    assert [(r.method, r.path) for r in stub.requests] == [
        ("OPTIONS", "/images/stub"),
        ("PUT", "/images/stub?flush=n"),
        ("PUT", "/images/stub?flush=y"),
        ("PATCH", "/images/stub"),
        ("PATCH", "/images/stub"),
    ]
    put = stub.requests[1]
    assert put.headers["content-type"] == "application/octet-stream"
    assert put.headers["content-range"] == "bytes 0-0/*"
    assert put.headers["content-length"] == "1"
    assert stub.requests[3].headers["content-type"] == "application/json"
    assert json.loads(stub.requests[3].body) == {
        "op": "zero", "offset": 6, "size": 5, "flush": True}
    assert json.loads(stub.requests[4].body) == {"op": "flush"}
    # The clone connected without OPTIONS.
    wait_for(lambda: stub.connections == 2, message="clone connection")


def test_options_error_message(stub_server, Response):
    body = ("x" * 600 + "\nsecond line\n").encode()
    stub = stub_server(lambda req: Response(500, body))
    with pytest.raises(errors.PeerError) as e:
        remote.RemoteImage(stub.url)
    assert e.value.status == 500
    assert str(e.value) == "x" * 512


def test_server_drops_idle_connection(stub_server, Response):
    # The server closes after each response without saying so: every
    # request after the first finds a dead connection and is sent again.
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": ["zero", "flush"]}',
                            drop=True)
        return Response(200, drop=True)

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        img.write(b"x" * 1000, 0)
        img.zero(10, 0)
        img.flush()
    assert stub.methods() == ["OPTIONS", "PUT", "PATCH", "PATCH"]
    # Each on its own connection: the closed one was noticed before
    # sending.
    assert stub.connections == 4


class HangUpOnce:
    """A server closing the connection instead of answering the first
    PUT, as when its idle timeout hits just as the request comes."""

    def __init__(self, Response):
        self.Response = Response
        self.puts = 0

    def __call__(self, req):
        if req.method == "OPTIONS":
            return self.Response(200, b'{"features": ["zero", "flush"]}')
        self.puts += 1
        if self.puts == 1:
            return self.Response(hang_up=True)
        return self.Response(200)


def test_request_sent_again(stub_server, Response):
    stub = stub_server(HangUpOnce(Response))
    with remote.RemoteImage(stub.url) as img:
        img.write(b"x" * 1000, 0)
    assert stub.methods() == ["OPTIONS", "PUT", "PUT"]


def test_receive_never_sent_again(stub_server, Response):
    # Its source may be a stream (the proxy's client): read only once.
    stub = stub_server(HangUpOnce(Response))

    reads = []

    def read_into(buf):
        reads.append(len(buf))
        buf[:] = b"y" * len(buf)

    with remote.RemoteImage(stub.url) as img:
        with pytest.raises(ConnectionError):
            img.receive(read_into, 0, 1000, buf=bytearray(4096))
        assert reads == [1000]
        # The next request works, on a new connection.
        img.write(b"x", 0)
    assert stub.methods() == ["OPTIONS", "PUT", "PUT"]


def test_get_not_partial(stub_server, Response):
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": []}')
        return Response(200, b"whole image")

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        with pytest.raises(remote.ProtocolError) as e:
            img.read_into(bytearray(4), 0)
        assert isinstance(e.value, OSError)
        assert "200" in str(e.value)


def test_get_wrong_length(stub_server, Response):
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": []}')
        return Response(206, b"abc")

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        with pytest.raises(remote.ProtocolError):
            img.read_into(bytearray(4), 0)


def test_get_short_body(stub_server, Response):
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": []}')
        return Response(206, b"abcd", truncate=2)

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        with pytest.raises(OSError):
            img.read_into(bytearray(4), 0)


def test_extents_invalid(stub_server, Response):
    def handler(req):
        if req.method == "OPTIONS":
            return Response(200, b'{"features": ["extents"]}')
        return Response(200, b'[{"start": 0}]')

    stub = stub_server(handler)
    with remote.RemoteImage(stub.url) as img:
        with pytest.raises(remote.ProtocolError):
            img.extents()


def test_read_only_access(daemon, pki, export, image):
    # Reading never writes.
    add_ticket(daemon, f"nbd:unix:{export.socket}", ops=["read"])
    before = image_bytes(image)
    with remote.RemoteImage(https_url(daemon), pki["ca_file"]) as img:
        img.read_into(bytearray(SIZE), 0)
        img.extents()
    assert image_bytes(image) == before
