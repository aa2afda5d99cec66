"""
One NBD connection: a thin, positional wrapper of a libnbd handle.

State: connection. A Client owns one libnbd handle; the export's size,
capabilities and negotiated meta contexts are read once after connecting
and kept as attributes. Calls on one Client are serialized by a lock, so a
Client may be shared, but parallelism comes from several Clients (several
NBD connections), one per HTTP connection.

Theory of operation: buffering and overlap.

- Reads go straight into the caller's buffer. In libnbd 1.14 the Python
  pread(count, offset) allocates and returns a new bytes object on every
  call, while aio_pread(buf, offset) accepts any writable object with the
  buffer protocol (bytearray, memoryview, even a memoryview slice) and
  libnbd writes into that memory; nbd.Buffer.from_buffer(buf) only wraps
  the same object, it does not copy. Evidence: while an aio_pread is
  pending the bytearray cannot be resized ("Existing exports of data"),
  i.e. the binding holds a buffer export of it and libnbd reads into it;
  a read-only buffer is refused (BufferError). Measured on this host with
  qemu-nbd and 4 MiB requests (hot page cache): pread ~7 GiB/s and one
  extra 4 MiB allocation per call (tracemalloc), aio_pread into a reused
  bytearray ~15-23 GiB/s and no allocation. So read_into() issues
  aio_pread on slices of the caller's buffer and waits for them.
- A buffer larger than the server's maximum request is split into
  requests kept in flight together (up to MAX_IN_FLIGHT), so the server
  works on the next request while the reply to the previous one is
  received. write() and the zero fallback use the same pipeline with
  aio_pwrite.
- Every call is an aio call, and waiting is h.poll(timeout), which
  blocks in poll(2) with the GIL released (checked with nbdkit's delay
  filter: another thread keeps running during a 1 s read). There is no
  busy loop, and no synchronous libnbd call: those wait without a
  deadline.

Hung servers. A server that stops answering must not hold a thread and
its descriptors forever. Each wait in poll(2) has the client's timeout:
a wait that sees no progress for that long fails the call with ETIMEDOUT
and breaks the connection. And another thread may stop a blocked call:
the connection's socket is ours (connected here and given to libnbd as a
duplicate descriptor), registered with an Interrupt; Interrupt.fire()
shuts it down (shutdown(2)), which wakes poll(2) and makes libnbd fail
what is in flight. Calls on the same handle from another thread are not
needed, so nothing waits for libnbd's handle lock.
- libnbd callbacks (block status, listing meta contexts) only append to a
  list; they never raise. Errors are raised after libnbd returns.

Every libnbd error is re-raised as Error with the operation, offset,
length and errno.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import socket
import threading
import traceback

import nbd

from ovirt_imageio import image
from ovirt_imageio.nbd import extents

log = logging.getLogger(__name__)

# Defaults when the server does not advertise block sizes. The NBD
# protocol says a client may assume 1 byte minimum, 4 KiB preferred and
# 32 MiB maximum payload when the server says nothing.
DEFAULT_MINIMUM_BLOCK_SIZE = 1
DEFAULT_PREFERRED_BLOCK_SIZE = 4096
DEFAULT_MAXIMUM_BLOCK_SIZE = 32 * 1024**2

# libnbd refuses pread/pwrite requests larger than 64 MiB (ERANGE), even
# if the server would accept them.
LIBNBD_MAX_REQUEST = 64 * 1024**2

# Largest NBD_CMD_WRITE_ZEROES request. The protocol allows up to 4 GiB - 1,
# but one request cannot be interrupted, and on slow storage (or with
# NO_HOLE, where the server must allocate) a huge one can take long;
# 1 GiB bounds that at the cost of one round trip per GiB.
MAX_ZERO = 1024**3

# Largest NBD_CMD_BLOCK_STATUS request: the largest 1 MiB aligned length
# that fits the 32-bit length field. Servers may reply with less; the loop
# continues from where the reply ended. An empty 1 TiB qcow2 takes 256
# requests: 36 ms one at a time in 2 GiB requests, 18 ms in these, less
# with several in flight (extents()).
MAX_BLOCK_STATUS = 4 * 1024**3 - 1024**2

# Block status requests kept in flight by extents().
BLOCK_STATUS_IN_FLIGHT = 8

# Requests kept in flight by one call. qemu-nbd serves up to 16 requests
# per client at once (MAX_NBD_REQUESTS); more would only queue in the
# socket.
MAX_IN_FLIGHT = 16

# Zeros written when the server cannot zero (NBD_CMD_WRITE_ZEROES not
# supported). Immutable and shared by all clients; bytes(n) is calloc'ed,
# so untouched pages cost no memory. Larger means fewer requests.
ZERO_BUFFER_SIZE = 4 * 1024**2
_ZEROS = memoryview(bytes(ZERO_BUFFER_SIZE))


class Error(OSError):
    """
    An NBD request failed: op ("read", "write", "zero", "flush",
    "block_status", "connect"), offset, length, errno and libnbd's message.
    """

    def __init__(self, op, offset, length, errno, message):
        super().__init__(errno, message)
        self.op = op
        self.offset = offset
        self.length = length

    def __str__(self):
        return (f"NBD {self.op} failed: offset={self.offset} "
                f"length={self.length} errno={_errno_name(self.errno)}: "
                f"{self.strerror}")

    def __reduce__(self):
        return (type(self), (self.op, self.offset, self.length, self.errno,
                             self.strerror))


def _errno_name(code):
    if not code:
        return "none"
    return errno.errorcode.get(code, str(code))


class Interrupt:
    """
    Stops blocked NBD I/O from another thread: fire() shuts down
    (shutdown(2)) the socket of every connection opened with this
    Interrupt, which wakes a thread blocked on it in recv, send, splice or
    poll; its call fails with ECANCELED. Connections opened after fire()
    fail at once. Thread safe.

    A connection registers its socket with watch() and closes it with
    close(), under the same lock as fire(), so fire() never shuts down a
    descriptor number that was closed and reused.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._socks = set()
        self.fired = False

    def watch(self, sock, op="connect"):
        """Register sock; raise Error(ECANCELED) if already fired."""
        with self._lock:
            if self.fired:
                raise interrupted(op, 0, 0)
            self._socks.add(sock)

    def check(self, op="connect"):
        """Raise Error(ECANCELED) if fired."""
        if self.fired:
            raise interrupted(op, 0, 0)

    def close(self, sock):
        """Stop watching sock and close it."""
        with self._lock:
            self._socks.discard(sock)
            sock.close()

    def shutdown(self, sock):
        """Shut down a watched sock now (a connection giving up)."""
        with self._lock:
            if sock in self._socks:
                _shutdown(sock)

    def fire(self):
        with self._lock:
            self.fired = True
            for sock in self._socks:
                _shutdown(sock)


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        # Not connected yet (checked after connect) or already gone.
        pass


