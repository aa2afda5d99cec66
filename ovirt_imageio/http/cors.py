"""
CORS for browsers: webadmin's uploads and downloads through the proxy,
and the page (static.py) of one daemon talking to another.

Upstream adds these headers to every response of GET/PUT/OPTIONS on
/images and GET /info/, errors included, when the request carries CORS
headers; browsers need them on the error responses too, to read them.
Each header answers the request header it matches, as upstream:

    Origin                          -> allow-origin: *
    Access-Control-Request-Headers  -> allow-headers: *
    Access-Control-Request-Method   -> allow-methods: the handler's
    any of them                     -> max-age: 86400

The page does more than webadmin, so a page served by another origin
may too (API.md 1.8 lists upstream's part): PATCH /images (zero, flush;
a JSON body, so a preflight), GET /extents, /checksum and
/checksum/algorithms, and preflights of /info/ and the checksum routes
(any request header but the few CORS allows unasked makes one). A
preflight asking for a method of `extra` gets it added to the methods:
upstream's answer is unchanged for what upstream's clients ask. With
Origin, the response exposes the headers the page reads, beyond the few
CORS exposes by default. The ticket id in the URL is the only
credential; no cookies, so "*" is safe.

Private Network Access (Chromium): a preflight from a page whose origin
is less private than this host asks Access-Control-Request-Private-
Network; answering yes is what the daemon exists for.
"""

from . import server

EXPOSE = ("content-range, content-length, content-disposition, etag, "
          "accept-ranges, retry-after")


def allow(req, resp, methods, extra=()):
    """Add CORS response headers answering the request's CORS headers."""
    h = req.headers
    found = False
    if "origin" in h:
        resp.headers["access-control-allow-origin"] = "*"
        resp.headers["access-control-expose-headers"] = EXPOSE
        found = True
    if "access-control-request-headers" in h:
        resp.headers["access-control-allow-headers"] = "*"
        found = True
    requested = h.get("access-control-request-method")
    if requested is not None:
        requested = requested.strip().upper()
        if requested in extra:
            methods = f"{methods},{requested}"
        resp.headers["access-control-allow-methods"] = methods
        found = True
    if h.get("access-control-request-private-network", "").lower() == "true":
        resp.headers["access-control-allow-private-network"] = "true"
        found = True
    if found:
        resp.headers["access-control-max-age"] = "86400"


# The request headers of a signed ticket and of a session, with [proxy]
# signed_tickets (http/sessions.py). The wildcard never covers
# Authorization (Fetch standard), so both are named.
SIGNED_HEADERS = "authorization, session-id"


def allow_signed(req, resp):
    """After allow(): let a browser send a signed ticket or a session,
    and read the Session-Id answered by POST /sessions/."""
    if "access-control-allow-headers" in resp.headers:
        resp.headers["access-control-allow-headers"] = "*, " + SIGNED_HEADERS
    if "access-control-allow-origin" in resp.headers:
        resp.headers["access-control-expose-headers"] = "session-id"


def is_preflight(req):
    return ("origin" in req.headers
            and "access-control-request-method" in req.headers)


def preflight(req, resp, methods):
    """
    OPTIONS of a route that has no OPTIONS of its own: answer a CORS
    preflight, anything else as the router does (405).
    """
    if not is_preflight(req):
        raise server.Error(
            405, f"Method {req.method!r} not defined for {req.path!r}")
    allow(req, resp, methods)
    resp.headers["allow"] = methods
    resp.send_body(b"")
