"""
ovirt-img export-glance and import-glance (ovirt_imageio/client/
_tool_glance.py) end to end: the command run as a process, the real SDK,
the engine simulator, our daemon, real qemu-nbd, and a real glance-api on
loopback (the glance fixture, test/glance.py).
"""

import hashlib
import json
import os
import subprocess
import sys
import uuid

import pytest

import enginesim
import testutil
from relay import Relay
from testutil import compare, make_image

MiB = 1 << 20
TIMEOUT = 120
DEADLINE = 60
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


class Env:
    """An engine simulator on a daemon, a Glance, and ovirt-img run
    against them."""

    def __init__(self, engine, glance, pki, tmp):
        self.engine = engine
        self.glance = glance
        self.pki = pki
        self.tmp = tmp
        self.password_file = os.path.join(tmp, "password")
        with open(self.password_file, "w") as f:
            f.write("password\n")
        self.token_file = os.path.join(tmp, "token")
        self.write_token(glance.token)
        self.home = os.path.join(tmp, "home")
        os.makedirs(os.path.join(self.home, ".config"))
        self.staging = os.path.join(tmp, "staging")
        os.makedirs(self.staging)
        self.environ = dict(os.environ, HOME=self.home, TMPDIR=self.staging,
                            OVIRT_IMG_VDSM_ID=os.path.join(tmp, "no-vdsm.id"))
        self.environ.pop("XDG_CONFIG_HOME", None)

    def write_token(self, token):
        with open(self.token_file, "w") as f:
            f.write(token + "\n")

    def common(self, glance_url=None):
        return ["--engine-url", self.engine.url,
                "--username", "admin@internal",
                "--password-file", self.password_file,
                "--cafile", self.pki["ca_file"], "-o", "json",
                "--glance-url", glance_url or self.glance.url,
                "--token-file", self.token_file]

    def command(self, *args, glance_url=None):
        return [OVIRT_IMG, args[0], *self.common(glance_url),
                *[str(a) for a in args[1:]]]

    def run(self, *args, check=True, glance_url=None):
        p = subprocess.run(self.command(*args, glance_url=glance_url),
                           env=self.environ, cwd=self.tmp,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, timeout=TIMEOUT)
        if check and p.returncode != 0:
            raise AssertionError(f"ovirt-img exited {p.returncode}:\n"
                                 f"{p.stdout}\n{p.stderr}")
        return p

    def spawn(self, *args, glance_url=None):
        return subprocess.Popen(self.command(*args, glance_url=glance_url),
                                env=self.environ, cwd=self.tmp,
                                stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def disks(self, name):
        return [d for d in self.engine.disks.values()
                if d.name == name and not d.removed]

    def transfers(self, disk_id=None):
        with self.engine.lock:
            return [t for t in self.engine.transfers.values()
                    if disk_id is None or t.disk.id == disk_id]


@pytest.fixture
def env(tmp_path, make_daemon, pki, glance):
    daemon = make_daemon()
    eng = enginesim.Engine(
        tmp_path / "store", daemon.control.server.address(),
        daemon.remote.server.address()[1], pki, delay=0.05)
    eng.start()
    before = {i["id"] for i in glance.images()}
    yield Env(eng, glance, pki, str(tmp_path))
    eng.stop()
    # Each test leaves Glance as it found it.
    if glance.running:
        for image in glance.images():
            if image["id"] not in before:
                glance.delete(image["id"])


def output(stdout):
    """(progress records, the result) of a json run."""
    *lines, result = [json.loads(line) for line in stdout.splitlines()]
    return lines, result


def phases(lines):
    out = []
    for r in lines:
        if not out or out[-1] != r["description"]:
            out.append(r["description"])
    return out


def raw_bytes(path, fmt):
    """An image's guest data, read through qemu."""
    out = f"{path}.guest.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw",
                    str(path), out], check=True, timeout=TIMEOUT)
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def hashes(data):
    return {"checksum": hashlib.md5(data).hexdigest(),
            "os_hash_algo": "sha512",
            "os_hash_value": hashlib.sha512(data).hexdigest()}


def make_disk(env, tmp_path, fmt="raw", size=8 * MiB, disk_fmt="cow"):
    src = make_image(tmp_path / f"src.{fmt}", fmt, size=size)
    return src, env.engine.add_disk_from_image(src, fmt=disk_fmt)


# Export.

EXPORT_RAW_PHASES = [
    "connecting to glance", "creating transfer", "creating glance image",
    "exporting image", "verifying export", "verifying glance image",
    "finalizing transfer", "export completed"]

@pytest.mark.parametrize("disk_fmt", ["raw", "cow"])
def test_export_raw(env, tmp_path, disk_fmt):
    src, disk = make_disk(env, tmp_path, disk_fmt=disk_fmt)
    p = env.run("export-glance", "-f", "raw", "--name", "exported", disk.id)
    lines, result = output(p.stdout)
    assert phases(lines) == EXPORT_RAW_PHASES
    assert lines[-1]["transferred"] == lines[-1]["size"] == disk.provisioned_size
    data = env.glance.data(result["image_id"])
    assert data == raw_bytes(src, "raw")
    image = env.glance.image(result["image_id"])
    assert {k: image[k] for k in hashes(data)} == hashes(data)
    assert (image["status"], image["disk_format"], image["name"],
            image["size"], image["container_format"]) == (
        "active", "raw", "exported", len(data), "bare")
    assert image["ovirt_disk_id"] == disk.id
    assert result["disk_id"] == disk.id
    assert result["checksum"] == image["checksum"]
    assert result["staged_file"] is None
    t, = env.transfers(disk.id)
    assert (t.direction, t.phase) == ("download", "finished_success")