def interrupted(op, offset, length):
    return Error(op, offset, length, errno.ECANCELED,
                 "NBD I/O was interrupted")


def timed_out(op, offset, length, timeout):
    return Error(op, offset, length, errno.ETIMEDOUT,
                 f"NBD server did not respond within {timeout:g} seconds")


def connect(address, timeout, interrupt):
    """
    Return a socket connected to address, watched by interrupt. The
    socket is left blocking; connect() waits at most timeout seconds.
    """
    if address.is_unix:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address.socket
    else:
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        target = (address.host, address.port)
    try:
        interrupt.watch(sock)
    except Error:
        sock.close()
        raise
    try:
        sock.settimeout(timeout)
        sock.connect(target)
        sock.settimeout(None)
        # fire() before connect() found nothing to shut down.
        interrupt.check()
        if not address.is_unix:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return sock
    except BaseException as e:
        interrupt.close(sock)
        if isinstance(e, Error):
            raise
        if isinstance(e, TimeoutError):
            raise Error("connect", 0, 0, errno.ETIMEDOUT,
                        f"Cannot connect to {address}: no answer within "
                        f"{timeout:g} seconds") from None
        if isinstance(e, OSError):
            raise Error("connect", 0, 0, e.errno or errno.EIO,
                        f"Cannot connect to {address}: {e}") from None
        raise


