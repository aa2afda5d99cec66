"""
The transfer pipeline: planning (pure, tables), and run() with in-memory
images: errors, stopping, threads, progress.
"""

import threading
import time

import pytest

from ovirt_imageio import errors
from ovirt_imageio.client import transfer
from ovirt_imageio.nbd.extents import DirtyExtent, ZeroExtent

MiB = 1024**2
R = transfer.Request
COPY, ZERO, SKIP = transfer.COPY, transfer.ZERO, transfer.SKIP


def Z(start, length, zero=False, hole=False):
    return ZeroExtent(start, length, zero, hole)


# Planning

@pytest.mark.parametrize("zero,hole,expected", [
    (True, True, [R(COPY, 0, 10), R(ZERO, 10, 30), R(COPY, 40, 10)]),
    (True, False, [R(COPY, 0, 10), R(ZERO, 10, 10), R(SKIP, 20, 20),
                   R(COPY, 40, 10)]),
    (False, True, [R(COPY, 0, 10), R(SKIP, 10, 30), R(COPY, 40, 10)]),
], ids=["zero-holes", "keep-holes", "skip-zeros"])
def test_plan_zero(zero, hole, expected):
    found = [Z(0, 10), Z(10, 10, zero=True), Z(20, 20, zero=True, hole=True),
             Z(40, 10)]
    assert transfer.plan_zero(found, zero=zero, hole=hole) == expected


def test_plan_zero_merges():
    found = [Z(0, 10), Z(10, 10, zero=True, hole=True), Z(20, 5, zero=True)]
    assert transfer.plan_zero(found) == [R(COPY, 0, 10), R(ZERO, 10, 15)]


def test_plan_dirty():
    found = [DirtyExtent(0, 10, dirty=False, zero=False),
             DirtyExtent(10, 10, dirty=True, zero=False),
             DirtyExtent(20, 10, dirty=True, zero=True),
             DirtyExtent(30, 10, dirty=False, zero=True)]
    assert transfer.plan_dirty(found) == [
        R(SKIP, 0, 10), R(COPY, 10, 10), R(ZERO, 20, 10), R(SKIP, 30, 10)]


@pytest.mark.parametrize("requests,dst,expected", [
    # All zero on the destination: nothing to zero.
    ([R(ZERO, 0, 100)], [Z(0, 100, zero=True)], [R(SKIP, 0, 100)]),
    # No zeros on the destination.
    ([R(ZERO, 0, 100)], [Z(0, 100)], [R(ZERO, 0, 100)]),
    # Partly.
    ([R(ZERO, 5, 20)], [Z(0, 10, zero=True), Z(10, 10),
                        Z(20, 30, zero=True)],
     [R(SKIP, 5, 5), R(ZERO, 10, 10), R(SKIP, 20, 5)]),
    # Copies are never skipped.
    ([R(COPY, 0, 10), R(ZERO, 10, 10)], [Z(0, 100, zero=True)],
     [R(COPY, 0, 10), R(SKIP, 10, 10)]),
    # Past the destination's extents: zero (the server will say why not).
    ([R(ZERO, 50, 100)], [Z(0, 100, zero=True)],
     [R(SKIP, 50, 50), R(ZERO, 100, 50)]),
    # One destination zero extent spanning several requests.
    ([R(ZERO, 0, 10), R(COPY, 10, 10), R(ZERO, 20, 10)],
     [Z(0, 25, zero=True), Z(25, 5)],
     [R(SKIP, 0, 10), R(COPY, 10, 10), R(SKIP, 20, 5), R(ZERO, 25, 5)]),
], ids=["all-zero", "no-zero", "partly", "copies", "past-end", "spanning"])
def test_skip_zeroed(requests, dst, expected):
    assert transfer.skip_zeroed(requests, dst) == expected


def test_split():
    requests = [R(COPY, 0, 25), R(ZERO, 25, 7), R(SKIP, 32, 100)]
    assert transfer.split(requests, max_copy=10, max_zero=5) == [
        R(COPY, 0, 10), R(COPY, 10, 10), R(COPY, 20, 5),
        R(ZERO, 25, 5), R(ZERO, 30, 2), R(SKIP, 32, 100)]


def test_split_defaults():
    tib = 1024**4
    requests = transfer.split([R(COPY, 0, 300 * MiB), R(ZERO, 0, tib)])
    lengths = [r.length for r in requests[:3]]
    assert lengths == [128 * MiB, 128 * MiB, 44 * MiB]
    assert len(requests) == 3 + 1024


# Zeros in received data

