"""
An HTTP(S) server of image files on loopback, in a thread, for URL
sources (client/urlsource.py): ranges or none, redirects, a required
header, and a record of what was asked.

    with ImageServer(ranges=True) as srv:
        srv.files["/disk.qcow2"] = path
        srv.redirects["/old"] = "/disk.qcow2"
        srv.required = {"X-Auth-Token": "secret"}
        url = srv.url("/disk.qcow2")           # http://127.0.0.1:PORT/...
        url = srv.url("/disk.qcow2", host="localhost")   # "another host"

ranges=True answers "Range: bytes=A-B" with 206 and sends no
Accept-Ranges header (as OpenStack Glance); ranges=False answers every GET
with 200 and the whole file. A request without the required headers gets
401. hold_after holds ranged GETs from an offset until release is set
(to look at a transfer while it runs). HEAD answers as GET without the body. requests lists (method, path,
headers, status) of every request.
"""

import http.server
import os
import re
import socketserver
import ssl
import threading

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")

HOLD_TIMEOUT = 60


class ImageServer:

    def __init__(self, ranges=True, pki=None):
        self.ranges = ranges
        self.files = {}
        self.redirects = {}
        self.required = {}
        self.requests = []
        # Status to answer the next N ranged GETs with (retries).
        self.fail_next = []
        # Ranged GETs starting at hold_after or later wait for release
        # (at most HOLD_TIMEOUT); held is set when one waits.
        self.hold_after = None
        self.held = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                srv._get(self)

            def do_HEAD(self):
                srv._get(self, head=True)

            def _reply(self, status, body, headers=()):
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

        self._server = _Server(("127.0.0.1", 0), Handler)
        if pki is not None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(pki["cert_file"], pki["key_file"])
            self._server.socket = ctx.wrap_socket(self._server.socket,
                                                  server_side=True)
        self.scheme = "https" if pki is not None else "http"
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="image-server", daemon=True)
        self._thread.start()

    def url(self, path, host="127.0.0.1"):
        return f"{self.scheme}://{host}:{self.port}{path}"

    def ranged_gets(self):
        return [r for r in self.requests if r[3] == 206]

    def close(self):
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _get(self, h, head=False):
        path = h.path.split("?", 1)[0]
        headers = {k.lower(): v for k, v in h.headers.items()}
        status = self._status(path, headers)
        with self._lock:
            self.requests.append((h.command, h.path, headers, status))
        if status == 401:
            return h._reply(401, b"Authentication required\n",
                            [("WWW-Authenticate", "Token")])
        if status in (301, 302, 307, 308):
            return h._reply(status, b"", [("Location",
                                           self.redirects[path])])
        if status == 404:
            return h._reply(404, b"Not found\n")
        if status >= 500:
            return h._reply(status, b"Try again\n")
        filename = self.files[path]
        size = os.path.getsize(filename)
        start, end = 0, size - 1
        if status == 206:
            m = _RANGE.match(headers["range"])
            start = int(m.group(1))
            if self.hold_after is not None and start >= self.hold_after:
                self.held.set()
                self.release.wait(HOLD_TIMEOUT)
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size:
                return h._reply(416, b"", [("Content-Range",
                                            f"bytes */{size}")])
        h.send_response(status)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if head:
            return
        with open(filename, "rb") as f:
            f.seek(start)
            _copy(f, h.wfile, end - start + 1)

    def _status(self, path, headers):
        for name, value in self.required.items():
            if headers.get(name.lower()) != value:
                return 401
        if path in self.redirects:
            return 302
        if path not in self.files:
            return 404
        if self.ranges and _RANGE.match(headers.get("range", "")):
            with self._lock:
                if self.fail_next:
                    return self.fail_next.pop(0)
            return 206
        return 200


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _copy(src, dst, length):
    while length:
        chunk = src.read(min(length, 1024**2))
        if not chunk:
            break
        dst.write(chunk)
        length -= len(chunk)


