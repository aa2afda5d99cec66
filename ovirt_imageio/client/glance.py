"""
A small client for OpenStack Glance's image API v2 (../shared/CLIENTS.md
section 4): create an image, upload its data, read its metadata and
ranges of its data, delete it. ovirt-img's import-glance and
export-glance are built on it.

    g = glance.Client("https://glance.example.com:9292", token)
    image = g.create("fedora", disk_format="qcow2")
    g.upload(image["id"], chunks, length)
    g.get(image["id"])["os_hash_value"]
    g.read_into(image["id"], buf, offset)

Auth: a Keystone token, sent as X-Auth-Token. token is a callable
returning the current token (or the token itself): Keystone tokens
expire, so when Glance answers 401 the token is asked for again, and if
it changed the request is sent once more with the new one (an upload
only if no byte of its body was sent yet). A 401 with the same token is
Unauthorized. The token is never logged.

Glance's quirks met here (Debian 12's glance-api 25, Zed): no
Accept-Ranges header although a single Range gets 206; HEAD on the file
is 405; a 206 carries the Content-MD5 of the whole image; the file of an
image without data is 204; an upload needs Content-Type
application/octet-stream (else 415); a second upload is 409.

Every request has a socket timeout. One connection per Client, kept
alive; not thread safe: use one Client per thread.

State: per Client, its connection and the token in use.
"""

import http.client
import json
import logging
import select
import ssl
import urllib.parse

log = logging.getLogger("glance")

# A request waiting longer than this for a byte (to or from Glance) has
# failed. Glance hashes the upload as it stores it and answers the last
# byte when the file is closed, well within this.
TIMEOUT = 60

# Metadata answers are small; this bounds what a broken server makes us
# read.
MAX_JSON = 1024**2

# An error answer's body, read for its message.
MAX_ERROR = 64 * 1024

DISK_FORMATS = ("ami", "ari", "aki", "vhd", "vhdx", "vmdk", "raw", "qcow2",
                "vdi", "iso", "ploop")

# Failures of a kept-alive connection that Glance may have closed while
# it was idle: the request is sent again on a new one.
_STALE = (http.client.RemoteDisconnected, BrokenPipeError,
          ConnectionResetError, ConnectionAbortedError)


class Error(Exception):
    """Glance refused a request or answered something unexpected; status
    is the HTTP status (None: not an HTTP answer)."""

    def __init__(self, message, status=None):
        super().__init__(message)
        self.status = status


class Unauthorized(Error):
    """401: the token is wrong or expired, also after asking for it
    again."""


class NotFound(Error):
    """404: no such image (or one we may not see)."""


class Conflict(Error):
    """409: e.g. the image already has data."""


