"""
HTTP/1.1 servers: TCP with TLS (remote), unix sockets (local and control).

One thread per connection, blocking I/O, on the stdlib's http.server: it
parses request lines and headers, handles `Expect: 100-continue` and the
HTTP/1.0 and `Connection: close` rules. We own everything else: the status
line and lower-case headers upstream clients see, Content-Length on every
response (the engine's Java client and vdsm need it, even on 204), when to
close the connection, and the per-connection state that handlers keep.

State: the server (listening socket, router, TLS context) is per service;
a Context lives as long as its connection; Request and Response as long as
one request.

TLS: the listening socket is plain and each connection's thread does its
own handshake, with a deadline. Upstream handshakes inside accept(), so one
TCP client that never speaks TLS stalls every new connection.
"""

import http.server
import io
import itertools
import json
import logging
import os
import selectors
import socket
import socketserver
import ssl
import threading
import time
import urllib.parse

from .. import tls
from .. import version

log = logging.getLogger("http")

# Before a request authorizes a ticket, an idle connection is closed after
# this many seconds. Clients open worker connections and leave them idle
# while the first one fetches extents of a big image, so this must not be
# shorter than upstream's 60.
PREAUTH_TIMEOUT = 60

# Upstream refuses request lines longer than this with 414.
MAX_REQUEST_LINE = 4096

# Bodies read whole (JSON messages) are never larger than this; a real
# ticket or PATCH is a few hundred bytes.
MAX_MESSAGE = 64 * 1024

# Lingering close: at most this much of an unread body is drained, for at
# most this long, before the connection is closed.
LINGER_MAX = 1024**2
LINGER_TIMEOUT = 1.0

