"""
The ETag of an image download, and If-Range.

A browser resumes a broken download (Range from where it stopped, with
If-Range) only if the response carried a validator, ETag or
Last-Modified; without one Chromium starts over, which for a 100 GiB disk
is the difference between a minute and an hour. So GET and HEAD of
/images/ID send an ETag that stays the same while nobody writes the
ticket's image, and changes with every write.

The tag is "NONCE-GENERATION": NONCE is random, made when the ticket
(the Ticket object) is first seen here, so it says nothing of the ticket
id (a credential) or of anything else, and a ticket replaced under the
same id (a new Ticket, maybe a new image) never shares a tag with the
old one; GENERATION counts writes. Every PUT and PATCH zero bumps it when
it starts and again when it ends, success or not: a download that read
while a write ran got a tag that no longer matches once the write ended,
and one that started before the write got a tag the write's start
changed. A resumed download with an old tag gets the whole image again
(200), never bytes of two versions. Flushes change no byte and keep the
tag.

Writes through another ticket to the same image, or by anything else than
this daemon, are not seen: in oVirt a transfer has one ticket, and the
image is not written outside the transfer while it runs. A daemon
restart forgets tickets, so tags do not survive one either.

Last-Modified is not sent: it has a resolution of one second, so two
writes in a second look the same, and If-Range with a date must then not
match (RFC 9110 13.1.5); a date in If-Range never matches here.

Through the proxy the tag is the daemon's (relay.py asks it with HEAD):
only the daemon sees every write, the proxy's own ones and those of
clients that bypass the proxy.

State: process; a tag's state lives as long as its Ticket object.
"""

import contextlib
import re
import secrets
import threading
import weakref

_lock = threading.Lock()
_states = weakref.WeakKeyDictionary()

# A strong entity tag (RFC 9110 8.8.3), of a sane length: what a peer's
# ETag must be for us to pass it on.
_STRONG = re.compile(r'"[\x21\x23-\x7e]{1,126}"')


class _State:

    def __init__(self):
        self.nonce = secrets.token_urlsafe(12)
        self.generation = 0


def _state(ticket):
    state = _states.get(ticket)
    if state is None:
        state = _states.setdefault(ticket, _State())
    return state


def of(ticket):
    """The ETag of the ticket's image as it is now."""
    with _lock:
        state = _state(ticket)
        return f'"{state.nonce}-{state.generation}"'


def _bump(ticket):
    with _lock:
        _state(ticket).generation += 1


@contextlib.contextmanager
def writing(ticket):
    """Around a write of the ticket's image: changes its ETag."""
    _bump(ticket)
    try:
        yield
    finally:
        _bump(ticket)


def checked(value):
    """A peer's ETag if it is a strong tag, else None."""
    if value is not None and _STRONG.fullmatch(value):
        return value
    return None


def if_range(req, rng, tag):
    """
    Return the Range to serve: rng, or None (the whole image) when the
    request has an If-Range that does not match tag (RFC 9110 13.1.5:
    strong comparison; a weak tag or a date never matches).
    """
    if rng is None:
        return None
    header = req.headers.get("if-range")
    if header is None:
        return rng
    if tag is not None and header.strip() == tag:
        return rng
    return None
