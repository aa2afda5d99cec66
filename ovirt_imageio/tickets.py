"""
Tickets: who may do what to which image, and for how long.

State lives at three addresses:
- process: the Store, the table of tickets by id.
- ticket: expiry, operations in flight, the canceled flag, the byte ranges
  transferred, and the connection contexts using it.
- operation: its offset and the bytes done so far.

Counters (for /metrics, the listing and the status document): a ticket
counts the bytes of its operations by kind (read, write, zero, and the
bytes of reads that were zero extents) and its requests by operation and
status. An operation adds its bytes once, when it ends, under the lock
the ticket takes then anyway; bytes of operations in flight are added
when asked. So counting costs nothing per piece. The store keeps the
process's totals, which go on counting after a ticket is removed.

A ticket knows neither NBD nor HTTP. What serves its bytes (an NBD export,
a qemu-nbd process) is an opaque `resource` with a close() method, closed
when the ticket leaves the store, and optionally an `error` attribute:
why it cannot serve now (its qemu-nbd died and could not be started
again), shown as the status's "error" field. Connection contexts are
opaque objects with a cancel() method, which must be safe to call from
another thread.

Lifecycle (tested as a table in test/tickets_test.py):

    state     | event                       | result
    ----------+-----------------------------+----------------------------------
    valid     | authorize(op allowed)       | ok
    valid     | authorize(op not allowed)   | OperationForbidden
    valid     | now >= expires              | expired
    expired   | authorize                   | TicketExpired
    expired   | extend(timeout)             | valid
    expired   | operation in flight ends    | valid (completion re-arms expiry)
    valid     | OPTIONS / operation ends    | expires = now + timeout
    any       | cancel, nothing in flight   | removed
    any       | cancel, ops do not finish   | canceled, CancelTimeout (409)
    canceled  | authorize / new operation   | TicketCanceled
    canceled  | op reaches buffer boundary  | TransferCanceled

Cancellation: cancel() marks the ticket canceled, so authorization and new
operations fail at once, asks every connection context to cancel (an idle
one releases its NBD connection, a busy one is stopped by its operation),
and waits for operations in flight to end. Operations check the flag each
time they report progress, that is at every buffer boundary, so a transfer
stops within one buffer. Expiry never interrupts an operation in flight.
"""

import bisect
import hashlib
import logging
import threading
import unicodedata
import urllib.parse

from . import clock as _clock
from . import errors

log = logging.getLogger("tickets")

OPS = ("read", "write")
SCHEMES = ("file", "nbd", "nbd+unix", "http", "https")

# Upper bounds of numbers in a ticket. The engine sends Java ints, and
# 2**31-1 seconds is 68 years: a larger timeout is a mistake, and a huge
# one broke expiry (float overflow) or every connection (a socket timeout
# past 2**63 ns). NBD sizes are below 2**63.
MAX_TIMEOUT = 2**31 - 1
MAX_SIZE = 2**63 - 1


def validate(info):
    """
    Check a ticket dict sent by vdsm or the engine, and return a normalized
    copy with defaults filled. Raise errors.InvalidTicket with upstream's
    messages, stricter than upstream where upstream accepted nonsense
    (booleans as sizes, negative sizes and timeouts, unknown ops).
    """
    if not isinstance(info, dict):
        raise errors.InvalidTicket(
            f"Expecting a JSON object, got {type(info).__name__}")

    def required(key, kind):
        if key not in info:
            raise errors.InvalidTicket(
                f"Required ticket parameter is missing: {key}")
        return checked(key, info[key], kind)

    def optional(key, kind, default):
        if key not in info:
            return default
        return checked(key, info[key], kind)

    t = {}
    t["uuid"] = _text("uuid", required("uuid", str))
    if not t["uuid"]:
        raise _invalid("uuid", t["uuid"], "expecting a non-empty string")
    t["size"] = _bounded("size", required("size", int), MAX_SIZE)
    t["ops"] = required("ops", list)
    for op in t["ops"]:
        if op not in OPS:
            raise _invalid("ops", t["ops"], f"expecting items in {list(OPS)}")
    t["timeout"] = _bounded("timeout", required("timeout", int),
                            MAX_TIMEOUT)
    t["url"] = _checked_url(_text("url", required("url", str)))
    t["inactivity_timeout"] = optional("inactivity_timeout", int, None)
    if t["inactivity_timeout"] is not None:
        _bounded("inactivity_timeout", t["inactivity_timeout"], MAX_TIMEOUT)
    # The filename goes to a header (Content-Disposition), the transfer id
    # to messages and log lines.
    t["transfer_id"] = optional("transfer_id", str, None)
    if t["transfer_id"] is not None:
        _text("transfer_id", t["transfer_id"])
    t["filename"] = optional("filename", str, None)
    if t["filename"] is not None:
        _text("filename", t["filename"])
    t["sparse"] = optional("sparse", bool, False)
    t["dirty"] = optional("dirty", bool, False)
    return t


