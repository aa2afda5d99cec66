"""
The HTTP connection layer (ovirt_imageio/http/server.py): framing, when a
connection is closed, deadlines and bounds that keep one client from
stopping the daemon serving anyone.
"""

import http.client
import itertools
import logging
import os
import re
import resource
import select
import signal
import socket
import ssl
import time

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
    except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError):
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


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_put_daemon_stopping_closes(make_daemon, make_image, victim,
                                    transport):
    daemon = make_daemon(backend_nbd={"buffer_size": str(2 * PIECE)})
    target = make_image(name="target", size=64 * MiB)
    add_ticket(daemon.api, FAILING_ID, f"file://{target}")
    add_ticket(daemon.api, VICTIM_ID, f"file://{victim}", size=MiB)
    body = crafted_body(MiB)
    with connect(daemon, transport) as s:
        send(s, put_head(FAILING_ID, len(body)))
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


PROXY_FAULTS = ["ENOSPC", "EIO", "qemu-nbd-killed", "daemon-stopping",
                "proxy-stopping"]


@pytest.mark.parametrize("fault", PROXY_FAULTS)
def test_put_via_proxy_fault(make_daemon, make_proxy, nbdkit, qemu_nbd,
                             make_image, victim, proxy_pki, pid_alive,
                             fault):
    # The proxy relays to the daemon's unix socket (same host): neither
    # the proxy nor the daemon may run the rest of the relayed body.
    daemon = make_daemon(backend_nbd={"buffer_size": str(2 * PIECE)})
    # Small pieces: the proxy is still relaying the body when the daemon
    # fails.
    proxy = make_proxy(backend_http={"buffer_size": str(2 * PIECE)})
    if fault in ("ENOSPC", "EIO"):
        url = f"nbd:unix:{failing_export(nbdkit, fault).socket}"
        body = crafted_body(2 * MiB)
    else:
        target = qemu_nbd(make_image(name="target", size=64 * MiB))
        url = f"nbd:unix:{target.socket}"
        body = crafted_body(MiB)
    add_ticket(daemon.api, FAILING_ID, url)
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    port = daemon.remote.server.address()[1]
    add_ticket(proxy.api, FAILING_ID,
               f"https://localhost:{port}/images/{FAILING_ID}")
    add_ticket(proxy.api, VICTIM_ID,
               f"https://localhost:{port}/images/{VICTIM_ID}", size=MiB)
    ctx = ssl.create_default_context(cafile=proxy_pki["ca_file"])
    proxy_port = proxy.remote.server.address()[1]
    with socket.create_connection(("localhost", proxy_port),
                                  timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        if fault in ("ENOSPC", "EIO"):
            send(s, put_head(FAILING_ID, len(body)) + body)
        else:
            send(s, put_head(FAILING_ID, len(body)))
            testutil.wait_for(
                lambda: daemon.api.get(FAILING_ID)["active"],
                message="PUT relayed to the daemon")
            if fault == "qemu-nbd-killed":
                os.kill(target.pid, signal.SIGKILL)
                testutil.wait_for(lambda: not pid_alive(target.pid),
                                  message="qemu-nbd dead")
            elif fault == "daemon-stopping":
                daemon.stop()
            else:
                proxy.stop()
            send(s, body)
        resp = http.client.HTTPResponse(s)
        resp.begin()
        resp.read()
        assert resp.status >= 400
        # If the proxy read the whole body before answering, the
        # connection may stay, in step with the client.
        if not resp.will_close:
            send(s, b"OPTIONS /images/* HTTP/1.1\r\n"
                    b"connection: close\r\n\r\n")
        reply = read_until_eof(s)
    assert statuses(reply) == ([] if resp.will_close else [200])
    # The daemon's connection from the proxy (its unix socket) did not run
    # the rest of the relayed body.
    assert victim_bytes(victim) == b"VVVVV"


# Deadlines: one client cannot hold a connection (a thread, an fd) forever
# by trickling bytes.

# What tests wait for at most: far above the short deadlines they set.
TEST_TIMEOUT = 15


def closed_while_trickling(sock, data, timeout=TEST_TIMEOUT):
    """
    Send data one byte at a time, waiting up to 50 ms for the server
    after each, and keep going (cycling) until the server closes the
    connection. Return True if it did within timeout seconds.
    """
    deadline = time.monotonic() + timeout
    sock.settimeout(0)
    for byte in itertools.cycle(data):
        if time.monotonic() > deadline:
            return False
        try:
            sock.send(bytes([byte]))
        except (ssl.SSLWantWriteError, BlockingIOError):
            pass
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            return True
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            try:
                if not sock.recv(4096):
                    return True
            except (ssl.SSLWantReadError, BlockingIOError):
                # TLS records that are not data (session tickets).
                pass
            except (ConnectionResetError, ssl.SSLError):
                return True


def client_hello():
    """The bytes of a TLS ClientHello."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


@pytest.fixture
def short_deadlines(make_daemon):
    return make_daemon(daemon={"handshake_timeout": "1",
                               "header_timeout": "1"})


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_header_deadline(short_deadlines, transport, caplog):
    caplog.set_level(logging.INFO)
    with connect(short_deadlines, transport) as s:
        s.sendall(b"OPTIONS /images/* HTTP/1.1\r\n")
        assert closed_while_trickling(s, b"x-trickle: aaaaaaaaaa\r\n")
    testutil.wait_for(
        lambda: "request headers not received in 1.0 seconds"
                in caplog.text, message="deadline logged")


def test_handshake_deadline(short_deadlines, caplog):
    caplog.set_level(logging.INFO)
    port = short_deadlines.remote.server.address()[1]
    with socket.create_connection(("localhost", port), timeout=10) as s:
        assert closed_while_trickling(s, client_hello())
    testutil.wait_for(
        lambda: "TLS handshake not received in 1.0 seconds" in caplog.text,
        message="deadline logged")


def test_header_deadline_control(short_deadlines):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(short_deadlines.cfg.control.socket)
        s.sendall(b"GET /tickets/x HTTP/1.1\r\n")
        assert closed_while_trickling(s, b"x-trickle: aaaaaaaaaa\r\n")


def get_range(sock, ticket_id, first=0, last=0):
    """One keep-alive GET on a raw socket; return the response."""
    sock.sendall(f"GET /images/{ticket_id} HTTP/1.1\r\n"
                 f"range: bytes={first}-{last}\r\n\r\n".encode())
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.data = resp.read()
    return resp


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_idle_keepalive_outlives_header_deadline(short_deadlines, qemu_nbd,
                                                 victim, transport):
    # Clients leave worker connections idle between requests; only a
    # request once begun has a deadline.
    daemon = short_deadlines
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    with connect(daemon, transport) as idle, \
            connect(daemon, transport) as trickler:
        assert get_range(idle, VICTIM_ID).status == 206
        # Closed by its deadline, so the idle connection has idled longer
        # than a header deadline by then.
        trickler.sendall(b"OPTIONS /images/* HTTP/1.1\r\n")
        assert closed_while_trickling(trickler, b"x-trickle: aaaaaa\r\n")
        resp = get_range(idle, VICTIM_ID, 0, 4)
        assert (resp.status, resp.data) == (206, b"VVVVV")


def unauthorized(service):
    return service.server.unauthorized_connections()


def test_unauthorized_bound(make_daemon, qemu_nbd, victim, caplog):
    daemon = make_daemon(daemon={"max_unauthorized_connections": "4"})
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    sockets = []

    def idle_connection():
        s = connect(daemon, "unix")
        sockets.append(s)
        return s

    try:
        authorized = idle_connection()
        assert get_range(authorized, VICTIM_ID).status == 206
        testutil.wait_for(lambda: unauthorized(daemon.local) == 0,
                          message="connection authorized")
        oldest = []
        for i in range(4):
            oldest.append(idle_connection())
            testutil.wait_for(lambda: unauthorized(daemon.local) == i + 1,
                              message="connection accepted")
        # One more: the oldest unauthorized connection is closed.
        newest = idle_connection()
        assert oldest[0].recv(1) == b""
        testutil.wait_for(
            lambda: "Too many unauthorized connections on local (limit 4)"
                    in caplog.text, message="eviction logged")
        assert unauthorized(daemon.local) == 4
        # A flood of unauthorized connections: each closes an older one.
        for _ in range(20):
            idle_connection()
        testutil.wait_for(lambda: unauthorized(daemon.local) == 4,
                          message="bound kept")
        for s in oldest[1:] + [newest]:
            assert s.recv(1) == b""
        # The authorized connection is served during the attack, and a
        # new client can still connect and authorize.
        resp = get_range(authorized, VICTIM_ID, 0, 4)
        assert (resp.status, resp.data) == (206, b"VVVVV")
        with connect(daemon, "unix") as fresh:
            resp = get_range(fresh, VICTIM_ID, 0, 4)
            assert (resp.status, resp.data) == (206, b"VVVVV")
    finally:
        for s in sockets:
            s.close()


# Out of file descriptors.

def cpu_seconds(pid):
    """User and system CPU time of a process, all threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(path, text):
    with open(path) as f:
        return [line for line in f if text in line]


def test_out_of_fds(tmp_path, pki):
    # A daemon that may open this many files: the test's connections
    # take the rest, and accept() fails with EMFILE.
    limit = 64

    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    d = testutil.DaemonProcess(
        tmp_path, pki, preexec_fn=lower_limit,
        daemon={"max_unauthorized_connections": "1000"})
    sockets = []
    try:
        d.wait_ready()
        path = d.conf["local"]["socket"]
        for _ in range(limit):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(path)
            sockets.append(s)
        testutil.wait_for(lambda: log_lines(d.log, "Cannot accept"),
                          message="out of fds logged")
        # Measured over a second at the fd limit: a loop retrying accept()
        # takes a whole core; backing off, a few milliseconds.
        cpu = cpu_seconds(d.proc.pid)
        start = time.monotonic()
        testutil.wait_for(lambda: time.monotonic() - start >= 1.0,
                          message="measurement")
        assert cpu_seconds(d.proc.pid) - cpu < 0.3
        assert len(log_lines(d.log, "Cannot accept")) == 1
        # Once fds are free, the daemon serves again.
        for s in sockets:
            s.close()
        sockets = []

        def serving():
            try:
                reply = testutil.raw_request(
                    path, b"OPTIONS /images/* HTTP/1.1\r\n\r\n", timeout=2)
            except OSError:
                return False
            return reply.startswith(b"HTTP/1.1 200 ")

        testutil.wait_for(serving, message="serving again")
        assert log_lines(d.log, "Accepting connections again")
    finally:
        for s in sockets:
            s.close()
        d.stop()


# Framing and logging of malformed requests.

@pytest.mark.parametrize("request_line", [
    b"/images/tid-secret /images/tid-secret HTTP/1.1",
    b"/images/tid-secret HTTP/1.1",
    b"/images/tid-secret",
    b"GET /images/tid-secret HTTP/1.1 extra",
    b"GET /images/tid-secret HTTP/9.9",
    b"GET\x00/images/tid-secret HTTP/1.1",
], ids=["method-is-path", "two-words", "one-word", "four-words",
        "bad-version", "nul"])
def test_request_line_never_logged(make_daemon, caplog, request_line):
    caplog.set_level(logging.DEBUG)
    daemon = make_daemon()
    reply = testutil.raw_request(daemon.cfg.local.socket,
                                 request_line + b"\r\n\r\n")
    assert statuses(reply)[0] >= 400
    testutil.wait_for(lambda: "CLOSE connection=" in caplog.text,
                      message="connection closed")
    assert "tid-secret" not in caplog.text


def test_curl_method_token_never_logged(make_daemon, caplog):
    # curl -X /images/<id>: the ticket id in the method token.
    import subprocess
    caplog.set_level(logging.DEBUG)
    daemon = make_daemon()
    r = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
         "--unix-socket", daemon.cfg.local.socket, "-X",
         "/images/tid-secret", "http://localhost/images/tid-secret"],
        capture_output=True, text=True, timeout=30)
    assert r.stdout == "405"
    testutil.wait_for(lambda: "status=405" in caplog.text,
                      message="request logged")
    assert "tid-secret" not in caplog.text


