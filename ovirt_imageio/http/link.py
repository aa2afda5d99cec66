"""
An HTTP connection's NBD connection to a ticket's export: the Link.

State: connection. Each HTTP connection opens its own NBD connection to a
ticket's export on first use (a Link, kept in the connection's Context)
and keeps it while the connection lives; the ticket counts it in
`connections`. Every request of the connection, data, /extents and
/checksum, uses that one connection (nbd/stream.py), so an HTTP
connection never holds more than one NBD connection and never
reconnects while it lives. A proxy ticket's link holds the relay's image
(relay.py) instead.

Cancellation: every piece reports progress to the ticket operation, which
raises once the ticket is canceled, so a transfer stops within one piece.
A canceled ticket closes the NBD connection of links that are idle, and
interrupts the NBD I/O of busy ones: a request blocked on a hung export
(or in its handshake) fails at once with the ticket's TransferCanceled,
so its thread and descriptors are released. A busy link also interrupts
its HTTP connection's waits on the client (server.Context.interrupt): a
GET whose client stopped reading is cut, a PUT whose client stopped
sending reads the end of its body and answers 403 "... was canceled";
either way the connection closes. What cannot be interrupted is a proxy
waiting for a daemon that does not answer (up to relay.TIMEOUT): DELETE
then says 409 and the ticket stays canceled.

A request whose NBD connection failed under it (the export timed out,
went away, or its qemu-nbd died) gets errors.ExportFailed: a 500 with
what happened, and its HTTP connection is closed.
"""

import errno
import threading
import time

from .. import errors
from ..nbd import client as nbd_client

# NBD errors saying the connection is gone, not that a command failed.
CONNECTION_ERRORS = frozenset([
    errno.ETIMEDOUT, errno.ECANCELED, errno.ECONNRESET, errno.EPIPE,
    errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED])


