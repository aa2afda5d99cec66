"""
A local raw file, read and written directly: no qemu-nbd in between.

Why: a raw image's guest data are its bytes, so a private qemu-nbd adds
nothing but a process that copies every byte twice (socket to its buffer,
buffer to the file, or back). On this 2-core machine that process used as
much CPU as the daemon's own qemu-nbd, and both compete with the client
and the daemon. nbdcopy, the benchmark's baseline, writes files directly
in the same way.

On the daemon's unix socket an upload's bytes never pass through Python:
file -> socket with sendfile(2), which hands the page cache's pages to
the socket. A download's could (receive(): socket -> pipe -> file with
splice(2), the file written at an offset, so workers share nothing), but
downloads go through the worker's buffer on every transport, where
transfer.py finds the blocks of zeros and does not write them (see
transfer.SPLICE_DOWNLOADS). Through a buffer: pread / pwrite.

What qemu would show, and so what a qemu-nbd export of the file would
serve, is kept exactly:

- the size is the image's virtual size, which qemu rounds up to 512
  bytes; bytes past the end of the file read as zeros;
- zero extents are the file's holes (SEEK_HOLE / SEEK_DATA), as qemu's
  file driver finds them, plus the tail past the end of the file; like
  qemu with allocation depth, none is a hole in the sense of the API
  ("unallocated": reads from a backing chain), as a raw image has none;
- a new image is created as qemu-img create would: a sparse file whose
  size is rounded up to 512 bytes.

Used for raw images in regular files, and for a raw download to a block
device (a Forklift/MTV volume: `ovirt-img download-disk -f raw DISK
/dev/xxx`); anything else (qcow2, a tar member, reading a block device)
goes through qemu-nbd (local.py). Each connect() opens the file again, so
every worker has its own descriptor, as it would have its own NBD
connection.

A block device is never created, truncated or removed here:
check_device() only checks that it is not in use and large enough. Its
old contents are garbage, so the download zeroes every zero extent
(transfer.download() with zero and hole), and zero() makes the kernel
zero the device (fallocate(2) on a block device: WRITE ZEROES or a
discard where the device zeroes that way, else the kernel writes zeros
itself); zeros are written from here only for the parts of a range that
are not page aligned, or if the kernel cannot. The device may be larger
than the image: only the image's size bytes are written, read and
checksummed (File.size). Its length is found with lseek(SEEK_END), as a
block device's st_size is 0, and it is all data (no SEEK_DATA there).
"""

import errno
import os
import select
import socket
import stat

from ovirt_imageio import errors
from ovirt_imageio import pipes
from ovirt_imageio.nbd import extents as nbd_extents

# ovirt_imageio.image (the Image contract's helpers) is imported where it
# is used: it imports typing, which the client library does not load when
# it starts.

# Most bytes moved by one sendfile or splice call, and so between two
# progress reports and two checks for a stopped transfer.
STEP = 8 * 1024**2

# Pipe capacity for splicing a socket into the file; what one splice
# moves at most.
PIPE_SIZE = 1024**2

SECTOR = 512

# What a block device's range is aligned to before fallocate() zeroes it:
# a page, so the kernel drops only whole pages of the device's page cache
# (File._zero_device()); a multiple of every logical block size Linux
# supports (512 to the page size).
DEVICE_ALIGNMENT = os.sysconf("SC_PAGESIZE")


def usable(filename, fmt):
    """
    True if an image of format fmt at filename can be used directly: a
    raw image in a regular file (or, for a new image, a path that does
    not exist yet).
    """
    if fmt != "raw":
        return False
    try:
        st = os.stat(filename)
    except FileNotFoundError:
        return True
    return stat.S_ISREG(st.st_mode)


def is_block_device(filename):
    """True if filename is (or links to) a block device."""
    try:
        return stat.S_ISBLK(os.stat(filename).st_mode)
    except FileNotFoundError:
        return False


