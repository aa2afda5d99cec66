"""Range and Content-Range headers (API.md 1.2, 1.3): tables."""

import time

import pytest

from ovirt_imageio.http import ranges
from ovirt_imageio.http import server

Range = ranges.Range

# parse_range


@pytest.mark.parametrize("header,expected", [
    (None, None),
    ("bytes=0-0", Range(0, 0)),
    ("bytes=0-99", Range(0, 99)),
    ("bytes=7-7", Range(7, 7)),
    ("bytes=100-", Range(100, None)),
    ("bytes=0-", Range(0, None)),
    ("bytes=-1", Range(None, 1)),
    ("bytes=-0", Range(None, 0)),
    ("bytes=-512", Range(None, 512)),
    ("bytes=007-010", Range(7, 10)),
    ("bytes=" + "0" * 5000 + "5-6", Range(5, 6)),
    ("bytes=1-" + "9" * 5000, Range(1, ranges.HUGE)),
    ("bytes=" + "9" * 5000 + "-", Range(ranges.HUGE, None)),
    ("bytes=-" + "9" * 5000, Range(None, ranges.HUGE)),
], ids=[
    "none", "first-byte", "hundred", "one-byte", "from", "from-zero",
    "suffix-one", "suffix-zero", "suffix", "leading-zeros",
    "many-leading-zeros", "huge-last", "huge-first", "huge-suffix",
])
def test_parse_range(header, expected):
    assert ranges.parse_range(header) == expected


INVALID = "invalid range or multiple ranges"


@pytest.mark.parametrize("header,reason", [
    ("bytes=0-1,5-6", INVALID),
    ("bytes=0-1, 5-6", INVALID),
    ("items=0-1", INVALID),
    ("Bytes=0-1", INVALID),
    ("bytes = 0-1", INVALID),
    ("bytes= 0-1", INVALID),
    ("bytes=0-1 ", INVALID),
    ("bytes=0-1\n", INVALID),
    ("bytes=\n0-1", INVALID),
    ("bytes=0-x", INVALID),
    ("bytes=--1", INVALID),
    ("bytes=0x10-0x20", INVALID),
    ("bytes=+1-2", INVALID),
    ("bytes=1-2-3", INVALID),
    ("bytes=\u0661-\u0662", INVALID),
    ("bytes=\uff11-\uff12", INVALID),
    ("", INVALID),
    ("garbage", INVALID),
    ("bytes=10-5", "first > last"),
    ("bytes=10-9", "first > last"),
    ("bytes=" + "9" * 5000 + "-" + "9" * 4999, "first > last"),
    ("bytes=" + "2" + "0" * 40 + "-" + "1" + "9" * 40, "first > last"),
    ("bytes=-", "no first or last"),
], ids=[
    "multiple", "multiple-space", "other-unit", "unit-case", "spaces",
    "space-after", "trailing-space", "trailing-newline", "newline",
    "not-a-number", "negative", "hex", "plus", "three-parts",
    "arabic-indic-digits", "fullwidth-digits", "empty", "garbage",
    "first-greater", "first-greater-by-one", "huge-first-greater",
    "long-first-greater", "no-first-or-last",
])
def test_parse_range_error(header, reason):
    with pytest.raises(server.Error) as e:
        ranges.parse_range(header)
    assert e.value.status == 416
    assert e.value.message == f"Cannot satisfy range {header!r}, {reason}"
    assert e.value.headers == {}


def test_parse_range_message_upstream():
    # The exact text upstream sends.
    with pytest.raises(server.Error) as e:
        ranges.parse_range("bytes=0-1,5-6")
    assert e.value.message == (
        "Cannot satisfy range 'bytes=0-1,5-6', invalid range or multiple "
        "ranges")


def test_parse_range_hostile_is_fast():
    header = "bytes=" + "1" * 100_000 + "-" + "2" * 100_000
    start = time.monotonic()
    assert ranges.parse_range(header) == Range(ranges.HUGE, ranges.HUGE)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("rng,text", [
    (Range(0, 99), "bytes=0-99"),
    (Range(5, None), "bytes=5-"),
    (Range(None, 5), "bytes=-5"),
], ids=["first-last", "first", "suffix"])
def test_range_str(rng, text):
    assert str(rng) == text


# resolve