class Client:

    def __init__(self, url, token, cafile=None, secure=True,
                 timeout=TIMEOUT):
        """
        url: Glance's endpoint, e.g. https://glance.example.com:9292 (a
        path is kept as a prefix); token: a callable returning the token,
        or the token; cafile and secure: for https, as for the engine.
        """
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("Glance URL must be http:// or https:// with a "
                             "host")
        self.url = url
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self._context = None
        if parts.scheme == "https":
            self._context = ssl.create_default_context(cafile=cafile)
            if not secure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE
        self._timeout = timeout
        self._get_token = token if callable(token) else (lambda: token)
        self._token = None
        self._con = None

    def current_token(self):
        """The token in use (asked for if none yet), for another client
        of the same Glance, such as a urlsource reader."""
        if self._token is None:
            self._token = self._get_token()
        return self._token

    # Metadata.

    def create(self, name, disk_format, container_format="bare", **props):
        """A new image (status queued); returns its metadata. props: more
        of its attributes (id, visibility...) or custom properties."""
        if disk_format not in DISK_FORMATS:
            raise ValueError(f"Invalid disk_format {disk_format!r}")
        body = dict(name=name, disk_format=disk_format,
                    container_format=container_format, **props)
        resp, data = self._json("POST", "/v2/images", body, expect=(201,))
        return data

    def get(self, image_id):
        """The image's metadata (size, checksum, os_hash_algo,
        os_hash_value, disk_format, virtual_size, status...)."""
        _, data = self._json("GET", self._image(image_id), expect=(200,))
        return data

    def delete(self, image_id):
        """Delete the image; one that is already gone is not an error."""
        resp = self._request("DELETE", self._image(image_id))
        if resp.status not in (204, 404):
            self._raise(resp, "DELETE", self._image(image_id))
        self._drain(resp)

    def check(self):
        """Ask Glance something cheap with the token: fail early, before
        anything is made, if Glance cannot be reached or refuses it."""
        self._json("GET", "/v2/images?limit=1", expect=(200,))

    # Data.

    def upload(self, image_id, length, write):
        """
        Upload length bytes (Content-Length) to an image without data.
        write(send) produces the body, calling send(chunk) with bytes-like
        chunks, length bytes in all. The image becomes active; the answer
        comes when Glance has stored and hashed it all. If write() fails,
        the connection is closed: Glance drops what it got, and the image
        goes back to queued.
        """
        path = self._image(image_id) + "/file"

        def send(con, token):
            con.putrequest("PUT", self._prefix + path,
                           skip_accept_encoding=True)
            con.putheader("X-Auth-Token", token)
            con.putheader("Content-Type", "application/octet-stream")
            con.putheader("Content-Length", str(length))
            con.endheaders()
            sent = 0

            def send_chunk(chunk):
                nonlocal sent
                con.send(chunk)
                sent += len(chunk)

            write(send_chunk)
            if sent != length:
                raise ValueError(f"Upload body has {sent} bytes, expecting "
                                 f"{length}")

        resp = self._roundtrip(send, resend=False)
        if resp.status != 204:
            self._raise(resp, "PUT", path)
        self._drain(resp)

    def read_into(self, image_id, buf, offset):
        """Fill buf with the image's bytes at offset (one ranged GET)."""
        with memoryview(buf) as mv, mv.cast("B") as view:
            length = len(view)
            if length == 0:
                return
            resp = self.open_range(image_id, offset, length)
            pos = 0
            try:
                while pos < length:
                    n = resp.readinto(view[pos:])
                    if not n:
                        raise Error(f"Glance closed the data of image "
                                    f"{image_id} after {pos} of {length} "
                                    f"bytes at offset {offset}")
                    pos += n
            except BaseException:
                self._abandon()
                raise

    def open_range(self, image_id, offset, length):
        """A response streaming length bytes at offset; read all of it
        before the next request (or close() the Client)."""
        path = self._image(image_id) + "/file"
        end = offset + length - 1
        resp = self._request("GET", path,
                             headers={"Range": f"bytes={offset}-{end}"})
        if resp.status != 206:
            if resp.status == 204:
                self._drain(resp)
                raise Error(f"Glance image {image_id} has no data", 204)
            if resp.status < 300:
                # A whole image where a range was asked for.
                self._abandon()
                raise Error(f"Glance answered {resp.status} to a GET of "
                            f"bytes {offset}-{end}, expecting 206",
                            resp.status)
            self._raise(resp, "GET", path)
        expected = f"bytes {offset}-{end}/"
        content_range = resp.getheader("content-range", "")
        if (not content_range.startswith(expected)
                or resp.getheader("content-length") != str(length)):
            self._abandon()
            raise Error(f"Glance sent Content-Range {content_range!r} for a "
                        f"GET of bytes {offset}-{end}")
        return resp

    def close(self):
        self._abandon()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Private.

    def _image(self, image_id):
        return "/v2/images/" + urllib.parse.quote(image_id, safe="")

    def _json(self, method, path, body=None, expect=(200,)):
        headers = {}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        resp = self._request(method, path, data, headers)
        if resp.status not in expect:
            self._raise(resp, method, path)
        raw = resp.read(MAX_JSON + 1)
        if len(raw) > MAX_JSON:
            self._abandon()
            raise Error(f"Glance's answer to {method} {path} is too large")
        try:
            return resp, json.loads(raw)
        except ValueError:
            raise Error(f"Glance's answer to {method} {path} is not JSON",
                        resp.status) from None

    def _request(self, method, path, body=None, headers=None):
        def send(con, token):
            hdrs = {"X-Auth-Token": token}
            hdrs.update(headers or {})
            con.request(method, self._prefix + path, body=body,
                        headers=hdrs)
        return self._roundtrip(send)

    def _roundtrip(self, send, resend=True):
        """
        send(con, token), then the response. A kept-alive connection that
        Glance closed is replaced (once, if resend). A 401 asks for the
        token again: sent once more if it changed (if resend).
        """
        if self._token is None:
            self._token = self._get_token()
        for attempt in (1, 2):
            resp = self._send(send, resend)
            if resp.status != 401:
                return resp
            self._drain(resp)
            old, self._token = self._token, self._get_token()
            if not resend or attempt == 2 or self._token == old:
                break
            log.info("Glance refused the token; trying the token read "
                     "again")
        raise Unauthorized("Glance refused the token (401 Unauthorized): "
                           "it is wrong or expired", 401)

    def _send(self, send, resend):
        if self._con is not None and self._closed_by_peer():
            self._abandon()
        for attempt in (1, 2):
            reused = self._con is not None
            if self._con is None:
                self._con = self._connect()
            try:
                try:
                    send(self._con, self._token)
                except (BrokenPipeError, ConnectionResetError) as e:
                    # Glance may have answered (a 401, a 413) and closed
                    # before reading all of the body; its answer says why.
                    if not self._answered():
                        raise
                    log.debug("Glance stopped reading the request: %s", e)
                return self._con.getresponse()
            except _STALE as e:
                self._abandon()
                if reused and resend and attempt == 1:
                    log.debug("Glance closed the connection, reconnecting: "
                              "%s", e)
                    continue
                raise
            except http.client.HTTPException as e:
                self._abandon()
                raise Error(f"Invalid answer from Glance: "
                            f"{type(e).__name__}: {e}") from e
            except BaseException:
                self._abandon()
                raise
        raise AssertionError("unreachable")

    def _connect(self):
        if self._context is not None:
            con = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout,
                context=self._context)
        else:
            con = http.client.HTTPConnection(self._host, self._port,
                                             timeout=self._timeout)
        try:
            con.connect()
        except OSError as e:
            con.close()
            raise Error(f"Cannot connect to Glance at {self._host}:"
                        f"{self._port}: {e.strerror or e}") from e
        except BaseException:
            con.close()
            raise
        return con

    def _closed_by_peer(self):
        sock = self._con.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _answered(self):
        sock = self._con.sock
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError, TypeError):
            return False
        return bool(readable)

    def _abandon(self):
        if self._con is not None:
            self._con.close()
            self._con = None

    def _drain(self, resp):
        try:
            resp.read(MAX_ERROR)
        except (OSError, http.client.HTTPException):
            self._abandon()
        if not resp.isclosed():
            self._abandon()

    def _raise(self, resp, method, path):
        try:
            body = resp.read(MAX_ERROR)
        except (OSError, http.client.HTTPException):
            body = b""
        self._abandon()
        message = _message(body) or resp.reason
        text = f"Glance answered {resp.status} to {method} {path}: {message}"
        cls = {401: Unauthorized, 404: NotFound, 409: Conflict}.get(
            resp.status, Error)
        raise cls(text, resp.status)


def _message(body):
    """Glance's error text: a JSON {"message": ...}, or an HTML/plain page
    of which the last non-empty line says what failed."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("message", "title"):
            if isinstance(doc.get(key), str):
                return " ".join(doc[key].split())
    lines = [line.strip() for line in text.replace("<br />", "\n")
             .splitlines() if line.strip() and not line.strip().startswith(
                 "<")]
    return " ".join(" ".join(lines[-1:]).split())[:500]
