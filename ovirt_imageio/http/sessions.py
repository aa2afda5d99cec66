"""
Signed tickets on the proxy's remote service ([proxy] signed_tickets), the
three flows of the 1.x proxy (../shared/CLIENTS.md section 2):

    (a) Authorization: <signed ticket>      on any /images/{id} request
    (b) POST /sessions/ with Authorization  answers Session-Id; later
                                            requests send Session-Id or
                                            ?session_id=; DELETE
                                            /sessions/{session id} ends it
    (c) PUT /tickets/{id}, the body the signed ticket (the engine, 1.2+);
        DELETE /tickets/{id} with the same signed ticket in Authorization

A verified ticket (signed.py) grants the daemon's ticket it names: the
proxy adds a relay ticket for it (ticket id = transfer-ticket, URL =
imaged-uri + /images/ + ticket id), as if the engine had added it over
the control service. The signed ticket names no operations or size: they
are the daemon's, read from its OPTIONS and extents when the relay
ticket is added; the daemon enforces its own ticket on every request. Once
added, the ticket id in the path serves it, as for any ticket (the
webadmin of 4.2 sends nothing else). The path's ticket id must be the
signed ticket's, and a ticket added over the control service with the
same id wins: its credentials are not even looked at.

A relay ticket lives until its signed ticket ends (the earlier of validTo
and exp, plus [proxy] allowed_skew_seconds; a later ticket for the same
transfer extends it), never more: every authorization checks the end on
the wall clock, and expired tickets and sessions are dropped. DELETE
/tickets/{id} removes it and refuses the transfer's signed tickets and
sessions until the last of them would have ended (a replay), except a new
PUT /tickets/ from the engine.

Session ids are credentials like ticket ids: never logged, never in a
message. The remote service never serves DELETE /tickets/ (all), GET or
PATCH /tickets/, or an unsigned ticket: those stay on the control service.

Failures: a request without the credential it needs, or with an unknown or
expired session, is 401; a signed ticket that does not verify, or that
names another ticket than the path, or a removed transfer, is 403. Each
logs one line with the client and connection, never the token.

State: process. SignedTickets holds the relay tickets (their own
tickets.Store, apart from the control service's), their ends, the sessions
and the removed transfers, under one lock; adding a relay ticket (a round
trip to the daemon) holds only that ticket id's lock.
"""

import logging
import math
import threading
import uuid

from .. import errors
from .. import signed
from .. import tickets
from . import cors
from . import server

log = logging.getLogger("sessions")

# Seconds between sweeps of expired tickets, sessions and removed
# transfers: each authorization may sweep, at most this often.
SWEEP_INTERVAL = 1.0

# What a preflight is answered for /images (upstream's methods).
IMAGES_METHODS = "OPTIONS,GET,PUT"


