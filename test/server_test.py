"""The daemon as a process: configuration, start-up errors, signals."""

import json
import os
import signal
import socket
import subprocess

import pytest

import testutil


def run(*args):
    return subprocess.run([testutil.bin_path("ovirt-imageio"), *args],
                          capture_output=True, text=True, timeout=60)


def test_show_config(tmp_path, pki):
    testutil.write_conf(tmp_path, {"remote": {"port": "54323"},
                                   "control": {"transport": "tcp",
                                               "port": "54324"}})
    r = run("--conf-dir", str(tmp_path), "--show-config")
    assert r.returncode == 0, r.stderr
    cfg = json.loads(r.stdout)
    assert cfg["remote"]["port"] == 54323
    assert cfg["control"]["transport"] == "tcp"
    assert cfg["daemon"]["max_connections"] == 8
    assert cfg["local"]["socket"] == "\0/org/ovirt/imageio"


def test_no_conf_files(tmp_path):
    r = run("--conf-dir", str(tmp_path), "--show-config")
    assert r.returncode != 0
    assert f"Could not find {tmp_path}/conf.d/*.conf" in r.stderr


def test_bad_value(tmp_path):
    path = testutil.write_conf(
        tmp_path, {"daemon": {"max_connections": "many"}}, "99-local.conf")
    r = run("--conf-dir", str(tmp_path))
    assert r.returncode != 0
    assert path in r.stderr
    assert "[daemon] max_connections" in r.stderr
    assert "Traceback" not in r.stderr


def test_tls_without_cert(tmp_path, pki):
    d = testutil.DaemonProcess(
        tmp_path, pki, tls={"cert_file": "", "key_file": ""},
        handlers={"keys": "stderr"}, logger_root={"handlers": "stderr"})
    assert d.wait_exit() != 0
    assert "cert_file and key_file are required" in d.stderr
    assert "Traceback" not in d.stderr


@pytest.mark.parametrize("key", ["cert_file", "key_file", "ca_file"])
def test_tls_file_missing(tmp_path, pki, key):
    missing = str(tmp_path / f"missing-{key}.pem")
    d = testutil.DaemonProcess(tmp_path, pki, tls={key: missing})
    assert d.wait_exit() != 0
    assert d.stderr == (
        f"ovirt-imageio: Cannot start: [tls] {key} {missing!r}: "
        f"[Errno 2] No such file or directory\n")


def test_tls_file_invalid(tmp_path, pki):
    # The key file holds a certificate: OpenSSL cannot say which file.
    d = testutil.DaemonProcess(tmp_path, pki,
                               tls={"key_file": pki["cert_file"]})
    assert d.wait_exit() != 0
    assert d.stderr.startswith(
        f"ovirt-imageio: Cannot start: [tls] cert_file "
        f"{pki['cert_file']!r}, key_file {pki['cert_file']!r}: ")
    assert "Traceback" not in d.stderr


def test_tls_ca_file_invalid(tmp_path, pki):
    d = testutil.DaemonProcess(tmp_path, pki,
                               tls={"ca_file": pki["key_file"]})
    assert d.wait_exit() != 0
    assert d.stderr.startswith(
        f"ovirt-imageio: Cannot start: [tls] ca_file "
        f"{pki['key_file']!r}: ")
    assert "Traceback" not in d.stderr


def test_port_in_use(tmp_path, pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = testutil.DaemonProcess(tmp_path, pki, remote={"port": str(port)})
        assert d.wait_exit() != 0
        assert d.stderr == (
            f"ovirt-imageio: Cannot start: remote service on "
            f"127.0.0.1:{port}: [Errno 98] Address already in use\n")
    with open(d.log) as f:
        assert (f"Cannot start: remote service on 127.0.0.1:{port}: "
                f"[Errno 98] Address already in use") in f.read()


def test_control_port_in_use(tmp_path, pki):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = testutil.DaemonProcess(
            tmp_path, pki, control={"transport": "tcp", "port": str(port)})
        assert d.wait_exit() != 0
        assert d.stderr == (
            f"ovirt-imageio: Cannot start: control service on "
            f"localhost:{port}: [Errno 98] Address already in use\n")


def test_bad_host(tmp_path, pki):
    d = testutil.DaemonProcess(tmp_path, pki,
                               remote={"host": "no-such-host.invalid"})
    assert d.wait_exit() != 0
    assert d.stderr.startswith(
        "ovirt-imageio: Cannot start: remote service on "
        "no-such-host.invalid:0: ")
    assert "Traceback" not in d.stderr


@pytest.mark.parametrize("service", ["local", "control"])
def test_socket_directory_missing(tmp_path, pki, service):
    path = str(tmp_path / "missing" / f"{service}.sock")
    d = testutil.DaemonProcess(tmp_path, pki, **{service: {"socket": path}})
    assert d.wait_exit() != 0
    assert d.stderr.startswith(
        f"ovirt-imageio: Cannot start: {service} service on {path!r}: "
        f"[Errno 2] No such file or directory")
    assert "Traceback" not in d.stderr


def test_ticket_file_invalid(tmp_path, pki):
    path = tmp_path / "ticket.json"
    path.write_text('{"uuid": "t", "size": ' + "9" * 5000 + "}")
    d = testutil.DaemonProcess(tmp_path / "d", pki,
                               args=["--ticket", str(path)])
    assert d.wait_exit() != 0
    assert d.stderr.startswith(
        f"ovirt-imageio: Cannot start: Cannot read ticket {str(path)!r}: "
        f"Exceeds the limit (4300 digits)")


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT],
                         ids=["SIGTERM", "SIGINT"])
