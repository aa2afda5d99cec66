"""
/info/ on the remote service: webadmin's "Test connection" reads it, and
so does the page (static.py), which links to the CA when one is offered.
"""

from .. import version
from . import cors


class Handler:

    name = "info"

    def __init__(self, ca_url=None):
        self.ca_url = ca_url

    def get(self, req, resp):
        cors.allow(req, resp, "GET")
        body = {"version": version.string}
        if self.ca_url:
            # Only then, so the answer stays upstream's by default.
            body["ca_url"] = self.ca_url
        resp.send_json(body)

    def options(self, req, resp):
        cors.preflight(req, resp, "OPTIONS,GET")
