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

Deadlines and bounds (Limits, from [daemon]): a socket timeout bounds each
recv, not a phase, so a client trickling a byte now and then would hold a
connection (a thread and an fd) forever. Every read of a connection goes
through Handler._recv_into, which shortens the socket timeout to what is
left of the current deadline: the TLS handshake has handshake_timeout
from accept, and each request header_timeout from its first byte to the
end of its headers. Between requests a keep-alive connection waits for
the next request's first byte as long as its idle timeout allows:
PREAUTH_TIMEOUT until it authorizes a ticket, then the ticket's
inactivity timeout (clients leave worker connections idle). Connections
that have not authorized a ticket are bounded per service: past the
bound the oldest is closed (new clients get in; a flood only evicts
itself), with a log line at most every EVICT_LOG_INTERVAL. When accept()
fails for lack of fds, the service logs once and backs off instead of
spinning on the ready listening socket.
"""

import collections
import errno
import http.server
import io
import itertools
import json
import logging
import os
import select
import selectors
import socket
import socketserver
import ssl
import struct
import threading
import time
import urllib.parse

from .. import pipes
from .. import prometheus
from .. import tls
from .. import version

log = logging.getLogger("http")

# Before a request authorizes a ticket, an idle connection is closed after
# this many seconds. Clients open worker connections and leave them idle
# while the first one fetches extents of a big image, so this must not be
# shorter than upstream's 60.
PREAUTH_TIMEOUT = 60

# Defaults of the [daemon] settings behind Limits (config.py says why).
HANDSHAKE_TIMEOUT = 10.0
HEADER_TIMEOUT = 30.0
MAX_UNAUTHORIZED_CONNECTIONS = 512

# Closing the oldest unauthorized connection is logged at most this often,
# with the count since the last line: a flood must not flood the log.
EVICT_LOG_INTERVAL = 60

# accept() failing for lack of fds (or kernel memory) is retried after
# this many seconds, doubling up to ACCEPT_BACKOFF_MAX.
ACCEPT_BACKOFF = 0.05
ACCEPT_BACKOFF_MAX = 1.0
_OUT_OF_RESOURCES = frozenset(
    [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM])

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


class DeadlineExpired(TimeoutError):
    """A connection's phase (TLS handshake, request headers) took too
    long."""


class Limits:
    """Deadlines and bounds of a service's connections ([daemon])."""

    def __init__(self, handshake_timeout=HANDSHAKE_TIMEOUT,
                 header_timeout=HEADER_TIMEOUT,
                 max_unauthorized=MAX_UNAUTHORIZED_CONNECTIONS):
        self.handshake_timeout = handshake_timeout
        self.header_timeout = header_timeout
        self.max_unauthorized = max_unauthorized

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.daemon.handshake_timeout, cfg.daemon.header_timeout,
                   cfg.daemon.max_unauthorized_connections)


class Context:
    """
    State of one client connection, kept across its requests. Handlers keep
    what they open here (e.g. an NBD connection per ticket) and register a
    closer, run when the connection ends.
    """

    def __init__(self, conn_id, client, sock, plain=False, handler=None):
        self.id = conn_id
        self.client = client
        self.sock = sock
        # No TLS: body bytes may move between sock and NBD by splice(2).
        self.plain = plain
        self.values = {}
        self._closers = []
        self._handler = handler

    def set_timeout(self, seconds):
        """How long the connection may wait idle (None: forever)."""
        if self._handler is not None:
            self._handler.set_idle_timeout(seconds)
        else:
            self.sock.settimeout(seconds)

    def authorized(self):
        """A request authorized a ticket: the connection leaves the bound
        on unauthorized connections."""
        if self._handler is not None:
            self._handler.server.forget(self.sock)

    def on_close(self, fn):
        self._closers.append(fn)

    def interrupt(self):
        """
        Unblock this connection's thread where it waits on its client,
        from another thread: its ticket was canceled (images.Link.cancel)
        while the client stopped reading or sending. Reads of the client
        end (EOF), so a PUT's blocked receive wakes and its 403 can still
        be sent; once a response has started (a GET's body), its writes
        fail too: that response is cut anyway. The connection closes
        after the request. Works the same with TLS: the handler owns the
        TCP socket under it.
        """
        if self._handler is not None:
            self._handler.interrupt()
        else:
            _shutdown(self.sock, socket.SHUT_RD)

    def describe(self):
        """
        Who is connected, for the listing of transfers: the connection id,
        the service, and the client's address and port (TCP), or its
        process id (a unix socket).
        """
        d = {"connection": self.id, "client": self.client}
        if self._handler is None:
            return d
        d["service"] = self._handler.server.name
        address = self._handler.client_address
        if isinstance(address, tuple) and len(address) >= 2:
            d["client"] = tcp_peer(address[0], address[1])
        else:
            try:
                creds = self.sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED,
                    struct.calcsize("3i"))
                d["client"] = f"pid={struct.unpack('3i', creds)[0]}"
            except OSError:
                pass
        return d

    def close(self):
        while self._closers:
            fn = self._closers.pop()
            try:
                fn()
            except Exception:
                log.exception("Error closing connection %s", self.id)


