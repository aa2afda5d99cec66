"""
A real OpenStack Glance (Debian 12's glance-api) on loopback for tests:
one process (workers = 0), a sqlite database and a file store under a
folder of the test's, no keystone (../shared/GLANCE.md).

Keystone's place is taken by a filter of ours in the paste pipeline,
before Glance's own context middleware: a request whose X-Auth-Token is
one of the tokens in the file `tokens` (read again on every request, so
a test can expire a token) gets the identity headers keystonemiddleware
would set; any other gets X-Identity-Status: Invalid, which Glance
answers with a real 401. Identity headers sent by the client are
dropped, as keystonemiddleware drops them.

    g = Glance(tmp_path / "glance")
    g.start()              # db_sync once, then glance-api, /healthcheck
    g.url, g.token         # http://127.0.0.1:PORT, the valid token
    g.create(b"...", disk_format="raw")   # an active image's id
    g.stop()               # SIGTERM, then SIGKILL past the deadline

Every wait has a deadline; a server that does not come up raises with
the end of its log.
"""

import ctypes
import http.client
import json
import os
import signal
import socket
import subprocess
import time

GLANCE_API = "/usr/bin/glance-api"
GLANCE_MANAGE = "/usr/bin/glance-manage"
# glance-api is Debian's: its modules are in Debian's python3, never in
# a pyenv or venv python that may come first in PATH.
SYSTEM_PYTHON = "/usr/bin/python3"

# Measured 2-2.5 s to /healthcheck on an idle 2-core machine; the
# deadline allows for a machine busy with other tests.
START_TIMEOUT = 90
STOP_TIMEOUT = 20
DB_SYNC_TIMEOUT = 180
# Tries with a new free port when glance-api exits while starting.
PORT_ATTEMPTS = 3

TOKEN = "glance-test-token"

# prctl(2)
PR_SET_PDEATHSIG = 1

CONF = """\
[DEFAULT]
bind_host = 127.0.0.1
bind_port = {port}
workers = 0
log_file = {dir}/log/glance-api.log
debug = false
node_staging_uri = file://{dir}/staging
enabled_import_methods = [glance-direct]

[paste_deploy]
flavor = testtoken
config_file = {dir}/paste.ini

[database]
connection = sqlite:///{dir}/glance.sqlite

[glance_store]
stores = file
default_store = file
filesystem_store_datadir = {dir}/images/

[oslo_concurrency]
lock_path = {dir}/lock

[task]
work_dir = {dir}/work
"""

PASTE = """\
[pipeline:glance-api-testtoken]
pipeline = cors healthcheck http_proxy_to_wsgi versionnegotiation \
osprofiler testtoken context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:testtoken]
paste.filter_factory = glance_test_token:filter_factory
tokens_file = {dir}/tokens

[filter:healthcheck]
paste.filter_factory = oslo_middleware:Healthcheck.factory
backends = disable_by_file
disable_by_file_path = {dir}/healthcheck_disable

[filter:versionnegotiation]
paste.filter_factory = \
glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:osprofiler]
paste.filter_factory = osprofiler.web:WsgiMiddleware.factory

[filter:cors]
paste.filter_factory = oslo_middleware.cors:filter_factory
oslo_config_project = glance
oslo_config_program = glance-api

[filter:http_proxy_to_wsgi]
paste.filter_factory = oslo_middleware:HTTPProxyToWSGI.factory
"""

# The token filter, a keystonemiddleware stand-in run inside glance-api.
FILTER = '''\
"""X-Auth-Token checked against the tokens file (one a line)."""

_IDENTITY = ("HTTP_X_IDENTITY_STATUS", "HTTP_X_PROJECT_ID",
             "HTTP_X_TENANT_ID", "HTTP_X_TENANT", "HTTP_X_USER_ID",
             "HTTP_X_USER", "HTTP_X_ROLES", "HTTP_X_ROLE",
             "HTTP_X_PROJECT_NAME", "HTTP_X_SERVICE_CATALOG",
             "HTTP_X_DOMAIN_ID", "HTTP_X_USER_DOMAIN_ID",
             "HTTP_X_PROJECT_DOMAIN_ID", "HTTP_X_SYSTEM_SCOPE",
             "HTTP_X_IS_ADMIN_PROJECT")


def _tokens(path):
    with open(path) as f:
        return {line.strip() for line in f if line.strip()}


def filter_factory(global_conf, tokens_file, **local_conf):
    def _filter(app):
        def middleware(environ, start_response):
            for key in _IDENTITY:
                environ.pop(key, None)
            token = environ.get("HTTP_X_AUTH_TOKEN")
            if token and token in _tokens(tokens_file):
                environ["HTTP_X_IDENTITY_STATUS"] = "Confirmed"
                environ["HTTP_X_PROJECT_ID"] = "test-project"
                environ["HTTP_X_USER_ID"] = "test-user"
                environ["HTTP_X_ROLES"] = "admin,member,reader"
            else:
                environ["HTTP_X_IDENTITY_STATUS"] = "Invalid"
            return app(environ, start_response)
        return middleware
    return _filter
'''


class Error(Exception):
    pass


class _Exited(Error):
    """glance-api exited while starting."""


