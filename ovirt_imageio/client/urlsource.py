"""
Images from HTTP(S) URLs, read by qemu through a reader of our own.

    with urlsource.open(url, headers={"X-Auth-Token": token},
                        cafile="ca.pem", refresh=read_token) as src:
        src.format, src.virtual_size    # probed from the bytes
        src.qemu_spec()                 # json: for qemu-img / qemu-nbd
        with src.export(shared=5) as exp:   # like local.Export
            ...
    client.upload(src, transfer_url, cafile)

Why our own reader. qemu's curl block driver and nbdkit's curl plugin
refuse a server that sends no `Accept-Ranges: bytes` (OpenStack Glance
sends none, though it serves ranges), qemu's curl driver sends no custom
headers (an `X-Auth-Token`), and nbdkit's curl plugin would put the
headers on its command line, where `ps` shows them. So open() probes
range support with a ranged GET, and serves the remote bytes to qemu on
a private unix socket with the NBD server of nbd/server.py, in this
process: every NBD read is a ranged GET on one of up to max_connections
HTTP connections (the requests qemu keeps in flight are read at once),
the headers never leave this process, and a 401 can call back into the
caller for a new token. qemu's format drivers sit on top of it, so a
qcow2 is converted on the fly and its allocation map says which clusters
hold data; only those are read and sent.

Safety:
- Header values are never logged, nor put in an error message or a
  child's command line. A URL is shown without its query (signed URLs
  carry their signature there) and user info in a URL is refused.
- Redirects are followed here, up to MAX_REDIRECTS: one to another host
  (or from https to http) is refused unless allow_redirect_host, so the
  headers are never sent to a host the caller did not name.
- A server on a loopback or link-local address is allowed (tests use
  one) but logged, as it may be a service of this host that the URL's
  author could not reach himself (a cloud's metadata service).
- Safe sources (sources.py): a remote image naming a backing file or a
  qcow2 external data file is refused, and it is opened with
  "backing": null. The first HEAD_SIZE bytes (every qcow2 header and its
  extensions, whatever the cluster size) are read once, checked, and
  served from memory from then on, so a server cannot show the check one
  header and qemu another; the size is also fixed at the probe.
- Formats: raw and qcow2 (FORMATS); others are refused, since a vmdk
  names its extents and a server could serve any.

A server without ranges (it answers a ranged GET with 200) is read once,
in order: that works for raw only (stream_into()); for a qcow2 the error
says it needs random access. An image of at most HEAD_SIZE bytes is
read whole at the probe and served from memory, ranges or not.

Every wait has a deadline: each HTTP request has the timeout (seconds
without progress), failed reads are retried ATTEMPTS times on a new
connection, and qemu-img runs with qemu_img.TIMEOUT.
"""

import builtins
import http.client
import ipaddress
import json
import logging
import os
import re
import shutil
import ssl
import tempfile
import threading
import time
import urllib.parse

from . import local
from . import qemu_img
from . import sources

log = logging.getLogger(__name__)

MiB = 1024**2

DEFAULT_TIMEOUT = 60
MAX_CONNECTIONS = 4
MAX_REDIRECTS = 10
REDIRECTS = (301, 302, 303, 307, 308)

# Bytes read at the probe and served from memory: a qcow2 header and its
# extensions lie in its first cluster, at most 2 MiB.
HEAD_SIZE = 2 * MiB

# Tries of a failed ranged GET (network errors, 502-504), with backoff.
ATTEMPTS = 3
BACKOFF = 0.5
RETRY_STATUS = (502, 503, 504)

FORMATS = ("raw", "qcow2")

# Bounded reads of bodies we do not use (errors, redirects).
MAX_ERROR_BODY = 64 * 1024

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_RESERVED_HEADERS = ("host", "range", "content-length", "connection",
                     "transfer-encoding", "accept-encoding")


class Error(RuntimeError):
    """The source cannot be read; the message says why (no header
    values, no URL query)."""


class Unauthorized(Error):
    """The server answered 401, also after refresh()."""


