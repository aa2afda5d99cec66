"""
/images/{ticket}/checksum and /images/{ticket}/checksum/algorithms.

The checksum is computed here, over the ticket's NBD export, with the
block hash construction upstream's client also computes locally, so the
SDK's checksum_disk.py can compare the two. It is a ticket operation:
it touches the ticket, counts in `transferred`, and stops when the ticket
is canceled. Zero extents are never read.
"""

from .. import checksum
from .. import errors
from . import cors
from . import params
from . import server


class AlgorithmsHandler:

    name = "algorithms"

    def get(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        # No ticket needed: any id, even an empty one.
        resp.send_json({"algorithms": checksum.ALGORITHMS})

    def options(self, req, resp, ticket_id):
        cors.preflight(req, resp, "OPTIONS,GET")


class Handler:

    name = "checksum"

    def __init__(self, images_handler):
        self.images = images_handler

    def get(self, req, resp, ticket_id):
        cors.allow(req, resp, "*")
        params.require_id(ticket_id)
        algorithm, block_size = checksum.validate(
            req.query.get("algorithm"), req.query.get("block_size"))
        try:
            ticket = self.images._authorize(req, ticket_id, "read")
        except errors.AuthorizationError as e:
            # Unlike the other data requests, upstream keeps the
            # connection open here.
            raise server.Error(403, str(e))
        lk = self.images._link(req, ticket)
        with ticket.operation(0, "checksum", lk) as op, lk as image:
            result = checksum.compute(
                image, algorithm=algorithm, block_size=block_size,
                progress=op.done)
        resp.send_json(result)

    def options(self, req, resp, ticket_id):
        cors.preflight(req, resp, "OPTIONS,GET")
