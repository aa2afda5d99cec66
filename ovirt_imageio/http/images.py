"""
The data plane's handlers: /images/{ticket} (OPTIONS, GET, HEAD, PUT,
PATCH) and /images/{ticket}/extents.

A request validates its parameters (params.py), authorizes, takes its
HTTP connection's link to the ticket's export (link.py), runs one ticket
operation and responds; the bytes move as bodies.py plans them.

Buffers: on a TLS connection (or through the proxy's relay) the bytes
must pass through the daemon: each piece (half the configured buffer
size) is received into a buffer that the request takes from the
process's pool (buffers.py) and reuses for all its pieces. The buffer is
held for one request, not the connection, so memory follows the
transfers in flight; past [daemon] buffer_memory a request waits its
turn, and after [daemon] buffer_wait_timeout gets a 503 with
Retry-After. The Stream keeps one read ahead, and writes are pipelined,
so qemu-nbd works on the next piece while this one crosses TLS. A
spliced request (a plain connection) takes no buffer.

Downloads carry an ETag that every write changes, and honour If-Range,
so browsers resume them (etag.py).

Every image, the NBD stream or the proxy's relay (relay.py, one request
to the daemon per client request), is used through the Image contract
(ovirt_imageio/image.py): a request splices when its connection is plain
and the image can_splice, else it takes a buffer; no handler asks which
kind of image it holds.
"""

import contextlib
import logging

from .. import errors
from . import bodies
from . import buffers
from . import cors
from . import disposition
from . import etag
from . import link
from . import params
from . import ranges
from . import server

log = logging.getLogger("images")

# A PATCH zero is split so cancellation is checked at least this often.
ZERO_STEP = 1024**3

# Seconds a client refused a buffer (503) is asked to wait before retrying.
RETRY_AFTER = 5

FEATURES_RW = ["checksum", "extents", "flush", "zero"]
FEATURES_RO = ["checksum", "extents"]