@pytest.mark.parametrize("headers", [
    b"content-length: +10\r\n",
    b"content-length: 1_0\r\n",
    b"content-length: 0x0a\r\n",
    b"content-length: 10, 10\r\n",
    b"content-length: 10\r\ncontent-length: 11\r\n",
    b"content-length: 10\r\ncontent-length: 10\r\n",
    b"content-length: \xd9\xa1\xd9\xa0\r\n",
    b"content-length:\r\n 10\r\n",
    b"content-length: 10\r\ntransfer-encoding: chunked\r\n",
], ids=["plus", "underscore", "hex", "list", "two-values", "two-headers",
        "unicode-digits", "folded", "with-chunked"])
def test_bad_content_length(make_daemon, headers):
    daemon = make_daemon()
    body = b"0123456789"
    reply = testutil.raw_request(
        daemon.cfg.local.socket,
        b"PUT /images/x HTTP/1.1\r\n" + headers + b"\r\n" + body +
        b"OPTIONS /images/* HTTP/1.1\r\n\r\n")
    # One answer, and the connection closed: nothing after it is read as
    # a request.
    assert statuses(reply) == [400], reply
    assert b"connection: close" in reply


def test_content_length_optional_whitespace(make_daemon):
    # Whitespace around a field value is not part of it (RFC 9112 5.1).
    daemon = make_daemon()
    reply = testutil.raw_request(
        daemon.cfg.local.socket,
        b"PATCH /images/x HTTP/1.1\r\ncontent-length: \t2 \t\r\n\r\n{}"
        b"OPTIONS /images/* HTTP/1.1\r\n\r\n")
    assert statuses(reply) == [400, 200]
    assert b"Missing required value for op" in reply


