"""
The Image contract (ovirt_imageio/image.py): one suite, run against every
image there is, on real parts:

- stream: the daemon's NBD stream, on a qemu-nbd export;
- libnbd: the libnbd client (the client library's local images), on
  qemu-nbd;
- relay: the proxy's relay image, on a real daemon serving a qemu-nbd
  export over HTTPS;
- remote-https, remote-unix: the client's RemoteImage on a real daemon;
- rawfile: a raw file, read and written directly.

Each image is 4 MiB of a raw file, whose bytes the tests check directly.
"""

import os
import socket
import threading

import pytest

from ovirt_imageio import errors
from ovirt_imageio import image as contract
from ovirt_imageio.client import rawfile
from ovirt_imageio.client import remote
from ovirt_imageio.http import relay
from ovirt_imageio.nbd import client as nbd_client
from ovirt_imageio.nbd import stream as nbd_stream

K = 1024
MiB = 1024**2
SIZE = 4 * MiB

IMAGES = ["stream", "libnbd", "relay", "remote-https", "remote-unix",
          "rawfile"]


@pytest.fixture
def path(make_image):
    """4 MiB raw: data at 0 (1 MiB) and 3 MiB (64 KiB), zeros between."""
    return make_image(size=SIZE, commands=[
        "write -P 0x41 0 1M", "write -P 0x42 3M 64k"])


def file_bytes(path, offset=0, length=-1):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def daemon_url(daemon, path):
    ticket = {"uuid": "contract-secret", "size": SIZE,
              "ops": ["read", "write"], "timeout": 300,
              "url": f"file://{path}", "transfer_id": "tr-contract"}
    resp, data = daemon.api.put(ticket)
    assert resp.status == 200, data
    port = daemon.remote.server.address()[1]
    return f"https://localhost:{port}/images/contract-secret"


@pytest.fixture(params=IMAGES)
def img(request, path, qemu_nbd, make_daemon, pki):
    kind = request.param
    if kind in ("stream", "libnbd"):
        srv = qemu_nbd(path, fmt="raw")
        module = nbd_stream if kind == "stream" else nbd_client
        image = module.open(srv.address)
    elif kind == "relay":
        daemon = make_daemon()
        image = relay.Relay(daemon_url(daemon, path),
                            cafile=pki["ca_file"]).open()
    elif kind.startswith("remote"):
        daemon = make_daemon()
        image = remote.RemoteImage(daemon_url(daemon, path),
                                   cafile=pki["ca_file"],
                                   use_unix_socket=kind == "remote-unix")
        assert image.transport == kind.split("-")[1]
    else:
        image = rawfile.File(path, SIZE, read_only=False)
    yield image
    image.close()


class Sink:
    """A send() destination: the other end of a socketpair, read in a
    thread."""

    def __init__(self):
        self.sock, self._peer = socket.socketpair()
        self.data = bytearray()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while chunk := self._peer.recv(MiB):
            self.data.extend(chunk)

    def finish(self):
        self.sock.close()
        self._thread.join(30)
        assert not self._thread.is_alive()
        self._peer.close()
        return bytes(self.data)


def feed(data, close=True):
    """A receive() source: a socket the data is sent into from a thread,
    then closed (if close)."""
    ours, theirs = socket.socketpair()

    def run():
        try:
            theirs.sendall(data)
        finally:
            if close:
                theirs.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return ours, thread, theirs


# What an image is.

def test_is_an_image(img):
    assert isinstance(img, contract.Image)
    for name in ("can_zero", "can_flush", "can_extents", "can_splice"):
        assert isinstance(getattr(img, name), bool), name
    assert img.size == SIZE


# Data through buffers.

def test_read_into(img, path):
    buf = bytearray(2 * MiB)
    img.read_into(buf, MiB - 100)
    assert buf == file_bytes(path, MiB - 100, 2 * MiB)
    view = memoryview(bytearray(10))
    img.read_into(view[2:7], 3 * MiB)
    assert bytes(view) == bytes(2) + b"\x42" * 5 + bytes(3)


def test_write_flush(img, path):
    data = os.urandom(MiB + 512)
    img.write(data, 2 * MiB - 512)
    img.flush()
    buf = bytearray(len(data))
    img.read_into(buf, 2 * MiB - 512)
    assert buf == data
    assert file_bytes(path, 2 * MiB - 512, len(data)) == data