def test_clean_shutdown(tmp_path, pki, signo):
    d = testutil.DaemonProcess(tmp_path, pki).wait_ready()
    assert os.path.exists(d.control_socket)
    assert d.stop(signo) == 0
    assert not os.path.exists(d.control_socket)
    assert "Traceback" not in d.stderr
    with open(d.log) as f:
        assert "Stopped" in f.read()


def test_ticket_option(tmp_path, pki):
    ticket = {"uuid": "t1", "size": 1024, "ops": ["read"], "timeout": 300,
              "url": "nbd:unix:/nowhere.sock", "transfer_id": "x"}
    path = tmp_path / "ticket.json"
    path.write_text(json.dumps(ticket))
    d = testutil.DaemonProcess(tmp_path / "d", pki,
                               args=["--ticket", str(path)])
    try:
        d.wait_ready()
        assert d.api.get("t1")["transfer_id"] == "x"
    finally:
        assert d.stop() == 0


def test_systemd_notify(tmp_path, pki):
    addr = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(addr)
        s.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=addr)
        d = testutil.DaemonProcess(
            tmp_path / "d", pki, env=env, daemon={"systemd_enable": "true"})
        try:
            assert s.recv(100) == b"READY=1"
            # Ready means serving.
            assert d.api.request("GET", "/tickets/x")[0].status == 404
        finally:
            assert d.stop() == 0


# A daemon stopped or killed in the middle of a transfer (SIGTERM: it
# stops cleanly; SIGKILL: it cannot clean up): the client gets an error,
# never a success; what was flushed before is on disk; no qemu-nbd of the
# daemon outlives it.

MiB = 1024**2


def _file_ticket(path, ops):
    return {"uuid": "sig-ticket", "size": 32 * MiB, "ops": ops,
            "timeout": 300, "url": f"file://{path}", "transfer_id": "sig"}


def _unix_connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def _read_reply(s):
    """Everything the daemon sends until it closes (or resets)."""
    chunks = []
    try:
        while True:
            chunk = s.recv(1024**2)
            if not chunk:
                break
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def _put(s, offset, body, flush):
    head = (f"PUT /images/sig-ticket?flush={'y' if flush else 'n'} "
            f"HTTP/1.1\r\ncontent-length: {len(body)}\r\n"
            f"content-range: bytes {offset}-{offset + len(body) - 1}/*\r\n"
            f"\r\n").encode()
    s.sendall(head + body)


def _owned_qemu_nbd(d):
    pids = testutil.children(d.proc.pid)
    return [p for p in pids if p in testutil.qemu_nbd_pids()]


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_signal_mid_upload(tmp_path, pki, signo):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(32 * MiB)
    d = testutil.DaemonProcess(tmp_path / "d", pki).wait_ready()
    try:
        resp, data = d.api.put(_file_ticket(image, ["write"]))
        assert resp.status == 200, data
        local = d.conf["local"]["socket"]
        flushed = b"\x5a" * (4 * MiB)
        s = _unix_connect(local)
        _put(s, 0, flushed, flush=True)
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 "), reply
        owned = _owned_qemu_nbd(d)
        assert owned, "the file ticket's qemu-nbd runs"

        # Half of a 16 MiB body, then the signal.
        head = (b"PUT /images/sig-ticket?flush=n HTTP/1.1\r\n"
                b"content-length: %d\r\n"
                b"content-range: bytes %d-%d/*\r\n\r\n"
                % (16 * MiB, 8 * MiB, 24 * MiB - 1))
        s.sendall(head + b"\xa5" * (8 * MiB))
        testutil.wait_for(
            lambda: d.api.get("sig-ticket")["active"], message="PUT active")
        d.proc.send_signal(signo)
        try:
            s.sendall(b"\xa5" * (8 * MiB))
        except (BrokenPipeError, ConnectionResetError):
            pass
        reply = _read_reply(s)
        s.close()
        # An error or a cut connection; never a success.
        assert not reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"Traceback" not in reply
        d.proc.wait(30)
        testutil.wait_for(
            lambda: not set(owned) & set(testutil.qemu_nbd_pids()),
            timeout=20, message="qemu-nbd gone with the daemon")
    finally:
        code = d.stop()
    if signo == signal.SIGTERM:
        assert code == 0
        assert "Traceback" not in d.stderr
        with open(d.log) as f:
            assert "Stopped" in f.read()
    else:
        assert code == -signal.SIGKILL
    with open(image, "rb") as f:
        assert f.read(4 * MiB) == flushed


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGKILL],
                         ids=["SIGTERM", "SIGKILL"])
def test_signal_mid_download(tmp_path, pki, signo):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.write(os.urandom(32 * MiB))
    d = testutil.DaemonProcess(tmp_path / "d", pki).wait_ready()
    try:
        resp, data = d.api.put(_file_ticket(image, ["read"]))
        assert resp.status == 200, data
        s = _unix_connect(d.conf["local"]["socket"])
        # A small receive buffer keeps the daemon from sending it all
        # before the signal arrives.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(b"GET /images/sig-ticket HTTP/1.1\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first[:200]
        owned = _owned_qemu_nbd(d)
        d.proc.send_signal(signo)
        reply = first + _read_reply(s)
        s.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        # Cut short: the client can tell the body is incomplete.
        assert b"content-length: %d" % (32 * MiB) in head
        assert len(body) < 32 * MiB
        d.proc.wait(30)
        testutil.wait_for(
            lambda: not set(owned) & set(testutil.qemu_nbd_pids()),
            timeout=20, message="qemu-nbd gone with the daemon")
    finally:
        code = d.stop()
    if signo == signal.SIGTERM:
        assert code == 0
        assert "Traceback" not in d.stderr
    else:
        assert code == -signal.SIGKILL