def open(address, *, dirty=False, timeout=None, interrupt=None):
    """
    Connect to the NBD export at address (a url.Address) and return a
    Client.

    Always requests base:allocation and qemu:allocation-depth. With
    dirty=True, also lists the export's dirty bitmaps and requests the
    bitmap if there is exactly one.

    timeout: seconds a wait for the server may see no progress (None:
    forever); the handshake and every later call fail with ETIMEDOUT
    then. interrupt: an Interrupt that may stop the connection's calls
    from another thread.

    Raises Error(op="connect") if the export cannot be reached.
    """
    if interrupt is None:
        interrupt = Interrupt()
    sock = connect(address, timeout, interrupt)
    h = nbd.NBD()
    waiter = _Waiter(h, timeout, interrupt, sock)
    try:
        # libnbd zeroes every read buffer before reading into it, so a
        # buggy server cannot leak old memory. Our buffers are ours and a
        # failed read is never sent; the memset was 4% of the daemon's CPU
        # on an HTTPS download.
        h.set_pread_initialize(False)
        h.set_export_name(address.export)
        if dirty:
            h.set_opt_mode(True)
        else:
            h.add_meta_context(extents.BASE_ALLOCATION)
            h.add_meta_context(extents.ALLOCATION_DEPTH)

        # libnbd owns (and closes) the duplicate; ours is for shutdown(2).
        # It owns it from this call on, even when the call fails: the
        # state machine starts at once, and a socket already shut down by
        # the Interrupt makes it close the descriptor and fail. Closing it
        # here too closed a number another thread had just been given
        # (seen: a test client's socket, and an HTTP client receiving
        # another connection's bytes).
        fd = os.dup(sock.fileno())
        h.aio_connect_socket(fd)
        waiter.connecting("connect")

        bitmap = None
        if dirty:
            bitmap = _negotiate_dirty(h, address, waiter)
        if not h.aio_is_ready():
            raise Error("connect", 0, 0, errno.ENOENT,
                        f"Server refused export {address.export!r} "
                        f"(address {address})")

        return Client(h, address, bitmap, waiter)
    except BaseException as e:
        # The handle must go now, with its descriptor: frames in the
        # traceback (_negotiate_dirty) would keep it alive.
        traceback.clear_frames(e.__traceback__)
        del h
        waiter.h = None
        interrupt.close(sock)
        if isinstance(e, nbd.Error):
            raise waiter.error("connect", 0, 0, e, f" (address {address})")
        raise


def _negotiate_dirty(h, address, waiter):
    """
    In option mode: find the export's dirty bitmaps, request the standard
    contexts and the bitmap if there is exactly one, and finish the
    handshake. Returns the bitmap name or None.
    """
    names = []
    h.add_meta_context(extents.DIRTY_BITMAP_PREFIX)
    # The callback only collects; it must never raise. A server without
    # NBD_OPT_LIST_META_CONTEXT has no bitmaps: it replies with an error,
    # and the list stays empty.
    h.aio_opt_list_meta_context(lambda name: names.append(name) or 0)
    waiter.connecting("connect")

    prefix = extents.DIRTY_BITMAP_PREFIX
    bitmaps = sorted({n[len(prefix):] for n in names
                      if n.startswith(prefix) and len(n) > len(prefix)})
    bitmap = bitmaps[0] if len(bitmaps) == 1 else None
    if len(bitmaps) > 1:
        log.warning("NBD export %s has %d dirty bitmaps, expecting one",
                    address, len(bitmaps))

    h.clear_meta_contexts()
    h.add_meta_context(extents.BASE_ALLOCATION)
    h.add_meta_context(extents.ALLOCATION_DEPTH)
    if bitmap is not None:
        h.add_meta_context(prefix + bitmap)
    h.aio_opt_go()
    waiter.connecting("connect")

    if (bitmap is not None and h.aio_is_ready()
            and not h.can_meta_context(prefix + bitmap)):
        bitmap = None
    return bitmap


