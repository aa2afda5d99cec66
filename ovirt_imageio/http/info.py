"""/info/ on the remote service: webadmin's "Test connection" reads it."""

from .. import version
from . import cors


class Handler:

    name = "info"

    def get(self, req, resp):
        cors.allow(req, resp, "GET")
        resp.send_json({"version": version.string})