def test_export_qcow2(env, tmp_path):
    src, disk = make_disk(env, tmp_path, fmt="qcow2")
    p = env.run("export-glance", disk.id)
    lines, result = output(p.stdout)
    assert "staging image" in phases(lines)
    assert "exporting image" in phases(lines)
    assert lines[-1]["transferred"] == lines[-1]["size"] == 2 * disk.provisioned_size
    image = env.glance.image(result["image_id"])
    assert image["disk_format"] == "qcow2"
    stored = os.path.join(env.glance.store, result["image_id"])
    with open(stored, "rb") as f:
        data = f.read()
    assert {k: image[k] for k in hashes(data)} == hashes(data)
    # The same guest data, and only its data and tables.
    compare(src, stored)
    assert subprocess.run(
        ["qemu-img", "info", "--output", "json", stored],
        stdout=subprocess.PIPE, check=True).stdout.count(b'"qcow2"')
    assert result["staged_bytes"] == len(data) < disk.provisioned_size
    # The staged file is gone.
    assert os.listdir(env.staging) == []
    assert result["staged_file"].startswith(env.staging)


def test_export_wrong_token(env, tmp_path):
    _, disk = make_disk(env, tmp_path, size=4 * MiB)
    env.write_token("bad-token-x7q")
    log = tmp_path / "log"
    p = env.run("export-glance", "--log-file", log, "--log-level", "debug",
                disk.id, check=False)
    assert p.returncode == 1
    err = p.stderr.strip().splitlines()
    assert len(err) == 1
    assert "401" in err[0] and "token" in err[0]
    assert "x7q" not in p.stderr + log.read_text()
    # Nothing was started.
    assert env.transfers() == []


def test_export_token_refreshed(env, tmp_path):
    """An expired token is read again from the token file."""
    _, disk = make_disk(env, tmp_path, size=4 * MiB)
    env.glance.set_tokens(env.glance.token, "second")
    env.write_token("second")
    p = env.run("export-glance", "-f", "raw", disk.id)
    _, result = output(p.stdout)
    assert env.glance.image(result["image_id"])["status"] == "active"


def test_export_glance_unreachable(env, tmp_path):
    _, disk = make_disk(env, tmp_path, size=4 * MiB)
    p = env.run("export-glance", disk.id, check=False,
                glance_url="http://127.0.0.1:1")
    assert p.returncode == 1
    assert "refused" in p.stderr.lower()
    assert env.transfers() == []


def stored_bytes(env, image_id):
    try:
        return os.path.getsize(os.path.join(env.glance.store, image_id))
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_export_glance_stopped(env, tmp_path, fmt):
    """Glance dies in the middle of the upload: the image cannot be
    deleted, and the error says it is left."""
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(32 * MiB))
    disk = env.engine.add_disk_from_image(src, fmt="raw", sparse=False)
    image_id = str(uuid.uuid4())
    # The relay lets the create through, and 1 MiB of the upload.
    with Relay(env.glance.port, budget=2 * MiB) as relay:
        proc = env.spawn("export-glance", "-f", fmt, "--image-id", image_id,
                         disk.id, glance_url=f"http://127.0.0.1:{relay.port}")
        try:
            testutil.wait_for(lambda: stored_bytes(env, image_id) > 0,
                              timeout=DEADLINE, message="upload to start")
            env.glance.kill()
            # Its connections reset, as the kernel resets those of a
            # process that died with bytes unread.
            relay.cut_all(0)
            relay.set_budget(None)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, err
    err = err.strip().splitlines()
    assert len(err) == 1, err
    assert f"Glance image {image_id} may be left" in err[0]
    t, = env.transfers(disk.id)
    assert t.phase == "finished_success"
    assert os.listdir(env.staging) == []
    # Back: the half-made image is there, without data, to delete.
    env.glance.start()
    image = env.glance.image(image_id)
    assert image["status"] in ("queued", "saving")
    assert image["checksum"] is None


def test_export_connection_cut_deletes_image(env, tmp_path):
    """The upload's connection is cut halfway; Glance is up: the image is
    deleted."""
    _, disk = make_disk(env, tmp_path, size=8 * MiB)
    # check, create and upload go on one kept-alive connection.
    with Relay(env.glance.port, cut_after=2 * MiB, cuts=1) as relay:
        p = env.run("export-glance", "-f", "raw", disk.id, check=False,
                    glance_url=f"http://127.0.0.1:{relay.port}")
        assert relay.cut == 1
    assert p.returncode == 1
    assert len(p.stderr.strip().splitlines()) == 1
    assert "may be left" not in p.stderr
    assert [i for i in env.glance.images()
            if i.get("ovirt_disk_id") == disk.id] == []
    t, = env.transfers(disk.id)
    assert t.phase == "finished_success"


def test_export_image_id_taken(env, tmp_path):
    """Glance refuses the create: the image is not ours, left alone."""
    _, disk = make_disk(env, tmp_path, size=4 * MiB)
    image_id = env.glance.create(b"taken", disk_format="raw")
    p = env.run("export-glance", "--image-id", image_id, disk.id,
                check=False)
    assert p.returncode == 1
    assert "409" in p.stderr
    assert env.glance.image(image_id)["status"] == "active"
    assert env.glance.data(image_id) == b"taken"
    assert os.listdir(env.staging) == []
