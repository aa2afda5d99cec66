"""Helpers shared by tests: configuration, PKI, control API clients."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

from ovirt_imageio import admin

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_pki(directory):
    subprocess.run([os.path.join(ROOT, "dev", "mkpki"), str(directory)],
                   check=True)
    return {
        "ca_file": os.path.join(directory, "ca.pem"),
        "cert_file": os.path.join(directory, "cert.pem"),
        "key_file": os.path.join(directory, "key.pem"),
    }


def write_conf(conf_dir, sections, name="50-test.conf"):
    """Write {section: {key: value}} as an INI file in conf_dir/conf.d."""
    d = os.path.join(conf_dir, "conf.d")
    os.makedirs(d, exist_ok=True)
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{k} = {v}" for k, v in values.items())
        lines.append("")
    path = os.path.join(d, name)
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path


def daemon_conf(tmp, pki, **overrides):
    """
    A test daemon's configuration: random ports, sockets under tmp, and a
    short run dir (qemu-nbd sockets live there; a unix socket path is at
    most 107 bytes). The caller removes the run dir.
    """
    run_dir = tempfile.mkdtemp(prefix="oi-run-", dir="/tmp")
    sections = {
        "daemon": {"run_dir": run_dir, "drop_privileges": "false",
                   "systemd_enable": "false"},
        "tls": dict(pki),
        "remote": {"host": "127.0.0.1", "port": "0"},
        "local": {"socket": os.path.join(tmp, "local.sock")},
        "control": {"transport": "unix",
                    "socket": os.path.join(tmp, "control.sock")},
        "handlers": {"keys": "logfile"},
        "handler_logfile": {"args": repr((os.path.join(tmp, "daemon.log"),))},
    }
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


# The admin tool's unix-socket HTTP connection serves the tests too.
UnixHTTPConnection = admin.UnixHTTPConnection


class Control:
    """A control API client, one connection per call as vdsm does."""

    def __init__(self, path):
        self.path = path

    def request(self, method, path, body=None, headers=None):
        conn = UnixHTTPConnection(self.path)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
            return resp, data
        finally:
            conn.close()

    def put(self, ticket):
        return self.request("PUT", f"/tickets/{ticket['uuid']}", ticket)

    def get(self, ticket_id):
        resp, data = self.request("GET", f"/tickets/{ticket_id}")
        assert resp.status == 200, data
        return json.loads(data)

    def delete(self, ticket_id):
        return self.request("DELETE", f"/tickets/{ticket_id}")


def wait_for(predicate, timeout=10, interval=0.02, message="condition"):
    """Poll predicate until it is true, or fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"Timeout waiting for {message}")
        time.sleep(interval)


def wait_for_ticket(api, ticket_id, **expected):
    """
    Poll the ticket's status until its fields have the expected values;
    return the status. A GET's last bytes reach the client a moment
    before the daemon counts them and ends the operation.
    """
    def settled():
        info = api.get(ticket_id)
        if all(info[k] == v for k, v in expected.items()):
            return info
        return None

    return wait_for(settled, message=f"ticket status {expected}")


def raw_request(address, data, family=socket.AF_UNIX, timeout=10):
    """Send raw bytes, return everything the server sends until it closes
    or goes quiet (for checking exact framing)."""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def bin_path(name):
    """A console script installed in the venv running the tests."""
    import sys
    return os.path.join(os.path.dirname(sys.executable), name)


class DaemonProcess:
    """An ovirt-imageio daemon in a child process, for process-level tests."""

    def __init__(self, tmp, pki, args=(), env=None, preexec_fn=None,
                 **overrides):
        self.tmp = str(tmp)
        self.conf = testutil_conf = daemon_conf(self.tmp, pki, **overrides)
        write_conf(self.tmp, testutil_conf)
        self.control_socket = testutil_conf["control"]["socket"]
        self.log = os.path.join(self.tmp, "daemon.log")
        self.proc = subprocess.Popen(
            [bin_path("ovirt-imageio"), "--conf-dir", self.tmp, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            preexec_fn=preexec_fn)
        self.api = Control(self.control_socket)

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode}: "
                    f"{self.proc.stderr.read().decode()}")
            try:
                resp, _ = self.api.request("GET", "/tickets/probe")
                return resp.status == 404
            except OSError:
                return False
        wait_for(ready, timeout, message="daemon ready")
        return self

    def wait_exit(self, timeout=30):
        """Wait for a daemon that should fail to start; return its status."""
        self.proc.wait(timeout)
        return self.stop()

    def stop(self, signo=None, timeout=20):
        import signal
        if self.proc.poll() is None:
            self.proc.send_signal(signo or signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        shutil.rmtree(self.conf["daemon"]["run_dir"], ignore_errors=True)
        self.stdout = self.proc.stdout.read().decode()
        self.stderr = self.proc.stderr.read().decode()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode


def children(pid):
    """Pids of the live child processes of pid, forked by any thread."""
    pids = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            pass
    return pids


def qemu_nbd_pids():
    """Pids of every running qemu-nbd process."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0]
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if os.path.basename(argv0) == b"qemu-nbd" and state != "Z":
            pids.append(int(name))
    return pids


# Images for end-to-end tests.

def make_image(path, fmt, size=4 * 1024**2):
    """An image of format fmt with data, a zeroed range and holes."""
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path),
                    str(size)], check=True)
    qemu_io(path, fmt, "write -P 0x41 0 64k", "write -P 0x42 1m 512k",
            "write -z 2m 64k", "write -P 0x43 3m 4k")
    return str(path)


def qemu_io(path, fmt, *commands):
    args = ["qemu-io", "-f", fmt]
    for c in commands:
        args += ["-c", c]
    subprocess.run([*args, str(path)], check=True, stdout=subprocess.DEVNULL)


def compare(a, b):
    p = subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    assert p.returncode == 0, f"{a} != {b}: {p.stdout}{p.stderr}"


def parse_metrics(text):
    """
    Parse Prometheus text with the client library's parser (which fails on
    malformed text): {(sample name, ((label, value), ...)): value}, labels
    sorted.
    """
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = s.value
    return samples


def get_metrics(daemon):
    """GET /metrics on the daemon's control service: (text, samples)."""
    resp, data = daemon.api.request("GET", "/metrics")
    assert resp.status == 200, data
    assert resp.getheader("content-type").startswith("text/plain")
    text = data.decode("utf-8")
    return text, parse_metrics(text)