class Glance:

    def __init__(self, directory, token=TOKEN):
        self.dir = os.fspath(directory)
        self.token = token
        self.port = None
        self.proc = None
        self._synced = False

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def store(self):
        """The file store's folder: one file per image, named by its id."""
        return os.path.join(self.dir, "images")

    def set_tokens(self, *tokens):
        """The tokens Glance accepts from now on (the others get 401)."""
        tmp = os.path.join(self.dir, "tokens.tmp")
        with open(tmp, "w") as f:
            f.write("".join(t + "\n" for t in tokens))
        os.rename(tmp, os.path.join(self.dir, "tokens"))

    def start(self):
        """Start glance-api (on the port it had, if it ran before)."""
        if not self._synced:
            self._setup()
        fresh = self.port is None
        for attempt in range(PORT_ATTEMPTS if fresh else 1):
            if fresh:
                self.port = _free_port()
            self._write_conf()
            self._spawn()
            try:
                self._wait_until_healthy()
                return
            except _Exited:
                # Another process may have taken the port first.
                if attempt == PORT_ATTEMPTS - 1 or not fresh:
                    raise
            except BaseException:
                self.kill()
                raise

    def stop(self):
        """SIGTERM, and SIGKILL if it has not exited by the deadline."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    def kill(self):
        """Stop it at once, as a crash would."""
        if self.proc is None:
            return
        self.proc.kill()
        self.proc.wait(STOP_TIMEOUT)
        self.proc = None

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    # A client of our own for the tests' setup and checks, independent of
    # ovirt_imageio.client.glance (which is under test).

    def request(self, method, path, body=None, headers=(), token=None):
        """(status, headers, body bytes)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                          timeout=60)
        try:
            hdrs = {"X-Auth-Token": token or self.token}
            hdrs.update(headers)
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def create(self, data=None, path=None, disk_format="raw", name="test",
               **props):
        """An image holding data (or the file at path); returns its id."""
        meta = dict(name=name, disk_format=disk_format,
                    container_format="bare", **props)
        status, _, body = self.request(
            "POST", "/v2/images", json.dumps(meta),
            {"Content-Type": "application/json"})
        if status != 201:
            raise Error(f"Create failed: {status} {body!r}")
        image_id = json.loads(body)["id"]
        if path is not None:
            with open(path, "rb") as f:
                data = f.read()
        if data is not None:
            status, _, body = self.request(
                "PUT", f"/v2/images/{image_id}/file", data,
                {"Content-Type": "application/octet-stream"})
            if status != 204:
                raise Error(f"Upload failed: {status} {body!r}")
        return image_id

    def image(self, image_id):
        """The image's metadata, None if there is no such image."""
        status, _, body = self.request("GET", f"/v2/images/{image_id}")
        if status == 404:
            return None
        if status != 200:
            raise Error(f"Get failed: {status} {body!r}")
        return json.loads(body)

    def data(self, image_id):
        status, _, body = self.request("GET", f"/v2/images/{image_id}/file")
        if status != 200:
            raise Error(f"Download failed: {status} {body!r}")
        return body

    def delete(self, image_id):
        status, _, body = self.request("DELETE", f"/v2/images/{image_id}")
        if status not in (204, 404):
            raise Error(f"Delete failed: {status} {body!r}")

    def images(self):
        """Every image's metadata."""
        status, _, body = self.request("GET", "/v2/images?limit=1000")
        if status != 200:
            raise Error(f"List failed: {status} {body!r}")
        return json.loads(body)["images"]

    # Private.

    @property
    def _conf(self):
        return os.path.join(self.dir, "glance-api.conf")

    def _env(self):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env["PYTHONPATH"] = os.path.join(self.dir, "pylib")
        return env

    def _setup(self):
        for path in (GLANCE_API, GLANCE_MANAGE, SYSTEM_PYTHON):
            if not os.path.exists(path):
                raise Error(f"{path} is missing: the Glance tests need "
                            f"Debian's glance-api (make system-packages "
                            f"installs it)")
        for name in ("images", "staging", "lock", "log", "work", "pylib"):
            os.makedirs(os.path.join(self.dir, name), exist_ok=True)
        with open(os.path.join(self.dir, "paste.ini"), "w") as f:
            f.write(PASTE.format(dir=self.dir))
        with open(os.path.join(self.dir, "pylib",
                               "glance_test_token.py"), "w") as f:
            f.write(FILTER)
        self.set_tokens(self.token)
        # The port is not known yet: any will do for db_sync.
        self.port = 0
        self._write_conf()
        self.port = None
        p = subprocess.run(
            [SYSTEM_PYTHON, GLANCE_MANAGE, "--config-file", self._conf,
             "db_sync"],
            env=self._env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=DB_SYNC_TIMEOUT)
        if p.returncode != 0:
            raise Error(f"glance-manage db_sync failed: "
                        f"{p.stdout.decode(errors='replace')[-2000:]}")
        self._synced = True

    def _write_conf(self):
        with open(self._conf, "w") as f:
            f.write(CONF.format(dir=self.dir, port=self.port))

    def _spawn(self):
        log = open(os.path.join(self.dir, "log", "stdout.log"), "ab")
        with log:
            self.proc = subprocess.Popen(
                [SYSTEM_PYTHON, GLANCE_API, "--config-file", self._conf],
                env=self._env(), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent)

    def _wait_until_healthy(self):
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise _Exited(f"glance-api exited with {code}: "
                              f"{self._log_tail()}")
            if self._healthy():
                return
            if time.monotonic() > deadline:
                raise Error(f"glance-api did not answer in {START_TIMEOUT} "
                            f"seconds: {self._log_tail()}")
            time.sleep(0.05)

    def _healthy(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/healthcheck")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _log_tail(self):
        text = ""
        for name in ("stdout.log", "glance-api.log"):
            try:
                with open(os.path.join(self.dir, "log", name), "rb") as f:
                    text += f.read()[-2000:].decode(errors="replace")
            except FileNotFoundError:
                pass
        return text


def _free_port():
    """A port free now on 127.0.0.1; glance-api binds it by number (it
    cannot be handed a socket), so another process could take it first:
    Glance then fails to start, and start() says so."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """In the child: SIGTERM when the test process dies, even killed,
    so that no glance-api outlives a test run."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
