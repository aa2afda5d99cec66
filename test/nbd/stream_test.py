import errno
import os
import socket
import threading

import pytest

from ovirt_imageio import errors
from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import extents
from ovirt_imageio.nbd import stream
from ovirt_imageio.nbd import url

K = 1024
M = 1024**2

COMMANDS = (
    "write -P 0x55 0 64k",
    "write -z 1M 64k",
    "write -P 0xaa 2M 128k",
)


def address(server):
    return url.Address(socket=server.socket)


class Reader:
    """The other end of a socketpair, read to the end in a thread."""

    def __init__(self, sock):
        self.sock = sock
        self.data = bytearray()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self):
        while True:
            chunk = self.sock.recv(M)
            if not chunk:
                break
            self.data.extend(chunk)

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()
        return bytes(self.data)


class Writer:
    """Send data into a socketpair end from a thread, then close it."""

    def __init__(self, sock, data):
        self.thread = threading.Thread(target=self._run, args=(sock, data))
        self.thread.start()

    def _run(self, sock, data):
        try:
            sock.sendall(data)
        except OSError:
            pass
        finally:
            sock.close()

    def join(self):
        self.thread.join(30)
        assert not self.thread.is_alive()


def send_all(s, offset, length, **kw):
    """Run s.send() into a socketpair; return the bytes received."""
    ours, theirs = socket.socketpair()
    reader = Reader(theirs)
    try:
        s.send(ours, offset, length, **kw)
    finally:
        ours.close()
    data = reader.join()
    theirs.close()
    return data


def file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture(params=["raw", "qcow2"])
def image(request, make_image):
    fmt = request.param
    return make_image(fmt=fmt, size=4 * M, commands=COMMANDS), fmt


def test_handshake(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt)
    with stream.open(address(srv)) as with_stream:
        assert with_stream.size == 4 * M
        assert not with_stream.read_only
        assert with_stream.can_zero
        assert with_stream.can_flush
        assert with_stream.has_base_allocation
        assert with_stream.maximum_block_size == 32 * M


