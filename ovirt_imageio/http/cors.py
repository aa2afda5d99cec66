"""
CORS for browsers (webadmin uploads and downloads through the proxy).

Upstream adds these headers to every response of GET/PUT/OPTIONS on
/images and GET /info/, errors included, when the request carries CORS
headers; browsers need them on the error responses too, to read them.
"""


def allow(req, resp, methods):
    """Add CORS response headers answering the request's CORS headers."""
    h = req.headers
    found = False
    if "origin" in h:
        resp.headers["access-control-allow-origin"] = "*"
        found = True
    if "access-control-request-headers" in h:
        resp.headers["access-control-allow-headers"] = "*"
        found = True
    if "access-control-request-method" in h:
        resp.headers["access-control-allow-methods"] = methods
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
