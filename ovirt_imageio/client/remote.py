"""
An image on an imageio server, over HTTP(S) or the server's unix socket.

RemoteImage speaks the daemon's data API (API.md section 1) and is an
Image (ovirt_imageio/image.py), like an NBD connection: size, the
capabilities the server's OPTIONS gave, read_into, write, zero, flush,
extents, send, receive, close. The client pipeline copies between it
and a local NBD export; the proxy uses it as its backend and passes its
errors on unchanged.

State: connection. A RemoteImage owns one persistent HTTP connection and
is used by one thread at a time; parallel transfers use clone(), which
opens a new connection with the capabilities already learned.

Theory of operation.

- Capabilities. The first request is `OPTIONS <path>`. 200 gives the
  features, max_readers/max_writers (1 if absent) and the local unix
  socket; 405 (old daemon) and 204 (old proxy) mean a legacy server with
  no features and one reader and writer; anything else is the server's
  answer to "may I use this ticket", raised as errors.PeerError.
- Unix socket. When the server advertises `unix_socket` and we are
  connected to one of this host's own addresses (our end and the peer's
  end have the same IP), every further request goes over the unix socket:
  no TLS, no TCP. If connecting to it fails, HTTPS stays.
- No copies. read_into() reads the body straight into the caller's
  buffer (readinto); write() sends the caller's buffer with sendall.
  send() and receive() move a whole request's range in pieces of one
  reused buffer, so a 128 MiB request costs one HTTP round trip;
  copy_from() and copy_to() do the same between this image and a local
  one, spliced on the unix socket when the local one can_splice.
- Errors. Every unexpected status raises errors.PeerError(status,
  message), message being the first line of the body (at most 512
  bytes): the proxy returns it to its own client as it is. A 404 from
  /extents raises Unsupported (also a PeerError, same message). Network
  failures raise OSError subclasses as they come; a response that breaks
  the protocol (wrong status for a ranged GET, short body, wrong length)
  raises ProtocolError, an OSError.
- Keep-alive. When the server closes the connection (Connection: close
  after an error, or an idle timeout) the next request reconnects: an
  idle connection that reads as EOF is replaced before a request is sent
  (one poll, no data). If a request on a reused connection still fails
  before any response arrived (the server closed it at that moment), it
  is sent once more on a new connection: all requests are idempotent.
  Not copy_from(): its source may be a stream, read once.

Never log the URL's path: it holds the ticket id, a credential.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import re
import select
import socket
import ssl
import urllib.parse

from ovirt_imageio import errors
from ovirt_imageio import tls
from ovirt_imageio.nbd import extents as nbd_extents

# ovirt_imageio.image (the Image contract's helpers) is imported where it
# is used: it imports typing, which the client library does not load when
# it starts.

log = logging.getLogger(__name__)

# Longest error message kept from a response body (upstream's client keeps
# the same); a longer body cannot be a message.
MAX_ERROR_MESSAGE = 512

# Most of an error body we read to keep the connection usable; a larger
# body is not read and the connection is closed instead.
MAX_ERROR_BODY = 64 * 1024

# Largest JSON body we accept (OPTIONS, extents, checksum). The extents of
# a badly fragmented 8 TiB image are a few hundred MiB of JSON; 1 GiB
# only guards against a server that never stops.
MAX_JSON_BODY = 1024**3

# Zeros sent when the server cannot zero (no "zero" feature). Immutable and
# shared; bytes(n) is calloc'ed, so its pages cost nothing until read.
ZERO_BUFFER_SIZE = 1024**2
_ZEROS = memoryview(bytes(ZERO_BUFFER_SIZE))

# Failures meaning "the server closed this connection while it was idle".
_STALE = (http.client.RemoteDisconnected, ConnectionResetError,
          BrokenPipeError, ConnectionAbortedError, ssl.SSLEOFError,
          ssl.SSLZeroReturnError)


# Retry-After in seconds (RFC 9110 10.2.3), at most a day.
_RETRY_AFTER = re.compile(r"[0-9]{1,5}")


class ProtocolError(OSError):
    """The server answered in a way the protocol does not allow."""

    def __init__(self, message):
        super().__init__(errno.EPROTO, message)

    def __str__(self):
        return self.strerror


class Unsupported(errors.PeerError, errors.Unsupported):
    """
    The server answered 404 to an extents request (e.g. no dirty bitmap).
    Both a PeerError (the proxy passes 404 and the message on) and an
    errors.Unsupported; str() is the server's message as it is.
    """

    msg = "{self.reason}"


class RemoteImage:
    """
    An image on an imageio server at a transfer URL
    (https://host:port/images/<ticket-id>, or http://).

    Attributes: url, features (set), max_readers, max_writers, transport
    ("https", "http" or "unix"), size (property).

    Not thread safe: use one per thread, clone() for more.
    """

    def __init__(self, url, cafile=None, secure=True, timeout=60,
                 use_unix_socket=True):
        """
        Connect to url and learn the server's capabilities (OPTIONS).

        Raises OSError if the server cannot be reached, errors.PeerError
        if it refuses the ticket, ValueError for a URL that is not http(s).
        """
        self._setup(url, cafile, secure, timeout, use_unix_socket)
        self._con = self._connect_tcp()
        try:
            self._options()
            if use_unix_socket and self._unix_socket and self._is_local():
                self._switch_to_unix()
        except BaseException:
            self.close()
            raise

    def _setup(self, url, cafile, secure, timeout, use_unix_socket):
        self.url = url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(
                f"Unsupported URL scheme {parts.scheme!r}: expecting https "
                f"or http")
        if not parts.hostname:
            raise ValueError("URL has no host")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._path = parts.path or "/"
        self._cafile = cafile
        self._secure = secure
        self._timeout = timeout
        self._use_unix_socket = use_unix_socket
        self._context = None
        if parts.scheme == "https":
            self._context = _ssl_context(cafile, secure)
        self.features = frozenset()
        self.max_readers = 1
        self.max_writers = 1
        self.transport = parts.scheme
        self._unix_socket = None
        self._extents = {}
        self._size = None
        self._con = None
        # Requests sent on the current connection, to tell a stale reused
        # connection from a fresh one.
        self._requests = 0
        # The last request was cut short; reconnect before the next.
        self._broken = False
        # The server has no HEAD or sends no ETag (etag()).
        self._no_etag = False

    def clone(self):
        """
        Return a new RemoteImage on a new connection to the same server,
        with the same settings and capabilities, without OPTIONS.
        """
        other = RemoteImage.__new__(RemoteImage)
        other._setup(self.url, self._cafile, self._secure, self._timeout,
                     self._use_unix_socket)
        other.features = self.features
        other.max_readers = self.max_readers
        other.max_writers = self.max_writers
        other._unix_socket = self._unix_socket
        other._size = self._size
        # Extents lists are immutable values; sharing them saves requests.
        other._extents = dict(self._extents)
        other.transport = self.transport
        if self.transport == "unix":
            other._con = _UnixConnection(self._unix_socket, self._timeout)
            try:
                other._con.connect()
            except BaseException:
                other.close()
                raise
        else:
            other._con = other._connect_tcp()
        return other

    def __repr__(self):
        # No path: it holds the ticket id.
        return (f"<RemoteImage {self._scheme}://{self._host}:{self._port} "
                f"transport={self.transport} "
                f"features={sorted(self.features)}>")

    # Capabilities

    @property
    def can_extents(self):
        return "extents" in self.features

    @property
    def can_zero(self):
        return "zero" in self.features

    @property
    def can_flush(self):
        return "flush" in self.features

    @property
    def can_checksum(self):
        return "checksum" in self.features

    @property
    def size(self):
        """
        The image's size: where the last zero extent ends when the server
        has extents, else the total length a GET reports.
        """
        if self._size is None:
            if self.can_extents:
                found = self._all_extents("zero")
                self._size = (found[-1].start + found[-1].length
                              if found else 0)
            else:
                self._size = self._size_from_get()
        return self._size

    # I/O

    def read_into(self, buf, offset):
        """
        Fill buf (any writable buffer) with the image's bytes at offset,
        with one ranged GET read straight into buf.
        """
        with memoryview(buf) as mv, mv.cast("B") as view:
            length = len(view)
            if length == 0:
                return
            resp = self._get_range(offset, length)
            try:
                _read_full(resp, view, offset)
            except BaseException:
                self._abandon()
                raise

    def write(self, buf, offset, flush=False):
        """Write buf (any bytes-like object) at offset with one PUT."""
        with memoryview(buf) as mv, mv.cast("B") as view:
            length = len(view)

            def send_body():
                self._con.send(view)

            self._put(offset, length, flush, send_body)

    def zero(self, length, offset, punch_hole=False, flush=False):
        """
        Make length bytes at offset read as zeros: PATCH zero, or PUT of
        zeros when the server cannot zero. punch_hole is not sent: the
        server deallocates or not by its ticket's `sparse`.
        """
        if length == 0:
            return
        if not self.can_zero:
            self._put(offset, length, flush, lambda: self._send_zeros(length))
            return
        self._patch({"op": "zero", "offset": offset, "size": length,
                     "flush": flush})

    def flush(self):
        """PATCH flush when the server can flush; else nothing to do."""
        if self.can_flush:
            self._patch({"op": "flush"})

    def etag(self):
        """
        The server's ETag of the image now (HEAD), or None if it sends
        none. Servers without HEAD (upstream answers 405, with a body
        that breaks the connection's framing) or without an ETag are not
        asked again on this connection. An error answer is None too: a
        HEAD's error has no message, the next request gets it with one.
        """
        if self._no_etag:
            return None

        def send():
            self._con.request("HEAD", self._path)

        resp = self._roundtrip(send)
        if resp.status != http.client.OK:
            # Whatever body an error has, it is not framed as HEAD's.
            self._abandon()
            if resp.status == http.client.METHOD_NOT_ALLOWED:
                self._no_etag = True
            return None
        self._discard(resp)
        value = resp.getheader("etag")
        if value is None:
            self._no_etag = True
        return value

    def extents(self, context="zero", offset=0, length=None):
        """
        Return the extents covering [offset, offset + length) (default: to
        the end): nbd.extents.ZeroExtent for "zero", DirtyExtent for
        "dirty". The server's whole list is fetched once per connection
        and context.

        Raises errors.Unsupported when the server has no such extents.
        """
        if context not in ("zero", "dirty"):
            raise ValueError(
                f"Unsupported extents context {context!r}, expecting one of "
                f"['dirty', 'zero']")
        found = self._all_extents(context)
        end = None if length is None else offset + length
        return _clip(found, offset, end)

    def checksum(self, algorithm=None, block_size=None, timeout=None):
        """
        Return the server's checksum of the image: {"algorithm",
        "block_size", "checksum"}. The server reads the whole image, so
        the response may take long; timeout (seconds, None: no limit)
        replaces the connection's timeout for this request.
        """
        if not self.can_checksum:
            raise errors.Unsupported("Server does not support checksum")
        query = {}
        if algorithm is not None:
            query["algorithm"] = algorithm
        if block_size is not None:
            query["block_size"] = str(block_size)
        path = self._path + "/checksum"
        if query:
            path += "?" + urllib.parse.urlencode(query)

        def send():
            self._con.sock.settimeout(timeout)
            self._con.request("GET", path)

        try:
            resp = self._roundtrip(send)
            return self._json_response(resp, "checksum")
        finally:
            if self._con is not None and self._con.sock is not None:
                self._con.sock.settimeout(self._timeout)

    # The Image contract (ovirt_imageio/image.py): one request moves a
    # whole range, in pieces of buf.

    can_splice = False

    def send(self, dst, offset, length, *, buf=None, begin=None, done=None):
        """
        GET length bytes at offset and give them to dst (a socket or a
        callable write(data)) in pieces of buf, reused.
        """
        from ovirt_imageio import image
        if length == 0:
            return
        write = image.writer(dst)
        view = image.pieces(buf, length)
        resp = self._get_range(offset, length)
        try:
            image.copy_pieces(
                lambda piece, pos: _read_full(resp, piece, pos), write,
                offset, length, view, begin, done)
        except BaseException:
            self._abandon()
            raise

    def receive(self, src, offset, length, *, buf=None, prefix=b"",
                done=None, flush=False):
        """
        PUT length bytes at offset read from src (a socket, after prefix,
        or a callable read_into(view)) in pieces of buf, reused. Each piece
        is read once, in order: never resent.
        """
        from ovirt_imageio import image
        if length == 0:
            if flush:
                self.flush()
            return
        read_into = image.reader(src, prefix)
        view = image.pieces(buf, length)

        def send_body():
            pos, end = offset, offset + length
            while pos < end:
                n = min(len(view), end - pos)
                piece = view[:n]
                read_into(piece)
                self._con.send(piece)
                pos += n
                if done is not None:
                    done(n)

        self._put(offset, length, flush, send_body, resend=False)

    # Copies between this image and a local one, one request for a whole
    # range.

    def copy_from(self, src, offset, length, buf, flush=False,
                  progress=None):
        """
        PUT length bytes at offset, read from the image src: src.send()
        writes the body to our connection, spliced when both sides can
        (the daemon's unix socket and a local image that splices), else
        through buf. If progress(n) raises, the request is abandoned (the
        connection closed) and the error propagates.
        """
        if length == 0:
            return

        def send_body():
            if self._splices(src):
                src.send(self._con.sock, offset, length, done=progress)
            else:
                src.send(self._con.send, offset, length, buf=buf,
                         done=progress)

        # Never sent twice: what src sends is not kept.
        self._put(offset, length, flush, send_body, resend=False)

    def copy_to(self, dst, offset, length, buf, progress=None):
        """
        GET length bytes at offset and write them to the image dst with
        dst.receive(): spliced from our socket when both sides can, else
        through buf. progress(n) is called after each piece is written.
        """
        if length == 0:
            return
        if self._splices(dst):
            self._splice_to(dst, offset, length, progress)
            return
        resp = self._get_range(offset, length)
        pos = offset

        def read_into(piece):
            nonlocal pos
            _read_full(resp, piece, pos)
            pos += len(piece)

        try:
            dst.receive(read_into, offset, length, buf=buf, done=progress)
        except BaseException:
            self._abandon()
            raise

    def _splices(self, local):
        """
        True if data moves between our socket and the local image by
        splice(2): on the daemon's unix socket, with no TLS, no byte is
        copied through this process.
        """
        return self.transport == "unix" and local.can_splice

    def _splice_to(self, dst, offset, length, progress):
        resp = self._get_range(offset, length)
        sock = self._con.sock
        try:
            # Body bytes http.client read with the headers come first.
            timeout = sock.gettimeout()
            sock.settimeout(0)
            try:
                buffered = resp.fp.peek()
            finally:
                sock.settimeout(timeout)
            n = min(len(buffered), length)
            prefix = resp.fp.read(n) if n else b""
            try:
                dst.receive(sock, offset, length, prefix=prefix,
                            done=progress)
            except EOFError as e:
                raise ProtocolError(
                    f"Server closed the response after {e.args[0]} of "
                    f"{length} bytes at offset {offset}") from None
        except BaseException:
            self._abandon()
            raise
        # The whole body was read from the socket: end the response, so
        # the connection takes the next request.
        resp.length = 0
        resp.read()

    # Closing

    def abort(self):
        """
        End a request another thread waits for on this connection: shut
        the socket down (the waiting thread gets an error); close() then
        releases it.
        """
        con = self._con
        sock = con.sock if con is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        """Close the connection. Safe to call more than once."""
        con, self._con = self._con, None
        if con is not None:
            con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private: connections

    def _connect_tcp(self):
        log.debug("Connecting to %s://%s:%s", self._scheme, self._host,
                  self._port)
        if self._context is not None:
            con = _HTTPSConnection(
                self._host, self._port, timeout=self._timeout,
                context=self._context)
        else:
            con = http.client.HTTPConnection(
                self._host, self._port, timeout=self._timeout)
        try:
            con.connect()
        except BaseException:
            con.close()
            raise
        return con

    def _is_local(self):
        sock = self._con.sock
        if sock is None:
            return False
        try:
            return sock.getsockname()[0] == sock.getpeername()[0]
        except OSError:
            return False

    def _switch_to_unix(self):
        con = _UnixConnection(self._unix_socket, self._timeout)
        try:
            con.connect()
        except OSError as e:
            con.close()
            log.warning("Cannot use unix socket %r, using %s: %s",
                        self._unix_socket, self.transport, e)
            return
        log.debug("Using unix socket %r", self._unix_socket)
        self._con.close()
        self._con = con
        self._requests = 0
        self.transport = "unix"

    def reconnect(self):
        """
        Drop the connection, after a failed request: the next request
        opens a new one on the same transport (the transfer pipeline's
        retries).
        """
        self._abandon()

    def _abandon(self):
        """Close a connection left in the middle of a request; the next
        request reconnects."""
        self._broken = False
        if self._con is not None:
            self._con.close()

    # Private: requests

    def _roundtrip(self, send, resend=True):
        """
        Send a request with send() and return the response.

        The server may have closed a kept-alive connection while it was
        idle (its inactivity timeout). A closed connection reads as EOF,
        so it is checked before each request and replaced. If a request
        still fails before any response came, and resend is true, it is
        sent once more on a new connection.
        """
        if self._con is None:
            raise ValueError("I/O on closed RemoteImage")
        if self._broken or (self._requests and self._closed_by_peer()):
            self._abandon()
        for attempt in (1, 2):
            con = self._con
            reused = con.sock is not None and self._requests > 0
            if con.sock is None:
                # Closed by the server (Connection: close) or abandoned.
                con.connect()
                self._requests = 0
            self._requests += 1
            send_error = None
            try:
                try:
                    send()
                except (BrokenPipeError, ConnectionResetError,
                        ssl.SSLEOFError) as e:
                    # The server may have answered and closed before
                    # reading all of our body; its answer says why.
                    send_error = e
                resp = con.getresponse()
            except _STALE as e:
                self._abandon()
                if reused and resend and attempt == 1:
                    log.debug("Connection closed by the server, "
                              "reconnecting: %s", e)
                    continue
                raise send_error or e
            except http.client.HTTPException as e:
                self._abandon()
                raise ProtocolError(
                    f"Invalid response: {type(e).__name__}: {e}") from e
            except BaseException:
                self._abandon()
                raise
            if send_error is not None:
                # The request was cut short: whatever the response says,
                # this connection is done after it.
                self._broken = True
            return resp
        raise AssertionError("unreachable")

    def _closed_by_peer(self):
        """True if the idle connection is readable: EOF (the server
        closed it) or bytes nobody asked for; either way, unusable."""
        sock = self._con.sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _options(self):
        def send():
            self._con.request("OPTIONS", self._path)

        resp = self._roundtrip(send)
        if resp.status in (http.client.METHOD_NOT_ALLOWED,
                           http.client.NO_CONTENT):
            # Legacy servers: no features, one reader and one writer.
            self._discard(resp)
            return
        if resp.status != http.client.OK:
            self._raise_peer_error(resp)
        body = self._read_body(resp, MAX_JSON_BODY)
        try:
            options = json.loads(body)
        except ValueError:
            options = {}
        if not isinstance(options, dict):
            options = {}
        features = options.get("features", [])
        if isinstance(features, list):
            self.features = frozenset(f for f in features
                                      if isinstance(f, str))
        self.max_readers = _positive_int(options.get("max_readers"), 1)
        self.max_writers = _positive_int(options.get("max_writers"), 1)
        unix_socket = options.get("unix_socket")
        if isinstance(unix_socket, str) and unix_socket:
            self._unix_socket = unix_socket

    def _get_range(self, offset, length):
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}

        def send():
            self._con.request("GET", self._path, headers=headers)

        resp = self._roundtrip(send)
        if resp.status != http.client.PARTIAL_CONTENT:
            if resp.status < 300:
                self._discard(resp)
                raise ProtocolError(
                    f"Server answered {resp.status} to a GET of bytes "
                    f"{offset}-{offset + length - 1}, expecting 206")
            self._raise_peer_error(resp)
        content_length = resp.getheader("content-length")
        if content_length != str(length):
            self._abandon()
            raise ProtocolError(
                f"Server sent content-length {content_length} for a GET of "
                f"{length} bytes at offset {offset}")
        return resp

    def _put(self, offset, length, flush, send_body, resend=True):
        # What we write changes the image's extents.
        self._extents.clear()
        path = self._path
        if self.can_flush:
            path += "?flush=y" if flush else "?flush=n"

        def send():
            con = self._con
            con.putrequest("PUT", path, skip_accept_encoding=True)
            con.putheader("Content-Length", str(length))
            con.putheader("Content-Type", "application/octet-stream")
            con.putheader("Content-Range",
                          f"bytes {offset}-{offset + length - 1}/*")
            con.endheaders()
            send_body()

        resp = self._roundtrip(send, resend=resend)
        if resp.status != http.client.OK:
            self._raise_peer_error(resp)
        self._discard(resp)

    def _send_zeros(self, length):
        while length:
            n = min(length, len(_ZEROS))
            self._con.send(_ZEROS[:n])
            length -= n

    def _patch(self, msg):
        if msg.get("op") == "zero":
            self._extents.clear()
        body = json.dumps(msg).encode("utf-8")
        headers = {"Content-Type": "application/json"}

        def send():
            self._con.request("PATCH", self._path, body=body,
                              headers=headers)

        resp = self._roundtrip(send)
        if resp.status != http.client.OK:
            self._raise_peer_error(resp)
        self._discard(resp)

    def _all_extents(self, context):
        found = self._extents.get(context)
        if found is not None:
            return found
        if not self.can_extents:
            if context == "zero":
                found = [nbd_extents.ZeroExtent(0, self.size, zero=False,
                                                hole=False)]
                self._extents[context] = found
                return found
            raise errors.Unsupported(
                "Server does not support dirty extents")

        path = f"{self._path}/extents?context={context}"

        def send():
            self._con.request("GET", path)

        resp = self._roundtrip(send)
        if resp.status == http.client.NOT_FOUND:
            raise Unsupported(resp.status, self._error_message(resp))
        items = self._json_response(resp, "extents")
        found = _parse_extents(context, items)
        self._extents[context] = found
        return found

    def _json_response(self, resp, what):
        if resp.status != http.client.OK:
            self._raise_peer_error(resp)
        body = self._read_body(resp, MAX_JSON_BODY)
        try:
            return json.loads(body)
        except ValueError as e:
            raise ProtocolError(f"Invalid {what} response: {e}") from None

    def _size_from_get(self):
        # Legacy servers: no extents and no HEAD. A one byte ranged GET
        # gives the total in Content-Range; a server that ignores Range
        # gives it in Content-Length, and we close instead of reading.
        def send():
            self._con.request("GET", self._path,
                              headers={"Range": "bytes=0-0"})

        resp = self._roundtrip(send)
        if resp.status == http.client.PARTIAL_CONTENT:
            total = (resp.getheader("content-range") or "").rpartition("/")[2]
            self._discard(resp)
            if total.isdigit():
                return int(total)
            # "bytes 0-0/*": ask for everything and read only the headers.
            resp = self._roundtrip(
                lambda: self._con.request("GET", self._path))
        if resp.status == http.client.OK:
            length = resp.getheader("content-length")
            self._abandon()
            if length is None or not length.isdigit():
                raise ProtocolError("Server did not report the image size")
            return int(length)
        self._raise_peer_error(resp)

    def _read_body(self, resp, limit):
        length = resp.getheader("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            self._abandon()
            raise ProtocolError(f"Response body too large: {length} bytes")
        try:
            return resp.read()
        except http.client.HTTPException as e:
            self._abandon()
            raise ProtocolError(
                f"Invalid response: {type(e).__name__}: {e}") from e
        except BaseException:
            self._abandon()
            raise

    def _discard(self, resp):
        """Read a response body we do not need, keeping the connection."""
        length = resp.length
        if length is not None and length > MAX_ERROR_BODY:
            self._abandon()
            return
        try:
            resp.read()
        except http.client.HTTPException as e:
            self._abandon()
            raise ProtocolError(
                f"Invalid response: {type(e).__name__}: {e}") from e
        except BaseException:
            self._abandon()
            raise

    def _error_message(self, resp):
        """Read an error response; return its message (first line, at
        most MAX_ERROR_MESSAGE bytes)."""
        try:
            length = resp.length
            if length is not None and length <= MAX_ERROR_BODY:
                body = resp.read()
            else:
                body = resp.read(MAX_ERROR_MESSAGE)
                self._abandon()
        except (OSError, http.client.HTTPException):
            # The server closed after a partial body: keep what came.
            body = b""
            self._abandon()
        body = body[:MAX_ERROR_MESSAGE]
        text = body.decode("utf-8", errors="replace")
        lines = text.strip().splitlines()
        return lines[0].rstrip() if lines else resp.reason

    def _raise_peer_error(self, resp):
        headers = {}
        content_range = resp.getheader("content-range")
        if content_range is not None:
            headers["content-range"] = content_range
        # A busy daemon's 503 says when to come back; the proxy passes it
        # on. Only seconds: an HTTP date or anything else is dropped, so
        # nothing the daemon sends reaches our client's headers unchecked.
        retry_after = resp.getheader("retry-after")
        if retry_after is not None and _RETRY_AFTER.fullmatch(retry_after):
            headers["retry-after"] = retry_after
        raise errors.PeerError(resp.status, self._error_message(resp),
                               headers)


class _HTTPSConnection(http.client.HTTPSConnection):
    """
    HTTPS with TLS through memory BIOs (ovirt_imageio.tls): ciphertext
    moves in large batches instead of a send or two reads per 16 KiB
    record.
    """

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = tls.Socket(self.sock, self._context, self.host)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over a unix socket; a name starting with NUL is abstract."""

    def __init__(self, path, timeout):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _ssl_context(cafile, secure):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if not secure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _read_full(resp, view, offset):
    pos = 0
    length = len(view)
    while pos < length:
        n = resp.readinto(view[pos:])
        if not n:
            raise ProtocolError(
                f"Server closed the response after {pos} of {length} bytes "
                f"at offset {offset}")
        pos += n


def _positive_int(value, default):
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return default


def _parse_extents(context, items):
    if not isinstance(items, list):
        raise ProtocolError("Invalid extents response: expecting a list")
    try:
        if context == "zero":
            # Old servers did not report holes.
            return [nbd_extents.ZeroExtent(
                        int(d["start"]), int(d["length"]),
                        zero=bool(d["zero"]), hole=bool(d.get("hole", False)))
                    for d in items]
        # Old servers did not report zero in dirty extents: data.
        return [nbd_extents.DirtyExtent(
                    int(d["start"]), int(d["length"]),
                    dirty=bool(d["dirty"]), zero=bool(d.get("zero", False)))
                for d in items]
    except (KeyError, TypeError, ValueError) as e:
        raise ProtocolError(
            f"Invalid extents response: {type(e).__name__}: {e}") from None


def _clip(found, offset, end):
    """Extents overlapping [offset, end), cut to it (end None: no end)."""
    result = []
    for ext in found:
        ext_end = ext.start + ext.length
        if ext_end <= offset:
            continue
        if end is not None and ext.start >= end:
            break
        start = max(ext.start, offset)
        stop = ext_end if end is None else min(ext_end, end)
        if start != ext.start or stop != ext_end:
            ext = type(ext)(start, stop - start, *ext.flags())
        result.append(ext)
    return result