def check_device(filename, size=None):
    """
    Check that the block device filename can be written: not in use, and
    (unless size is None) holding at least size bytes; raise OSError
    (EBUSY) or ValueError naming both sizes if not. Nothing is written.

    Opened exclusively (O_EXCL on a block device): a device that is
    mounted or held by another exclusive user (a device mapper table, an
    md array) fails here with EBUSY, before anything is written to it.
    """
    fd = os.open(filename, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
    try:
        device_size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size is not None and device_size < size:
        raise ValueError(
            f"Block device {filename} is too small for the image: "
            f"{device_size} bytes, the image needs {size}")


def create(filename, size):
    """
    Create (or replace) filename as an empty sparse raw image of size
    bytes, rounded up to 512 as qemu-img create does.
    """
    fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                 | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, _round_up(size))
    finally:
        os.close(fd)


class Export:
    """
    A raw file, offered as local.Export offers a qemu-nbd export: every
    connect() gives a File with its own descriptor. Nothing to start, so
    it serves as local.LazyExport too.
    """

    def __init__(self, filename, size, read_only=True):
        self.filename = filename
        self.fmt = "raw"
        self.size = size
        self.read_only = read_only
        self.started = False

    def connect(self):
        self.started = True
        return File(self.filename, self.size, read_only=self.read_only)

    # Transfers ask for a stream when the remote side splices; a File
    # splices too.
    connect_stream = connect

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class File:
    """
    One open descriptor of a raw image of size bytes: an Image
    (ovirt_imageio/image.py) whose send() and receive() use sendfile(2)
    and splice(2) with a socket.
    """

    def __init__(self, filename, size, read_only=True):
        flags = os.O_RDONLY if read_only else os.O_RDWR
        self._fd = os.open(filename, flags | os.O_CLOEXEC)
        self.filename = filename
        self.size = size
        self.read_only = read_only
        self._pipe = None
        try:
            self._block = stat.S_ISBLK(os.fstat(self._fd).st_mode)
        except BaseException:
            os.close(self._fd)
            raise

    def __repr__(self):
        return f"<rawfile.File {self.filename!r} size={self.size}>"

    # What the file holds: its length, which may be less than size (or,
    # for a block device, more). lseek, not fstat: a block device's
    # st_size is 0. Every read and write takes its offset, so moving the
    # descriptor's position harms nothing.

    def _file_size(self):
        return os.lseek(self._fd, 0, os.SEEK_END)

    # Extents.

    def extents(self, context="zero", offset=0, length=None):
        """
        Zero extents from offset, covering length bytes (the rest of the
        image if None): the file's holes read as zeros, and so does the
        part of the image past the end of the file. None is a hole: a
        raw image has no backing chain to show through. A block device
        is all data, as qemu's host_device reports it (lseek(SEEK_DATA)
        fails there with EINVAL).
        """
        self._check_open()
        if context == "dirty":
            raise errors.Unsupported("A raw file has no 'dirty' extents")
        if context != "zero":
            raise ValueError(
                f"A raw file has no {context!r} extents")
        end = self.size if length is None else min(offset + length,
                                                   self.size)
        if self._block:
            return [nbd_extents.ZeroExtent(
                offset, end - offset, zero=False, hole=False)]
        data_end = min(self._file_size(), end)
        result = []
        pos = offset
        while pos < data_end:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = data_end             # No data after pos.
            data = min(data, data_end)
            if data > pos:
                result.append(nbd_extents.ZeroExtent(
                    pos, data - pos, zero=True, hole=False))
                pos = data
            if pos == data_end:
                break
            hole = min(os.lseek(self._fd, pos, os.SEEK_HOLE), data_end)
            result.append(nbd_extents.ZeroExtent(
                pos, hole - pos, zero=False, hole=False))
            pos = hole
        if pos < end:
            result.append(nbd_extents.ZeroExtent(
                pos, end - pos, zero=True, hole=False))
        return nbd_extents.merge(result)

    # Data through a buffer (TLS connections, verification).

    def read_into(self, buf, offset):
        """Fill buf with the image's bytes at offset."""
        self._check_open()
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        pos = 0
        while pos < len(view):
            n = os.preadv(self._fd, [view[pos:]], offset + pos)
            if n == 0:
                # Past the end of the file: zeros, as qemu reads them.
                view[pos:] = bytes(len(view) - pos)
                break
            pos += n

    def write(self, buf, offset):
        """Write all of buf at offset."""
        self._check_open()
        view = memoryview(buf).cast("B")
        self._check_range(offset, len(view))
        pos = 0
        while pos < len(view):
            pos += os.pwrite(self._fd, view[pos:], offset + pos)

    def zero(self, length, offset, punch_hole=False):
        """
        Make length bytes at offset read as zeros: punch a hole (the file
        keeps its size), or, where the file system cannot, write zeros.
        punch_hole is accepted for NBD compatibility: a raw file's zeros
        are always best kept as holes. A block device is zeroed by the
        kernel (_zero_device()).
        """
        self._check_open()
        self._check_range(offset, length)
        if length == 0:
            return
        if self._block:
            self._zero_device(offset, length)
            return
        try:
            _punch_hole(self._fd, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._write_zeros(offset, length)

    def _zero_device(self, offset, length):
        """
        Zero a block device's range: PUNCH_HOLE (the kernel's zeroout
        without fallback: WRITE ZEROES, or a discard that zeroes, freeing
        thin storage), else ZERO_RANGE (the kernel writes zeros itself if
        the device cannot), else zeros written from here.

        fallocate() on a block device needs ranges aligned to its logical
        block size and drops the page cache of the range, so it gets only
        whole pages: a page shared with data another worker writes
        through the page cache is never dropped under it. The unaligned
        head and tail are written as zeros through the page cache too.
        """
        start = _round_up(offset, DEVICE_ALIGNMENT)
        end = (offset + length) // DEVICE_ALIGNMENT * DEVICE_ALIGNMENT
        if end <= start:
            self._write_zeros(offset, length)
            return
        for mode in (FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE,
                     FALLOC_FL_ZERO_RANGE):
            try:
                _fallocate(self._fd, mode, start, end - start)
                break
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS,
                                   errno.ENODEV, errno.EINVAL):
                    raise
        else:
            start = end = offset + length
        self._write_zeros(offset, start - offset)
        self._write_zeros(end, offset + length - end)

    def _write_zeros(self, offset, length):
        if length <= 0:
            return
        zeros = memoryview(bytes(min(length, STEP)))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            self.write(zeros[:n], offset)
            offset += n

    def flush(self):
        self._check_open()
        os.fsync(self._fd)

    # The Image contract (ovirt_imageio/image.py): a socket's bytes are
    # spliced, a callable's pass through buf.

    can_zero = True
    can_flush = True
    can_extents = True
    can_splice = True

    def send(self, dst, offset, length, *, buf=None, begin=None, done=None):
        from ovirt_imageio import image
        if isinstance(dst, socket.socket):
            self._sendfile(dst, offset, length, begin, done)
        else:
            self._check_range(offset, length)
            image.send_through(self, dst, offset, length, buf, begin, done)

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        from ovirt_imageio import image
        if isinstance(src, socket.socket):
            self._splice_from(src, offset, length, prefix, done)
        else:
            self._check_range(offset, length)
            image.receive_through(self, src, offset, length, buf, prefix,
                                  done)
        if flush:
            self.flush()

    # Data between the file and a socket, not through this process.

    def _sendfile(self, sock, offset, length, begin=None, done=None):
        """
        Send length bytes of the image at offset to the socket sock with
        sendfile(2). done(n) is called after each step; begin() before
        the first byte moves (there is nothing to fail before it).
        """
        self._check_open()
        self._check_range(offset, length)
        if begin is not None:
            begin()
        out = sock.fileno()
        timeout = sock.gettimeout()
        pos, end = offset, offset + length
        file_end = self._file_size()
        while pos < end:
            start = pos
            step_end = min(end, pos + STEP)
            stop = min(step_end, max(file_end, pos))
            while pos < stop:
                try:
                    n = os.sendfile(out, self._fd, pos, stop - pos)
                except BlockingIOError:
                    pipes.wait(out, select.POLLOUT, timeout)
                    continue
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.ENOSYS):
                        raise
                    # A file system without sendfile support.
                    n = self._send_copy(sock, pos, stop - pos)
                if n == 0:
                    raise OSError(
                        errno.EIO,
                        f"{self.filename} ended at {pos} while sending "
                        f"{length} bytes at {offset}")
                pos += n
            if pos < step_end:
                # Past the end of the file: the zeros qemu would read
                # (the tail of a size that is not a multiple of 512).
                sock.sendall(bytes(step_end - pos))
                pos = step_end
            if done is not None:
                done(pos - start)

    def _splice_from(self, sock, offset, length, prefix=b"", done=None):
        """
        Write length bytes at offset: first the bytes of prefix (body
        bytes the caller had buffered), then the rest spliced from the
        socket sock. If sock ends early, what arrived is written and
        EOFError is raised with the number of bytes received.
        done(n) is called after each step.
        """
        self._check_open()
        self._check_range(offset, length)
        prefix = memoryview(prefix)[:length]
        if prefix:
            self.write(prefix, offset)
        pos, end = offset + len(prefix), offset + length
        reported = offset
        r, w = self._pipe_fds()
        src = sock.fileno()
        timeout = sock.gettimeout()
        while pos < end:
            try:
                n = os.splice(src, w, min(end - pos, self._pipe_size))
            except BlockingIOError:
                pipes.wait(src, select.POLLIN, timeout)
                continue
            if n == 0:
                if done is not None and pos > reported:
                    done(pos - reported)
                raise EOFError(pos - offset)
            while n:
                try:
                    moved = os.splice(r, self._fd, n, offset_dst=pos)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    # A file system without splice support.
                    moved = self._write_from_pipe(r, n, pos)
                pos += moved
                n -= moved
            if done is not None and (pos - reported >= STEP or pos == end):
                done(pos - reported)
                reported = pos
        if done is not None and pos > reported:
            done(pos - reported)

    def _send_copy(self, sock, offset, length):
        """Send up to STEP bytes at offset through a buffer."""
        buf = bytearray(min(length, STEP))
        n = os.preadv(self._fd, [buf], offset)
        sock.sendall(memoryview(buf)[:n])
        return n

    def _write_from_pipe(self, r, length, offset):
        """Write length bytes waiting in the pipe r at offset."""
        data = os.read(r, length)
        self.write(data, offset)
        return len(data)

    def _pipe_fds(self):
        if self._pipe is None:
            r, w, self._pipe_size = pipes.open_pipe(PIPE_SIZE)
            self._pipe = (r, w)
        return self._pipe

    # Housekeeping.

    def _check_open(self):
        if self._fd is None:
            raise ValueError(f"I/O on closed file {self.filename}")

    def _check_range(self, offset, length):
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"Range {offset}+{length} is outside the image "
                f"({self.size} bytes)")

    def close(self):
        """Close the descriptors; safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self._pipe is not None:
            for p in self._pipe:
                os.close(p)
            self._pipe = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _round_up(n, alignment=SECTOR):
    return (n + alignment - 1) // alignment * alignment


_libc = None

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10


def _punch_hole(fd, offset, length):
    """fallocate(PUNCH_HOLE | KEEP_SIZE)."""
    _fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset,
               length)


def _fallocate(fd, mode, offset, length):
    """fallocate(2); Python has no fallocate with a mode."""
    global _libc
    import ctypes

    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int64, ctypes.c_int64]
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