METHODS = frozenset(
    ["GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "HEAD"])

_conn_ids = itertools.count(1)


class Error(Exception):
    """An HTTP error response: status, one-line message, extra headers."""

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class Context:
    """
    State of one client connection, kept across its requests. Handlers keep
    what they open here (e.g. an NBD connection per ticket) and register a
    closer, run when the connection ends.
    """

    def __init__(self, conn_id, client, sock, plain=False):
        self.id = conn_id
        self.client = client
        self.sock = sock
        # No TLS: body bytes may move between sock and NBD by splice(2).
        self.plain = plain
        self.values = {}
        self._closers = []

    def set_timeout(self, seconds):
        self.sock.settimeout(seconds)

    def on_close(self, fn):
        self._closers.append(fn)

    def close(self):
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:
                log.exception("Error closing connection %s", self.id)


class Request:
    """One request, as handlers see it."""

    def __init__(self, handler):
        self._handler = handler
        self.method = handler.command
        self.context = handler.context
        path, _, query = handler.path.partition("?")
        self.path = urllib.parse.unquote(path)
        # Last occurrence wins, blank values kept (upstream).
        self.query = dict(
            urllib.parse.parse_qsl(query, keep_blank_values=True))
        self.headers = handler.headers
        self.framing_error = None
        self._length = None
        self._remaining = 0
        # Set by handlers for the request's log line.
        self.transfer_id = None
        self.range = None
        self.route = None
        value = self.headers.get("content-length")
        if "transfer-encoding" in self.headers:
            # Bodies are framed by Content-Length only, as upstream.
            self.framing_error = Error(
                400, "Transfer-Encoding is not supported, send "
                     "Content-Length")
        elif len(set(self.headers.get_all("content-length", ()))) > 1:
            # Either value would read a body or the next request wrongly
            # (RFC 9112 6.3).
            self.framing_error = Error(
                400, "Conflicting Content-Length headers")
        elif value is not None:
            try:
                length = int(value)
            except ValueError:
                self.framing_error = Error(
                    400, f"Invalid Content-Length: {value!r}")
            else:
                if length < 0:
                    self.framing_error = Error(
                        400, f"Negative Content-Length: {length}")
                else:
                    self._length = self._remaining = length

    @property
    def content_length(self):
        """The Content-Length header as an int, or None if absent."""
        return self._length

    @property
    def remaining(self):
        """Body bytes not read yet."""
        return self._remaining

    def readinto(self, buf):
        """Read up to len(buf) body bytes into buf; 0 at end of body."""
        n = min(len(buf), self.remaining)
        if n == 0:
            return 0
        got = self._handler.rfile.readinto(memoryview(buf)[:n])
        self._remaining -= got
        return got

    def read(self, n=-1):
        """Read up to n body bytes (all if n < 0)."""
        if n < 0 or n > self.remaining:
            n = self.remaining
        data = self._handler.rfile.read(n)
        self._remaining -= len(data)
        return data

    def take_body(self):
        """
        For a handler that moves the body from the socket itself (plain
        connections only): return the body bytes already buffered here,
        and count the whole body as read.
        """
        sock = self._handler.connection
        timeout = sock.gettimeout()
        # peek() reads the socket only if nothing is buffered; non-blocking,
        # that read returns what has arrived, or nothing.
        sock.settimeout(0)
        try:
            buffered = self._handler.rfile.peek()
        finally:
            sock.settimeout(timeout)
        n = min(len(buffered), self._remaining)
        data = self._handler.rfile.read(n) if n else b""
        self._remaining = 0
        return data

    def read_message(self, limit=MAX_MESSAGE):
        """Read a whole small body (a JSON message), refusing huge ones."""
        if self.remaining > limit:
            raise Error(413, f"Message too large: {self.remaining} > "
                             f"{limit} bytes")
        data = self.read()
        if len(data) < (self._length or 0):
            raise Error(400, f"Requested {self._length} bytes, available "
                             f"{len(data)} bytes")
        return data


class Response:
    """One response. Headers are kept lower-case, as upstream sends them."""

    def __init__(self, handler):
        self._handler = handler
        self.status = 200
        self.headers = {}
        self.started = False
        self.close_connection = False
        self._head = handler.command == "HEAD"
        self._pending = None

    def send_json(self, obj, status=200):
        self.status = status
        body = (json.dumps(obj) + "\n").encode("utf-8")
        self.headers["content-type"] = "application/json"
        self.send_body(body)

    def send_text(self, text, status):
        self.status = status
        self.headers["content-type"] = "text/plain; charset=UTF-8"
        self.send_body((text + "\n").encode("utf-8"))

    def send_body(self, body):
        self.start(len(body))
        self.write(body, end=True)

    def start(self, length):
        """Send the status line and headers for a body of length bytes."""
        assert not self.started
        self.headers["content-length"] = str(length)
        if self.close_connection:
            self.headers["connection"] = "close"
            self._handler.close_connection = True
        self.started = True
        self._pending = self._handler.head_block(self.status, self.headers)

    def write(self, data, end=False):
        """Write body bytes; the head goes out with the first write."""
        if self._pending is not None:
            if self._head:
                data = b""
            if len(data) < 65536:
                # One send for a small response: avoids a second packet.
                data = self._pending + data
            else:
                self._handler.wfile.write(self._pending)
            self._pending = None
        elif self._head:
            return
        if data:
            self._handler.wfile.write(data)

    def abort(self):
        """Close the connection without completing the response."""
        self._pending = None
        self._handler.close_connection = True

    def finish(self):
        if not self.started:
            self.start(0)
        if self._pending is not None:
            self.write(b"")


class Handler(http.server.BaseHTTPRequestHandler):
    """The connection handler; the server's router does the work."""

    protocol_version = "HTTP/1.1"
    server_version = "imageio/" + version.string
    sys_version = ""

    # Tells stdlib's error page which HTML to emit; we replace it anyway.
    error_content_type = "text/plain; charset=UTF-8"

    def setup(self):
        self.context = None
        self.request.settimeout(PREAUTH_TIMEOUT)
        # TCP_NODELAY: a response's last segment must not wait for the
        # client's delayed ACK (40 ms per small request otherwise).
        self.disable_nagle_algorithm = (
            self.server.address_family != socket.AF_UNIX)
        if self.server.tls_context is None:
            super().setup()
        elif not self._setup_tls():
            return
        self.context = Context(next(_conn_ids), self.address_string(),
                               self.request,
                               plain=self.server.tls_context is None)
        self._start = time.monotonic()
        self._requests = 0
        log.info("OPEN connection=%s client=%s service=%s",
                 self.context.id, self.context.client, self.server.name)

    def _setup_tls(self):
        """
        Handshake in this connection's thread, then read and write through
        tls.Connection (batched socket I/O). Return False if the client
        never completed the handshake.
        """
        self.connection = self.request
        conn = tls.Connection(self.request, self.server.tls_context)
        try:
            conn.handshake()
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s",
                      self.client_address, e)
            return False
        if self.disable_nagle_algorithm:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                    True)
        self.rfile = io.BufferedReader(tls.Reader(conn))
        self.wfile = tls.Writer(conn)
        return True

    def handle(self):
        if self.context is None:
            return
        try:
            super().handle()
        except (ConnectionError, TimeoutError, ssl.SSLError) as e:
            log.debug("connection=%s: %s", self.context.id, e)

    def finish(self):
        if self.context is None:
            return
        try:
            super().finish()
        except OSError:
            pass
        self.context.close()
        log.info("CLOSE connection=%s requests=%s seconds=%.3f",
                 self.context.id, self._requests,
                 time.monotonic() - self._start)

    def address_string(self):
        if self.server.address_family == socket.AF_UNIX:
            return "local"
        return self.client_address[0]

    def handle_one_request(self):
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline = ""
            self.request_version = "HTTP/1.1"
            self.command = None
            self.send_error(414)
            return
        if not self.parse_request():
            return
        if self.headers.defects or self.headers.get_payload():
            # A line the stdlib cannot read as a header (no colon, space
            # before it, a fold first), or a bare CR (a line end to its
            # header parser), silently ends the headers: those after it,
            # Content-Length among them, would be dropped and the body
            # read as the next request. RFC 9112 5.1, 2.2: reject.
            self.send_error(400, "Invalid header line")
            return
        self._requests += 1
        req = Request(self)
        resp = Response(self)
        self.server.router.dispatch(req, resp)
        if not resp.started or resp._pending is not None:
            resp.finish()
        self.wfile.flush()
        if req.remaining or req.framing_error:
            # The body was not read: we cannot find the next request.
            self.close_connection = True
            self._linger(req)

    def _linger(self, req):
        """
        Read and drop what is left of a small body before closing. Closing
        a socket with unread data makes the kernel send a reset, which can
        destroy our error response before the client reads it.
        """
        left = min(req.remaining, LINGER_MAX)
        if not left:
            return
        try:
            self.connection.settimeout(LINGER_TIMEOUT)
            while left > 0:
                data = req.read(min(left, 65536))
                if not data:
                    break
                left -= len(data)
        except OSError:
            pass

    def head_block(self, status, headers):
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"{self.protocol_version} {status} {reason}",
            f"server: {self.server_version}",
            f"date: {self.date_time_string()}",
        ]
        lines.extend(f"{k}: {v}" for k, v in headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def send_response_only(self, code, message=None):
        # Used by the stdlib for "100 Continue".
        if not hasattr(self, "_headers_buffer"):
            self._headers_buffer = []
        reason = message or self.responses.get(code, ("",))[0]
        self._headers_buffer.append(
            f"{self.protocol_version} {code} {reason}\r\n".encode("latin-1"))

    def send_error(self, code, message=None, explain=None):
        # Errors found by the stdlib parser (bad request line, too many
        # headers...): answer in our format and close.
        self.close_connection = True
        reason = message or self.responses.get(code, ("Error",))[0]
        body = (reason + "\n").encode("utf-8")
        head = self.head_block(code, {
            "content-type": "text/plain; charset=UTF-8",
            "content-length": str(len(body)),
            "connection": "close",
        })
        try:
            self.wfile.write(head + body)
        except OSError:
            return
        # The rest of what the client sent (a huge header, say) is unread;
        # drop what arrives soon, as _linger does for bodies.
        try:
            self.connection.settimeout(LINGER_TIMEOUT)
            left = LINGER_MAX
            while left > 0:
                data = self.rfile.read1(min(left, 65536))
                if not data:
                    break
                left -= len(data)
        except (OSError, ValueError):
            pass

    def log_message(self, format, *args):
        # The stdlib would log request lines, which hold ticket ids.
        pass


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True
    block_on_close = False
    # Connections waiting for accept(). Upstream's 40 refuses the 41st of
    # a burst (seen: 50 clients connecting at once to the local socket);
    # the kernel caps this at net.core.somaxconn.
    request_queue_size = socket.SOMAXCONN

    def handle_error(self, request, client_address):
        log.exception("Unhandled error in connection from %s", client_address)


class TCPServer(_Server, socketserver.TCPServer):
    """HTTP over TCP, with TLS when tls_context is set."""

    allow_reuse_address = True

    def __init__(self, name, host, port, router, tls_context=None,
                 prefer_ipv4=False):
        self.name = name
        self.router = router
        self.tls_context = tls_context
        family, address = resolve(host, port, prefer_ipv4)
        self.address_family = family
        super().__init__(address, Handler, bind_and_activate=False)
        try:
            if family == socket.AF_INET6:
                # "::" serves IPv4 clients too (dual stack), like upstream.
                self.socket.setsockopt(
                    socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    @property
    def port(self):
        return self.server_address[1]

    def address(self):
        return self.server_address


def resolve(host, port, prefer_ipv4=False):
    """Return (family, sockaddr) to bind host:port."""
    infos = socket.getaddrinfo(
        host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
        socket.AI_PASSIVE)
    if prefer_ipv4:
        infos.sort(key=lambda info: info[0] != socket.AF_INET)
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


class UnixServer(_Server, socketserver.UnixStreamServer):
    """
    HTTP over a unix socket: a filesystem path, an abstract name (starting
    with NUL), or "" for a random abstract name chosen by the kernel.
    """

    def __init__(self, name, path, router, mode=None):
        self.name = name
        self.router = router
        self.tls_context = None
        self.mode = mode
        super().__init__(path, Handler, bind_and_activate=False)
        try:
            self.server_bind()
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def server_bind(self):
        path = self.server_address
        if not path or path.startswith("\0"):
            self.socket.bind(path)
            name = self.socket.getsockname()
            if isinstance(name, bytes):
                name = name.decode("utf-8")
            self.server_address = name
        else:
            # Bind under a temporary name, set its mode, then rename: the
            # socket never exists at its path with looser permissions.
            directory = os.path.dirname(os.path.abspath(path))
            tmp = os.path.join(
                directory, f".{os.path.basename(path)}.{os.getpid()}")
            if os.path.exists(tmp):
                os.unlink(tmp)
            self.socket.bind(tmp)
            if self.mode is not None:
                os.chmod(tmp, self.mode)
            os.replace(tmp, path)

    def server_close(self):
        super().server_close()
        path = self.server_address
        if path and not path.startswith("\0"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def address(self):
        return self.server_address


def tls_context(cert_file, key_file, ca_file="", enable_tls1_1=False):
    """A server TLS context: TLS 1.2 at least (1.1 only if enabled)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if enable_tls1_1:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3's default security level refuses TLS 1.1.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    if ca_file:
        ctx.load_verify_locations(ca_file)
    return ctx


class Service:
    """
    A server accepting connections in its own thread. stop() wakes the
    thread through a pipe instead of waiting for a poll interval.
    """

    def __init__(self, server):
        self.server = server
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(
            target=self._serve, name=server.name, daemon=True)

    @property
    def name(self):
        return self.server.name

    def start(self):
        self._thread.start()

    def _serve(self):
        with selectors.DefaultSelector() as sel:
            sel.register(self.server, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj == self._wake_r for key, _ in events):
                    return
                # Accepts one connection and starts its thread.
                self.server._handle_request_noblock()

    def stop(self):
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join()
        self.server.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)