def tcp_peer(host, port):
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


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
        # The body was handed to the handler to move from the socket
        # itself (take_body); only body_received() says it all arrived.
        self._handed_off = False
        # Set by handlers for the request's log line.
        self.transfer_id = None
        self.range = None
        self.route = None
        values = self.headers.get_all("content-length") or []
        if "transfer-encoding" in self.headers:
            # Bodies are framed by Content-Length only, as upstream.
            self.framing_error = Error(
                400, "Transfer-Encoding is not supported, send "
                     "Content-Length")
        elif len(values) > 1:
            # Which one frames the body? A proxy in front may have picked
            # the other (request smuggling).
            self.framing_error = Error(
                400, "Multiple Content-Length headers")
        elif values:
            try:
                self._length = self._remaining = parse_length(values[0])
            except ValueError as e:
                self.framing_error = Error(400, str(e))

    @property
    def content_length(self):
        """The Content-Length header as an int, or None if absent."""
        return self._length

    @property
    def remaining(self):
        """
        Body bytes not read yet; once the body was handed to the handler
        (take_body), how many may be left until it calls body_received().
        """
        return self._remaining

    @property
    def consumed(self):
        """
        True once the whole body was read: the next bytes on the
        connection are the next request. A response to a request whose
        body was not consumed closes the connection.
        """
        return self._remaining == 0 and self.framing_error is None

    def readinto(self, buf):
        """Read up to len(buf) body bytes into buf; 0 at end of body."""
        assert not self._handed_off
        n = min(len(buf), self.remaining)
        if n == 0:
            return 0
        self._handler.send_continue()
        got = self._handler.rfile.readinto(memoryview(buf)[:n])
        self._remaining -= got
        return got

    def read(self, n=-1):
        """Read up to n body bytes (all if n < 0)."""
        assert not self._handed_off
        if n < 0 or n > self.remaining:
            n = self.remaining
        if n:
            self._handler.send_continue()
        data = self._handler.rfile.read(n)
        self._remaining -= len(data)
        return data

    def take_body(self):
        """
        For a handler that moves the body from the socket itself (plain
        connections only): return the body bytes already buffered here.
        The rest is the handler's to receive from the socket; until it
        calls body_received(), the body counts as unread, so a failure
        half-way (NBD error, the export dying, the daemon stopping) closes
        the connection instead of parsing the rest of the body as
        requests.
        """
        assert not self._handed_off
        self._handler.send_continue()
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
        self._remaining -= len(data)
        self._handed_off = True
        return data

    def body_received(self):
        """The handler received the whole body taken with take_body()."""
        assert self._handed_off
        self._remaining = 0

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


