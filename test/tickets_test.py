import threading

import pytest

from ovirt_imageio import clock
from ovirt_imageio import errors
from ovirt_imageio import tickets


def info(**kw):
    d = {
        "uuid": "ticket-1",
        "size": 1024**3,
        "ops": ["read"],
        "timeout": 300,
        "url": "nbd:unix:/run/vdsm/nbd/x.sock",
        "transfer_id": "transfer-1",
    }
    d.update(kw)
    return d


@pytest.fixture
def fake_clock():
    return clock.FakeClock()


def ticket(fake_clock, **kw):
    return tickets.Ticket(info(**kw), clock=fake_clock)


# Validation.

@pytest.mark.parametrize("missing", ["uuid", "size", "ops", "timeout", "url"])
def test_missing_required(missing):
    d = info()
    del d[missing]
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(d)
    assert str(e.value) == (
        f"Invalid ticket: Required ticket parameter is missing: {missing}")


@pytest.mark.parametrize("key,value,kind", [
    ("uuid", 1, "str"),
    ("size", "1", "int"),
    ("size", True, "int"),
    ("size", 1.5, "int"),
    ("ops", "read", "list"),
    ("timeout", None, "int"),
    ("url", 1, "str"),
    ("inactivity_timeout", "60", "int"),
    ("transfer_id", 1, "str"),
    ("filename", [], "str"),
    ("sparse", 1, "bool"),
    ("dirty", "true", "bool"),
], ids=lambda v: repr(v))
def test_wrong_type(key, value, kind):
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(**{key: value}))
    assert str(e.value) == (
        f"Invalid ticket: Invalid value for {key!r}: {value!r}: "
        f"expecting a <class '{kind}'> value")


@pytest.mark.parametrize("key", ["size", "timeout", "inactivity_timeout"])
def test_negative(key):
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(**{key: -1}))
    assert "expecting a value >= 0" in str(e.value)


# The engine sends Java ints; more than 2**31-1 seconds is nonsense, and
# a huge value broke every connection (socket timeouts overflow) or the
# expiry arithmetic (float overflow). NBD sizes are below 2**63.
@pytest.mark.parametrize("key,value,limit", [
    ("timeout", 2**31, 2**31 - 1),
    ("timeout", 10**400, 2**31 - 1),
    ("inactivity_timeout", 10**10, 2**31 - 1),
    ("size", 2**63, 2**63 - 1),
    ("size", 10**4000, 2**63 - 1),
], ids=["timeout-2**31", "timeout-400-digits", "inactivity-10**10",
        "size-2**63", "size-4000-digits"])
def test_too_large(key, value, limit):
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(**{key: value}))
    assert str(e.value).startswith(f"Invalid ticket: Invalid value for "
                                   f"{key!r}: ")
    assert str(e.value).endswith(f"expecting a value <= {limit}")


@pytest.mark.parametrize("key,value", [
    ("timeout", 2**31 - 1),
    ("inactivity_timeout", 2**31 - 1),
    ("size", 2**63 - 1),
], ids=["timeout", "inactivity_timeout", "size"])
def test_largest(fake_clock, key, value):
    assert tickets.validate(info(**{key: value}))[key] == value
    t = ticket(fake_clock, **{key: value})
    assert t.info()[key] == value


# Strings from a ticket reach headers (filename), messages and logs
# (transfer_id, url, uuid): CR/LF injected headers, a lone surrogate
# cannot be encoded at all.
@pytest.mark.parametrize("key", ["uuid", "url", "transfer_id", "filename"])
@pytest.mark.parametrize("bad", [
    "\r\nSet-Cookie: a=b", "\n", "\x00", "\t", "\x7f", "\x85", "\ud800",
], ids=["crlf", "lf", "nul", "tab", "del", "c1", "surrogate"])
def test_control_characters(key, bad):
    value = "file:///x" + bad if key == "url" else "name" + bad
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(**{key: value}))
    assert str(e.value) == (
        f"Invalid ticket: Invalid value for {key!r}: {value!r}: "
        f"expecting a string without control characters or surrogates")


@pytest.mark.parametrize("filename", [
    "disk.raw", "d\u00efsk \"1\".qcow2", "\u05d3\u05d9\u05e1\u05e7.img",
    "\U0001f4be.raw",
], ids=["ascii", "latin-1", "hebrew", "emoji"])
def test_filename_unicode(filename):
    assert tickets.validate(info(filename=filename))["filename"] == filename


def test_unknown_op():
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(ops=["read", "delete"]))
    assert "'ops'" in str(e.value)


def test_empty_uuid():
    with pytest.raises(errors.InvalidTicket):
        tickets.validate(info(uuid=""))


def test_not_a_dict():
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate([1])
    assert str(e.value).startswith("Invalid ticket: ")