def checked(key, value, kind):
    # bool is an int in Python; a JSON true is not a size.
    if (not isinstance(value, kind)
            or (kind is int and isinstance(value, bool))):
        raise _invalid(key, value, f"expecting a {kind} value")
    return value


def _bounded(key, value, limit):
    if value < 0:
        raise _invalid(key, value, "expecting a value >= 0")
    if value > limit:
        raise _invalid(key, value, f"expecting a value <= {limit}")
    return value


def _text(key, value):
    """
    Refuse control characters (C0, DEL, C1: CR/LF would inject headers
    and log lines) and lone surrogates (JSON allows "\\ud800"; they cannot
    be encoded to UTF-8 for a header, a message or a log).
    """
    for c in value:
        if unicodedata.category(c) in ("Cc", "Cs"):
            raise _invalid(
                key, value,
                "expecting a string without control characters or "
                "surrogates")
    return value


def _checked_url(url):
    try:
        scheme = urllib.parse.urlparse(url).scheme
    except ValueError as e:
        raise _invalid("url", url, str(e))
    if scheme not in SCHEMES:
        raise _invalid("url", url, f"Unsupported url scheme: {scheme}")
    return url


def _invalid(key, value, reason):
    return errors.InvalidTicket(
        f"Invalid value for {key!r}: {value!r}: {reason}")


def default_transfer_id(ticket_id):
    # Upstream uses the first half of the ticket id here. The transfer id
    # goes to logs and error messages, and the ticket id is a credential,
    # so we name the ticket by a digest instead.
    digest = hashlib.sha256(ticket_id.encode("utf-8")).hexdigest()
    return f"(ticket/{digest[:18]})"


class Ranges:
    """
    A union of byte ranges [start, end), kept sorted and merged.
    Not thread safe: the ticket's lock guards it.
    """

    def __init__(self):
        self._starts = []
        self._ends = []

    def add(self, start, end):
        if start >= end:
            return
        # Find every range touching [start, end], merge them into one.
        lo = bisect.bisect_left(self._ends, start)
        hi = bisect.bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]

    def total(self):
        return sum(e - s for s, e in zip(self._starts, self._ends))

    def __iter__(self):
        return iter(zip(self._starts, self._ends))


# Operation kinds whose bytes are counted.
BYTE_KINDS = ("read", "write", "zero")


class Operation:
    """
    An operation in flight on a ticket: a read, write, zero, flush or
    checksum. Report progress with done(n) at each buffer boundary; it
    raises errors.TransferCanceled once the ticket is canceled.

    kind: counts its bytes as "read", "write" or "zero" (others are not
    counted); context: the connection context it runs on (counted per
    connection). zeros: bytes of a read sent from zero extents, set by
    the thread running it (a plain int: one writer).
    """

    def __init__(self, ticket, offset, kind=None, context=None):
        self.ticket = ticket
        self.offset = offset
        self.length = 0
        self.kind = kind
        self.context = context
        self.zeros = 0

    def done(self, n):
        self.ticket._progress(self, n)

    def zero_extent(self, n):
        """n bytes of this read were a zero extent (never read)."""
        self.zeros += n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.ticket._end(self)