class _Waiter:
    """
    Waits on a libnbd handle with the connection's timeout, and turns a
    failure into Error: ECANCELED once the Interrupt fired, ETIMEDOUT
    after a wait without progress. Either breaks the connection: its
    socket is shut down, and further calls fail at once. Other
    attributes are the libnbd handle's (waiter.aio_pread), until the
    client closes.
    """

    def __getattr__(self, name):
        # Calls on the libnbd handle, while the connection is open.
        h = self.__dict__.get("h")
        if h is None:
            raise ValueError("I/O on closed NBD client")
        return getattr(h, name)

    def __init__(self, h, timeout, interrupt, sock):
        self.h = h
        self.timeout = timeout
        self.interrupt = interrupt
        self.sock = sock
        self._broken = None
        self._ms = -1 if timeout is None else max(1, int(timeout * 1000))

    @property
    def stopped(self):
        """True once the connection timed out or was interrupted."""
        return self._broken is not None or self.interrupt.fired

    def check(self, op, offset, length):
        """Raise if the connection timed out or was interrupted."""
        if self.interrupt.fired:
            raise interrupted(op, offset, length)
        if self._broken is not None:
            raise Error(op, offset, length, *self._broken)

    def poll(self, op, offset, length):
        self.check(op, offset, length)
        try:
            progressed = self.h.poll(self._ms)
        except nbd.Error as e:
            raise self.error(op, offset, length, e) from None
        if not progressed:
            self._broken = (errno.ETIMEDOUT,
                            timed_out(op, 0, 0, self.timeout).strerror)
            self.interrupt.shutdown(self.sock)
            # Not kept in a local: a cycle through this frame would keep
            # the handle (and its descriptor) until garbage collection.
            raise Error(op, offset, length, *self._broken)

    def connecting(self, op):
        """Wait until the handshake (or an option) completes."""
        while self.h.aio_is_connecting():
            self.poll(op, 0, 0)
        self.interrupt.check(op)

    def error(self, op, offset, length, e, detail=""):
        """Error for nbd.Error e."""
        if self.interrupt.fired:
            return interrupted(op, offset, length)
        if self._broken is not None:
            return Error(op, offset, length, *self._broken)
        return Error(op, offset, length, e.errnum, e.string + detail)


