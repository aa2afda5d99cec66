import errno
import os
import re

import pytest

from ovirt_imageio import errors
from ovirt_imageio.nbd import backend
from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import qemu_nbd
from ovirt_imageio.nbd import url

K = 1024
M = 1024**2


@pytest.fixture
def run_dir(sock_dir):
    return sock_dir


# nbd: URLs: someone else's export, used as it is.


@pytest.mark.parametrize("template", [
    "nbd:unix:{socket}",
    "nbd:unix:{socket}:exportname=",
    "nbd+unix:///?socket={socket}",
], ids=["legacy", "legacy-exportname", "uri"])
def test_nbd_url(template, make_image, qemu_nbd, run_dir):
    server = qemu_nbd(make_image(size=M, commands=("write -P 7 0 4k",)))
    b = backend.create(template.format(socket=server.socket),
                       run_dir=run_dir, read_only=False, shared=4)
    try:
        assert b.address == url.Address(socket=server.socket)
        assert b.server is None
        with b.open() as c:
            assert c.size == M
            assert c.read(4 * K, 0) == b"\x07" * 4 * K
    finally:
        b.close()
    # Not ours: closing the backend leaves the export running.
    assert server.alive
    assert os.listdir(run_dir) == [os.path.basename(server.socket)]


def test_nbd_url_tcp(nbdkit, run_dir):
    server = nbdkit("memory", "size=1M", tcp=True)
    u = f"nbd://{server.address.host}:{server.address.port}/"
    with backend.create(u, run_dir=run_dir, read_only=False, shared=1) as b:
        with b.open() as c:
            c.write(b"tcp", 0)
            assert c.read(3, 0) == b"tcp"


def test_open_returns_new_connections(make_image, qemu_nbd, run_dir):
    server = qemu_nbd(make_image(size=M))
    b = backend.create(f"nbd:unix:{server.socket}", run_dir=run_dir,
                       read_only=False, shared=4)
    with b.open() as c1, b.open() as c2:
        assert c1 is not c2
        c1.write(b"one", 0)
        c1.flush()
        assert c2.read(3, 0) == b"one"


def test_dirty(make_image, qemu_nbd, qemu_io, run_dir):
    path = make_image(fmt="qcow2", size=M, bitmaps=["b0"])
    qemu_io(path, "qcow2", "write -P 1 64k 64k")
    server = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    b = backend.create(f"nbd:unix:{server.socket}", run_dir=run_dir,
                       read_only=True, shared=1, dirty=True)
    with b.open() as c:
        dirty = [(e.start, e.length) for e in c.extents("dirty") if e.dirty]
    assert dirty == [(64 * K, 64 * K)]


def test_not_dirty(make_image, qemu_nbd, run_dir):
    path = make_image(fmt="qcow2", size=M, bitmaps=["b0"])
    server = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    b = backend.create(f"nbd:unix:{server.socket}", run_dir=run_dir,
                       read_only=True, shared=1)
    with b.open() as c:
        assert c.dirty_bitmap is None


def test_open_unreachable(sock_dir, run_dir):
    u = f"nbd:unix:{sock_dir}/missing.sock"
    b = backend.create(u, run_dir=run_dir, read_only=False, shared=1,
                       transfer_id="tr-1")
    for open_ in (b.open, b.open_stream):
        with pytest.raises(errors.ExportError) as e:
            open_()
        # What failed and why, never the address: it reaches clients.
        assert str(e.value) == ("Cannot connect to NBD export of transfer "
                                "tr-1: No such file or directory")
    assert isinstance(e.value.__cause__, client.Error)
    assert e.value.__cause__.errno == errno.ENOENT


@pytest.mark.parametrize("bad", [
    "",
    "http://host/x",
    "nbd:unix:",
    "nbd://host:port/",
    "nbds://host/x",
    "file:relative/path",
    "file://host/path",
    "file:///path?query",
    "file:///path#fragment",
])
def test_bad_url(bad, run_dir):
    with pytest.raises(ValueError) as e:
        backend.create(bad, run_dir=run_dir, read_only=False, shared=1)
    assert repr(bad) in str(e.value)
    assert os.listdir(run_dir) == []


# file: URLs: the daemon runs the export.


def test_file_url(make_image, run_dir, pid_alive):
    path = make_image(size=M, commands=("write -P 0x33 0 64k",))
    b = backend.create(f"file://{path}", run_dir=run_dir, read_only=False,
                       shared=4)
    try:
        server = b.server
        assert server.alive
        assert server.path == path
        assert b.address == server.address
        # A private random socket name, nothing taken from the ticket.
        assert os.path.dirname(b.address.socket) == run_dir
        assert re.fullmatch(r"[0-9a-f]{32}\.sock",
                            os.path.basename(b.address.socket))
        with b.open() as c:
            assert not c.read_only
            assert c.read(64 * K, 0) == b"\x33" * 64 * K
            c.write(b"\x44" * 4 * K, 4 * K)
            c.flush()
        with open(path, "rb") as f:
            f.seek(4 * K)
            assert f.read(4 * K) == b"\x44" * 4 * K
    finally:
        b.close()
    assert not pid_alive(server.pid)
    assert os.listdir(run_dir) == []
    assert server not in qemu_nbd.running()
    b.close()


