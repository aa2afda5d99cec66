"""
Generated input for the validation helpers of http/params.py
(read_json, integer, boolean, choice, require_id): no exception but
server.Error(400) for any message, and accepted values satisfy what the
handlers rely on. Settings: test/properties.py.
"""

import json

from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st

import properties  # noqa: F401 (loads the hypothesis profile)
from ovirt_imageio.http import params
from ovirt_imageio.http import server

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
    st.floats(), st.text(max_size=20))
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=10)

patch_messages = st.fixed_dictionaries({}, optional={
    "op": st.one_of(st.sampled_from(["zero", "flush", "ZERO", ""]),
                    json_values),
    "size": st.one_of(st.integers(-10, 2**64), json_values),
    "offset": st.one_of(st.integers(-10, 2**64), json_values),
    "flush": st.one_of(st.booleans(), json_values),
})


class Message:
    """The request side read_json() uses: a whole small body."""

    def __init__(self, data):
        self.data = data

    def read_message(self):
        return self.data


def bodies():
    encoded = st.one_of(json_values, patch_messages).map(
        lambda v: json.dumps(v).encode())
    return st.one_of(
        st.binary(max_size=100),
        encoded,
        # Cut short, or with a stray byte.
        st.tuples(encoded, st.integers(0, 50)).map(lambda t: t[0][:t[1]]),
        st.tuples(encoded, st.binary(min_size=1, max_size=3)).map(
            lambda t: t[0] + t[1]),
        st.integers(1, 100000).map(lambda n: b"[" * n + b"]" * n),
        st.just(b'{"op": "zero", "size": 1e999}'),
        st.just(b'{"op": "zero", "size": NaN}'),
    )


@given(bodies())
@example(b"\xff\xfe{}")
@example(b"[" * 200000)
def test_read_json(data):
    try:
        msg = params.read_json(Message(data))
    except server.Error as e:
        assert e.status == 400
        assert e.message.startswith("Invalid JSON message")
        return
    assert isinstance(msg, dict)


@given(patch_messages, st.sampled_from(["size", "offset"]),
       st.one_of(st.none(), st.integers(0, 2**64)))
def test_integer(msg, name, default):
    try:
        value = params.integer(msg, name, default)
    except server.Error as e:
        assert e.status == 400
        return
    assert type(value) is int
    assert value >= 0
    assert value == msg.get(name, default)


@given(patch_messages, st.booleans())
def test_boolean(msg, default):
    try:
        value = params.boolean(msg, "flush", default)
    except server.Error as e:
        assert e.status == 400
        return
    assert type(value) is bool
    assert value == msg.get("flush", default)


@given(st.dictionaries(st.sampled_from(["flush", "context", "x"]),
                       st.text(max_size=5)),
       st.sampled_from([["n", "y"], ["dirty", "zero"]]))
def test_choice(query, values):
    name = "flush" if values == ["n", "y"] else "context"
    try:
        value = params.choice(query, name, values, values[-1])
    except server.Error as e:
        assert e.status == 400
        assert name in query and query[name] not in values
        return
    assert value in values


@given(st.one_of(st.none(), st.text(max_size=5)))
def test_require_id(ticket_id):
    try:
        params.require_id(ticket_id)
    except server.Error as e:
        assert e.status == 400
        assert not ticket_id
        return
    assert ticket_id