@pytest.mark.parametrize("url,reason", [
    ("ftp://host/x", "Unsupported url scheme: ftp"),
    ("/no/scheme", "Unsupported url scheme: "),
    ("http://[1.2.3.4:33", "Invalid IPv6 URL"),
])
def test_bad_url(url, reason):
    with pytest.raises(errors.InvalidTicket) as e:
        tickets.validate(info(url=url))
    assert str(e.value) == (
        f"Invalid ticket: Invalid value for 'url': {url!r}: {reason}")


@pytest.mark.parametrize("url", [
    "file:///var/tmp/disk.img",
    "nbd:unix:/run/vdsm/nbd/x.sock",
    "nbd:unix:/run/vdsm/backup/x:exportname=sda",
    "nbd://localhost:10809/sda",
    "nbd+unix:///sda?socket=/tmp/sock",
    "https://host:54322/images/ticket-1",
    "http://host:54322/images/ticket-1",
])
def test_good_url(url):
    assert tickets.validate(info(url=url))["url"] == url


def test_defaults(fake_clock):
    d = info(uuid="6f2c1f0e-1c2b-4a39-9a7e-0123456789ab")
    del d["transfer_id"]
    t = tickets.Ticket(d, inactivity_timeout=42, clock=fake_clock)
    assert t.inactivity_timeout == 42
    assert t.sparse is False
    assert t.dirty is False
    assert t.filename is None
    assert t.transfer_id.startswith("(ticket/")
    # The transfer id is logged; it must not reveal the ticket id.
    assert "6f2c1f0e" not in t.transfer_id


# Authorization and the lifecycle table.

@pytest.mark.parametrize("ops,op,allowed", [
    (["read"], "read", True),
    (["read"], "write", False),
    (["write"], "write", True),
    (["write"], "read", True),
    (["read", "write"], "write", True),
    ([], "read", False),
])
def test_may(fake_clock, ops, op, allowed):
    assert ticket(fake_clock, ops=ops).may(op) is allowed


def test_forbidden(fake_clock):
    t = ticket(fake_clock, ops=["read"])
    with pytest.raises(errors.OperationForbidden) as e:
        t.authorize("write")
    assert str(e.value) == (
        "You are not allowed to access this resource: "
        "Transfer=transfer-1 forbids write")


def test_expiry(fake_clock):
    t = ticket(fake_clock, timeout=300)
    fake_clock.advance(299)
    t.authorize("read")
    fake_clock.advance(1)
    with pytest.raises(errors.TicketExpired) as e:
        t.authorize("read")
    assert str(e.value).endswith("Transfer=transfer-1 expired")


def test_extend_revives(fake_clock):
    t = ticket(fake_clock, timeout=10)
    fake_clock.advance(20)
    t.extend(100)
    t.authorize("read")
    assert t.expires == fake_clock.now() + 100
    # The original timeout is kept: the next operation re-arms with it.
    assert t.info()["timeout"] == 10
    with t.operation(0):
        pass
    assert t.expires == fake_clock.now() + 10


def test_touch_rearms(fake_clock):
    t = ticket(fake_clock, timeout=10)
    fake_clock.advance(9)
    t.touch()
    fake_clock.advance(9)
    t.authorize("read")


def test_operation_survives_expiry(fake_clock):
    t = ticket(fake_clock, timeout=10)
    with t.operation(0) as op:
        fake_clock.advance(60)
        op.done(100)  # expiry does not interrupt an operation
        with pytest.raises(errors.TicketExpired):
            t.authorize("read")
    # Completion re-arms expiry.
    t.authorize("read")


def test_canceled_ticket_refuses(fake_clock):
    t = ticket(fake_clock)
    assert t.cancel(0)
    with pytest.raises(errors.TicketCanceled) as e:
        t.authorize("read")
    assert str(e.value).endswith("Transfer=transfer-1 was canceled")
    with pytest.raises(errors.TicketCanceled):
        t.operation(0)
    with pytest.raises(errors.TicketCanceled):
        t.add_context(object())


def test_cancel_stops_operation_at_boundary(fake_clock):
    t = ticket(fake_clock)
    with t.operation(0) as op:
        op.done(10)
        assert not t.cancel(0)  # still in flight
        with pytest.raises(errors.TransferCanceled) as e:
            op.done(10)
        assert str(e.value).endswith("Transfer transfer-1 was canceled")
    assert not t.active


def test_cancel_waits_for_operations(fake_clock):
    t = ticket(fake_clock)
    op = t.operation(0)
    result = []
    canceler = threading.Thread(target=lambda: result.append(t.cancel(30)))
    canceler.start()
    # The canceler waits on the ticket; end the operation to release it.
    op.__exit__(None, None, None)
    canceler.join(30)
    assert result == [True]


class Context:

    def __init__(self):
        self.canceled = False

    def cancel(self):
        self.canceled = True