K64 = 64 * 1024


@pytest.mark.parametrize("data,offset,block,expected", [
    (bytes(10), 0, 4, [(0, 10, True)]),
    (b"x" * 10, 0, 4, [(0, 10, False)]),
    # Blocks are aligned in the image, not in the buffer.
    (bytes(6) + b"x" + bytes(5), 3, 4,
     [(3, 5, True), (8, 4, False), (12, 3, True)]),
    (b"\0\0\0x" + bytes(8), 0, 4, [(0, 4, False), (4, 8, True)]),
    # One non-zero byte makes its block data, at either end; runs of
    # blocks alike are merged.
    (bytes(4) + b"\1" + bytes(6) + b"\1", 0, 4,
     [(0, 4, True), (4, 8, False)]),
    (b"", 0, 4, []),
    # The default block: 64 KiB.
    (bytes(K64) + b"x" + bytes(2 * K64 - 1), 0, transfer.ZERO_BLOCK,
     [(0, K64, True), (K64, K64, False), (2 * K64, K64, True)]),
], ids=["zeros", "data", "unaligned", "data-first", "one-byte",
        "empty", "default-block"])
def test_zero_runs(data, offset, block, expected):
    runs = transfer.zero_runs(data, offset, block)
    # Any buffer: bytes, a bytearray's memoryview.
    assert transfer.zero_runs(memoryview(bytearray(data)), offset,
                              block) == runs
    assert [(a, b, bool(c)) for a, b, c in runs] == [
        (a, b, c) for a, b, c in expected]


@pytest.mark.parametrize("zero,calls", [
    (False, [("write", K64)]),
    (True, [("zero", 0), ("write", K64), ("zero", 2 * K64)]),
], ids=["skip", "zero"])
def test_sparse_writes_data_blocks_only(zero, calls):
    dst = Memory(b"\xff" * 4 * K64)
    piece = bytes(K64) + b"x" * K64 + bytes(2 * K64)
    transfer._Sparse(dst, zero).write(memoryview(piece), 0)
    assert dst.calls == calls
    expected = (bytes(K64) if zero else b"\xff" * K64) + b"x" * K64
    expected += bytes(2 * K64) if zero else b"\xff" * 2 * K64
    assert dst.data == expected


# Uploads that find zeros in the data (sources without extents).

class ZeroAware:
    """A destination whose extents say where it reads zeros."""

    can_extents = True

    def __init__(self, image, extents):
        self.image = image
        self._extents = extents

    def extents(self, context="zero"):
        return self._extents

    def __getattr__(self, name):
        return getattr(self.image, name)


def test_zeroing():
    dst = ZeroAware(None, [Z(0, 2 * K64, zero=True), Z(2 * K64, K64),
                           Z(3 * K64, K64, zero=True)])
    z = transfer._Zeroing(dst, True)
    assert not z.needed(0, K64)
    assert not z.needed(K64, K64)
    assert z.needed(K64, 2 * K64)
    assert z.needed(2 * K64, K64)
    assert not z.needed(3 * K64, K64)
    assert z.needed(4 * K64, K64)
    assert not transfer._Zeroing(dst, False).needed(2 * K64, K64)


@pytest.mark.parametrize("zero,calls", [
    (False, [("write", K64), ("write", 3 * K64), ("flush", 0)]),
    (True, [("zero", 0), ("write", K64), ("zero", 2 * K64),
            ("write", 3 * K64), ("flush", 0)]),
], ids=["skip", "zero"])
def test_upload_stream(zero, calls):
    data = bytes(K64) + b"x" * K64 + bytes(K64) + b"y" * 100
    dst = Memory(b"\xff" * len(data))
    src = memoryview(data)
    pos = 0
    seen = bytearray()

    def read_into(buf):
        nonlocal pos
        n = min(len(buf), 1000, len(data) - pos)
        buf[:n] = src[pos:pos + n]
        pos += n
        return n

    progress = Progress()
    transfer.upload_stream(read_into, len(data), dst, buffer_size=K64,
                           zero=zero, progress=progress, hasher=seen.extend)
    assert dst.calls == calls
    assert bytes(seen) == data
    assert progress.size == progress.done == len(data)
    if zero:
        assert dst.data == data


def test_upload_stream_ends_early():
    dst = Memory(bytes(3 * K64))
    with pytest.raises(transfer.TransferError) as e:
        transfer.upload_stream(lambda buf: 0, 3 * K64, dst, buffer_size=K64)
    assert "ended at 0" in str(e.value)