def parse_length(value):
    """
    Return the value of a Content-Length header: ASCII digits only, with
    optional whitespace around them (RFC 9112 5.1). int() alone also takes
    "+10", "1_0", "-5", non-ASCII digits and any whitespace, including a
    folded line's CR LF.
    """
    digits = value.strip(" \t")
    if not (digits.isascii() and digits.isdigit()):
        if digits.startswith("-") and digits[1:].isdigit():
            raise ValueError(f"Negative Content-Length: {digits}")
        raise ValueError(f"Invalid Content-Length: {value!r}")
    try:
        return int(digits)
    except ValueError:
        # More digits than int() converts (sys.get_int_max_str_digits).
        raise ValueError(f"Invalid Content-Length: {value[:20]!r}...")


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
        # Before the check: Handler.interrupt reads it after setting the
        # flag, so one of the two sees the other.
        self._handler.responding = True
        if self._handler.interrupted and self.status < 400 and length:
            # Interrupted (Context.interrupt) before its body started:
            # never start sending data the client may not be reading
            # (the error response that follows is small and is sent).
            # An empty success (PUT, PATCH) is sent as it is.
            raise ConnectionAbortedError(
                errno.ECONNABORTED, "Connection interrupted")
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
        self._tls = None
        # Context.interrupt was called; a response is being sent; the
        # thread is reading the client.
        self.interrupted = False
        self.responding = False
        self.reading = False
        self._deadline = None
        self._idle = PREAUTH_TIMEOUT
        self.request.settimeout(PREAUTH_TIMEOUT)
        # TCP_NODELAY: a response's last segment must not wait for the
        # client's delayed ACK (40 ms per small request otherwise).
        self.disable_nagle_algorithm = (
            self.server.address_family != socket.AF_UNIX)
        if self.server.tls_context is None:
            super().setup()
            # Every read through _recv_into, which keeps the deadlines.
            self.rfile.close()
            self.rfile = io.BufferedReader(_Reader(self._recv_into))
        else:
            self._start_deadline(self.server.limits.handshake_timeout,
                                 "TLS handshake")
            try:
                shaken = self._setup_tls()
            finally:
                self._end_deadline()
            self.server.stats.handshake(shaken)
            if not shaken:
                return
        self.context = Context(next(_conn_ids), self.address_string(),
                               self.request,
                               plain=self.server.tls_context is None,
                               handler=self)
        self._start = time.monotonic()
        self._requests = 0
        self.server.stats.opened.inc()
        log.info("OPEN connection=%s client=%s service=%s",
                 self.context.id, self.context.client, self.server.name)

    def _setup_tls(self):
        """
        Handshake in this connection's thread, then read and write through
        tls.Connection (batched socket I/O). Return False if the client
        never completed the handshake.
        """
        self.connection = self.request
        conn = tls.Connection(_DeadlineSocket(self), self.server.tls_context)
        try:
            conn.handshake()
        except DeadlineExpired as e:
            log.info("Closing connection from %s: %s", self.client_address,
                     e)
            return False
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s",
                      self.client_address, e)
            return False
        if self.disable_nagle_algorithm:
            self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY,
                                    True)
        self._tls = conn
        self.rfile = io.BufferedReader(tls.Reader(conn))
        self.wfile = tls.Writer(conn)
        return True

    # Deadlines. Every read of the connection's socket (plain rfile, or
    # the TLS connection's ciphertext) goes through _recv_into.

    def _recv_into(self, buf, nbytes=0, flags=0):
        # Before the check: Handler.interrupt reads it after setting the
        # flag, so one of the two sees the other.
        self.reading = True
        try:
            if self.interrupted:
                # Canceled (Context.interrupt): the client's bytes are
                # not wanted any more.
                return 0
            return self._recv_deadline(buf, nbytes, flags)
        finally:
            self.reading = False

    def _recv_deadline(self, buf, nbytes=0, flags=0):
        if self._deadline is None:
            return self.request.recv_into(buf, nbytes, flags)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise self._expired()
        idle = self._idle
        self.request.settimeout(left if idle is None else min(left, idle))
        try:
            return self.request.recv_into(buf, nbytes, flags)
        except TimeoutError:
            if time.monotonic() >= self._deadline:
                raise self._expired() from None
            raise

    def _expired(self):
        return DeadlineExpired(f"{self._deadline_what} not received in "
                               f"{self._deadline_seconds} seconds")

    def _start_deadline(self, seconds, what):
        self._deadline = time.monotonic() + seconds
        self._deadline_seconds = seconds
        self._deadline_what = what

    def _end_deadline(self):
        if self._deadline is not None:
            self._deadline = None
            self.request.settimeout(self._idle)

    def interrupt(self):
        """
        See Context.interrupt. Called from another thread.

        A TCP socket's read side is shut down only while the thread is
        blocked reading it: the kernel then stops the peer's sending
        without resetting it (seen: a proxy relaying a PUT waited its
        whole timeout, though the daemon had answered and closed). A
        thread blocked elsewhere (NBD, which its Interrupt wakes) finds
        the flag on its next read. A unix socket has no such trouble,
        and a body may be spliced from it without a read here.
        """
        self.interrupted = True
        if self.responding:
            how = socket.SHUT_RDWR
        elif self.reading or self.server.address_family == socket.AF_UNIX:
            how = socket.SHUT_RD
        else:
            log.debug("Interrupting connection=%s on its next read",
                      self.context.id)
            return
        log.debug("Interrupting connection=%s how=%s", self.context.id,
                  "read+write" if how == socket.SHUT_RDWR else "read")
        _shutdown(self.request, how)

    def set_idle_timeout(self, seconds):
        """How long to wait for the next request's first byte."""
        self._idle = seconds
        if self._deadline is None:
            self.request.settimeout(seconds)

    def _buffered(self):
        """True if bytes of the next request are already here."""
        sock = self.request
        timeout = sock.gettimeout()
        sock.settimeout(0)
        try:
            return bool(self.rfile.peek(1))
        except (BlockingIOError, ssl.SSLWantReadError):
            return False
        finally:
            sock.settimeout(timeout)

    def _wait_request(self):
        """
        Wait for the next request's first byte, for the idle timeout.
        Return False if it never came.
        """
        if self._tls is not None:
            self._tls.idle()
        if self._buffered():
            return True
        return pipes.ready(self.request.fileno(), select.POLLIN, self._idle)

    def handle(self):
        if self.context is None:
            return
        try:
            super().handle()
        except DeadlineExpired as e:
            log.info("Closing connection=%s: %s", self.context.id, e)
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
        self.server.stats.closed.inc()
        if self._tls is not None:
            self._tls.release()
        log.info("CLOSE connection=%s requests=%s seconds=%.3f",
                 self.context.id, self._requests,
                 time.monotonic() - self._start)

    def address_string(self):
        if self.server.address_family == socket.AF_UNIX:
            return "local"
        return self.client_address[0]

    def handle_one_request(self):
        if not self._wait_request():
            log.debug("connection=%s: idle for %s seconds", self.context.id,
                      self._idle)
            self.close_connection = True
            return
        self._expect_continue = False
        self._start_deadline(self.server.limits.header_timeout,
                             "request headers")
        try:
            if not self._read_head():
                return
        finally:
            self._end_deadline()
        self._requests += 1
        self.responding = False
        req = Request(self)
        resp = Response(self)
        self.server.router.dispatch(req, resp)
        if not resp.started or resp._pending is not None:
            resp.finish()
        self.wfile.flush()
        if self.interrupted:
            # Nothing more can be read from the client.
            self.close_connection = True
        if not req.consumed:
            # What follows on the connection is body, not requests: the
            # next request cannot be found.
            self.close_connection = True
            self._linger()

    def _read_head(self):
        """Read and parse the request line and headers; False if there is
        no request to dispatch (answered or closed)."""
        self.raw_requestline = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if not self.raw_requestline:
            self.close_connection = True
            return False
        if len(self.raw_requestline) > MAX_REQUEST_LINE:
            self.requestline = ""
            self.request_version = "HTTP/1.1"
            self.command = None
            self.send_error(414)
            return False
        rfile = self.rfile
        self.rfile = reader = _HeaderReader(rfile)
        try:
            if not self.parse_request():
                return False
        finally:
            self.rfile = rfile
        if reader.last == b"":
            # The stdlib's parser takes the end of the stream for the end
            # of the headers (the client went away, or its connection was
            # closed as the oldest unauthorized one): never run half a
            # request.
            self.close_connection = True
            return False
        if self.headers.defects or self.headers.get_payload():
            # A line the stdlib cannot read as a header (no colon, space
            # before it, a fold first), or a bare CR (a line end to its
            # header parser), silently ends the headers: those after it,
            # Content-Length among them, would be dropped and the body
            # read as the next request. RFC 9112 5.1, 2.2: reject.
            self.send_error(400, "Invalid header line")
            return False
        return True

    def _linger(self):
        """
        Lingering close: end our side (the client reads the response and
        then end of stream), then read and drop what the client is still
        sending, at most LINGER_MAX bytes for at most LINGER_TIMEOUT
        seconds. Closing a socket with unread data makes the kernel send
        a reset, which can destroy the response before the client reads
        it. The bytes are never parsed.
        """
        sock = self.connection
        try:
            if self._tls is not None:
                self._tls.close_notify()
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        deadline = time.monotonic() + LINGER_TIMEOUT
        left = LINGER_MAX
        try:
            while left > 0:
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                sock.settimeout(timeout)
                data = sock.recv(min(left, 65536))
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

    def handle_expect_100(self):
        # "100 Continue" only once a handler reads the body (Request):
        # a request refused first (403, 416, chunked) gets its final
        # answer and the client never sends the body.
        self._expect_continue = True
        return True

    def send_continue(self):
        if self._expect_continue:
            self._expect_continue = False
            self.wfile.write(
                f"{self.protocol_version} 100 Continue\r\n\r\n".encode())
            self.wfile.flush()

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
        # The rest of what the client sent (a huge header, say) is unread.
        self._linger()

    def log_message(self, format, *args):
        # The stdlib would log request lines, which hold ticket ids.
        pass


