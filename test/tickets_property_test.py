"""
Generated input for ticket validation (tickets.validate, tickets.Ticket):
no exception but errors.InvalidTicket for any JSON value, and what is
accepted satisfies the ticket's invariants, validates again to itself and
survives a JSON round trip. Settings: test/properties.py.
"""

import json

from hypothesis import given
from hypothesis import strategies as st

import properties  # noqa: F401 (loads the hypothesis profile)
from ovirt_imageio import clock
from ovirt_imageio import errors
from ovirt_imageio import tickets

# Sizes and timeouts a real ticket may carry: int64, as vdsm and the engine
# send. Larger ones are a known defect (see test_huge_ints).
INT64 = 2**63 - 1

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-INT64, INT64),
    st.floats(allow_nan=False), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=10)

urls = st.one_of(
    st.sampled_from([
        "nbd:unix:/run/vdsm/nbd/x.sock", "nbd:unix:/s:exportname=x",
        "nbd+unix:///x?socket=/s", "nbd://localhost:10809/x",
        "file:///var/tmp/disk.img", "https://host:54322/images/x",
        "http://host/images/x", "ftp://host/x", "", "nbd:", "http://[::1",
        "file://\x00", "unix:/x", "//host/x", "\u00e9://x",
    ]),
    st.text(max_size=30),
    st.builds(lambda s, rest: f"{s}:{rest}",
              st.sampled_from(tickets.SCHEMES), st.text(max_size=20)))

# Each key with plausible values, wrong types and odd values mixed in.
FIELDS = {
    "uuid": st.one_of(st.text(max_size=40), json_values),
    "size": st.one_of(st.integers(-10, INT64), json_values),
    "ops": st.one_of(
        st.lists(st.sampled_from(["read", "write", "zero", "", "READ"]),
                 max_size=3),
        json_values),
    "timeout": st.one_of(st.integers(-10, INT64), json_values),
    "url": st.one_of(urls, json_values),
    "inactivity_timeout": st.one_of(st.integers(-10, INT64), json_values),
    "transfer_id": st.one_of(st.text(max_size=20), json_values),
    "filename": st.one_of(st.text(max_size=20), json_values),
    "sparse": st.one_of(st.booleans(), json_values),
    "dirty": st.one_of(st.booleans(), json_values),
}
REQUIRED = ("uuid", "size", "ops", "timeout", "url")


@st.composite
def ticket_dicts(draw):
    d = {}
    for key, values in FIELDS.items():
        # Required keys are there most of the time, optional ones half.
        present = draw(st.integers(0, 9)) < (9 if key in REQUIRED else 5)
        if present:
            d[key] = draw(values)
    d.update(draw(st.dictionaries(st.text(max_size=8), json_values,
                                  max_size=2)))
    return d


def check_valid(t):
    assert isinstance(t["uuid"], str) and t["uuid"]
    for key in ("size", "timeout"):
        assert type(t[key]) is int and t[key] >= 0
    assert isinstance(t["ops"], list)
    assert set(t["ops"]) <= set(tickets.OPS)
    assert isinstance(t["url"], str)
    assert t["url"].split(":", 1)[0].lower() in tickets.SCHEMES
    it = t["inactivity_timeout"]
    assert it is None or (type(it) is int and it >= 0)
    for key in ("transfer_id", "filename"):
        assert t[key] is None or isinstance(t[key], str)
    for key in ("sparse", "dirty"):
        assert type(t[key]) is bool


@given(st.one_of(json_values, ticket_dicts()))
def test_validate(info):
    try:
        t = tickets.validate(info)
    except errors.InvalidTicket as e:
        assert str(e).startswith("Invalid ticket: ")
        return
    check_valid(t)
    # Normalized: validating again changes nothing, nor does JSON. The
    # defaults of absent optional keys are None, which a sender may not
    # send (null is not a string), so those are left out.
    sent = {k: v for k, v in t.items() if v is not None}
    assert tickets.validate(sent) == t
    assert tickets.validate(json.loads(json.dumps(sent))) == t
    # What the caller sent is kept, not rewritten.
    for key in FIELDS:
        if key in info:
            assert t[key] == info[key]


@given(ticket_dicts())
def test_ticket(info):
    try:
        t = tickets.Ticket(info, clock=clock.FakeClock())
    except errors.InvalidTicket:
        return
    status = t.info()
    # The status document is JSON and tells what was sent.
    status = json.loads(json.dumps(status))
    for key in ("uuid", "size", "ops", "timeout", "url"):
        assert status[key] == info[key]
    assert status["expires"] == int(1000.0 + info["timeout"])
    assert status["active"] is False
    assert status["canceled"] is False
    # The transfer id is what the caller sent, or a digest, never the
    # ticket id (a credential) itself.
    if info.get("transfer_id"):
        assert status["transfer_id"] == info["transfer_id"]
    else:
        assert t.uuid not in status["transfer_id"]


@given(ticket_dicts(), st.sampled_from(["size", "timeout",
                                        "inactivity_timeout"]),
       st.integers(2**63, 10**400))
def test_huge_ints(info, key, value):
    info[key] = value
    try:
        t = tickets.Ticket(info, clock=clock.FakeClock())
    except errors.InvalidTicket:
        return
    json.dumps(t.info())
