"""
Generated input for the Range and Content-Range parsers (http/ranges.py):
no exception but server.Error with the documented status for any header,
round trips from a Range to its header and back, and invariants of what
resolve() returns. Settings: test/properties.py.
"""

import pytest
from hypothesis import assume
from hypothesis import example
from hypothesis import given
from hypothesis import strategies as st

import properties  # noqa: F401 (loads the hypothesis profile)
from ovirt_imageio.http import ranges
from ovirt_imageio.http import server

# Positions up to past any real image, and now and then a number with
# more digits than int() accepts.
positions = st.one_of(
    st.integers(0, 2**64),
    st.integers(0, 10**40),
)
digits = st.one_of(
    positions.map(str),
    st.text("0123456789", max_size=60),
    st.integers(4000, 6000).map(lambda n: "9" * n),
)
sizes = st.integers(-10, 2**64)

# Text that looks like a Range header more often than random text does.
range_like = st.builds(
    lambda prefix, a, sep, b, tail: f"{prefix}{a}{sep}{b}{tail}",
    st.sampled_from(["bytes=", "bytes =", "Bytes=", "bytes= ", "items=",
                     ""]),
    digits,
    st.sampled_from(["-", "--", ",", " - ", "\u2013"]),
    digits,
    st.sampled_from(["", ",0-1", " ", "\r\n", "\x00", "-", "/10"]),
)
headers = st.one_of(st.text(), range_like,
                    st.text("bytes=0123456789-,*/ \u0661\u0662"))


@given(headers)
@example("bytes=\u0661-\u0662")
@example("bytes=" + "9" * 5000 + "-")
@example("bytes=-" + "9" * 5000)
def test_parse_range_errors(header):
    try:
        rng = ranges.parse_range(header)
    except server.Error as e:
        assert e.status == 416
        # The message quotes the header with repr(): one printable line.
        assert "\n" not in e.message and "\r" not in e.message
        return
    assert isinstance(rng, ranges.Range)
    for value in (rng.first, rng.last):
        assert value is None or 0 <= value <= ranges.HUGE
    assert not (rng.first is None and rng.last is None)
    if rng.first is not None and rng.last is not None:
        assert rng.first <= rng.last


@st.composite
def parsed_ranges(draw):
    kind = draw(st.sampled_from(["closed", "open", "suffix"]))
    a = draw(positions)
    if kind == "suffix":
        return ranges.Range(None, a)
    if kind == "open":
        return ranges.Range(a, None)
    b = draw(positions)
    return ranges.Range(min(a, b), max(a, b))


@given(parsed_ranges())
def test_range_round_trip(rng):
    assume(all(v is None or v < ranges.HUGE for v in (rng.first, rng.last)))
    assert ranges.parse_range(str(rng)) == rng


@given(parsed_ranges(), st.integers(0, 5))
def test_range_leading_zeros(rng, zeros):
    def pad(v):
        return "" if v is None else "0" * zeros + str(v)
    assume(all(v is None or v < ranges.HUGE for v in (rng.first, rng.last)))
    header = f"bytes={pad(rng.first)}-{pad(rng.last)}"
    assert ranges.parse_range(header) == rng


@given(st.text("0123456789", min_size=1, max_size=80),
       st.text("0123456789", min_size=1, max_size=80))
def test_range_order_is_exact_for_long_numbers(a, b):
    # Clamping to HUGE must not turn first > last into first <= last.
    header = f"bytes={a}-{b}"
    if int(a) > int(b):
        with pytest.raises(server.Error) as e:
            ranges.parse_range(header)
        assert e.value.status == 416
    else:
        rng = ranges.parse_range(header)
        assert rng.first == min(int(a), ranges.HUGE)
        assert rng.last == min(int(b), ranges.HUGE)


@given(st.one_of(st.none(), parsed_ranges()), sizes, sizes)
def test_resolve_invariants(rng, ticket_size, image_size):
    try:
        offset, length, content_range = ranges.resolve(
            rng, ticket_size, image_size)
    except server.Error as e:
        assert e.status == 416
        total = e.headers["content-range"]
        assert total.startswith("bytes */")
        assert int(total[len("bytes */"):]) >= 0
        return
    avail = max(min(ticket_size, image_size), 0)
    assert 0 <= offset
    assert 0 <= length
    assert offset + length <= avail
    if rng is None:
        assert (offset, length, content_range) == (0, avail, None)
        return
    assert length >= 1
    # The total is the ticket's size, as upstream, but for a range cut at
    # the end, whose total says where the end is (API.md 1.2).
    cut = (rng.first is not None and rng.last is not None
           and rng.last >= avail)
    total = avail if cut else max(ticket_size, 0)
    assert content_range == (
        f"bytes {offset}-{offset + length - 1}/{total}")
    if rng.first is None:
        assert length == min(rng.last, avail)
        assert offset + length == avail
    else:
        assert offset == rng.first
        if rng.last is not None:
            assert length <= rng.last - rng.first + 1
        else:
            assert offset + length == avail


@given(st.one_of(st.none(), parsed_ranges()), st.integers(0, 2**40))
def test_resolve_satisfiable(rng, size):
    # Any range starting inside the image is served.
    assume(rng is None or (rng.first or 0) < size)
    assume(rng is None or rng.first is not None or rng.last > 0)
    assume(rng is None or rng.last is None or rng.last < size)
    offset, length, _ = ranges.resolve(rng, size, size)
    assert offset + length <= size


@given(st.integers(0, 2**40), st.integers(1, 2**40), st.integers(0, 2**40))
def test_resolve_end_past_image_end_is_clamped(first, size, beyond):
    assume(first < size)
    rng = ranges.Range(first, size + beyond)
    offset, length, _ = ranges.resolve(rng, size, size)
    assert (offset, length) == (first, size - first)


content_range_like = st.builds(
    lambda prefix, a, b, c, tail: f"{prefix}{a}-{b}/{c}{tail}",
    st.sampled_from(["bytes ", "bytes=", "Bytes ", "bytes  ", ""]),
    digits,
    st.one_of(digits, st.just("*")),
    st.one_of(digits, st.just("*")),
    st.sampled_from(["", " ", "\r", "/1", "\u0661"]),
)


@given(st.one_of(st.none(), st.text(), content_range_like))
@example("bytes \u0661-\u0662/\u0663")
@example("bytes " + "9" * 5000 + "-*/*")
def test_parse_content_range_errors(header):
    try:
        offset = ranges.parse_content_range(header)
    except server.Error as e:
        assert e.status == 400
        assert "\n" not in e.message and "\r" not in e.message
        return
    assert isinstance(offset, int)
    assert 0 <= offset <= ranges.HUGE
    if header is None:
        assert offset == 0


@given(positions, st.integers(0, 2**40), st.integers(1, 2**40),
       st.booleans(), st.booleans())
def test_content_range_round_trip(first, length, extra, star_last,
                                  star_complete):
    assume(first < ranges.HUGE)
    last = first + length
    complete = last + extra
    header = (f"bytes {first}-{'*' if star_last else last}/"
              f"{'*' if star_complete else complete}")
    assert ranges.parse_content_range(header) == first


@given(positions, positions, positions)
def test_content_range_order(first, last, complete):
    header = f"bytes {first}-{last}/{complete}"
    if first > last or complete <= last:
        with pytest.raises(server.Error) as e:
            ranges.parse_content_range(header)
        assert e.value.status == 400
    else:
        assert ranges.parse_content_range(header) == min(first, ranges.HUGE)