@pytest.mark.parametrize("header,ticket_size,image_size,expected", [
    # No Range: 200 with what is available.
    (None, 1000, 1000, (0, 1000, None)),
    (None, 1000, 600, (0, 600, None)),
    (None, 600, 1000, (0, 600, None)),
    (None, 0, 1000, (0, 0, None)),
    (None, 1000, 0, (0, 0, None)),
    # bytes=a-b
    ("bytes=0-0", 1000, 1000, (0, 1, "bytes 0-0/1000")),
    ("bytes=0-999", 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    ("bytes=100-199", 1000, 1000, (100, 100, "bytes 100-199/1000")),
    ("bytes=999-999", 1000, 1000, (999, 1, "bytes 999-999/1000")),
    ("bytes=0-599", 1000, 600, (0, 600, "bytes 0-599/1000")),
    ("bytes=0-599", 600, 1000, (0, 600, "bytes 0-599/600")),
    # bytes=a-
    ("bytes=0-", 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    ("bytes=100-", 1000, 1000, (100, 900, "bytes 100-999/1000")),
    ("bytes=999-", 1000, 1000, (999, 1, "bytes 999-999/1000")),
    ("bytes=100-", 1000, 600, (100, 500, "bytes 100-599/1000")),
    ("bytes=100-", 600, 1000, (100, 500, "bytes 100-599/600")),
    # bytes=-n
    ("bytes=-1", 1000, 1000, (999, 1, "bytes 999-999/1000")),
    ("bytes=-100", 1000, 1000, (900, 100, "bytes 900-999/1000")),
    ("bytes=-1000", 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    ("bytes=-5000", 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    ("bytes=-100", 1000, 600, (500, 100, "bytes 500-599/1000")),
    ("bytes=-100", 600, 1000, (500, 100, "bytes 500-599/600")),
    ("bytes=-" + "9" * 5000, 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    # bytes=a-b past the end: served to the end (RFC 9110 section
    # 14.1.2), the end being the smaller of the sizes; upstream: 416.
    # nbdkit's curl plugin asks for one byte past the end.
    ("bytes=0-1000", 1000, 1000, (0, 1000, "bytes 0-999/1000")),
    ("bytes=999-1000", 1000, 1000, (999, 1, "bytes 999-999/1000")),
    ("bytes=1-" + "9" * 5000, 1000, 1000, (1, 999, "bytes 1-999/1000")),
    ("bytes=0-600", 1000, 600, (0, 600, "bytes 0-599/600")),
    ("bytes=0-1000", 1000, 600, (0, 600, "bytes 0-599/600")),
    ("bytes=500-5000", 600, 1000, (500, 100, "bytes 500-599/600")),
], ids=[
    "none", "none-image-smaller", "none-ticket-smaller", "none-ticket-empty",
    "none-image-empty",
    "first-byte", "all", "middle", "last-byte", "image-smaller",
    "ticket-smaller",
    "from-zero", "from", "from-last-byte", "from-image-smaller",
    "from-ticket-smaller",
    "suffix-one", "suffix", "suffix-all", "suffix-more-than-all",
    "suffix-image-smaller", "suffix-ticket-smaller", "suffix-huge",
    "past-end-by-one", "last-byte-past-end", "past-end-huge",
    "past-image", "past-ticket-image-smaller", "past-ticket-smaller",
])
def test_resolve(header, ticket_size, image_size, expected):
    rng = ranges.parse_range(header)
    assert ranges.resolve(rng, ticket_size, image_size) == expected


OUT_OF_RANGE = "Requested range out of allowed range"


@pytest.mark.parametrize("header,ticket_size,image_size,message,total", [
    # bytes=a-b: only a first byte past the end is 416.
    ("bytes=1000-1000", 1000, 1000, OUT_OF_RANGE, 1000),
    ("bytes=1000-5000", 1000, 1000, OUT_OF_RANGE, 1000),
    ("bytes=600-600", 1000, 600,
     "Requested more bytes than available: 601 > 600", 600),
    ("bytes=700-799", 1000, 600,
     "Requested more bytes than available: 701 > 600", 600),
    ("bytes=0-0", 0, 1000, OUT_OF_RANGE, 0),
    ("bytes=0-0", 1000, 0,
     "Requested more bytes than available: 1 > 0", 0),
    ("bytes=" + "9" * 5000 + "-" + "9" * 5001, 1000, 1000, OUT_OF_RANGE,
     1000),
    # bytes=a-
    ("bytes=1000-", 1000, 1000, OUT_OF_RANGE, 1000),
    ("bytes=5000-", 1000, 600, OUT_OF_RANGE, 1000),
    ("bytes=600-", 1000, 600,
     "Requested more bytes than available: 601 > 600", 600),
    ("bytes=0-", 0, 0, OUT_OF_RANGE, 0),
    ("bytes=0-", 1000, 0,
     "Requested more bytes than available: 1 > 0", 0),
    ("bytes=" + "9" * 5000 + "-", 1000, 1000, OUT_OF_RANGE, 1000),
    # bytes=-n
    ("bytes=-0", 1000, 1000,
     "Cannot satisfy range 'bytes=-0', empty suffix range", 1000),
    ("bytes=-0", 1000, 600,
     "Cannot satisfy range 'bytes=-0', empty suffix range", 600),
    ("bytes=-1", 1000, 0,
     "Cannot satisfy range 'bytes=-1', no bytes available", 0),
    ("bytes=-1", 0, 1000,
     "Cannot satisfy range 'bytes=-1', no bytes available", 0),
], ids=[
    "first-past-ticket", "past-ticket", "first-past-image",
    "inside-ticket-past-image", "ticket-empty", "image-empty", "huge",
    "from-past-ticket", "from-past-both", "from-past-image",
    "from-both-empty", "from-image-empty", "from-huge",
    "suffix-zero", "suffix-zero-image-smaller", "suffix-image-empty",
    "suffix-ticket-empty",
])
def test_resolve_error(header, ticket_size, image_size, message, total):
    rng = ranges.parse_range(header)
    with pytest.raises(server.Error) as e:
        ranges.resolve(rng, ticket_size, image_size)
    assert e.value.status == 416
    assert e.value.message == message
    assert e.value.headers == {"content-range": f"bytes */{total}"}


def test_resolve_negative_ticket_size():
    # Upstream accepts a negative ticket size; nothing can be read, and
    # the header stays well formed.
    assert ranges.resolve(None, -1, 1000) == (0, 0, None)
    with pytest.raises(server.Error) as e:
        ranges.resolve(ranges.Range(0, 0), -1, 1000)
    assert e.value.headers == {"content-range": "bytes */0"}


# parse_content_range


@pytest.mark.parametrize("header,offset", [
    (None, 0),
    ("bytes 7-13/20", 7),
    ("bytes 0-6/*", 0),
    ("bytes 0-*/*", 0),
    ("bytes 0-*/20", 0),
    ("bytes 300-301/*", 300),
    ("bytes 0-0/1", 0),
    ("bytes 5-5/*", 5),
    ("bytes 19-19/20", 19),
    ("bytes 007-013/020", 7),
    ("bytes 1073741824-1207959551/*", 1073741824),
    ("bytes 0-" + "9" * 5000 + "/*", 0),
    ("bytes " + "9" * 5000 + "-*/*", ranges.HUGE),
    ("bytes " + "0" * 5000 + "12-13/*", 12),
    ("bytes 0-" + "9" * 5000 + "/1" + "0" * 5000, 0),
], ids=[
    "none", "complete", "unknown-complete", "unknown-last-complete",
    "unknown-last", "upstream-example", "one-byte", "one-byte-unknown",
    "last-byte", "leading-zeros", "big", "huge-last", "huge-first",
    "many-leading-zeros", "huge-complete",
])
def test_parse_content_range(header, offset):
    assert ranges.parse_content_range(header) == offset


@pytest.mark.parametrize("header,reason", [
    ("bytes */20", None),
    ("bytes */*", None),
    ("bytes=0-6/20", None),
    ("bytes 0-6", None),
    ("bytes 0-6/", None),
    ("bytes 0-/20", None),
    ("bytes -6/20", None),
    ("bytes 0-6/20 ", None),
    ("bytes 0-6/20\n", None),
    ("bytes  0-6/20", None),
    ("Bytes 0-6/20", None),
    ("items 0-6/20", None),
    ("bytes 0-6/20,7-8/20", None),
    ("bytes -1-6/20", None),
    ("bytes \u0660-\u0666/20", None),
    ("bytes 0-6/\u0662\u0660", None),
    ("", None),
    ("garbage", None),
    ("bytes 7-6/20", "first > last"),
    ("bytes 7-6/*", "first > last"),
    ("bytes 2" + "0" * 5000 + "-1" + "9" * 5000 + "/*", "first > last"),
    ("bytes 0-20/20", "last >= complete"),
    ("bytes 0-25/20", "last >= complete"),
    ("bytes 0-0/0", "last >= complete"),
    ("bytes 0-" + "9" * 5000 + "/20", "last >= complete"),
    ("bytes 0-" + "9" * 5000 + "/" + "9" * 5000, "last >= complete"),
], ids=[
    "unsatisfied-form", "unsatisfied-unknown", "equals", "no-complete",
    "empty-complete", "no-last", "no-first", "trailing-space",
    "trailing-newline", "two-spaces", "unit-case", "other-unit",
    "multiple", "negative", "arabic-indic-digits", "arabic-indic-complete",
    "empty", "garbage",
    "first-greater", "first-greater-unknown-complete", "huge-first-greater",
    "last-is-complete", "last-past-complete", "empty-complete-size",
    "huge-last", "huge-last-is-complete",
])
def test_parse_content_range_error(header, reason):
    with pytest.raises(server.Error) as e:
        ranges.parse_content_range(header)
    assert e.value.status == 400
    expected = f"Invalid Content-Range {header!r}"
    if reason:
        expected += f", {reason}"
    assert e.value.message == expected


def test_parse_content_range_message_upstream():
    with pytest.raises(server.Error) as e:
        ranges.parse_content_range("bytes 0-20/20")
    assert e.value.message == (
        "Invalid Content-Range 'bytes 0-20/20', last >= complete")


def test_parse_content_range_hostile_is_fast():
    header = ("bytes " + "1" * 100_000 + "-" + "2" * 100_000 + "/"
              + "3" * 100_000)
    start = time.monotonic()
    assert ranges.parse_content_range(header) == ranges.HUGE
    assert time.monotonic() - start < 0.5