class RangesNotSupported(Error):
    """The server serves no ranges and the image needs random access."""


def open(url, headers=None, *, cafile=None, secure=True,
         allow_redirect_host=False, refresh=None,
         max_connections=MAX_CONNECTIONS, timeout=DEFAULT_TIMEOUT):
    """
    Probe the image at url (http:// or https://) and return a Source.

    Args:
        url: the image's URL.
        headers: {name: value} sent with every request (e.g.
            {"X-Auth-Token": token}); values are never logged.
        cafile: CA certificates to verify an https server with (None:
            the system's).
        secure: False skips verifying the server's certificate.
        allow_redirect_host: follow redirects to other hosts, sending
            them the headers too.
        refresh: called (from any thread, one call at a time) when the
            server answers 401; returns new headers to retry with, or
            None to fail with Unauthorized (e.g. read a token file
            again: Keystone tokens expire mid-transfer).
        max_connections: ranged GETs in flight at once.
        timeout: seconds an HTTP request may make no progress.

    Raises Error (Unauthorized, RangesNotSupported), sources.UnsafeImage
    (a backing or data file), qemu_img.Error.
    """
    policy = _Policy(url, headers, cafile, secure, allow_redirect_host,
                     refresh, timeout)
    src = Source(policy, max_connections)
    try:
        src._probe()
    except BaseException:
        src.close()
        raise
    return src