class SignedTickets:
    """
    The signed tickets of a proxy.

    verifier: a signed.Verifier; its clock is the wall clock used here.
    store: the control service's tickets.Store (its tickets win).
    probe: probe(verified) -> (resource, ops, size): what serves a
        verified ticket (a relay to its daemon) and what the daemon's
        ticket allows.
    """

    def __init__(self, verifier, store, probe):
        self.verifier = verifier
        self.main = store
        self.store = tickets.Store(
            remove_timeout=store.remove_timeout,
            inactivity_timeout=store.inactivity_timeout,
            clock=store.clock)
        self.probe = probe
        self.tickets = Tickets(self)
        self._lock = threading.Lock()
        self._ends = {}         # ticket id -> end (epoch seconds)
        self._sessions = {}     # session id -> signed.Verified
        self._removed = {}      # ticket id -> refused until
        self._adding = {}       # ticket id -> lock held while adding
        self._swept = None

    def now(self):
        return self.verifier.clock.now()

    # Verifying.

    def verify(self, req, token):
        """The Verified of token, or 403 (logged without the token)."""
        try:
            verified = self.verifier.verify(token)
        except signed.InvalidTicket as e:
            log.warning("Refused signed ticket client=%s connection=%s: %s",
                        req.context.client, req.context.id, e.reason)
            raise server.Error(403, str(e))
        req.transfer_id = name(verified)
        return verified

    def credentials(self, req):
        """
        The Verified of the request's Authorization or session, or None
        if it carries neither.
        """
        token = req.headers.get("authorization")
        if token:
            return self.verify(req, token)
        session_id = req.headers.get("session-id") or req.query.get(
            "session_id")
        if session_id:
            return self.session(req, session_id)
        return None

    def authorization(self, req, what):
        """The Verified of the request's Authorization; 401 without it."""
        token = req.headers.get("authorization")
        if not token:
            log.warning("Refused %s without a signed ticket client=%s "
                        "connection=%s", what, req.context.client,
                        req.context.id)
            raise server.Error(
                401, f"{what} requires a signed ticket in the "
                     f"Authorization header")
        return self.verify(req, token)

    # Relay tickets.

    def admit(self, req, ticket_id):
        """
        Before an /images request: if it carries a signed ticket or a
        session for ticket_id, add its relay ticket. A ticket of the
        control service with that id wins.
        """
        if not ticket_id or ticket_id == "*":
            return
        if self.main.lookup(ticket_id) is not None:
            return
        verified = self.credentials(req)
        if verified is None:
            return
        check_path(req, verified, ticket_id)
        self.add(req, verified)

    def add(self, req, verified, engine=False):
        """
        Add the relay ticket of verified, or extend it to verified's end.
        engine: PUT /tickets/ by the engine, which may add a removed
        transfer again.
        """
        ticket_id = verified.ticket_id
        with self._adding_lock(ticket_id):
            with self._lock:
                if engine:
                    self._removed.pop(ticket_id, None)
                else:
                    self._check_removed(req, verified)
                ticket = self.store.lookup(ticket_id)
                if (ticket is not None and not ticket.canceled
                        and ticket_id in self._ends):
                    if verified.expires > self._ends[ticket_id]:
                        self._ends[ticket_id] = verified.expires
                        # The ticket's own timer must not end it first.
                        ticket.timeout = timeout(
                            verified.expires - self.now())
                        ticket.extend(ticket.timeout)
                    return ticket
            resource, ops, size = self.probe(verified)
            info = {"uuid": ticket_id, "size": size, "ops": ops,
                    "timeout": timeout(verified.expires - self.now()),
                    "url": verified.url}
            if verified.transfer_id is not None:
                info["transfer_id"] = verified.transfer_id
            try:
                ticket = self.store.create(info)
            except errors.InvalidTicket:
                resource.close()
                raise
            ticket.resource = resource
            with self._lock:
                if not engine:
                    # A DELETE while the daemon was asked.
                    self._check_removed(req, verified)
                self._ends[ticket_id] = verified.expires
                self.store.add(ticket)
            log.info("Added signed ticket transfer=%s ops=%s size=%s "
                     "until=%s client=%s", ticket.transfer_id, ops, size,
                     signed._iso(verified.expires), req.context.client)
            return ticket

    def _check_removed(self, req, verified):
        """403 for a signed ticket of a removed transfer. Called with the
        lock held."""
        if self._removed.get(verified.ticket_id, 0) >= self.now():
            log.warning("Refused signed ticket of removed transfer=%s "
                        "client=%s connection=%s", name(verified),
                        req.context.client, req.context.id)
            raise server.Error(403, f"Transfer {name(verified)} was removed")

    def authorize(self, ticket_id, op):
        """A relay ticket allowing op now, else raise (NoSuchTicket,
        TicketExpired...)."""
        self._sweep()
        ticket = self.store.lookup(ticket_id)
        with self._lock:
            end = self._ends.get(ticket_id)
        if ticket is None or end is None:
            raise errors.NoSuchTicket(ticket_id)
        if self.now() > end:
            raise errors.TicketExpired(ticket.transfer_id)
        ticket.authorize(op)
        return ticket

    def remove(self, req, verified):
        """Remove the relay ticket of verified and the sessions of its
        transfer; refuse them until they would have ended."""
        ticket_id = verified.ticket_id
        with self._lock:
            end = max(self._ends.pop(ticket_id, 0), verified.expires,
                      self._removed.get(ticket_id, 0))
            for session_id, v in list(self._sessions.items()):
                if v.ticket_id == ticket_id:
                    end = max(end, v.expires)
                    del self._sessions[session_id]
            self._removed[ticket_id] = end
        log.info("Removing signed ticket transfer=%s client=%s",
                 name(verified), req.context.client)
        self.store.remove(ticket_id)

    # Sessions.

    def open_session(self, req, verified):
        session_id = str(uuid.uuid4())
        with self._lock:
            self._check_removed(req, verified)
            self._sessions[session_id] = verified
        log.info("Opened session transfer=%s until=%s client=%s",
                 name(verified), signed._iso(verified.expires),
                 req.context.client)
        return session_id

    def session(self, req, session_id):
        """The Verified of a live session, or 401."""
        self._sweep()
        with self._lock:
            verified = self._sessions.get(session_id)
        if verified is None or self.now() > verified.expires:
            log.warning("Refused unknown or expired session client=%s "
                        "connection=%s", req.context.client, req.context.id)
            raise server.Error(401, "No such session, or it expired")
        req.transfer_id = name(verified)
        return verified

    def close_session(self, req, session_id):
        with self._lock:
            verified = self._sessions.pop(session_id, None)
        if verified is not None:
            log.info("Closed session transfer=%s client=%s",
                     name(verified), req.context.client)

    # Housekeeping.

    def _adding_lock(self, ticket_id):
        with self._lock:
            return self._adding.setdefault(ticket_id, threading.Lock())

    def _sweep(self):
        """Drop what ended: relay tickets with nothing in flight,
        sessions, removed transfers."""
        now = self.now()
        with self._lock:
            if self._swept is not None and \
                    0 <= now - self._swept < SWEEP_INTERVAL:
                return
            self._swept = now
            for session_id, v in list(self._sessions.items()):
                if now > v.expires:
                    del self._sessions[session_id]
            for ticket_id, until in list(self._removed.items()):
                if now > until:
                    del self._removed[ticket_id]
            ended = [ticket_id for ticket_id, end in self._ends.items()
                     if now > end]
        for ticket_id in ended:
            ticket = self.store.lookup(ticket_id)
            if ticket is not None and ticket.active:
                continue
            with self._lock:
                if self._ends.get(ticket_id, now + 1) > now:
                    continue
                del self._ends[ticket_id]
                lock = self._adding.get(ticket_id)
                if lock is not None and not lock.locked():
                    del self._adding[ticket_id]
            log.info("Signed ticket ended transfer=%s",
                     ticket.transfer_id if ticket else "-")
            self.store.remove(ticket_id)

    def close(self):
        """Remove every relay ticket (the daemon stops)."""
        self.store.clear()


