"""ovirt-imageioctl against a running daemon."""

import json
import os
import pty
import select
import signal
import socket
import subprocess
import time

import pytest

import testutil


@pytest.fixture
def daemon(tmp_path, pki):
    d = testutil.DaemonProcess(tmp_path, pki).wait_ready()
    yield d
    d.stop()


def ctl(d, *args, input=None):
    return subprocess.run(
        [testutil.bin_path("ovirt-imageioctl"), "--conf-dir", d.tmp, *args],
        capture_output=True, text=True, input=input, timeout=60)


TICKET = {"uuid": "t1", "size": 4096, "ops": ["write"], "timeout": 300,
          "url": "nbd:unix:/nowhere.sock", "transfer_id": "tr-1"}


def test_lifecycle(daemon, tmp_path):
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(TICKET))
    r = ctl(daemon, "add-ticket", str(path))
    assert r.returncode == 0, r.stderr

    r = ctl(daemon, "show-ticket", "t1")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["transfer_id"] == "tr-1"
    expires = info["expires"]

    r = ctl(daemon, "mod-ticket", "t1", "--timeout", "3000")
    assert r.returncode == 0, r.stderr
    assert json.loads(
        ctl(daemon, "show-ticket", "t1").stdout)["expires"] > expires

    r = ctl(daemon, "del-ticket", "t1")
    assert r.returncode == 0, r.stderr
    r = ctl(daemon, "show-ticket", "t1")
    assert r.returncode == 1
    assert "404" in r.stderr and "No such ticket" in r.stderr


def test_add_from_stdin(daemon):
    r = ctl(daemon, "add-ticket", "-", input=json.dumps(TICKET))
    assert r.returncode == 0, r.stderr
    assert daemon.api.get("t1")["size"] == 4096


def test_add_invalid(daemon, tmp_path):
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(dict(TICKET, size="big")))
    r = ctl(daemon, "add-ticket", str(path))
    assert r.returncode == 1
    assert "400" in r.stderr and "Invalid value for 'size'" in r.stderr


def test_add_unreadable(daemon, tmp_path):
    r = ctl(daemon, "add-ticket", str(tmp_path / "missing.json"))
    assert r.returncode == 1
    assert "Cannot read ticket" in r.stderr


