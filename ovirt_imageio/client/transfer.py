"""
The transfer pipeline: copy an image between a local NBD export and a
RemoteImage, with several connections.

Theory of operation.

- Planning is pure (plan_zero, plan_dirty, skip_zeroed, split): extents
  become a list of requests, each COPY (move the bytes), ZERO (make the
  range read as zeros on the destination) or SKIP (nothing to do: the
  destination already reads right). Zero extents never become bytes.
- Upload: the source's zero and hole extents are zeroed on the server,
  except where the server's own extents say it already reads zeros (a new
  disk: nothing at all is sent for them) or the caller says the disk is
  zero. Holes stay holes when uploading a qcow2 layer without its backing
  chain.
- Download: the local image is new and empty, so zeros and holes are
  skipped; with a backing file, zero extents that are not holes are
  zeroed locally so they hide the backing file's data. Incremental:
  dirty data is copied, dirty zeros zeroed, clean ranges skipped.
- Zeros in data. A data extent may be mostly zeros (a preallocated disk
  reports data everywhere). Each piece received is checked for all-zero
  blocks of ZERO_BLOCK bytes (zero_runs(): a memcmp against a zero
  block, ~20 GB/s), and only the other blocks are written. A zero block
  is skipped where the new image reads zeros anyway (no backing file, not
  incremental), else zeroed (NBD WRITE_ZEROES, which qcow2 makes a zero
  cluster: no space, and it hides the backing file; never a discard,
  which would leave the cluster unallocated and show the backing data).
  So a download takes the space of its data, on every path: the bytes
  of a download always pass through the worker's buffer, even on the
  daemon's unix socket, where splicing them into the image would write
  every zero (see SPLICE_DOWNLOADS).
- Requests are split (COPY at most MAX_COPY, ZERO at most MAX_ZERO) to
  spread the work and report progress often.
- run() starts up to max_workers threads. Each worker has its own HTTP
  connection (RemoteImage.clone()) and its own connection to the local
  image (NBD to the local qemu-nbd, or a raw file's own descriptor), and
  one buffer, reused for every piece. Worker 0 reuses
  the connections the caller already opened. A COPY is one HTTP request
  streaming the range in buffer-sized pieces. At the end every worker
  that wrote flushes its own connection.
- Retries. A request (copy, zero, flush) or a worker's connecting that
  fails with a network error (a connection reset or cut, a timeout, a
  TLS or HTTP protocol error, a 503 Service Unavailable) is tried again
  on a new connection, up to Retry.attempts times with a doubling
  backoff (Retry-After honoured, bounded), so a flaky network does not
  fail a long transfer. All requests are idempotent: a range is written
  again whole. Not retried: other HTTP errors (the server said no),
  errors of the local image, a stopped transfer, and a worker splicing
  on the daemon's unix socket (the same host: a broken connection there
  means the daemon went away, and the local stream is mid-request).
  Progress counts a retried range once.
- Resume. Ranges already transferred (a journal of an interrupted
  transfer) become SKIP requests (skip_done()); a callback learns each
  request that completed, to keep that journal.
- Failure: the first error stops the other workers at their next piece
  and is raised as TransferError naming the operation, the range, and the
  HTTP status and server message. KeyboardInterrupt (or any exception)
  in the caller's thread stops the workers the same way; run() returns or
  raises only after every worker thread has ended and closed its
  connections.
"""

import bisect
import collections
import errno
import http.client
import logging
import ssl
import threading
import time

from ovirt_imageio import errors
from ovirt_imageio.client import remote as _remote
from ovirt_imageio.nbd import extents as nbd_extents

# ovirt_imageio.image (the Image contract's helpers) is imported where it
# is used: it imports typing, which the client library does not load when
# it starts.

log = logging.getLogger(__name__)

MiB = 1024**2

# Largest request: big enough that HTTP overhead does not matter, small
# enough to spread an image over the workers and report progress often
# (upstream uses the same).
MAX_COPY = 128 * MiB

# Largest request when each completed one is journaled (skip, done):
# what a killed transfer loses and sends again.
MAX_JOURNALED_COPY = 16 * MiB

# Largest zero request. Zeroing costs the server little per byte, so a
# larger request means fewer round trips for large sparse images; our
# daemon zeroes in 1 GiB steps anyway.
MAX_ZERO = 1024 * MiB

# Buffer limits: the NBD protocol's usual maximum request is 32 MiB.
MAX_BUFFER_SIZE = 32 * MiB
BUFFER_SIZE = 4 * MiB
MAX_WORKERS = 4
# Seconds the workers of a stopped transfer (KeyboardInterrupt) get to
# finish their piece before their connections are aborted.
STOP_GRACE = 5