def test_copy_sparse_reads_pieces():
    data = b"a" * K64 + bytes(2 * K64) + b"b" * K64
    src = Memory(data)
    dst = Memory(b"\xff" * len(data))
    w = transfer._Worker(src, dst, K64, owned=())
    reported = []
    copy = transfer._copy_sparse(transfer._Zeroing(dst, True))
    copy(w, R(COPY, 0, len(data)), reported.append)
    assert dst.data == data
    assert src.calls == [("read", i * K64) for i in range(4)]
    assert dst.calls == [("write", 0), ("zero", K64), ("zero", 2 * K64),
                         ("write", 3 * K64)]
    assert reported == [K64] * 4


# run() with in-memory images

class Memory:
    """An image in memory, with the calls it got."""

    def __init__(self, data, fail=None, delay=0):
        self.data = bytearray(data)
        self.size = len(data)
        self.fail = fail
        self.delay = delay
        self.calls = []
        self.closed = False

    def read_into(self, buf, offset):
        self._check("read", offset)
        buf[:] = self.data[offset:offset + len(buf)]

    def write(self, buf, offset):
        self._check("write", offset)
        self.data[offset:offset + len(buf)] = buf

    def zero(self, length, offset, punch_hole=False):
        self._check("zero", offset)
        self.data[offset:offset + length] = bytes(length)

    def flush(self):
        self.calls.append(("flush", 0))

    def close(self):
        self.closed = True

    def _check(self, op, offset):
        self.calls.append((op, offset))
        if self.delay:
            time.sleep(self.delay)
        if self.fail and self.fail(op, offset):
            raise errors.PeerError(500, f"{op} failed at {offset}")


def copy(src, dsts, requests, max_workers=4, progress=None, buf=4096):
    """Copy with one destination image per worker (a list)."""

    def open_worker(index):
        return transfer._Worker(src, dsts[index], buf, owned=(dsts[index],))

    def do_copy(w, req, report):
        view = memoryview(w.buf)
        pos, end = req.start, req.start + req.length
        while pos < end:
            n = min(len(view), end - pos)
            w.src.read_into(view[:n], pos)
            w.dst.write(view[:n], pos)
            pos += n
            report(n)

    transfer.run(requests, open_worker, max_workers, progress=progress,
                 name="test", copy_op="write", copy=do_copy,
                 zero=lambda w, req: w.dst.zero(req.length, req.start))


class Progress:
    def __init__(self):
        self.size = None
        self.done = 0

    def update(self, n):
        self.done += n


def test_run_copies():
    # Slow reads, so that every worker gets requests.
    src = Memory(bytes(range(256)) * 4096, delay=0.0005)
    size = src.size
    shared = bytearray(b"\xff" * size)
    dsts = [Memory(b"") for _ in range(4)]
    for d in dsts:
        d.data = shared
    requests = transfer.split(
        [R(COPY, 0, 300_000), R(ZERO, 300_000, 100_000),
         R(SKIP, 400_000, 100_000), R(COPY, 500_000, size - 500_000)],
        max_copy=50_000, max_zero=30_000)
    progress = Progress()
    copy(src, dsts, requests, progress=progress)
    assert shared[:300_000] == src.data[:300_000]
    assert shared[300_000:400_000] == bytes(100_000)
    assert shared[400_000:500_000] == b"\xff" * 100_000
    assert shared[500_000:] == src.data[500_000:]
    assert progress.done == size
    # Every worker that wrote flushed, each closed.
    for d in dsts:
        assert d.closed
        assert (("flush", 0) in d.calls) == any(
            op != "flush" for op, _ in d.calls)
    assert sum(1 for d in dsts if d.calls) > 1


def test_run_fewer_workers_than_requests():
    src = Memory(b"x" * 100)
    dsts = [Memory(b"\0" * 100) for _ in range(4)]
    copy(src, dsts, [R(COPY, 0, 100)])
    assert dsts[0].data == src.data
    # Only one worker was started.
    assert not dsts[1].closed


def test_run_nothing_to_do():
    progress = Progress()
    copy(Memory(b""), [], [R(SKIP, 0, 1000)], progress=progress)
    assert progress.done == 1000


