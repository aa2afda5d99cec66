"""
Routing, and the one place where errors become HTTP responses.

Routes are (regex, handler) pairs; a regex is anchored at the start only and
the first match wins, as upstream (so `/images/id/extents/x` is an extents
request). A handler is an object with a method per HTTP verb (get, put...)
taking (req, resp, *groups).
"""

import logging
import re
import time

from .. import checksum
from .. import errors
from . import server

log = logging.getLogger("router")

# Domain error -> (status, close connection). First match wins, so
# subclasses come before their bases.
STATUS = [
    (errors.AuthorizationError, 403, True),
    (errors.InvalidTicket, 400, False),
    (checksum.InvalidArgument, 400, False),
    (errors.OutOfRange, 416, False),
    (errors.Unsupported, 404, False),
    (errors.CancelTimeout, 409, False),
    (errors.ExportFailed, 500, True),
    (errors.ExportError, 500, False),
]


class Router:

    def __init__(self, routes, observe=None):
        """
        observe(req, resp, seconds, cut), if given, is called when each
        request ends (metrics.Recorder.request); cut: its response started
        and could not be completed.
        """
        self.routes = [(re.compile(pattern), handler)
                       for pattern, handler in routes]
        self.observe = observe

    def dispatch(self, req, resp):
        start = time.monotonic()
        cut = False
        try:
            self._dispatch(req, resp)
        except Exception as e:
            cut = resp.started
            self._fail(req, resp, e)
        finally:
            seconds = time.monotonic() - start
            log_request(req, resp, seconds)
            if self.observe is not None:
                self.observe(req, resp, seconds, cut)

    def _dispatch(self, req, resp):
        if req.framing_error:
            raise req.framing_error
        if req.method not in server.METHODS:
            raise server.Error(405, f"Invalid method {req.method!r}")
        for regex, handler in self.routes:
            match = regex.match(req.path)
            if match:
                req.route = getattr(handler, "name", type(handler).__name__)
                break
        else:
            raise server.Error(404, f"No handler for {req.path!r}")
        method = getattr(handler, req.method.lower(), None)
        if method is None:
            raise server.Error(
                405, f"Method {req.method!r} not defined for {req.path!r}")
        method(req, resp, *match.groups())

    def _fail(self, req, resp, e):
        e = canceled_cause(req, e)
        status, message, headers, close = classify(e)
        if resp.started:
            # Part of the body is out; the client can only see a short one.
            log.warning("Request failed after response started, closing "
                        "connection=%s error=%s", req.context.id,
                        type(e).__name__)
            resp.abort()
            return
        if status == 500:
            log.error("Request failed connection=%s", req.context.id,
                      exc_info=e)
        else:
            # Not the message: it may quote the path, and a path holds a
            # ticket id. The client gets the message.
            log.debug("Request failed connection=%s status=%s error=%s",
                      req.context.id, status, type(e).__name__)
        resp.headers = {k: v for k, v in resp.headers.items()
                        if k.startswith("access-control-")}
        resp.headers.update(headers)
        if close or not req.consumed:
            resp.close_connection = True
        resp.send_text(message, status)


def canceled_cause(req, e):
    """
    A request whose ticket was replaced or removed while it ran fails in
    many ways: its export's qemu-nbd stopped (NBD errors, ExportError on
    connect), its NBD connection closed. The cause is the cancel: answer
    the ticket's 403, not a 500 with a traceback. Handlers set req.ticket
    when they authorize; a replaced or removed ticket is always canceled
    before what serves it is closed.
    """
    if isinstance(e, (server.Error, errors.Error)) and not isinstance(
            e, errors.ExportError):
        return e
    ticket = getattr(req, "ticket", None)
    if ticket is None or not ticket.canceled:
        return e
    log.debug("Request failed on a canceled ticket connection=%s "
              "transfer=%s error=%s: %s", req.context.id, ticket.transfer_id,
              type(e).__name__, e)
    return errors.TicketCanceled(ticket.transfer_id)


def classify(e):
    """Return (status, message, headers, close) for an exception."""
    if isinstance(e, server.Error):
        return e.status, e.message, e.headers, False
    if isinstance(e, errors.PeerError):
        # The daemon's answer, passed on as it is (API.md section 5).
        return e.status, str(e), dict(e.headers), False
    for kind, status, close in STATUS:
        if isinstance(e, kind):
            headers = {}
            if isinstance(e, errors.OutOfRange):
                headers["content-range"] = f"bytes */{e.size}"
            return status, str(e), headers, close
    return (500, "Server failed to perform the request, check logs", {},
            False)


# Every request gets a line; small, fast, successful data requests (4 KiB
# random reads, at thousands per second) get it at DEBUG. At INFO, the
# rotating file handler formats and flushes each line, which cost 20% of
# small-request throughput; upstream logs all reads and writes at DEBUG.
# Transfers (requests of a MiB or more), slow requests and failures stay
# at INFO. [logger_root] level = DEBUG shows every line.
DATA_ROUTES = frozenset(["images", "extents", "checksum"])
QUIET_MAX_LENGTH = 1024**2
QUIET_MAX_SECONDS = 0.01


def log_request(req, resp, seconds):
    """
    One line per request: what, for whom, which range, how it ended, how
    long it took. The path is not logged: it holds the ticket id.
    """
    if req.range is not None:
        offset, length = req.range
        rng = f"{offset}+{length}"
    else:
        rng = "-"
    level = logging.INFO
    if (req.route in DATA_ROUTES and req.method != "OPTIONS"
            and resp.status < 300 and seconds < QUIET_MAX_SECONDS
            and (req.range is None or req.range[1] < QUIET_MAX_LENGTH)):
        level = logging.DEBUG
    if log.isEnabledFor(level):
        # Only a method we know: the token is the client's, and
        # `curl -X /images/<ticket_id>` puts a ticket id there.
        method = req.method if req.method in server.METHODS else "-"
        log.log(level, "%s %s client=%s connection=%s transfer=%s range=%s "
                "status=%s seconds=%.6f", method, req.route or "-",
                req.context.client, req.context.id, req.transfer_id or "-",
                rng, resp.status, seconds)
