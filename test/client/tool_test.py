"""
ovirt-img (ovirt_imageio/client/_tool.py) end to end: the command run as
a process, the real SDK, the engine simulator (test/enginesim.py), our
daemon and real qemu-nbd.
"""

import json
import os
import subprocess
import sys

import pytest

import enginesim

MiB = 1 << 20
TIMEOUT = 120
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


def make_image(path, fmt, size=4 * MiB):
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


class Env:
    """An engine simulator on a daemon, and ovirt-img run against it."""

    def __init__(self, engine, pki, tmp):
        self.engine = engine
        self.pki = pki
        self.tmp = tmp
        self.password_file = os.path.join(tmp, "password")
        with open(self.password_file, "w") as f:
            f.write("password\n")
        self.home = os.path.join(tmp, "home")
        os.makedirs(os.path.join(self.home, ".config"))
        self.environ = dict(os.environ, HOME=self.home,
                            OVIRT_IMG_VDSM_ID=os.path.join(tmp, "no-vdsm.id"))
        self.environ.pop("XDG_CONFIG_HOME", None)

    def common(self, output="json"):
        return ["--engine-url", self.engine.url,
                "--username", "admin@internal",
                "--password-file", self.password_file,
                "--cafile", self.pki["ca_file"], "-o", output]

    def run(self, *args, check=True, common=True, input=None):
        cmd = [OVIRT_IMG, args[0]]
        if common:
            cmd += self.common()
        cmd += [str(a) for a in args[1:]]
        p = subprocess.run(cmd, env=self.environ, cwd=self.tmp,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=TIMEOUT, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"ovirt-img exited {p.returncode}:\n"
                                 f"{p.stdout}\n{p.stderr}")
        return p

    def disks(self, name):
        return [d for d in self.engine.disks.values()
                if d.name == name and not d.removed]


@pytest.fixture
def env(tmp_path, make_daemon, pki):
    daemon = make_daemon()
    eng = enginesim.Engine(
        tmp_path / "store", daemon.control.server.address(),
        daemon.remote.server.address()[1], pki, delay=0.05)
    eng.start()
    yield Env(eng, pki, str(tmp_path))
    eng.stop()


def progress(stdout):
    return [json.loads(line) for line in stdout.splitlines()]


def test_upload_download_qcow2(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src)
    lines = progress(p.stdout)
    phases = [r["description"] for r in lines]
    assert phases[0] == "inspecting image"
    assert phases[-1] == "upload completed"
    assert "uploading image" in phases
    assert lines[-1]["size"] == 4 * MiB
    assert lines[-1]["transferred"] == 4 * MiB
    disk, = env.disks("src")
    assert (disk.format, disk.sparse, disk.status) == ("cow", True, "ok")
    assert disk.backup == "incremental"
    compare(src, disk.path)

    dst = tmp_path / "dst.qcow2"
    p = env.run("download-disk", disk.id, dst)
    assert progress(p.stdout)[-1]["description"] == "download completed"
    compare(src, dst)