@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_old_tls_gets_alert(make_daemon, version):
    daemon = make_daemon()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version = ctx.maximum_version = getattr(
        ssl.TLSVersion, version)
    port = daemon.remote.server.address()[1]
    with socket.create_connection(("localhost", port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError) as e:
            ctx.wrap_socket(raw, server_hostname="localhost")
    # The server's protocol_version alert, not an unexplained EOF.
    assert "alert protocol version" in str(e.value) or \
        "UNSUPPORTED_PROTOCOL" in str(e.value), e.value
    assert not isinstance(e.value, ssl.SSLEOFError)


# Transfer-Encoding: chunked (browsers streaming a body send it): a clear
# 400 and the connection closed, on every service and the proxy; the
# chunk stream is never parsed as requests.

def chunked(data):
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


@pytest.fixture
def chunk_setup(make_daemon, make_proxy, qemu_nbd, victim):
    daemon = make_daemon()
    proxy = make_proxy()
    add_ticket(daemon.api, VICTIM_ID, f"nbd:unix:{qemu_nbd(victim).socket}",
               size=MiB)
    port = daemon.remote.server.address()[1]
    add_ticket(proxy.api, VICTIM_ID,
               f"https://localhost:{port}/images/{VICTIM_ID}", size=MiB)
    return daemon, proxy


def chunk_connection(daemon, proxy, service, pki, proxy_pki):
    if service == "local":
        return connect(daemon, "unix")
    if service == "control":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(30)
        s.connect(daemon.cfg.control.socket)
        return s
    if service == "remote":
        return connect(daemon, "https")
    ctx = ssl.create_default_context(cafile=proxy_pki["ca_file"])
    raw = socket.create_connection(
        ("localhost", proxy.remote.server.address()[1]), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


@pytest.mark.parametrize("service", ["local", "remote", "control", "proxy"])
@pytest.mark.parametrize("expect", [False, True], ids=["plain", "expect"])
def test_chunked_refused(chunk_setup, pki, proxy_pki, victim, service,
                         expect):
    daemon, proxy = chunk_setup
    path = (f"/tickets/{VICTIM_ID}" if service == "control"
            else f"/images/{VICTIM_ID}")
    head = f"PUT {path} HTTP/1.1\r\ntransfer-encoding: chunked\r\n"
    if expect:
        head += "expect: 100-continue\r\n"
    # A hidden request in a chunk, and one after the chunk stream.
    body = chunked(hidden_put(VICTIM_ID)) + hidden_put(VICTIM_ID)
    with chunk_connection(daemon, proxy, service, pki, proxy_pki) as s:
        send(s, head.encode() + b"\r\n" + body)
        reply = read_until_eof(s)
    # No 100 Continue for a body that is refused unread.
    assert statuses(reply) == [400], reply
    assert b"connection: close" in reply
    assert reply.endswith(
        b"Transfer-Encoding is not supported, send Content-Length\n")
    assert victim_bytes(victim) == b"VVVVV"


@pytest.mark.parametrize("service", ["local", "remote", "proxy"])
def test_curl_chunked_upload(chunk_setup, pki, proxy_pki, victim, service):
    import subprocess
    daemon, proxy = chunk_setup
    if service == "local":
        args = ["--unix-socket", daemon.cfg.local.socket,
                f"http://localhost/images/{VICTIM_ID}"]
    elif service == "remote":
        port = daemon.remote.server.address()[1]
        args = ["--cacert", pki["ca_file"],
                f"https://localhost:{port}/images/{VICTIM_ID}"]
    else:
        port = proxy.remote.server.address()[1]
        args = ["--cacert", proxy_pki["ca_file"],
                f"https://localhost:{port}/images/{VICTIM_ID}"]
    r = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-T", "-",
         "-H", "Transfer-Encoding: chunked", *args],
        input=b"x" * (2 * MiB), capture_output=True, timeout=60)
    out = r.stdout.decode()
    assert out.endswith("\n400"), (out, r.stderr)
    assert "Transfer-Encoding is not supported" in out
    assert victim_bytes(victim) == b"VVVVV"


