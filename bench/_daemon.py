"""
What the memory benchmarks (conn_memory.py, idle_conns.py) share: a
daemon (ours, or upstream's from the anchor venv) with its config in a
work directory, qemu-nbd exports, tickets, and readings of the daemon's
memory, threads and fds from /proc.
"""

import os
import resource
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))

import testutil  # noqa: E402

MiB = 1 << 20

OURS = os.path.join(os.path.dirname(sys.executable), "ovirt-imageio")
UPSTREAM = os.path.expanduser(
    "~/.cache/imageio-anchor/venv/bin/ovirt-imageio")


def status(pid):
    """VmRSS, VmHWM, RssAnon (KiB) and Threads of process pid."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
                out[key] = int(line.split()[1])
    return out


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset_hwm(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def largest_mappings(pid, count=10):
    """[rss KiB, smaps header line] of the count largest mappings."""
    regions = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                regions.append([0, line.strip()])
            elif fields[0] == "Rss:":
                regions[-1][0] = int(fields[1])
    regions.sort(reverse=True)
    return regions[:count]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Timed out waiting for {what}")
        time.sleep(0.05)


def raise_nofile():
    """Soft fd limit up to the hard one, for us and the processes we
    start: both ends of every connection are on this host."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    """A work directory with a PKI; everything started in it is stopped
    by close()."""

    def __init__(self, work):
        self.work = work
        self.pki = testutil.make_pki(os.path.join(work, "pki"))
        self.procs = []
        self.run_dirs = []

    def client_context(self):
        return ssl.create_default_context(cafile=self.pki["ca_file"])

    def export(self, name, size, shared):
        """A raw image of size bytes served by qemu-nbd to up to shared
        clients; return its NBD URL."""
        image = os.path.join(self.work, f"{name}.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image,
                        str(size)], check=True, timeout=60)
        sock = os.path.join(self.work, f"{name}.sock")
        self.procs.append(subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared", str(shared),
             "--format", "raw", "--socket", sock, image]))
        wait_for(lambda: os.path.exists(sock), 30, "qemu-nbd")
        return f"nbd:unix:{sock}"

    def daemon(self, name, cmd=OURS, env=None, **overrides):
        """Start a daemon (command line cmd) configured by
        testutil.daemon_conf() and overrides; return it once it serves."""
        conf_dir = os.path.join(self.work, name)
        os.mkdir(conf_dir)
        conf = testutil.daemon_conf(conf_dir, self.pki, **overrides)
        conf["remote"]["port"] = str(free_port())
        testutil.write_conf(conf_dir, conf)
        self.run_dirs.append(conf["daemon"]["run_dir"])
        proc = subprocess.Popen(
            [*shlex.split(cmd), "--conf-dir", conf_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env=env, cwd=conf_dir)
        self.procs.append(proc)
        d = Daemon(proc, conf)
        d.wait_ready()
        return d

    def close(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        for path in self.run_dirs:
            shutil.rmtree(path, ignore_errors=True)


class Daemon:

    def __init__(self, proc, conf):
        self.proc = proc
        self.pid = proc.pid
        self.conf = conf
        self.port = int(conf["remote"]["port"])
        self.control = testutil.Control(conf["control"]["socket"])

    def wait_ready(self, timeout=30):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited with {self.proc.returncode}")
            try:
                resp, _ = self.control.request("GET", "/tickets/probe")
                return resp.status == 404
            except OSError:
                return False
        wait_for(ready, timeout, "the daemon")

    def add_ticket(self, ticket_id, url, size, ops=("read",)):
        resp, _ = self.control.request("PUT", f"/tickets/{ticket_id}", {
            "uuid": ticket_id, "size": size, "url": url,
            "timeout": 3000, "inactivity_timeout": 3000, "ops": list(ops)})
        if resp.status != 200:
            raise RuntimeError(f"Adding a ticket: {resp.status}")

    def status(self):
        return status(self.pid)

    def fds(self):
        return fds(self.pid)