# Blocks of a received piece checked for zeros. 64 KiB is qcow2's default
# cluster and a multiple of every file system's block: smaller blocks
# save no space in a qcow2, larger ones miss zeros between data
# (bench/preallocated.py: 57 MiB of data in 1 MiB pieces took 58 MiB,
# and 240 MiB with upstream's client, whose qemu-nbd detects zeros per
# 4 MiB write). The cost, measured on this 2-core machine under load:
# ~15 ms per GiB of data (a memcmp stops at the first non-zero byte),
# ~60 ms per GiB of zeros, and one write request per run of data
# blocks.
ZERO_BLOCK = 64 * 1024
_ZERO_BLOCK = bytes(ZERO_BLOCK)

COPY = "copy"
ZERO = "zero"
SKIP = "skip"


class Request(collections.namedtuple("Request", "op,start,length")):
    """
    One step of a plan: op (COPY, ZERO or SKIP) on length bytes at start.
    A plain namedtuple: typing.NamedTuple would import typing, 2 ms of
    every client command's start and exit.
    """
    __slots__ = ()


class TransferError(Exception):
    """
    A transfer failed. Attributes: name ("upload", "download"), op
    ("read", "write", "zero", "flush", "connect"), offset, length, status
    (the HTTP status when the server answered with an error, else None).
    The original exception is __cause__.
    """

    def __init__(self, name, op, offset, length, cause, attempts=1):
        self.name = name
        self.op = op
        self.offset = offset
        self.length = length
        self.status = getattr(cause, "status", None)
        if isinstance(cause, errors.PeerError):
            detail = f"server answered {cause.status}: {cause}"
        else:
            detail = f"{type(cause).__name__}: {cause}"
        where = ""
        if length:
            where = f" bytes {offset}-{offset + length - 1}"
        if attempts > 1:
            detail += f" (after {attempts} attempts)"
        super().__init__(f"{name} failed: {op}{where}: {detail}")


class Retry:
    """
    How failed requests are retried: up to attempts tries in all, waiting
    delay seconds before the second, doubling up to max_delay; a 503's
    Retry-After (seconds) is waited instead when longer, at most
    max_retry_after. wait(seconds, stop) waits and returns True if the
    transfer was stopped meanwhile (stop, a threading.Event); tests
    inject one that does not wait.
    """

    def __init__(self, attempts=5, delay=0.5, max_delay=8.0,
                 max_retry_after=60.0, wait=None):
        if attempts < 1:
            raise ValueError(f"Invalid attempts {attempts}")
        self.attempts = attempts
        self.delay = delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self._wait = wait or (lambda seconds, stop: stop.wait(seconds))

    def backoff(self, attempt, error):
        """Seconds to wait after the failed attempt (1-based)."""
        seconds = min(self.delay * 2**(attempt - 1), self.max_delay)
        if isinstance(error, errors.PeerError):
            after = error.headers.get("retry-after")
            if after is not None and after.isdigit():
                seconds = max(seconds, min(int(after),
                                           self.max_retry_after))
        return seconds

    def wait(self, seconds, stop):
        return self._wait(seconds, stop)


# One attempt: what run() does without a Retry.
NO_RETRY = Retry(attempts=1)

# upload() and download()'s default: 5 attempts over 7.5 seconds.
RETRY = Retry()

# Errors of the network, not of the local image: worth a new connection.
_NETWORK_ERRNOS = frozenset((
    errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
    errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN,
    errno.ENETRESET, errno.EHOSTDOWN))


def retriable(error):
    """
    True if error is a network failure a new connection may cure: a
    connection error or timeout, TLS or HTTP protocol errors, a 503.
    Other HTTP errors are the server's answer; other OSErrors (ENOSPC,
    EIO) and libnbd errors come from the local image.
    """
    if isinstance(error, errors.PeerError):
        return error.status == 503
    if isinstance(error, (ConnectionError, TimeoutError, ssl.SSLError,
                          http.client.HTTPException,
                          _remote.ProtocolError)):
        return True
    return isinstance(error, OSError) and error.errno in _NETWORK_ERRNOS


class ChecksumMismatch(Exception):
    """After a transfer, the local and the server's checksums differ."""


# Planning: pure functions over extents.

def plan_zero(found, zero=True, hole=True):
    """
    Requests for zero extents: data => COPY; zero extents => ZERO when
    zero is true (holes only when hole is also true), else SKIP.
    """
    requests = []
    for ext in found:
        if not ext.zero:
            op = COPY
        elif zero and (hole or not ext.hole):
            op = ZERO
        else:
            op = SKIP
        requests.append(Request(op, ext.start, ext.length))
    return _merge(requests)


def plan_dirty(found):
    """
    Requests for dirty extents: dirty data => COPY, dirty zeros => ZERO,
    clean => SKIP.
    """
    requests = []
    for ext in found:
        if not ext.dirty:
            op = SKIP
        elif ext.zero:
            op = ZERO
        else:
            op = COPY
        requests.append(Request(op, ext.start, ext.length))
    return _merge(requests)


