"""
Shared fixtures: images, real NBD servers (qemu-nbd, nbdkit), polling.

Fixtures:

    sock_dir      short private directory for unix sockets (tmp_path can
                  be longer than the 107 bytes a socket path may have)
    make_image    factory: make_image(name, fmt, size, commands, bitmaps)
                  creates an image with qemu-img and writes with qemu-io
    qemu_io       qemu_io(path, fmt, *commands) runs qemu-io commands
    qemu_img_map  qemu_img_map(path, fmt) -> `qemu-img map --output=json`
    qemu_nbd      factory: qemu_nbd(path, fmt="raw", **options) starts a
                  qemu-nbd (qemu_nbd.start options) and stops it at teardown
    nbdkit        factory: nbdkit(plugin, *args, filters=(), ...) starts
                  nbdkit (e.g. memory with the error or delay filter) and
                  stops it at teardown
    wait_for      wait_for(predicate, timeout=5, message=...) polls until
                  predicate() is true, failing the test at the deadline
    processes_with  processes_with(text) -> pids of live processes whose
                  command line contains text (e.g. a socket path)
    pid_alive     pid_alive(pid) -> True if it runs and is not a zombie

Servers from the factories have an `address` (ovirt_imageio.nbd.url.
Address) for client.open().

The helpers behind the fixtures are plain functions here too, plus
nbd_serving(address); prefer the fixtures, since importing conftest
depends on pytest's import mode.
"""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

import nbd
import pytest

from ovirt_imageio.nbd import qemu_nbd as qemu_nbd_module
from ovirt_imageio.nbd import url

# How often wait_for() checks; short, since what we wait for (a process
# starting or exiting) usually takes milliseconds.
POLL_INTERVAL = 0.01


# Helpers, also usable as plain functions.


def wait_for(predicate, timeout=5, message="condition"):
    """Poll predicate() until true; fail the test after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"Timeout waiting {timeout} s for {message}")
        time.sleep(POLL_INTERVAL)


def qemu_io(path, fmt, *commands):
    """Run qemu-io commands (e.g. "write -P 0x55 0 64k") on an image."""
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(path))
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    # qemu-io reports failed commands on stdout with exit code 0.
    for line in (out.stdout + out.stderr).splitlines():
        if "failed" in line or "error" in line.lower():
            raise RuntimeError(f"qemu-io {commands}: {line}")


def qemu_img_map(path, fmt):
    """Return `qemu-img map --output=json` of an image."""
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "--force-share", "-f", fmt,
         str(path)],
        check=True, capture_output=True)
    return json.loads(out.stdout)


def make_image(directory, name="disk", fmt="raw", size=1024**2,
               commands=(), bitmaps=()):
    """
    Create an image in directory with qemu-img, add persistent dirty
    bitmaps (qcow2), then run qemu-io commands on it. Returns the path.
    """
    path = os.path.join(str(directory), f"{name}.{fmt}")
    subprocess.run(
        ["qemu-img", "create", "-f", fmt, path, str(size)],
        check=True, capture_output=True)
    for bitmap in bitmaps:
        subprocess.run(
            ["qemu-img", "bitmap", "--add", "-f", fmt, path, bitmap],
            check=True, capture_output=True)
    if commands:
        qemu_io(path, fmt, *commands)
    return path


def nbd_serving(address):
    """
    Return True if an NBD server completes a handshake at address (a
    url.Address or a unix socket path).
    """
    if isinstance(address, str):
        address = url.Address(socket=address)
    if address.is_unix and not os.path.exists(address.socket):
        return False
    h = nbd.NBD()
    try:
        h.set_opt_mode(True)
        if address.is_unix:
            h.connect_unix(address.socket)
        else:
            h.connect_tcp(address.host, str(address.port))
        h.opt_abort()
        return True
    except nbd.Error:
        return False


def processes_with(text):
    """Return pids of live (not zombie) processes whose command line
    contains text."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(
                    "utf-8", "replace")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            pids.append(int(name))
    return pids


def pid_alive(pid):
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# Fixtures