class Source:
    """
    An image at a URL, probed. Attributes: url (for display: without
    query), size (bytes), ranges (random access: the server serves
    ranges, or the whole image is in memory), format
    ("raw", "qcow2"), virtual_size, info (`qemu-img info` of the bytes).

    Thread safe: read_into() may be called from several threads.
    """

    def __init__(self, policy, max_connections):
        self._policy = policy
        self.url = policy.display
        self.size = None
        self.ranges = None
        self.format = None
        self.virtual_size = None
        self.info = None
        self._head = b""
        self._stream = None
        self._streamed = 0
        self._max_connections = max(1, max_connections)
        self._local = threading.local()
        self._clients = []
        self._clients_lock = threading.Lock()
        self._tmp_dir = None
        self._server = None

    def __repr__(self):
        return f"<urlsource.Source {self.url} {self.format}>"

    @property
    def head(self):
        """The image's first bytes (up to HEAD_SIZE), read at the probe."""
        return self._head

    # Reading.

    def read_into(self, buf, offset):
        """
        Fill buf with the image's bytes at offset (ranged GETs; the head
        from memory). Raises Error.
        """
        with memoryview(buf).cast("B") as view:
            length = len(view)
            if offset + length > self.size:
                raise Error(f"Read of {length} bytes at {offset} is past "
                            f"the end of {self.url} ({self.size} bytes)")
            head = len(self._head)
            if offset < head:
                n = min(length, head - offset)
                view[:n] = self._head[offset:offset + n]
                offset += n
                view = view[n:]
            if len(view):
                if not self.ranges:
                    raise RangesNotSupported(
                        f"{self.url} serves no ranges: it can be read "
                        f"only once, in order")
                self._client().read_range(view, offset)

    def stream_into(self, buf):
        """
        A server without ranges: read the next bytes of the image, in
        order, into buf; return how many (0 at the end). The whole image
        can be read once.
        """
        with memoryview(buf).cast("B") as view:
            pos = self._streamed
            if pos < len(self._head):
                n = min(len(view), len(self._head) - pos)
                view[:n] = self._head[pos:pos + n]
            elif pos >= self.size:
                return 0
            else:
                if self._stream is None:
                    raise Error(f"{self.url} was already read")
                want = min(len(view), self.size - pos)
                n = _read_some(self._stream, view[:want], self.url)
            self._streamed += n
            return n

    # Giving the bytes to qemu.

    @property
    def nbd_url(self):
        """The remote bytes as a local NBD export (ranges only)."""
        return self._nbd_server().url

    def qemu_spec(self):
        """
        A json: image specification of the image for qemu (qemu-img,
        qemu-nbd): the probed format over the NBD export of the bytes,
        with no backing file followed.
        """
        node = {"driver": self.format, "file": self._nbd_server().qemu_node()}
        if self.format == "qcow2":
            node["backing"] = None
        return "json:" + json.dumps(node)

    def export(self, shared=8):
        """
        Serve the image's guest data with a new qemu-nbd (a local.Export:
        connect(), connect_stream(), close()), read only.
        """
        from ovirt_imageio.nbd import qemu_nbd

        tmp_dir = tempfile.mkdtemp(prefix="imageio-url-")
        try:
            # qemu-nbd takes no json: with its --format (local.py): a
            # tiny overlay has the image as its backing file.
            overlay = os.path.join(tmp_dir, "overlay.qcow2")
            qemu_img.create(overlay, "qcow2", size=self.virtual_size,
                            backing_file=self.qemu_spec(),
                            backing_format=self.format, unsafe=True)
            server = qemu_nbd.start(
                overlay, os.path.join(tmp_dir, "sock"), fmt="qcow2",
                read_only=True, shared=shared, cache="writeback",
                aio="threads")
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        return local.Export(self.url, self.format, True, server, tmp_dir,
                            dirty=False)

    def close(self):
        """Stop the NBD server, close every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        with self._clients_lock:
            clients, self._clients = self._clients, []
        for c in clients:
            c.close()
        if self._tmp_dir is not None:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)
            self._tmp_dir = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private.

    def _client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = _Client(self._policy)
            with self._clients_lock:
                self._clients.append(c)
        return c

    def _nbd_server(self):
        if not self.ranges:
            raise RangesNotSupported(
                f"{self.url} serves no ranges: qemu cannot read it")
        if self._server is None:
            from ovirt_imageio.nbd import server as nbd_server
            self._tmp_dir = tempfile.mkdtemp(prefix="imageio-url-")
            self._server = nbd_server.serve(
                self, self.size, os.path.join(self._tmp_dir, "sock"),
                workers=self._max_connections, name="url")
        return self._server

    def _probe(self):
        c = self._client()
        resp = c.get(self._policy.url, (0, HEAD_SIZE - 1), probe=True)
        if resp.status == 206:
            start, end, total = _content_range(resp, self.url)
            if start != 0 or total is None:
                c.discard(resp)
                raise Error(f"{self.url} answered a range request with "
                            f"Content-Range bytes {start}-{end}/{total}")
            self.ranges = True
            self.size = total
            self._head = _read_exactly(resp, end + 1, self.url)
            c.done(resp)
        elif resp.status == 200:
            self.size = _content_length(resp, self.url)
            self._head = _read_exactly(resp, min(HEAD_SIZE, self.size),
                                       self.url)
            if self.size <= HEAD_SIZE:
                # All of it is in memory: as good as ranges (some
                # servers answer a range covering everything with 200).
                self.ranges = True
                c.done(resp)
            else:
                self.ranges = False
                self._stream = resp
        elif resp.status == 416:
            c.discard(resp)
            raise Error(f"{self.url} is empty")
        else:
            raise c.error(resp, self._policy.url)
        if self.size == 0:
            raise Error(f"{self.url} is empty")
        log.info("Source %s: %d bytes, %s", self.url, self.size,
                 "serves ranges" if self.ranges else "serves no ranges")
        if self.ranges:
            self._probe_format()
        else:
            self._probe_stream_format()

    def _probe_format(self):
        spec = "json:" + json.dumps({"file": self._nbd_server().qemu_node()})
        info = qemu_img.info(spec)
        fmt = info.get("format")
        if fmt not in FORMATS:
            raise Error(f"{self.url} is a {fmt} image; only "
                        f"{' and '.join(FORMATS)} images can be read from "
                        f"a URL")
        references = sources.unsafe_references(self.url, info)
        if references:
            raise sources.UnsafeImage(self.url, references)
        self.info = info
        self.format = fmt
        self.virtual_size = info["virtual-size"]
        log.info("Source %s: format %s, virtual size %d", self.url,
                 self.format, self.virtual_size)

    def _probe_stream_format(self):
        # qemu's probe of the first bytes, from a file holding them.
        with tempfile.NamedTemporaryFile(prefix="imageio-url-") as f:
            f.write(self._head)
            f.flush()
            try:
                info = qemu_img.info(f.name)
            except qemu_img.Error:
                info = {"format": "unknown"}
        fmt = info.get("format")
        if fmt != "raw":
            raise RangesNotSupported(
                f"{self.url} serves no ranges (it answered a range request "
                f"with 200), and the image is not raw ({fmt}): qemu needs "
                f"random access to read it. Only a raw image can be read "
                f"from such a server, once, in order")
        info.update({"virtual-size": self.size, "filename": self.url})
        self.info = info
        self.format = "raw"
        self.virtual_size = self.size


class _Policy:
    """How requests are made: the URL, headers, TLS, redirects, 401."""

    def __init__(self, url, headers, cafile, secure, allow_redirect_host,
                 refresh, timeout):
        self.url = _check_url(url)
        self.display = display(url)
        self.origin = _origin(self.url)
        self.cafile = cafile
        self.secure = secure
        self.allow_redirect_host = allow_redirect_host
        self.timeout = timeout
        self._refresh = refresh
        self._headers = check_headers(headers or {})
        self._generation = 0
        self._lock = threading.Lock()
        self._logged = set()
        self._ssl = None

    def headers(self):
        """(headers, generation) to send now."""
        with self._lock:
            return dict(self._headers), self._generation

    def refreshed(self, generation):
        """After a 401 with headers of generation: True if there are new
        headers to retry with."""
        with self._lock:
            if self._generation != generation:
                return True
            if self._refresh is None:
                return False
            new = self._refresh()
            if new is None:
                return False
            self._headers = check_headers(new)
            self._generation += 1
            log.info("Source %s: new headers after 401", self.display)
            return True

    def redirect(self, url, location):
        """The URL a redirect from url to location leads to, if allowed."""
        if not location:
            raise Error(f"{display(url)} redirected without a Location")
        target = urllib.parse.urljoin(url, location.strip())
        try:
            target = _check_url(target)
        except Error as e:
            raise Error(f"{display(url)} redirected to an unusable URL: "
                        f"{e}") from None
        if not self.allow_redirect_host:
            scheme, host = _origin(target)
            if host != self.origin[1]:
                raise Error(
                    f"{display(url)} redirected to another host "
                    f"({host}); use --allow-redirect-host "
                    f"(allow_redirect_host=True) to follow it and send it "
                    f"the headers")
            if self.origin[0] == "https" and scheme != "https":
                raise Error(f"{display(url)} redirected from https to "
                            f"http; use --allow-redirect-host to follow it")
        log.debug("Redirected from %s to %s", display(url), display(target))
        return target

    def ssl_context(self):
        with self._lock:
            if self._ssl is None:
                ctx = ssl.create_default_context(cafile=self.cafile)
                if not self.secure:
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                self._ssl = ctx
            return self._ssl

    def check_peer(self, host, address):
        """Log a loopback or link-local server, once per address."""
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return
        kind = ("loopback" if ip.is_loopback
                else "link-local" if ip.is_link_local else None)
        if kind is None:
            return
        with self._lock:
            if (host, address) in self._logged:
                return
            self._logged.add((host, address))
        log.warning("Source host %s is the %s address %s", host, kind,
                    address)


class _Client:
    """One HTTP connection (the current host's), used by one thread."""

    def __init__(self, policy):
        self._policy = policy
        self._con = None
        self._key = None

    def read_range(self, view, offset):
        """Fill view with the bytes at offset, retrying network errors."""
        url = self._policy.url
        for attempt in range(1, ATTEMPTS + 1):
            try:
                resp = self.get(url, (offset, offset + len(view) - 1))
                if resp.status != 206:
                    if resp.status in RETRY_STATUS and attempt < ATTEMPTS:
                        self.discard(resp)
                        raise _Retry(f"HTTP {resp.status}")
                    raise self.error(resp, url)
                start, end, _ = _content_range(resp, self._policy.display)
                if (start, end) != (offset, offset + len(view) - 1):
                    self.discard(resp)
                    raise Error(f"{self._policy.display} answered range "
                                f"{offset}-{offset + len(view) - 1} with "
                                f"{start}-{end}")
                _read_into(resp, view, self._policy.display)
                self.done(resp)
                return
            except (OSError, http.client.HTTPException, _Retry) as e:
                self.close()
                if attempt == ATTEMPTS:
                    raise Error(f"Cannot read {len(view)} bytes at offset "
                                f"{offset} of {self._policy.display}: "
                                f"{type(e).__name__}: {e}") from None
                seconds = BACKOFF * 2 ** (attempt - 1)
                log.warning("Reading %s failed (attempt %d of %d): %s: %s; "
                            "retrying in %.1f seconds", self._policy.display,
                            attempt, ATTEMPTS, type(e).__name__, e, seconds)
                time.sleep(seconds)

    def get(self, url, byte_range=None, probe=False):
        """
        GET url (following redirects, retrying a 401 with refreshed
        headers once per refresh); the response, whose body the caller
        reads and then calls done() or discard().
        """
        tried = set()
        hops = 0
        while True:
            headers, generation = self._policy.headers()
            if byte_range is not None:
                headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1]}"
            resp = self._request(url, headers)
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                self.discard(resp)
                hops += 1
                if hops > MAX_REDIRECTS:
                    raise Error(f"{self._policy.display}: more than "
                                f"{MAX_REDIRECTS} redirects")
                url = self._policy.redirect(url, location)
                if not probe:
                    continue
                # Later requests go where the probe was sent.
                self._policy.url = url
                continue
            if resp.status == 401 and generation not in tried:
                tried.add(generation)
                self.discard(resp)
                if self._policy.refreshed(generation):
                    continue
                raise Unauthorized(f"{display(url)}: 401 Unauthorized")
            if resp.status == 401:
                self.discard(resp)
                raise Unauthorized(f"{display(url)}: 401 Unauthorized, "
                                   f"also with refreshed headers")
            encoding = resp.getheader("Content-Encoding", "identity")
            if encoding.lower() != "identity" and resp.status < 300:
                self.discard(resp)
                raise Error(f"{display(url)} sent Content-Encoding "
                            f"{encoding}; expecting the image's bytes")
            return resp

    def error(self, resp, url):
        """An Error for an unexpected response, its body discarded."""
        text = ""
        try:
            text = resp.read(MAX_ERROR_BODY).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            pass
        self.close()
        text = " ".join(text.split())[:200]
        return Error(f"GET {display(url)} failed: {resp.status} "
                     f"{resp.reason}" + (f": {text}" if text else ""))

    def done(self, resp):
        """The body was read: keep the connection if it may be reused."""
        if resp.will_close:
            self.close()

    def discard(self, resp):
        """Drop a body we do not use: read a small one, else close."""
        try:
            length = resp.length
            if length is not None and length <= MAX_ERROR_BODY:
                resp.read()
                self.done(resp)
                return
        except (OSError, http.client.HTTPException):
            pass
        self.close()

    def close(self):
        if self._con is not None:
            self._con.close()
            self._con = None
            self._key = None

    def _request(self, url, headers):
        u = urllib.parse.urlsplit(url)
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        for attempt in (1, 2):
            con = self._connection(u)
            reused = attempt == 1 and getattr(con, "_imageio_used", False)
            try:
                con.request("GET", path, headers=headers)
                con._imageio_used = True
                return con.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError):
                # A kept-alive connection the server closed meanwhile:
                # once more on a new one.
                self.close()
                if not reused:
                    raise

    def _connection(self, u):
        key = (u.scheme, u.hostname, u.port)
        if self._con is not None and self._key == key:
            return self._con
        self.close()
        if u.scheme == "https":
            con = http.client.HTTPSConnection(
                u.hostname, u.port, timeout=self._policy.timeout,
                context=self._policy.ssl_context())
        else:
            con = http.client.HTTPConnection(
                u.hostname, u.port, timeout=self._policy.timeout)
        try:
            con.connect()
        except BaseException:
            con.close()
            raise
        self._policy.check_peer(u.hostname, con.sock.getpeername()[0])
        self._con, self._key = con, key
        return con


