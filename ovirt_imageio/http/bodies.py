"""
Moving a range between an image and an HTTP body: which pieces to read
and which are zeros (plan), sending a range to a GET's response
(send_range, send_zeros), and reading a PUT's body into a buffer
(body_reader).

- On a plain connection (the local unix socket, or the remote service
  without TLS) nothing is copied through the daemon: GET data is spliced
  from the NBD socket to the client's socket (nbd/stream.py), PUT bodies
  the other way.
- On a TLS connection each piece is received into the request's buffer
  (images.py takes it from the pool) and given to the response, or read
  from the body into it and written.
- A GET asks block status for its range first and never reads zero
  extents: their bytes come from one shared zero buffer.
"""

import threading

from .. import image as image_contract
from . import server

# GETs at least this long ask block status first, to skip zero extents.
# Shorter ones read directly: one NBD round trip instead of two.
EXTENTS_THRESHOLD = 1024**2

# Zero extents of a spliced GET are sent from the shared zero buffer in
# pieces of this size.
ZERO_CHUNK = 4 * 1024**2

# One zero buffer shared by every connection, for zero extents of GETs.
_zeros = None
_zeros_lock = threading.Lock()


def zeros(size):
    global _zeros
    with _zeros_lock:
        if _zeros is None or len(_zeros) < size:
            _zeros = memoryview(bytes(size))
        return _zeros


def plan(image, offset, length, piece):
    """
    Yield (offset, length, zero) pieces of at most piece bytes covering
    the range, zero where block status says the bytes read as zero.
    """
    if length >= EXTENTS_THRESHOLD:
        found = image.extents("zero", offset, length)
    else:
        found = []
    end = offset + length
    covered = offset
    for ext in found:
        start = max(ext.start, covered)
        stop = min(ext.start + ext.length, end)
        while start < stop:
            n = min(stop - start, piece)
            yield start, n, ext.zero
            start += n
        covered = max(covered, stop)
    while covered < end:
        n = min(end - covered, piece)
        yield covered, n, False
        covered += n


def send_range(image, offset, length, dst, begin, done, buf=None,
               zero_extent=None):
    """
    Send the range of image (ovirt_imageio/image.py) to dst, the client's
    socket (spliced) or the response's write(data) (through buf); zero
    extents from the shared zero buffer. begin() starts the response: it
    is called before the first byte, and again at the end (an empty
    range), so it must do nothing once the response started.
    zero_extent(n), if given, is called for each zero extent sent (for
    the counters of bytes that were zeros).
    """
    write = image_contract.writer(dst)
    for start, n, zero in plan(image, offset, length, length):
        if zero:
            begin()
            if zero_extent is not None:
                zero_extent(n)
            send_zeros(write, n, done)
        else:
            image.send(dst, start, n, buf=buf, begin=begin, done=done)
    # An empty range: just the head.
    begin()


def send_zeros(write, length, done=None):
    """write(data) length zero bytes from the shared zero buffer."""
    buf = zeros(ZERO_CHUNK)
    while length:
        n = min(length, len(buf))
        write(buf[:n])
        if done is not None:
            done(n)
        length -= n


def body_reader(req, length):
    """
    Return read_into(buf): fill buf from the request body, or raise
    upstream's 400 if the body ends first.
    """
    received = 0

    def read_into(buf):
        nonlocal received
        got = read_full(req, buf)
        received += got
        if got < len(buf):
            raise server.Error(
                400, f"Requested {length} bytes, available {received} bytes")

    return read_into


def read_full(req, buf):
    """Fill buf from the request body; return bytes read (short at EOF)."""
    pos = 0
    while pos < len(buf):
        n = req.readinto(buf[pos:])
        if n == 0:
            break
        pos += n
    return pos