@pytest.mark.parametrize("punch_hole", [False, True])
def test_zero(img, path, punch_hole):
    img.zero(512 * K, 256 * K, punch_hole=punch_hole)
    img.flush()
    buf = bytearray(MiB)
    img.read_into(buf, 0)
    assert buf == b"\x41" * (256 * K) + bytes(512 * K) + b"\x41" * (256 * K)
    assert file_bytes(path, 256 * K, 512 * K) == bytes(512 * K)


# Extents.

def test_extents_cover_and_tell_zeros(img, path):
    found = img.extents("zero")
    pos = 0
    for ext in found:
        assert ext.start == pos
        assert ext.length > 0
        if ext.zero:
            assert file_bytes(path, ext.start, ext.length) == bytes(
                ext.length)
        pos += ext.length
    assert pos == SIZE
    # Merged: no two neighbours with the same flags.
    for a, b in zip(found, found[1:]):
        assert a.flags() != b.flags()
    if img.can_extents:
        assert not found[0].zero
        zero = [e for e in found if e.zero]
        assert zero[0].start == MiB
        assert zero[0].length == 2 * MiB


def test_extents_range(img):
    found = img.extents("zero", MiB - 4096, 8192)
    assert found[0].start == MiB - 4096
    assert sum(e.length for e in found) == 8192
    assert img.extents("zero", SIZE, 10) == []


def test_extents_contexts(img):
    # None of these images has a dirty bitmap.
    with pytest.raises(errors.Unsupported):
        img.extents("dirty")
    with pytest.raises(ValueError):
        img.extents("nope")


# send(): to a socket or a callable.

def test_send_to_socket(img, path):
    sink = Sink()
    done, begun = [], []
    img.send(sink.sock, 512 * K, 3 * MiB, buf=bytearray(256 * K),
             begin=lambda: begun.append(len(sink.data)), done=done.append)
    assert sink.finish() == file_bytes(path, 512 * K, 3 * MiB)
    assert sum(done) == 3 * MiB
    assert len(begun) == 1


def test_send_to_socket_without_buffer(img, path):
    sink = Sink()
    img.send(sink.sock, MiB - 10, 20)
    assert sink.finish() == file_bytes(path, MiB - 10, 20)


def test_send_to_callable(img, path):
    out, done, events = [], [], []

    def write(data):
        # data may be a view of buf, reused: consumed now.
        events.append("write")
        out.append(bytes(data))

    buf = bytearray(300 * K)
    img.send(write, 100, 2 * MiB, buf=buf, begin=lambda: events.append(
        "begin"), done=done.append)
    assert b"".join(out) == file_bytes(path, 100, 2 * MiB)
    # Zeros may come from a shared zero buffer, data through buf.
    assert max(len(b) for b in out if any(b)) <= len(buf)
    assert sum(done) == 2 * MiB
    assert events[0] == "begin"
    assert events.count("begin") == 1


# receive(): from a socket or a callable.

def test_receive_from_socket(img, path):
    data = os.urandom(2 * MiB + 100)
    prefix, rest = data[:1000], data[1000:]
    sock, thread, _ = feed(rest)
    done = []
    img.receive(sock, MiB, len(data), buf=bytearray(256 * K),
                prefix=prefix, done=done.append, flush=True)
    thread.join(30)
    sock.close()
    assert sum(done) == len(data)
    assert file_bytes(path, MiB, len(data)) == data
    buf = bytearray(len(data))
    img.read_into(buf, MiB)
    assert buf == data


def test_receive_from_callable(img, path):
    data = os.urandom(MiB + 5)
    pos = 0

    def read_into(view):
        nonlocal pos
        view[:] = data[pos:pos + len(view)]
        pos += len(view)

    done = []
    img.receive(read_into, 7, len(data), buf=bytearray(128 * K),
                done=done.append, flush=True)
    assert pos == len(data)
    assert sum(done) == len(data)
    assert file_bytes(path, 7, len(data)) == data


def test_receive_socket_ends_early(img, path):
    sock, thread, _ = feed(b"x" * 1000)
    with pytest.raises(EOFError):
        img.receive(sock, 0, MiB, buf=bytearray(64 * K))
    thread.join(30)
    sock.close()


def test_receive_callable_error_propagates(img):
    class BodyEnded(Exception):
        pass

    def read_into(view):
        raise BodyEnded

    with pytest.raises(BodyEnded):
        img.receive(read_into, 0, MiB, buf=bytearray(64 * K))


def test_empty_moves(img):
    sink = Sink()
    img.send(sink.sock, 0, 0, buf=bytearray(4096))
    assert sink.finish() == b""
    img.receive(lambda view: None, 0, 0, buf=bytearray(4096))


def test_close_twice(img):
    img.close()
    img.close()
