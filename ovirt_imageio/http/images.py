"""
The data plane: /images/{ticket} and /images/{ticket}/extents.

State: each HTTP connection opens its own NBD connection to a ticket's
export on first use (a Link, kept in the connection's Context) and keeps it
while the connection lives; the ticket counts it in `connections`. A
request authorizes, takes the link, runs one ticket operation, responds.

Theory of operation: data moves through the link's Stream (nbd/stream.py),
the daemon's own NBD client, in the handler's thread.

- On a plain connection (the local unix socket, or the remote service
  without TLS) nothing is copied through the daemon: GET data is spliced
  from the NBD socket to the client's socket, PUT bodies the other way.
- On a TLS connection the bytes must be encrypted or decrypted here: each
  piece (half the configured buffer size) is received into a buffer that
  the request takes from the process's pool (buffers.py) and reuses for
  all its pieces. The buffer is held for one request, not the connection,
  so memory follows the transfers in flight; past [daemon] buffer_memory
  a request waits its turn, and after [daemon] buffer_wait_timeout gets a
  503 with Retry-After. The Stream keeps one read ahead, and writes are
  pipelined, so qemu-nbd works on the next piece while this one crosses
  TLS.
- A GET asks block status for its range first and never reads zero
  extents: their bytes come from one shared zero buffer.
- /extents and /checksum use the same Stream: it negotiated
  base:allocation, qemu:allocation-depth and the ticket's dirty bitmap,
  so an HTTP connection alternating data and metadata requests keeps
  its one NBD connection (issue 13: it used to switch to a libnbd client
  and back, two NBD handshakes per switch).

An image may move a whole range itself: the proxy's relay (relay.py) has
send() and receive(), streaming each client request as one request to the
daemon.

Cancellation: every piece reports progress to the ticket operation, which
raises once the ticket is canceled, so a transfer stops within one piece.
A canceled ticket closes the NBD connection of links that are idle, and
interrupts the NBD I/O of busy ones: a request blocked on a hung export
(or in its handshake) fails at once with the ticket's TransferCanceled,
so its thread and descriptors are released. A busy link also interrupts
its HTTP connection's waits on the client (server.Context.interrupt): a
GET whose client stopped reading is cut, a PUT whose client stopped
sending reads the end of its body and answers 403 "... was canceled";
either way the connection closes. What cannot be interrupted is a proxy
waiting for a daemon that does not answer (up to relay.TIMEOUT): DELETE
then says 409 and the ticket stays canceled.

A request whose NBD connection failed under it (the export timed out,
went away, or its qemu-nbd died) gets errors.ExportFailed: a 500 with
what happened, and its HTTP connection is closed.
"""

import contextlib
import errno
import json
import logging
import threading
import urllib.parse

from .. import errors
from .. import tickets
from ..nbd import client as nbd_client
from . import buffers
from . import cors
from . import ranges
from . import server

log = logging.getLogger("images")

# GETs at least this long ask block status first, to skip zero extents.
# Shorter ones read directly: one NBD round trip instead of two.
EXTENTS_THRESHOLD = 1024**2

# Zero extents of a spliced GET are sent from the shared zero buffer in
# pieces of this size.
ZERO_CHUNK = 4 * 1024**2

# A PATCH zero is split so cancellation is checked at least this often.
ZERO_STEP = 1024**3

# NBD errors saying the connection is gone, not that a command failed.
CONNECTION_ERRORS = frozenset([
    errno.ETIMEDOUT, errno.ECANCELED, errno.ECONNRESET, errno.EPIPE,
    errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED])

# Seconds a client refused a buffer (503) is asked to wait before retrying.
RETRY_AFTER = 5

FEATURES_RW = ["checksum", "extents", "flush", "zero"]
FEATURES_RO = ["checksum", "extents"]

# One zero buffer shared by every connection, for zero extents of GETs.
_zeros = None
_zeros_lock = threading.Lock()


def zeros(size):
    global _zeros
    with _zeros_lock:
        if _zeros is None or len(_zeros) < size:
            _zeros = memoryview(bytes(size))
        return _zeros


