"""
Generated input for the Content-Length parser of http/server.Request:
a body length is ASCII digits only, with optional spaces or tabs around
them (RFC 9112 5.1); anything else is a framing error (400), never a
length. Settings: test/properties.py.
"""

import email.message
import types

from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st

import properties  # noqa: F401 (loads the hypothesis profile)
from ovirt_imageio.http import server


def request(value):
    headers = email.message.Message()
    headers["content-length"] = value
    handler = types.SimpleNamespace(
        command="PUT", context=None, path="/images/x", headers=headers)
    return server.Request(handler)


lengths = st.one_of(
    st.integers(0, 2**64).map(str),
    st.text("0123456789+-_ \t\u0661e.x", min_size=1, max_size=12),
    st.text(min_size=1, max_size=12),
)


@given(lengths)
@example("+10")
@example("1_0")
@example(" 10")
@example("1 0")
@example("\u0661\u0660")
def test_content_length(value):
    req = request(value)
    digits = value.strip(" \t")
    if digits.isascii() and digits.isdigit():
        assert req.framing_error is None
        assert req.content_length == int(digits)
    else:
        assert req.framing_error is not None
        assert req.framing_error.status == 400
        assert req.content_length is None


@given(st.integers(0, 2**64))
def test_content_length_digits(length):
    req = request(str(length))
    assert req.framing_error is None
    assert req.content_length == req.remaining == length