def test_no_daemon(tmp_path, pki):
    testutil.write_conf(tmp_path, testutil.daemon_conf(str(tmp_path), pki))
    r = subprocess.run(
        [testutil.bin_path("ovirt-imageioctl"), "--conf-dir", str(tmp_path),
         "show-ticket", "x"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "Cannot reach the control service" in r.stderr


def run_ctl(*args):
    return subprocess.run(
        [testutil.bin_path("ovirt-imageioctl"), *args],
        capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("where", ["before", "after"])
def test_conf_dir_before_or_after_command(daemon, where):
    # Upstream's syntax: `show-ticket -c DIR ID`; ours also took it first.
    daemon.api.put(TICKET)
    if where == "before":
        r = run_ctl("-c", daemon.tmp, "show-ticket", "t1")
    else:
        r = run_ctl("show-ticket", "-c", daemon.tmp, "t1")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["transfer_id"] == "tr-1"


def test_conf_dir_after_command_wins(daemon, tmp_path):
    # The sub-command's -c is the one given last.
    r = run_ctl("-c", str(tmp_path / "nowhere"), "show-ticket",
                "--conf-dir", daemon.tmp, "nope")
    assert r.returncode == 1
    assert "404" in r.stderr and "No such ticket" in r.stderr


@pytest.mark.parametrize("command", ["start-profile", "stop-profile"])
def test_profile_not_supported(daemon, command):
    r = run_ctl(command, "-c", daemon.tmp)
    assert r.returncode == 1
    assert r.stderr == (
        "ovirt-imageioctl: Profiling is not supported by the daemon: "
        "yappi is not installed\n")


# status

MiB = 1024**2


@pytest.fixture
def stalled(daemon, nbdkit):
    """
    A GET of 64 MiB on the local socket whose client read 40 MiB and
    stopped: a transfer running while status looks. The bytes are
    spliced in pieces of the export's maximum request (32 MiB): the
    first piece is done, the second cannot end.
    """
    size = 64 * MiB
    srv = nbdkit("pattern", f"size={size}")
    resp, data = daemon.api.put({
        "uuid": "tid-secret", "size": size, "ops": ["read"], "timeout": 300,
        "url": f"nbd:unix:{srv.socket}", "transfer_id": "tr-run",
        "inactivity_timeout": 3600})
    assert resp.status == 200, data
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(daemon.conf["local"]["socket"])
    s.sendall(b"GET /images/tid-secret HTTP/1.1\r\nhost: x\r\n\r\n")
    got = 0
    while got < 40 * MiB:
        chunk = s.recv(MiB)
        assert chunk
        got += len(chunk)
    testutil.wait_for(lambda: daemon.api.get("tid-secret")["read_bytes"],
                      message="transfer running")
    yield daemon
    s.close()


def test_status_once_json(stalled):
    daemon = stalled
    r = ctl(daemon, "status", "--once", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert "tid-secret" not in r.stdout
    d = json.loads(r.stdout)
    [t] = d["transfers"]
    assert t["transfer_id"] == "tr-run"
    assert t["active"] is True
    assert 0 < t["read_bytes"] < 64 * MiB
    [c] = t["clients"]
    assert c["service"] == "local"
    assert c["client"] == f"pid={os.getpid()}"
    assert c["active"] is True
    assert c["bytes"] == t["read_bytes"]
    assert c["rate"] > 0


def test_status_once_text(stalled):
    daemon = stalled
    r = ctl(daemon, "status", "--once")
    assert r.returncode == 0, r.stderr
    assert "tid-secret" not in r.stdout
    # No screen control codes when printed once.
    assert "\x1b" not in r.stdout
    title, transfers, conns = r.stdout.split("\n\n")
    assert "1 transfers, 1 connections" in title
    header, row = transfers.splitlines()
    assert header.split()[:4] == ["TRANSFER", "OPS", "SIZE", "DONE"]
    assert row.split()[:3] == ["tr-run", "read", "64.0M"]
    assert row.split()[-1] == "active"
    header, conn = conns.splitlines()
    assert header.split() == ["TRANSFER", "CONN", "SERVICE", "CLIENT",
                              "BYTES", "RATE", "AGE", "STATE"]
    cells = conn.split()
    assert cells[0] == "tr-run"
    assert cells[2:4] == ["local", f"pid={os.getpid()}"]
    assert cells[5].endswith("/s")
    assert cells[-1] == "busy"


def test_status_empty(daemon):
    r = ctl(daemon, "status", "--once")
    assert r.returncode == 0, r.stderr
    assert "0 transfers, 0 connections" in r.stdout


def read_until(fd, predicate, timeout=30):
    """Read a pty until predicate(output) is true; return the output."""
    out = b""
    deadline = time.monotonic() + timeout
    while not predicate(out):
        left = deadline - time.monotonic()
        assert left > 0, f"timeout, output: {out!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            assert chunk, f"eof, output: {out!r}"
            out += chunk
    return out


def test_status_live_in_pty(stalled):
    daemon = stalled
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [testutil.bin_path("ovirt-imageioctl"), "--conf-dir", daemon.tmp,
         "status", "--interval", "0.2"],
        stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    try:
        # Two refreshes, each redrawn from the top of the screen.
        out = read_until(master, lambda o: o.count(b"\x1b[H\x1b[2J") >= 2
                         and o.rstrip().endswith(b"busy"))
        screen = out.rsplit(b"\x1b[H\x1b[2J", 1)[1].decode()
        assert "1 transfers, 1 connections" in screen
        assert [line for line in screen.splitlines()
                if line.startswith("tr-run ") and "active" in line]
        assert "tid-secret" not in out.decode()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        os.close(master)


def test_status_bad_interval(daemon):
    r = ctl(daemon, "status", "--interval", "0")
    assert r.returncode == 2
    assert "expecting seconds > 0" in r.stderr
