"""
The link between a ticket's URL and NBD.

State: ticket. A Backend lives as long as its ticket: it knows the
export's address, and for a file URL it owns the qemu-nbd serving the
file. Each HTTP connection opens its own NBD connection with open().

URLs:
- nbd:unix:/path[:exportname=NAME], nbd:HOST:PORT[:exportname=NAME],
  nbd://HOST[:PORT][/NAME], nbd+unix:///[NAME]?socket=/path: an export
  someone else (vdsm) runs; used as it is.
- file:///abs/path: the daemon starts a qemu-nbd exporting the file as
  raw, its bytes as they are. Never probed: a guest may write a qcow2
  header pointing at a backing file on the host into its own disk.

An owned qemu-nbd is started again when it is needed and not running: a
file that did not exist when the ticket was added (upstream accepts such
a ticket and fails its requests until the file exists), or a qemu-nbd
that died (qemu_nbd reaps and logs it). Until it runs again, `error`
says why the export cannot serve; the ticket's status shows it.

Errors raised here reach HTTP clients as the 500 text: they say which
image (a file ticket's path) or which transfer failed, never the export's
address (the daemon's run_dir/<random>.sock, or vdsm's socket), which is
logged instead.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import urllib.parse

from ovirt_imageio import errors
from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import qemu_nbd
from ovirt_imageio.nbd import stream
from ovirt_imageio.nbd import url as nbd_url

log = logging.getLogger(__name__)


class Backend:
    """
    A ticket's NBD export.

    Attributes: address (url.Address), dirty, timeout (seconds NBD I/O
    may make no progress, or None), server (the owned qemu_nbd.Server, or
    None).

    A ticket's resource, as the daemon's links use one (http/link.py,
    like http/relay.Relay): open_image(), serves(), error, buffer_size
    (None: the [backend_nbd] one), limits().
    """

    buffer_size = None

    def __init__(self, address, *, dirty=False, server=None, timeout=None,
                 start=None, error=None, name="export"):
        """
        start: for an owned export, a function starting its qemu-nbd
        again (returns a qemu_nbd.Server, raises errors.ExportError).
        error: why the export cannot serve yet, if not started.
        name: what error messages call the export: the image file, or
        the transfer (never the address).
        """
        self.address = address
        self.name = name
        self.dirty = dirty
        self.server = server
        self.timeout = timeout
        self._start = start
        self._error = error
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self):
        owned = self._start is not None
        return f"<Backend address={self.address} owned={owned}>"

    @property
    def error(self):
        """Why the export cannot serve now, or None."""
        server = self.server
        if server is not None and not server.alive:
            return (f"qemu-nbd pid={server.pid} exited with code "
                    f"{server.returncode}")
        return self._error

    def serves(self, conn):
        """True if conn (a Client or Stream) is usable and connected to
        the running export; False once it broke, after a restart or while
        the export is down."""
        server = self.server
        return (not conn.broken and conn.address == self.address
                and (server is None or server.alive))

    def limits(self, image):
        """(max_readers, max_writers) to report for connections to image,
        or None: the daemon's own."""
        return None

    def open_image(self, interrupt=None):
        """The daemon's image of the export: open_stream()."""
        return self.open_stream(interrupt=interrupt)

    def _ensure_running(self):
        """Start the owned qemu-nbd if it is not running."""
        if self._start is None:
            return
        with self._lock:
            if self._closed:
                raise errors.ExportError(
                    f"NBD export of {self.name} is closed")
            old = self.server
            if old is not None and old.alive:
                return
            if old is not None:
                log.warning("Restarting qemu-nbd for %s: pid=%s exited "
                            "with code %s", old.path, old.pid,
                            old.returncode)
                self.server = None
                old.stop(timeout=0)
            try:
                self.server = self._start()
            except errors.ExportError as e:
                self._error = str(e)
                raise
            self.address = self.server.address
            self._error = None

    def open(self, interrupt=None):
        """
        Return a new libnbd connection (client.Client) to the export; an
        interrupt (client.Interrupt) may stop its I/O from another thread.
        Not in the daemon's request path (open_stream() is), kept for
        callers that want libnbd's client.

        Raises errors.ExportError if the export cannot be reached.
        """
        self._ensure_running()
        try:
            return client.open(self.address, dirty=self.dirty,
                               timeout=self.timeout, interrupt=interrupt)
        except client.Error as e:
            raise self._connect_error(e) from e

    def open_stream(self, interrupt=None):
        """
        Return a new NBD connection for splicing data (stream.Stream),
        which also answers extents (with the ticket's dirty bitmap) and
        reads for checksums: what the daemon uses for every request.

        Raises errors.ExportError if the export cannot be reached.
        """
        self._ensure_running()
        try:
            return stream.open(self.address, timeout=self.timeout,
                               interrupt=interrupt, dirty=self.dirty)
        except client.Error as e:
            raise self._connect_error(e) from e

    def _connect_error(self, e):
        """The ExportError for a failed connect: what failed and why. The
        full error, with the address, is its cause (logged with the
        500's traceback)."""
        log.debug("Cannot connect to NBD export %s (%s): %s",
                  self.address, self.name, e)
        return errors.ExportError(
            f"Cannot connect to NBD export of {self.name}: "
            f"{_reason(e, self.address)}")

    def close(self):
        """Stop the owned qemu-nbd, if any. Safe to call more than once."""
        with self._lock:
            self._closed = True
            server = self.server
        if server is not None:
            server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create(url, *, run_dir, read_only, shared, dirty=False, timeout=None,
           transfer_id=None):
    """
    Create the backend for a ticket URL.

    run_dir: private directory for the sockets of owned qemu-nbd.
    read_only: export a file read only.
    shared: number of connections the ticket may open at once.
    dirty: connections request the export's dirty bitmap.
    timeout: seconds NBD I/O may make no progress ([backend_nbd] timeout).
    transfer_id: names an NBD URL's export in error messages.

    Raises ValueError for a bad or unsupported URL and errors.ExportError
    if a file cannot be exported.
    """
    if not isinstance(url, str):
        raise ValueError(f"URL must be a string, got {type(url).__name__}")
    if url.startswith("file:"):
        path = _file_path(url)

        def start():
            return _start_file(
                path, run_dir=run_dir, read_only=read_only, shared=shared)

        if not os.path.exists(path):
            # Upstream accepts it; requests fail until the file exists.
            return Backend(None, dirty=dirty, timeout=timeout, start=start,
                           error=_missing(path), name=path)
        server = start()
        return Backend(server.address, dirty=dirty, server=server,
                       timeout=timeout, start=start, name=path)
    if url.startswith("nbd"):
        return Backend(nbd_url.parse(url), dirty=dirty, timeout=timeout,
                       name=f"transfer {transfer_id}")
    raise ValueError(
        f"Unsupported URL {url!r}: expecting file:///path or an NBD URL")


