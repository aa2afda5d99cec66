"""
An NBD connection that moves data between a socket and the export without
copying it through user space, for plain (non-TLS) HTTP connections.

State: connection. A Stream owns one NBD connection to one export and one
pipe. It is used by one HTTP connection's thread at a time (the images
Link's lock), so it has no lock of its own.

Theory of operation. libnbd reads a reply's payload into our buffer and
we send the buffer to the client: two copies of every byte in the daemon,
plus the hand-off between threads. Here the daemon speaks the NBD protocol
itself and moves payloads with splice(2): from the NBD socket into a pipe
and from the pipe into the client's socket (GET), or from the client's
socket into the pipe and from the pipe into the NBD socket (PUT). On
Linux >= 6.5 splicing between a pipe and a socket passes page references,
so the bytes are copied only by the peers: qemu-nbd when it sends, the
client when it receives. The daemon keeps the protocol work: headers,
block status, errors.

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
fixed newstyle handshake; NBD_OPT_STRUCTURED_REPLY; NBD_OPT_SET_META_CONTEXT
with base:allocation and qemu:allocation-depth, and for a dirty export
the one dirty bitmap NBD_OPT_LIST_META_CONTEXT finds; NBD_OPT_GO with
block size info. So one Stream serves every request of an HTTP
connection: data, zero extents skipped on a GET, /extents (zero and
dirty, as nbd/extents.py combines them) and /checksum (read_into), with
the same answers as the libnbd client (nbd/client.py). Reads carry
NBD_CMD_FLAG_DF when the server offers it, so a read's data comes as one
chunk that can be spliced whole.

Ordering: a read's reply is one chunk sent whole under qemu-nbd's send
lock, so once its header has arrived, the next read may be sent and its
reply will follow this one. That keeps two reads in flight (the server
reads the next piece while this one is spliced) without ever receiving
replies out of order.

Writes: a piece of up to MAX_WRITE bytes is one NBD_CMD_WRITE; its header
goes out with the piece's first pipe-full, the rest follows through the
pipe. A pipe holds a number of pages, not bytes, and small socket buffers
take a page each, so each fill moves what fits. A client that stops short
leaves its last piece incomplete: the server never executes it, the
complete pieces before it are acknowledged, and the connection is given
up. Write replies carry no data, so writes are pipelined
and their replies collected as they come and at the end of the request.

A Stream whose transfer was interrupted in the middle of a payload (the
client went away, a timeout) cannot be used again: `broken` is set and the
owner closes it.

Hung servers. The NBD socket stays blocking (splice(2) needs no poll
then) and gets kernel timeouts instead (SO_RCVTIMEO, SO_SNDTIMEO): a
recv, send or splice that makes no progress for `timeout` seconds fails
with EAGAIN, raised as Error(ETIMEDOUT), and the stream is broken. The
socket is registered with an Interrupt (nbd/client.py), whose fire()
from another thread shuts it down: a blocked recv or splice returns at
once, and the call fails with Error(ECANCELED). Errors of the client's
socket stay OSError (TimeoutError for its timeout), so the owner can
tell a failing export from a client that went away.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import mmap
import os
import select
import socket
import struct

from ovirt_imageio import image
from ovirt_imageio import pipes
from ovirt_imageio.nbd import client as nbd_client
from ovirt_imageio.nbd import extents

log = logging.getLogger(__name__)

Error = nbd_client.Error

# Handshake.
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
REPLY_MAGIC = 0x3e889045565a9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7

# Commands and their flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2

REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY = struct.Struct(">IIQ")
SIMPLE_REPLY_MAGIC = 0x67446698
CHUNK = struct.Struct(">IHHQI")
CHUNK_MAGIC = 0x668e33ef
CHUNK_FLAG_DONE = 1 << 0

CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) + 1
CHUNK_ERROR_OFFSET = (1 << 15) + 2

# NBD errors as the protocol numbers them (most equal Linux errno values).
_NBD_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM,
              22: errno.EINVAL, 28: errno.ENOSPC, 75: errno.EOVERFLOW,
              95: errno.EOPNOTSUPP, 108: errno.ESHUTDOWN}

# Pipe capacity: the most one splice moves. 1 MiB is the default
# /proc/sys/fs/pipe-max-size; a smaller pipe still works, in more calls.
PIPE_SIZE = 1024**2

# Largest read request (qemu-nbd's maximum is 32 MiB). Progress is
# reported, and cancellation checked, once per request; with one read
# ahead, 8 MiB keeps the server busy.
MAX_REQUEST = 8 * 1024**2

# Bytes of a read's payload moved at once through user space (send_to:
# TLS connections), while still in the CPU cache, rather than a whole
# piece (4 MiB) received first and read back from memory afterwards. In
# a single-connection micro benchmark of send_to over TLS: 1.67 CPU-s per
# GiB with whole pieces, 1.47 with 256 KiB chunks. In the daemon's
# benchmarks (4 and 32 connections on 2 cores) 1 MiB chunks measured the
# same CPU as whole pieces (256 KiB cost 15% more with 32), and a request
# touches only a chunk of its pooled buffer: peak RSS of 32 parallel TLS
# downloads 99 MiB instead of 195. (Writes stay whole pieces: the same
# chunks in write_from cost 8% more CPU on upload-https.)
TLS_CHUNK = 1024**2

# Bytes read from the NBD socket at once for replies (see _recv_exact).
RECV_BUFFER = 64 * 1024

# Largest write request; its bytes stream through the pipe. Fewer
# requests cost the daemon less: 8 MiB writes instead of one per pipe
# (<= 1 MiB) took its CPU on a unix-socket upload from 0.62x upstream's to
# ~0.5x. (How the request size changes qemu-nbd's own CPU was within the
# benchmark's noise: 4 MiB and 8 MiB both measured better in isolated
# tests, depending on the test.)
MAX_WRITE = 8 * 1024**2

# Write requests sent before waiting for a reply.
MAX_WRITES_IN_FLIGHT = 16

# Handshake replies larger than this are not from a sane server.
MAX_OPTION_REPLY = 64 * 1024

# Largest block status chunk accepted: qemu sends at most 1 MiB of
# extents per context (a badly fragmented image); larger is not sane.
MAX_BLOCK_STATUS_REPLY = 32 * 1024**2

_ZEROS = memoryview(bytes(PIPE_SIZE))


Interrupt = nbd_client.Interrupt


def open(address, timeout=None, interrupt=None, dirty=False):
    """
    Connect to the export at address (url.Address); return a Stream.

    Always requests base:allocation and qemu:allocation-depth. With
    dirty=True, also lists the export's dirty bitmaps and requests the
    bitmap if there is exactly one (as nbd.client.open does).

    timeout: seconds an NBD socket operation may make no progress (None:
    forever); the handshake and later calls fail with Error(ETIMEDOUT).
    interrupt: an Interrupt that may stop the stream's I/O from another
    thread.
    """
    if interrupt is None:
        interrupt = Interrupt()
    sock = nbd_client.connect(address, timeout, interrupt)
    try:
        if timeout is not None:
            tv = _timeval(timeout)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        return Stream(sock, address, timeout, interrupt, dirty=dirty)
    except BaseException:
        interrupt.close(sock)
        raise


def _timeval(seconds):
    sec = int(seconds)
    usec = int((seconds - sec) * 1e6)
    if sec == 0 and usec == 0:
        # Zero means no timeout to the kernel.
        usec = 1
    return struct.pack("@ll", sec, usec)


class Stream:
    """
    An open connection. Attributes: address, export_name, size,
    read_only, can_zero, can_flush, maximum_block_size,
    has_base_allocation, has_allocation_depth, dirty_bitmap (name or
    None), broken. An Image (ovirt_imageio/image.py): can_extents,
    can_splice (True: send() and receive() splice sockets).
    """

    def __init__(self, sock, address, timeout=None, interrupt=None,
                 dirty=False):
        self._sock = sock
        self.address = address
        self.export_name = address.export
        self.timeout = timeout
        self._interrupt = interrupt or Interrupt()
        self.broken = False
        # What a failure of the NBD socket is reported as (op, offset,
        # length): set by each call.
        self._op = ("connect", 0, 0)
        self._cookies = itertools.count(1)
        self._structured = False
        # Negotiated meta contexts: id -> name, and name -> id.
        self._context_names = {}
        self._context_ids = {}
        self._writes = 0
        # Block status requests in flight: cookie -> replies so far, and
        # those whose reply is complete.
        self._status = {}
        self._status_done = set()
        self._pipe = None
        self._pipe_size = 0
        # Anonymous memory: only the pages a read touches are resident (a
        # reply and a small read's data: a page or two), not 64 KiB zeroed
        # for every connection.
        self._rbuf = mmap.mmap(-1, RECV_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rpos = self._rend = 0
        self.dirty_bitmap = None
        self._handshake(address.export, dirty)
        self.has_base_allocation = (
            extents.BASE_ALLOCATION in self._context_ids)
        self.has_allocation_depth = (
            extents.ALLOCATION_DEPTH in self._context_ids)
        self._max_request = min(self.maximum_block_size, MAX_REQUEST)
        self._max_write = min(self.maximum_block_size, MAX_WRITE)

    def __repr__(self):
        return f"<Stream address={self.address} size={self.size}>"

    # The Image contract (ovirt_imageio/image.py): moving a range.

    can_splice = True

    @property
    def can_extents(self):
        return self.has_base_allocation

    def send(self, dst, offset, length, *, buf=None, begin=None, done=None):
        """
        Send length bytes at offset to dst: spliced to a socket, else
        received into buf and given to the callable dst (send_to).
        """
        if isinstance(dst, socket.socket):
            self._send_spliced(dst, offset, length, begin, done)
        else:
            self.send_to(dst, image.pieces(buf, length), offset, length,
                         begin, done)

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        """
        Write length bytes from src at offset: spliced from a socket
        (after prefix), else read with the callable src into buf
        (write_from). With flush, flushed before returning.
        """
        if isinstance(src, socket.socket):
            self._receive_spliced(src, offset, length, prefix, done)
        else:
            if len(prefix):
                raise ValueError("prefix is for a socket source")
            self.write_from(src, image.pieces(buf, length), offset, length,
                            done)
        if flush:
            self.flush()

    # Data to and from sockets.

    def _send_spliced(self, sock, offset, length, begin=None, done=None):
        """
        Send length bytes of the image from offset to the socket sock,
        in pieces of at most the server's maximum request. begin() is
        called once the first piece's reply arrived without error, before
        its first byte moves, so a failed read can still be answered with
        an error response; done(bytes) is called after each piece.
        """
        self._check_open()
        self._op = ("read", offset, length)
        self._read_pieces(offset, length, self._max_request,
                          lambda n: self._splice_out(sock, n), begin, done)

    def send_to(self, write, buf, offset, length, begin=None, done=None):
        """
        Like send(), for a connection whose bytes must pass through user
        space (TLS): each piece is received into buf, reused, and given to
        write() in chunks of at most TLS_CHUNK bytes, each as soon as it
        arrived. No thread: while write() encrypts and sends a chunk, the
        server is already sending the next (one read ahead).
        """
        self._check_open()
        self._op = ("read", offset, length)
        view = memoryview(buf).cast("B")

        chunk = min(TLS_CHUNK, len(view))

        def move(n):
            while n:
                piece = view[:min(n, chunk)]
                self._recv_payload(piece)
                write(piece)
                n -= len(piece)

        self._read_pieces(offset, length, min(self._max_request, len(view)),
                          move, begin, done)

    def read_into(self, buf, offset):
        """
        Fill the whole writable buffer buf with the image's bytes from
        offset (a checksum's blocks), with one read ahead as send() does.
        """
        self._check_open()
        view = memoryview(buf).cast("B")
        if view.readonly:
            raise TypeError("read_into() needs a writable buffer")
        self._op = ("read", offset, len(view))
        pos = 0

        def move(n):
            nonlocal pos
            self._recv_payload(view[pos:pos + n])
            pos += n

        self._read_pieces(offset, len(view), self._max_request, move,
                          None, None)

    def _read_pieces(self, offset, length, step, move, begin, done):
        end = offset + length
        pos = offset
        pending = None
        try:
            if pos < end:
                pending = self._submit_read(pos, min(end - pos, step))
            while pending is not None:
                cookie, start, n = pending
                pending = None
                done_flag = self._read_header(cookie, start, n)
                pos = start + n
                if done_flag and pos < end:
                    # This reply is being sent whole; the next one will
                    # come after it.
                    pending = self._submit_read(pos, min(end - pos, step))
                if begin is not None:
                    begin()
                    begin = None
                move(n)
                if not done_flag:
                    self._read_final(cookie, start, n)
                    if pos < end:
                        pending = self._submit_read(
                            pos, min(end - pos, step))
                if done is not None:
                    done(n)
        except BaseException:
            # A reply or a read ahead may be left unread.
            self.broken = True
            raise

    def _receive_spliced(self, sock, offset, length, prefix=b"", done=None):
        """
        Write length bytes read from the socket sock at offset: first the
        bytes of prefix (body bytes the caller had buffered), then the
        rest from sock. Returns once every write was acknowledged.

        The body goes in pieces of up to MAX_WRITE bytes. A piece's
        NBD_CMD_WRITE header is sent with its first bytes, and the rest
        streams through the pipe. If sock ends early, every complete piece
        is written and acknowledged, the incomplete one is abandoned (the
        server never executes a request it did not receive whole), the
        Stream is broken, and EOFError is raised with the number of body
        bytes received.
        """
        self._check_open()
        self._op = ("write", offset, length)
        prefix = memoryview(prefix)
        pos, end = offset, offset + length
        try:
            while pos < end:
                n = min(end - pos, self._max_write)
                head = prefix[:n]
                prefix = prefix[len(head):]
                left = n - len(head)
                got, eof = 0, False
                if left:
                    got, eof = self._fill_pipe(
                        sock, min(left, self._pipe_capacity()))
                if eof:
                    # Nothing of this piece was sent.
                    self._drain_pipe()
                    self._wait_writes(0)
                    raise EOFError(pos - offset + len(head) + got)
                self._send_write_header(pos, n, head)
                if got:
                    self._splice_to_nbd(got)
                left -= got
                while left:
                    got, eof = self._fill_pipe(
                        sock, min(left, self._pipe_capacity()))
                    self._splice_to_nbd(got)
                    left -= got
                    if eof:
                        self._abandon_write()
                        raise EOFError(pos - offset + n - left)
                pos += n
                self._wait_writes(MAX_WRITES_IN_FLIGHT)
                if done is not None:
                    done(n)
            self._wait_writes(0)
        except (Error, EOFError):
            raise
        except BaseException:
            self.broken = True
            raise

    def write_from(self, read_into, buf, offset, length, done=None):
        """
        Write length bytes at offset, read with read_into(view) into buf,
        reused (TLS connections, whose bytes pass through user space).
        read_into fills the whole view or raises. Writes are pipelined:
        the server writes one piece while the next is received. Returns
        once every write was acknowledged; if read_into raises, the
        complete pieces are acknowledged first.
        """
        self._check_open()
        self._op = ("write", offset, length)
        view = memoryview(buf).cast("B")
        step = min(self._max_write, len(view))
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, step)
            piece = view[:n]
            try:
                read_into(piece)
            except BaseException:
                self._wait_writes(0)
                raise
            try:
                self._send_write_header(pos, n, piece)
            except BaseException:
                self.broken = True
                raise
            pos += n
            self._wait_writes(MAX_WRITES_IN_FLIGHT)
            if done is not None:
                done(n)
        self._wait_writes(0)

    def write(self, buf, offset):
        """
        Write all of buf at offset: pipelined NBD_CMD_WRITEs of up to
        MAX_WRITE bytes, sent from buf as it is (sendmsg, no copy).
        Returns once every write was acknowledged.
        """
        self._check_open()
        view = memoryview(buf).cast("B")
        self._op = ("write", offset, len(view))
        pos = 0
        while pos < len(view):
            n = min(len(view) - pos, self._max_write)
            self._send_write_header(offset + pos, n, view[pos:pos + n])
            pos += n
            self._wait_writes(MAX_WRITES_IN_FLIGHT)
        self._wait_writes(0)

    def _check_open(self):
        if self._sock is None:
            raise ValueError("I/O on closed NBD stream")
        if self._interrupt.fired:
            self.broken = True
            raise nbd_client.interrupted(*self._op)

    def _abandon_write(self):
        """
        The body ended inside a piece whose header was sent: collect the
        replies to the complete pieces before it, then give up this
        connection.
        """
        self.broken = True
        self._writes -= 1
        self._wait_writes(0)

    # Commands without data.

    def zero(self, length, offset, punch_hole=False):
        self._check_open()
        self._op = ("zero", offset, length)
        if not self.can_zero:
            self._write_zeros(length, offset)
            return
        flags = 0 if punch_hole else CMD_FLAG_NO_HOLE
        end = offset + length
        while offset < end:
            n = min(end - offset, nbd_client.MAX_ZERO)
            self._command(CMD_WRITE_ZEROES, flags, offset, n, "zero")
            offset += n

    def flush(self):
        self._check_open()
        self._op = ("flush", 0, 0)
        if self.can_flush:
            self._command(CMD_FLUSH, 0, 0, 0, "flush")

    def extents(self, context="zero", offset=0, length=None):
        """
        Return the merged extents covering the image from offset for
        length bytes (default: to the end): ZeroExtent for context "zero"
        (holes from allocation depth), DirtyExtent for "dirty". The same
        answers as nbd.client.Client.extents().

        Raises errors.Unsupported for "dirty" if the export does not have
        exactly one dirty bitmap.
        """
        self._check_open()
        self._op = ("block_status", offset, length or 0)
        extents.validate(context, bitmap=self.dirty_bitmap,
                         export_name=self.export_name)
        end = self.size if length is None else min(offset + length,
                                                   self.size)
        if context == "zero" and not self.has_base_allocation:
            if offset >= end:
                return []
            return [extents.ZeroExtent(offset, end - offset, zero=False,
                                       hole=False)]
        names = self._contexts(context)
        self._wait_writes(0)
        result = []
        # Windows of MAX_BLOCK_STATUS, BLOCK_STATUS_IN_FLIGHT of them in
        # flight (as nbd.client does): a huge sparse image costs a few
        # round trips, not one per window. Used in order; a reply that
        # covers only part of its window is followed by a request for the
        # rest, used next.
        pending = collections.deque()
        next_offset = offset
        try:
            while pending or next_offset < end:
                while (next_offset < end
                       and len(pending) < nbd_client.BLOCK_STATUS_IN_FLIGHT):
                    n = min(end - next_offset, nbd_client.MAX_BLOCK_STATUS)
                    pending.append(self._submit_block_status(next_offset, n))
                    next_offset += n
                start, n, cookie = pending.popleft()
                replies = self._block_status(cookie, start, n)
                found = extents.clip(
                    extents.combine(
                        context, start, replies,
                        base_allocation=self.has_base_allocation,
                        allocation_depth=self.has_allocation_depth,
                        bitmap=self.dirty_bitmap),
                    start + n)
                if not found:
                    raise Error("block_status", start, n, errno.EPROTO,
                                f"server replied without extents for some "
                                f"of {sorted(names)}")
                result[-1:] = extents.merge(result[-1:] + found)
                reached = found[-1].start + found[-1].length
                if reached < start + n:
                    pending.appendleft(self._submit_block_status(
                        reached, start + n - reached))
        except BaseException:
            # Replies of requests in flight are left unread.
            if pending or self._status:
                self.broken = True
            raise
        return result

    def _contexts(self, context):
        return extents.contexts(
            context, base_allocation=self.has_base_allocation,
            allocation_depth=self.has_allocation_depth,
            bitmap=self.dirty_bitmap)

    def close(self):
        """Disconnect; safe to call more than once."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            if not self.broken and self._writes == 0:
                sock.sendall(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC,
                                          next(self._cookies), 0, 0))
        except OSError as e:
            log.debug("Error disconnecting from %s: %s", self.address, e)
        finally:
            self._interrupt.close(sock)
            if self._pipe is not None:
                for fd in self._pipe:
                    os.close(fd)
                self._pipe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Handshake.

    def _handshake(self, export, dirty):
        magic = self._recv_exact(16)
        if magic[:8] != NBDMAGIC or magic[8:] != IHAVEOPT:
            raise Error("connect", 0, 0, errno.EPROTO,
                        "Not a fixed newstyle NBD server")
        (flags,) = struct.unpack(">H", self._recv_exact(2))
        if not flags & FLAG_FIXED_NEWSTYLE:
            raise Error("connect", 0, 0, errno.EPROTO,
                        "Server does not support fixed newstyle")
        self._nbd_send(struct.pack(
            ">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))

        self._option(OPT_STRUCTURED_REPLY, b"")
        if self._structured:
            queries = [extents.BASE_ALLOCATION, extents.ALLOCATION_DEPTH]
            if dirty:
                self.dirty_bitmap = self._find_bitmap(export)
                if self.dirty_bitmap is not None:
                    queries.append(
                        extents.DIRTY_BITMAP_PREFIX + self.dirty_bitmap)
            for ctx_id, name in self._option(
                    OPT_SET_META_CONTEXT, _meta_query(export, queries)):
                if name in queries:
                    self._context_names[ctx_id] = name
                    self._context_ids[name] = ctx_id
            if (self.dirty_bitmap is not None
                    and extents.DIRTY_BITMAP_PREFIX + self.dirty_bitmap
                    not in self._context_ids):
                self.dirty_bitmap = None

        name = export.encode("utf-8")
        data = (struct.pack(">I", len(name)) + name
                + struct.pack(">HH", 1, INFO_BLOCK_SIZE))
        self.maximum_block_size = nbd_client.DEFAULT_MAXIMUM_BLOCK_SIZE
        self.size = None
        self._option(OPT_GO, data)
        if self.size is None:
            raise Error("connect", 0, 0, errno.EPROTO,
                        "Server did not send the export size")

    def _find_bitmap(self, export):
        """
        The name of the export's dirty bitmap if it has exactly one, else
        None. A server without NBD_OPT_LIST_META_CONTEXT has none.
        """
        prefix = extents.DIRTY_BITMAP_PREFIX
        listed = self._option(OPT_LIST_META_CONTEXT,
                              _meta_query(export, [prefix]))
        bitmaps = sorted({name[len(prefix):] for _, name in listed
                          if name.startswith(prefix)
                          and len(name) > len(prefix)})
        if len(bitmaps) > 1:
            log.warning("NBD export %s has %d dirty bitmaps, expecting one",
                        self.address, len(bitmaps))
        return bitmaps[0] if len(bitmaps) == 1 else None

    def _option(self, option, data):
        """
        Send an option and read its replies; return the meta contexts
        replied, [(id, name)].
        """
        self._nbd_send(IHAVEOPT + struct.pack(">II", option, len(data))
                       + data)
        contexts = []
        while True:
            magic, opt, kind, length = struct.unpack(
                ">QIII", self._recv_exact(20))
            if magic != REPLY_MAGIC or opt != option:
                raise Error("connect", 0, 0, errno.EPROTO,
                            f"Bad option reply {magic:#x} for {opt}")
            if length > MAX_OPTION_REPLY:
                raise Error("connect", 0, 0, errno.EPROTO,
                            f"Option reply too large: {length}")
            payload = self._recv_exact(length)
            if kind == REP_ACK:
                if option == OPT_STRUCTURED_REPLY:
                    self._structured = True
                return contexts
            if kind & REP_FLAG_ERROR:
                if option == OPT_GO:
                    raise Error("connect", 0, 0, errno.ENOENT,
                                f"Server refused export "
                                f"{self.address.export!r}: "
                                f"{payload.decode('utf-8', 'replace')}")
                # Optional features: go on without them.
                return []
            if kind == REP_INFO and option == OPT_GO:
                self._info(payload)
            elif kind == REP_META_CONTEXT and len(payload) >= 4:
                (ctx_id,) = struct.unpack(">I", payload[:4])
                contexts.append(
                    (ctx_id, payload[4:].decode("utf-8", "replace")))

    def _info(self, payload):
        (kind,) = struct.unpack(">H", payload[:2])
        if kind == INFO_EXPORT and len(payload) >= 12:
            self.size, flags = struct.unpack(">QH", payload[2:12])
            self.read_only = bool(flags & FLAG_READ_ONLY)
            self.can_flush = bool(flags & FLAG_SEND_FLUSH)
            self.can_zero = bool(flags & FLAG_SEND_WRITE_ZEROES)
            self._can_df = bool(flags & FLAG_SEND_DF)
        elif kind == INFO_BLOCK_SIZE and len(payload) >= 14:
            _, _, maximum = struct.unpack(">III", payload[2:14])
            if maximum:
                self.maximum_block_size = maximum

    # Transmission.

    def _request(self, cmd, flags, offset, length, more=False):
        cookie = next(self._cookies)
        self._nbd_send(
            REQUEST.pack(REQUEST_MAGIC, flags, cmd, cookie, offset, length),
            socket.MSG_MORE if more else 0)
        return cookie

    def _submit_read(self, offset, length):
        flags = CMD_FLAG_DF if self._structured and self._can_df else 0
        return self._request(CMD_READ, flags, offset, length), offset, length

    def _read_header(self, cookie, offset, length):
        """
        Read the header of a read's reply, leaving its data in the socket.
        Returns True if this is the reply's last chunk.
        """
        magic = self._recv_exact(4)
        (value,) = struct.unpack(">I", magic)
        if value == SIMPLE_REPLY_MAGIC:
            err, got = struct.unpack(">IQ", self._recv_exact(12))
            self._check_cookie(got, cookie, "read", offset, length)
            if err:
                self._raise("read", offset, length, err, "")
            return True
        if value != CHUNK_MAGIC:
            raise self._protocol("read", offset, length,
                                 f"bad reply magic {value:#x}")
        flags, kind, got, size = struct.unpack(">HHQI", self._recv_exact(16))
        self._check_cookie(got, cookie, "read", offset, length)
        if kind & (1 << 15):
            self._raise_chunk_error("read", offset, length, size)
        if kind != CHUNK_OFFSET_DATA or size != length + 8:
            raise self._protocol(
                "read", offset, length,
                f"unexpected chunk type {kind} length {size}")
        (data_offset,) = struct.unpack(">Q", self._recv_exact(8))
        if data_offset != offset:
            raise self._protocol("read", offset, length,
                                 f"data for offset {data_offset}")
        return bool(flags & CHUNK_FLAG_DONE)

    def _read_final(self, cookie, offset, length):
        """Read the final, empty chunk of a read sent without DONE."""
        magic, flags, kind, got, size = CHUNK.unpack(self._recv_exact(20))
        if magic != CHUNK_MAGIC or got != cookie:
            raise self._protocol("read", offset, length,
                                 "reply out of order")
        if kind & (1 << 15):
            self._raise_chunk_error("read", offset, length, size)
        if kind != CHUNK_NONE or not flags & CHUNK_FLAG_DONE or size:
            raise self._protocol("read", offset, length,
                                 f"unexpected chunk type {kind}")

    def _send_write_header(self, offset, length, head):
        """Send a write's header and the first bytes of its payload."""
        cookie = next(self._cookies)
        try:
            _send_all(
                self._sock,
                [REQUEST.pack(REQUEST_MAGIC, 0, CMD_WRITE, cookie, offset,
                              length), head],
                socket.MSG_MORE if len(head) < length else 0)
        except OSError as e:
            raise self._failed(e) from None
        self._writes += 1

    def _wait_writes(self, limit):
        """Collect write replies until at most limit are outstanding."""
        error = None
        while self._writes > limit:
            _, err, message = self._reply("write", 0, 0)
            self._writes -= 1
            if err and error is None:
                error = (err, message)
        if error is not None:
            self._raise("write", 0, 0, *error)

    def _command(self, cmd, flags, offset, length, op):
        self._wait_writes(0)
        cookie = self._request(cmd, flags, offset, length)
        got, err, message = self._reply(op, offset, length)
        self._check_cookie(got, cookie, op, offset, length)
        if err:
            self._raise(op, offset, length, err, message)

    def _reply(self, op, offset, length):
        """
        Read the whole reply to a command without data: a simple reply,
        or (servers send errors so once structured replies are on) one
        final chunk. Returns (cookie, nbd error, message).
        """
        (magic,) = struct.unpack(">I", self._recv_exact(4))
        if magic == SIMPLE_REPLY_MAGIC:
            err, cookie = struct.unpack(">IQ", self._recv_exact(12))
            return cookie, err, ""
        if magic != CHUNK_MAGIC:
            raise self._protocol(op, offset, length,
                                 f"bad reply magic {magic:#x}")
        flags, kind, cookie, size = struct.unpack(">HHQI",
                                                  self._recv_exact(16))
        if size > MAX_OPTION_REPLY or not flags & CHUNK_FLAG_DONE:
            raise self._protocol(op, offset, length,
                                 f"unexpected chunk type {kind}")
        payload = self._recv_exact(size)
        if kind & (1 << 15) and size >= 6:
            err, msg_len = struct.unpack(">IH", payload[:6])
            return cookie, err, payload[6:6 + msg_len].decode(
                "utf-8", "replace")
        if kind != CHUNK_NONE:
            raise self._protocol(op, offset, length,
                                 f"unexpected chunk type {kind}")
        return cookie, 0, ""

    def _submit_block_status(self, offset, length):
        """Send a block status request; return (offset, length, cookie)."""
        cookie = self._request(CMD_BLOCK_STATUS, 0, offset, length)
        self._status[cookie] = {}
        return offset, length, cookie

    def _block_status(self, cookie, offset, length):
        """
        Return {context name: entries [length, flags, ...]} of the block
        status request cookie, the first reply of each negotiated
        context. Replies to requests in flight come in any order, their
        chunks interleaved: each chunk goes to its own request until
        this one is done.
        """
        while cookie not in self._status_done:
            magic, flags, kind, got, size = CHUNK.unpack(
                self._recv_exact(20))
            if magic != CHUNK_MAGIC or got not in self._status:
                raise self._protocol("block_status", offset, length,
                                     "bad reply")
            if kind & (1 << 15):
                self._raise_chunk_error("block_status", offset, length,
                                        size)
            if size > MAX_BLOCK_STATUS_REPLY:
                raise self._protocol("block_status", offset, length,
                                     f"reply of {size} bytes")
            payload = bytearray(size)
            self._recv_payload(memoryview(payload))
            if kind == CHUNK_BLOCK_STATUS and size >= 4:
                (ctx_id,) = struct.unpack(">I", payload[:4])
                count = (size - 4) // 4
                values = struct.unpack(f">{count}I",
                                       payload[4:4 + count * 4])
                name = self._context_names.get(ctx_id)
                replies = self._status[got]
                if name is not None and name not in replies:
                    replies[name] = list(values)
            if flags & CHUNK_FLAG_DONE:
                self._status_done.add(got)
        self._status_done.discard(cookie)
        return self._status.pop(cookie)

    def _write_zeros(self, length, offset):
        end = offset + length
        while offset < end:
            n = min(end - offset, len(_ZEROS), self._max_request)
            cookie = next(self._cookies)
            try:
                _send_all(self._sock, [REQUEST.pack(REQUEST_MAGIC, 0,
                                                    CMD_WRITE, cookie,
                                                    offset, n),
                                       _ZEROS[:n]])
            except OSError as e:
                raise self._failed(e) from None
            self._writes += 1
            self._wait_writes(MAX_WRITES_IN_FLIGHT)
            offset += n
        self._wait_writes(0)

    # Errors.

    def _check_cookie(self, got, cookie, op, offset, length):
        if got != cookie:
            raise self._protocol(op, offset, length,
                                 f"reply for request {got}, expected {cookie}")

    def _raise_chunk_error(self, op, offset, length, size):
        if not 6 <= size <= MAX_OPTION_REPLY:
            raise self._protocol(op, offset, length,
                                 f"error chunk of {size} bytes")
        payload = self._recv_exact(size)
        err, msg_len = struct.unpack(">IH", payload[:6])
        message = payload[6:6 + msg_len].decode("utf-8", "replace")
        self._raise(op, offset, length, err, message)

    def _raise(self, op, offset, length, err, message):
        code = _NBD_ERRNO.get(err, err)
        raise Error(op, offset, length, code,
                    message or os.strerror(code))

    def _protocol(self, op, offset, length, message):
        self.broken = True
        return Error(op, offset, length, errno.EPROTO,
                     f"NBD protocol error: {message}")

    # Sockets and the pipe.

    def _recv_exact(self, n):
        """
        Return the next n bytes of the NBD socket. Reads as much as the
        socket has (up to RECV_BUFFER), so a small read's reply comes in
        one system call; payload bytes read this way are sent from here
        by _splice_out.
        """
        while self._rend - self._rpos < n:
            if self._rpos:
                left = self._rend - self._rpos
                self._rbuf[:left] = self._rbuf[self._rpos:self._rend]
                self._rpos, self._rend = 0, left
            try:
                got = self._sock.recv_into(self._rview[self._rend:])
            except OSError as e:
                raise self._failed(e) from None
            if got == 0:
                raise self._eof()
            self._rend += got
        data = bytes(self._rview[self._rpos:self._rpos + n])
        self._rpos += n
        return data

    def _pipe_capacity(self):
        if self._pipe is None:
            r, w, self._pipe_size = pipes.open_pipe(PIPE_SIZE)
            self._pipe = (r, w)
        return self._pipe_size

    def _recv_payload(self, view):
        """
        Fill view with payload bytes: buffered ones first. MSG_WAITALL:
        one system call (and one release of the GIL) per view, not one per
        socket buffer the server fills; it returns short only on a timeout
        or a shutdown, and the loop goes on or fails as before.
        """
        pos = min(self._rend - self._rpos, len(view))
        if pos:
            view[:pos] = self._rview[self._rpos:self._rpos + pos]
            self._rpos += pos
        while pos < len(view):
            try:
                got = self._sock.recv_into(view[pos:], 0, socket.MSG_WAITALL)
            except OSError as e:
                raise self._failed(e) from None
            if got == 0:
                raise self._eof()
            pos += got

    def _splice_out(self, sock, length):
        """Move length payload bytes from the NBD socket to sock."""
        self._pipe_capacity()
        r, w = self._pipe
        src = self._sock.fileno()
        left = length
        buffered = min(self._rend - self._rpos, left)
        if buffered:
            sock.sendall(self._rview[self._rpos:self._rpos + buffered])
            self._rpos += buffered
            left -= buffered
        while left:
            try:
                n = os.splice(src, w, min(left, self._pipe_size))
            except OSError as e:
                raise self._failed(e) from None
            if n == 0:
                raise self._eof()
            self._splice_all(r, sock, n)
            left -= n

    def _fill_pipe(self, sock, length):
        """
        Splice up to length bytes from sock into the empty pipe. Returns
        (count, eof). Stops short when the pipe is full: a pipe holds a
        number of pages, and a socket's data may come in pieces smaller
        than a page, so its capacity in bytes is not known in advance.
        """
        w = self._pipe[1]
        fd = sock.fileno()
        # The first splice may wait (the pipe is empty, it cannot fill).
        got = _splice(sock, w, length, select.POLLIN)
        if got == 0:
            return 0, True
        while got < length:
            try:
                n = os.splice(fd, w, length - got,
                              flags=os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if pipes.ready(fd, select.POLLIN, 0):
                    # Data is waiting, so the pipe is full.
                    return got, False
                if not pipes.ready(fd, select.POLLIN, sock.gettimeout()):
                    raise TimeoutError("timed out") from None
                continue
            if n == 0:
                return got, True
            got += n
        return got, False

    def _drain_pipe(self):
        """Drop what is in the pipe (a body that ended early)."""
        r = self._pipe[0]
        os.set_blocking(r, False)
        try:
            while True:
                try:
                    if not os.read(r, PIPE_SIZE):
                        break
                except BlockingIOError:
                    break
        finally:
            os.set_blocking(r, True)

    def _splice_to_nbd(self, length):
        """Splice exactly length bytes from the pipe to the NBD socket."""
        r, dst = self._pipe[0], self._sock.fileno()
        while length:
            try:
                length -= os.splice(r, dst, length)
            except OSError as e:
                raise self._failed(e) from None

    def _nbd_send(self, data, flags=0):
        try:
            self._sock.sendall(data, flags)
        except OSError as e:
            raise self._failed(e) from None

    def _failed(self, e):
        """
        Error for OSError e of the NBD socket: interrupted, timed out
        (SO_RCVTIMEO and SO_SNDTIMEO fail with EAGAIN), or failed.
        """
        self.broken = True
        if self._interrupt.fired:
            return nbd_client.interrupted(*self._op)
        if isinstance(e, (BlockingIOError, TimeoutError)):
            return nbd_client.timed_out(*self._op, self.timeout)
        return Error(*self._op, e.errno or errno.EIO,
                     f"NBD connection failed: {e.strerror or e}")

    def _eof(self):
        self.broken = True
        if self._interrupt.fired:
            return nbd_client.interrupted(*self._op)
        return Error(*self._op, errno.ECONNRESET,
                     "NBD server closed the connection")

    def _splice_all(self, r, dst, length):
        """Splice exactly length bytes from the pipe r to dst."""
        while length:
            length -= _splice(dst, r, length, select.POLLOUT)


def _meta_query(export, queries):
    """The data of NBD_OPT_SET_META_CONTEXT or _LIST_META_CONTEXT."""
    name = export.encode("utf-8")
    data = (struct.pack(">I", len(name)) + name
            + struct.pack(">I", len(queries)))
    for query in queries:
        q = query.encode("utf-8")
        data += struct.pack(">I", len(q)) + q
    return data


def _send_all(sock, buffers, flags=0):
    """
    Send every byte of buffers (a request header and its payload) with
    sendmsg: joining them would copy the payload, up to MAX_WRITE bytes,
    into a new object first.
    """
    buffers = [memoryview(b).cast("B") for b in buffers if len(b)]
    while buffers:
        sent = sock.sendmsg(buffers, (), flags)
        while buffers and sent >= len(buffers[0]):
            sent -= len(buffers.pop(0))
        if sent:
            buffers[0] = buffers[0][sent:]


def _splice(sock, pipe_fd, length, event):
    """
    splice(2) between a socket object and a pipe fd, in the direction
    event says (POLLIN: socket to pipe, POLLOUT: pipe to socket). The
    client's socket may have a timeout (it is then non-blocking): wait for
    it with poll, as socket methods do, and raise TimeoutError.
    """
    fd = sock.fileno()
    while True:
        try:
            if event == select.POLLIN:
                return os.splice(fd, pipe_fd, length)
            return os.splice(pipe_fd, fd, length)
        except BlockingIOError:
            if not pipes.ready(fd, event, sock.gettimeout()):
                raise TimeoutError("timed out") from None
