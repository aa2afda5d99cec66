"""
Fixtures for client tests.

    stub_server   factory: stub_server(handler) starts an HTTP/1.1 server on
                  127.0.0.1 whose every request is answered by
                  handler(request) -> Response; records the requests.
                  For what our daemon never does: legacy answers, broken
                  responses, closing idle connections. The response type
                  is stub_server.Response.
    make_daemon   in-process daemons, as test/http/conftest.py's (whose
                  fixtures are not visible here)
    client_daemon an in-process daemon with 1 MiB buffers and 4
                  connections per ticket
    make_block_device
                  factory: make_block_device(size, pattern) -> a loop
                  device of size bytes, every byte pattern (old data);
                  detached at teardown; skips if losetup cannot attach
    glance        a real glance-api on loopback (test/glance.py), one for
                  the session, with a token-checking filter (real 401s)
"""

import dataclasses
import http.server
import threading

import pytest


MiB = 1024**2


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclasses.dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict = dataclasses.field(default_factory=dict)
    # Close the connection after the response, without telling the client
    # (no Connection: close header), like a server whose idle timeout hit.
    drop: bool = False
    # Send fewer body bytes than Content-Length says, then close.
    truncate: int | None = None
    # Close the connection without answering at all.
    hang_up: bool = False


class StubServer:

    def __init__(self, handler):
        self.handler = handler
        self.requests = []
        self.connections = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self):
                super().setup()
                stub.connections += 1

            def log_message(self, *args):
                pass

            def handle_one_request(self):
                self.raw_requestline = self.rfile.readline(65537)
                if not self.raw_requestline:
                    self.close_connection = True
                    return
                if not self.parse_request():
                    return
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                req = Request(self.command, self.path,
                              {k.lower(): v for k, v in self.headers.items()},
                              body)
                stub.requests.append(req)
                resp = stub.handler(req)
                if resp.hang_up:
                    self.close_connection = True
                    return
                self.send_response(resp.status)
                headers = {"content-length": str(len(resp.body))}
                headers.update(resp.headers)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if resp.truncate is not None:
                    self.wfile.write(resp.body[:resp.truncate])
                    self.close_connection = True
                else:
                    self.wfile.write(resp.body)
                self.wfile.flush()
                if resp.drop:
                    self.close_connection = True

        self.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        # A short poll interval: shutdown() waits for one.
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01},
            daemon=True)
        self.thread.start()

    @property
    def url(self):
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}/images/stub"

    def methods(self):
        return [r.method for r in self.requests]

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub_server():
    servers = []

    def start(handler):
        s = StubServer(handler)
        servers.append(s)
        return s

    # Tests reach the response type here: this conftest is not importable
    # by name (test/conftest.py is "conftest").
    start.Response = Response
    yield start
    for s in servers:
        s.stop()


@pytest.fixture
def client_daemon(make_daemon):
    return make_daemon(
        backend_nbd={"buffer_size": str(MiB)},
        daemon={"max_connections": "4"})


@pytest.fixture
def make_block_device(tmp_path):
    import subprocess
    attached = []

    def attach(size, pattern):
        backing = tmp_path / f"loop{len(attached)}.img"
        with open(backing, "wb") as f:
            f.write(bytes([pattern]) * size)
        try:
            r = subprocess.run(["losetup", "--find", "--show", str(backing)],
                               capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"Cannot attach a loop device: {e}")
        if r.returncode != 0:
            pytest.skip(f"Cannot attach a loop device: {r.stderr.strip()}")
        attached.append(r.stdout.strip())
        return attached[-1]

    yield attach
    for device in attached:
        subprocess.run(["losetup", "--detach", device], check=True,
                       capture_output=True, timeout=20)


@pytest.fixture(scope="session")
def glance_server(tmp_path_factory):
    """One real glance-api for the session (test/glance.py): about 5 s to
    set up, paid once."""
    import glance
    server = glance.Glance(tmp_path_factory.mktemp("glance"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def glance(glance_server):
    """The session's Glance, running, accepting only its token; a test
    may stop it or change the tokens."""
    glance_server.set_tokens(glance_server.token)
    if not glance_server.running:
        glance_server.start()
    yield glance_server
    glance_server.set_tokens(glance_server.token)
    if not glance_server.running:
        glance_server.start()
