"""
The HTTP connection layer (ovirt_imageio/http/server.py): framing, when a
connection is closed, deadlines and bounds that keep one client from
stopping the daemon serving anyone.
"""

import http.client
import os
import re
import signal
import socket
import ssl

import pytest

import testutil

KiB = 1024
MiB = 1024**2

# nbdkit advertises this maximum block size (blocksize-policy filter), so
# the daemon's NBD writes, and the body bytes it consumes before a write's
# error reply is read, come in pieces of this size.
PIECE = 64 * KiB

VICTIM_ID = "victim-secret"
FAILING_ID = "failing-secret"


def add_ticket(api, ticket_id, url, size=64 * MiB, ops=("write",)):
    t = {"uuid": ticket_id, "size": size, "ops": list(ops), "timeout": 300,
         "url": url, "transfer_id": f"tr-{ticket_id[:6]}"}
    resp, data = api.put(t)
    assert resp.status == 200, data
    return t


def hidden_put(ticket_id):
    """A request to another ticket, smuggled in a body."""
    return (f"PUT /images/{ticket_id} HTTP/1.1\r\n"
            f"content-range: bytes 0-4/*\r\n"
            f"content-length: 5\r\n\r\nEVIL!").encode()


def crafted_body(length, ticket_id=VICTIM_ID):
    """
    A body with the hidden PUT at every PIECE boundary: wherever the
    daemon stops consuming whole pieces, the next bytes are a request.
    """
    hidden = hidden_put(ticket_id)
    piece = hidden + b"\r\n" * ((PIECE - len(hidden)) // 2)
    piece += b"x" * (PIECE - len(piece))
    return piece * (length // PIECE)


def statuses(reply):
    """The status codes of every response in reply."""
    return [int(m) for m in re.findall(rb"^HTTP/1\.1 (\d{3}) ", reply,
                                       re.MULTILINE)]


def send(sock, data):
    """Send data; the server may close before taking all of it."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def read_until_eof(sock):
    """Everything the server sends until it closes (the socket's timeout
    fails the test if it never does)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def connect(daemon, transport, port=None):
    if transport == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(daemon.cfg.local.socket)
        return s
    ctx = ssl.create_default_context(cafile=daemon.cfg.tls.ca_file)
    port = port or daemon.remote.server.address()[1]
    raw = socket.create_connection(("localhost", port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def put_head(ticket_id, length):
    return (f"PUT /images/{ticket_id}?flush=n HTTP/1.1\r\n"
            f"content-length: {length}\r\n\r\n").encode()


@pytest.fixture
def victim(make_image):
    """The image another ticket serves; a hidden request must not touch
    it."""
    return make_image(name="victim", size=MiB, commands=["write -P 0x56 0 1M"])


def victim_bytes(path):
    with open(path, "rb") as f:
        return f.read(5)


def failing_export(nbdkit, errno_name):
    """nbdkit failing every write with errno_name, in PIECE requests."""
    return nbdkit(
        "memory", "size=64M", f"error-pwrite={errno_name}",
        "error-pwrite-rate=100%", f"blocksize-maximum={PIECE}",
        filters=["blocksize-policy", "error"])


# A failed upload never executes the rest of its body as requests.

@pytest.mark.parametrize("transport", ["unix", "https"])
@pytest.mark.parametrize("errno_name", ["ENOSPC", "EIO"])
def test_put_nbd_error_closes(make_daemon, nbdkit, qemu_nbd, victim,
                              transport, errno_name):
    daemon = make_daemon()
    srv = failing_export(nbdkit, errno_name)
    add_ticket(daemon.api, FAILING_ID, f"nbd:unix:{srv.socket}")
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    # The daemon reads a write's error reply only after more writes are
    # in flight; what is left of the body then fits the lingering close.
    body = crafted_body(2 * MiB)
    with connect(daemon, transport) as s:
        send(s, put_head(FAILING_ID, len(body)) + body)
        reply = read_until_eof(s)
    assert statuses(reply) == [500], reply[:300]
    assert b"connection: close" in reply
    assert victim_bytes(victim) == b"VVVVV"


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_put_qemu_nbd_killed_closes(make_daemon, qemu_nbd, make_image,
                                    victim, pid_alive, transport):
    # Small TLS pieces: the first one fails, most of the body is unread.
    daemon = make_daemon(backend_nbd={"buffer_size": str(2 * PIECE)})
    target = qemu_nbd(make_image(name="target", size=64 * MiB))
    add_ticket(daemon.api, FAILING_ID, f"nbd:unix:{target.socket}")
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    body = crafted_body(MiB)
    with connect(daemon, transport) as s:
        s.sendall(put_head(FAILING_ID, len(body)))
        # The handler waits for the body, its NBD connection open.
        testutil.wait_for(lambda: daemon.api.get(FAILING_ID)["active"],
                          message="PUT in flight")
        os.kill(target.pid, signal.SIGKILL)
        testutil.wait_for(lambda: not pid_alive(target.pid),
                          message="qemu-nbd dead")
        send(s, body)
        reply = read_until_eof(s)
    assert statuses(reply) == [500], reply[:300]
    assert b"connection: close" in reply
    assert victim_bytes(victim) == b"VVVVV"


def test_put_daemon_stopping_closes(make_daemon, make_image, victim):
    daemon = make_daemon()
    target = make_image(name="target", size=64 * MiB)
    add_ticket(daemon.api, FAILING_ID, f"file://{target}")
    add_ticket(daemon.api, VICTIM_ID, f"file://{victim}", size=MiB)
    body = crafted_body(2 * MiB)
    with connect(daemon, "unix") as s:
        s.sendall(put_head(FAILING_ID, len(body)))
        testutil.wait_for(lambda: daemon.api.get(FAILING_ID)["active"],
                          message="PUT in flight")
        # Stops the services, cancels the tickets, stops their qemu-nbd.
        daemon.stop()
        send(s, body)
        reply = read_until_eof(s)
    assert len(statuses(reply)) == 1, reply[:300]
    assert statuses(reply)[0] >= 400
    assert b"connection: close" in reply
    assert victim_bytes(victim) == b"VVVVV"


def test_put_via_proxy_nbd_error_closes(make_daemon, make_proxy, nbdkit,
                                        qemu_nbd, victim, proxy_pki):
    # The proxy relays to the daemon's unix socket (same host): the
    # daemon must not run the rest of the relayed body either.
    daemon = make_daemon()
    # Small pieces: the proxy is still relaying the body when the daemon
    # fails.
    proxy = make_proxy(backend_http={"buffer_size": str(2 * PIECE)})
    srv = failing_export(nbdkit, "ENOSPC")
    add_ticket(daemon.api, FAILING_ID, f"nbd:unix:{srv.socket}")
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    port = daemon.remote.server.address()[1]
    add_ticket(proxy.api, FAILING_ID,
               f"https://localhost:{port}/images/{FAILING_ID}")
    add_ticket(proxy.api, VICTIM_ID,
               f"https://localhost:{port}/images/{VICTIM_ID}", size=MiB)
    body = crafted_body(2 * MiB)
    ctx = ssl.create_default_context(cafile=proxy_pki["ca_file"])
    proxy_port = proxy.remote.server.address()[1]
    with socket.create_connection(("localhost", proxy_port),
                                  timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        send(s, put_head(FAILING_ID, len(body)) + body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        resp.read()
        assert resp.status == 500
        # The proxy read the whole body before answering: the connection
        # may stay, in step with the client.
        if not resp.will_close:
            send(s, b"OPTIONS /images/* HTTP/1.1\r\n"
                    b"connection: close\r\n\r\n")
        reply = read_until_eof(s)
    assert statuses(reply) == ([] if resp.will_close else [200])
    # The daemon's connection from the proxy (its unix socket) did not run
    # the rest of the relayed body.
    assert victim_bytes(victim) == b"VVVVV"