def _file_path(url):
    u = urllib.parse.urlsplit(url)
    if u.netloc not in ("", "localhost"):
        raise ValueError(f"Invalid file URL {url!r}: host is not allowed")
    if u.query or u.fragment:
        raise ValueError(
            f"Invalid file URL {url!r}: query and fragment are not allowed")
    # Like upstream, the path is used as it is, without percent-decoding:
    # vdsm sends paths that are not quoted.
    path = u.path
    if not path.startswith("/"):
        raise ValueError(f"Invalid file URL {url!r}: path must be absolute")
    if "\0" in path:
        raise ValueError(f"Invalid file URL {url!r}: path contains NUL")
    return path


def _reason(e, address):
    """
    Why a connect failed, for a client: the message of e (a client.Error)
    unless it names the address (the socket layer's errors do), then the
    errno's text.
    """
    text = e.strerror or ""
    names = [str(address)] if address is not None else []
    if address is not None and address.is_unix:
        names.append(address.socket)
    elif address is not None:
        names.append(address.host)
    if not text or any(n and n in text for n in names):
        text = os.strerror(e.errno) if e.errno else "connection failed"
    return text


def _missing(path):
    return f"Cannot export {path}: No such file or directory"


def _start_file(path, *, run_dir, read_only, shared):
    if not os.path.exists(path):
        raise errors.ExportError(_missing(path))
    # A random name, never the ticket id: ticket ids are credentials, and
    # paths show up in logs and in ps.
    socket = os.path.join(run_dir, secrets.token_hex(16) + ".sock")
    return qemu_nbd.start(
        path,
        socket,
        fmt="raw",
        read_only=read_only,
        # qemu-nbd queues clients beyond --shared instead of refusing them;
        # at least one, so a ticket always gets a connection.
        shared=max(shared, 1),
        cache=None,
        discard=True,
        allocation_depth=True)
