import os
import secrets
import signal
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from ovirt_imageio import errors
from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import qemu_nbd

K = 1024
M = 1024**2


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")[:-1]


@pytest.fixture
def assert_nothing_left(processes_with):
    def check(socket):
        assert processes_with(socket) == []
        assert not os.path.exists(socket)
        assert all(s.socket != socket for s in qemu_nbd.running())
    return check


def test_start_stop(make_image, sock_dir, assert_nothing_left, pid_alive):
    path = make_image(size=M, commands=("write -P 0x55 0 64k",))
    sock = os.path.join(sock_dir, "sock")
    server = qemu_nbd.start(path, sock)
    try:
        assert server.alive
        assert server in qemu_nbd.running()
        assert stat.S_ISSOCK(os.stat(sock).st_mode)
        assert server.address.socket == sock
        assert server.address.export == ""
        with client.open(server.address) as c:
            assert c.size == M
            assert c.read(64 * K, 0) == b"\x55" * 64 * K
    finally:
        server.stop()
    assert not server.alive
    assert_nothing_left(sock)
    assert not pid_alive(server.pid)


def test_own_process_group(make_image, sock_dir):
    # A terminal's Ctrl-C goes to the foreground process group; qemu-nbd
    # must not get it (its parent stops it).
    sock = os.path.join(sock_dir, "sock")
    with qemu_nbd.start(make_image(size=M), sock) as server:
        assert os.getpgid(server.pid) == server.pid
        assert os.getpgid(server.pid) != os.getpgid(0)
        with client.open(server.address) as c:
            assert c.size == M


