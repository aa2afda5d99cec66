"""
GET /transfers/ on the control service: every ticket's status and its
connections, for `ovirt-imageioctl status`.

Upstream's GET /tickets/ answers 400 and stays so; the listing has a path
of its own. It names tickets by transfer id only: no ticket id (a
credential), and no url (a proxy ticket's url holds the daemon's ticket
id). Each connection shows its client (address and port, or the pid on
a unix socket), its service, its age and the bytes it moved for the
ticket, so a reader sampling twice sees each client's rate.
"""

import time

from . import server

# Status fields the listing leaves out: credentials.
HIDDEN = ("uuid", "url")


class Handler:

    name = "transfers"

    def __init__(self, store):
        self.store = store

    def get(self, req, resp, path=""):
        if path:
            raise server.Error(404, "No such resource")
        resp.send_json(listing(self.store))


def listing(store):
    """{"time": seconds since the epoch, "transfers": [...]} sorted by
    transfer id."""
    transfers = []
    for ticket in store.tickets():
        transfers.append(describe(ticket))
    transfers.sort(key=lambda t: t["transfer_id"])
    return {"time": time.time(), "transfers": transfers}


def describe(ticket):
    d = {k: v for k, v in ticket.info().items() if k not in HIDDEN}
    conns = []
    for ctx, nbytes, busy in ticket.stats()["contexts"]:
        c = ctx.describe() if hasattr(ctx, "describe") else {}
        c["bytes"] = nbytes
        c["active"] = busy
        conns.append(c)
    conns.sort(key=lambda c: c.get("connection", 0))
    d["clients"] = conns
    return d
