"""
Range (GET) and Content-Range (PUT) headers: parsing and resolving against
the ticket and the image. Pure functions over values (API.md 1.2, 1.3).

Messages are upstream ovirt-imageio 2.5.1's, header quoted with repr() as
upstream does, which also escapes anything hostile in it. Where upstream
is wrong we differ:

- Suffix ranges (`bytes=-N`, the last N bytes) are served; upstream
  answers 416 "suffix-byte-range-spec not supported yet".
- `bytes=a-` with a past the end is 416; upstream answers 400 with stray
  headers.
- `bytes=a-b` with b past the end is served up to the end (RFC 9110
  section 14.1.2: a last position past the end means the end); upstream
  answers 416, and nbdkit's curl plugin, which asks for one byte past
  the end, fails. The end is the smaller of the ticket's and the image's
  size; Content-Range gives it as the total. Only a first byte past the
  end is 416.

Numbers are hostile input: a header may carry thousands of digits, and
int() refuses more than 4300 digits (and is quadratic below that). A
number with more than MAX_DIGITS significant digits is larger than any
image, so it is clamped to HUGE: every check against a size still fails
the way the true value would. Ordering checks (first > last) compare the
digit strings themselves, so they stay exact for any length. Only ASCII
digits are numbers: `\\d` would accept Arabic-Indic digits, and int()
would convert them.
"""

from __future__ import annotations

import dataclasses
import re

from . import server

# No real size has more digits: 2**64 has 20.
MAX_DIGITS = 30
HUGE = 10**MAX_DIGITS

_RANGE = re.compile(r"bytes=([0-9]*)-([0-9]*)")
_CONTENT_RANGE = re.compile(r"bytes ([0-9]+)-([0-9]+|\*)/([0-9]+|\*)")


@dataclasses.dataclass(frozen=True)
class Range:
    """
    One byte range of a Range header, positions inclusive.

    bytes=a-b  Range(a, b)
    bytes=a-   Range(a, None)
    bytes=-n   Range(None, n): the last n bytes (suffix range)
    """

    first: int | None
    last: int | None

    def __str__(self):
        first = "" if self.first is None else self.first
        last = "" if self.last is None else self.last
        return f"bytes={first}-{last}"


def parse_range(header):
    """
    Parse a GET request's Range header; None (no header) gives None.

    Raises server.Error(416) for anything but one well formed byte range.
    """
    if header is None:
        return None
    m = _RANGE.fullmatch(header)
    if not m:
        raise server.Error(
            416, f"Cannot satisfy range {header!r}, invalid range or "
                 f"multiple ranges")
    first, last = m.groups()
    if not first and not last:
        raise server.Error(
            416, f"Cannot satisfy range {header!r}, no first or last")
    if not first:
        return Range(None, _number(last))
    if not last:
        return Range(_number(first), None)
    if _greater(first, last):
        raise server.Error(
            416, f"Cannot satisfy range {header!r}, first > last")
    return Range(_number(first), _number(last))


def resolve(rng, ticket_size, image_size):
    """
    Resolve a parsed Range (or None) against the ticket's size and the
    image's size. Returns (offset, length, content_range), content_range
    None when there was no Range (the caller answers 200, else 206).

    What can be read is avail = min(ticket_size, image_size); the total in
    Content-Range is the ticket's size, as upstream, except for a range
    cut at the end, where it is avail (the end). Raises
    server.Error(416) with a `content-range: bytes */N` header when the
    range cannot be satisfied.
    """
    ticket_size = max(ticket_size, 0)
    avail = max(min(ticket_size, image_size), 0)

    if rng is None:
        return 0, avail, None

    if rng.first is None:
        # Suffix: the last n bytes, or all of them if there are fewer.
        if rng.last == 0:
            raise _unsatisfiable(
                f"Cannot satisfy range '{rng}', empty suffix range", avail)
        if avail == 0:
            raise _unsatisfiable(
                f"Cannot satisfy range '{rng}', no bytes available", avail)
        length = min(rng.last, avail)
        offset = avail - length
        return offset, length, f"bytes {offset}-{avail - 1}/{ticket_size}"

    # Only the first byte must be there: past the ticket, else past the
    # image, is 416.
    if rng.first >= ticket_size:
        raise _unsatisfiable("Requested range out of allowed range",
                             ticket_size)
    if rng.first >= avail:
        raise _unsatisfiable(
            f"Requested more bytes than available: {rng.first + 1} > "
            f"{avail}", avail)
    if rng.last is None:
        last = avail - 1
        total = ticket_size
    elif rng.last >= avail:
        # A last byte past the end means the end (RFC 9110 section
        # 14.1.2); the total says where the end is.
        last = avail - 1
        total = avail
    else:
        last = rng.last
        total = ticket_size
    return (rng.first, last - rng.first + 1,
            f"bytes {rng.first}-{last}/{total}")


def parse_content_range(header):
    """
    Parse a PUT request's Content-Range header and return the offset, its
    first byte; None (no header) gives 0. `last` and `complete` are only
    checked, never used: the length of a write is its Content-Length
    (upstream).

    Raises server.Error(400) if the header is invalid.
    """
    if header is None:
        return 0
    m = _CONTENT_RANGE.fullmatch(header)
    if not m:
        raise server.Error(400, f"Invalid Content-Range {header!r}")
    first, last, complete = m.groups()
    if last != "*":
        if _greater(first, last):
            raise server.Error(
                400, f"Invalid Content-Range {header!r}, first > last")
        if complete != "*" and not _greater(complete, last):
            raise server.Error(
                400, f"Invalid Content-Range {header!r}, last >= complete")
    return _number(first)


def _unsatisfiable(message, total):
    return server.Error(416, message,
                        headers={"content-range": f"bytes */{total}"})


def _number(digits):
    """Value of an ASCII digit string, clamped to HUGE."""
    digits = digits.lstrip("0")
    if len(digits) > MAX_DIGITS:
        return HUGE
    return int(digits or "0")


def _greater(a, b):
    """a > b for ASCII digit strings of any length."""
    a = a.lstrip("0")
    b = b.lstrip("0")
    return (len(a), a) > (len(b), b)
