"""Hostile and malformed requests at the HTTP layer: each gets a clear
error (or the connection is dropped), and the daemon keeps serving."""

import socket

import pytest

import testutil


def still_serving(daemon):
    reply = testutil.raw_request(daemon.cfg.local.socket,
                                 b"OPTIONS /images/* HTTP/1.1\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 OK")


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /images/x HTTP/1.1\r\n" + b"x-h: v\r\n" * 200 + b"\r\n", 431),
    (b"GET /images/x HTTP/1.1\r\nx-h: " + b"v" * 70000 + b"\r\n\r\n", 431),
    (b"GET /images/x\x00y HTTP/1.1\r\n\r\n", 403),
    (b"GET /images/%00%ff HTTP/1.1\r\n\r\n", 403),
    (b"GET /images/x HTTP/9.9\r\n\r\n", 505),
    (b"GET\r\n\r\n", 400),
    (b"\x16\x03\x01\x00\x05hello\r\n\r\n", 400),
    (b"PUT /images/x HTTP/1.1\r\ncontent-length: " + b"9" * 5000 +
     b"\r\n\r\n", 400),
    (b"PUT /images/x HTTP/1.1\r\ncontent-length: 99999999999999999999\r\n"
     b"\r\nabc", 403),
    (b"PATCH /images/x HTTP/1.1\r\ncontent-length: -5\r\n\r\n", 400),
    (b"GET /images/x HTTP/1.1\r\nrange: bytes=\xd9\xa1-\xd9\xa2\r\n\r\n",
     416),
    (b"OPTIONS /tickets/x HTTP/1.1\r\n\r\n", 404),
], ids=["many-headers", "huge-header", "nul-in-path", "odd-escapes",
        "bad-version", "no-version", "tls-on-plain", "huge-length",
        "length-beyond-body", "negative-length", "unicode-range",
        "control-route-on-data"])
def test_hostile(daemon, request_bytes, status):
    reply = testutil.raw_request(daemon.cfg.local.socket, request_bytes)
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    # A one-line plain-text reason, never a traceback.
    assert b"Traceback" not in reply
    still_serving(daemon)


def test_client_vanishes_mid_request(daemon):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(daemon.cfg.local.socket)
        s.sendall(b"PUT /images/x HTTP/1.1\r\ncontent-length: 100\r\n")
    still_serving(daemon)


def test_many_idle_connections(daemon):
    # Idle clients hold a thread each but block nobody.
    idle = []
    try:
        for _ in range(50):
            s = socket.socket(socket.AF_UNIX)
            s.connect(daemon.cfg.local.socket)
            idle.append(s)
        still_serving(daemon)
    finally:
        for s in idle:
            s.close()