class Client:
    """
    An open NBD connection. Use open() to create one.

    Attributes, read once after connecting:
        address, export_name, size, read_only, can_zero, can_fast_zero,
        can_flush, can_fua, can_trim, can_multi_conn, minimum_block_size,
        preferred_block_size, maximum_block_size, has_base_allocation,
        has_allocation_depth, dirty_bitmap (bitmap name or None).

    An Image (ovirt_imageio/image.py): can_extents, can_splice (False).
    """

    def __init__(self, handle, address, dirty_bitmap=None, waiter=None):
        h = handle
        self._h = h
        self._waiter = waiter
        self._lock = threading.Lock()
        self.address = address
        self.export_name = address.export
        self.size = h.get_size()
        self.read_only = bool(h.is_read_only())
        self.can_zero = bool(h.can_zero())
        self.can_fast_zero = bool(h.can_fast_zero())
        self.can_flush = bool(h.can_flush())
        self.can_fua = bool(h.can_fua())
        self.can_trim = bool(h.can_trim())
        self.can_multi_conn = bool(h.can_multi_conn())
        self.minimum_block_size = (
            h.get_block_size(nbd.SIZE_MINIMUM) or DEFAULT_MINIMUM_BLOCK_SIZE)
        self.preferred_block_size = (
            h.get_block_size(nbd.SIZE_PREFERRED)
            or DEFAULT_PREFERRED_BLOCK_SIZE)
        self.maximum_block_size = (
            h.get_block_size(nbd.SIZE_MAXIMUM) or DEFAULT_MAXIMUM_BLOCK_SIZE)
        self.has_base_allocation = bool(
            h.can_meta_context(extents.BASE_ALLOCATION))
        self.has_allocation_depth = bool(
            h.can_meta_context(extents.ALLOCATION_DEPTH))
        self.dirty_bitmap = dirty_bitmap

        # Largest pread/pwrite we send.
        self._max_request = min(self.maximum_block_size, LIBNBD_MAX_REQUEST)

    def __repr__(self):
        return (f"<Client address={self.address} size={self.size} "
                f"closed={self._h is None}>")

    @property
    def broken(self):
        """True once the connection timed out or was interrupted."""
        return self._waiter.stopped

    # I/O

    def read_into(self, buf, offset):
        """
        Fill the whole writable buffer buf (bytearray, memoryview, ...)
        with the image's bytes from offset. No new buffer is allocated.
        On error, the contents of buf are unspecified.
        """
        view = _byte_view(buf)
        if view.readonly:
            raise TypeError("read_into() needs a writable buffer")
        with self._lock:
            self._handle()
            self._pipeline("read", "aio_pread", self._chunks(view, offset), 0)

    def read(self, length, offset):
        """Return length bytes from offset."""
        if length <= self._max_request:
            with self._lock:
                self._handle()
                if length == 0:
                    return b""
                buf = bytearray(length)
                self._pipeline("read", "aio_pread", [(buf, offset)], 0)
                return bytes(buf)
        buf = bytearray(length)
        self.read_into(buf, offset)
        return bytes(buf)

    def write(self, buf, offset, fua=False):
        """
        Write buf (any bytes-like object) at offset. With fua=True the data
        is on stable storage when this returns (NBD FUA, or a flush when
        the server has no FUA; nothing if it can neither).
        """
        view = _byte_view(buf)
        flags = nbd.CMD_FLAG_FUA if fua and self.can_fua else 0
        with self._lock:
            h = self._handle()
            self._pipeline(
                "write", "aio_pwrite", self._chunks(view, offset), flags)
            if fua and not self.can_fua and self.can_flush:
                self._flush(h)

    def zero(self, length, offset, punch_hole=False):
        """
        Zero length bytes from offset with NBD WRITE_ZEROES. Unless
        punch_hole, the server must keep the range allocated
        (NBD_CMD_FLAG_NO_HOLE). When the server cannot zero, zeros are
        written.
        """
        with self._lock:
            h = self._handle()
            if not self.can_zero:
                self._write_zeros(h, length, offset)
                return
            flags = 0 if punch_hole else nbd.CMD_FLAG_NO_HOLE
            end = offset + length
            while offset < end:
                n = min(end - offset, MAX_ZERO)
                try:
                    cookie = h.aio_zero(n, offset, flags=flags)
                except nbd.Error as e:
                    raise self._error("zero", offset, n, e) from None
                self._wait(h, cookie, "zero", offset, n)
                offset += n

    def flush(self):
        """Flush the server's cache to storage; no-op if it cannot flush."""
        with self._lock:
            h = self._handle()
            if self.can_flush:
                self._flush(h)

    # The Image contract (ovirt_imageio/image.py): moving a range
    # through a buffer; libnbd cannot splice.

    can_splice = False

    @property
    def can_extents(self):
        return self.has_base_allocation

    def send(self, dst, offset, length, *, buf=None, begin=None, done=None):
        image.send_through(self, dst, offset, length, buf, begin, done)

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        image.receive_through(self, src, offset, length, buf, prefix, done,
                              flush)

    # Extents

    def extents(self, context="zero", offset=0, length=None):
        """
        Return the merged extents covering the image from offset for length
        bytes (default: the whole image, 0 to size): ZeroExtent for context
        "zero", DirtyExtent for context "dirty".

        Raises errors.Unsupported for "dirty" if the export does not have
        exactly one dirty bitmap.
        """
        extents.validate(context, bitmap=self.dirty_bitmap,
                         export_name=self.export_name)
        end = self.size if length is None else min(offset + length,
                                                   self.size)
        if context == "zero" and not self.has_base_allocation:
            # Nothing known: all data.
            if offset >= end:
                return []
            return [extents.ZeroExtent(offset, end - offset, zero=False,
                                       hole=False)]

        with self._lock:
            return self._extents(self._handle(), context, offset, end)

    def _extents(self, h, context, offset, end):
        """
        Block status for [offset, end) in windows of MAX_BLOCK_STATUS,
        BLOCK_STATUS_IN_FLIGHT of them in flight: a huge sparse image
        costs a few round trips, not one per window. Replies are used in
        order; a reply that covers only part of its window is followed by
        a request for the rest of that window, used next.
        """
        result = []
        pending = collections.deque()
        next_offset = offset

        def submit(start, length, front=False):
            replies = {}
            wrong_offsets = []

            def collect(name, reply_offset, entries, error):
                # Only collect; never raise inside a libnbd callback.
                if reply_offset != start:
                    wrong_offsets.append(reply_offset)
                elif name not in replies:
                    replies[name] = entries
                return 0

            try:
                cookie = h.aio_block_status(length, start, collect)
            except nbd.Error as e:
                raise self._error(
                    "block_status", start, length, e) from None
            item = (start, length, cookie, replies, wrong_offsets)
            if front:
                pending.appendleft(item)
            else:
                pending.append(item)

        try:
            while pending or next_offset < end:
                while (next_offset < end
                       and len(pending) < BLOCK_STATUS_IN_FLIGHT):
                    length = min(end - next_offset, MAX_BLOCK_STATUS)
                    submit(next_offset, length)
                    next_offset += length
                # Retired by _wait, even when it raises the command's error.
                start, length, cookie, replies, wrong_offsets = (
                    pending.popleft())
                self._wait(h, cookie, "block_status", start, length)
                if wrong_offsets:
                    raise Error("block_status", start, length, errno.EPROTO,
                                f"reply for offset {wrong_offsets[0]}")
                window_end = start + length
                found = extents.clip(
                    self._combine(context, start, replies), window_end)
                if not found:
                    raise Error(
                        "block_status", start, length, errno.EPROTO,
                        f"server replied without extents for some of "
                        f"{sorted(self._contexts(context))}")
                # Merge as we go so a huge image's list stays small.
                result[-1:] = extents.merge(result[-1:] + found)
                reached = found[-1].start + found[-1].length
                if reached < window_end:
                    submit(reached, window_end - reached, front=True)
        finally:
            # Callbacks of commands still in flight write to their own
            # lists only; retire them so none is left on the handle (a
            # broken connection retires nothing: it is only closed).
            for item in pending:
                if self._waiter.stopped:
                    break
                try:
                    self._wait(h, item[2], "block_status", item[0], item[1])
                except Error:
                    pass
        return result

    def _wait(self, h, cookie, op, offset, length):
        """Wait until the command cookie completes; raise its error."""
        try:
            while not h.aio_command_completed(cookie):
                self._waiter.poll(op, offset, length)
        except nbd.Error as e:
            raise self._error(op, offset, length, e) from None

    def _contexts(self, context):
        return extents.contexts(
            context, base_allocation=self.has_base_allocation,
            allocation_depth=self.has_allocation_depth,
            bitmap=self.dirty_bitmap)

    def _combine(self, context, offset, replies):
        return extents.combine(
            context, offset, replies,
            base_allocation=self.has_base_allocation,
            allocation_depth=self.has_allocation_depth,
            bitmap=self.dirty_bitmap)

    # Closing

    def close(self):
        """
        Disconnect. Waits for a call in progress on another thread. Safe
        to call more than once.
        """
        with self._lock:
            h, self._h = self._h, None
        if h is None:
            return
        waiter = self._waiter
        try:
            if not waiter.stopped:
                # Tell the server, and wait (with the timeout) for it to
                # close the connection; a broken connection is just
                # dropped.
                h.aio_disconnect()
                while not (h.aio_is_closed() or h.aio_is_dead()):
                    waiter.poll("disconnect", 0, 0)
        except (nbd.Error, Error) as e:
            log.debug("Error shutting down NBD connection %s: %s",
                      self.address, e)
        finally:
            # nbd.NBD in libnbd 1.14 has no close(); the handle and its
            # descriptor are released with the last reference, this one.
            waiter.h = None
            del h
            waiter.interrupt.close(waiter.sock)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private

    def _handle(self):
        """
        The handle for a call: the waiter, which forwards to the libnbd
        handle. Frames of a failed call (in its traceback, in a log
        record) hold the waiter, never the libnbd handle, so close()
        releases the handle and its descriptor at once.
        """
        if self._h is None:
            raise ValueError("I/O on closed NBD client")
        self._waiter.check("io", 0, 0)
        return self._waiter

    def _error(self, op, offset, length, e):
        return self._waiter.error(op, offset, length, e)

    def _flush(self, h):
        try:
            cookie = h.aio_flush()
        except nbd.Error as e:
            raise self._error("flush", 0, 0, e) from None
        self._wait(h, cookie, "flush", 0, 0)

    def _chunks(self, view, offset):
        step = self._max_request
        for start in range(0, len(view), step):
            yield view[start:start + step], offset + start

    def _write_zeros(self, h, length, offset):
        step = min(self._max_request, ZERO_BUFFER_SIZE)

        def chunks():
            pos, end = offset, offset + length
            while pos < end:
                n = min(end - pos, step)
                yield _ZEROS[:n], pos
                pos += n

        self._pipeline("zero", "aio_pwrite", chunks(), 0)

    def _pipeline(self, op, submit, requests, flags):
        """
        Run requests, an iterable of (buffer, offset), with the handle's
        method named submit ("aio_pread" or "aio_pwrite"), keeping up to
        MAX_IN_FLIGHT in
        flight, and wait for all of them.

        Even after an error, waits for every submitted request before
        raising: a read may still write into the caller's buffer until it
        completes.
        """
        h = self._waiter
        in_flight = {}
        requests = iter(requests)
        more = True
        error = None

        while True:
            while more and error is None and len(in_flight) < MAX_IN_FLIGHT:
                req = next(requests, None)
                if req is None:
                    more = False
                    break
                buf, offset = req
                try:
                    cookie = getattr(h, submit)(buf, offset, flags=flags)
                except nbd.Error as e:
                    error = self._error(op, offset, len(buf), e)
                    break
                in_flight[cookie] = (offset, len(buf))

            for cookie in list(in_flight):
                try:
                    done = h.aio_command_completed(cookie)
                except nbd.Error as e:
                    done = True
                    if error is None:
                        error = self._error(op, *in_flight[cookie], e)
                if done:
                    del in_flight[cookie]

            if not in_flight and (error is not None or not more):
                break
            if more and error is None and len(in_flight) < MAX_IN_FLIGHT:
                continue

            try:
                offset, length = next(iter(in_flight.values()))
                self._waiter.poll(op, offset, length)
            except Error as e:
                # A dead, closed, interrupted or timed out connection.
                # Retire what we can; anything left keeps its buffer
                # referenced by libnbd until the handle goes away, and a
                # broken connection is never polled again, so no memory
                # is written after the call returns.
                if error is None:
                    error = e
                for cookie in in_flight:
                    try:
                        h.aio_command_completed(cookie)
                    except nbd.Error:
                        pass
                break

        if error is not None:
            try:
                raise error
            finally:
                # No cycle through this frame: the handle (and its
                # descriptor) goes with the last reference, not with the
                # garbage collector.
                error = None


def _byte_view(buf):
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