class _Retry(Exception):
    pass


# Helpers.

def display(url):
    """url without user info, query and fragment: for logs and errors."""
    try:
        u = urllib.parse.urlsplit(url)
        netloc = u.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if u.port is not None:
            netloc += f":{u.port}"
    except ValueError:
        return "<invalid URL>"
    return urllib.parse.urlunsplit((u.scheme, netloc, u.path, "", ""))


def is_url(name):
    """True if name is an http:// or https:// URL."""
    return isinstance(name, str) and name.lower().startswith(
        ("http://", "https://"))


def check_headers(headers):
    """
    Validate {name: value} request headers; return them as a dict.
    Raises ValueError naming the header, never its value.
    """
    checked = {}
    for name, value in dict(headers).items():
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(f"Invalid header name {name!r}")
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"Header {name} is set by the client")
        if not isinstance(value, str) or any(
                c in value for c in "\r\n\0"):
            raise ValueError(f"Invalid value of header {name}")
        checked[name] = value.strip()
    return checked


def parse_header(line):
    """'Name: value' -> (name, value). Raises ValueError (no value in
    the message)."""
    name, sep, value = line.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError("expecting 'Name: value'")
    check_headers({name: value})
    return name, value.strip()


def read_header_file(path):
    """
    Headers from a file of 'Name: value' lines (blank lines and lines
    starting with # skipped): {name: value}. Raises ValueError, OSError.
    """
    headers = {}
    with builtins.open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                name, value = parse_header(line)
            except ValueError as e:
                raise ValueError(f"{path} line {number}: {e}") from None
            headers[name] = value
    return headers