def test_file_url_localhost(make_image, run_dir):
    path = make_image(size=M)
    with backend.create(f"file://localhost{path}", run_dir=run_dir,
                        read_only=True, shared=1) as b:
        assert b.server.path == path


def test_file_url_command_line(make_image, run_dir):
    path = make_image(size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=True,
                        shared=3) as b:
        with open(f"/proc/{b.server.pid}/cmdline", "rb") as f:
            args = f.read().decode().split("\0")
        assert "--format=raw" in args
        assert "--shared=3" in args
        assert "--read-only" in args
        assert "--persistent" in args


def test_file_url_read_only(make_image, run_dir):
    path = make_image(size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=True,
                        shared=1) as b:
        with b.open() as c:
            assert c.read_only
            with pytest.raises(client.Error):
                c.write(b"x", 0)


def test_file_url_qcow2_served_as_raw(make_image, run_dir):
    # The file's bytes as they are; a qcow2 header is not followed.
    path = make_image(fmt="qcow2", size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=True,
                        shared=1) as b:
        with b.open() as c:
            assert c.read(4, 0) == b"QFI\xfb"
            assert c.size < M


def test_file_url_dirty(make_image, run_dir):
    path = make_image(size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=True,
                        shared=1, dirty=True) as b:
        with b.open() as c:
            with pytest.raises(errors.Unsupported):
                c.extents("dirty")


def test_file_url_missing_file(tmp_path, run_dir, processes_with):
    # Accepted, as upstream does; the export starts once the file exists.
    path = str(tmp_path / "missing.raw")
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=False,
                        shared=1) as b:
        assert b.server is None
        assert b.error == f"Cannot export {path}: No such file or directory"
        assert os.listdir(run_dir) == []
        for open_ in (b.open, b.open_stream):
            with pytest.raises(errors.ExportError) as e:
                open_()
            assert str(e.value) == b.error
        assert processes_with(path) == []
        with open(path, "wb") as f:
            f.write(b"x" * 4 * K)
        with b.open() as c:
            assert c.read(4 * K, 0) == b"x" * 4 * K
        assert b.error is None
    assert processes_with(path) == []
    assert os.listdir(run_dir) == []


def test_file_url_restarts_dead_export(make_image, run_dir, wait_for,
                                       pid_alive):
    path = make_image(size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=False,
                        shared=2) as b:
        with b.open_stream() as s:
            assert b.serves(s)
            s.zero(4 * K, 0, punch_hole=False)
        with b.open() as c:
            c.write(b"y" * 4 * K, 0)
            c.flush()
        old = b.server
        os.kill(old.pid, 9)
        wait_for(lambda: not os.path.exists(f"/proc/{old.pid}"),
                 message="qemu-nbd reaped")
        assert b.error == f"qemu-nbd pid={old.pid} exited with code -9"
        # The next connection starts a new qemu-nbd on a new socket.
        with b.open() as c:
            assert c.read(4 * K, 0) == b"y" * 4 * K
            assert b.serves(c)
        assert b.server is not old
        assert b.server.alive
        assert b.error is None
        assert not os.path.exists(old.socket)
        with b.open_stream() as s:
            assert s.size == M
        new = b.server
    assert not pid_alive(new.pid)
    assert os.listdir(run_dir) == []


def test_file_url_restart_fails(make_image, run_dir, wait_for):
    path = make_image(size=M)
    with backend.create(f"file://{path}", run_dir=run_dir, read_only=False,
                        shared=1) as b:
        with b.open_stream() as s:
            pass
        os.unlink(path)
        os.kill(b.server.pid, 9)
        wait_for(lambda: not b.server.alive, message="qemu-nbd exited")
        assert not b.serves(s)
        with pytest.raises(errors.ExportError) as e:
            b.open_stream()
        message = f"Cannot export {path}: No such file or directory"
        assert str(e.value) == message
        assert b.error == message
        assert b.server is None
        assert os.listdir(run_dir) == []


def test_file_url_not_an_image(tmp_path, run_dir, processes_with):
    # A directory exists, but qemu-nbd cannot serve it.
    path = str(tmp_path / "dir")
    os.mkdir(path)
    with pytest.raises(errors.ExportError) as e:
        backend.create(f"file://{path}", run_dir=run_dir, read_only=False,
                       shared=1)
    assert path in str(e.value)
    assert os.listdir(run_dir) == []
    assert processes_with(path) == []


def test_file_url_bad_run_dir(make_image, tmp_path, processes_with):
    path = make_image(size=M)
    with pytest.raises(errors.ExportError):
        backend.create(f"file://{path}", run_dir=str(tmp_path / "missing"),
                       read_only=False, shared=1)
    assert processes_with(path) == []


def test_close_twice_without_server(run_dir):
    b = backend.create("nbd:unix:/no/such.sock", run_dir=run_dir,
                       read_only=False, shared=1)
    b.close()
    b.close()
    assert b.server is None
