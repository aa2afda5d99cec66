"""Where a request's body ends: a header line the parser cannot read
must not make the body the next request (RFC 9112 sections 5.1, 6.3)."""

import pytest

import testutil

# Bytes of a second request inside the first one's body.
INNER = b"OPTIONS /images/* HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("header", [
    b"Content-Length : %d",
    b"X-No-Colon\r\nContent-Length: %d",
    b" folded: x\r\nContent-Length: %d",
    b": no-name\r\nContent-Length: %d",
    b"X-A: 1\r\rContent-Length: %d",
    b"Range: by\r\n folded\r\n\r\x8d\n x\nContent-Length: %d",
], ids=["space-before-colon", "no-colon", "first-line-folded", "no-name",
        "bare-cr", "bare-cr-after-fold"])
def test_unreadable_header_line(daemon, header):
    body = INNER
    request = (b"PATCH /images/x HTTP/1.1\r\n" + header % len(body) +
               b"\r\n\r\n" + body)
    reply = testutil.raw_request(daemon.cfg.local.socket, request)
    # One answer, 400, and the connection closed: the body was never
    # served as a request.
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert b"connection: close" in reply


@pytest.mark.parametrize("lengths", [
    (b"0", b"%d"),
    (b"%d", b"0"),
    (b"%d", b"%d0"),
], ids=["zero-first", "zero-last", "longer-last"])
def test_conflicting_content_lengths(daemon, lengths):
    # RFC 9112 6.3: Content-Length values that differ are invalid framing;
    # taking either one serves a body or the next request wrongly.
    body = INNER
    first, second = (v % len(body) if b"%" in v else v for v in lengths)
    request = (b"PATCH /images/x HTTP/1.1\r\nContent-Length: " + first +
               b"\r\nContent-Length: " + second + b"\r\n\r\n" + body)
    reply = testutil.raw_request(daemon.cfg.local.socket, request)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert b"connection: close" in reply


def test_repeated_equal_content_length(daemon):
    # The same value twice is one length (RFC 9112 6.3 allows it).
    request = (b"PATCH /images/x HTTP/1.1\r\nContent-Length: 2\r\n"
               b"Content-Length: 2\r\n\r\n{}")
    reply = testutil.raw_request(daemon.cfg.local.socket, request)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert b"Missing required value for op" in reply
