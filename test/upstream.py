"""
Upstream ovirt-imageio 2.5.1, for tests that must exercise code nobody
here wrote: upstream's client library and upstream's daemon.

Upstream shares our import name `ovirt_imageio`, so it lives in its own
venv, the "anchor venv", shared with the benchmark harness
(/work/shared/bench/setup):

    $BENCH_ANCHOR_VENV, else $IMAGEIO_ANCHOR_VENV, else
    ~/.cache/imageio-anchor/venv

made with `/usr/bin/python3 -m venv --system-site-packages` (the client
needs `import nbd` from python3-libnbd) and `pip install
ovirt-imageio==2.5.1`. PyPI ships 2.5.1 as an sdist, so pip compiles it:
gcc and python3-dev must be installed (the Makefile does that).

Creating it, at most once per machine:

- Creators serialize on fcntl.flock() of VENV.lock, next to the venv
  (e.g. ~/.cache/imageio-anchor/venv.lock). Anyone else who creates the
  venv should take the same lock.
- The venv is ready only when VENV/.imageio-anchor-ready exists. It is
  written after pip succeeded and the venv passed check_venv().
- The venv is built in a temporary sibling directory (.VENV.build-*),
  then renamed into place, so an interrupted build never leaves a broken
  venv at the final path. The absolute build path that venv and pip bake
  into bin/* and pyvenv.cfg is rewritten to the final path before the
  rename. Leftover build directories are removed by the next creator
  (under the lock no other build can be running).
- bench/setup takes no lock and writes no marker. A venv it made that
  passes check_venv() is adopted (the marker is added). One without a
  marker that fails the check is left alone while something still writes
  into it, then replaced.

API:

    anchor_path() -> str          where the anchor venv lives
    anchor_venv() -> str          that path, once the venv is ready
    check_venv(path) -> dict      raises AnchorError unless usable
    run_client(code, *args)       run code under the anchor python
    run_python(*argv)             run `anchor-python *argv` (script, -m)
    run_json(code, *args)         run_client() and parse stdout as JSON
    UpstreamDaemon(tmp, pki, ...) upstream's daemon in a child process,
                                  the same API as testutil.DaemonProcess

Run as a script (python test/upstream.py), it prints the ready venv's
path as the last line, as bench/setup does.
"""

import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import testutil

VERSION = "2.5.1"
REQUIREMENT = f"ovirt-imageio=={VERSION}"
SYSTEM_PYTHON = "/usr/bin/python3"
MARKER = ".imageio-anchor-ready"

# A cold build downloads the sdist and setuptools and compiles one small
# C extension. It takes well under a minute here; the limit only bounds
# a hung download on a broken network.
BUILD_TIMEOUT = 600

# How long a venv without marker that fails the check is left alone after
# its last change, in case a creator that takes no lock (bench/setup) is
# still installing into it. pip writes into the venv every few seconds
# while it installs; longer and a broken venv delays every test session.
FOREIGN_BUILD_GRACE = 120

# Default limit for client code run under the anchor python.
CLIENT_TIMEOUT = 120

# Verified venvs, so the check runs once per process.
_ready = set()


class AnchorError(RuntimeError):
    """The anchor venv could not be found, built or used."""


class ClientError(AssertionError):
    """Code run under the anchor python failed or timed out.

    An AssertionError, so a test that calls run_client() fails (rather
    than errors) and pytest shows the client's stderr.
    """

    def __init__(self, message, returncode=None, stdout="", stderr=""):
        super().__init__(message)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


# The anchor venv.


def anchor_path():
    """Where the anchor venv lives (it may not exist yet)."""
    path = (os.environ.get("BENCH_ANCHOR_VENV")
            or os.environ.get("IMAGEIO_ANCHOR_VENV")
            or os.path.expanduser("~/.cache/imageio-anchor/venv"))
    return os.path.abspath(path)


def python_path(venv=None):
    return os.path.join(venv or anchor_venv(), "bin", "python")


def daemon_path(venv=None):
    return os.path.join(venv or anchor_venv(), "bin", "ovirt-imageio")


