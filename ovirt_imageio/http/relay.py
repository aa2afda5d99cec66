"""
The proxy's backend: tickets whose URL is a daemon's /images URL (http or
https), on the engine host. The proxy is just another backend: the /images
handlers and the checksum run unchanged over an Image that speaks the
daemon's HTTP API (ovirt_imageio.client.remote).

State: a Relay lives as long as its proxy ticket and holds only what is
needed to reach the daemon (URL, CA, timeout); it owns no connection. Each
client connection to the proxy opens its own Image with open() (the Link in
link.py), that is one keep-alive connection to the daemon per client
connection, released when the client connection ends or the ticket is
canceled.

Theory of operation, streaming. Nothing is buffered whole, and each client
request becomes one request to the daemon. A GET is split by the daemon's
zero extents (fetched once per connection, cached) into runs: a zero run is
sent from the shared zero buffer without asking the daemon, a data run is
one ranged GET to the daemon (206, exact length) whose body is read into
one reused buffer piece by piece and written to the client after each
piece. A PUT is one PUT to the daemon (Content-Range bytes a-b/*, flush as
the client asked) whose body is read from the client into the same buffer
piece by piece and sent on. Both flows stay busy because the kernel's
socket buffers on both sides absorb one side while the proxy serves the
other; no thread hand-off is needed, and a connection costs the buffer of
the Link ([backend_http] buffer_size / 2). Both are bound by TLS and TCP
in the kernel, not by Python (bench/proxy.py). PATCH zero and flush are one
PATCH each;
/checksum reads through read_into (ranged GETs) and skips zero extents.
A GET or HEAD first asks the daemon's ETag with a HEAD (etag.py), and
passes it on.

Theory of operation, errors. Two kinds, kept apart:
- The daemon answered with an error status: RemoteImage raises
  errors.PeerError(status, message), which the router sends to the client
  unchanged (403 no such ticket, 416, the daemon's 500...). The connection
  to the daemon is still good.
- The daemon could not be reached or the connection broke (refused, TLS
  verification failed, reset, timeout, truncated or malformed response):
  RemoteImage raises an OSError, which becomes Unreachable here: 502 Bad
  Gateway with a message saying which daemon and why. Not 500: the
  daemon's own 500s are passed through as 500, and 502 is the status HTTP
  defines for "the proxy got no valid answer from the server behind it";
  no known client treats 500 and 502 differently (they log the status and
  message). RemoteImage closes a broken connection and opens a new one on
  the next call, so one failure never poisons the client's connection to
  the proxy, and the proxy keeps serving everyone else.
RemoteImage also resends a request once when the daemon closed a reused
connection while it idled (its ticket's inactivity timeout: GETs of zero
extents never reach the daemon, so the daemon's connection can idle while
the client's is busy).
"""

import contextlib
import http.client
import logging
import urllib.parse

from .. import errors
from .. import image
from ..client import remote
from . import bodies
from . import etag

log = logging.getLogger("relay")

# Seconds to wait for the daemon to connect or answer before failing with
# 502. Upstream's proxy waits 60; a daemon answers a buffer-sized request in
# well under a second, so this only bounds a hung daemon.
TIMEOUT = 60

# What a broken or unreachable daemon raises. RemoteImage raises OSErrors
# (ssl errors, socket timeouts and its ProtocolError are OSErrors);
# http.client may raise HTTPException for a malformed response.
CONNECTION_ERRORS = (OSError, http.client.HTTPException)


class Unreachable(errors.PeerError):
    """The daemon could not be reached, or its connection broke (502)."""

    def __init__(self, netloc, error):
        super().__init__(
            502, f"Cannot reach daemon {netloc}: {describe(error)}")