class Ticket:

    def __init__(self, info, *, inactivity_timeout=60, clock=_clock.system):
        t = validate(info)
        self.uuid = t["uuid"]
        self.size = t["size"]
        self.ops = t["ops"]
        self.timeout = t["timeout"]
        self.url = t["url"]
        self.inactivity_timeout = (
            inactivity_timeout if t["inactivity_timeout"] is None
            else t["inactivity_timeout"])
        self.transfer_id = t["transfer_id"] or default_transfer_id(self.uuid)
        self.filename = t["filename"]
        self.sparse = t["sparse"]
        self.dirty = t["dirty"]

        # What serves the ticket's bytes, owned by the ticket; closed when
        # the ticket leaves the store.
        self.resource = None

        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._ops = set()
        self._contexts = set()
        self._transferred = Ranges()
        self._canceled = False
        # Bytes of ended operations by kind, and of reads from zero
        # extents; by connection context; requests by (op, status).
        self._bytes = dict.fromkeys(BYTE_KINDS, 0)
        self._read_zeros = 0
        self._context_bytes = {}
        self._requests = {}
        self._errors = 0
        # The store's process totals, set by Store.create().
        self.totals = None
        now = clock.now()
        self._expires = now + self.timeout
        self._access = now

    # Access.

    def may(self, op):
        # A writer must be able to read what it wrote (upstream: write
        # implies read).
        return op in self.ops or (op == "read" and "write" in self.ops)

    def authorize(self, op):
        with self._cond:
            if self._canceled:
                raise errors.TicketCanceled(self.transfer_id)
            if self._expires <= self._clock.now():
                raise errors.TicketExpired(self.transfer_id)
        if not self.may(op):
            raise errors.OperationForbidden(self.transfer_id, op)

    def touch(self):
        """Re-arm expiry and reset idle time (OPTIONS, operation end)."""
        with self._cond:
            self._touch()

    def _touch(self):
        now = self._clock.now()
        self._expires = now + self.timeout
        self._access = now

    def extend(self, timeout):
        """Expire timeout seconds from now; keeps the original timeout."""
        with self._cond:
            self._expires = self._clock.now() + timeout

    @property
    def canceled(self):
        return self._canceled

    @property
    def expires(self):
        return self._expires

    # Operations.

    def operation(self, offset=0, kind=None, context=None):
        """Start an operation at offset; use as a context manager."""
        op = Operation(self, offset, kind, context)
        with self._cond:
            if self._canceled:
                raise errors.TicketCanceled(self.transfer_id)
            self._ops.add(op)
        return op

    def _progress(self, op, n):
        with self._cond:
            op.length += n
            if self._canceled:
                raise errors.TransferCanceled(self.transfer_id)

    def _end(self, op):
        with self._cond:
            self._ops.discard(op)
            self._transferred.add(op.offset, op.offset + op.length)
            self._count(op)
            # Under the ticket's lock: whoever sees the operation ended
            # sees it in the totals too.
            if self.totals is not None:
                self.totals.add_operation(op)
            self._touch()
            self._cond.notify_all()

    def _count(self, op):
        if op.kind in self._bytes:
            self._bytes[op.kind] += op.length
            self._read_zeros += op.zeros
        if op.context in self._contexts:
            self._context_bytes[op.context] = (
                self._context_bytes.get(op.context, 0) + op.length)

    @property
    def active(self):
        with self._cond:
            return bool(self._ops)

    def transferred(self):
        """The union of byte ranges done, including operations in flight."""
        with self._cond:
            if not self._ops:
                return self._transferred.total()
            ranges = Ranges()
            for start, end in self._transferred:
                ranges.add(start, end)
            for op in self._ops:
                ranges.add(op.offset, op.offset + op.length)
            return ranges.total()

    # Connections.

    def add_context(self, context):
        with self._cond:
            if self._canceled:
                raise errors.TicketCanceled(self.transfer_id)
            self._contexts.add(context)

    def remove_context(self, context):
        with self._cond:
            self._contexts.discard(context)
            self._context_bytes.pop(context, None)

    @property
    def connections(self):
        with self._cond:
            return len(self._contexts)

    # Counters.

    def count_request(self, op, status, failed=False):
        """
        Count a request of this ticket that ended with status; failed: it
        failed on the server's side (a 5xx, or cut after its response
        started).
        """
        with self._cond:
            key = (op, status)
            self._requests[key] = self._requests.get(key, 0) + 1
            if failed:
                self._errors += 1
                if self.totals is not None:
                    self.totals.add_error()

    def stats(self):
        """
        The ticket's counters, with operations in flight, for /metrics and
        the listing: a dict with "bytes" (by kind), "read_zero_bytes",
        "requests" ({(op, status): n}), "errors", "connections",
        "active_operations", and "contexts": [(context, bytes, busy)],
        busy if an operation runs on it.
        """
        with self._cond:
            byte_counts = dict(self._bytes)
            read_zeros = self._read_zeros
            per_context = {ctx: self._context_bytes.get(ctx, 0)
                           for ctx in self._contexts}
            busy = set()
            for op in self._ops:
                if op.kind in byte_counts:
                    byte_counts[op.kind] += op.length
                    read_zeros += op.zeros
                if op.context in per_context:
                    per_context[op.context] += op.length
                    busy.add(op.context)
            return {
                "bytes": byte_counts,
                "read_zero_bytes": read_zeros,
                "requests": dict(self._requests),
                "errors": self._errors,
                "connections": len(self._contexts),
                "active_operations": len(self._ops),
                "contexts": [(ctx, n, ctx in busy)
                             for ctx, n in per_context.items()],
            }

    # Cancellation.

    def cancel(self, timeout):
        """
        Cancel the ticket and wait up to timeout seconds for operations in
        flight to end. Return True if none is left.
        """
        with self._cond:
            self._canceled = True
            contexts = list(self._contexts)
        for ctx in contexts:
            try:
                ctx.cancel()
            except Exception:
                log.exception("Error canceling connection of transfer=%s",
                              self.transfer_id)
        with self._cond:
            return self._cond.wait_for(lambda: not self._ops, timeout)

    def close(self):
        """Release what serves the ticket. Called when it leaves the store."""
        if self.resource is not None:
            self.resource.close()

    # Status.

    def info(self):
        """The status document of GET /tickets/ID (key order matters)."""
        now = self._clock.now()
        with self._cond:
            active = bool(self._ops)
            d = {
                "active": active,
                "canceled": self._canceled,
                "connections": len(self._contexts),
                "expires": int(self._expires),
                "idle_time": 0 if active else int(now - self._access),
                "inactivity_timeout": self.inactivity_timeout,
                "ops": list(self.ops),
                "size": self.size,
                "sparse": self.sparse,
                "dirty": self.dirty,
                "timeout": self.timeout,
                "url": self.url,
                "uuid": self.uuid,
                "transfer_id": self.transfer_id,
            }
        if self.filename is not None:
            d["filename"] = self.filename
        if len(self.ops) == 1:
            d["transferred"] = self.transferred()
        # Ours, under names of their own: vdsm and the engine
        # read upstream's fields above.
        stats = self.stats()
        d["read_bytes"] = stats["bytes"]["read"]
        d["written_bytes"] = stats["bytes"]["write"]
        d["zeroed_bytes"] = stats["bytes"]["zero"]
        d["read_zero_bytes"] = stats["read_zero_bytes"]
        d["failed_requests"] = stats["errors"]
        # Only when there is one: vdsm and the engine know the others.
        error = getattr(self.resource, "error", None)
        if isinstance(error, str) and error:
            d["error"] = error
        return d


