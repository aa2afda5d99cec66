"""
The upload and download page at / on the remote service ([remote] page),
and the CA certificate it links to at /ca.pem ([remote] offer_ca_file).

The page's files are the package's static/ directory, read once when the
service starts: index.html is served at / (and as /index.html), every
other file at /NAME. Only those names are routed (static_routes() builds
the regex from them), so no path the client sends ever reaches the file
system, and every other path gets the router's usual 404. A new file in
static/ is served after a restart; subdirectories and hidden files are
not served.

The page comes from the daemon itself, so it needs nothing from anywhere
else: its Content-Security-Policy allows scripts, styles and images only
from its own origin (no inline script, no eval), and connections to its
own origin and to any https: origin (the transfer URL may name another
daemon, whose CORS answers the page, cors.py). It cannot be framed
(frame-ancestors, X-Frame-Options: clickjacking the Cancel button), and
browsers must not guess types (nosniff). Cache-Control no-cache with a
strong ETag: the browser revalidates on every load (If-None-Match, 304),
so a daemon upgrade never leaves an old script running against a new
daemon.
"""

import hashlib
import os
import re

from .. import errors
from . import server

DIRECTORY = os.path.join(os.path.dirname(__file__), "static")

INDEX = "index.html"

# Content-Type by suffix; anything else is application/octet-stream.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
       "img-src 'self' data:; connect-src 'self' https:; "
       "form-action 'self'; base-uri 'none'; frame-ancestors 'none'")

# Names a route may serve: no separator, nothing hidden.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

CA_PATH = "/ca.pem"
CA_TYPE = "application/x-pem-file"
_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


class File:
    """One file served: its bytes, type and validator."""

    def __init__(self, body, content_type, disposition=None):
        self.body = body
        self.content_type = content_type
        self.disposition = disposition
        digest = hashlib.sha256(body).hexdigest()[:32]
        self.etag = f'"{digest}"'


def load(directory=DIRECTORY):
    """
    Return {name: File} of the servable files of directory: regular files
    (symlinks followed) whose names are plain; none if it is missing.
    """
    files = {}
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return files
    for name in names:
        path = os.path.join(directory, name)
        if not _NAME.fullmatch(name) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            body = f.read()
        suffix = os.path.splitext(name)[1]
        files[name] = File(body, TYPES.get(suffix, "application/octet-stream"))
    return files


def load_ca(path):
    """The CA offered at /ca.pem; errors name the setting and the file."""
    try:
        with open(path, "rb") as f:
            body = f.read()
    except OSError as e:
        raise errors.Error(f"[remote] offer_ca_file {path!r}: [Errno "
                           f"{e.errno}] {e.strerror}")
    if _PEM_CERT not in body or b"PRIVATE KEY" in body:
        # A key by mistake would be served to anyone.
        raise errors.Error(f"[remote] offer_ca_file {path!r}: not a PEM "
                           f"certificate file")
    return File(body, CA_TYPE, 'attachment; filename="ca.pem"')


def routes(cfg):
    """The routes of the page's files and of the offered CA, as
    configured: ([(regex, handler)], ca_url or None)."""
    result = []
    ca_url = None
    if cfg.remote.offer_ca_file:
        ca = load_ca(cfg.remote.offer_ca_file)
        result.append((re.escape(CA_PATH) + "$", Handler({"": ca})))
        ca_url = CA_PATH
    if cfg.remote.page:
        files = load()
        if files:
            result.append(page_route(files))
    return result, ca_url


def page_route(files):
    """The route of the page: / for index.html, /NAME for each file."""
    names = "|".join(re.escape(name) for name in files)
    served = dict(files)
    if INDEX in files:
        served[""] = files[INDEX]
    return rf"/({names})?$", Handler(served)


class Handler:
    """GET and HEAD of files read at start-up."""

    name = "static"

    def __init__(self, files):
        self.files = files

    def get(self, req, resp, name=None):
        f = self.files.get(name or "")
        if f is None:
            raise server.Error(404, f"No handler for {req.path!r}")
        resp.headers.update(headers(f))
        if _matches(req.headers.get("if-none-match"), f.etag):
            resp.status = 304
            # RFC 9110 8.6: the length a 200 would have, and no body.
            resp.start(len(f.body))
            resp.write(b"")
            return
        resp.headers["content-type"] = f.content_type
        resp.send_body(f.body)

    head = get


def headers(f):
    h = {
        "cache-control": "no-cache",
        "etag": f.etag,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
    }
    if f.disposition:
        h["content-disposition"] = f.disposition
    else:
        h["content-security-policy"] = CSP
        h["x-frame-options"] = "DENY"
    return h


def _matches(header, etag):
    """If-None-Match (weak comparison, RFC 9110 13.1.2)."""
    if header is None:
        return False
    if header.strip() == "*":
        return True
    tags = [t.strip() for t in header.split(",")]
    return any(t.removeprefix("W/") == etag for t in tags)