def _check_url(url):
    if not is_url(url):
        raise Error("Expecting an http:// or https:// URL")
    try:
        u = urllib.parse.urlsplit(url)
        u.port
    except ValueError as e:
        raise Error(f"Invalid URL {display(url)}: {e}") from None
    if not u.hostname:
        raise Error(f"Invalid URL {display(url)}: no host")
    if u.username is not None or u.password is not None:
        raise Error(f"URL {display(url)} has user info; give credentials "
                    f"in a header (--header-file) instead")
    return urllib.parse.urlunsplit(
        (u.scheme.lower(), u.netloc, u.path, u.query, ""))


def _origin(url):
    u = urllib.parse.urlsplit(url)
    return u.scheme, (u.hostname or "").lower()


_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.I)


def _content_range(resp, name):
    value = resp.getheader("Content-Range")
    m = _CONTENT_RANGE.match(value or "")
    if m is None:
        raise Error(f"{name} sent 206 with Content-Range {value!r}")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        raise Error(f"{name} sent an invalid Content-Range {value!r}")
    return start, end, total


def _content_length(resp, name):
    value = resp.getheader("Content-Length")
    if value is None or not value.strip().isdigit():
        raise Error(f"{name} sent no Content-Length and serves no "
                    f"ranges: the image's size is unknown")
    return int(value)


def _read_exactly(resp, length, name):
    buf = bytearray(length)
    _read_into(resp, memoryview(buf), name)
    return bytes(buf)


def _read_into(resp, view, name):
    pos = 0
    while pos < len(view):
        n = resp.readinto(view[pos:])
        if not n:
            raise http.client.IncompleteRead(bytes(), len(view) - pos)
        pos += n


def _read_some(resp, view, name):
    try:
        n = resp.readinto(view)
    except (OSError, http.client.HTTPException) as e:
        raise Error(f"Reading {name} failed: {type(e).__name__}: {e}") \
            from None
    if not n:
        raise Error(f"{name} ended early")
    return n