def test_stop_twice_and_concurrently(make_image, sock_dir,
                                     assert_nothing_left):
    sock = os.path.join(sock_dir, "sock")
    server = qemu_nbd.start(make_image(size=M), sock)
    threads = [threading.Thread(target=server.stop) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    server.stop()
    assert_nothing_left(sock)


def test_context_manager(make_image, sock_dir, assert_nothing_left):
    sock = os.path.join(sock_dir, "sock")
    with qemu_nbd.start(make_image(size=M), sock) as server:
        assert server.alive
    assert not server.alive
    assert_nothing_left(sock)


def test_stop_kills_after_timeout(make_image, sock_dir,
                                  assert_nothing_left):
    sock = os.path.join(sock_dir, "sock")
    server = qemu_nbd.start(make_image(size=M), sock)
    # A stopped process ignores SIGTERM until continued.
    os.kill(server.pid, signal.SIGSTOP)
    server.stop(timeout=0.1)
    assert server._proc.returncode == -signal.SIGKILL
    assert_nothing_left(sock)


def test_persistent(make_image, qemu_nbd):
    server = qemu_nbd(make_image(size=M), shared=1)
    for _ in range(3):
        with client.open(server.address) as c:
            assert c.size == M
    assert server.alive


DEFAULT_OPTIONS = [
    "--format=raw", "--shared=8", "--persistent", "--cache=none",
    "--aio=native", "--discard=unmap", "--allocation-depth",
]


def test_command_line_defaults(make_image, qemu_nbd):
    path = make_image(size=M)
    server = qemu_nbd(path)
    args = cmdline(server.pid)
    assert args[0].endswith("qemu-nbd")
    assert args[1:] == (
        DEFAULT_OPTIONS[:1] + [f"--socket={server.socket}"]
        + DEFAULT_OPTIONS[1:] + [path])


def test_command_line_options(make_image, qemu_nbd):
    path = make_image(fmt="qcow2", size=M, bitmaps=["b0"])
    server = qemu_nbd(
        path, fmt="qcow2", read_only=True, shared=3, cache="writeback",
        discard=False, bitmap="b0", allocation_depth=False)
    assert cmdline(server.pid)[1:] == [
        "--format=qcow2", f"--socket={server.socket}", "--shared=3",
        "--persistent", "--cache=writeback", "--bitmap=b0", "--read-only",
        path]
    with client.open(server.address, dirty=True) as c:
        assert c.read_only
        assert c.dirty_bitmap == "b0"
        assert not c.has_allocation_depth


def test_cache_without_direct_io(make_image, sock_dir, monkeypatch):
    # Linux >= 6.6 tmpfs supports O_DIRECT, so there is no file system at
    # hand that refuses it; pretend the probe failed.
    monkeypatch.setattr(qemu_nbd, "supports_direct_io", lambda path: False)
    sock = os.path.join(sock_dir, "sock")
    with qemu_nbd.start(make_image(size=M), sock) as server:
        args = cmdline(server.pid)
        assert "--cache=writeback" in args
        assert "--cache=none" not in args
        assert not any(a.startswith("--aio") for a in args)
        with client.open(server.address) as c:
            c.write(b"wb", 0)
            assert c.read(2, 0) == b"wb"


def test_supports_direct_io(make_image, tmp_path):
    # tmp_path is on a disk file system here (ext4, xfs).
    assert qemu_nbd.supports_direct_io(make_image(size=M))
    assert not qemu_nbd.supports_direct_io(str(tmp_path / "missing"))


def test_format_is_never_probed(make_image, qemu_nbd):
    # A raw file holding a qcow2 image is served as its bytes.
    path = make_image(fmt="qcow2", size=M)
    server = qemu_nbd(path, fmt="raw")
    with client.open(server.address) as c:
        # qemu's raw driver rounds the size up to 512 bytes.
        assert c.size == (os.path.getsize(path) + 511) // 512 * 512
        assert c.read(4, 0) == b"QFI\xfb"


def test_relative_path(make_image, sock_dir, monkeypatch):
    path = make_image(size=M)
    monkeypatch.chdir(os.path.dirname(path))
    with qemu_nbd.start(os.path.basename(path),
                        os.path.join(sock_dir, "sock")) as server:
        assert server.path == path
        assert cmdline(server.pid)[-1] == path


def test_missing_file(tmp_path, sock_dir, assert_nothing_left):
    sock = os.path.join(sock_dir, "sock")
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(str(tmp_path / "missing.raw"), sock)
    text = str(e.value)
    assert "missing.raw" in text
    assert "No such file or directory" in text
    assert_nothing_left(sock)


def test_bad_socket_dir(make_image, tmp_path, assert_nothing_left):
    sock = str(tmp_path / "no-such-dir" / "sock")
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(make_image(size=M), sock)
    # qemu-nbd's own message is in the error, without our socket: the
    # message reaches HTTP clients.
    assert "qemu-nbd" in str(e.value)
    assert "Failed to bind socket to (socket)" in str(e.value)
    assert "no-such-dir" not in str(e.value)
    assert_nothing_left(sock)


def test_bad_format(make_image, sock_dir, assert_nothing_left):
    sock = os.path.join(sock_dir, "sock")
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(make_image(size=M), sock, fmt="qcow2")
    assert "qcow2" in str(e.value)
    assert_nothing_left(sock)


def test_socket_path_too_long(make_image, sock_dir, assert_nothing_left):
    sock = os.path.join(sock_dir, "x" * 120)
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(make_image(size=M), sock)
    assert "longer than 107" in str(e.value)
    assert sock not in str(e.value)
    assert sock_dir not in str(e.value)
    assert_nothing_left(sock)


def test_timeout_kills_process(make_image, sock_dir, tmp_path, monkeypatch,
                               assert_nothing_left, processes_with):
    # A "qemu-nbd" that never serves.
    fake = tmp_path / "fake-qemu-nbd"
    # A duration nothing else on the machine sleeps, to find it below.
    marker = f"sleep 60.{os.getpid()}{secrets.randbelow(10**6)}"
    fake.write_text(f"#!/bin/sh\necho starting >&2\nexec {marker}\n")
    fake.chmod(0o755)
    monkeypatch.setattr(qemu_nbd, "QEMU_NBD", str(fake))
    sock = os.path.join(sock_dir, "sock")
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(make_image(size=M), sock, timeout=0.3)
    assert "did not serve within 0.3 seconds" in str(e.value)
    assert "starting" in str(e.value)
    assert processes_with(marker) == []
    assert_nothing_left(sock)


def test_missing_executable(make_image, sock_dir, monkeypatch):
    monkeypatch.setattr(qemu_nbd, "QEMU_NBD", "/no/such/qemu-nbd")
    with pytest.raises(errors.ExportError) as e:
        qemu_nbd.start(make_image(size=M), os.path.join(sock_dir, "sock"))
    assert "/no/such/qemu-nbd" in str(e.value)


def test_start_from_short_lived_thread(make_image, sock_dir):
    # The thread that asked for the server exits; the server must live on
    # (pdeathsig follows the thread that forked, the spawner).
    sock = os.path.join(sock_dir, "sock")
    result = {}

    def start():
        result["server"] = qemu_nbd.start(make_image(size=M), sock)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    server = result["server"]
    try:
        with client.open(server.address) as c:
            assert c.size == M
        assert server.alive
    finally:
        server.stop()


def test_stop_all(make_image, sock_dir, assert_nothing_left):
    path = make_image(size=M)
    servers = [qemu_nbd.start(path, os.path.join(sock_dir, f"{i}.sock"),
                              read_only=True) for i in range(3)]
    qemu_nbd.stop_all()
    for server in servers:
        assert not server.alive
        assert_nothing_left(server.socket)


CHILD = textwrap.dedent("""
    import sys
    import threading
    from ovirt_imageio.nbd import client, qemu_nbd

    result = {}

    def start():
        result["server"] = qemu_nbd.start(sys.argv[1], sys.argv[2])

    # Started from a thread that exits at once, like a daemon's
    # per-connection thread.
    t = threading.Thread(target=start)
    t.start()
    t.join()
    server = result["server"]
    with client.open(server.address) as c:
        c.read(512, 0)
    print(server.pid, flush=True)
    sys.stdin.read()
""")


def test_no_orphan_when_parent_killed(make_image, sock_dir, pid_alive,
                                      wait_for):
    path = make_image(size=M)
    sock = os.path.join(sock_dir, "sock")
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path, sock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        line = child.stdout.readline()
        assert line, "child failed to start qemu-nbd"
        pid = int(line)
        assert pid_alive(pid)
        assert cmdline(pid)[0].endswith("qemu-nbd")
    finally:
        child.kill()
        child.wait()
    try:
        wait_for(lambda: not pid_alive(pid),
                 message=f"qemu-nbd {pid} to exit")
    finally:
        # Do not leave an orphan behind if the test failed.
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # qemu-nbd removes its socket on SIGTERM.
    wait_for(lambda: not os.path.exists(sock), message="socket removed")


# A qemu-nbd that dies on its own.

def reaped(pid):
    """True once pid is gone from /proc: exited and waited for, not a
    zombie."""
    return not os.path.exists(f"/proc/{pid}")


def test_killed_server_is_reaped_and_logged(make_image, sock_dir, wait_for,
                                            caplog):
    import logging
    caplog.set_level(logging.INFO)
    sock = os.path.join(sock_dir, "sock")
    server = qemu_nbd.start(make_image(size=M), sock)
    try:
        os.kill(server.pid, signal.SIGKILL)
        # Nobody uses the server: the module reaps it by itself.
        wait_for(lambda: reaped(server.pid),
                 message=f"qemu-nbd {server.pid} reaped")
        assert not server.alive
        assert server.returncode == -signal.SIGKILL
        wait_for(lambda: f"qemu-nbd pid={server.pid} exited unexpectedly"
                 in caplog.text, message="exit logged")
        assert "exitcode=-9" in caplog.text
    finally:
        server.stop()
    # Stopping an exited server cleans up without error.
    assert not os.path.exists(sock)
    assert server not in qemu_nbd.running()


def test_stopped_server_not_reported(make_image, sock_dir, wait_for,
                                     caplog):
    import logging
    caplog.set_level(logging.INFO)
    server = qemu_nbd.start(make_image(size=M),
                            os.path.join(sock_dir, "sock"))
    server.stop()
    wait_for(lambda: reaped(server.pid), message="reaped")
    assert "exited unexpectedly" not in caplog.text


def test_reaper_keeps_no_descriptors(make_image, sock_dir, wait_for):
    # Start once so the spawner (and its wake-up descriptor) exists.
    qemu_nbd.start(make_image(size=M), os.path.join(sock_dir, "a")).stop()
    before = len(os.listdir("/proc/self/fd"))
    servers = [qemu_nbd.start(make_image(name=f"d{i}", size=M),
                              os.path.join(sock_dir, f"{i}.sock"))
               for i in range(3)]
    os.kill(servers[0].pid, signal.SIGKILL)
    for server in servers:
        server.stop()
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before,
             message="descriptors released")