class Link:
    """
    One HTTP connection's NBD connection to one ticket's export.

    To an NBD export the link holds one Stream (nbd/stream.py) for every
    request: data (on a plain connection spliced between the NBD socket
    and the client's socket), extents and checksums. So an HTTP
    connection never costs more than one NBD connection (vdsm's qemu-nbd
    allows 8), and never reconnects while it lives, unless the
    connection failed or its owned qemu-nbd was restarted. A proxy
    ticket's link holds the relay's image.

    The handler thread holds the lock while it uses the connection;
    cancel() from another thread closes it only if the link is idle, so an
    NBD handle is never closed under a running request. A busy link is
    interrupted instead (its Interrupt shuts the NBD socket down, and the
    HTTP connection's Context.interrupt its client's socket); the request
    fails, and the handler thread closes the connection.
    """

    def __init__(self, ticket, resource, buffer_size, sock=None,
                 client=None):
        self.ticket = ticket
        # The HTTP connection (server.Context): cancel() interrupts its
        # waits on the client.
        self.client = client
        self.resource = resource
        self.buffer_size = buffer_size
        # The export can be reached with a Stream (not a proxy's relay).
        self.streams = hasattr(resource, "open_stream")
        # The client's socket, if data may be spliced to and from it.
        self.sock = sock if self.streams else None
        self.image = None
        self.size = None
        self._lock = threading.Lock()
        self.closed = False
        # Fired by cancel() to stop the NBD I/O of a busy link.
        self.interrupt = nbd_client.Interrupt()

    def open(self):
        """Connect now, so a missing export fails the first request."""
        with self:
            pass

    def _open_image(self):
        if self.streams:
            return self.resource.open_stream(interrupt=self.interrupt)
        # A proxy's relay.
        return self.resource.open()

    @property
    def piece(self):
        """Bytes moved at a time through a buffer (data crossing TLS, or a
        proxy's relay): half the configured buffer size."""
        return piece_size(self.buffer_size)

    def __enter__(self):
        """Hold the link; return its image: the Stream, or the relay's."""
        self._acquire()
        try:
            if self.image is not None and self._stale(self.image):
                self._close_image()
            if self.image is None:
                self.image = self._open_image()
                self.size = self.image.size
            return self.image
        except BaseException as e:
            failure = self._release(e)
            if failure is not None:
                raise failure from e
            raise

    def __exit__(self, kind, value, tb):
        failure = self._release(value)
        if failure is not None:
            raise failure from value

    def _stale(self, conn):
        """
        True if conn is connected to an export that is gone: the owned
        qemu-nbd died (the next open starts a new one).
        """
        serves = getattr(self.resource, "serves", None)
        return serves is not None and not serves(conn)

    def _acquire(self):
        self._lock.acquire()
        if self.closed:
            self._lock.release()
            raise errors.TicketCanceled(self.ticket.transfer_id)

    def _release(self, error):
        """
        Release the link after a request ended with error (or None).
        Returns the domain error to raise instead, or None.
        """
        try:
            failure = self._failure(error)
            if self.interrupt.fired:
                # Canceled while busy: nothing here may be used again.
                self._close()
            elif isinstance(error, nbd_client.Error):
                # The NBD connection may be unusable; the next request on
                # this HTTP connection opens a new one.
                self._close_image()
            elif self.streams and self.image is not None and self.image.broken:
                # Interrupted in the middle of a payload.
                self._close_image()
            return failure
        finally:
            self._lock.release()

    def _failure(self, error):
        """
        The domain error for a request that failed with error while
        holding the link, or None to raise error as it is.
        """
        if error is None or isinstance(error, errors.AuthorizationError):
            return None
        if self.interrupt.fired:
            # Whatever broke, the ticket was canceled under it.
            return errors.TransferCanceled(self.ticket.transfer_id)
        cause = detail = error
        if isinstance(error, errors.ExportError):
            # The export could not be reached (Backend.open*): its
            # message says why without the export's address, which
            # libnbd's and the socket layer's messages name.
            cause = error.__cause__
        if (isinstance(cause, nbd_client.Error)
                and cause.errno in CONNECTION_ERRORS):
            reason = getattr(self.resource, "error", None)
            return errors.ExportFailed(
                f"NBD export of transfer {self.ticket.transfer_id} "
                f"failed: {detail}" + (f" ({reason})" if reason else ""))
        return None

    def cancel(self):
        """Called by the ticket, from another thread, when canceled."""
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()
        else:
            # Busy: stop its NBD I/O, and its wait on the client (a GET
            # whose client stopped reading, a PUT whose client stopped
            # sending); the request fails and releases. Fired first: the
            # woken request sees it and fails as canceled.
            self.interrupt.fire()
            if self.client is not None:
                self.client.interrupt()

    def close(self):
        """Called when the HTTP connection ends."""
        with self._lock:
            self._close()
        self.ticket.remove_context(self)

    def _close(self):
        if not self.closed:
            self.closed = True
            self._close_image()

    def _close_image(self):
        image, self.image = self.image, None
        if image is not None:
            image.close()