def anchor_venv(path=None, timeout=BUILD_TIMEOUT):
    """
    Return the path of a ready anchor venv, creating it when missing.
    Waits for a concurrent creator instead of racing it. Raises
    AnchorError with pip's output if the build fails.
    """
    venv = os.path.abspath(path or anchor_path())
    if venv in _ready:
        return venv
    if _is_marked(venv):
        try:
            check_venv(venv)
        except AnchorError:
            pass  # Rebuilt below, under the lock.
        else:
            _ready.add(venv)
            return venv

    os.makedirs(os.path.dirname(venv), exist_ok=True)
    with _locked(venv + ".lock", timeout + 60):
        _remove_leftover_builds(venv)
        if os.path.lexists(venv):
            if _is_marked(venv):
                # Someone built it while we waited, or it broke.
                try:
                    check_venv(venv)
                except AnchorError as e:
                    _log(f"{venv} is marked ready but unusable ({e}); "
                         f"rebuilding")
                else:
                    _ready.add(venv)
                    return venv
            elif _adopt_foreign(venv, timeout):
                _ready.add(venv)
                return venv
        _build(venv, timeout)
    _ready.add(venv)
    return venv


def check_venv(venv):
    """
    Raise AnchorError unless venv has upstream ovirt-imageio VERSION
    (its own, not ours), the libnbd bindings and the daemon script.
    Returns {"version", "module", "python"} from inside the venv.
    """
    python = os.path.join(venv, "bin", "python")
    if not os.access(python, os.X_OK):
        raise AnchorError(f"{python} is missing")
    daemon = os.path.join(venv, "bin", "ovirt-imageio")
    if not os.access(daemon, os.X_OK):
        raise AnchorError(f"{daemon} is missing")
    with open(daemon, "rb") as f:
        shebang = f.readline().decode(errors="replace").strip()
    # pip writes the python it runs under: bin/python or bin/python3.
    if not shebang.startswith("#!" + os.path.join(venv, "bin", "python")):
        raise AnchorError(
            f"{daemon} starts with {shebang!r}, not the venv's python")
    code = (
        "import json, sys\n"
        "import nbd\n"
        "import ovirt_imageio\n"
        "from ovirt_imageio import client\n"
        "from ovirt_imageio._internal import version\n"
        "print(json.dumps({'version': version.string,"
        " 'module': ovirt_imageio.__path__[0],"
        " 'python': sys.prefix}))\n")
    try:
        out = subprocess.run(
            [python, "-I", "-c", code], capture_output=True, text=True,
            timeout=60, cwd="/", stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AnchorError(f"{python} does not run: {e}") from None
    if out.returncode != 0:
        raise AnchorError(f"{python} cannot import upstream: "
                          f"{out.stderr.strip()[-2000:]}")
    info = json.loads(out.stdout)
    if info["version"] != VERSION:
        raise AnchorError(
            f"{venv} has ovirt-imageio {info['version']}, not {VERSION}")
    real = os.path.realpath(venv) + os.sep
    if not os.path.realpath(info["module"]).startswith(real):
        raise AnchorError(
            f"{venv} imports ovirt_imageio from {info['module']}, "
            f"outside the venv")
    return info


def _is_marked(venv):
    return os.path.isfile(os.path.join(venv, MARKER))


def _write_marker(venv, info):
    info = dict(info, requirement=REQUIREMENT, created=time.time())
    tmp = os.path.join(venv, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(venv, MARKER))


@contextlib.contextmanager
def _locked(path, timeout):
    """Hold an exclusive flock on path, waiting at most timeout seconds."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AnchorError(
                        f"Timeout waiting {timeout} s for {path}: another "
                        f"process is still creating the anchor venv") from None
                if not said:
                    _log(f"waiting for another process creating the anchor "
                         f"venv ({path})")
                    said = True
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # Releases the lock.


def _build_prefix(venv):
    parent, name = os.path.split(venv)
    return os.path.join(parent, f".{name}.build-")


def _remove_leftover_builds(venv):
    """Remove build dirs of interrupted creators. Call under the lock:
    then no build is running."""
    for path in glob.glob(glob.escape(_build_prefix(venv)) + "*"):
        shutil.rmtree(path, ignore_errors=True)


def _newest_change(venv):
    """Newest mtime of the places an install writes to."""
    paths = [venv, os.path.join(venv, "bin")]
    paths += glob.glob(os.path.join(glob.escape(venv), "lib", "python3*",
                                    "site-packages"))
    times = []
    for p in paths:
        with contextlib.suppress(OSError):
            times.append(os.lstat(p).st_mtime)
    return max(times, default=0)


def _adopt_foreign(venv, timeout):
    """
    A venv without our marker is at the final path (bench/setup makes
    venvs in place, without lock or marker). Adopt it if it passes the
    check. While it fails but still changes, something may be installing
    into it: wait. Returns False when it should be replaced.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            info = check_venv(venv)
        except AnchorError as e:
            reason = e
        else:
            _write_marker(venv, info)
            _log(f"adopted existing anchor venv {venv}")
            return True
        idle = time.time() - _newest_change(venv)
        if idle > FOREIGN_BUILD_GRACE or time.monotonic() > deadline:
            _log(f"replacing unusable anchor venv {venv}: {reason}")
            return False
        time.sleep(2)


def _build(venv, timeout):
    """Build the venv in a sibling temp dir and rename it into place."""
    start = time.monotonic()
    deadline = start + timeout
    _log(f"creating anchor venv {venv} ({REQUIREMENT}); "
         f"this happens once per machine")
    build = tempfile.mkdtemp(prefix=os.path.basename(_build_prefix(venv)),
                             dir=os.path.dirname(venv))
    os.chmod(build, 0o755)  # mkdtemp() made it private; a venv is not.
    try:
        _run_build_step(
            [SYSTEM_PYTHON, "-m", "venv", "--system-site-packages", build],
            deadline, "python3 -m venv")
        _run_build_step(
            [os.path.join(build, "bin", "python"), "-m", "pip", "install",
             "--no-input", "--progress-bar", "off", REQUIREMENT],
            deadline, f"pip install {REQUIREMENT}", pip=True)
        _relocate(build, venv)
        # Verify with the final paths in place, then mark and publish.
        old = None
        if os.path.lexists(venv):
            old = tempfile.mkdtemp(
                prefix=os.path.basename(_build_prefix(venv)) + "old-",
                dir=os.path.dirname(venv))
            os.rename(venv, os.path.join(old, "venv"))
        os.rename(build, venv)
        try:
            info = check_venv(venv)
        except AnchorError:
            os.rename(venv, build)  # Removed below: never left unmarked.
            raise
        finally:
            if old:
                shutil.rmtree(old, ignore_errors=True)
        _write_marker(venv, info)
    finally:
        if os.path.exists(build):
            shutil.rmtree(build, ignore_errors=True)
    _log(f"created anchor venv {venv} in {time.monotonic() - start:.0f} s")


def _run_build_step(cmd, deadline, what, pip=False):
    remaining = max(1, deadline - time.monotonic())
    env = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "PIP_TARGET",
                 "PIP_PREFIX", "VIRTUAL_ENV"):
        env.pop(name, None)
    try:
        out = _run(cmd, timeout=remaining, env=env, cwd="/")
    except subprocess.TimeoutExpired as e:
        raise AnchorError(
            f"Creating the anchor venv: {what} did not finish in "
            f"{BUILD_TIMEOUT} s (is PyPI reachable from here?)\n"
            f"--- output ---\n{_text(e.stdout)}{_text(e.stderr)}") from None
    output = out.stdout + out.stderr
    if out.returncode != 0:
        hint = _pip_hint(output) if pip else ""
        raise AnchorError(
            f"Creating the anchor venv: {what} failed with exit code "
            f"{out.returncode}.{hint}\n--- output ---\n{output}")


