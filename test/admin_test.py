"""ovirt-imageioctl against a running daemon."""

import json
import subprocess

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