def test_upload_raw_to_block_domain(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    env.run("upload-disk", "-s", "iscsi", "-f", "raw", src)
    disk, = env.disks("src")
    # A raw disk on block storage cannot be sparse.
    assert (disk.format, disk.sparse) == ("raw", False)
    compare(src, disk.path)


def test_missing_options_is_usage_error(env):
    p = env.run("upload-disk", "-s", "nfs", "/etc/hostname", check=False,
                common=False)
    assert p.returncode == 2
    assert "engine_url, username" in p.stderr


def test_engine_fault_is_one_line(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nosuchsd", src, check=False)
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert lines == [lines[0]]
    assert "nosuchsd" in lines[0]
    assert "Traceback" not in p.stderr


# Faults and signals.
#
# ovirt-img runs as a process; a test stops it (SIGSTOP) to change the
# world under it at a known point, e.g. in the middle of an upload, and
# lets it go on (SIGCONT). Nothing here sleeps: every wait polls the
# simulator or the daemon with a deadline.

import signal  # noqa: E402
import socket  # noqa: E402

import testutil  # noqa: E402

DEADLINE = 30


@pytest.fixture
def spawn(env):
    """spawn(*args): ovirt-img as a Popen (stdout and stderr piped, json
    output); killed at teardown if a failed test left it running."""
    procs = []

    def start(*args):
        cmd = [OVIRT_IMG, args[0], *env.common(),
               *[str(a) for a in args[1:]]]
        proc = subprocess.Popen(cmd, env=env.environ, cwd=env.tmp,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def finish(proc):
    """(exit code, stdout, stderr lines) once proc exits."""
    try:
        out, err = proc.communicate(timeout=2 * DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"ovirt-img did not exit:\n{out}\n{err}")
    return proc.returncode, out, err.strip().splitlines()


def one_transfer(env):
    """The only transfer the simulator has, once there is one."""
    def find():
        with env.engine.lock:
            transfers = list(env.engine.transfers.values())
        assert len(transfers) <= 1
        return transfers[0] if transfers else None
    return testutil.wait_for(find, timeout=DEADLINE, message="a transfer")


def ticket(env, t):
    """The daemon's ticket of transfer t, None if it has none."""
    status, data = env.engine.imageio._request("GET", t.ticket_uuid)
    if status == 404:
        return None
    assert status == 200, data
    return json.loads(data)


def transferring(env, t):
    """Wait until the daemon has received (or sent) some bytes of t."""
    def started():
        with env.engine.lock:
            has_ticket = t.ticket_id is not None
        return has_ticket and (ticket(env, t) or {}).get("transferred", 0)
    return testutil.wait_for(started, timeout=DEADLINE,
                             message="data to flow")


def stopped(proc):
    """Stop proc (SIGSTOP) until the block ends (SIGCONT)."""
    return _Stopped(proc)


class _Stopped:

    def __init__(self, proc):
        self.proc = proc

    def __enter__(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        testutil.wait_for(lambda: _proc_state(self.proc.pid) in ("T", None),
                          timeout=DEADLINE, message="ovirt-img to stop")

    def __exit__(self, *exc):
        os.kill(self.proc.pid, signal.SIGCONT)


def _proc_state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def qemu_nbd_serving(path):
    """Pids of qemu-nbd processes whose command line names path."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-nbd" and any(
                os.fsencode(path) in a for a in argv):
            pids.append(int(name))
    return pids


def no_qemu_nbd(path):
    testutil.wait_for(lambda: not qemu_nbd_serving(path), timeout=DEADLINE,
                      message=f"no qemu-nbd serving {path}")


def big_image(path, size=64 * MiB):
    """A raw image of data only: an upload of it takes many requests
    with --buffer-size 64k --max-workers 1."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path),
                    str(size)], check=True)
    qemu_io(path, "raw", f"write -P 0x5a 0 {size}")
    return str(path)


SLOW = ("--max-workers", "1", "--buffer-size", "64k")


def assert_one_line(lines, *words):
    assert len(lines) == 1, lines
    assert lines[0].startswith("ovirt-img: "), lines
    for w in words:
        assert w in lines[0], lines


def assert_upload_cleaned_up(env, t, src):
    """Once ovirt-img exited, the engine has ended the transfer and
    removed its disk (ovirt-img waits for it), the daemon has forgotten
    the ticket, and no qemu-nbd serves the image or the volume."""
    assert t.phase == "finished_failure"
    assert t.disk.removed
    assert not os.path.exists(t.disk.path)
    assert ticket(env, t) is None
    no_qemu_nbd(src)
    no_qemu_nbd(t.disk.path)


def test_upload_qemu_nbd_killed(env, spawn, tmp_path):
    src = big_image(tmp_path / "big.raw")
    proc = spawn("upload-disk", "-s", "nfs", "-f", "raw", *SLOW, src)
    t = one_transfer(env)
    transferring(env, t)
    with stopped(proc):
        assert ticket(env, t)["transferred"] < 64 * MiB
        # The host's qemu-nbd dies in the middle of the upload.
        t.nbd.kill()
    code, _, err = finish(proc)
    assert code == 1, err
    assert_one_line(err, "error:")
    assert t.ticket_uuid not in err[0]
    assert "Traceback" not in "\n".join(err)
    assert_upload_cleaned_up(env, t, src)


def created_disk(env, name):
    """The one disk named name the simulator ever had, removed or not."""
    with env.engine.lock:
        disks = [d for d in env.engine.disks.values() if d.name == name]
    assert len(disks) == 1, disks
    return disks[0]


def test_disk_becomes_illegal(env, tmp_path):
    env.engine.inject("create_volume")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1, p.stderr
    disk = created_disk(env, "src")
    assert_one_line(p.stderr.splitlines(), f"Disk {disk.id} became ILLEGAL")
    # Upstream leaves the disk behind; there is no transfer to remove it.
    assert disk.removed
    assert not env.engine.transfers


def test_transfer_refused(env, tmp_path):
    env.engine.inject("add_transfer")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1, p.stderr
    disk = created_disk(env, "src")
    assert_one_line(p.stderr.splitlines(), "Cannot create upload transfer",
                    "Operation Failed", "Injected fault add_transfer",
                    "HTTP 409")
    assert disk.removed
    assert not os.path.exists(disk.path)
    assert not env.engine.transfers


def test_transfer_fails_to_start(env, tmp_path):
    env.engine.inject("start_transfer")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1, p.stderr
    t = one_transfer(env)
    assert_one_line(p.stderr.splitlines(), "did not start",
                    "paused_system")
    # ovirt-img cancelled it: the engine removed the disk.
    assert t.phase == "finished_failure"
    assert t.disk.removed
    assert not os.path.exists(t.disk.path)
    assert ticket(env, t) is None
    no_qemu_nbd(src)


def test_verification_fails(env, tmp_path):
    # The new volume does not read zeros: the zeros and holes ovirt-img
    # skips keep old data, and the checksums differ.
    env.engine.inject("stale_volume")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1, p.stderr
    assert_one_line(p.stderr.splitlines(), "checksum")
    t = one_transfer(env)
    assert t.phase == "finished_failure"
    assert t.disk.removed
    assert ticket(env, t) is None
    no_qemu_nbd(src)


def test_existing_disk_id(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    other = env.engine.add_disk_from_image(src)
    p = env.run("upload-disk", "-s", "nfs", "--disk-id", other.id, src,
                check=False)
    assert p.returncode == 1, p.stderr
    assert_one_line(p.stderr.splitlines(), "Cannot create disk",
                    "Operation Failed", "The disk already exists",
                    "HTTP 409")
    assert "Traceback" not in p.stderr
    # Not ovirt-img's disk: left alone.
    assert not other.removed
    assert other.status == "ok"
    compare(src, other.path)


def test_wrong_password(env, tmp_path):
    with open(env.password_file, "w") as f:
        f.write("wrong\n")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1, p.stderr
    assert_one_line(p.stderr.splitlines(),
                    f"Cannot log in to {env.engine.url} as admin@internal",
                    "invalid username or password")
    assert "Traceback" not in p.stderr
    assert not env.engine.disks


def test_engine_unreachable(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    # A port bound but not listening: connections are refused.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"https://127.0.0.1:{s.getsockname()[1]}"
        cmd = [OVIRT_IMG, "upload-disk", *env.common(), "--engine-url", url,
               "-s", "nfs", src]
        p = subprocess.run(cmd, env=env.environ, cwd=env.tmp,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=TIMEOUT)
    assert p.returncode == 1, p.stderr
    assert_one_line(p.stderr.splitlines(), f"Cannot log in to {url}",
                    "Could not connect to server")
    assert "Traceback" not in p.stderr


SIGNALS = pytest.mark.parametrize("signo,message", [
    (signal.SIGINT, "ovirt-img: interrupted"),
    (signal.SIGTERM, "ovirt-img: terminated by SIGTERM"),
], ids=["SIGINT", "SIGTERM"])


def interrupt(env, proc, t, signo, size):
    """Send signo to ovirt-img in the middle of transfer t."""
    transferring(env, t)
    with stopped(proc):
        assert ticket(env, t)["transferred"] < size
        os.kill(proc.pid, signo)


@SIGNALS
def test_upload_interrupted(env, spawn, tmp_path, signo, message):
    src = big_image(tmp_path / "big.raw")
    proc = spawn("upload-disk", "-s", "nfs", "-f", "raw", *SLOW, src)
    t = one_transfer(env)
    interrupt(env, proc, t, signo, 64 * MiB)
    code, _, err = finish(proc)
    assert code == 128 + signo, err
    assert err == [message]
    # Cancelled: the engine removed the disk.
    assert_upload_cleaned_up(env, t, src)


@SIGNALS
def test_download_interrupted(env, spawn, tmp_path, signo, message):
    disk = env.engine.add_disk_from_image(big_image(tmp_path / "big.raw"),
                                          fmt="raw")
    dst = tmp_path / "dst.qcow2"
    proc = spawn("download-disk", *SLOW, disk.id, dst)
    t = one_transfer(env)
    interrupt(env, proc, t, signo, 64 * MiB)
    code, _, err = finish(proc)
    assert code == 128 + signo, err
    assert err == [message]
    # Finalized: a download cannot harm the disk.
    assert t.phase == "finished_success"
    assert disk.status == "ok"
    assert not disk.removed
    assert ticket(env, t) is None
    # The partial image is gone.
    assert not dst.exists()
    no_qemu_nbd(str(dst))
    no_qemu_nbd(disk.path)


def test_download_qemu_nbd_killed(env, spawn, tmp_path):
    disk = env.engine.add_disk_from_image(big_image(tmp_path / "big.raw"),
                                          fmt="raw")
    dst = tmp_path / "dst.qcow2"
    proc = spawn("download-disk", *SLOW, disk.id, dst)
    t = one_transfer(env)
    transferring(env, t)
    with stopped(proc):
        assert ticket(env, t)["transferred"] < 64 * MiB
        t.nbd.kill()
    code, _, err = finish(proc)
    assert code == 1, err
    assert_one_line(err, "error:", "download failed")
    assert t.ticket_uuid not in err[0]
    # Finalized all the same; the partial image is gone.
    assert t.phase == "finished_success"
    assert disk.status == "ok"
    assert not dst.exists()
    no_qemu_nbd(str(dst))


def test_upload_interrupted_creating_disk(env, spawn, tmp_path):
    # Ctrl-C while the engine creates the disk: ovirt-img never hears
    # the disk's id from the engine, yet removes it.
    answer = env.engine.hold("add_disk")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    proc = spawn("upload-disk", "-s", "nfs", src)

    def new_disk():
        with env.engine.lock:
            return next(iter(env.engine.disks.values()), None)
    disk = testutil.wait_for(new_disk, timeout=DEADLINE,
                             message="the new disk")
    os.kill(proc.pid, signal.SIGINT)
    answer.set()
    code, _, err = finish(proc)
    assert code == 130, err
    assert err == ["ovirt-img: interrupted"]
    assert disk.removed
    assert not env.engine.transfers


def test_upload_interrupted_creating_transfer(env, spawn, tmp_path):
    # Ctrl-C while the engine creates the transfer: ovirt-img never
    # hears the transfer's id, yet cancels it.
    answer = env.engine.hold("add_transfer")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    proc = spawn("upload-disk", "-s", "nfs", src)
    t = one_transfer(env)
    os.kill(proc.pid, signal.SIGINT)
    answer.set()
    code, _, err = finish(proc)
    assert code == 130, err
    assert err == ["ovirt-img: interrupted"]
    assert_upload_cleaned_up(env, t, src)