_NETWORK_ERRORS = (
    "NewConnectionError", "ConnectionError", "ConnectTimeout",
    "ReadTimeout", "Max retries exceeded", "Temporary failure in name",
    "Name or service not known", "Network is unreachable", "ProxyError",
    "SSLError", "No matching distribution found",
    "Could not find a version that satisfies",
)


def _pip_hint(output):
    if "error: command" in output and "gcc" in output \
            or "Python.h: No such file" in output:
        return (" Building the sdist needs gcc and python3-dev "
                "(`make system-packages` installs them).")
    if any(s in output for s in _NETWORK_ERRORS):
        return (f" PyPI (or the configured index) looks unreachable: pip "
                f"could not download {REQUIREMENT} or its build "
                f"dependencies. Check the network, proxy and PIP_INDEX_URL, "
                f"or create the venv elsewhere and point BENCH_ANCHOR_VENV "
                f"at it.")
    return ""


def _relocate(build, venv):
    """
    Replace the build dir's absolute path with the final one where venv
    and pip wrote it: script shebangs, activate scripts, pyvenv.cfg.
    Compiled .pyc files need nothing: the import system fixes their
    co_filename when it loads them.
    """
    old, new = build.encode(), venv.encode()
    paths = [os.path.join(build, "pyvenv.cfg")]
    bindir = os.path.join(build, "bin")
    paths += [os.path.join(bindir, n) for n in os.listdir(bindir)]
    for path in paths:
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            data = f.read()
        if old not in data or b"\0" in data:
            continue
        mode = os.stat(path).st_mode
        with open(path, "wb") as f:
            f.write(data.replace(old, new))
        os.chmod(path, mode)