def _shutdown(sock, how):
    try:
        sock.shutdown(how)
    except OSError:
        # Already closed by the client or by the connection's thread.
        pass


class _Reader(io.RawIOBase):
    """A plain connection's input, read with the handler's _recv_into."""

    def __init__(self, recv_into):
        self._recv_into = recv_into

    def readable(self):
        return True

    def readinto(self, buf):
        try:
            return self._recv_into(buf)
        except BlockingIOError:
            # A non-blocking peek found nothing (Handler._buffered).
            return None


class _DeadlineSocket:
    """What tls.Connection uses of a socket, reading with the handler's
    _recv_into (OpenSSL's own reads wait through it, peeking)."""

    def __init__(self, handler):
        self.recv_into = handler._recv_into
        self.sendall = handler.request.sendall
        self.sendmsg = handler.request.sendmsg
        self.fileno = handler.request.fileno
        self.gettimeout = handler.request.gettimeout


class _HeaderReader:
    """The rfile the stdlib's header parser reads, remembering the last
    line: b"" if the headers ended with the stream."""

    def __init__(self, rfile):
        self._rfile = rfile
        self.last = None

    def readline(self, limit=-1):
        self.last = self._rfile.readline(limit)
        return self.last

    def __getattr__(self, name):
        return getattr(self._rfile, name)


