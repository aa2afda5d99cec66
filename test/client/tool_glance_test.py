"""
ovirt-img export-glance and import-glance (ovirt_imageio/client/
_tool_glance.py) end to end: the command run as a process, the real SDK,
the engine simulator, our daemon, real qemu-nbd, and a real glance-api on
loopback (the glance fixture, test/glance.py).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid

import pytest

from ovirt_imageio import client

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
    glance.set_tokens(glance.token)
    if glance.running:
        for image in glance.images():
            if image["id"] not in before:
                glance.delete(image["id"])


def output(stdout):
    """(progress records, the result) of a json run."""
    *lines, result = [json.loads(line) for line in stdout.splitlines()]
    return lines, result


def error_lines(stderr):
    """stderr's lines but the log's (urlsource warns of a loopback
    source, as the tests' Glance is)."""
    return [line for line in stderr.strip().splitlines()
            if "WARNING" not in line or "loopback" not in line]


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
    size = disk.provisioned_size
    assert lines[-1]["transferred"] == lines[-1]["size"] == size
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
    # Staging, then sending: the disk twice.
    size = 2 * disk.provisioned_size
    assert lines[-1]["transferred"] == lines[-1]["size"] == size
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
    err = error_lines(p.stderr)
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
    assert error_lines(p.stderr) == [
        "ovirt-img: error: Cannot connect to Glance at 127.0.0.1:1: "
        "Connection refused"]
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
    err = error_lines(err)
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
    assert len(error_lines(p.stderr)) == 1
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


# Import.

def check_imported(env, result, src, fmt, disk_fmt):
    disk = env.engine.disks[result["disk_id"]]
    assert (disk.status, disk.format, disk.removed) == ("ok", disk_fmt,
                                                        False)
    # The disk's guest data is the source's, read through qemu.
    compare(src, disk.path)
    assert client.checksum(disk.path) == client.checksum(str(src))
    t, = env.transfers(disk.id)
    assert (t.direction, t.phase) == ("upload", "finished_success")
    return disk


@pytest.mark.parametrize("fmt,disk_fmt,sd", [
    ("qcow2", "cow", "nfs"),
    ("raw", "cow", "iscsi"),
    ("raw", "raw", "nfs"),
])
def test_import(env, tmp_path, fmt, disk_fmt, sd):
    src = make_image(tmp_path / f"src.{fmt}", fmt, size=8 * MiB)
    image_id = env.glance.create(path=src, disk_format=fmt, name="fedora")
    p = env.run("import-glance", "-s", sd, "-f",
                "qcow2" if disk_fmt == "cow" else "raw", image_id)
    lines, result = output(p.stdout)
    assert "uploading image" in phases(lines)
    assert "verifying upload" in phases(lines)
    assert phases(lines)[-1] == "import completed"
    assert lines[-1]["transferred"] == lines[-1]["size"] == 8 * MiB
    assert (result["image_id"], result["format"], result["virtual_size"],
            result["iso"]) == (image_id, fmt, 8 * MiB, False)
    disk = check_imported(env, result, src, fmt, disk_fmt)
    assert disk.name == "fedora"
    assert disk.provisioned_size == 8 * MiB
    # The image is Glance's still.
    assert env.glance.image(image_id)["status"] == "active"


def test_import_iso(env, tmp_path):
    src = tmp_path / "src.iso"
    data = bytearray(4 * MiB)
    data[0x8000:0x8008] = b"\x01CD001\x01\x00"
    data[MiB:MiB + 5] = b"hello"
    src.write_bytes(bytes(data))
    image_id = env.glance.create(path=src, disk_format="iso")
    p = env.run("import-glance", "-s", "nfs", image_id)
    _, result = output(p.stdout)
    assert result["iso"] is True
    disk = check_imported(env, result, src, "raw", "raw")
    assert disk.content_type == "iso"


@pytest.mark.parametrize("declared,props,message", [
    # Glance takes raw bytes called qcow2 (virtual_size null).
    ("qcow2", {}, "disk_format is qcow2, the data is a raw image"),
    ("raw", {}, None),
])
def test_import_metadata_mismatch(env, tmp_path, declared, props, message):
    src = make_image(tmp_path / "src.raw", "raw", size=4 * MiB)
    if message is None:
        # A qcow2 called raw.
        src = make_image(tmp_path / "src.qcow2", "qcow2", size=4 * MiB)
        message = "disk_format is raw, the data is a qcow2 image"
    image_id = env.glance.create(path=src, disk_format=declared, **props)
    p = env.run("import-glance", "-s", "nfs", image_id, check=False)
    assert p.returncode == 1
    err = error_lines(p.stderr)
    assert len(err) == 1
    assert f"Glance image {image_id} is not what Glance says" in err[0]
    assert message in err[0]
    assert env.engine.disks == {}


def test_import_not_active(env):
    image_id = env.glance.create(None, disk_format="raw")
    p = env.run("import-glance", "-s", "nfs", image_id, check=False)
    assert p.returncode == 1
    assert "queued, not active" in p.stderr
    assert env.engine.disks == {}


def test_import_no_such_image(env):
    image_id = str(uuid.uuid4())
    p = env.run("import-glance", "-s", "nfs", image_id, check=False)
    assert p.returncode == 1
    assert "404" in p.stderr
    assert env.engine.disks == {}


def test_import_wrong_token(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw", size=4 * MiB)
    image_id = env.glance.create(path=src)
    env.write_token("bad-token-x7q")
    p = env.run("import-glance", "-s", "nfs", image_id, check=False)
    assert p.returncode == 1
    err = error_lines(p.stderr)
    assert len(err) == 1 and "401" in err[0]
    assert "x7q" not in p.stderr
    assert env.engine.disks == {}


def random_image(tmp_path, size=32 * MiB):
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.write(os.urandom(size))
    return src


def stalled(relay, budget):
    """Wait until the relay has let budget bytes through and holds the
    rest."""
    testutil.wait_for(lambda: relay.moved > budget - 64 * 1024,
                      timeout=DEADLINE, message="the relay to stall")


def test_import_token_expires(env, tmp_path):
    """Glance's token expires mid-import; the token file has the new one:
    read again on the 401, the import goes on."""
    src = random_image(tmp_path)
    image_id = env.glance.create(path=src)
    budget = 12 * MiB
    with Relay(env.glance.port, budget=budget) as relay:
        proc = env.spawn("import-glance", "-s", "nfs", "-f", "raw",
                         image_id,
                         glance_url=f"http://127.0.0.1:{relay.port}")
        try:
            stalled(relay, budget)
            env.glance.set_tokens("renewed")
            env.write_token("renewed")
            relay.set_budget(None)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    _, result = output(out)
    check_imported(env, result, src, "raw", "raw")


def test_import_image_deleted(env, tmp_path):
    """The image is deleted in the middle of the import: the disk is
    removed, and the error says why."""
    src = random_image(tmp_path)
    image_id = env.glance.create(path=src)
    budget = 12 * MiB
    with Relay(env.glance.port, budget=budget) as relay:
        proc = env.spawn("import-glance", "-s", "nfs", "-f", "raw",
                         image_id,
                         glance_url=f"http://127.0.0.1:{relay.port}")
        try:
            stalled(relay, budget)
            # Uploading: the disk and its transfer exist.
            disk, = env.disks("test")
            env.glance.delete(image_id)
            relay.set_budget(None)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 1, err
    # The NBD server of urlsource logs the failed read too.
    last = err.strip().splitlines()[-1]
    assert last.startswith("ovirt-img: error: "), err
    assert f"Glance image {image_id} was deleted during the import" in last
    assert f"disk {disk.id} is removed" in last
    testutil.wait_for(lambda: disk.removed, timeout=DEADLINE,
                      message="the disk to be removed")
    t, = env.transfers(disk.id)
    assert t.phase.startswith("finished_failure") or "cancel" in t.phase


def test_export_interrupted(env, tmp_path):
    """Ctrl-C mid-export: the image is deleted, the transfer finalized,
    exit 130."""
    src = random_image(tmp_path)
    disk = env.engine.add_disk_from_image(src, fmt="raw", sparse=False)
    image_id = str(uuid.uuid4())
    budget = 4 * MiB
    with Relay(env.glance.port, budget=budget) as relay:
        proc = env.spawn("export-glance", "-f", "raw", "--image-id",
                         image_id, disk.id,
                         glance_url=f"http://127.0.0.1:{relay.port}")
        try:
            testutil.wait_for(lambda: stored_bytes(env, image_id) > 0,
                              timeout=DEADLINE, message="upload to start")
            stalled(relay, budget)
            proc.send_signal(signal.SIGINT)
            relay.set_budget(None)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 130, err
    assert error_lines(err) == ["ovirt-img: interrupted"]
    assert env.glance.image(image_id) is None
    t, = env.transfers(disk.id)
    assert t.phase == "finished_success"


def test_config_section(env, tmp_path):
    """Glance's URL and token from the config file; --token-file wins."""
    src = make_image(tmp_path / "src.qcow2", "qcow2", size=4 * MiB)
    image_id = env.glance.create(path=src, disk_format="qcow2")
    config = os.path.join(env.home, ".config", "ovirt-img.conf")
    with open(config, "w") as f:
        f.write(f"[glance1]\n"
                f"engine_url = {env.engine.url}\n"
                f"username = admin@internal\n"
                f"password = password\n"
                f"cafile = {env.pki['ca_file']}\n"
                f"glance_url = {env.glance.url}\n"
                f"glance_token = {env.glance.token}\n")
    cmd = [OVIRT_IMG, "import-glance", "-c", "glance1", "-o", "json",
           "-s", "nfs", image_id]
    p = subprocess.run(cmd, env=env.environ, cwd=env.tmp, text=True,
                       capture_output=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    _, result = output(p.stdout)
    check_imported(env, result, src, "qcow2", "cow")
    # A token file given on the command line is used instead.
    env.write_token("bad-token-x7q")
    p = subprocess.run(cmd + ["--token-file", env.token_file],
                       env=env.environ, cwd=env.tmp, text=True,
                       capture_output=True, timeout=TIMEOUT)
    assert p.returncode == 1
    assert "401" in p.stderr


def test_usage_errors(env):
    p = subprocess.run([OVIRT_IMG, "import-glance", *env.common()[:-4],
                        "-s", "nfs", "not-a-uuid"], env=env.environ,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2
    assert "expected a UUID" in p.stderr
    p = subprocess.run([OVIRT_IMG, "export-glance", *env.common()[:-4],
                        str(uuid.uuid4())], env=env.environ,
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 2
    assert "glance_url" in p.stderr


def test_import_terminated(env, tmp_path):
    """SIGTERM mid-import: the transfer is cancelled and the disk
    removed, exit 143."""
    src = random_image(tmp_path)
    image_id = env.glance.create(path=src)
    budget = 12 * MiB
    with Relay(env.glance.port, budget=budget) as relay:
        proc = env.spawn("import-glance", "-s", "nfs", "-f", "raw",
                         image_id,
                         glance_url=f"http://127.0.0.1:{relay.port}")
        try:
            stalled(relay, budget)
            disk, = env.disks("test")
            proc.send_signal(signal.SIGTERM)
            relay.set_budget(None)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "ovirt-img: terminated by SIGTERM"
    testutil.wait_for(lambda: disk.removed, timeout=DEADLINE,
                      message="the disk to be removed")
    assert env.glance.image(image_id)["status"] == "active"
