"""
Raw files read and written directly (ovirt_imageio/client/rawfile.py):
the same size, extents and bytes a qemu-nbd export of the file serves,
and data moved to and from real sockets.
"""

import errno
import os
import socket
import subprocess
import threading

import pytest

from ovirt_imageio import errors
from ovirt_imageio.client import rawfile
from ovirt_imageio.nbd import extents as nbd_extents
from ovirt_imageio.nbd import client as nbd_client
from ovirt_imageio.nbd import qemu_nbd

KiB = 1024
MiB = 1024**2


def make_file(path, size, writes=()):
    """A sparse file of size bytes with (offset, data) writes."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in writes:
            f.seek(offset)
            f.write(data)
    return str(path)


def ext(start, length, zero):
    return nbd_extents.ZeroExtent(start, length, zero=zero, hole=False)


def qemu_extents_and_data(path, size):
    """What qemu-nbd serves of the raw file at path."""
    sock = os.path.join(os.path.dirname(path), "qemu.sock")
    srv = qemu_nbd.start(path, sock, fmt="raw", read_only=True,
                         cache="writeback", aio="threads")
    try:
        with nbd_client.open(srv.address) as c:
            assert c.size == size
            buf = bytearray(size)
            c.read_into(buf, 0)
            return c.extents("zero"), bytes(buf)
    finally:
        srv.stop()


# Which images are used directly.

def test_usable(tmp_path):
    raw = make_file(tmp_path / "a.raw", MiB)
    assert rawfile.usable(raw, "raw")
    assert not rawfile.usable(raw, "qcow2")
    assert rawfile.usable(str(tmp_path / "new.raw"), "raw")
    assert not rawfile.usable(str(tmp_path), "raw")
    assert not rawfile.usable("/dev/null", "raw")


def test_create(tmp_path):
    path = str(tmp_path / "new.raw")
    with open(path, "wb") as f:
        f.write(b"old data")
    rawfile.create(path, 1000)
    # Rounded up to 512 bytes, as qemu-img create does; empty and sparse.
    assert os.path.getsize(path) == 1024
    assert os.stat(path).st_blocks == 0
    with open(path, "rb") as f:
        assert f.read() == bytes(1024)


# Agreement with qemu.

def test_same_as_qemu_nbd(tmp_path):
    size = 3 * MiB + 1000
    path = make_file(tmp_path / "img.raw", size, [
        (0, b"a" * 4 * KiB),
        (MiB, os.urandom(MiB)),
        (size - 100, b"z" * 100),
    ])
    virtual = 3 * MiB + 1024
    their_extents, their_data = qemu_extents_and_data(path, virtual)
    with rawfile.File(path, virtual) as f:
        ours = f.extents()
        buf = bytearray(virtual)
        f.read_into(buf, 0)
    assert bytes(buf) == their_data
    # qemu's extents may split differently; what reads as zero may not.
    assert _zero_map(ours, virtual) == _zero_map(their_extents, virtual)
    assert all(not e.hole for e in ours)


def _zero_map(found, size):
    """The zero flag of every 4 KiB block."""
    flags = []
    for e in found:
        flags += [e.zero] * (e.length // (4 * KiB))
    assert sum(e.length for e in found) == size
    return flags


def test_extents(tmp_path):
    path = make_file(tmp_path / "img.raw", 4 * MiB, [
        (MiB, b"x" * MiB),
    ])
    with rawfile.File(path, 5 * MiB) as f:
        assert f.extents() == [
            ext(0, MiB, True),
            ext(MiB, MiB, False),
            # The file's hole and the tail past its end, merged.
            ext(2 * MiB, 3 * MiB, True),
        ]
        assert f.extents(offset=MiB + 4096, length=MiB) == [
            ext(MiB + 4096, MiB - 4096, False),
            ext(2 * MiB, 4096, True),
        ]
        with pytest.raises(errors.Unsupported):
            f.extents("dirty")
        with pytest.raises(ValueError):
            f.extents("nope")


def test_extents_all_data(tmp_path):
    path = str(tmp_path / "img.raw")
    with open(path, "wb") as f:
        f.write(b"x" * MiB)
    with rawfile.File(path, MiB) as f:
        assert f.extents() == [ext(0, MiB, False)]


# Data through buffers.

def test_read_write(tmp_path):
    path = make_file(tmp_path / "img.raw", MiB)
    with rawfile.File(path, MiB + 512, read_only=False) as f:
        f.write(b"hello", 4096)
        buf = bytearray(10)
        f.read_into(buf, 4096 - 2)
        assert buf == b"\0\0hello\0\0\0"
        # Past the end of the file: zeros.
        buf = bytearray(b"\xff" * 1024)
        f.read_into(buf, MiB - 512)
        assert buf == bytes(1024)
        f.flush()
        with pytest.raises(ValueError):
            f.read_into(bytearray(1024), MiB)
        with pytest.raises(ValueError):
            f.write(b"x", -1)


def test_read_only(tmp_path):
    path = make_file(tmp_path / "img.raw", MiB)
    with rawfile.File(path, MiB) as f:
        with pytest.raises(OSError):
            f.write(b"x", 0)


def test_zero_punches_hole(tmp_path):
    data = os.urandom(2 * MiB)
    path = str(tmp_path / "img.raw")
    with open(path, "wb") as f:
        f.write(data)
    with rawfile.File(path, 2 * MiB, read_only=False) as f:
        f.zero(MiB, 512 * KiB, punch_hole=True)
        f.zero(0, 0)
        buf = bytearray(2 * MiB)
        f.read_into(buf, 0)
        assert f.extents() == [
            ext(0, 512 * KiB, False),
            ext(512 * KiB, MiB, True),
            ext(512 * KiB + MiB, 512 * KiB, False),
        ]
    expected = bytearray(data)
    expected[512 * KiB:512 * KiB + MiB] = bytes(MiB)
    assert buf == expected
    assert os.path.getsize(path) == 2 * MiB
    assert os.stat(path).st_blocks * 512 <= MiB + 64 * KiB


def test_closed(tmp_path):
    path = make_file(tmp_path / "img.raw", MiB)
    f = rawfile.File(path, MiB)
    f.close()
    f.close()
    with pytest.raises(ValueError):
        f.read_into(bytearray(512), 0)
    with pytest.raises(ValueError):
        f.extents()


# Data to and from sockets, not through Python.

class Reader(threading.Thread):
    """Read everything from a socket, slowly enough to fill it."""

    def __init__(self, sock):
        super().__init__(daemon=True)
        self.sock = sock
        self.data = bytearray()

    def run(self):
        while True:
            chunk = self.sock.recv(64 * KiB)
            if not chunk:
                break
            self.data += chunk


@pytest.fixture
def sockets():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_send(tmp_path, sockets):
    size = 20 * MiB + 512
    data = os.urandom(20 * MiB + 100)
    path = str(tmp_path / "img.raw")
    with open(path, "wb") as f:
        f.write(data)
    a, b = sockets
    # With a timeout, the socket is non-blocking: sendfile must wait.
    a.settimeout(10)
    reader = Reader(b)
    reader.start()
    progress = []
    begun = []
    with rawfile.File(path, size) as f:
        f.send(a, MiB, size - MiB, begin=lambda: begun.append(1),
               done=progress.append)
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert reader.data == data[MiB:] + bytes(412)
    assert begun == [1]
    assert sum(progress) == size - MiB
    assert len(progress) == 3


def test_send_timeout(tmp_path, sockets):
    path = make_file(tmp_path / "img.raw", 32 * MiB, [(0, b"x" * 32 * MiB)])
    a, b = sockets
    a.settimeout(0.2)
    # Nobody reads b: the socket buffer fills and sendfile waits.
    with rawfile.File(path, 32 * MiB) as f:
        with pytest.raises(TimeoutError):
            f.send(a, 0, 32 * MiB)


def test_receive(tmp_path, sockets):
    size = 20 * MiB
    path = make_file(tmp_path / "img.raw", size)
    data = os.urandom(12 * MiB)
    a, b = sockets
    b.settimeout(10)
    writer = threading.Thread(target=a.sendall, args=(data[5:],),
                              daemon=True)
    writer.start()
    progress = []
    with rawfile.File(path, size, read_only=False) as f:
        f.receive(b, MiB, len(data), prefix=data[:5], done=progress.append)
    writer.join(10)
    with open(path, "rb") as f:
        got = f.read()
    assert got == bytes(MiB) + data + bytes(size - MiB - len(data))
    assert sum(progress) == len(data)
    assert len(progress) == 2


def test_receive_short(tmp_path, sockets):
    path = make_file(tmp_path / "img.raw", 4 * MiB)
    a, b = sockets
    a.sendall(b"x" * 3000)
    a.close()
    progress = []
    with rawfile.File(path, 4 * MiB, read_only=False) as f:
        with pytest.raises(EOFError) as e:
            f.receive(b, 0, MiB, prefix=b"p" * 10, done=progress.append)
    assert e.value.args == (3010,)
    assert sum(progress) == 3010
    with open(path, "rb") as f:
        assert f.read(4096) == b"p" * 10 + b"x" * 3000 + bytes(1086)


def test_receive_timeout(tmp_path, sockets):
    path = make_file(tmp_path / "img.raw", MiB)
    a, b = sockets
    b.settimeout(0.2)
    a.sendall(b"x" * 100)
    with rawfile.File(path, MiB, read_only=False) as f:
        with pytest.raises(TimeoutError):
            f.receive(b, 0, MiB)


# The export.

def test_export_connections_are_independent(tmp_path):
    path = make_file(tmp_path / "img.raw", MiB)
    with rawfile.Export(path, MiB, read_only=False) as export:
        assert not export.started
        one = export.connect()
        two = export.connect_stream()
        assert export.started
        one.write(b"one", 0)
        one.close()
        # The other connection still works.
        two.write(b"two", 512)
        buf = bytearray(515)
        two.read_into(buf, 0)
        two.close()
    assert buf[:3] == b"one" and buf[512:] == b"two"


def test_qemu_img_agrees(tmp_path):
    # What we write is a raw image qemu reads as we do.
    path = str(tmp_path / "new.raw")
    rawfile.create(path, 2 * MiB)
    with rawfile.File(path, 2 * MiB, read_only=False) as f:
        f.write(b"x" * MiB, MiB)
    ref = make_file(tmp_path / "ref.raw", 2 * MiB, [(MiB, b"x" * MiB)])
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                    path, ref], check=True)


# File systems without sendfile or splice support (some FUSE file
# systems): the same bytes through a buffer.

def test_send_without_sendfile(tmp_path, sockets, monkeypatch):
    def no_sendfile(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    data = os.urandom(3 * MiB)
    path = str(tmp_path / "img.raw")
    with open(path, "wb") as f:
        f.write(data)
    a, b = sockets
    reader = Reader(b)
    reader.start()
    with rawfile.File(path, len(data)) as f:
        f.send(a, 0, len(data))
    a.shutdown(socket.SHUT_WR)
    reader.join(10)
    assert reader.data == data


def test_receive_without_file_splice(tmp_path, sockets, monkeypatch):
    real_splice = os.splice

    def socket_splice_only(src, dst, count, offset_src=None,
                           offset_dst=None, flags=0):
        if offset_dst is not None:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_splice(src, dst, count, offset_src, offset_dst, flags)

    monkeypatch.setattr(os, "splice", socket_splice_only)
    path = make_file(tmp_path / "img.raw", 4 * MiB)
    data = os.urandom(3 * MiB)
    a, b = sockets
    writer = threading.Thread(target=a.sendall, args=(data,), daemon=True)
    writer.start()
    with rawfile.File(path, 4 * MiB, read_only=False) as f:
        f.receive(b, MiB, len(data))
    writer.join(10)
    with open(path, "rb") as f:
        assert f.read() == bytes(MiB) + data
