"""
Domain errors: what went wrong, in the domain's terms.

The HTTP layer maps these to status codes in one place; nothing below it
knows about HTTP. Messages are the ones upstream ovirt-imageio sends, since
clients log and pass them on.
"""


class Error(Exception):
    """Base of every domain error; str() is the client-facing message."""

    msg = "{self.reason}"

    def __init__(self, reason=""):
        self.reason = reason

    def __str__(self):
        return self.msg.format(self=self)


class InvalidTicket(Error):
    msg = "Invalid ticket: {self.reason}"


class AuthorizationError(Error):
    msg = "You are not allowed to access this resource: {self.reason}"


class NoSuchTicket(AuthorizationError):
    def __init__(self, ticket_id):
        # The id is a credential, but the client sent it, and upstream
        # echoes it back; it is never logged.
        super().__init__(f"No such ticket {ticket_id}")


class TicketCanceled(AuthorizationError):
    def __init__(self, transfer_id):
        super().__init__(f"Transfer={transfer_id} was canceled")


class TicketExpired(AuthorizationError):
    def __init__(self, transfer_id):
        super().__init__(f"Transfer={transfer_id} expired")


class OperationForbidden(AuthorizationError):
    def __init__(self, transfer_id, op):
        super().__init__(f"Transfer={transfer_id} forbids {op}")


class TransferCanceled(AuthorizationError):
    """An operation in flight was stopped because its ticket was canceled."""

    def __init__(self, transfer_id):
        super().__init__(f"Transfer {transfer_id} was canceled")


class OutOfRange(Error):
    """A request reaches past the ticket or the image."""

    def __init__(self, reason, size):
        super().__init__(reason)
        self.size = size


class Unsupported(Error):
    msg = "Operation not supported: {self.reason}"


class CancelTimeout(Error):
    msg = "Timeout cancelling transfer {self.reason}"


class ExportError(Error):
    """An NBD export for a ticket could not be started or reached."""


class ExportFailed(ExportError):
    """
    The NBD export stopped answering or went away during a request: the
    request's state is unknown, so its connection is closed.
    """


class PeerError(Error):
    """
    An imageio server we talk to (the daemon behind a proxy) answered with
    an HTTP error. The proxy passes status and message on unchanged.
    """

    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status = status
        # Headers that belong with the status, e.g. 416's Content-Range.
        self.headers = headers or {}
