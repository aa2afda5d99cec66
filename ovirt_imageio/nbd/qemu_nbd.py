"""
qemu-nbd processes: start an export of an image, wait until it serves,
stop it.

State: process. The spawner thread and the set of running servers are
module globals; a Server holds its own process.

Orphans. No qemu-nbd may outlive the daemon, even when the daemon is
killed with SIGKILL and has no chance to clean up. Each qemu-nbd is made
to receive SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG, set in
the child between fork and exec). But the kernel's "parent" here is the
*thread* that forked, not the process: pdeathsig fires as soon as that
thread exits. The daemon starts exports from short-lived per-connection
threads, so a qemu-nbd forked from one would be killed when the HTTP
connection that started it closes. Therefore every qemu-nbd is forked by
one long-lived spawner thread that lives as long as the process: requests
go through a queue and the Popen comes back through a future.

Death. A qemu-nbd may die on its own (killed, out of memory, a crash).
The spawner thread also reaps: it waits in poll(2) on a pidfd per child
and on an eventfd that wakes it for new requests, so a dead child is
waited for at once (no zombie until the ticket goes) and logged; its
Server says so (alive, returncode), and the owner decides what to do
(nbd/backend.py starts a new one on the next request).

Readiness. qemu-nbd listens on its socket *before* it opens the image, so
a successful connect() proves nothing: qemu-nbd may still fail to open
the image and exit. We poll until an NBD handshake succeeds (the server
greets only after the export exists), checking between attempts that the
process has not exited.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import ctypes
import functools
import logging
import os
import select
import queue
import signal
import subprocess
import tempfile
import threading
import time

import nbd

from ovirt_imageio import errors
from ovirt_imageio.nbd import url

log = logging.getLogger(__name__)

QEMU_NBD = "qemu-nbd"

# How often to check whether a starting qemu-nbd serves. Measured here,
# start() returns in ~13 ms (qcow2, local disk); a 10 ms interval adds at
# most 10 ms to a start and costs one connection attempt per interval.
POLL_INTERVAL = 0.01

# Longest stderr kept in an error message; qemu-nbd's errors are one line.
MAX_STDERR = 4096

# From <linux/prctl.h>; no Python module exposes it.
_PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong,
                   ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


class Server:
    """
    A running qemu-nbd serving one image on a unix socket.

    Attributes: path, socket, fmt, read_only, pid, address (url.Address).
    """

    def __init__(self, proc, path, socket, fmt, read_only, stderr):
        self._proc = proc
        self._stderr = stderr
        self._lock = threading.Lock()
        self._stopped = False
        # Set before stop() terminates qemu-nbd: its exit is expected.
        self._stopping = False
        # qemu-nbd's stderr, read when stopped.
        self.stderr = ""
        self.path = path
        self.socket = socket
        self.fmt = fmt
        self.read_only = read_only
        self.pid = proc.pid
        self.address = url.Address(socket=socket)

    def __repr__(self):
        return (f"<qemu_nbd.Server pid={self.pid} path={self.path!r} "
                f"socket={self.socket!r} fmt={self.fmt} "
                f"stopped={self._stopped}>")

    @property
    def alive(self):
        """True while the qemu-nbd process runs."""
        return self._proc.poll() is None

    @property
    def returncode(self):
        """The exit code once exited (-N: killed by signal N), else None."""
        return self._proc.poll()

    def _exited(self):
        """Called by the reaper once the process was waited for."""
        if self._stopping:
            return
        log.warning("qemu-nbd pid=%s exited unexpectedly exitcode=%s "
                    "path=%s socket=%s stderr=%r", self.pid,
                    self._proc.returncode, self.path, self.socket,
                    _read_tail(_read(self._stderr)))

    def stop(self, timeout=5):
        """
        Terminate qemu-nbd, wait up to timeout seconds, kill it if needed,
        and remove the socket. Idempotent and thread safe.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopping = True
            _terminate(self._proc, timeout)
            _remove(self.socket)
            self.stderr = _read(self._stderr)
            self._stderr.close()
            self._stopped = True
        with _servers_lock:
            _servers.discard(self)
        log.info("Stopped qemu-nbd pid=%s socket=%s exitcode=%s",
                 self.pid, self.socket, self._proc.returncode)
        if self.stderr:
            log.debug("qemu-nbd pid=%s stderr: %s", self.pid, self.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def start(path, socket, *, fmt="raw", read_only=False, shared=8, cache=None,
          aio="native", discard=True, bitmap=None, allocation_depth=True,
          timeout=10):
    """
    Start qemu-nbd exporting the image at path in format fmt on the unix
    socket path socket, and wait until it serves.

    The format is always given (qemu-nbd never probes). cache=None picks
    direct I/O (--cache=none --aio=AIO) when the file system supports
    O_DIRECT, else --cache=writeback; any other value is passed as
    --cache. aio is the AIO engine for direct I/O: "native" serves deep
    queues best, but qemu-nbd then needs ~40 ms to exit (measured: 2 ms
    with "threads"), which short-lived exports notice. bitmap exports a
    persistent dirty bitmap.

    Returns a Server. Raises errors.ExportError with qemu-nbd's stderr if
    it does not serve within timeout seconds; nothing is left running.
    """
    # An absolute path never looks like a qemu protocol ("nbd:", "json:")
    # or an option.
    path = os.path.abspath(path)
    # Messages name the image, never the socket: they reach HTTP clients
    # (backend.py); the socket is logged.
    if len(os.fsencode(socket)) > url.MAX_SOCKET_PATH:
        log.error("Cannot export %s: socket path %r is longer than %s bytes",
                  path, socket, url.MAX_SOCKET_PATH)
        raise errors.ExportError(
            f"Cannot export {path}: its socket path is longer than "
            f"{url.MAX_SOCKET_PATH} bytes")

    cmd = [
        QEMU_NBD,
        f"--format={fmt}",
        f"--socket={socket}",
        f"--shared={shared}",
        "--persistent",
    ]
    if cache is None:
        if supports_direct_io(path):
            cmd += ["--cache=none", f"--aio={aio}"]
        else:
            cmd.append("--cache=writeback")
    else:
        cmd.append(f"--cache={cache}")
    if discard:
        cmd.append("--discard=unmap")
    if allocation_depth:
        cmd.append("--allocation-depth")
    if bitmap is not None:
        cmd.append(f"--bitmap={bitmap}")
    if read_only:
        cmd.append("--read-only")
    cmd.append(path)

    stderr = tempfile.TemporaryFile()
    try:
        proc = _spawner.popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            preexec_fn=functools.partial(_child_setup, os.getpid()))
    except (OSError, subprocess.SubprocessError) as e:
        stderr.close()
        raise errors.ExportError(
            f"Cannot export {path}: cannot run {QEMU_NBD}: {e}") from None

    log.debug("Starting qemu-nbd pid=%s cmd=%s", proc.pid, cmd)
    server = Server(proc, path, socket, fmt, read_only, stderr)
    with _servers_lock:
        _servers.add(server)

    try:
        _wait_until_serving(proc, socket, timeout)
    except errors.ExportError as e:
        # Kill at once: a qemu-nbd that did not start has nothing to flush.
        server.stop(timeout=0)
        output = _read_tail(server.stderr)
        log.error("Cannot export %s on %s: %s%s", path, socket, e.reason,
                  f": {output}" if output else "")
        # qemu-nbd's own words say what is wrong with the image; the
        # socket it names is ours.
        output = output.replace(socket, "(socket)")
        raise errors.ExportError(
            f"Cannot export {path}: {e.reason}"
            + (f": {output}" if output else "")) from None
    except BaseException:
        server.stop(timeout=0)
        raise

    log.info("Started qemu-nbd pid=%s path=%s fmt=%s socket=%s "
             "read_only=%s", proc.pid, path, fmt, socket, read_only)
    return server