# The rule is structural: any handler that takes the body from the socket
# and does not say it received all of it gets its connection closed.

class TakesBody:
    name = "takes"

    def __init__(self, receive_all):
        self.receive_all = receive_all

    def put(self, req, resp):
        req.take_body()
        if self.receive_all:
            # As if it had moved the rest from the socket itself.
            req.context.sock.recv(req.remaining, socket.MSG_WAITALL)
            req.body_received()
        resp.send_text("ok", 200)


@pytest.mark.parametrize("receive_all,expected", [
    (False, [200]),
    (True, [200, 200]),
], ids=["taken-not-received", "received"])
def test_taken_body_counts_unread(sock_dir, receive_all, expected):
    from ovirt_imageio.http import router
    from ovirt_imageio.http import server
    path = os.path.join(sock_dir, "sock")
    srv = server.UnixServer("test", path, router.Router(
        [(r"/takes", TakesBody(receive_all))]))
    service = server.Service(srv)
    service.start()
    try:
        # More than the connection buffers: most of it is on the socket.
        body = b"x" * (64 * KiB)
        request = b"PUT /takes HTTP/1.1\r\ncontent-length: %d\r\n\r\n" % (
            len(body))
        reply = testutil.raw_request(path, request + body + request + body)
    finally:
        service.stop()
    assert statuses(reply) == expected


