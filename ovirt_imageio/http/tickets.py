"""
The control API: /tickets/{id} on the control socket (vdsm, the engine).

Each call is one small JSON message. Messages and statuses are upstream's
(API.md section 2), since vdsm and the engine report them to users.
"""

import json
import logging

from .. import tickets
from . import server

log = logging.getLogger("tickets")


class Handler:

    name = "tickets"

    def __init__(self, store, export=None):
        """
        store: the tickets.Store.
        export: called with a new Ticket before it is added; returns what
            serves its bytes (closed when the ticket goes), or None.
        """
        self.store = store
        self.export = export

    def get(self, req, resp, ticket_id):
        _require_id(ticket_id)
        ticket = self.store.lookup(ticket_id)
        if ticket is None:
            raise server.Error(404, f"No such ticket {ticket_id!r}")
        req.transfer_id = ticket.transfer_id
        resp.send_json(ticket.info())

    def put(self, req, resp, ticket_id):
        _require_id(ticket_id)
        info = _read_json(req, "Ticket is not in a json format")
        # The ticket is stored under its uuid; the path id is ignored, as
        # upstream does.
        ticket = self.store.create(info)
        req.transfer_id = ticket.transfer_id
        if self.export is not None:
            ticket.resource = self.export(ticket)
        self.store.add(ticket)

    def patch(self, req, resp, ticket_id):
        _require_id(ticket_id)
        patch = _read_json(req, "Invalid patch")
        if not isinstance(patch, dict):
            raise server.Error(400, "Invalid patch: expecting a JSON object")
        if "timeout" not in patch:
            raise server.Error(400, "Missing required value for 'timeout'")
        timeout = patch["timeout"]
        if not isinstance(timeout, int) or isinstance(timeout, bool):
            raise server.Error(400, f"Integer required {timeout!r}")
        if timeout < 0:
            raise server.Error(400, f"Invalid value {timeout} < 0")
        if timeout > tickets.MAX_TIMEOUT:
            raise server.Error(
                400, f"Invalid value {timeout} > {tickets.MAX_TIMEOUT}")
        ticket = self.store.lookup(ticket_id)
        if ticket is None:
            raise server.Error(404, f"No such ticket: {ticket_id}")
        req.transfer_id = ticket.transfer_id
        log.info("Extending transfer=%s timeout=%s",
                 ticket.transfer_id, timeout)
        ticket.extend(timeout)

    def delete(self, req, resp, ticket_id):
        if ticket_id:
            ticket = self.store.lookup(ticket_id)
            if ticket is not None:
                req.transfer_id = ticket.transfer_id
            self.store.remove(ticket_id)
        else:
            log.info("Removing all tickets")
            self.store.clear()
        resp.status = 204


def _require_id(ticket_id):
    if not ticket_id:
        raise server.Error(400, "Ticket id is required")


def _read_json(req, what):
    data = req.read_message()
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as e:
        # RecursionError: a body nested deeper than the parser goes.
        if isinstance(e, RecursionError):
            e = "nested too deeply"
        raise server.Error(400, f"{what}: {e}")


class ProfileHandler:
    """/profile/: upstream's profiler control; we ship no profiler."""

    name = "profile"

    def get(self, req, resp):
        raise server.Error(404, "yappi is not installed")

    post = get