def test_run_error_stops_workers():
    # The request at 40960 fails; the others stop soon after.
    src = Memory(b"x" * 4096 * 1000, delay=0.001)
    shared = Memory(b"\0" * len(src.data))
    dsts = [Memory(b"") for _ in range(4)]
    for d in dsts:
        d.data = shared.data
        d.fail = lambda op, offset: offset == 40960
    requests = [R(COPY, i * 4096, 4096) for i in range(1000)]
    before = threading.active_count()
    with pytest.raises(transfer.TransferError) as e:
        copy(src, dsts, requests)
    err = e.value
    assert (err.name, err.op, err.offset, err.length) == (
        "test", "write", 40960, 4096)
    assert err.status == 500
    assert str(err) == ("test failed: write bytes 40960-45055: server "
                        "answered 500: write failed at 40960")
    assert isinstance(err.__cause__, errors.PeerError)
    # Far from everything was read, nothing flushed, all closed.
    assert len(src.calls) < 200
    assert all(d.closed for d in dsts)
    assert not any(("flush", 0) in d.calls for d in dsts)
    assert threading.active_count() == before


def test_run_zero_error():
    dsts = [Memory(b"\0" * 100, fail=lambda op, offset: op == "zero")]
    with pytest.raises(transfer.TransferError) as e:
        copy(Memory(b""), dsts, [R(ZERO, 10, 20)], max_workers=1)
    assert e.value.op == "zero"
    assert str(e.value).startswith("test failed: zero bytes 10-29: ")


def test_run_open_worker_fails():
    def open_worker(index):
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(transfer.TransferError) as e:
        transfer.run([R(COPY, 0, 10)], open_worker, 4, progress=None,
                     name="download", copy_op="read", copy=None, zero=None)
    assert e.value.op == "connect"
    assert str(e.value) == ("download failed: connect: "
                            "ConnectionRefusedError: [Errno 111] "
                            "Connection refused")


def test_run_flush_error():
    dst = Memory(b"\0" * 10)

    def fail_flush():
        raise errors.PeerError(403, "no")
    dst.flush = fail_flush
    with pytest.raises(transfer.TransferError) as e:
        copy(Memory(b"x" * 10), [dst], [R(COPY, 0, 10)], max_workers=1)
    assert e.value.op == "flush"
    assert e.value.status == 403


def test_run_progress_error_stops():
    class Broken(Progress):
        def update(self, n):
            raise RuntimeError("progress broke")

    src = Memory(b"x" * 100_000)
    with pytest.raises(transfer.TransferError) as e:
        copy(src, [Memory(b"\0" * 100_000)], [R(COPY, 0, 100_000)],
             max_workers=1, progress=Broken())
    assert "progress broke" in str(e.value)


def test_run_interrupted():
    # The caller's thread is interrupted (KeyboardInterrupt) while the
    # workers copy: they stop at their next piece and close.
    src = Memory(b"x" * 4096 * 1000, delay=0.002)
    dsts = [Memory(b"\0" * len(src.data)) for _ in range(2)]
    main = threading.get_ident()
    import signal
    timer = threading.Timer(
        0.1, lambda: signal.pthread_kill(main, signal.SIGINT))
    before = threading.active_count()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            copy(src, dsts, [R(COPY, 0, len(src.data))], max_workers=2)
    finally:
        timer.cancel()
        timer.join()
    assert len(src.calls) < 900
    assert all(d.closed for d in dsts if d.calls)
    assert threading.active_count() == before


# download()

class Remote(Memory):
    """A remote image: Memory with zero extents, for download()."""

    def __init__(self, data, found):
        super().__init__(data)
        self.found = found

    def extents(self, context="zero"):
        return self.found

    def copy_to(self, dst, offset, length, buf, progress=None):
        self._check("read", offset)
        dst.write(self.data[offset:offset + length], offset)
        progress(length)


class Export:
    """A local export; connect() gives its one image."""

    def __init__(self, image):
        self.image = image
        self.connects = 0

    def connect(self):
        self.connects += 1
        return self.image


def test_download_nothing_to_write():
    # A new image without a backing file reads zeros: an image of zeros
    # and holes needs no local connection at all.
    src = Remote(bytes(300), [Z(0, 100, zero=True, hole=True),
                              Z(100, 200, zero=True)])
    export = Export(None)
    progress = Progress()
    transfer.download(src, export, progress=progress)
    assert export.connects == 0
    assert progress.size == progress.done == 300
    assert src.calls == []


def test_download_data():
    src = Remote(b"x" * 100 + bytes(200), [Z(0, 100), Z(100, 200, zero=True)])
    dst = Memory(bytes(300))
    export = Export(dst)
    progress = Progress()
    transfer.download(src, export, progress=progress)
    assert export.connects == 1
    assert dst.data == src.data
    assert src.calls == [("read", 0)]
    assert dst.calls == [("write", 0), ("flush", 0)]
    assert progress.done == 300