# Where a request's body ends: a header line the parser cannot read must
# not make the body the next request (RFC 9112 sections 5.1, 6.3).

# Bytes of a second request inside the first one's body.
INNER = b"OPTIONS /images/* HTTP/1.1\r\n\r\n"


@pytest.mark.parametrize("header", [
    b"Content-Length : %d",
    b"X-No-Colon\r\nContent-Length: %d",
    b" folded: x\r\nContent-Length: %d",
    b": no-name\r\nContent-Length: %d",
    b"X-A: 1\r\rContent-Length: %d",
    b"Range: by\r\n folded\r\n\r\x8d\n x\nContent-Length: %d",
], ids=["space-before-colon", "no-colon", "first-line-folded", "no-name",
        "bare-cr", "bare-cr-after-fold"])
def test_unreadable_header_line(daemon, header):
    body = INNER
    request = (b"PATCH /images/x HTTP/1.1\r\n" + header % len(body) +
               b"\r\n\r\n" + body)
    reply = testutil.raw_request(daemon.cfg.local.socket, request)
    # One answer, 400, and the connection closed: the body was never
    # served as a request.
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert b"connection: close" in reply


@pytest.mark.parametrize("lengths", [
    (b"0", b"%d"),
    (b"%d", b"0"),
    (b"%d", b"%d0"),
], ids=["zero-first", "zero-last", "longer-last"])
def test_conflicting_content_lengths(daemon, lengths):
    # RFC 9112 6.3: Content-Length values that differ are invalid framing;
    # taking either one serves a body or the next request wrongly.
    body = INNER
    first, second = (v % len(body) if b"%" in v else v for v in lengths)
    request = (b"PATCH /images/x HTTP/1.1\r\nContent-Length: " + first +
               b"\r\nContent-Length: " + second + b"\r\n\r\n" + body)
    reply = testutil.raw_request(daemon.cfg.local.socket, request)
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:200]
    assert reply.count(b"HTTP/1.1 ") == 1, reply
    assert b"connection: close" in reply