def test_read_only_export(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    with stream.open(address(srv)) as s:
        assert s.read_only


def test_connect_refused(tmp_path):
    missing = url.Address(socket=str(tmp_path / "missing.sock"))
    with pytest.raises(stream.Error) as e:
        stream.open(missing)
    assert e.value.op == "connect"
    assert e.value.errno == errno.ENOENT


def test_unknown_export(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    with pytest.raises(stream.Error) as e:
        stream.open(url.Address(socket=srv.socket, export="no-such-export"))
    assert e.value.op == "connect"
    assert "no-such-export" in str(e.value)


def test_send_whole_image(qemu_nbd, make_image):
    data = os.urandom(3 * M + 4096)
    path = make_image(size=8 * M)
    with open(path, "r+b") as f:
        f.seek(M)
        f.write(data)
    srv = qemu_nbd(path, read_only=True)
    s = stream.open(address(srv))
    begun = []
    done = []
    try:
        got = send_all(s, 0, 8 * M, begin=lambda: begun.append(True),
                       done=done.append)
        assert not s.broken
        # The connection is still usable.
        assert send_all(s, M, 10) == data[:10]
    finally:
        s.close()
    assert got == file_bytes(path, 0, 8 * M)
    assert begun == [True]
    # One piece per request.
    assert done == [stream.MAX_REQUEST] * (8 * M // stream.MAX_REQUEST)


def test_send_unaligned_ranges(qemu_nbd, make_image):
    path = make_image(size=4 * M)
    with open(path, "r+b") as f:
        f.write(os.urandom(4 * M))
    srv = qemu_nbd(path, read_only=True)
    with stream.open(address(srv)) as s:
        for offset, length in [(1, 1), (4095, 3), (M - 7, 2 * M + 11),
                               (4 * M - 1, 1)]:
            assert send_all(s, offset, length) == file_bytes(
                path, offset, length)


def test_send_to_chunks(qemu_nbd, make_image, monkeypatch):
    # TLS connections: each piece is given to write() in chunks of at most
    # TLS_CHUNK bytes as they arrive, not as one piece once all arrived.
    monkeypatch.setattr(stream, "TLS_CHUNK", 256 * K)
    data = os.urandom(2 * M + 4097)
    path = make_image(size=4 * M)
    with open(path, "r+b") as f:
        f.seek(4095)
        f.write(data)
    srv = qemu_nbd(path, read_only=True)
    buf = bytearray(M)
    events = []

    def write(chunk):
        # The chunk is a view of buf, reused: copy it.
        events.append(("write", bytes(chunk)))

    with stream.open(address(srv)) as s:
        s.send_to(write, buf, 4095, len(data),
                  begin=lambda: events.append(("begin",)),
                  done=lambda n: events.append(("done", n)))
        assert not s.broken
        # The stream is still usable.
        got = []
        s.send_to(lambda c: got.append(bytes(c)), buf, 4095, 10)
        assert got == [data[:10]]
    assert events[0] == ("begin",)
    writes = [e[1] for e in events if e[0] == "write"]
    assert b"".join(writes) == data
    assert max(len(w) for w in writes) == stream.TLS_CHUNK
    # Pieces of the buffer's size, done after each.
    done = [e[1] for e in events if e[0] == "done"]
    assert done == [M, M, 4097]
    assert events[-1] == ("done", 4097)
    assert len(writes) == 2 * (M // stream.TLS_CHUNK) + 1


def test_send_simple_replies(nbdkit):
    # A server without structured replies: simple replies, no extents.
    srv = nbdkit("pattern", "size=10M", options=["--no-sr"])
    with stream.open(srv.address) as s:
        assert not s.has_base_allocation
        got = send_all(s, 8, 16 * K)
        assert s.extents("zero", 0, M) == [
            extents.ZeroExtent(0, M, zero=False, hole=False)]
    # nbdkit's pattern: each 8 bytes hold their big-endian offset.
    assert got[:8] == (8).to_bytes(8, "big")
    assert got[-8:] == (16 * K).to_bytes(8, "big")


def test_send_error_before_begin(nbdkit):
    srv = nbdkit("memory", "size=4M", "error-pread=EIO",
                 "error-pread-rate=100%", filters=["error"])
    s = stream.open(srv.address)
    begun = []
    try:
        with pytest.raises(stream.Error) as e:
            send_all(s, 0, M, begin=lambda: begun.append(True))
        assert e.value.op == "read"
        assert e.value.errno == errno.EIO
        assert begun == []
    finally:
        s.close()


def test_send_past_end(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    with stream.open(address(srv)) as s:
        with pytest.raises(stream.Error) as e:
            send_all(s, 4 * M - 10, 20)
        assert e.value.errno == errno.EINVAL


def test_send_peer_gone(qemu_nbd, make_image):
    path = make_image(size=32 * M)
    srv = qemu_nbd(path, read_only=True)
    s = stream.open(address(srv))
    ours, theirs = socket.socketpair()
    theirs.close()
    try:
        with pytest.raises(OSError):
            s.send(ours, 0, 32 * M)
        # Payload was left in the NBD socket: the stream is done for.
        assert s.broken
    finally:
        s.close()
        ours.close()


def test_send_timeout(qemu_nbd, make_image):
    path = make_image(size=32 * M)
    srv = qemu_nbd(path, read_only=True)
    s = stream.open(address(srv))
    ours, theirs = socket.socketpair()
    # Nobody reads theirs: the send must give up after the timeout.
    ours.settimeout(0.2)
    try:
        with pytest.raises(TimeoutError):
            s.send(ours, 0, 32 * M)
        assert s.broken
    finally:
        s.close()
        ours.close()
        theirs.close()


def test_receive(qemu_nbd, make_image, qemu_io):
    path = make_image(fmt="qcow2", size=8 * M)
    srv = qemu_nbd(path, fmt="qcow2")
    data = os.urandom(3 * M + 100)
    ours, theirs = socket.socketpair()
    # 100 body bytes were buffered by the HTTP layer; the rest comes from
    # the socket.
    writer = Writer(theirs, data[100:])
    s = stream.open(address(srv))
    done = []
    try:
        s.receive(ours, M + 5, len(data), prefix=data[:100],
                  done=done.append)
        s.flush()
        assert send_all(s, M + 5, len(data)) == data
        assert not s.broken
    finally:
        s.close()
        ours.close()
    writer.join()
    assert sum(done) == len(data)


def test_receive_short_body(qemu_nbd, make_image):
    # The body ends inside the second piece: the first is written and
    # acknowledged, the second is never executed, the stream is broken.
    path = make_image(size=3 * stream.MAX_WRITE)
    srv = qemu_nbd(path)
    data = os.urandom(stream.MAX_WRITE + 3 * stream.PIPE_SIZE + 1000)
    ours, theirs = socket.socketpair()
    writer = Writer(theirs, data)
    try:
        with stream.open(address(srv)) as s:
            with pytest.raises(EOFError) as e:
                s.receive(ours, 0, 2 * stream.MAX_WRITE, prefix=b"")
            assert e.value.args == (len(data),)
            assert s.broken
    finally:
        ours.close()
    writer.join()
    with stream.open(address(srv)) as s:
        got = send_all(s, 0, 2 * stream.MAX_WRITE)
    assert got == data[:stream.MAX_WRITE] + bytes(stream.MAX_WRITE)


def test_receive_short_first_piece(qemu_nbd, make_image):
    # The body ends before the first pipe-full: no request was sent, the
    # connection stays usable.
    path = make_image(size=4 * M)
    srv = qemu_nbd(path)
    ours, theirs = socket.socketpair()
    writer = Writer(theirs, b"x" * 1000)
    with stream.open(address(srv)) as s:
        with pytest.raises(EOFError) as e:
            s.receive(ours, 0, M, prefix=b"abc")
        assert e.value.args == (1003,)
        assert not s.broken
        assert send_all(s, 0, 1003) == bytes(1003)
    ours.close()
    writer.join()


def test_receive_write_error(nbdkit):
    srv = nbdkit("memory", "size=4M", "error-pwrite=ENOSPC",
                 "error-pwrite-rate=100%", filters=["error"])
    data = os.urandom(M)
    ours, theirs = socket.socketpair()
    writer = Writer(theirs, data)
    with stream.open(srv.address) as s:
        with pytest.raises(stream.Error) as e:
            s.receive(ours, 0, len(data))
        assert e.value.op == "write"
        assert e.value.errno == errno.ENOSPC
        ours.close()
    writer.join()


def test_zero_and_extents(qemu_nbd, make_image, qemu_img_map):
    path = make_image(size=4 * M, commands=["write -P 0x55 0 4M"])
    srv = qemu_nbd(path)
    with stream.open(address(srv)) as s:
        s.zero(M, M)
        s.zero(64 * K, 3 * M, punch_hole=True)
        s.flush()
        found = s.extents("zero", 0, 4 * M)
        assert send_all(s, M - 1, 2) == b"\x55\x00"
    expected = extents.merge([
        extents.ZeroExtent(e["start"], e["length"], zero=e["zero"],
                           hole=not e["data"])
        for e in qemu_img_map(path, "raw")])
    assert [(e.start, e.length, e.zero) for e in found] == [
        (e.start, e.length, e.zero) for e in expected]
    assert [(e.start, e.length, e.zero) for e in found][:2] == [
        (0, M, False), (M, M, True)]


def test_extents_clipped(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    with stream.open(address(srv)) as s:
        assert s.has_allocation_depth
        # With allocation depth, an unallocated qcow2 cluster is a hole;
        # a raw file has no holes.
        hole = fmt == "qcow2"
        assert s.extents("zero", 64 * K - 10, 20) == [
            extents.ZeroExtent(64 * K - 10, 10, zero=False, hole=False),
            extents.ZeroExtent(64 * K, 10, zero=True, hole=hole)]
        assert s.extents("zero", 4 * M, 10) == []
        with pytest.raises(errors.Unsupported):
            s.extents("dirty")
        with pytest.raises(ValueError):
            s.extents("nope")


@pytest.mark.parametrize("allocation_depth", [True, False])
def test_zero_extents_as_libnbd(qemu_nbd, image, allocation_depth):
    # The daemon's /extents comes from the Stream now: it must answer as
    # the libnbd client did.
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True,
                   allocation_depth=allocation_depth)
    with stream.open(address(srv)) as s, client.open(address(srv)) as c:
        assert s.has_allocation_depth == c.has_allocation_depth
        for offset, length in [(0, None), (64 * K - 10, 2 * M),
                               (M + 4 * K, 5)]:
            assert s.extents("zero", offset, length) == c.extents(
                "zero", offset, length)


def test_dirty_extents_as_libnbd(qemu_nbd, make_image, qemu_io):
    path = make_image(fmt="qcow2", size=4 * M, bitmaps=["b0"],
                      commands=["write -P 1 0 1M"])
    qemu_io(path, "qcow2", "write -P 2 512k 64k", "write -z 3M 64k")
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    with stream.open(address(srv), dirty=True) as s, \
            client.open(address(srv), dirty=True) as c:
        assert s.dirty_bitmap == "b0"
        found = s.extents("dirty")
        assert found == c.extents("dirty")
        assert s.extents("zero") == c.extents("zero")
        # Data still flows on the same connection.
        assert send_all(s, 512 * K, 4) == b"\x02" * 4
    D = extents.DirtyExtent
    assert found == [D(0, M, dirty=True, zero=False),
                     D(M, 2 * M, dirty=False, zero=True),
                     D(3 * M, 64 * K, dirty=True, zero=True),
                     D(3 * M + 64 * K, M - 64 * K, dirty=False, zero=True)]


def test_dirty_without_bitmap(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    with stream.open(address(srv), dirty=True) as s:
        assert s.dirty_bitmap is None
        with pytest.raises(errors.Unsupported):
            s.extents("dirty")
        assert s.extents("zero") == s.extents("zero", 0, 4 * M)


def test_read_into(qemu_nbd, make_image):
    data = os.urandom(3 * M + 4096)
    path = make_image(size=4 * M)
    with open(path, "r+b") as f:
        f.write(data)
    srv = qemu_nbd(path)
    with stream.open(address(srv)) as s:
        # Larger than one request (the stream's maximum is 8 MiB, but the
        # server's may be less), and unaligned.
        buf = bytearray(3 * M + 100)
        s.read_into(buf, 1000)
        assert buf == data[1000:1000 + len(buf)]
        view = memoryview(bytearray(10))
        s.read_into(view[2:7], 5)
        assert bytes(view) == b"\0\0" + data[5:10] + b"\0\0\0"
        with pytest.raises(TypeError):
            s.read_into(b"immutable", 0)
        # The stream is still usable.
        assert send_all(s, 0, 4) == data[:4]


def test_write_zeros_without_write_zeroes(nbdkit):
    # nbdkit's nozero filter hides NBD_CMD_WRITE_ZEROES: zeros are sent.
    srv = nbdkit("pattern", "size=4M", filters=["cow", "nozero"])
    with stream.open(srv.address) as s:
        assert not s.can_zero
        s.zero(2 * M + 3, 5)
        assert send_all(s, 0, 2 * M + 16)[5:] == bytes(2 * M + 3) + (
            (2 * M + 8).to_bytes(8, "big"))


def test_close_twice(qemu_nbd, image):
    path, fmt = image
    srv = qemu_nbd(path, fmt=fmt, read_only=True)
    s = stream.open(address(srv))
    s.close()
    s.close()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        with pytest.raises(ValueError, match="closed"):
            s.send(ours, 0, 10)
    with pytest.raises(ValueError, match="closed"):
        s.flush()


class TrickleWriter(Writer):
    """Send data in small pieces: each becomes its own socket buffer."""

    def _run(self, sock, data):
        try:
            for i in range(0, len(data), 100):
                sock.sendall(data[i:i + 100])
        except OSError:
            pass
        finally:
            sock.close()


def test_receive_small_pieces(qemu_nbd, make_image):
    # A pipe holds pages, not bytes: 100 byte pieces fill its slots long
    # before its byte capacity, and receive() must not wait for more.
    path = make_image(size=8 * M)
    srv = qemu_nbd(path)
    data = os.urandom(2 * stream.PIPE_SIZE + 12345)
    ours, theirs = socket.socketpair()
    writer = TrickleWriter(theirs, data)
    s = stream.open(address(srv))
    done = []
    try:
        s.receive(ours, 7, len(data), done=done.append)
        assert send_all(s, 7, len(data)) == data
    finally:
        s.close()
        ours.close()
    writer.join()
    assert sum(done) == len(data)


# A hung server: timeouts and interrupts.

def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_handshake_timeout(nbdkit):
    # The server accepts and never finishes the handshake.
    srv = nbdkit("memory", "size=1M", "delay-open=1000", filters=["delay"])
    with pytest.raises(stream.Error) as e:
        stream.open(address(srv), timeout=0.5)
    assert e.value.op == "connect"
    assert e.value.errno == errno.ETIMEDOUT
    assert "0.5 seconds" in str(e.value)


def test_send_nbd_timeout(nbdkit):
    srv = nbdkit("memory", "size=1M", "delay-read=1000", filters=["delay"])
    s = stream.open(address(srv), timeout=0.5)
    ours, theirs = socket.socketpair()
    try:
        with pytest.raises(stream.Error) as e:
            s.send(ours, 0, 64 * K)
        assert e.value.op == "read"
        assert e.value.errno == errno.ETIMEDOUT
        assert "did not respond" in str(e.value)
        assert s.broken
    finally:
        s.close()
        ours.close()
        theirs.close()


def test_send_to_nbd_timeout(nbdkit):
    srv = nbdkit("memory", "size=1M", "delay-read=1000", filters=["delay"])
    s = stream.open(address(srv), timeout=0.5)
    try:
        with pytest.raises(stream.Error) as e:
            s.send_to(lambda data: None, bytearray(64 * K), 0, 64 * K)
        assert e.value.op == "read"
        assert e.value.errno == errno.ETIMEDOUT
        assert s.broken
    finally:
        s.close()


def test_receive_nbd_timeout(nbdkit):
    srv = nbdkit("memory", "size=1M", "delay-write=1000", filters=["delay"])
    s = stream.open(address(srv), timeout=0.5)
    ours, theirs = socket.socketpair()
    writer = Writer(theirs, b"x" * 64 * K)
    try:
        with pytest.raises(stream.Error) as e:
            s.receive(ours, 0, 64 * K)
        assert e.value.op == "write"
        assert e.value.errno == errno.ETIMEDOUT
        assert s.broken
    finally:
        s.close()
        ours.close()
        writer.join()


@pytest.mark.parametrize("call", ["send", "send_to", "receive", "zero",
                                  "extents"])
def test_interrupt_blocked_io(nbdkit, call):
    srv = nbdkit("memory", "size=1M", "delay-read=1000",
                 "delay-write=1000", "delay-zero=1000",
                 "delay-extents=1000", filters=["delay"])
    interrupt = stream.Interrupt()
    s = stream.open(address(srv), interrupt=interrupt)
    ours, theirs = socket.socketpair()
    writer = Writer(theirs, b"x" * 64 * K) if call == "receive" else None
    failed = []

    def run():
        try:
            if call == "send":
                s.send(ours, 0, 64 * K)
            elif call == "send_to":
                s.send_to(lambda data: None, bytearray(64 * K), 0, 64 * K)
            elif call == "receive":
                s.receive(ours, 0, 64 * K)
            elif call == "zero":
                s.zero(4 * K, 0)
            else:
                s.extents("zero")
        except BaseException as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        # The thread is blocked for 1000 s unless interrupted.
        t.join(0.2)
        assert t.is_alive()
        interrupt.fire()
        t.join(10)
        assert not t.is_alive()
        assert len(failed) == 1
        assert isinstance(failed[0], stream.Error)
        assert failed[0].errno == errno.ECANCELED
        assert "interrupted" in str(failed[0])
    finally:
        s.close()
        ours.close()
        if writer:
            writer.join()


def test_interrupted_before_open(nbdkit):
    srv = nbdkit("memory", "size=1M")
    interrupt = stream.Interrupt()
    interrupt.fire()
    before = open_fds()
    with pytest.raises(stream.Error) as e:
        stream.open(address(srv), interrupt=interrupt)
    assert e.value.errno == errno.ECANCELED
    assert open_fds() == before


def test_interrupt_handshake(nbdkit):
    srv = nbdkit("memory", "size=1M", "delay-open=1000", filters=["delay"])
    interrupt = stream.Interrupt()
    before = open_fds()
    failed = []

    def run():
        try:
            stream.open(address(srv), interrupt=interrupt)
        except stream.Error as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    interrupt.fire()
    t.join(10)
    assert not t.is_alive()
    assert failed[0].errno == errno.ECANCELED
    assert open_fds() == before


def test_close_releases_fds(nbdkit):
    srv = nbdkit("memory", "size=1M")
    interrupt = stream.Interrupt()
    before = open_fds()
    s = stream.open(address(srv), interrupt=interrupt, timeout=5)
    ours, theirs = socket.socketpair()
    s.send(ours, 0, 4 * K)
    s.close()
    ours.close()
    theirs.close()
    assert open_fds() == before
    # Firing after close touches nothing.
    interrupt.fire()


def test_extents_fragmented_as_libnbd(qemu_nbd, tmp_path):
    # 20480 extents in one block status reply: 160 KiB of base:allocation
    # entries, more than the stream reads for a reply header at once.
    path = str(tmp_path / "fragmented.raw")
    with open(path, "wb") as f:
        f.truncate(80 * M)
        for offset in range(0, 80 * M, 8 * K):
            os.pwrite(f.fileno(), b"x" * (4 * K), offset)
    srv = qemu_nbd(path, read_only=True)
    with stream.open(address(srv)) as s, client.open(address(srv)) as c:
        found = s.extents("zero")
        assert len(found) == 20480
        assert found == c.extents("zero")
        assert send_all(s, 4 * K - 1, 2) == b"x\0"


def test_extents_many_windows(qemu_nbd, make_image):
    # An empty 1 TiB qcow2: 256 block status windows, 8 in flight.
    path = make_image(fmt="qcow2", size=1024**4)
    srv = qemu_nbd(path, fmt="qcow2", read_only=True)
    with stream.open(address(srv)) as s, client.open(address(srv)) as c:
        found = s.extents("zero")
        assert found == c.extents("zero")
        assert found == [extents.ZeroExtent(0, 1024**4, zero=True,
                                            hole=True)]
        # The connection is still in step.
        assert send_all(s, 0, 4) == b"\0" * 4
        assert s.extents("zero", 5 * 1024**3, 10) == [
            extents.ZeroExtent(5 * 1024**3, 10, zero=True, hole=True)]
