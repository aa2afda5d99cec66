"""
Moving ranges between an image and HTTP bodies (http/bodies.py), on a
real qemu-nbd export through the daemon's Stream.
"""

import io
import socket
import threading

import pytest

from ovirt_imageio.http import bodies
from ovirt_imageio.http import server
from ovirt_imageio.nbd import stream
from ovirt_imageio.nbd import url

K = 1024
M = 1024**2


@pytest.fixture
def image(make_image):
    """4 MiB raw: data at 0 (1 MiB) and at 3 MiB (64 KiB), zeros between."""
    return make_image(size=4 * M, commands=[
        "write -P 0x41 0 1M", "write -P 0x42 3M 64k"])


@pytest.fixture
def nbd(qemu_nbd, image):
    srv = qemu_nbd(image, fmt="raw", read_only=True)
    with stream.open(url.Address(socket=srv.socket)) as s:
        yield s


def test_plan_skips_zeros(nbd):
    pieces = list(bodies.plan(nbd, 0, 4 * M, M))
    # Covers the range, in order, in pieces of at most 1 MiB.
    assert sum(n for _, n, _ in pieces) == 4 * M
    assert all(n <= M for _, n, _ in pieces)
    pos = 0
    for start, n, _ in pieces:
        assert start == pos
        pos += n
    data = [(start, n) for start, n, zero in pieces if not zero]
    assert data[0] == (0, M)
    # The zero range between the data is never read.
    assert all(not (M <= start < 3 * M) for start, _ in data)


def test_plan_short_range_reads(nbd):
    # Below EXTENTS_THRESHOLD: one read, no block status.
    assert list(bodies.plan(nbd, M, 4 * K, M)) == [(M, 4 * K, False)]


def test_send_range_through_buffer(nbd, image):
    out = []
    done = []
    buf = bytearray(256 * K)

    def write(data):
        # data may be a view of buf, reused by the next piece: consumed
        # before write returns.
        out.append(bytes(data))

    begun = []

    def begin():
        begun.append(len(out))

    bodies.send_range(nbd, 512 * K, 3 * M, write, begin, done.append,
                      buf=buf)
    # begin() before the first byte, and at the end.
    assert begun[0] == 0
    with open(image, "rb") as f:
        f.seek(512 * K)
        assert b"".join(out) == f.read(3 * M)
    assert sum(done) == 3 * M


def test_send_range_spliced(nbd, image):
    ours, theirs = socket.socketpair()
    received = bytearray()

    def read():
        while chunk := theirs.recv(M):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    begun = []
    bodies.send_range(nbd, 0, 4 * M, ours, lambda: begun.append(1),
                      lambda n: None)
    ours.close()
    reader.join(30)
    theirs.close()
    assert begun
    with open(image, "rb") as f:
        assert received == f.read()


def test_send_range_empty(nbd):
    out, begun = [], []
    bodies.send_range(nbd, 0, 0, out.append, lambda: begun.append(1),
                      lambda n: None, buf=bytearray(4096))
    # Just the head.
    assert begun == [1]
    assert out == []


def test_send_zeros():
    out, done = [], []
    bodies.send_zeros(out.append, bodies.ZERO_CHUNK + 10, done.append)
    assert [len(b) for b in out] == [bodies.ZERO_CHUNK, 10]
    assert done == [bodies.ZERO_CHUNK, 10]
    assert not any(bytes(out[1]))


class Body:
    """A request body as the handlers read it (server.Request.readinto),
    arriving in small reads."""

    def __init__(self, data, step=1000):
        self.file = io.BytesIO(data)
        self.step = step

    def readinto(self, buf):
        return self.file.readinto(buf[:self.step])


def test_body_reader_fills():
    read_into = bodies.body_reader(Body(b"x" * 5000), 5000)
    buf = bytearray(3000)
    read_into(memoryview(buf))
    assert buf == b"x" * 3000


def test_body_reader_short_body():
    read_into = bodies.body_reader(Body(b"x" * 5000), 8000)
    read_into(memoryview(bytearray(4000)))
    with pytest.raises(server.Error) as e:
        read_into(memoryview(bytearray(4000)))
    assert e.value.status == 400
    assert e.value.message == "Requested 8000 bytes, available 5000 bytes"