def buffer_pool(cfg):
    """
    The process's pool of buffers for data requests, shared by the
    services: pieces large enough for either backend, [daemon]
    buffer_memory of them at most.
    """
    size = link.piece_size(max(cfg.backend_nbd.buffer_size,
                               cfg.backend_http.buffer_size))
    return buffers.Pool(size, cfg.daemon.buffer_memory)


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
        return link.for_request(req, ticket, self.buffer_size)

    @contextlib.contextmanager
    def _buffer(self, lk):
        """
        Hold a buffer of the link's piece size for this request, from the
        process's pool; past the cap, wait for one, or answer 503. Taken
        before the request reads its body or starts its response, so the
        503 is a clean answer (and a PUT's connection, its body unread,
        is closed by the router). None if the link splices: no byte
        passes through the daemon.
        """
        if lk.splices:
            yield None
            return
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
        # PATCH only when a preflight asks for it (cors.py).
        cors.allow(req, resp, "OPTIONS,GET,PUT", extra=("PATCH",))
        params.require_id(ticket_id)
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
            limits = lk.limits
            if limits is None:
                limits = (self.max_connections, self.max_connections)
            body["max_readers"], body["max_writers"] = limits
        resp.headers["allow"] = allow
        resp.send_json(body)

    # GET and HEAD

    def get(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        params.require_id(ticket_id)
        rng = ranges.parse_range(req.headers.get("range"))
        if req.query.get("close") == "y":
            resp.close_connection = True
        ticket = self._authorize(req, ticket_id, "read")
        lk = self._link(req, ticket)
        tag = self._etag(ticket, lk)
        rng = etag.if_range(req, rng, tag)
        offset, length, content_range = ranges.resolve(
            rng, ticket.size, lk.size)
        req.range = (offset, length)
        resp.status = 206 if content_range else 200
        resp.headers["content-type"] = "application/octet-stream"
        resp.headers["accept-ranges"] = "bytes"
        if tag is not None:
            resp.headers["etag"] = tag
        if content_range:
            resp.headers["content-range"] = content_range
        resp.headers["content-disposition"] = (
            disposition.content_disposition(ticket.filename))

        if req.method == "HEAD":
            req.op = "head"
            resp.start(length)
            return

        def write(data):
            # The response starts with the first piece read, so a failure
            # to read it is still a clean error response.
            if not resp.started:
                resp.start(length)
            resp.write(data)

        def begin():
            write(b"")

        # Spliced to the client's socket, or through the buffer to write().
        dst = lk.sock if lk.splices else write
        with self._buffer(lk) as buf, \
                ticket.operation(offset, "read", lk) as op, lk as image:
            bodies.send_range(image, offset, length, dst, begin, op.done,
                              buf=buf, zero_extent=op.zero_extent)

    head = get

    def _etag(self, ticket, lk):
        """
        The ETag of the ticket's image (etag.py): ours, or through the
        proxy the daemon's (None from a daemon that sends none).
        """
        if not getattr(lk.resource, "remote_etag", False):
            return etag.of(ticket)
        with lk as image:
            return image.etag()

    # PUT

    def put(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        params.require_id(ticket_id)
        if req.query.get("close") == "y":
            resp.close_connection = True
        length = req.content_length
        if length is None:
            raise server.Error(400, "Content-Length header is required")
        offset = 0
        header = req.headers.get("content-range")
        if header is not None:
            offset = ranges.parse_content_range(header)
        flush = params.choice(req.query, "flush", ["n", "y"], "y") == "y"
        ticket = self._authorize_write(req, ticket_id, offset, length)
        lk = self._link(req, ticket)
        if lk.splices:
            with etag.writing(ticket), \
                    ticket.operation(offset, "write", lk) as op, lk as image:
                prefix = req.take_body()
                try:
                    image.receive(lk.sock, offset, length, prefix=prefix,
                                  done=op.done)
                except EOFError as e:
                    resp.close_connection = True
                    raise server.Error(
                        400, f"Requested {length} bytes, available "
                             f"{e.args[0]} bytes")
                req.body_received()
                if flush:
                    image.flush()
            return
        # Through the buffer; a relay flushes with its PUT (relay.py).
        with self._buffer(lk) as buf, etag.writing(ticket), \
                ticket.operation(offset, "write", lk) as op, lk as image:
            image.receive(bodies.body_reader(req, length), offset, length,
                          buf=buf, done=op.done, flush=flush)

    # PATCH

    def patch(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        params.require_id(ticket_id)
        msg = params.read_json(req)
        op = msg.get("op")
        if op is None:
            raise server.Error(400, "Missing required value for op")
        if op not in ("flush", "zero"):
            raise server.Error(
                400, f"Unsupported value {op!r} for 'op', expecting one of "
                     f"['flush', 'zero']")
        req.op = op
        if op == "zero":
            size = params.integer(msg, "size")
            offset = params.integer(msg, "offset", 0)
            flush = params.boolean(msg, "flush", False)
            ticket = self._authorize_write(req, ticket_id, offset, size)
            lk = self._link(req, ticket)
            with etag.writing(ticket), \
                    ticket.operation(offset, "zero", lk) as operation, \
                    lk as image:
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
            with ticket.operation(0, "flush", lk), lk as image:
                image.flush()


class ExtentsHandler:
    """/images/{ticket_id}/extents?context=zero|dirty"""

    name = "extents"

    def __init__(self, images):
        self.images = images

    def get(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        params.require_id(ticket_id)
        ticket = self.images._authorize(req, ticket_id, "read")
        context = params.choice(
            req.query, "context", ["dirty", "zero"], "zero")
        if context == "dirty" and not ticket.dirty:
            raise server.Error(404, "Ticket does not support dirty extents")
        lk = self.images._link(req, ticket)
        # Not an operation: upstream does not touch the ticket here.
        with lk as image:
            found = image.extents(context)
        resp.send_json([e.to_dict() for e in found])

    def options(self, req, resp, ticket_id):
        cors.preflight(req, resp, "OPTIONS,GET")