class Tickets:
    """
    The tickets the /images handlers of the remote service authorize
    (images.Handler's store): the control service's first, then the
    relay tickets of signed tickets.
    """

    def __init__(self, signed_tickets):
        self.signed = signed_tickets

    def authorize(self, ticket_id, op):
        if self.signed.main.lookup(ticket_id) is not None:
            return self.signed.main.authorize(ticket_id, op)
        return self.signed.authorize(ticket_id, op)


def name(verified):
    """A verified ticket's name in logs and messages: its transfer id, or
    a digest of the ticket id."""
    return verified.transfer_id or tickets.default_transfer_id(
        verified.ticket_id)


def timeout(seconds):
    """A relay ticket's timeout (an int): seconds left, at least 1."""
    return max(1, min(tickets.MAX_TIMEOUT, math.ceil(seconds)))


def check_path(req, verified, ticket_id):
    if verified.ticket_id != ticket_id:
        log.warning("Refused signed ticket of transfer=%s for another "
                    "ticket client=%s connection=%s", name(verified),
                    req.context.client, req.context.id)
        raise server.Error(
            403, "The ticket id in the path is not the signed ticket's "
                 "transfer-ticket")


def is_preflight(req):
    return (req.method == "OPTIONS" and "origin" in req.headers
            and "access-control-request-method" in req.headers)