def piece_size(buffer_size):
    return max(buffer_size // 2, 4096)


def buffer_pool(cfg):
    """
    The process's pool of buffers for data requests, shared by the
    services: pieces large enough for either backend, [daemon]
    buffer_memory of them at most.
    """
    size = piece_size(max(cfg.backend_nbd.buffer_size,
                          cfg.backend_http.buffer_size))
    return buffers.Pool(size, cfg.daemon.buffer_memory)


def link(req, ticket, buffer_size):
    """Return the connection's link to ticket, opening it on first use."""
    values = req.context.values
    key = ("link", id(ticket))
    lk = values.get(key)
    if lk is not None and lk.ticket is ticket and not lk.closed:
        return lk
    if ticket.resource is None:
        raise errors.ExportError(
            f"Transfer {ticket.transfer_id} has no NBD export")
    # A proxy ticket's relay brings its own size ([backend_http]).
    buffer_size = getattr(ticket.resource, "buffer_size", None) or buffer_size
    sock = req.context.sock if req.context.plain else None
    lk = Link(ticket, ticket.resource, buffer_size, sock,
              client=req.context)
    # Known to the ticket before connecting, so a cancel interrupts a
    # handshake with a hung export too.
    ticket.add_context(lk)
    try:
        lk.open()
    except BaseException:
        with lk._lock:
            lk._close()
        ticket.remove_context(lk)
        raise
    values[key] = lk
    req.context.on_close(lk.close)
    # Once a ticket is in use, the connection may idle as long as the
    # ticket allows (virt-v2v asks for an hour), and no longer counts
    # against the bound on unauthorized connections.
    req.context.set_timeout(ticket.inactivity_timeout or None)
    req.context.authorized()
    return lk


class Handler:
    """/images/{ticket_id}"""

    name = "images"

    def __init__(self, cfg, store, unix_socket=None, pool=None):
        self.cfg = cfg
        self.store = store
        self.unix_socket = unix_socket
        self.buffer_size = cfg.backend_nbd.buffer_size
        self.pool = pool if pool is not None else buffer_pool(cfg)
        self.buffer_wait_timeout = cfg.daemon.buffer_wait_timeout
        self.max_connections = cfg.daemon.max_connections

    def _authorize(self, req, ticket_id, op):
        ticket = self.store.authorize(ticket_id, op)
        # For the request's log line: the transfer id, never the ticket id.
        req.transfer_id = ticket.transfer_id
        # For the router: a failure once the ticket is canceled is a 403.
        req.ticket = ticket
        return ticket

    def _authorize_write(self, req, ticket_id, offset, length):
        """Authorize writing length bytes at offset (PUT, PATCH zero)."""
        ticket = self._authorize(req, ticket_id, "write")
        req.range = (offset, length)
        if offset + length > ticket.size:
            raise errors.OutOfRange(
                "Requested range out of allowed range", ticket.size)
        return ticket

    def _link(self, req, ticket):
        return link(req, ticket, self.buffer_size)

    @contextlib.contextmanager
    def _buffer(self, lk):
        """
        Hold a buffer of the link's piece size for this request, from the
        process's pool; past the cap, wait for one, or answer 503. Taken
        before the request reads its body or starts its response, so the
        503 is a clean answer (and a PUT's connection, its body unread,
        is closed by the router).
        """
        try:
            lease = self.pool.acquire(self.buffer_wait_timeout)
        except buffers.Timeout:
            log.warning("No buffer free within %s seconds, answering 503 "
                        "(%s buffers in use)", self.buffer_wait_timeout,
                        self.pool.limit)
            raise server.Error(
                503, "Too many transfers in progress, retry later",
                {"retry-after": str(RETRY_AFTER)})
        with lease as view:
            piece = view[:lk.piece]
            try:
                yield piece
            finally:
                piece.release()

    # OPTIONS

    def options(self, req, resp, ticket_id):
        cors.allow(req, resp, "OPTIONS,GET,PUT")
        require_id(ticket_id)
        body = {}
        if self.unix_socket is not None:
            body["unix_socket"] = self.unix_socket
        if ticket_id == "*":
            allow, features = "OPTIONS,GET,PUT,PATCH", FEATURES_RW
        else:
            ticket = self._authorize(req, ticket_id, "read")
            lk = self._link(req, ticket)
            ticket.touch()
            if ticket.may("write"):
                allow, features = "OPTIONS,GET,PUT,PATCH", FEATURES_RW
            else:
                allow, features = "OPTIONS,GET", FEATURES_RO
        body["features"] = features
        if ticket_id != "*":
            # Through the proxy, what the daemon reported: it serves the
            # connections, not the proxy.
            body["max_readers"] = getattr(
                lk.image, "max_readers", self.max_connections)
            body["max_writers"] = getattr(
                lk.image, "max_writers", self.max_connections)
        resp.headers["allow"] = allow
        resp.send_json(body)

    # GET and HEAD

    def get(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        require_id(ticket_id)
        rng = ranges.parse_range(req.headers.get("range"))
        if req.query.get("close") == "y":
            resp.close_connection = True
        ticket = self._authorize(req, ticket_id, "read")
        lk = self._link(req, ticket)
        offset, length, content_range = ranges.resolve(
            rng, ticket.size, lk.size)
        req.range = (offset, length)
        resp.status = 206 if content_range else 200
        resp.headers["content-type"] = "application/octet-stream"
        resp.headers["accept-ranges"] = "bytes"
        if content_range:
            resp.headers["content-range"] = content_range
        resp.headers["content-disposition"] = content_disposition(
            ticket.filename)

        if req.method == "HEAD":
            resp.start(length)
            return

        def write(data):
            # The response starts with the first piece read, so a failure
            # to read it is still a clean error response.
            if not resp.started:
                resp.start(length)
            resp.write(data)

        if lk.sock is not None:
            with ticket.operation(offset) as op, lk as stream:
                send_range(stream, offset, length, write, op.done,
                           sock=lk.sock)
            return
        if lk.streams:
            with self._buffer(lk) as buf, ticket.operation(offset) as op, \
                    lk as stream:
                send_range(stream, offset, length, write, op.done, buf=buf)
            return

        # The proxy's relay streams the range itself: one request to the
        # daemon per client request (relay.py).
        with self._buffer(lk) as buf, ticket.operation(offset) as op, \
                lk as image:
            image.send(write, offset, length, op.done, buf)

    head = get

    # PUT

    def put(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        require_id(ticket_id)
        if req.query.get("close") == "y":
            resp.close_connection = True
        length = req.content_length
        if length is None:
            raise server.Error(400, "Content-Length header is required")
        offset = 0
        header = req.headers.get("content-range")
        if header is not None:
            offset = ranges.parse_content_range(header)
        flush = choice(req.query, "flush", ["n", "y"], "y") == "y"
        ticket = self._authorize_write(req, ticket_id, offset, length)
        lk = self._link(req, ticket)
        if lk.sock is not None:
            with ticket.operation(offset) as op, lk as stream:
                prefix = req.take_body()
                try:
                    stream.receive(lk.sock, offset, length, prefix, op.done)
                except EOFError as e:
                    resp.close_connection = True
                    raise server.Error(
                        400, f"Requested {length} bytes, available "
                             f"{e.args[0]} bytes")
                req.body_received()
                if flush:
                    stream.flush()
            return
        if lk.streams:
            with self._buffer(lk) as buf, ticket.operation(offset) as op, \
                    lk as stream:
                stream.write_from(body_reader(req, length), buf,
                                  offset, length, op.done)
                if flush:
                    stream.flush()
            return
        # The proxy's relay streams the body itself (relay.py).
        with self._buffer(lk) as buf, ticket.operation(offset) as op, \
                lk as image:
            image.receive(body_reader(req, length), offset, length,
                          op.done, buf, flush=flush)

    # PATCH

    def patch(self, req, resp, ticket_id):
        require_id(ticket_id)
        msg = read_json(req)
        op = msg.get("op")
        if op is None:
            raise server.Error(400, "Missing required value for op")
        if op not in ("flush", "zero"):
            raise server.Error(
                400, f"Unsupported value {op!r} for 'op', expecting one of "
                     f"['flush', 'zero']")
        if op == "zero":
            size = integer(msg, "size")
            offset = integer(msg, "offset", 0)
            flush = boolean(msg, "flush", False)
            ticket = self._authorize_write(req, ticket_id, offset, size)
            lk = self._link(req, ticket)
            with ticket.operation(offset) as operation, lk as image:
                end = offset + size
                while offset < end:
                    n = min(end - offset, ZERO_STEP)
                    image.zero(n, offset, punch_hole=ticket.sparse)
                    offset += n
                    operation.done(n)
                if flush:
                    image.flush()
        else:
            ticket = self._authorize(req, ticket_id, "write")
            lk = self._link(req, ticket)
            with ticket.operation(0), lk as image:
                image.flush()


class ExtentsHandler:
    """/images/{ticket_id}/extents?context=zero|dirty"""

    name = "extents"

    def __init__(self, images):
        self.images = images

    def get(self, req, resp, ticket_id):
        require_id(ticket_id)
        ticket = self.images._authorize(req, ticket_id, "read")
        context = choice(req.query, "context", ["dirty", "zero"], "zero")
        if context == "dirty" and not ticket.dirty:
            raise server.Error(404, "Ticket does not support dirty extents")
        lk = self.images._link(req, ticket)
        # Not an operation: upstream does not touch the ticket here.
        with lk as image:
            found = image.extents(context)
        resp.send_json([e.to_dict() for e in found])


# RFC 8187 attr-char besides letters and digits: what filename* keeps
# unencoded.
_ATTR_CHARS = "!#$&+-.^_`|~"


def content_disposition(filename):
    """
    The Content-Disposition of a download (RFC 6266): a quoted ASCII
    fallback for old user agents, and the name itself as UTF-8. Headers go
    out as Latin-1, so a name outside it cannot be sent raw (upstream
    does, as UTF-8). Tickets refuse control characters in names.
    """
    if not filename:
        return "attachment"
    # Quotes and backslashes have unreliable escapes in user agents, and
    # some percent-decode the plain parameter; replace them too.
    fallback = "".join(
        c if " " <= c <= "~" and c not in '"\\%' else "_"
        for c in filename)
    encoded = urllib.parse.quote(filename, safe=_ATTR_CHARS)
    return (f"attachment; filename=\"{fallback}\"; "
            f"filename*=UTF-8''{encoded}")


# Planning and body reading.

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


def send_range(stream, offset, length, write, done, sock=None, buf=None):
    """
    Send the range from the Stream: data spliced to sock on a plain
    connection, else received into buf and given to write() (TLS); zero
    extents from the shared zero buffer. write(b"") starts the response.
    """
    def begin():
        write(b"")

    for start, n, zero in plan(stream, offset, length, length):
        if zero:
            begin()
            send_zeros(sock.sendall if sock is not None else write, n, done)
        elif sock is not None:
            stream.send(sock, start, n, begin, done)
        else:
            stream.send_to(write, buf, start, n, begin, done)
    # An empty range: just the head.
    begin()


def send_zeros(write, length, done):
    """write(data) length zero bytes from the shared zero buffer."""
    buf = zeros(ZERO_CHUNK)
    while length:
        n = min(length, len(buf))
        write(buf[:n])
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


# Validation helpers, with upstream's messages.

def require_id(ticket_id):
    if not ticket_id:
        raise server.Error(400, "Ticket id is required")


def choice(query, name, values, default):
    value = query.get(name, default)
    if value not in values:
        raise server.Error(
            400, f"Unsupported value {value!r} for {name!r}, expecting one "
                 f"of {values}")
    return value


def read_json(req):
    data = req.read_message()
    try:
        msg = json.loads(data)
    except RecursionError:
        raise server.Error(400, "Invalid JSON message: nested too deeply")
    except ValueError as e:
        raise server.Error(400, f"Invalid JSON message {e}")
    if not isinstance(msg, dict):
        raise server.Error(
            400, f"Invalid JSON message: expecting an object, got "
                 f"{type(msg).__name__}")
    return msg


def integer(msg, name, default=None):
    if name not in msg:
        if default is None:
            raise server.Error(400, f"Missing required value for {name!r}")
        return default
    value = msg[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise server.Error(400, f"Integer required {value!r}")
    if value < 0:
        raise server.Error(400, f"Invalid value {value} < 0")
    if value > tickets.MAX_SIZE:
        # Larger than any NBD export.
        raise server.Error(
            400, f"Invalid value {value} > {tickets.MAX_SIZE}")
    return value


def boolean(msg, name, default):
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise server.Error(400, f"Boolean required {value!r}")
    return value