def skip_zeroed(requests, dst_extents):
    """
    Turn the parts of ZERO requests where the destination already reads
    zeros (dst_extents, zero extents of the destination) into SKIP.
    Ranges the destination's extents do not cover stay ZERO.
    """
    zeros = [(e.start, e.start + e.length) for e in dst_extents if e.zero]
    result = []
    i = 0
    for req in requests:
        if req.op != ZERO:
            result.append(req)
            continue
        pos, end = req.start, req.start + req.length
        # Zero ranges are sorted; drop those ending before this request.
        while i < len(zeros) and zeros[i][1] <= pos:
            i += 1
        j = i
        while pos < end:
            if j < len(zeros) and zeros[j][0] < end:
                zstart, zend = zeros[j]
                if zstart > pos:
                    result.append(Request(ZERO, pos, zstart - pos))
                    pos = zstart
                skip_end = min(zend, end)
                if skip_end > pos:
                    result.append(Request(SKIP, pos, skip_end - pos))
                    pos = skip_end
                if zend <= end:
                    j += 1
                else:
                    break
            else:
                result.append(Request(ZERO, pos, end - pos))
                pos = end
    return _merge(result)


def skip_done(requests, done):
    """
    Turn the parts of COPY and ZERO requests inside the ranges done
    ((start, length) pairs, in any order, may overlap) into SKIP.
    """
    ranges = []
    for start, length in sorted(done):
        end = start + length
        if ranges and start <= ranges[-1][1]:
            ranges[-1][1] = max(ranges[-1][1], end)
        elif length > 0:
            ranges.append([start, end])
    result = []
    i = 0
    for req in requests:
        if req.op == SKIP:
            result.append(req)
            continue
        pos, end = req.start, req.start + req.length
        while i < len(ranges) and ranges[i][1] <= pos:
            i += 1
        j = i
        while pos < end:
            if j < len(ranges) and ranges[j][0] < end:
                dstart, dend = ranges[j]
                if dstart > pos:
                    result.append(Request(req.op, pos, dstart - pos))
                    pos = dstart
                skip_end = min(dend, end)
                result.append(Request(SKIP, pos, skip_end - pos))
                pos = skip_end
                if dend <= end:
                    j += 1
                else:
                    break
            else:
                result.append(Request(req.op, pos, end - pos))
                pos = end
    return _merge(result)


def split(requests, max_copy=MAX_COPY, max_zero=MAX_ZERO):
    """Split COPY and ZERO requests larger than their limit."""
    result = []
    for req in requests:
        step = {COPY: max_copy, ZERO: max_zero}.get(req.op)
        if step is None or req.length <= step:
            result.append(req)
            continue
        start, end = req.start, req.start + req.length
        while start < end:
            n = min(step, end - start)
            result.append(Request(req.op, start, n))
            start += n
    return result