class Totals:
    """
    The process's counters over every ticket, removed ones too: bytes by
    kind, and failed requests. Bytes are added when an
    operation ends (so the totals never go back), under a lock taken once
    per operation or failed request, never per piece; a ticket takes it
    under its own lock, never the other way.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._bytes = dict.fromkeys(BYTE_KINDS, 0)
        self._read_zeros = 0
        self._errors = 0

    def add_operation(self, op):
        if op.kind in self._bytes:
            with self._lock:
                self._bytes[op.kind] += op.length
                self._read_zeros += op.zeros

    def add_error(self):
        with self._lock:
            self._errors += 1

    def snapshot(self):
        """Counters of ended operations and failed requests:
        {"bytes": {kind: n}, "read_zero_bytes": n, "errors": n}."""
        with self._lock:
            return {"bytes": dict(self._bytes),
                    "read_zero_bytes": self._read_zeros,
                    "errors": self._errors}


class Store:
    """The process's ticket table. Thread safe."""

    def __init__(self, *, remove_timeout=60, inactivity_timeout=60,
                 clock=_clock.system):
        self.remove_timeout = remove_timeout
        self.inactivity_timeout = inactivity_timeout
        self.clock = clock
        self.totals = Totals()
        self._lock = threading.Lock()
        self._tickets = {}

    def create(self, info):
        """Build a Ticket from a dict with this store's defaults."""
        ticket = Ticket(info, inactivity_timeout=self.inactivity_timeout,
                        clock=self.clock)
        ticket.totals = self.totals
        return ticket

    def tickets(self):
        """The tickets in the store now, in no particular order."""
        with self._lock:
            return list(self._tickets.values())

    def add(self, ticket):
        """Add a ticket, replacing one with the same id."""
        with self._lock:
            old = self._tickets.get(ticket.uuid)
            self._tickets[ticket.uuid] = ticket
        log.info("Adding ticket transfer=%s size=%s ops=%s timeout=%s",
                 ticket.transfer_id, ticket.size, ticket.ops, ticket.timeout)
        if old is not None:
            self._discard(old)

    def lookup(self, ticket_id):
        """Return the ticket or None."""
        with self._lock:
            return self._tickets.get(ticket_id)

    def authorize(self, ticket_id, op):
        """Return the ticket if it allows op now, else raise."""
        ticket = self.lookup(ticket_id)
        if ticket is None:
            raise errors.NoSuchTicket(ticket_id)
        ticket.authorize(op)
        return ticket

    def remove(self, ticket_id):
        """
        Cancel and remove a ticket. Unknown ids are fine (idempotent).
        Raise errors.CancelTimeout if operations in flight do not end in
        remove_timeout seconds; the ticket stays, canceled, for a retry.
        """
        ticket = self.lookup(ticket_id)
        if ticket is None:
            return
        log.info("Removing ticket transfer=%s", ticket.transfer_id)
        if not ticket.cancel(self.remove_timeout):
            raise errors.CancelTimeout(ticket.transfer_id)
        with self._lock:
            if self._tickets.get(ticket_id) is ticket:
                del self._tickets[ticket_id]
        ticket.close()

    def clear(self):
        """Remove every ticket now, without waiting for operations."""
        with self._lock:
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for ticket in tickets:
            self._discard(ticket)

    def _discard(self, ticket):
        ticket.cancel(0)
        try:
            ticket.close()
        except Exception:
            log.exception("Error closing transfer=%s", ticket.transfer_id)

    def __len__(self):
        with self._lock:
            return len(self._tickets)