def stop_all(timeout=5):
    """Stop every server started by this module (daemon shutdown)."""
    with _servers_lock:
        servers = list(_servers)
    # Terminate all first so they exit in parallel, then wait for each.
    for server in servers:
        server._stopping = True
        try:
            server._proc.terminate()
        except ProcessLookupError:
            pass
    for server in servers:
        server.stop(timeout)


def running():
    """Return the servers started by this module and not stopped yet."""
    with _servers_lock:
        return list(_servers)


# Private


def supports_direct_io(path):
    # O_DIRECT is a property of the file system (tmpfs refuses it with
    # EINVAL). A file we cannot open at all is left for qemu-nbd to report.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _wait_until_serving(proc, socket, timeout):
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise errors.ExportError(
                f"qemu-nbd exited with code {proc.returncode}")
        if _serving(socket, deadline):
            return
        if proc.poll() is not None:
            raise errors.ExportError(
                f"qemu-nbd exited with code {proc.returncode}")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise errors.ExportError(
                f"qemu-nbd did not serve within {timeout} seconds")
        # Doubles as the poll interval and as a wait for an early exit.
        try:
            proc.wait(min(POLL_INTERVAL, remaining))
        except subprocess.TimeoutExpired:
            pass


def _serving(socket, deadline):
    """
    Return True if an NBD server greets us on socket before deadline.
    The handshake ends with NBD_OPT_ABORT, so qemu-nbd logs nothing.
    """
    if not os.path.exists(socket):
        return False
    h = nbd.NBD()
    try:
        h.set_opt_mode(True)
        h.aio_connect_unix(socket)
        while h.aio_is_connecting():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            h.poll(max(1, int(remaining * 1000)))
        if not h.aio_is_negotiating():
            return False
        h.opt_abort()
        return True
    except nbd.Error:
        return False