# Handlers.

class Gate:
    """
    An /images handler behind signed tickets: CORS preflights answered
    (browsers send them without credentials, before any ticket is
    added), then the request's signed ticket or session admitted.
    """

    def __init__(self, handler, signed_tickets):
        self._handler = handler
        self._signed = signed_tickets
        self.name = getattr(handler, "name", type(handler).__name__)

    def __getattr__(self, verb):
        method = getattr(self._handler, verb)

        def call(req, resp, ticket_id, *groups):
            if is_preflight(req):
                cors.allow(req, resp, IMAGES_METHODS)
                cors.allow_signed(req, resp)
                return
            self._signed.admit(req, ticket_id)
            method(req, resp, ticket_id, *groups)

        return call


class SessionsHandler:
    """/sessions/ (POST) and /sessions/{session id} (DELETE)."""

    name = "sessions"

    def __init__(self, signed_tickets):
        self.signed = signed_tickets

    def options(self, req, resp, session_id):
        cors.allow(req, resp, "OPTIONS,POST,DELETE")
        cors.allow_signed(req, resp)

    def post(self, req, resp, session_id):
        cors.allow(req, resp, "*")
        cors.allow_signed(req, resp)
        if session_id:
            raise server.Error(405, "Sessions are opened with POST "
                                    "/sessions/")
        verified = self.signed.authorization(req, "Opening a session")
        resp.headers["session-id"] = self.signed.open_session(req, verified)

    def delete(self, req, resp, session_id):
        cors.allow(req, resp, "*")
        if not session_id:
            raise server.Error(400, "Session id is required")
        self.signed.close_session(req, session_id)
        resp.status = 204


class TicketsHandler:
    """
    /tickets/{id} on the remote service: the engine's PUT of a signed
    ticket and its DELETE with the same signed ticket. The control API's
    other calls are not served here.
    """

    name = "tickets"

    def __init__(self, signed_tickets):
        self.signed = signed_tickets

    def put(self, req, resp, ticket_id):
        body = req.read_message(signed.MAX_TOKEN)
        if body.lstrip()[:1] in (b"{", b"["):
            log.warning("Refused unsigned ticket client=%s connection=%s",
                        req.context.client, req.context.id)
            raise server.Error(
                403, "Unsigned tickets are not accepted on this service; "
                     "add them over the control service")
        verified = self.signed.verify(req, body)
        if ticket_id:
            check_path(req, verified, ticket_id)
        self.signed.add(req, verified, engine=True)

    def delete(self, req, resp, ticket_id):
        if not ticket_id:
            log.warning("Refused removing all tickets client=%s "
                        "connection=%s", req.context.client, req.context.id)
            raise server.Error(
                403, "Removing all tickets is not allowed on this service")
        verified = self.signed.authorization(req, "Removing a ticket")
        check_path(req, verified, ticket_id)
        self.signed.remove(req, verified)
        resp.status = 204


def routes(signed_tickets, data_routes):
    """The remote service's routes with signed tickets: the /images
    routes (made with signed_tickets.tickets as their store) behind a
    Gate, /sessions/ and /tickets/."""
    return [(pattern, Gate(handler, signed_tickets))
            for pattern, handler in data_routes] + [
        (r"/sessions/(.*)", SessionsHandler(signed_tickets)),
        (r"/tickets/(.*)", TicketsHandler(signed_tickets)),
    ]