def test_cancel_contexts(fake_clock):
    t = ticket(fake_clock)
    ctx = Context()
    t.add_context(ctx)
    assert t.connections == 1
    assert t.cancel(0)
    assert ctx.canceled
    t.remove_context(ctx)
    assert t.connections == 0


# Status.

def test_info_fields(fake_clock):
    t = ticket(fake_clock, filename="disk.raw", inactivity_timeout=3600)
    d = t.info()
    assert list(d) == [
        "active", "canceled", "connections", "expires", "idle_time",
        "inactivity_timeout", "ops", "size", "sparse", "dirty", "timeout",
        "url", "uuid", "transfer_id", "filename", "transferred",
        # Ours, after upstream's.
        "read_bytes", "written_bytes", "zeroed_bytes", "read_zero_bytes",
        "failed_requests"]
    assert d["expires"] == int(fake_clock.now()) + 300
    assert d["inactivity_timeout"] == 3600
    assert d["transferred"] == 0


class FailingResource:
    """What serves a ticket's bytes; error says why it cannot now."""

    def __init__(self):
        self.error = None

    def close(self):
        pass


def test_info_error_from_resource(fake_clock):
    t = ticket(fake_clock)
    t.resource = FailingResource()
    healthy = t.info()
    # No error: no field, as upstream (vdsm reads these documents).
    assert "error" not in healthy
    t.resource.error = "qemu-nbd pid=42 exited with code -9"
    d = t.info()
    assert d["error"] == "qemu-nbd pid=42 exited with code -9"
    # The other fields are unchanged; the new one comes last.
    assert list(d)[-1] == "error"
    del d["error"]
    assert d == healthy


def test_info_resource_without_error(fake_clock):
    t = ticket(fake_clock)
    t.resource = object()
    assert "error" not in t.info()


def test_info_no_transferred_for_two_ops(fake_clock):
    d = ticket(fake_clock, ops=["read", "write"]).info()
    assert "transferred" not in d
    assert "filename" not in d


def test_idle_time(fake_clock):
    t = ticket(fake_clock)
    fake_clock.advance(5.5)
    assert t.info()["idle_time"] == 5
    with t.operation(0):
        assert t.info()["idle_time"] == 0
        assert t.info()["active"] is True
        fake_clock.advance(10)
    assert t.info()["idle_time"] == 0
    assert t.info()["active"] is False
    fake_clock.advance(3)
    assert t.info()["idle_time"] == 3


def test_transferred_union(fake_clock):
    # The example measured on upstream: PUT 0-64K, PUT 32K-96K, zero 1M+1M,
    # GET 8M+64K => 1212416.
    t = ticket(fake_clock, ops=["write"])
    for offset, length in [(0, 65536), (32768, 65536), (1 << 20, 1 << 20),
                           (8 << 20, 65536)]:
        with t.operation(offset) as op:
            op.done(length)
    assert t.info()["transferred"] == 1212416


def test_transferred_in_flight(fake_clock):
    t = ticket(fake_clock)
    with t.operation(0) as op:
        op.done(1 << 20)
    with t.operation(2 << 20) as op:
        op.done(1 << 20)
        with t.operation(512 << 10) as op2:
            op2.done(1 << 20)
            assert t.transferred() == 2621440
    assert t.transferred() == 2621440


@pytest.mark.parametrize("ranges,total", [
    ([], 0),
    ([(0, 10)], 10),
    ([(0, 10), (10, 20)], 20),
    ([(10, 20), (0, 10)], 20),
    ([(0, 10), (20, 30)], 20),
    ([(0, 10), (20, 30), (5, 25)], 30),
    ([(0, 100), (10, 20)], 100),
    ([(5, 5)], 0),
    ([(20, 30), (0, 10), (40, 50), (9, 41)], 50),
])
def test_ranges(ranges, total):
    r = tickets.Ranges()
    for start, end in ranges:
        r.add(start, end)
    assert r.total() == total
    spans = list(r)
    assert spans == sorted(spans)
    for (_, e1), (s2, _) in zip(spans, spans[1:]):
        assert e1 < s2


# Store.

class Resource:
    closed = 0

    def close(self):
        self.closed += 1


def test_store_add_lookup_remove(fake_clock):
    store = tickets.Store(clock=fake_clock)
    t = store.create(info())
    t.resource = Resource()
    store.add(t)
    assert store.lookup("ticket-1") is t
    assert store.authorize("ticket-1", "read") is t
    store.remove("ticket-1")
    assert store.lookup("ticket-1") is None
    assert t.resource.closed == 1
    store.remove("ticket-1")  # idempotent


def test_store_unknown(fake_clock):
    store = tickets.Store(clock=fake_clock)
    with pytest.raises(errors.NoSuchTicket) as e:
        store.authorize("nope", "read")
    assert str(e.value) == (
        "You are not allowed to access this resource: No such ticket nope")