@pytest.fixture
def sock_dir():
    path = tempfile.mkdtemp(prefix="imageio-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(name="make_image")
def make_image_fixture(tmp_path):
    def make(name="disk", fmt="raw", size=1024**2, commands=(), bitmaps=()):
        return make_image(tmp_path, name=name, fmt=fmt, size=size,
                          commands=commands, bitmaps=bitmaps)
    return make


@pytest.fixture(name="qemu_io")
def qemu_io_fixture():
    return qemu_io


@pytest.fixture(name="qemu_img_map")
def qemu_img_map_fixture():
    return qemu_img_map


@pytest.fixture(name="wait_for")
def wait_for_fixture():
    return wait_for


@pytest.fixture(name="pid_alive")
def pid_alive_fixture():
    return pid_alive


@pytest.fixture(name="processes_with")
def processes_with_fixture():
    return processes_with


@pytest.fixture(name="qemu_nbd")
def qemu_nbd_fixture(sock_dir):
    """
    qemu_nbd(path, fmt="raw", **options) -> qemu_nbd.Server, stopped at
    teardown. Options are those of ovirt_imageio.nbd.qemu_nbd.start().
    """
    servers = []

    def start(path, fmt="raw", **options):
        sock = os.path.join(sock_dir, f"qemu-nbd-{len(servers)}.sock")
        server = qemu_nbd_module.start(str(path), sock, fmt=fmt, **options)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


class Nbdkit:
    """A running nbdkit; address is a url.Address, socket its unix socket
    (None with tcp)."""

    def __init__(self, proc, address, stderr):
        self.proc = proc
        self.address = address
        self.socket = address.socket
        self.stderr = stderr

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


@pytest.fixture(name="nbdkit")
def nbdkit_fixture(sock_dir):
    """
    nbdkit(plugin, *args, filters=(), readonly=False, tcp=False,
    options=()) -> Nbdkit, stopped at teardown. With tcp=True it listens
    on 127.0.0.1 on a free port instead of a unix socket.

    Examples:
        nbdkit("memory", "size=1M")
        nbdkit("memory", "size=1M", "error-pread=EIO", filters=["error"])
        nbdkit("memory", "size=1M", "rdelay=500ms", filters=["delay"])
    """
    servers = []

    def start(plugin, *args, filters=(), readonly=False, tcp=False,
              options=()):
        cmd = ["nbdkit", "--foreground", "--exit-with-parent"]
        if tcp:
            # A free port from the kernel. Another process could take it
            # before nbdkit binds; then nbdkit fails and the test says so.
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            address = url.Address(host="127.0.0.1", port=port)
            cmd += ["--ipaddr", "127.0.0.1", "--port", str(port)]
        else:
            path = os.path.join(sock_dir, f"nbdkit-{len(servers)}.sock")
            address = url.Address(socket=path)
            cmd += ["--unix", path]
        if readonly:
            cmd.append("--readonly")
        cmd += list(options)
        cmd += [f"--filter={f}" for f in filters]
        cmd += [plugin, *args]
        stderr = tempfile.TemporaryFile()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=stderr)
        server = Nbdkit(proc, address, stderr)
        servers.append(server)

        def ready():
            if proc.poll() is not None:
                stderr.seek(0)
                pytest.fail(f"nbdkit failed: {stderr.read().decode()}")
            return nbd_serving(address)

        wait_for(ready, message=f"nbdkit serving on {address}")
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    """A CA and a server certificate for localhost (dev/mkpki)."""
    import testutil
    return testutil.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def upstream_venv():
    """
    Path of the anchor venv with upstream ovirt-imageio 2.5.1 (test/
    upstream.py), created once per machine when missing; run code under
    it with upstream.run_client(), its daemon with upstream.UpstreamDaemon.
    """
    import upstream
    return upstream.anchor_venv()


@pytest.fixture
def make_daemon(tmp_path, pki):
    """Start in-process daemons with a fake clock; stop them at teardown."""
    started = []

    def make(**overrides):
        import testutil
        from ovirt_imageio import clock, config, server
        tmp = str(tmp_path / f"daemon{len(started)}")
        os.makedirs(tmp)
        testutil.write_conf(tmp, testutil.daemon_conf(tmp, pki, **overrides))
        vendor = os.path.join(tmp, "vendor")
        cfg = config.load(tmp, vendor_dir=vendor)
        d = server.Daemon(cfg, clock=clock.FakeClock())
        d.clock = d.store.clock
        d.tmp = tmp
        started.append(d)
        d.start()
        if d.control:
            d.api = testutil.Control(d.control.server.address())
        return d

    yield make
    for d in started:
        d.stop()
        shutil.rmtree(d.cfg.daemon.run_dir, ignore_errors=True)