def _log(message):
    print(f"upstream: {message}", file=sys.stderr, flush=True)


def _text(data):
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


# Running code under the anchor python.


def _run(cmd, timeout, env=None, cwd=None, input=None):
    """
    subprocess.run(), but in a new session, so that on timeout the whole
    process group (the client and anything it started, e.g. qemu-nbd)
    is killed, not only the direct child.
    """
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE if input is not None else
        subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env, cwd=cwd, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, stdout, stderr)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def client_env(env=None):
    """The environment for the anchor python: ours, without anything that
    could put our ovirt_imageio on its path, plus env."""
    result = dict(os.environ)
    for name in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                 "VIRTUAL_ENV", "PYTHONSAFEPATH"):
        result.pop(name, None)
    if env:
        result.update(env)
    return result


def run_python(*argv, timeout=CLIENT_TIMEOUT, env=None, cwd=None,
               input=None, check=True):
    """
    Run `<anchor python> -P *argv` (a script path, -m module, -c code)
    and return a CompletedProcess with text stdout and stderr.

    -P keeps the current directory (or the script's directory) off
    sys.path: from the project root, `import ovirt_imageio` would find
    ours. With check (the default) a non-zero exit raises ClientError
    whose message has the stderr; a timeout always raises ClientError,
    after killing the client's whole process group.
    """
    cmd = [python_path(), "-P", *map(str, argv)]
    try:
        out = _run(cmd, timeout, env=client_env(env), cwd=cwd, input=input)
    except subprocess.TimeoutExpired as e:
        raise ClientError(
            f"upstream client timed out after {timeout} s: {_brief(argv)}\n"
            f"--- stderr ---\n{_text(e.stderr)}",
            stdout=_text(e.stdout), stderr=_text(e.stderr)) from None
    if check and out.returncode != 0:
        raise ClientError(
            f"upstream client failed with exit code {out.returncode}: "
            f"{_brief(argv)}\n--- stderr ---\n{out.stderr}",
            returncode=out.returncode, stdout=out.stdout, stderr=out.stderr)
    return out


def run_client(code, *args, **kwargs):
    """
    Run Python code under the anchor python, with args in sys.argv[1:].
    Keyword arguments are those of run_python(). Example:

        out = upstream.run_client(
            "import sys\n"
            "from ovirt_imageio import client\n"
            "client.download(sys.argv[1], sys.argv[2], sys.argv[3])\n",
            url, dst, pki["ca_file"], timeout=60)
    """
    return run_python("-c", code, *args, **kwargs)


def run_json(code, *args, **kwargs):
    """run_client(), returning its stdout parsed as JSON."""
    out = run_client(code, *args, **kwargs)
    try:
        return json.loads(out.stdout)
    except ValueError:
        raise ClientError(
            f"upstream client printed no JSON: {out.stdout[-2000:]!r}\n"
            f"--- stderr ---\n{out.stderr}",
            stdout=out.stdout, stderr=out.stderr) from None


def _brief(argv):
    text = " ".join(map(str, argv))
    return text if len(text) < 200 else text[:200] + "..."


# Upstream's daemon.