def test_store_replace_closes_old(fake_clock):
    store = tickets.Store(clock=fake_clock)
    old = store.create(info())
    old.resource = Resource()
    store.add(old)
    new = store.create(info())
    store.add(new)
    assert store.lookup("ticket-1") is new
    assert old.canceled
    assert old.resource.closed == 1


def test_store_remove_timeout(fake_clock):
    store = tickets.Store(remove_timeout=0, clock=fake_clock)
    t = store.create(info())
    t.resource = Resource()
    store.add(t)
    with t.operation(0):
        with pytest.raises(errors.CancelTimeout) as e:
            store.remove("ticket-1")
        assert str(e.value) == "Timeout cancelling transfer transfer-1"
        assert store.lookup("ticket-1") is t
        assert t.info()["canceled"] is True
        assert t.resource.closed == 0
    store.remove("ticket-1")
    assert store.lookup("ticket-1") is None
    assert t.resource.closed == 1


def test_store_clear(fake_clock):
    store = tickets.Store(clock=fake_clock)
    resources = []
    for i in range(3):
        t = store.create(info(uuid=f"t{i}"))
        t.resource = Resource()
        resources.append(t.resource)
        store.add(t)
    store.clear()
    assert len(store) == 0
    assert [r.closed for r in resources] == [1, 1, 1]


# Counters.

def test_counts_bytes_by_kind(fake_clock):
    store = tickets.Store(clock=fake_clock)
    t = store.create(info(ops=["write"]))
    store.add(t)
    with t.operation(0, "write") as op:
        op.done(100)
        op.done(20)
    with t.operation(200, "zero") as op:
        op.done(1000)
    with t.operation(0, "read") as op:
        op.zero_extent(30)
        op.done(50)
    with t.operation(0, "flush"):
        pass
    with t.operation(0, "checksum") as op:
        op.done(7)
    stats = t.stats()
    assert stats["bytes"] == {"read": 50, "write": 120, "zero": 1000}
    assert stats["read_zero_bytes"] == 30
    d = t.info()
    assert (d["read_bytes"], d["written_bytes"], d["zeroed_bytes"],
            d["read_zero_bytes"]) == (50, 120, 1000, 30)
    assert store.totals.snapshot()["bytes"] == stats["bytes"]


def test_in_flight_bytes(fake_clock):
    store = tickets.Store(clock=fake_clock)
    t = store.create(info())
    ctx = Context()
    t.add_context(ctx)
    with t.operation(0, "read", ctx) as op:
        op.done(4096)
        stats = t.stats()
        assert stats["bytes"]["read"] == 4096
        assert stats["active_operations"] == 1
        assert stats["contexts"] == [(ctx, 4096, True)]
        # The process totals count operations that ended.
        assert store.totals.snapshot()["bytes"]["read"] == 0
    stats = t.stats()
    assert stats["contexts"] == [(ctx, 4096, False)]
    assert stats["active_operations"] == 0
    assert store.totals.snapshot()["bytes"]["read"] == 4096


def test_bytes_by_context(fake_clock):
    t = ticket(fake_clock)
    a, b = Context(), Context()
    t.add_context(a)
    t.add_context(b)
    for ctx, n in ((a, 10), (b, 20), (a, 5)):
        with t.operation(0, "read", ctx) as op:
            op.done(n)
    assert sorted(n for _, n, _ in t.stats()["contexts"]) == [15, 20]
    t.remove_context(a)
    assert t.stats()["contexts"] == [(b, 20, False)]
    # Its bytes stay the ticket's.
    assert t.stats()["bytes"]["read"] == 35


def test_count_requests(fake_clock):
    store = tickets.Store(clock=fake_clock)
    t = store.create(info())
    t.count_request("read", "200")
    t.count_request("read", "200")
    t.count_request("read", "500", failed=True)
    t.count_request("read", "cut", failed=True)
    stats = t.stats()
    assert stats["requests"] == {("read", "200"): 2, ("read", "500"): 1,
                                 ("read", "cut"): 1}
    assert stats["errors"] == 2
    assert t.info()["failed_requests"] == 2
    assert store.totals.snapshot()["errors"] == 2


def test_totals_survive_removal(fake_clock):
    store = tickets.Store(clock=fake_clock)
    for uuid in ("a", "b"):
        t = store.create(info(uuid=uuid))
        store.add(t)
        with t.operation(0, "read") as op:
            op.done(10)
        store.remove(uuid)
    assert len(store) == 0
    assert store.totals.snapshot()["bytes"]["read"] == 20


def test_store_tickets(fake_clock):
    store = tickets.Store(clock=fake_clock)
    assert store.tickets() == []
    t = store.create(info())
    store.add(t)
    assert store.tickets() == [t]
