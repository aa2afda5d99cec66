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
"""

from __future__ import annotations

import logging
import os
import secrets
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
    """

    def __init__(self, address, *, dirty=False, server=None, timeout=None):
        self.address = address
        self.dirty = dirty
        self.server = server
        self.timeout = timeout

    def __repr__(self):
        owned = self.server is not None
        return f"<Backend address={self.address} owned={owned}>"

    def open(self, interrupt=None):
        """
        Return a new NBD connection (client.Client) to the export; an
        interrupt (client.Interrupt) may stop its I/O from another thread.

        Raises errors.ExportError if the export cannot be reached.
        """
        try:
            return client.open(self.address, dirty=self.dirty,
                               timeout=self.timeout, interrupt=interrupt)
        except client.Error as e:
            raise errors.ExportError(
                f"Cannot connect to NBD export {self.address}: {e}") from e

    def open_stream(self, interrupt=None):
        """
        Return a new NBD connection for splicing data (stream.Stream).

        Raises errors.ExportError if the export cannot be reached.
        """
        try:
            return stream.open(self.address, timeout=self.timeout,
                               interrupt=interrupt)
        except client.Error as e:
            raise errors.ExportError(
                f"Cannot connect to NBD export {self.address}: {e}") from e

    def close(self):
        """Stop the owned qemu-nbd, if any. Safe to call more than once."""
        if self.server is not None:
            self.server.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def create(url, *, run_dir, read_only, shared, dirty=False, timeout=None):
    """
    Create the backend for a ticket URL.

    run_dir: private directory for the sockets of owned qemu-nbd.
    read_only: export a file read only.
    shared: number of connections the ticket may open at once.
    dirty: connections request the export's dirty bitmap.
    timeout: seconds NBD I/O may make no progress ([backend_nbd] timeout).

    Raises ValueError for a bad or unsupported URL and errors.ExportError
    if a file cannot be exported.
    """
    if not isinstance(url, str):
        raise ValueError(f"URL must be a string, got {type(url).__name__}")
    if url.startswith("file:"):
        path = _file_path(url)
        server = _start_file(
            path, run_dir=run_dir, read_only=read_only, shared=shared)
        return Backend(server.address, dirty=dirty, server=server,
                       timeout=timeout)
    if url.startswith("nbd"):
        return Backend(nbd_url.parse(url), dirty=dirty, timeout=timeout)
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


def _start_file(path, *, run_dir, read_only, shared):
    if not os.path.exists(path):
        raise errors.ExportError(
            f"Cannot export {path}: No such file or directory")
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