class UpstreamDaemon(testutil.DaemonProcess):
    """
    Upstream's ovirt-imageio daemon from the anchor venv, configured like
    testutil.DaemonProcess (testutil.daemon_conf(), the same keyword
    overrides) and with the same API: wait_ready(), wait_exit(), stop(),
    api (testutil.Control on the control socket), conf, log, proc,
    stdout and stderr after stop(). Also: local_socket, remote_port,
    url(ticket_id), and use as a context manager (ready on entry,
    stopped on exit).

    The daemon runs in its own session; stop() also kills whatever is
    left in that process group.
    """

    def __init__(self, tmp, pki, args=(), env=None, venv=None, **overrides):
        self.venv = venv or anchor_venv()
        self.tmp = str(tmp)
        os.makedirs(self.tmp, exist_ok=True)
        self.conf = daemon_conf = testutil.daemon_conf(
            self.tmp, pki, **overrides)
        testutil.write_conf(self.tmp, daemon_conf)
        self.control_socket = daemon_conf["control"]["socket"]
        self.local_socket = daemon_conf["local"].get("socket")
        self.log = os.path.join(self.tmp, "daemon.log")
        self.stdout_path = os.path.join(self.tmp, "daemon.stdout")
        self.stderr_path = os.path.join(self.tmp, "daemon.stderr")
        self._remote_port = None
        self.api = testutil.Control(self.control_socket)
        # Output goes to files: a pipe nobody reads would block a daemon
        # that logs to stderr.
        with open(self.stdout_path, "wb") as out, \
                open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [daemon_path(self.venv), "--conf-dir", self.tmp,
                 *map(str, args)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                env=client_env(env), cwd=self.tmp, start_new_session=True)

    @property
    def pid(self):
        return self.proc.pid

    def _output(self):
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"upstream daemon exited {self.proc.returncode}: "
                    f"{self._output()}\n--- log ---\n{self._log_tail()}")
            try:
                resp, _ = self.api.request("GET", "/tickets/probe")
                return resp.status == 404
            except OSError:
                return False
        testutil.wait_for(ready, timeout, message="upstream daemon ready")
        return self

    def _log_tail(self, size=4000):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-size:]
        except FileNotFoundError:
            return "(no log)"

    @property
    def remote_port(self):
        """The TCP port the remote service listens on (port 0 in the
        config means the kernel chose it)."""
        if self._remote_port is None:
            port = int(self.conf["remote"].get("port", 0))
            if port == 0:
                ports = listening_ports(self.proc.pid)
                if len(ports) != 1:
                    raise AssertionError(
                        f"expected one TCP listener, found {ports}")
                port = ports[0]
            self._remote_port = port
        return self._remote_port

    def url(self, ticket_id, host="127.0.0.1"):
        """The transfer URL of a ticket on the remote service."""
        return f"https://{host}:{self.remote_port}/images/{ticket_id}"

    def stop(self, signo=None, timeout=20):
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signo or signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        finally:
            # Leftovers in the daemon's session (it starts none normally).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            shutil.rmtree(self.conf["daemon"]["run_dir"], ignore_errors=True)
            with open(self.stdout_path, errors="replace") as f:
                self.stdout = f.read()
            self.stderr = self._output()
        return self.proc.returncode

    def __enter__(self):
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc_info):
        self.stop()


def listening_ports(pid):
    """TCP ports on which process pid has listening sockets."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            target = os.readlink(os.path.join(fd_dir, fd))
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEXIP:HEXPORT; state 0A is LISTEN.
            if fields[3] == "0A" and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return sorted(ports)


def sdk_path(directory):
    """A directory for PYTHONPATH holding only the SDK and pycurl of this
    venv: upstream's venv lacks them, and this venv's site-packages would
    shadow upstream's ovirt_imageio."""
    import ovirtsdk4
    site = os.path.dirname(os.path.dirname(ovirtsdk4.__file__))
    os.makedirs(directory)
    for name in ("ovirtsdk4", "pycurl", "pycurl.libs", "curl"):
        if os.path.exists(os.path.join(site, name)):
            os.symlink(os.path.join(site, name),
                       os.path.join(directory, name))
    return directory


if __name__ == "__main__":
    try:
        print(anchor_venv())
    except AnchorError as e:
        print(f"upstream: {e}", file=sys.stderr)
        sys.exit(1)