# Verification helpers

def test_padded():
    image = Memory(b"abc")
    image.extents = lambda context="zero": [ZeroExtent(0, 3, False, False)]
    padded = transfer._Padded(image, 8)
    assert padded.extents("zero") == [ZeroExtent(0, 3, False, False),
                                      ZeroExtent(3, 5, True, False)]
    buf = bytearray(b"\xff" * 6)
    padded.read_into(memoryview(buf), 1)
    assert buf == b"bc\0\0\0\0"


# Resume: ranges already done are skipped.

@pytest.mark.parametrize("done,expected", [
    ([], [R(COPY, 0, 100), R(ZERO, 100, 50)]),
    ([(0, 150)], [R(SKIP, 0, 150)]),
    ([(10, 20), (25, 10), (120, 10)],
     [R(COPY, 0, 10), R(SKIP, 10, 25), R(COPY, 35, 65), R(ZERO, 100, 20),
      R(SKIP, 120, 10), R(ZERO, 130, 20)]),
    ([(90, 20)], [R(COPY, 0, 90), R(SKIP, 90, 20), R(ZERO, 110, 40)]),
])
def test_skip_done(done, expected):
    requests = [R(COPY, 0, 100), R(ZERO, 100, 50)]
    assert transfer.skip_done(requests, done) == expected


# Retries.

class Flaky(Memory):
    """Fails each offset's first write with error, once, after writing
    half of it."""

    def __init__(self, data, error):
        super().__init__(data)
        self.error = error
        self.failed = set()
        self.reconnects = 0

    def write(self, buf, offset):
        if offset not in self.failed:
            self.failed.add(offset)
            raise self.error
        super().write(buf, offset)

    def reconnect(self):
        self.reconnects += 1


def flaky_copy(src, dst, requests, retry, progress=None, done=None):
    def open_worker(index):
        return transfer._Worker(src, dst, 4096, owned=(), remote=dst)

    def do_copy(w, req, report):
        # Half reported before the write fails: counted once.
        report(req.length // 2)
        w.dst.write(src.data[req.start:req.start + req.length], req.start)
        report(req.length - req.length // 2)

    transfer.run(requests, open_worker, 1, progress=progress, name="test",
                 copy_op="write", copy=do_copy,
                 zero=lambda w, req: w.dst.zero(req.length, req.start),
                 retry=retry, done=done)


def no_wait(seconds, stop):
    return stop.is_set()


@pytest.mark.parametrize("error", [
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError("timed out"),
    errors.PeerError(503, "busy"),
])
def test_run_retries(error):
    src = Memory(b"abcd" * 1024)
    dst = Flaky(b"\0" * len(src.data), error)
    progress = Progress()
    done = []
    flaky_copy(src, dst, [R(COPY, 0, 2048), R(COPY, 2048, 2048)],
               transfer.Retry(wait=no_wait), progress=progress,
               done=lambda req: done.append(req))
    assert dst.data == src.data
    assert dst.reconnects == 2
    assert progress.done == len(src.data)
    assert done == [R(COPY, 0, 2048), R(COPY, 2048, 2048)]


def test_run_retry_after():
    src = Memory(b"x" * 100)
    dst = Flaky(b"\0" * 100, errors.PeerError(
        503, "busy", {"retry-after": "3"}))
    waits = []
    flaky_copy(src, dst, [R(COPY, 0, 100)], transfer.Retry(
        wait=lambda s, stop: waits.append(s)))
    assert waits == [3]


@pytest.mark.parametrize("error", [
    errors.PeerError(500, "broken"),
    OSError(28, "No space left on device"),
])
def test_run_no_retry(error):
    src = Memory(b"x" * 100)
    dst = Flaky(b"\0" * 100, error)
    waits = []
    with pytest.raises(transfer.TransferError) as e:
        flaky_copy(src, dst, [R(COPY, 0, 100)], transfer.Retry(
            wait=lambda s, stop: waits.append(s)))
    assert e.value.__cause__ is error
    assert "attempts" not in str(e.value)
    assert waits == []
    assert dst.reconnects == 0


def test_run_retry_stopped():
    # A transfer stopped during the backoff is not retried.
    src = Memory(b"x" * 100)
    dst = Flaky(b"\0" * 100, ConnectionResetError(104, "reset"))
    flaky_copy(src, dst, [R(COPY, 0, 100)], transfer.Retry(
        wait=lambda s, stop: True))
    assert dst.reconnects == 0
    assert dst.data == b"\0" * 100