def zero_runs(buf, offset, block=ZERO_BLOCK):
    """
    Split buf, the image's bytes at offset, into runs of all-zero blocks
    and runs of other blocks: a list of (start, length, zero), start
    being an offset in the image. Blocks are aligned to block in the
    image, so the first and the last may be shorter.
    """
    view = memoryview(buf).cast("B")
    zeros = _ZERO_BLOCK if block == ZERO_BLOCK else bytes(block)
    runs = []
    pos = 0
    length = len(view)
    while pos < length:
        end = min(length, (offset + pos) // block * block + block - offset)
        # The zero block starts with this piece only if it is all zeros:
        # a memcmp, no copy, stopping at the first non-zero byte.
        zero = zeros.startswith(view[pos:end])
        if runs and runs[-1][2] == zero:
            start, n, _ = runs[-1]
            runs[-1] = (start, n + end - pos, zero)
        else:
            runs.append((offset + pos, end - pos, zero))
        pos = end
    return runs


def _merge(requests):
    merged = []
    for req in requests:
        if req.length == 0:
            continue
        if merged:
            last = merged[-1]
            if (last.op == req.op
                    and last.start + last.length == req.start):
                merged[-1] = Request(last.op, last.start,
                                     last.length + req.length)
                continue
        merged.append(req)
    return merged


# Upload and download.

def upload(export, dst, *, max_workers=MAX_WORKERS, buffer_size=BUFFER_SIZE,
           zero=True, hole=True, progress=None, retry=RETRY, skip=(),
           done=None, detect_zeros=False):
    """
    Copy the local export to dst (a RemoteImage) with up to max_workers
    connections. zero=False skips zero extents (the disk is known to be
    zero); hole=False keeps holes unallocated on the destination.
    retry: a Retry. skip: (start, length) ranges already uploaded (they
    count as progress); done(start, length) is called, from the worker
    threads, for each range uploaded. detect_zeros: data is read into
    the worker's buffer and its zero blocks are zeroed (or skipped with
    zero=False) instead of sent, for a source whose extents say data
    everywhere (a raw image read from a URL).
    """
    primary = export.connect()
    try:
        requests = plan_zero(primary.extents("zero"), zero=zero, hole=hole)
        requests = _skip_remote_zeros(requests, dst)
        if skip:
            requests = skip_done(requests, skip)
        if progress is not None:
            progress.size = primary.size

        def open_worker(index):
            # A spliced stream may be left mid-request: no retries.
            can_retry = not _splices(dst)
            if index == 0 and can_retry:
                return _Worker(primary, dst, buffer_size, owned=(),
                               remote=dst)
            src = _connect(export, dst)
            if index == 0:
                return _Worker(src, dst, buffer_size, owned=(src,),
                               remote=dst, can_retry=can_retry)
            try:
                other = dst.clone()
            except BaseException:
                src.close()
                raise
            return _Worker(src, other, buffer_size, owned=(other, src),
                           remote=other, can_retry=can_retry)

        run(_split(requests, done), open_worker, max_workers,
            progress=progress, name="upload", copy_op="write",
            copy=_copy_sparse(_Zeroing(dst, zero)) if detect_zeros else (
                lambda w, req, report: w.dst.copy_from(
                    w.src, req.start, req.length, w.buf, progress=report)),
            zero=lambda w, req: w.dst.zero(req.length, req.start),
            retry=retry, done=_done(done))
    finally:
        primary.close()


def _copy_sparse(zeroing):
    """An upload's copy() sending only the blocks of data that are not
    all zeros (zero_runs()); zero blocks are zeroed where zeroing says
    so."""

    def copy(w, req, report):
        pos, end = req.start, req.start + req.length
        with memoryview(w.buf) as view:
            while pos < end:
                n = min(len(view), end - pos)
                piece = view[:n]
                w.src.read_into(piece, pos)
                _send_runs(w.dst, piece, pos, zeroing)
                pos += n
                report(n)

    return copy


def _send_runs(dst, piece, pos, zeroing):
    """Write piece's data blocks at pos, zero its zero blocks if needed."""
    for start, length, is_zero in zero_runs(piece, pos):
        if not is_zero:
            at = start - pos
            dst.write(piece[at:at + length], start)
        elif zeroing.needed(start, length):
            dst.zero(length, start)


class _Zeroing:
    """
    Where zero blocks found in the data must be zeroed on dst: nowhere
    with zero=False (the disk is known to read zeros), else where the
    server's zero extents (asked for once) do not say it reads zeros.
    """

    def __init__(self, dst, zero):
        self._zero = zero
        self._starts = []
        self._ends = []
        if not zero or not getattr(dst, "can_extents", False):
            return
        try:
            found = dst.extents("zero")
        except (errors.Unsupported, errors.PeerError) as e:
            log.debug("Cannot get destination extents, zeroing: %s", e)
            return
        for ext in found:
            if not ext.zero:
                continue
            if self._ends and self._ends[-1] == ext.start:
                self._ends[-1] = ext.start + ext.length
            else:
                self._starts.append(ext.start)
                self._ends.append(ext.start + ext.length)

    def needed(self, start, length):
        if not self._zero:
            return False
        i = bisect.bisect_right(self._starts, start) - 1
        return i < 0 or self._ends[i] < start + length


def upload_stream(read_into, size, dst, *, buffer_size=BUFFER_SIZE,
                  zero=True, progress=None, hasher=None):
    """
    Copy size bytes, read in order by read_into(buf) -> n (0 at the end),
    to dst (a RemoteImage) on one connection: a source that can be read
    only once (an HTTP server without ranges). Zero blocks are zeroed,
    or skipped with zero=False; hasher(piece), if given, sees every byte
    in order (a checksum computed while sending). Not retried: the bytes
    cannot be read again.
    """
    if progress is not None:
        progress.size = size
    buf = bytearray(min(buffer_size, size) or 1)
    pos = 0
    try:
        zeroing = _Zeroing(dst, zero)
        with memoryview(buf) as view:
            while pos < size:
                n = _fill(read_into, view[:min(len(view), size - pos)])
                if n == 0:
                    raise RuntimeError(f"Source ended at {pos} of {size} "
                                       f"bytes")
                piece = view[:n]
                if hasher is not None:
                    hasher(piece)
                _send_runs(dst, piece, pos, zeroing)
                pos += n
                if progress is not None:
                    progress.update(n)
        dst.flush()
    except Exception as e:
        error = TransferError("upload", "write", pos, size - pos, e)
        raise error from e


def _fill(read_into, view):
    """Fill view as far as the source goes; bytes read."""
    pos = 0
    while pos < len(view):
        n = read_into(view[pos:])
        if not n:
            break
        pos += n
    return pos


def download(src, export, *, dirty=False, zero=False, hole=False,
             max_workers=MAX_WORKERS, buffer_size=BUFFER_SIZE,
             progress=None, retry=RETRY, skip=(), done=None):
    """
    Copy src (a RemoteImage) to the local export, a new empty image, with
    up to max_workers connections. dirty: copy only dirty extents. zero:
    zero the zero extents that are not holes (a new image with a backing
    file); with hole too, zero the holes as well (a raw block device,
    whose old contents show wherever nothing is written).
    export.connect() is called only if there is something to copy or
    zero.

    Blocks of zeros in the data received are not written: they are
    zeroed when zero or dirty (what lies below must not show through: a
    backing file, or the previous backup an incremental one is rebased
    on later), else skipped (the new image reads zeros there).

    retry, skip and done: as for upload() (skip: ranges already
    written to the local image, when resuming).
    """
    if dirty:
        requests = plan_dirty(src.extents("dirty"))
    else:
        requests = plan_zero(src.extents("zero"), zero=zero, hole=hole)
    if skip:
        requests = skip_done(requests, skip)
    if progress is not None:
        progress.size = src.size
    zero_found = zero or dirty
    # Nothing to write (an empty or all zero image): the new image already
    # reads right, and export.connect() is never called, so a lazily
    # opened export never starts its qemu-nbd (local.open_lazily()).
    primary = primary_dst = None
    if any(r.op != SKIP for r in requests):
        primary, primary_dst = _connect_download(export, src, zero_found)
    try:
        def open_worker(index):
            if index == 0:
                return _Worker(src, primary_dst, buffer_size, owned=(),
                               remote=src,
                               can_retry=not primary_dst.can_splice)
            conn, dst = _connect_download(export, src, zero_found)
            try:
                other = src.clone()
            except BaseException:
                conn.close()
                raise
            return _Worker(other, dst, buffer_size, owned=(conn, other),
                           remote=other, can_retry=not dst.can_splice)

        run(_split(requests, done), open_worker, max_workers,
            progress=progress, name="download", copy_op="read",
            copy=lambda w, req, report: w.src.copy_to(
                w.dst, req.start, req.length, w.buf, progress=report),
            zero=lambda w, req: w.dst.zero(req.length, req.start,
                                           punch_hole=True),
            retry=retry, done=_done(done))
    finally:
        if primary is not None:
            primary.close()


def _split(requests, done):
    if done is None:
        return split(requests)
    return split(requests, max_copy=MAX_JOURNALED_COPY)


def _done(callback):
    """run()'s done(request) for a done(start, length) callback."""
    if callback is None:
        return None
    return lambda req: callback(req.start, req.length)


# Splice downloads on the daemon's unix socket (socket -> pipe -> image,
# no byte through Python), as uploads are. Off: a spliced piece cannot
# be checked for zeros, and a preallocated disk's extents say data
# everywhere, so the server's extents do not find them either: all its
# zeros would be written. Measured with bench/preallocated.py (1 GiB
# raw, output on disk, 5 rounds, medians, load 5-9): preallocated with
# 57 MiB of data, unix socket, to raw 6.38 s and 1024 MiB spliced, 3.39 s
# and 58 MiB through the buffer (upstream's client 6.24 s, 240 MiB); to
# qcow2 7.24 s spliced, 3.70 s through the buffer (upstream 5.77 s). All
# data, to raw: 6.75 s spliced, 7.17 s through the buffer (+6%, within
# the noise); on tmpfs 2.15 s and 2.77 s, +0.6 s per GiB for one more
# copy (socket to buffer to page cache instead of socket to page cache).
SPLICE_DOWNLOADS = False


def _connect_download(export, remote, zero):
    """
    A download worker's connection to the local image: (conn, dst), conn
    to close and dst to write to, a _Sparse over conn. With
    SPLICE_DOWNLOADS on the unix socket, dst is conn, spliced into.
    """
    if SPLICE_DOWNLOADS:
        conn = _connect(export, remote)
        if conn.can_splice:
            return conn, conn
    else:
        conn = export.connect()
    return conn, _Sparse(conn, zero)


class _Sparse:
    """
    A download's connection to the local image, as RemoteImage.copy_to
    writes to it: of each piece, only the blocks that are not all zeros
    are written (zero_runs()); the zero blocks are zeroed with zero=True,
    else skipped. zero() and flush() are the connection's.
    """

    def __init__(self, dst, zero):
        self._dst = dst
        self._zero = zero

    def write(self, buf, offset):
        view = memoryview(buf).cast("B")
        for start, length, zero in zero_runs(view, offset):
            if not zero:
                pos = start - offset
                self._dst.write(view[pos:pos + length], start)
            elif self._zero:
                # Without NO_HOLE: a qcow2 makes a zero cluster (never
                # an unallocated one), a raw file punches a hole.
                self._dst.zero(length, start, punch_hole=True)

    def zero(self, length, offset, punch_hole=False):
        self._dst.zero(length, offset, punch_hole=punch_hole)

    def flush(self):
        self._dst.flush()

    # What RemoteImage.copy_to uses of an image (ovirt_imageio/image.py):
    # the pieces come through buf, each given to write().

    can_splice = False

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        from ovirt_imageio import image
        image.receive_through(self, src, offset, length, buf, prefix, done,
                              flush)


def _splices(remote):
    """True if data moves between remote and the local qemu-nbd by
    splice(2) (remote on the daemon's unix socket, no TLS)."""
    return remote.transport == "unix"


def _connect(export, remote):
    """
    A worker's connection to the local export: one that splices (a
    Stream, or a raw file) when its data moves to and from remote's
    socket (RemoteImage.copy_to/copy_from), else a libnbd client. Every
    export (local.Export, local.LazyExport, rawfile.Export) has both.
    """
    if _splices(remote):
        return export.connect_stream()
    return export.connect()


def verify(local, remote, name):
    """
    Compare the server's checksum of the image with the checksum of the
    local image (local: an NBD connection, so guest data). A local image
    smaller than the remote one is compared as if padded with zeros.

    Both sides read their whole image, so they work at the same time:
    the server's checksum is asked for on a second connection with the
    algorithm and block size computed here, while this thread computes
    the local one. If the server answers with others (it ignored them),
    the local checksum is computed again with its.

    Raises ChecksumMismatch.
    """
    # Imported here, as only verification needs it (hashlib: 1 ms of
    # every client command's start and exit).
    from ovirt_imageio import checksum as blkhash

    if not remote.can_checksum:
        raise ChecksumMismatch(
            f"Cannot verify {name}: the server does not support checksums")
    size = remote.size
    if local.size > size:
        raise ChecksumMismatch(
            f"{name} verification failed: local image size {local.size} "
            f"is larger than the server's image size {size}")
    image = _Padded(local, size)
    algorithm = blkhash.DEFAULT_ALGORITHM
    block_size = blkhash.DEFAULT_BLOCK_SIZE
    with _RemoteChecksum(remote, algorithm, block_size) as request:
        ours = blkhash.compute(image, algorithm, block_size)
        theirs = request.result()
    if (theirs["algorithm"], theirs["block_size"]) != (algorithm,
                                                       block_size):
        ours = blkhash.compute(image, theirs["algorithm"],
                               theirs["block_size"])
    if ours["checksum"] != theirs["checksum"]:
        raise ChecksumMismatch(
            f"{name} verification failed: local checksum "
            f"{ours['checksum']} != server checksum {theirs['checksum']} "
            f"(algorithm={theirs['algorithm']}, "
            f"block_size={theirs['block_size']})")
    log.debug("%s verified: %s", name, ours)


def verify_streamed(ours, remote, name):
    """
    Compare ours, the checksum of what was sent (checksum.Hasher's
    result, computed while sending a stream that cannot be read again),
    with the server's. Raises ChecksumMismatch.
    """
    if not remote.can_checksum:
        raise ChecksumMismatch(
            f"Cannot verify {name}: the server does not support checksums")
    theirs = remote.checksum(algorithm=ours["algorithm"],
                             block_size=ours["block_size"], timeout=None)
    if (theirs["algorithm"], theirs["block_size"]) != (
            ours["algorithm"], ours["block_size"]):
        raise ChecksumMismatch(
            f"Cannot verify {name}: the server computed its checksum with "
            f"algorithm={theirs['algorithm']} "
            f"block_size={theirs['block_size']}, not those asked for")
    if ours["checksum"] != theirs["checksum"]:
        raise ChecksumMismatch(
            f"{name} verification failed: checksum of the bytes sent "
            f"{ours['checksum']} != server checksum {theirs['checksum']} "
            f"(algorithm={theirs['algorithm']}, "
            f"block_size={theirs['block_size']})")
    log.debug("%s verified: %s", name, ours)


class _RemoteChecksum:
    """
    The server's checksum, asked for in a thread on a connection of its
    own. Leaving the block early (an error, KeyboardInterrupt) closes
    that connection, which ends the wait.
    """

    def __init__(self, remote, algorithm, block_size):
        self._remote = remote.clone()
        self._algorithm = algorithm
        self._block_size = block_size
        self._done = threading.Event()
        self._value = None
        self._error = None
        self._thread = threading.Thread(target=self._run, name="checksum",
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, kind, *_):
        if kind is not None:
            self._remote.abort()
        self._done.wait()
        self._remote.close()

    def _run(self):
        try:
            self._value = self._remote.checksum(
                algorithm=self._algorithm, block_size=self._block_size,
                timeout=None)
        except BaseException as e:
            self._error = e
        finally:
            self._done.set()

    def result(self):
        # Event.wait(), not Thread.join(): KeyboardInterrupt gets through.
        self._done.wait()
        if self._error is not None:
            if isinstance(self._error, errors.Unsupported):
                raise ChecksumMismatch(
                    f"Cannot verify: the server does not support "
                    f"checksums: {self._error}")
            raise self._error
        return self._value


def _skip_remote_zeros(requests, dst):
    """Skip zeroing where the server says its image reads zeros."""
    if not dst.can_extents or not any(r.op == ZERO for r in requests):
        return requests
    try:
        found = dst.extents("zero")
    except (errors.Unsupported, errors.PeerError) as e:
        log.debug("Cannot get destination extents, zeroing: %s", e)
        return requests
    return skip_zeroed(requests, found)


class _Padded:
    """An image seen as size bytes: its own, then zeros."""

    def __init__(self, image, size):
        self._image = image
        self.size = size

    def extents(self, context="zero"):
        found = self._image.extents(context)
        if self._image.size < self.size:
            found.append(nbd_extents.ZeroExtent(
                self._image.size, self.size - self._image.size,
                zero=True, hole=False))
        return found

    def read_into(self, buf, offset):
        own = max(0, min(len(buf), self._image.size - offset))
        if own:
            self._image.read_into(buf[:own], offset)
        if own < len(buf):
            buf[own:] = bytes(len(buf) - own)


# The workers.

class _Stopped(Exception):
    """Raised in a worker when the transfer was stopped."""


class _Failed(Exception):
    """A worker's request failed for good after attempts tries."""

    def __init__(self, error, attempts):
        super().__init__(error)
        self.error = error
        self.attempts = attempts


class _Worker:

    def __init__(self, src, dst, buffer_size, owned, remote=None,
                 can_retry=True):
        self.src = src
        self.dst = dst
        self.buf = bytearray(buffer_size)
        self._owned = owned
        # The RemoteImage of src and dst: the one abort() can stop.
        self._remote = remote
        # False when a retry cannot work (a spliced local stream may be
        # left in the middle of a request).
        self.can_retry = can_retry

    def reconnect(self):
        """Before a retry: drop the connection to the server; the next
        request opens a new one."""
        if self._remote is not None:
            self._remote.reconnect()

    def abort(self):
        """End the I/O this worker is blocked on, from another thread:
        shut down its connection to the server (RemoteImage.abort); a
        local image's I/O does not hang."""
        if self._remote is not None:
            try:
                self._remote.abort()
            except Exception:
                log.exception("Error aborting %s", self._remote)

    def close(self):
        for image in self._owned:
            try:
                image.close()
            except Exception:
                log.exception("Error closing %s", image)


class _State:
    """What the workers share: the requests, progress, the first error."""

    def __init__(self, requests, progress):
        self._requests = iter(requests)
        self._progress = progress
        self._lock = threading.Lock()
        self._finished = 0
        self._finished_cond = threading.Condition(threading.Lock())
        self.stop = threading.Event()
        self.error = None
        self._workers = []

    def finished(self):
        """Called by each worker as its last action."""
        with self._finished_cond:
            self._finished += 1
            self._finished_cond.notify_all()

    def add_worker(self, worker):
        with self._lock:
            self._workers.append(worker)

    def abort_workers(self):
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.abort()

    def wait_for_workers(self, count, interruptible=True):
        """
        Wait until count workers finished.

        With interruptible=False (the transfer is being stopped after an
        interrupt), the wait goes on, since a worker may still use the
        caller's connections, and an interrupt is raised after it. The
        workers stop at their next piece; one blocked on a server that
        does not answer would keep the caller waiting for the socket's
        timeout, so after STOP_GRACE seconds, or at once on a second
        interrupt, their connections are aborted.
        """
        pending = None
        deadline = time.monotonic() + STOP_GRACE
        aborted = interruptible
        while True:
            try:
                with self._finished_cond:
                    while self._finished < count:
                        if aborted:
                            self._finished_cond.wait()
                            continue
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._finished_cond.wait(left)
                    else:
                        break
                log.info("Workers still busy %s seconds after the "
                         "transfer was stopped: aborting their "
                         "connections", STOP_GRACE)
            except BaseException as e:
                if interruptible:
                    raise
                self.stop.set()
                pending = e
            self.abort_workers()
            aborted = True
        if pending is not None:
            raise pending

    def next(self):
        with self._lock:
            return next(self._requests, None)

    def report(self, n):
        if self.stop.is_set():
            raise _Stopped
        if self._progress is not None:
            with self._lock:
                self._progress.update(n)

    def fail(self, error):
        with self._lock:
            if self.error is None:
                self.error = error
        self.stop.set()


def run(requests, open_worker, max_workers, *, progress, name, copy_op,
        copy, zero, retry=None, done=None):
    """
    Run requests with up to max_workers worker threads.

    open_worker(index) returns a _Worker; copy(worker, request, report)
    and zero(worker, request) do one request. retry (a Retry; None: one
    attempt) says how failed requests are retried; done(request), if
    given, is called in the worker's thread after each COPY or ZERO
    request completed. Raises the first TransferError; returns only after
    every thread has ended.
    """
    retry = retry or NO_RETRY
    work = [r for r in requests if r.op != SKIP]
    skipped = sum(r.length for r in requests if r.op == SKIP)
    state = _State(work, progress)
    if skipped and progress is not None:
        progress.update(skipped)
    count = max(0, min(max_workers, len(work)))
    threads = [
        threading.Thread(
            target=_work, name=f"{name}/{i}", daemon=True,
            args=(state, open_worker, i, name, copy_op, copy, zero, retry,
                  done))
        for i in range(count)]
    started = []
    try:
        for t in threads:
            t.start()
            started.append(t)
        # Not Thread.join(): a join interrupted by KeyboardInterrupt can
        # leave the thread listed as alive (Python 3.11).
        state.wait_for_workers(len(started))
    except BaseException:
        # KeyboardInterrupt, most likely: stop the workers at their next
        # piece and wait until they closed their connections.
        log.debug("%s interrupted, stopping workers", name)
        state.stop.set()
        state.wait_for_workers(len(started), interruptible=False)
        for t in started:
            t.join()
        raise
    for t in started:
        t.join()
    if state.error is not None:
        raise state.error


def _retried(state, retry, worker, what, call):
    """
    Return call(), tried up to retry.attempts times while it fails with
    a retriable error, on a new connection each time (worker None:
    call() opens its own). Raises _Failed, or _Stopped.
    """
    attempt = 1
    while True:
        try:
            return call()
        except _Stopped:
            raise
        except Exception as e:
            if (attempt >= retry.attempts or not retriable(e)
                    or state.stop.is_set()
                    or (worker is not None and not worker.can_retry)):
                raise _Failed(e, attempt) from e
            seconds = retry.backoff(attempt, e)
            # No URL: its path holds the ticket id.
            log.warning("%s failed (attempt %d of %d): %s: %s; retrying in "
                        "%.1f seconds on a new connection", what, attempt,
                        retry.attempts, type(e).__name__, e, seconds)
            if retry.wait(seconds, state.stop) or state.stop.is_set():
                raise _Stopped from e
            if worker is not None:
                worker.reconnect()
            attempt += 1


def _do(state, retry, worker, req, copy_op, copy, zero):
    """One request, retried; progress counts each byte once."""
    reported = 0

    def attempt():
        sent = 0

        def report(n):
            nonlocal sent, reported
            sent += n
            if sent > reported:
                state.report(sent - reported)
                reported = sent
            elif state.stop.is_set():
                raise _Stopped

        if req.op == COPY:
            copy(worker, req, report)
        else:
            zero(worker, req)
            report(req.length)

    op = copy_op if req.op == COPY else "zero"
    what = f"{op} bytes {req.start}-{req.start + req.length - 1}"
    _retried(state, retry, worker, what, attempt)


def _work(state, open_worker, index, name, copy_op, copy, zero, retry,
          done):
    worker = None
    req = None
    wrote = False
    try:
        worker = _retried(state, retry, None, f"{name} connect",
                          lambda: open_worker(index))
        state.add_worker(worker)
        while not state.stop.is_set():
            req = state.next()
            if req is None:
                break
            _do(state, retry, worker, req, copy_op, copy, zero)
            wrote = True
            if done is not None:
                done(req)
        else:
            return
        req = None
        if wrote:
            # Every worker flushes its own connection: a server need not
            # flush other connections' writes.
            _retried(state, retry, worker, "flush",
                     lambda: worker.dst.flush())
    except _Stopped:
        pass
    except Exception as e:
        attempts = 1
        if isinstance(e, _Failed):
            e, attempts = e.error, e.attempts
        if worker is None:
            op, offset, length = "connect", 0, 0
        elif req is None:
            op, offset, length = "flush", 0, 0
        else:
            op = copy_op if req.op == COPY else "zero"
            offset, length = req.start, req.length
        log.debug("Worker %s/%s failed: %s", name, index, e)
        error = TransferError(name, op, offset, length, e,
                              attempts=attempts)
        error.__cause__ = e
        state.fail(error)
    finally:
        try:
            if worker is not None:
                worker.close()
        finally:
            state.finished()