class Stats:
    """A server's connection counters, for /metrics; no lock needed."""

    def __init__(self):
        self.opened = prometheus.Counter()
        self.closed = prometheus.Counter()
        self.handshakes = prometheus.Counter()
        self.handshake_failures = prometheus.Counter()

    def handshake(self, ok):
        (self.handshakes if ok else self.handshake_failures).inc()

    @property
    def connections(self):
        return self.opened.value - self.closed.value


class _Server(socketserver.ThreadingMixIn):
    daemon_threads = True
    block_on_close = False
    # Connections waiting for accept(). Upstream's 40 refuses the 41st of
    # a burst (seen: 50 clients connecting at once to the local socket);
    # the kernel caps this at net.core.somaxconn.
    request_queue_size = socket.SOMAXCONN

    def _init_limits(self, limits):
        self.limits = limits or Limits()
        self.stats = Stats()
        # Sockets of connections that have not authorized a ticket, oldest
        # first. A socket is shut down here only while it is listed, and
        # it leaves the list before its handler closes it, so a closed
        # socket's fd (maybe reused) is never touched.
        self._unauthorized = collections.OrderedDict()
        self._unauthorized_lock = threading.Lock()
        self._evicted = 0
        self._evict_logged = None

    def unauthorized_connections(self):
        with self._unauthorized_lock:
            return len(self._unauthorized)

    def process_request(self, request, client_address):
        self._admit(request)
        super().process_request(request, client_address)

    def _admit(self, sock):
        with self._unauthorized_lock:
            self._unauthorized[sock] = None
            while len(self._unauthorized) > self.limits.max_unauthorized:
                oldest, _ = self._unauthorized.popitem(last=False)
                try:
                    # Its thread reads end of stream and closes it.
                    oldest.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                self._evicted += 1
            evicted = self._evicted
            now = time.monotonic()
            if evicted and (self._evict_logged is None or
                            now - self._evict_logged >= EVICT_LOG_INTERVAL):
                self._evicted = 0
                self._evict_logged = now
                log.warning(
                    "Too many unauthorized connections on %s (limit %d): "
                    "closed the oldest %d", self.name,
                    self.limits.max_unauthorized, evicted)

    def forget(self, sock):
        """The connection authorized a ticket, or is closing."""
        with self._unauthorized_lock:
            self._unauthorized.pop(sock, None)

    def shutdown_request(self, request):
        self.forget(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        log.exception("Unhandled error in connection from %s", client_address)


class TCPServer(_Server, socketserver.TCPServer):
    """HTTP over TCP, with TLS when tls_context is set."""

    allow_reuse_address = True

    def __init__(self, name, host, port, router, tls_context=None,
                 prefer_ipv4=False, limits=None):
        self.name = name
        self.router = router
        self.tls_context = tls_context
        self._init_limits(limits)
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

    def __init__(self, name, path, router, mode=None, limits=None):
        self.name = name
        self.router = router
        self.tls_context = None
        self.mode = mode
        self._init_limits(limits)
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
        self._starved = None
        self._backoff = ACCEPT_BACKOFF
        with selectors.DefaultSelector() as sel:
            sel.register(self.server, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while True:
                events = sel.select()
                if any(key.fileobj == self._wake_r for key, _ in events):
                    return
                if not self._accept():
                    # The listening socket stays ready: wait for the wake
                    # pipe only, then retry.
                    if pipes.ready(self._wake_r, select.POLLIN,
                                   self._backoff):
                        return
                    self._backoff = min(2 * self._backoff,
                                        ACCEPT_BACKOFF_MAX)

    def _accept(self):
        """
        Accept one connection and start its thread. Return False if the
        process is out of fds (or the kernel of memory).
        """
        srv = self.server
        try:
            request, address = srv.get_request()
        except OSError as e:
            if e.errno in _OUT_OF_RESOURCES:
                if self._starved is None:
                    self._starved = time.monotonic()
                    log.warning(
                        "Cannot accept connections on %s: %s; retrying "
                        "(raise LimitNOFILE, or close connections)",
                        self.name, e)
                return False
            # The client went away before we accepted it.
            log.debug("accept on %s failed: %s", self.name, e)
            return True
        if self._starved is not None:
            log.info("Accepting connections again on %s after %.1f seconds",
                     self.name, time.monotonic() - self._starved)
            self._starved = None
            self._backoff = ACCEPT_BACKOFF
        try:
            srv.process_request(request, address)
        except Exception:
            srv.handle_error(request, address)
            srv.shutdown_request(request)
        return True

    def stop(self):
        if self._thread.is_alive():
            os.write(self._wake_w, b"x")
            self._thread.join()
        self.server.server_close()
        os.close(self._wake_r)
        os.close(self._wake_w)