class Link:
    """
    One HTTP connection's NBD connection to one ticket's export.

    To an NBD export the link holds one Stream (nbd/stream.py) for every
    request: data (on a plain connection spliced between the NBD socket
    and the client's socket), extents and checksums. So an HTTP
    connection never costs more than one NBD connection (vdsm's qemu-nbd
    allows 8), and never reconnects while it lives, unless the
    connection failed or its owned qemu-nbd was restarted. A proxy
    ticket's link holds the relay's image.

    The handler thread holds the lock while it uses the connection;
    cancel() from another thread closes it only if the link is idle, so an
    NBD handle is never closed under a running request. A busy link is
    interrupted instead (its Interrupt shuts the NBD socket down, and the
    HTTP connection's Context.interrupt its client's socket); the request
    fails, and the handler thread closes the connection.
    """

    def __init__(self, ticket, resource, buffer_size, sock=None,
                 client=None):
        self.ticket = ticket
        # The HTTP connection (server.Context): cancel() interrupts its
        # waits on the client.
        self.client = client
        # nbd/backend.Backend or http/relay.Relay: open_image(), serves(),
        # error, limits().
        self.resource = resource
        self.buffer_size = buffer_size
        # The client's socket, if its connection is plain (no TLS).
        self.sock = sock
        self.image = None
        self.size = None
        self._can_splice = False
        self._lock = threading.Lock()
        self.closed = False
        # Fired by cancel() to stop the NBD I/O of a busy link.
        self.interrupt = nbd_client.Interrupt()
        self.opened = time.monotonic()

    def describe(self):
        """The connection using this link, for the listing of transfers
        (the ticket counts its bytes)."""
        d = self.client.describe() if self.client is not None else {}
        d["seconds"] = time.monotonic() - self.opened
        return d

    def open(self):
        """Connect now, so a missing export fails the first request."""
        with self:
            pass

    def _open_image(self):
        return self.resource.open_image(interrupt=self.interrupt)

    @property
    def splices(self):
        """True if data moves between the image and the client's socket
        without passing through the daemon (no buffer needed)."""
        return self.sock is not None and self._can_splice

    @property
    def limits(self):
        """(max_readers, max_writers) for OPTIONS, or None: the daemon's
        own."""
        return self.resource.limits(self.image)

    @property
    def piece(self):
        """Bytes moved at a time through a buffer (data crossing TLS, or a
        proxy's relay): half the configured buffer size."""
        return piece_size(self.buffer_size)

    def __enter__(self):
        """Hold the link; return its image: the Stream, or the relay's."""
        self._acquire()
        try:
            if self.image is not None and self._stale(self.image):
                self._close_image()
            if self.image is None:
                self.image = self._open_image()
                self.size = self.image.size
                self._can_splice = self.image.can_splice
            return self.image
        except BaseException as e:
            failure = self._release(e)
            if failure is not None:
                raise failure from e
            raise

    def __exit__(self, kind, value, tb):
        failure = self._release(value)
        if failure is not None:
            raise failure from value

    def _stale(self, conn):
        """
        True if conn cannot serve: it broke, or its export is gone (the
        owned qemu-nbd died; the next open starts a new one).
        """
        return not self.resource.serves(conn)

    def _acquire(self):
        self._lock.acquire()
        if self.closed:
            self._lock.release()
            raise errors.TicketCanceled(self.ticket.transfer_id)

    def _release(self, error):
        """
        Release the link after a request ended with error (or None).
        Returns the domain error to raise instead, or None.
        """
        try:
            failure = self._failure(error)
            if self.interrupt.fired:
                # Canceled while busy: nothing here may be used again.
                self._close()
            elif isinstance(error, nbd_client.Error):
                # The NBD connection may be unusable; the next request on
                # this HTTP connection opens a new one.
                self._close_image()
            elif self.image is not None and self._stale(self.image):
                # Interrupted in the middle of a payload.
                self._close_image()
            return failure
        finally:
            self._lock.release()

    def _failure(self, error):
        """
        The domain error for a request that failed with error while
        holding the link, or None to raise error as it is.
        """
        if error is None or isinstance(error, errors.AuthorizationError):
            return None
        if self.interrupt.fired:
            # Whatever broke, the ticket was canceled under it.
            return errors.TransferCanceled(self.ticket.transfer_id)
        cause = detail = error
        if isinstance(error, errors.ExportError):
            # The export could not be reached (Backend.open*): its
            # message says why without the export's address, which
            # libnbd's and the socket layer's messages name.
            cause = error.__cause__
        if (isinstance(cause, nbd_client.Error)
                and cause.errno in CONNECTION_ERRORS):
            reason = self.resource.error
            return errors.ExportFailed(
                f"NBD export of transfer {self.ticket.transfer_id} "
                f"failed: {detail}" + (f" ({reason})" if reason else ""))
        return None

    def cancel(self):
        """Called by the ticket, from another thread, when canceled."""
        if self._lock.acquire(blocking=False):
            try:
                self._close()
            finally:
                self._lock.release()
        else:
            # Busy: stop its NBD I/O, and its wait on the client (a GET
            # whose client stopped reading, a PUT whose client stopped
            # sending); the request fails and releases. Fired first: the
            # woken request sees it and fails as canceled.
            self.interrupt.fire()
            if self.client is not None:
                self.client.interrupt()

    def close(self):
        """Called when the HTTP connection ends."""
        with self._lock:
            self._close()
        self.ticket.remove_context(self)

    def _close(self):
        if not self.closed:
            self.closed = True
            self._close_image()

    def _close_image(self):
        image, self.image = self.image, None
        if image is not None:
            image.close()


def piece_size(buffer_size):
    return max(buffer_size // 2, 4096)


def for_request(req, ticket, buffer_size):
    """Return the connection's link to ticket, opening it on first use."""
    values = req.context.values
    key = ("link", id(ticket))
    lk = values.get(key)
    if lk is not None and lk.ticket is ticket and not lk.closed:
        return lk
    if ticket.resource is None:
        raise errors.ExportError(
            f"Transfer {ticket.transfer_id} has no NBD export")
    # A proxy ticket's relay brings its own size ([backend_http]).
    buffer_size = ticket.resource.buffer_size or buffer_size
    sock = req.context.sock if req.context.plain else None
    lk = Link(ticket, ticket.resource, buffer_size, sock,
              client=req.context)
    # Known to the ticket before connecting, so a cancel interrupts a
    # handshake with a hung export too.
    ticket.add_context(lk)
    try:
        lk.open()
    except BaseException:
        with lk._lock:
            lk._close()
        ticket.remove_context(lk)
        raise
    values[key] = lk
    req.context.on_close(lk.close)
    # Once a ticket is in use, the connection may idle as long as the
    # ticket allows (virt-v2v asks for an hour), and no longer counts
    # against the bound on unauthorized connections.
    req.context.set_timeout(ticket.inactivity_timeout or None)
    req.context.authorized()
    return lk
