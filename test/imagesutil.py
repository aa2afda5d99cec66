"""
Helpers of the data plane's tests (images_test, link_test): tickets on
real qemu-nbd exports, keep-alive clients on the unix socket and over
HTTPS, raw sockets. Each test module has its own fixtures.
"""

import http.client
import json
import socket
import ssl

import testutil

MiB = 1024**2

# Small buffers: a few MiB image goes through many pieces of the copy
# loops, and through the zero-skipping path.
BUFFER_SIZE = 256 * 1024

# The daemon of these tests: make_daemon(**DAEMON_CONF).
DAEMON_CONF = {"backend_nbd": {"buffer_size": str(BUFFER_SIZE)},
               "daemon": {"max_connections": "4"}}


def add_ticket(daemon, url, **kw):
    t = {"uuid": "tid-secret", "size": 4 * MiB, "ops": ["read"],
         "timeout": 300, "url": url, "transfer_id": "tr-1"}
    t.update(kw)
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    return t


class Client:
    """
    A keep-alive HTTP client of the daemon: on the local unix socket,
    where data is spliced between the sockets (nbd/stream.py), or over
    HTTPS, where it goes through the copy loops (bodies.py).
    """

    def __init__(self, daemon, transport="unix"):
        if transport == "unix":
            self.conn = testutil.UnixHTTPConnection(daemon.cfg.local.socket)
        else:
            ctx = ssl.create_default_context(cafile=daemon.cfg.tls.ca_file)
            port = daemon.remote.server.address()[1]
            self.conn = http.client.HTTPSConnection(
                "localhost", port, context=ctx)

    def request(self, method, path, body=None, headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        self.conn.request(method, path, body=body, headers=headers or {})
        resp = self.conn.getresponse()
        return resp, resp.read()

    def close(self):
        self.conn.close()


def url(server):
    return f"nbd:unix:{server.socket}"


def image_bytes(path, offset=0, length=None):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length if length is not None else -1)


def raw_client(daemon, transport, rcvbuf=None):
    """A socket to the daemon, TLS over TCP or the unix socket; rcvbuf
    shrinks its receive buffer (before connecting: TCP's window)."""
    if transport == "unix":
        s = socket.socket(socket.AF_UNIX)
    else:
        s = socket.socket(socket.AF_INET)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(30)
    if transport == "unix":
        s.connect(daemon.cfg.local.socket)
        return s
    s.connect(("localhost", daemon.remote.server.address()[1]))
    ctx = ssl.create_default_context(cafile=daemon.cfg.tls.ca_file)
    return ctx.wrap_socket(s, server_hostname="localhost")


def wait_until_stalled(daemon, ticket_id="tid-secret"):
    """Poll until the ticket's transfer makes no progress between two
    polls: its thread is blocked on the client."""
    last = [None]

    def stalled():
        info = daemon.api.get(ticket_id)
        now = (info["active"], info["transferred"])
        done = now[0] and now == last[0]
        last[0] = now
        return done

    testutil.wait_for(stalled, interval=0.2, message="transfer stalled")