def describe(error):
    """A short reason for a connection error, without a traceback."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error) or type(error).__name__
    if isinstance(error, http.client.HTTPException):
        text = f"{type(error).__name__}: {text}"
    return text


class Relay:
    """
    A proxy ticket's resource: how to reach the daemon serving its image.

    url: the daemon's /images/{ticket_id} URL (http or https).
    cafile: CA file verifying the daemon's certificate; None uses the
        system's trust store.
    buffer_size: bytes per client connection ([backend_http]
        buffer_size); half of it is the piece streamed at a time.
    """

    def __init__(self, url, *, cafile=None, buffer_size=None,
                 timeout=TIMEOUT, transfer_id=None):
        self.url = url
        self.cafile = cafile
        self.buffer_size = buffer_size
        self.timeout = timeout
        self.transfer_id = transfer_id
        # Never the path: it holds the ticket id, a credential.
        self.netloc = urllib.parse.urlsplit(url).netloc

    def __repr__(self):
        return f"<Relay daemon={self.netloc} transfer={self.transfer_id}>"

    # What the daemon's links need of a resource (http/link.py, like
    # nbd/backend.Backend).

    error = None

    def open_image(self, interrupt=None):
        """open(): a relay cannot be interrupted (see relay.TIMEOUT)."""
        return self.open()

    def serves(self, image):
        """A RemoteImage reconnects by itself: always usable."""
        return True

    # The images handler asks the daemon for a download's ETag (etag.py):
    # only the daemon sees every write.
    remote_etag = True

    def limits(self, image):
        """What the daemon reported in OPTIONS: it serves the
        connections, not the proxy."""
        return image.max_readers, image.max_writers

    def open(self):
        """
        Return a new Image on a new connection to the daemon. Raises
        errors.PeerError with the daemon's answer if its OPTIONS fails (e.g.
        403 when the daemon has no such ticket), Unreachable if the daemon
        cannot be reached.
        """
        return Image(self)

    def connect(self):
        """A new RemoteImage; connection errors become Unreachable."""
        try:
            return remote.RemoteImage(
                self.url, cafile=self.cafile, secure=True,
                timeout=self.timeout)
        except CONNECTION_ERRORS as e:
            raise self.unreachable(e) from e

    def unreachable(self, error):
        log.warning("Cannot reach daemon %s transfer=%s: %s",
                    self.netloc, self.transfer_id, describe(error))
        return Unreachable(self.netloc, error)

    def close(self):
        """Nothing to release: connections belong to the client connections."""


class Image:
    """
    One client connection's image on the daemon, an Image
    (ovirt_imageio/image.py): a RemoteImage, one keep-alive connection, whose
    connection errors become Unreachable. Used by one thread at a time (the
    Link's lock).
    """

    def __init__(self, relay):
        self._relay = relay
        self._remote = relay.connect()

    def __repr__(self):
        return f"<relay.Image {self._remote!r}>"

    # What the daemon reported in OPTIONS: it serves the connections.

    @property
    def max_readers(self):
        return self._remote.max_readers

    @property
    def max_writers(self):
        return self._remote.max_writers

    @property
    def transport(self):
        """How the daemon is reached: https, http, or unix (same host)."""
        return self._remote.transport

    @property
    def size(self):
        with self._daemon_errors():
            return self._remote.size

    # I/O

    def read_into(self, buf, offset):
        with self._daemon_errors():
            self._remote.read_into(buf, offset)

    def write(self, buf, offset):
        # flush=n: the handler flushes once at the end if the client asked.
        with self._daemon_errors():
            self._remote.write(buf, offset)

    def zero(self, length, offset, punch_hole=False):
        # The daemon zeroes as its own ticket says (sparse or not).
        with self._daemon_errors():
            self._remote.zero(length, offset, punch_hole=punch_hole)

    def flush(self):
        with self._daemon_errors():
            self._remote.flush()

    def extents(self, context="zero", offset=0, length=None):
        with self._daemon_errors():
            return self._remote.extents(context, offset, length)

    def etag(self):
        """The daemon's ETag of the image now (one HEAD), checked: None if
        it sends none or one that is not a strong tag."""
        with self._daemon_errors():
            return etag.checked(self._remote.etag())

    # Streaming (the Image contract's send and receive): one daemon
    # request per client request.

    can_splice = False

    @property
    def can_zero(self):
        return self._remote.can_zero

    @property
    def can_flush(self):
        return self._remote.can_flush

    @property
    def can_extents(self):
        return self._remote.can_extents

    def send(self, dst, offset, length, *, buf=None, begin=None, done=None):
        """
        Send [offset, offset + length) to dst (the client's socket or
        response's write): zero runs from the shared zero buffer, each
        data run with one ranged GET streamed through buf. done(n) after
        each piece.
        """
        with self._daemon_errors():
            found = self._remote.extents("zero", offset, length)
        write = _client_side(image.writer(dst))
        for start, n, zero in runs(found, offset, length):
            if zero:
                if begin is not None:
                    begin()
                    begin = None
                bodies.send_zeros(write, n, done)
                continue
            with self._daemon_errors():
                self._remote.send(write, start, n, buf=buf, begin=begin,
                                  done=done)
            begin = None

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        """
        Receive length bytes from src (the client's socket after prefix,
        or the body's read_into, which raises if the body ends early) and
        write them at offset with one PUT streamed through buf. done(n)
        after each piece.
        """
        read_into = _client_side(image.reader(src, prefix))
        with self._daemon_errors():
            self._remote.receive(read_into, offset, length, buf=buf,
                                 done=done, flush=flush)

    def close(self):
        self._remote.close()

    @contextlib.contextmanager
    def _daemon_errors(self):
        """Connection errors become Unreachable; errors of the client's
        side of a stream come out as they were raised."""
        try:
            yield
        except _ClientError as e:
            raise e.error from None
        except CONNECTION_ERRORS as e:
            raise self._relay.unreachable(e) from e

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ClientError(Exception):
    """An error on the client's side of a stream, carried through
    RemoteImage so that it is not taken for the daemon's."""

    def __init__(self, error):
        self.error = error


def _client_side(fn):
    """fn (the client's write or read_into), its errors carried through
    RemoteImage as _ClientError."""

    def call(buf):
        try:
            fn(buf)
        except Exception as e:
            raise _ClientError(e) from e

    return call


def runs(extents, offset, length):
    """
    Return (start, length, zero) runs covering [offset, offset + length)
    exactly: adjacent extents with the same zero flag merged, anything the
    extents do not cover as data.
    """
    end = offset + length
    segments = []
    pos = offset
    for ext in extents:
        start = max(ext.start, pos)
        stop = min(ext.start + ext.length, end)
        if stop <= start:
            continue
        if start > pos:
            segments.append((pos, start, False))
        segments.append((start, stop, bool(ext.zero)))
        pos = stop
    if pos < end:
        segments.append((pos, end, False))
    merged = []
    for start, stop, zero in segments:
        if merged and merged[-1][2] == zero:
            merged[-1][1] = stop
        else:
            merged.append([start, stop, zero])
    return [(start, stop - start, zero) for start, stop, zero in merged]
