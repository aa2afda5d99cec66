"""
The Image contract: what every image the daemon, the proxy and the
client library move bytes to and from offers, written down once.

Implementations: the daemon's NBD stream (nbd.stream.Stream), the libnbd
client (nbd.client.Client, the client library's local images), the
proxy's relay (http.relay.Image), an image on an imageio server
(client.remote.RemoteImage) and a raw file (client.rawfile.File).
test/image_test.py runs one contract suite against each of them.

Capabilities are attributes, read once when the image is opened, never
probed with hasattr:

- can_zero: zero() is one request (NBD WRITE_ZEROES, PATCH zero,
  fallocate); without it zero() still works, by writing zeros.
- can_flush: flush() reaches stable storage; without it flush() does
  nothing.
- can_extents: extents("zero") reports what block status knows; without
  it, one data extent covering the range.
- can_splice: send() and receive() move bytes between the image and a
  socket.socket without passing them through this process (splice(2),
  sendfile(2)); buf is then not used.

Moving a range: one signature for both directions, to a socket or a
callable, so a caller never asks which kind of image it holds.

    send(dst, offset, length, *, buf=None, begin=None, done=None)
    receive(src, offset, length, *, buf=None, prefix=b"", done=None,
            flush=False)

- dst: a socket.socket (spliced when can_splice, else sent from buf with
  sendall) or a callable write(data) that consumes data before it
  returns (data may be a view of buf, reused by the next piece).
- src: a socket.socket, whose first bytes may already have been read:
  they are prefix; or a callable read_into(view) that fills the whole view
  or raises (prefix must then be empty). A socket that ends early raises
  EOFError(bytes received).
- buf: a reused buffer for bytes that pass through this process; None
  when the caller knows the move splices (an image that needs one then
  allocates it). Pieces read into it are at most len(buf); an image may
  send zeros it did not read (a relay's zero extents) from a shared zero
  buffer, in larger pieces.
- begin(): called once, before the first byte goes to dst, after the
  first piece was read without error (so a failed read can still be
  answered with an error response).
- done(n): called after each piece.
- flush: flush the written bytes before returning.

send_through() and receive_through() implement both on top of
read_into() and write(), for images that cannot splice.
"""

from __future__ import annotations

import socket
from typing import Callable, Optional, Protocol, runtime_checkable

Buffer = memoryview | bytearray | bytes

# Used when a caller gives no buffer to an image that cannot splice.
DEFAULT_BUFFER_SIZE = 1024**2


@runtime_checkable
class Image(Protocol):
    size: int
    can_zero: bool
    can_flush: bool
    can_extents: bool
    can_splice: bool

    def read_into(self, buf: Buffer, offset: int) -> None:
        """Fill the whole writable buf with the bytes at offset."""

    def write(self, buf: Buffer, offset: int) -> None:
        """Write all of buf at offset."""

    def zero(self, length: int, offset: int, punch_hole: bool = False) -> None:
        """Make length bytes at offset read as zeros; punch_hole allows
        deallocating them."""

    def flush(self) -> None:
        """Bring what was written to stable storage."""

    def extents(self, context: str = "zero", offset: int = 0,
                length: Optional[int] = None) -> list:
        """Merged extents (nbd.extents.ZeroExtent for "zero",
        DirtyExtent for "dirty") covering [offset, offset + length),
        default to the end. Raises errors.Unsupported for "dirty" without
        a dirty bitmap, ValueError for another context."""

    def send(self, dst, offset: int, length: int, *,
             buf: Optional[Buffer] = None,
             begin: Optional[Callable[[], None]] = None,
             done: Optional[Callable[[int], None]] = None) -> None:
        """Move length bytes at offset to dst (module docstring)."""

    def receive(self, src, offset: int, length: int, *,
                buf: Optional[Buffer] = None, prefix: Buffer = b"",
                done: Optional[Callable[[int], None]] = None,
                flush: bool = False) -> None:
        """Write length bytes from src at offset (module docstring)."""

    def close(self) -> None:
        """Release the connection or descriptor; safe to call twice."""


def writer(dst):
    """write(data) for a send() destination."""
    if isinstance(dst, socket.socket):
        return dst.sendall
    return dst


def reader(src, prefix=b""):
    """
    read_into(view) for a receive() source: fills view from prefix, then
    from the socket src (EOFError(bytes received) at its end), or src
    itself when it is a callable.
    """
    if not isinstance(src, socket.socket):
        if len(prefix):
            raise ValueError("prefix is for a socket source")
        return src
    pending = memoryview(prefix).cast("B")
    received = 0

    def read_into(view):
        nonlocal pending, received
        pos = min(len(pending), len(view))
        view[:pos] = pending[:pos]
        pending = pending[pos:]
        while pos < len(view):
            n = src.recv_into(view[pos:])
            if n == 0:
                raise EOFError(received + pos)
            pos += n
        received += pos

    return read_into


def pieces(buf, length):
    """A byte view of buf (or of a new buffer when buf is None) for
    moving length bytes."""
    if buf is None:
        buf = bytearray(min(length, DEFAULT_BUFFER_SIZE) or 1)
    view = memoryview(buf).cast("B")
    if not len(view):
        raise ValueError("Empty buffer")
    return view


def send_through(image, dst, offset, length, buf=None, begin=None,
                 done=None):
    """send() through buf: image.read_into() each piece, then write it."""
    copy_pieces(image.read_into, writer(dst), offset, length,
                pieces(buf, length), begin, done)


def copy_pieces(read_into, write, offset, length, view, begin=None,
                done=None):
    """
    Move length bytes at offset in pieces of view: read_into(piece, pos)
    fills a piece, write(piece) takes it. begin() is called once, before
    the first write (a response's headers go out only once the first
    piece was read); done(n) after each piece.
    """
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(view), end - pos)
        piece = view[:n]
        read_into(piece, pos)
        if begin is not None:
            begin()
            begin = None
        write(piece)
        pos += n
        if done is not None:
            done(n)


def receive_through(image, src, offset, length, buf=None, prefix=b"",
                    done=None, flush=False):
    """receive() through buf: read each piece from src, then
    image.write() it."""
    read_into = reader(src, prefix)
    view = pieces(buf, length)
    pos, end = offset, offset + length
    while pos < end:
        n = min(len(view), end - pos)
        piece = view[:n]
        read_into(piece)
        image.write(piece, pos)
        pos += n
        if done is not None:
            done(n)
    if flush:
        image.flush()