def _child_setup(parent_pid):
    """
    Run in the child between fork and exec. Only calls resolved before the
    fork: no imports, no locks.
    """
    if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    # The parent may have died before prctl; then no signal will come.
    if os.getppid() != parent_pid:
        os._exit(1)
    # Its own process group: a Ctrl-C on the terminal (SIGINT to the
    # foreground group) reaches the command that started qemu-nbd, which
    # stops it after using it cleanly (flush), and not qemu-nbd itself
    # in the middle of a transfer.
    os.setpgid(0, 0)


def _terminate(proc, timeout):
    if proc.poll() is None:
        try:
            proc.terminate()
            _wait(proc, timeout)
        except subprocess.TimeoutExpired:
            log.warning("qemu-nbd pid=%s did not terminate in %s seconds, "
                        "killing it", proc.pid, timeout)
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            proc.wait()


def _wait(proc, timeout):
    """
    Wait for proc to exit. Popen.wait(timeout) polls with sleeps growing to
    50 ms, which was two thirds of a sparse download's time; a pidfd wakes
    us when the process exits.
    """
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        proc.wait(timeout)
        return
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    if not ready:
        raise subprocess.TimeoutExpired(proc.args, timeout)
    proc.wait()


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read(f):
    # pread: the reaper and stop() may read at once; no shared offset.
    try:
        data = b""
        while True:
            chunk = os.pread(f.fileno(), 65536, len(data))
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace").strip()
    except (OSError, ValueError):
        return ""


def _read_tail(text):
    if len(text) > MAX_STDERR:
        text = "..." + text[-MAX_STDERR:]
    return text


class _Spawner:
    """
    Runs subprocess.Popen in one long-lived daemon thread, so that the
    parent thread of every qemu-nbd lives as long as the process (see
    "Orphans" above), and reaps the children as they exit (see "Death").
    Started on first use.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._wake = None

    def popen(self, args, **kwargs):
        future = concurrent.futures.Future()
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._wake is None:
                    self._wake = os.eventfd(0, os.EFD_CLOEXEC)
                self._thread = threading.Thread(
                    target=self._run, name="qemu-nbd-spawner", daemon=True)
                self._thread.start()
        self._queue.put((future, args, kwargs))
        os.eventfd_write(self._wake, 1)
        return future.result()

    def _run(self):
        # Never exits: its children would get SIGTERM if it did.
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        children = {}
        while True:
            for fd, _ in poller.poll():
                if fd == self._wake:
                    os.eventfd_read(self._wake)
                    self._spawn_all(poller, children)
                else:
                    poller.unregister(fd)
                    os.close(fd)
                    _reaped(children.pop(fd))

    def _spawn_all(self, poller, children):
        while True:
            try:
                future, args, kwargs = self._queue.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                proc = subprocess.Popen(args, **kwargs)
            except BaseException as e:
                future.set_exception(e)
                continue
            try:
                fd = os.pidfd_open(proc.pid)
            except OSError as e:
                # Cannot happen for our own live or zombie child; without
                # it the child is reaped by whoever polls it.
                log.warning("Cannot watch qemu-nbd pid=%s: %s", proc.pid, e)
            else:
                children[fd] = proc
                poller.register(fd, select.POLLIN)
            future.set_result(proc)


def _reaped(proc):
    """Wait for an exited child and tell its Server, if it has one."""
    proc.poll()
    with _servers_lock:
        server = next((s for s in _servers if s._proc is proc), None)
    if server is not None:
        server._exited()


_spawner = _Spawner()
_servers = set()
_servers_lock = threading.Lock()


def _after_fork_in_child():
    # A forked child has no spawner thread, and the servers are not its
    # children.
    global _spawner, _servers, _servers_lock
    _spawner = _Spawner()
    _servers = set()
    _servers_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)

# On a normal exit, stop servers gracefully; on any other death pdeathsig
# takes care of them.
atexit.register(stop_all)
