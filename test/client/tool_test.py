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
