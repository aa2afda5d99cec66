"""
ovirt-img (ovirt_imageio/client/_tool.py) end to end: the command run as
a process, the real SDK, the engine simulator (test/enginesim.py), our
daemon and real qemu-nbd.
"""

import json
import os
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import uuid

import pytest

from ovirt_imageio import client

import enginesim
import testutil
from testutil import compare, make_image, qemu_io

MiB = 1 << 20
TIMEOUT = 120
OVIRT_IMG = os.path.join(os.path.dirname(sys.executable), "ovirt-img")


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


# Formats, host selection and output.

UPLOADED_BY = "Uploaded by ovirt-img"
# Upstream's phases (ENGINE-SIM.md 4.2, 4.3), and ours while the
# checksums are compared (upstream does not verify).
UPLOAD_PHASES = ["inspecting image", "creating disk", "creating transfer",
                 "uploading image", "verifying upload", "finalizing transfer",
                 "upload completed"]
DOWNLOAD_PHASES = ["creating transfer", "downloading image",
                   "verifying download", "finalizing transfer",
                   "download completed"]
SIZE = r"(\d+ bytes|\d+\.\d\d [KMGTP]iB)"
TEXT_LINE = re.compile(
    rf"\[ (----|[ \d]{{3}}%) \] {SIZE}, \d+\.\d\d s, {SIZE}/s( \| .+)?")


def make_iso(path, size=4 * MiB):
    """A raw image with an ISO 9660 primary volume descriptor at 32 KiB
    and the descriptor set terminator after it, as mkisofs writes them."""
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(0x8000)
        f.write(b"\x01CD001\x01\x00" + b"LINUX".ljust(32) +
                b"TEST".ljust(32))
        f.seek(0x8800)
        f.write(b"\xffCD001\x01")
        f.seek(1 * MiB)
        f.write(b"\x44" * 64 * 1024)
    return str(path)


def convert(src, dst, fmt, *opts):
    subprocess.run(["qemu-img", "convert", "-q", "-O", fmt, *opts, str(src),
                    str(dst)], check=True)
    return str(dst)


def make_ova(path, disks):
    """An OVA: a ustar file with an OVF descriptor first, then disks
    ((name, path) pairs)."""
    ovf = os.path.join(os.path.dirname(str(path)), "vm.ovf")
    with open(ovf, "w") as f:
        f.write("<?xml version='1.0'?><Envelope/>\n")
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(ovf, arcname="vm.ovf")
        for name, disk in disks:
            tar.add(disk, arcname=name)
    return str(path)


def make_source(kind, tmp_path):
    """(file to upload, image holding its guest data, its virtual size)."""
    qcow2 = make_image(tmp_path / "base.qcow2", "qcow2")
    if kind == "raw":
        src = convert(qcow2, tmp_path / "src.raw", "raw")
    elif kind == "qcow2":
        src = convert(qcow2, tmp_path / "src.qcow2", "qcow2")
    elif kind == "compressed":
        src = convert(qcow2, tmp_path / "src.qcow2", "qcow2", "-c")
    elif kind == "iso":
        src = make_iso(tmp_path / "src.iso")
    elif kind in ("vmdk", "vhdx", "vdi"):
        src = convert(qcow2, tmp_path / f"src.{kind}", kind)
    elif kind == "ova":
        # As VMware exports them.
        vmdk = convert(qcow2, tmp_path / "disk1.vmdk", "vmdk", "-o",
                       "subformat=streamOptimized")
        return make_ova(tmp_path / "src.ova", [("src.vmdk", vmdk)]), vmdk
    else:
        raise AssertionError(kind)
    return src, src


def qemu_img_json(*args):
    out = subprocess.run(["qemu-img", *args, "--output", "json"],
                         check=True, stdout=subprocess.PIPE, text=True,
                         timeout=TIMEOUT).stdout
    return json.loads(out)


def expected_disk(kind, sd, fmt, preallocated, data):
    """What the engine should have been asked for (ENGINE-SIM.md 3.1,
    4.2)."""
    block = sd in ("iscsi", "fcp")
    if kind == "iso":
        return dict(format="raw", sparse=False, backup="none",
                    content_type="iso", initial_size=None)
    cow = fmt == "qcow2"
    sparse = not preallocated and not (block and not cow)
    initial_size = None
    if cow and sparse and block:
        # The engine forwards it only for sparse disks on block storage.
        initial_size = qemu_img_json("measure", "-O", "qcow2",
                                     data)["required"]
    return dict(format="cow" if cow else "raw", sparse=sparse,
                backup="incremental" if cow else "none",
                content_type="data", initial_size=initial_size)


def disk_attrs(disk):
    return dict(format=disk.format, sparse=disk.sparse, backup=disk.backup,
                content_type=disk.content_type,
                initial_size=disk.initial_size)


def transfers(env, disk):
    return [t for t in env.engine.transfers.values() if t.disk is disk]


def check_uploaded(env, disk, data, sd):
    assert disk.status == "ok"
    assert disk.sd.name == sd
    assert disk.provisioned_size == qemu_img_json(
        "info", data)["virtual-size"]
    assert qemu_img_json("info", disk.path)["format"] == disk.qemu_format
    t, = transfers(env, disk)
    assert (t.direction, t.phase) == ("upload", "finished_success")
    compare(data, disk.path)


@pytest.mark.parametrize("kind, sd, fmt, preallocated", [
    ("raw", "nfs", "raw", False),
    ("raw", "nfs", "qcow2", True),
    ("qcow2", "iscsi", "qcow2", False),
    ("qcow2", "fcp", "raw", True),
    ("compressed", "iscsi", "qcow2", False),
    ("iso", "nfs", "qcow2", False),
    ("iso", "iscsi", "raw", True),
    ("vmdk", "fcp", "raw", False),
    ("vhdx", "iscsi", "qcow2", False),
    ("vdi", "nfs", "qcow2", True),
    ("ova", "nfs", "qcow2", False),
])
def test_upload_formats(env, tmp_path, kind, sd, fmt, preallocated):
    src, data = make_source(kind, tmp_path)
    args = ["-s", sd, "-f", fmt, src]
    if preallocated:
        args.insert(0, "--preallocated")
    env.run("upload-disk", *args)
    disk, = env.disks("src")
    assert disk_attrs(disk) == expected_disk(kind, sd, fmt, preallocated,
                                             data)
    assert disk.description == UPLOADED_BY
    check_uploaded(env, disk, data, sd)


def test_upload_disk_id_name_description(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk_id = str(uuid.uuid4())
    env.run("upload-disk", "-s", "nfs", "--disk-id", disk_id.upper(),
            "--name", "my disk", "-d", "a description", src)
    disk = env.engine.disks[disk_id]
    assert (disk.name, disk.description) == ("my disk", "a description")
    assert env.disks("src") == []
    check_uploaded(env, disk, src, "nfs")


def test_upload_ova_member(env, tmp_path):
    qcow2 = make_image(tmp_path / "base.qcow2", "qcow2")
    disk1 = convert(qcow2, tmp_path / "disk1.vmdk", "vmdk")
    qemu_io(qcow2, "qcow2", "write -P 0x55 2m 1m")
    disk2 = convert(qcow2, tmp_path / "disk2.vmdk", "vmdk")
    ova = make_ova(tmp_path / "vm.ova", [("vm-disk1.vmdk", disk1),
                                         ("vm-disk2.vmdk", disk2)])

    p = env.run("upload-disk", "-s", "nfs", ova, check=False)
    assert p.returncode == 1
    error = p.stderr.strip().splitlines()
    assert len(error) == 1
    assert "--member" in error[0]
    assert "vm-disk1.vmdk" in error[0] and "vm-disk2.vmdk" in error[0]
    # Nothing was created.
    assert env.engine.disks == {}

    env.run("upload-disk", "-s", "iscsi", "--member", "vm-disk2.vmdk", ova)
    disk, = env.disks("vm-disk2")
    check_uploaded(env, disk, disk2, "iscsi")
    assert disk.initial_size == qemu_img_json(
        "measure", "-O", "qcow2", disk2)["required"]


def api_requests(env):
    """The engine requests, consecutive repeats (polls) collapsed, with
    their counts: [(method, path with ids as {d}, {t}..., count)]."""
    names = {}
    for d in env.engine.disks:
        names[d] = "{d}"
    for t in env.engine.transfers:
        names[t] = "{t}"
    for sd in env.engine.storage_domains:
        names[sd] = "{sd}"
    result = []
    for method, path, _ in env.engine.requests:
        path = path.replace("/ovirt-engine/api", "{api}")
        path = "/".join(names.get(p, p) for p in path.split("/"))
        if result and result[-1][:2] == (method, path):
            result[-1] = (method, path, result[-1][2] + 1)
        else:
            result.append((method, path, 1))
    return result


def collapse(items):
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


def check_json_progress(lines, phases, size):
    """Progress records as upstream writes them (ENGINE-SIM.md 4.4)."""
    assert lines
    sized = False
    for prev, r in zip([None] + lines, lines):
        assert isinstance(r, dict), r
        keys = {"transferred", "elapsed", "description"}
        if sized:
            keys.add("size")
        else:
            sized = "size" in r
            keys |= {"size"} if sized else set()
        assert set(r) == keys, r
        assert isinstance(r["transferred"], int)
        assert isinstance(r["elapsed"], float)
        if prev is not None:
            assert r["transferred"] >= prev["transferred"]
            assert r["elapsed"] >= prev["elapsed"]
    assert collapse([r["description"] for r in lines]) == phases
    assert lines[-1]["size"] == size
    assert lines[-1]["transferred"] == size


def test_upload_json_output_and_requests(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src)
    # Nothing else on stdout: every line is a progress record.
    lines = [json.loads(line) for line in p.stdout.splitlines()]
    check_json_progress(lines, UPLOAD_PHASES, 4 * MiB)

    # Upstream's sequence (ENGINE-SIM.md 1.1); polls collapsed.
    requests = api_requests(env)
    assert [r[:2] for r in requests] == [
        ("POST", "/ovirt-engine/sso/oauth/token"),
        ("GET", "{api}/storagedomains"),
        ("POST", "{api}/disks"),
        ("GET", "{api}/disks/{d}"),
        ("POST", "{api}/imagetransfers"),
        ("GET", "{api}/imagetransfers/{t}"),
        ("POST", "{api}/imagetransfers/{t}/finalize"),
        ("GET", "{api}/imagetransfers/{t}"),
        ("POST", "/ovirt-engine/services/sso-logout"),
    ]
    # Polls wait between requests: a few per step, not a busy loop.
    assert all(count <= 20 for _, _, count in requests), requests


def test_upload_text_output(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    # Bytes: text mode would turn "\r" into "\n".
    p = subprocess.run(
        [OVIRT_IMG, "upload-disk", *env.common("text"), "-s", "nfs", "-f",
         "raw", src], env=env.environ, cwd=env.tmp, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    out = p.stdout.decode()
    # Redrawn in place: "\r" after each line, "\n" after the last only.
    assert out.endswith("\n") and out.count("\n") == 1
    lines = out[:-1].split("\r")
    for line in lines:
        assert len(line) == 79, repr(line)
        assert TEXT_LINE.fullmatch(line.rstrip()), repr(line)
    assert re.fullmatch(
        rf"\[ 100% \] 4\.00 MiB, \d+\.\d\d s, {SIZE}/s \| upload completed",
        lines[-1].rstrip()), lines[-1]
    phases = collapse([line.rstrip().split(" | ")[1] for line in lines])
    assert phases == UPLOAD_PHASES


def progress_file(path):
    samples = testutil.parse_metrics(open(path).read())
    return {name: (value, dict(labels))
            for (name, labels), value in samples.items()}


def test_progress_file(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    path = tmp_path / "progress.prom"
    env.run("upload-disk", "-s", "nfs", "-f", "raw", src,
            "--progress-file", path)
    m = progress_file(path)
    assert m["ovirt_img_transferred_bytes"][0] == 4 * MiB
    assert m["ovirt_img_size_bytes"][0] == 4 * MiB
    assert m["ovirt_img_progress_ratio"][0] == 1.0
    assert m["ovirt_img_running"][0] == 0
    assert m["ovirt_img_failed"][0] == 0
    assert m["ovirt_img_info"] == (
        1, {"command": "upload-disk", "phase": "upload completed"})
    # Replaced: no temporary file left behind.
    assert not [n for n in os.listdir(tmp_path)
                if n.startswith(".progress-")]


def test_progress_file_failure(env, tmp_path):
    env.engine.inject("add_transfer")
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    path = tmp_path / "progress.prom"
    p = env.run("upload-disk", "-s", "nfs", src, "--progress-file", path,
                check=False)
    assert p.returncode == 1, p.stderr
    m = progress_file(path)
    assert m["ovirt_img_failed"][0] == 1
    assert m["ovirt_img_running"][0] == 0


def test_progress_listen_address_in_use(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = env.run("upload-disk", "-s", "nfs", src, "--progress-listen",
                    f"127.0.0.1:{port}", check=False)
    assert p.returncode == 1
    assert_one_line(p.stderr.splitlines(),
                    f"Cannot serve progress on 127.0.0.1:{port}")
    # Nothing was uploaded.
    assert env.disks("src") == []


def test_progress_listen_invalid(env, tmp_path):
    p = env.run("upload-disk", "-s", "nfs", "x", "--progress-listen",
                "nowhere", check=False)
    assert p.returncode == 2
    assert "--progress-listen" in p.stderr and "HOST:PORT" in p.stderr


def forklift_download(env, disk_id, path):
    """Download as Forklift's ovirt-populator does (CLIENTS.md 3): its
    command line, stdout and stderr merged, JSON lines parsed, the rest
    ignored."""
    cmd = [OVIRT_IMG, "download-disk", "--output", "json",
           f"--engine-url={env.engine.url}", "--username=admin@internal",
           f"--password-file={env.password_file}",
           f"--cafile={env.pki['ca_file']}", "-f", "raw", disk_id, str(path)]
    p = subprocess.run(cmd, env=env.environ, cwd=env.tmp,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout
    records = []
    for line in p.stdout.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def test_download_forklift(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = env.engine.add_disk_from_image(src, "iscsi", fmt="cow")
    dst = tmp_path / "volume"
    records = forklift_download(env, disk.id, dst)
    check_json_progress(records, DOWNLOAD_PHASES, 4 * MiB)
    assert qemu_img_json("info", dst)["format"] == "raw"
    compare(src, dst)


@pytest.fixture
def loop_device(make_block_device):
    """A loop device of 8 MiB of 0xff (old data that must not show
    through), detached at teardown."""
    return make_block_device(8 * MiB, 0xff)


def test_download_forklift_block_device(env, tmp_path, loop_device):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = env.engine.add_disk_from_image(src, "nfs", fmt="cow")
    records = forklift_download(env, disk.id, loop_device)
    check_json_progress(records, DOWNLOAD_PHASES, 4 * MiB)
    assert stat.S_ISBLK(os.stat(loop_device).st_mode)
    # The disk's 4 MiB at the start of the device, zeros included.
    device = "json:" + json.dumps({
        "driver": "raw", "size": 4 * MiB,
        "file": {"driver": "host_device", "filename": loop_device}})
    compare(src, device)


def write_garbage(path, size=8 * MiB):
    with open(path, "wb") as f:
        f.write(b"\xff" * size)


@pytest.mark.parametrize("disk_fmt, sd, fmt", [
    ("cow", "nfs", "qcow2"),
    ("cow", "nfs", "raw"),
    ("raw", "fcp", "qcow2"),
    ("raw", "nfs", "raw"),
])
def test_download(env, tmp_path, disk_fmt, sd, fmt):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = env.engine.add_disk_from_image(
        src, sd, fmt=disk_fmt, sparse=not (disk_fmt == "raw" and sd != "nfs"))
    dst = tmp_path / "dst.img"
    # An existing file is replaced, not written over.
    write_garbage(dst)
    log_file = tmp_path / "download.log"
    p = env.run("download-disk", "-f", fmt, "--log-level", "debug",
                "--log-file", log_file, disk.id, dst)
    lines = progress(p.stdout)
    check_json_progress(lines, DOWNLOAD_PHASES, 4 * MiB)
    info = qemu_img_json("info", dst)
    assert (info["format"], info["virtual-size"]) == (fmt, 4 * MiB)
    compare(src, dst)
    with open(log_file) as f:
        assert "download verified" in f.read()
    assert disk.status == "ok"
    t, = transfers(env, disk)
    assert (t.direction, t.phase) == ("download", "finished_success")


def test_download_uploaded_no_verify(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    p = env.run("upload-disk", "-s", "nfs", "-f", "raw", "--no-verify", src)
    phases = [r["description"] for r in progress(p.stdout)]
    assert collapse(phases) == [
        x for x in UPLOAD_PHASES if x != "verifying upload"]
    disk, = env.disks("src")
    compare(src, disk.path)
    dst = tmp_path / "dst.qcow2"
    log_file = tmp_path / "download.log"
    p = env.run("download-disk", "--no-verify", "--log-level", "debug",
                "--log-file", log_file, disk.id, dst)
    check_json_progress(progress(p.stdout), [
        x for x in DOWNLOAD_PHASES if x != "verifying download"], 4 * MiB)
    compare(src, dst)
    with open(log_file) as f:
        log = f.read()
    # The debug log would have it (test_download): the check was skipped.
    assert "GET" in log
    assert "download verified" not in log


def write_vdsm_id(env, hw_id):
    with open(env.environ["OVIRT_IMG_VDSM_ID"], "w") as f:
        f.write(hw_id + "\n")


def searches(env, path):
    return [q.get("search") for m, p, q in env.engine.requests
            if p == "/ovirt-engine/api/" + path]


def test_upload_download_on_this_host(env, tmp_path):
    hw_id = env.engine.host.hw_id
    write_vdsm_id(env, hw_id)
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    env.run("upload-disk", "-s", "iscsi", src)
    disk, = env.disks("src")
    t, = transfers(env, disk)
    assert t.requested_host is env.engine.host
    assert searches(env, "datacenters") == ["storage.name=iscsi"]
    assert searches(env, "hosts") == [
        f"hw_id={hw_id} and datacenter=dc1 and status=Up"]

    dst = tmp_path / "dst.qcow2"
    env.run("download-disk", disk.id, dst)
    compare(src, dst)
    download, = [t for t in transfers(env, disk)
                 if t.direction == "download"]
    assert download.requested_host is env.engine.host
    # The disk's storage domain, by id, then its data center.
    assert ("GET", f"/ovirt-engine/api/storagedomains/{disk.sd.id}", {}) \
        in env.engine.requests
    assert searches(env, "datacenters")[1:] == ["storage.name=iscsi"]


def test_upload_on_unknown_host(env, tmp_path):
    write_vdsm_id(env, str(uuid.uuid4()))
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    env.run("upload-disk", "-s", "nfs", src)
    disk, = env.disks("src")
    t, = transfers(env, disk)
    # Looked up, not found: the engine chooses the host.
    assert len(searches(env, "hosts")) == 1
    assert t.requested_host is None
    assert t.host is env.engine.host
    compare(src, disk.path)


def test_upload_on_this_host_quoted_names(env, tmp_path):
    # Names with spaces and quotes are quoted in the engine's search
    # language, and still match.
    sd = enginesim.StorageDomain('my "data" and more', "fcp")
    env.engine.storage_domains[sd.id] = sd
    env.engine.dc.name = "data center 1"
    write_vdsm_id(env, env.engine.host.hw_id)
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    env.run("upload-disk", "-s", sd.name, src)
    disk, = env.disks("src")
    assert disk.sd is sd
    t, = transfers(env, disk)
    assert t.requested_host is env.engine.host
    assert searches(env, "datacenters") == [
        'storage.name="my \\"data\\" and more"']
    assert searches(env, "hosts")[0].endswith(
        ' and datacenter="data center 1" and status=Up')
    compare(src, disk.path)


# Faults and signals.
#
# ovirt-img runs as a process; a test stops it (SIGSTOP) to change the
# world under it at a known point, e.g. in the middle of an upload, and
# lets it go on (SIGCONT). Nothing here sleeps: every wait polls the
# simulator or the daemon with a deadline.

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
    # A response cut short is retried (a warning); the server's error
    # after it is not.
    assert all("retrying" in line for line in err if " WARNING " in line)
    assert t.ticket_uuid not in "".join(err)
    err = [line for line in err if " WARNING " not in line]
    assert_one_line(err, "error:", "download failed")
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


def test_upload_interrupted_server_hung(env, spawn, tmp_path):
    # The host stops answering (its qemu-nbd is stopped) and the user
    # presses Ctrl-C: the workers blocked on the server are aborted
    # after a grace period, not left until the socket's 60 s timeout, so
    # ovirt-img gets to cancel the transfer.
    src = big_image(tmp_path / "big.raw")
    proc = spawn("upload-disk", "-s", "nfs", "-f", "raw", *SLOW, src)
    t = one_transfer(env)
    transferring(env, t)
    phases = []
    reader = threading.Thread(
        target=lambda: phases.extend(
            json.loads(line)["description"] for line in proc.stdout),
        daemon=True)
    reader.start()
    nbd = t.nbd
    os.kill(nbd.pid, signal.SIGSTOP)
    try:
        os.kill(proc.pid, signal.SIGINT)
        # The upload's workers gave up: ovirt-img is cancelling.
        testutil.wait_for(lambda: "cancelling transfer" in phases,
                          timeout=DEADLINE, message="cancelling transfer")
    finally:
        os.kill(nbd.pid, signal.SIGCONT)
    proc.wait(timeout=2 * DEADLINE)
    reader.join(DEADLINE)
    assert proc.returncode == 130
    assert proc.stderr.read().strip().splitlines() == [
        "ovirt-img: interrupted"]
    assert_upload_cleaned_up(env, t, src)


def test_proxy_url_fallback(env, tmp_path):
    # The host's address cannot be reached from here (the daemon listens
    # on 127.0.0.1 only): ovirt-img falls back to the transfer's
    # proxy_url, here the daemon itself, as an engine whose proxy is
    # disabled gives it.
    env.engine.host.address = "127.0.0.2"
    env.engine.proxy_address = f"127.0.0.1:{env.engine.daemon_port}"
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", src)
    assert progress(p.stdout)[-1]["description"] == "upload completed"
    disk, = env.disks("src")
    t, = transfers(env, disk)
    assert t.transfer_url.startswith("https://127.0.0.2:")
    compare(src, disk.path)
    dst = tmp_path / "dst.raw"
    env.run("download-disk", "-f", "raw", disk.id, dst)
    compare(src, dst)


# checksum and info

CHECKSUM_PHASES = ["creating transfer", "computing checksum",
                   "finalizing transfer", "checksum completed"]


def test_checksum(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    env.run("upload-disk", "-s", "nfs", "--no-verify", src)
    disk, = env.disks("src")
    p = env.run("checksum", disk.id)
    *lines, result = progress(p.stdout)
    assert collapse([r["description"] for r in lines]) == CHECKSUM_PHASES
    # The local image's checksum, computed here, as a user would.
    local = client.checksum(str(src))
    assert result == dict(local, disk_id=disk.id)
    # Read only, and finalized: the disk is as it was.
    download, = [t for t in transfers(env, disk)
                 if t.direction == "download"]
    assert download.phase == "finished_success"
    assert disk.status == "ok"
    compare(src, disk.path)


def test_checksum_algorithm_block_size_text(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    env.run("upload-disk", "-s", "nfs", "-f", "raw", "--no-verify", src)
    disk, = env.disks("src")
    p = env.run("checksum", "--algorithm", "sha256", "--block-size", "1m",
                "-o", "text", disk.id)
    local = client.checksum(str(src), algorithm="sha256", block_size=MiB)
    tail = p.stdout.splitlines()[-4:]
    assert tail == [f"disk id:    {disk.id}",
                    "algorithm:  sha256",
                    f"block size: {MiB}",
                    f"checksum:   {local['checksum']}"]


@pytest.mark.parametrize("args, message", [
    (["--block-size", "1025k"], "expected a multiple of 4096"),
    (["--block-size", "64m"], "expected a size from 1m to 16m"),
    (["--algorithm", "crc32"], "expected one of"),
])
def test_checksum_usage_errors(env, args, message):
    p = env.run("checksum", *args, str(uuid.uuid4()), check=False)
    assert p.returncode == 2
    assert message in p.stderr
    # Refused before the engine was asked anything.
    assert not env.engine.requests


def test_checksum_no_such_disk(env):
    disk_id = str(uuid.uuid4())
    p = env.run("checksum", disk_id, check=False)
    assert p.returncode == 1
    assert disk_id in p.stderr.splitlines()[-1]
    assert not env.engine.transfers


def test_info(env, tmp_path):
    src = make_image(tmp_path / "fedora.qcow2", "qcow2")
    env.run("upload-disk", "-s", "nfs", "-d", "Fedora 41", src)
    disk, = env.disks("fedora")
    p = env.run("info", disk.id)
    info = json.loads(p.stdout)
    assert info == {
        "id": disk.id,
        "alias": "fedora",
        "description": "Fedora 41",
        "format": "qcow2",
        "content_type": "data",
        "status": "ok",
        "virtual_size": 4 * MiB,
        "actual_size": disk.actual_size(),
        "sparse": True,
        "backup": "incremental",
        "storage_domains": [{"id": disk.sd.id, "name": "nfs"}],
        "snapshots": [],
    }
    # Nothing was transferred to answer.
    assert len(transfers(env, disk)) == 1


def test_info_snapshots(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    env.run("upload-disk", "-s", "nfs", "--no-verify", src)
    disk, = env.disks("src")
    vm = env.engine.add_vm("vm1", [disk.id])
    first = env.engine.take_snapshot(vm.id)
    second = env.engine.take_snapshot(vm.id)
    info = json.loads(env.run("info", disk.id).stdout)
    # Base first; the active layer is the disk itself.
    assert [s["snapshot_id"] for s in info["snapshots"]] == [
        first.id, second.id]
    assert [s["id"] for s in info["snapshots"]] == [
        v.id for v in disk.volumes[:-1]]
    assert all(s["format"] == "qcow2" for s in info["snapshots"])
    p = env.run("info", "-o", "text", disk.id)
    fields = dict(line.split(":", 1) for line in p.stdout.splitlines())
    assert fields["snapshots"].strip() == "2"
    assert second.id in fields["snapshot 2"]


def test_info_text(env, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    env.run("upload-disk", "-s", "iscsi", "-f", "raw", src)
    disk, = env.disks("src")
    p = env.run("info", "-o", "text", disk.id)
    lines = dict(line.split(":", 1) for line in p.stdout.splitlines())
    lines = {k: v.strip() for k, v in lines.items()}
    assert lines["format"] == "raw"
    assert lines["virtual size"] == f"{4 * MiB} (4.00 MiB)"
    assert lines["sparse"] == "no"
    assert lines["storage domain"] == f"iscsi ({disk.sd.id})"


def test_info_no_such_disk(env):
    disk_id = str(uuid.uuid4())
    p = env.run("info", disk_id, check=False)
    assert p.returncode == 1
    assert disk_id in p.stderr


# Safe sources

def test_upload_refuses_backing_file(env, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(b"root:secret\n".ljust(4 * MiB, b"\0"))
    src = tmp_path / "evil.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                    str(secret), "-F", "raw", str(src)], check=True,
                   timeout=60)
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1] == (
        f"ovirt-img: error: Image {src} refers to other files, which would "
        f"be uploaded as part of it: backing file '{secret}'. Use "
        f"--allow-backing to upload them")
    # Refused before the engine was asked for anything.
    assert not env.engine.disks
    p = env.run("upload-disk", "-s", "nfs", "--allow-backing", src)
    assert progress(p.stdout)[-1]["description"] == "upload completed"
    disk, = env.disks("evil")
    compare(secret, disk.path)


def unsafe_vmdk(tmp_path, secret):
    """A flat vmdk whose extent is secret, a file in another folder."""
    src = tmp_path / "vm" / "disk.vmdk"
    src.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o",
                    "subformat=monolithicFlat", str(src), "1M"], check=True,
                   timeout=60)
    src.write_text(src.read_text().replace('"disk-flat.vmdk"',
                                           f'"{secret}"'))
    return src, f"vmdk extent '{secret}'"


def unsafe_data_file(tmp_path, secret):
    """A qcow2 whose external data file is secret."""
    src = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", str(src), "1M"],
                   check=True, timeout=60)
    return src, f"external data file '{secret}'"


@pytest.mark.parametrize("make", [unsafe_vmdk, unsafe_data_file],
                         ids=["vmdk-extent", "qcow2-data-file"])
def test_upload_unsafe_source_refused_then_allowed(env, tmp_path, make):
    secret = tmp_path / "secret" / "data.raw"
    secret.parent.mkdir()
    secret.write_bytes(b"root:secret\n".ljust(MiB, b"\0"))
    src, reference = make(tmp_path, secret)
    p = env.run("upload-disk", "-s", "nfs", src, check=False)
    assert p.returncode == 1
    assert reference in p.stderr
    assert "Use --allow-backing to upload them" in p.stderr
    assert not env.engine.disks
    # Asked for, the referenced file's data goes up as the image's.
    env.run("upload-disk", "-s", "nfs", "--allow-backing", src)
    disk, = env.disks(src.stem)
    compare(secret, disk.path)


# backup-disk

BACKUP_PHASES = ["starting backup", "creating transfer", "downloading image",
                 "verifying download", "finalizing transfer",
                 "finalizing backup", "backup completed"]


def snapshot_of(disk, path):
    """The disk's data now, as a raw file, to compare a backup with."""
    subprocess.run(["qemu-img", "convert", "-f", disk.qemu_format, "-O",
                    "raw", disk.path, str(path)], check=True, timeout=60)
    return str(path)


def top_allocated(path):
    out = subprocess.run(["qemu-img", "map", "--output=json", str(path)],
                         check=True, capture_output=True, timeout=60).stdout
    return sum(e["length"] for e in json.loads(out)
               if e["depth"] == 0 and e["data"])


def vm_disk(env, tmp_path, name="vm-disk", fmt="qcow2"):
    src = make_image(tmp_path / f"{name}.{fmt}", fmt)
    args = ["-f", "raw"] if fmt == "raw" else []
    env.run("upload-disk", "-s", "nfs", "--no-verify", *args, src)
    disk, = env.disks(name)
    return disk


def backup_result(stdout):
    *lines, result = progress(stdout)
    return lines, result


def test_backup_full_then_incrementals(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    vm = env.engine.add_vm("vm1", [disk.id])
    full = tmp_path / "backups" / "full.qcow2"
    full.parent.mkdir()
    p = env.run("backup-disk", disk.id, full)
    lines, result = backup_result(p.stdout)
    assert collapse([r["description"] for r in lines]) == BACKUP_PHASES
    assert result["mode"] == "full"
    assert result["vm_id"] == vm.id
    checkpoint1 = result["checkpoint_id"]
    assert checkpoint1 == vm.checkpoints[-1].id
    compare(snapshot_of(disk, tmp_path / "t1.raw"), full)
    assert disk.status == "ok"
    assert env.engine.backups[result["backup_id"]].phase == "succeeded"

    # The guest writes 1 MiB, then 128 KiB: each incremental holds
    # about what changed, on top of the previous backup.
    qemu_io(disk.path, "qcow2", "write -P 0x51 512k 1m")
    incr1 = tmp_path / "backups" / "incr1.qcow2"
    p = env.run("backup-disk", "--from-checkpoint", checkpoint1,
                "--backing-file", full, disk.id, incr1)
    _, result = backup_result(p.stdout)
    assert result["mode"] == "incremental"
    checkpoint2 = result["checkpoint_id"]
    assert checkpoint2 != checkpoint1
    t2 = snapshot_of(disk, tmp_path / "t2.raw")
    compare(t2, incr1)
    assert client.info(str(incr1))["backing-filename"] == "full.qcow2"
    assert MiB <= top_allocated(incr1) <= MiB + 128 * 1024

    qemu_io(disk.path, "qcow2", "write -P 0x52 3m 128k")
    incr2 = tmp_path / "backups" / "incr2.qcow2"
    env.run("backup-disk", "--from-checkpoint", checkpoint2,
            "--backing-file", incr1, disk.id, incr2)
    compare(snapshot_of(disk, tmp_path / "t3.raw"), incr2)
    assert 128 * 1024 <= top_allocated(incr2) <= 256 * 1024
    # The earlier backups still restore the disk as it was then.
    compare(t2, incr1)


def test_backup_text_output(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    env.engine.add_vm("vm1", [disk.id])
    p = env.run("backup-disk", "-o", "text", disk.id, tmp_path / "b.qcow2")
    lines = p.stdout.splitlines()
    assert lines[-7].startswith("disk id:")
    fields = dict(line.split(":", 1) for line in lines[-7:])
    assert fields["mode"].strip() == "full"
    assert fields["backing file"].strip() == "-"
    checkpoint = fields["checkpoint id"].strip()
    assert uuid.UUID(checkpoint)


def assert_backup_cleaned_up(env, disk):
    assert disk.status == "ok"
    assert all(b.phase in ("succeeded", "failed")
               for b in env.engine.backups.values())
    assert all(t.phase.startswith("finished")
               for t in env.engine.transfers.values())


def test_backup_unknown_checkpoint(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    env.engine.add_vm("vm1", [disk.id])
    full = tmp_path / "full.qcow2"
    env.run("backup-disk", disk.id, full)
    gone = str(uuid.uuid4())
    out = tmp_path / "incr.qcow2"
    p = env.run("backup-disk", "--from-checkpoint", gone, "--backing-file",
                full, disk.id, out, check=False)
    assert p.returncode == 1
    message = p.stderr.splitlines()[-1]
    assert f"from checkpoint {gone}" in message
    assert message.endswith("Take a full backup (without --from-checkpoint)")
    assert not out.exists()
    assert_backup_cleaned_up(env, disk)


def test_backup_checkpoint_without_the_disk(env, tmp_path):
    # The checkpoint is of the VM's other disk: the engine would take a
    # full backup of this one; ovirt-img refuses rather than do so.
    a = vm_disk(env, tmp_path, "disk-a")
    b = vm_disk(env, tmp_path, "disk-b")
    env.engine.add_vm("vm1", [a.id, b.id])
    full_a = tmp_path / "a.qcow2"
    p = env.run("backup-disk", a.id, full_a)
    checkpoint = backup_result(p.stdout)[1]["checkpoint_id"]
    out = tmp_path / "b-incr.qcow2"
    p = env.run("backup-disk", "--from-checkpoint", checkpoint,
                "--backing-file", full_a, b.id, out, check=False)
    assert p.returncode == 1
    assert p.stderr.splitlines()[-1] == (
        f"ovirt-img: error: Checkpoint {checkpoint} does not cover disk "
        f"{b.id}: the engine would copy all of it. Take a full backup "
        f"(without --from-checkpoint)")
    assert not out.exists()
    assert_backup_cleaned_up(env, b)


def test_backup_missing_bitmap(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    env.engine.add_vm("vm1", [disk.id])
    full = tmp_path / "full.qcow2"
    p = env.run("backup-disk", disk.id, full)
    checkpoint = backup_result(p.stdout)[1]["checkpoint_id"]
    # The volume lost its bitmap (copied, restored by hand).
    subprocess.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2",
                    disk.path, checkpoint], check=True, timeout=60)
    out = tmp_path / "incr.qcow2"
    p = env.run("backup-disk", "--from-checkpoint", checkpoint,
                "--backing-file", full, disk.id, out, check=False)
    assert p.returncode == 1
    message = p.stderr.splitlines()[-1]
    assert f"lost the bitmap of checkpoint {checkpoint}" in message
    assert message.endswith("Take a full backup (without --from-checkpoint)")
    assert not out.exists()
    assert_backup_cleaned_up(env, disk)


def test_backup_missing_bitmap_slow_engine(env, spawn, tmp_path):
    # The engine ends the failed transfer (cancelled_system) a while
    # after it says so: ovirt-img waits for the end before it finalizes
    # the backup, which the engine refuses while a transfer is open.
    disk = vm_disk(env, tmp_path)
    env.engine.add_vm("vm1", [disk.id])
    full = tmp_path / "full.qcow2"
    p = env.run("backup-disk", disk.id, full)
    checkpoint = backup_result(p.stdout)[1]["checkpoint_id"]
    subprocess.run(["qemu-img", "bitmap", "--remove", "-f", "qcow2",
                    disk.path, checkpoint], check=True, timeout=60)
    before = set(env.engine.transfers)
    end = env.engine.hold("finish_failed")
    proc = spawn("backup-disk", "--from-checkpoint", checkpoint,
                 "--backing-file", full, disk.id, tmp_path / "incr.qcow2")

    def stopped():
        with env.engine.lock:
            new = [t for i, t in env.engine.transfers.items()
                   if i not in before and t.phase == "cancelled_system"]
        return new[0] if new else None
    t = testutil.wait_for(stopped, timeout=DEADLINE,
                          message="the transfer stopped by the engine")
    path = f"/ovirt-engine/api/imagetransfers/{t.id}"

    def gets():
        with env.engine.lock:
            return sum(1 for m, p, _ in env.engine.requests
                       if m == "GET" and p == path)
    seen = gets()
    # ovirt-img learns the transfer did not start (one GET), then polls
    # for its end (another); if it went on instead, it has exited.
    testutil.wait_for(lambda: gets() >= seen + 2 or proc.poll() is not None,
                      timeout=DEADLINE, message="ovirt-img to poll")
    end.set()
    code, _, err = finish(proc)
    assert code == 1, err
    assert f"lost the bitmap of checkpoint {checkpoint}" in err[-1]
    assert_backup_cleaned_up(env, disk)


def test_backup_disk_not_attached(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    p = env.run("backup-disk", disk.id, tmp_path / "b.qcow2", check=False)
    assert p.returncode == 1
    assert f"Disk {disk.id} is not attached to a VM" in p.stderr
    assert not env.engine.backups


def test_backup_disk_attached_to_several_vms(env, tmp_path):
    disk = vm_disk(env, tmp_path)
    vm1 = env.engine.add_vm("vm1", [disk.id])
    vm2 = env.engine.add_vm("vm2", [disk.id])
    p = env.run("backup-disk", disk.id, tmp_path / "b.qcow2", check=False)
    assert p.returncode == 1
    assert (f"attached to several VMs (vm1 ({vm1.id}), vm2 ({vm2.id}))"
            in p.stderr)
    assert not env.engine.backups


@pytest.mark.parametrize("args, message", [
    (["--from-checkpoint", str(uuid.uuid4())], "go together"),
    (["--backing-file", "/etc/hostname"], "go together"),
    (["--backing-file", "/nonexistent"], "not an existing file"),
    (["--from-checkpoint", "not-an-id", "--backing-file", "/etc/hostname"],
     "--from-checkpoint"),
])
def test_backup_usage_errors(env, tmp_path, args, message):
    p = env.run("backup-disk", *args, str(uuid.uuid4()),
                tmp_path / "b.qcow2", check=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert not env.engine.requests


def test_backup_never_replaces_a_file(env, tmp_path):
    existing = tmp_path / "b.qcow2"
    existing.write_bytes(b"keep")
    p = env.run("backup-disk", str(uuid.uuid4()), existing, check=False)
    assert p.returncode == 2
    assert "a backup never replaces a file" in p.stderr
    assert existing.read_bytes() == b"keep"


# download-snapshot and upload-snapshot

def layer_spec(path, fmt="qcow2"):
    """The image as one layer: a qcow2 opened without its backing file."""
    node = {"driver": fmt, "file": {"driver": "file", "filename": str(path)}}
    if fmt == "qcow2":
        node["backing"] = None
    return "json:" + json.dumps(node)


def compare_layer(a, b, a_fmt="qcow2", b_fmt="qcow2"):
    compare(layer_spec(a, a_fmt), layer_spec(b, b_fmt))


def layer_data(path):
    """Bytes allocated with data in the layer itself."""
    out = subprocess.run(["qemu-img", "map", "--output=json",
                          layer_spec(path)], check=True, capture_output=True,
                         timeout=60).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


# What the guest writes after each snapshot: data, and zeros over data of
# a layer below (a zero cluster hiding it, not a hole).
GUEST_WRITES = (
    ("write -P 0x51 1m 64k", "write -z 0 64k"),
    ("write -P 0x52 2m 128k",),
    ("write -P 0x53 3m 64k", "write -z 1m 64k"),
)


def snapshot_chain(env, tmp_path, snapshots=3):
    """A disk on a VM with snapshots taken between guest writes: a chain
    of snapshots + 1 layers, the base from make_image."""
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = env.engine.add_disk_from_image(src)
    vm = env.engine.add_vm("vm1", [disk.id])
    for writes in GUEST_WRITES[:snapshots]:
        env.engine.take_snapshot(vm.id)
        qemu_io(disk.path, "qcow2", *writes)
    return disk, vm


def test_snapshot_download_upload_chain(env, tmp_path):
    disk, vm = snapshot_chain(env, tmp_path)
    volumes = list(disk.volumes)
    assert len(volumes) == 4
    down = tmp_path / "down"
    down.mkdir()
    p = env.run("download-snapshot", disk.id, down)
    *lines, result = progress(p.stdout)
    assert result["disk_id"] == disk.id
    assert [x["id"] for x in result["layers"]] == [v.id for v in volumes]
    names = [f"{v.id}.qcow2" for v in volumes]
    assert [x["filename"] for x in result["layers"]] == names
    assert [x["backing_file"] for x in result["layers"]] == [None, *names[:-1]]
    # Each regular layer is its VM snapshot's; the active one the VM's.
    assert [x["snapshot_id"] for x in result["layers"]] == \
        [s.id for s in vm.snapshots[1:]] + [vm.active_snapshot.id]
    assert result["top"] == str(down / names[-1])
    phases = [r["description"] for r in lines]
    assert "verifying layer 4/4" in phases
    assert phases[-1] == "download completed"
    assert lines[-1]["transferred"] == lines[-1]["size"] == 4 * 4 * MiB
    # Every layer alone equals the volume, with the same data allocated,
    # backed by the one below by its relative name.
    for name, volume in zip(names, volumes):
        compare_layer(down / name, volume.path)
        assert layer_data(down / name) == layer_data(volume.path)
    for lower, upper in zip(names, names[1:]):
        info = json.loads(subprocess.check_output(
            ["qemu-img", "info", "--output=json", str(down / upper)]))
        assert info["backing-filename"] == lower
    compare(down / names[-1], disk.path)
    # Shallow transfers: of the snapshots, and of the disk for the top.
    transfers = [t for t in env.engine.transfers.values() if t.disk is disk]
    assert [(t.snapshot_transfer, t.shallow, t.volume.id)
            for t in transfers] == \
        [(True, True, v.id) for v in volumes[:-1]] + \
        [(False, True, volumes[-1].id)]
    assert disk.status == "ok"

    # Up again, into a new disk on another VM: the same layers.
    vm2 = env.engine.add_vm("vm2", [])
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm2.id,
                down / names[-1])
    *lines, result = progress(p.stdout)
    new = env.engine.disks[result["disk_id"]]
    assert new is not disk and new in vm2.disks
    assert result["vm_id"] == vm2.id
    assert len(new.volumes) == 4
    assert [x["id"] for x in result["layers"]] == [v.id for v in new.volumes]
    assert [x["filename"] for x in result["layers"]] == \
        [str(down / n) for n in names]
    for name, volume in zip(names, new.volumes):
        compare_layer(down / name, volume.path)
    compare(new.path, disk.path)
    phases = [r["description"] for r in lines]
    for step in ("creating disk", "uploading layer 1/4",
                 "creating snapshot (layer 2/4)", "uploading layer 4/4",
                 "verifying disk"):
        assert step in phases
    assert phases[-1] == "upload completed"
    assert lines[-1]["transferred"] == lines[-1]["size"] == 4 * 4 * MiB
    # Three VM snapshots of the new disk only.
    assert len(vm2.snapshots) == 4
    assert all(s.status == "ok" for s in vm2.snapshots)
    assert new.status == "ok"


def test_download_snapshot_text_output(env, tmp_path):
    disk, vm = snapshot_chain(env, tmp_path, snapshots=1)
    p = subprocess.run(
        [OVIRT_IMG, "download-snapshot", *env.common("text"), disk.id,
         str(tmp_path)], env=env.environ, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.replace("\r", "\n").splitlines()
    result = [line for line in lines if not TEXT_LINE.fullmatch(line.strip())
              and line.strip()]
    base, top = disk.volumes
    assert result == [
        f"disk id:   {disk.id}",
        f"directory: {tmp_path}",
        "layers:    2",
        f"layer 1:   {base.id}.qcow2 (id {base.id}, snapshot "
        f"{vm.snapshots[1].id})",
        f"layer 2:   {top.id}.qcow2 (id {top.id}, snapshot "
        f"{vm.active_snapshot.id})",
        f"top:       {tmp_path / (top.id + '.qcow2')}",
    ]


def test_download_snapshot_floating_disk(env, tmp_path):
    # One layer, no VM: the disk alone.
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = env.engine.add_disk_from_image(src)
    down = tmp_path / "down"
    down.mkdir()
    result = progress(env.run("download-snapshot", disk.id, down).stdout)[-1]
    layer, = result["layers"]
    assert layer == {"id": disk.image_id, "filename": f"{disk.image_id}.qcow2",
                     "backing_file": None, "snapshot_id": None}
    compare(down / layer["filename"], src)


def test_download_snapshot_never_replaces_a_file(env, tmp_path):
    disk, vm = snapshot_chain(env, tmp_path, snapshots=1)
    existing = tmp_path / f"{disk.volumes[1].id}.qcow2"
    existing.write_bytes(b"keep")
    p = env.run("download-snapshot", disk.id, tmp_path, check=False)
    assert p.returncode == 1
    assert "a download never replaces a file" in p.stderr
    assert existing.read_bytes() == b"keep"
    assert not (tmp_path / f"{disk.volumes[0].id}.qcow2").exists()
    assert not env.engine.transfers


def test_download_snapshot_errors(env, tmp_path):
    unknown = str(uuid.uuid4())
    p = env.run("download-snapshot", unknown, tmp_path, check=False)
    assert p.returncode == 1
    assert f"Cannot get disk {unknown}" in p.stderr
    p = env.run("download-snapshot", unknown, tmp_path / "nosuch",
                check=False)
    assert p.returncode == 2
    assert "not an existing directory" in p.stderr


def test_download_snapshot_failure_removes_files(env, tmp_path):
    disk, vm = snapshot_chain(env, tmp_path, snapshots=2)
    # The top layer's transfer cannot start: the layers done are removed.
    os.unlink(disk.path)
    down = tmp_path / "down"
    down.mkdir()
    p = env.run("download-snapshot", disk.id, down, check=False)
    assert p.returncode == 1
    assert "did not start" in p.stderr
    assert os.listdir(down) == []
    assert [t.volume for t in env.engine.transfers.values()] == \
        disk.volumes
    assert all(t.phase in enginesim.FINISHED
               for t in env.engine.transfers.values())


def local_chain(tmp_path, layers=3):
    """A local qcow2 chain named by relative links, top last."""
    paths = [tmp_path / f"layer{i}.qcow2" for i in range(layers)]
    make_image(paths[0], "qcow2")
    for lower, upper, writes in zip(paths, paths[1:], GUEST_WRITES):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                        lower.name, "-F", "qcow2", str(upper)], check=True)
        qemu_io(upper, "qcow2", *writes)
    return paths


def test_upload_snapshot_text_and_raw_base(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    vm = env.engine.add_vm("vm1", [])
    p = subprocess.run(
        [OVIRT_IMG, "upload-snapshot", *env.common("text"), "-s", "nfs",
         "--vm", vm.id, "-f", "raw", "--name", "restored", str(paths[-1])],
        env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    disk, = env.disks("restored")
    base, top = disk.volumes
    assert (base.format, top.format) == ("raw", "cow")
    compare_layer(paths[0], base.path, b_fmt="raw")
    compare_layer(paths[1], top.path)
    compare(paths[-1], disk.path)
    assert f"disk id: {disk.id}" in p.stdout
    assert f"layer 2: {paths[1]} (id {top.id}, snapshot " \
        f"{vm.active_snapshot.id})" in p.stdout


def test_upload_snapshot_refuses_layer_outside_folder(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    other = tmp_path / "other"
    other.mkdir()
    top = other / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b",
                    str(paths[-1]), "-F", "qcow2", str(top)], check=True)
    vm = env.engine.add_vm("vm1", [])
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id, top,
                check=False)
    assert p.returncode == 1
    assert f"Layer {paths[-1]} is outside {other}" in p.stderr
    assert "--allow-backing" in p.stderr
    assert not env.engine.requests
    # Allowed: the three layers.
    result = progress(env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id,
                              "--allow-backing", top).stdout)[-1]
    assert len(env.engine.disks[result["disk_id"]].volumes) == 3


@pytest.mark.parametrize("backing", ["json:{\"driver\": \"raw\"}",
                                     "nbd://localhost/x"])
def test_upload_snapshot_refuses_protocol_backing(env, tmp_path, backing):
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    backing, "-F", "raw", str(top), "1m"], check=True)
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", str(uuid.uuid4()),
                "--allow-backing", top, check=False)
    assert p.returncode == 1
    assert "which is not a file name" in p.stderr
    assert not env.engine.requests


def test_upload_snapshot_vm_errors(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    unknown = str(uuid.uuid4())
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", unknown, paths[-1],
                check=False)
    assert p.returncode == 1
    assert f"Cannot get VM {unknown}" in p.stderr
    vm = env.engine.add_vm("vm1", [], status="up")
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id, paths[-1],
                check=False)
    assert p.returncode == 1
    assert f"VM {vm.id} is up" in p.stderr
    assert not [d for d in env.engine.disks.values() if not d.removed]


@pytest.mark.parametrize("args, message", [
    (["--vm", "not-an-id"], "--vm"),
    ([], "--vm"),
])
def test_upload_snapshot_usage_errors(env, tmp_path, args, message):
    p = env.run("upload-snapshot", "-s", "nfs", *args, "/etc/hostname",
                check=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert not env.engine.requests


def test_upload_snapshot_base_failure_removes_disk(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    vm = env.engine.add_vm("vm1", [])
    env.engine.inject("start_transfer")
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id, paths[-1],
                check=False)
    assert p.returncode == 1
    assert not [d for d in env.engine.disks.values() if not d.removed]
    assert vm.disks == [] and len(vm.snapshots) == 1


def test_upload_snapshot_later_failure_keeps_layers_done(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    vm = env.engine.add_vm("vm1", [])
    # The base is uploaded; the snapshot for the second layer fails.
    env.engine.inject("create_snapshot")
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id, paths[-1],
                check=False)
    assert p.returncode == 1
    disk, = [d for d in env.engine.disks.values() if not d.removed]
    assert len(disk.volumes) == 1 and disk.status == "ok"
    assert disk in vm.disks and len(vm.snapshots) == 1
    assert "injected fault create_snapshot" in p.stderr
    assert (f"Disk {disk.id}, attached to VM {vm.id}, is left with the "
            f"first 1 of the 2 layers of {paths[-1]}") in p.stderr
    compare_layer(paths[0], disk.path)


def test_upload_snapshot_layer_failure_engine_removes_disk(env, tmp_path):
    paths = local_chain(tmp_path, layers=2)
    vm = env.engine.add_vm("vm1", [])
    # The second layer's transfer cannot start: ovirt-img cancels it, and
    # the engine removes the disk of a failed upload, base and all.
    env.engine.inject("start_layer_upload")
    p = env.run("upload-snapshot", "-s", "nfs", "--vm", vm.id, paths[-1],
                check=False)
    assert p.returncode == 1
    disk, = env.engine.disks.values()
    snapshot = vm.snapshots[1]
    assert (f"The engine removes disk {disk.id} (a failed upload removes "
            f"its disk); VM snapshots {snapshot.id} remain on VM "
            f"{vm.id} without it") in p.stderr
    testutil.wait_for(lambda: disk.removed, message="disk removed")
    assert all(t.phase in enginesim.FINISHED
               for t in env.engine.transfers.values())


def test_download_snapshot_interrupted(env, spawn, tmp_path):
    # A small base, then 64 MiB of data in the active layer: interrupted
    # in the middle of the second layer.
    disk = env.engine.add_disk_from_image(
        make_image(tmp_path / "base.qcow2", "qcow2", 64 * MiB))
    vm = env.engine.add_vm("vm1", [disk.id])
    env.engine.take_snapshot(vm.id)
    qemu_io(disk.path, "qcow2", f"write -P 0x5a 0 {64 * MiB}")
    down = tmp_path / "down"
    down.mkdir()
    proc = spawn("download-snapshot", *SLOW, disk.id, down)

    def top_transfer():
        with env.engine.lock:
            return next((t for t in env.engine.transfers.values()
                         if t.volume is disk.active), None)
    t = testutil.wait_for(top_transfer, timeout=DEADLINE,
                          message="the top layer's transfer")
    interrupt(env, proc, t, signal.SIGINT, 64 * MiB)
    code, _, err = finish(proc)
    assert code == 128 + signal.SIGINT, err
    assert err == ["ovirt-img: interrupted"]
    # Both transfers finalized, the files written removed.
    assert [x.phase for x in env.engine.transfers.values()] == \
        ["finished_success"] * 2
    assert disk.status == "ok"
    assert os.listdir(down) == []
    no_qemu_nbd(str(down))


# Resume: an interrupted upload finished with --resume.

def journal_file(env, transfer_id):
    return os.path.join(env.home, ".local", "state", "ovirt-img",
                        f"{transfer_id}.json")


def journal_done(env, transfer_id):
    try:
        with open(journal_file(env, transfer_id)) as f:
            return sum(n for _, n in json.load(f)["ranges"])
    except (FileNotFoundError, ValueError):
        return 0


@pytest.fixture
def relay_env(tmp_path, make_daemon, pki):
    """An Env whose transfer URLs go through a relay (test/relay.py) to a
    daemon without its unix socket: a network the test controls."""
    import relay
    daemon = make_daemon(local={"enable": "false"})
    r = relay.Relay(daemon.remote.server.address()[1])
    eng = enginesim.Engine(
        tmp_path / "store", daemon.control.server.address(), r.port, pki,
        delay=0.05)
    eng.start()
    env = Env(eng, pki, str(tmp_path))
    env.relay = r
    yield env
    r.close()
    eng.stop()


@pytest.fixture
def relay_spawn(relay_env):
    procs = []

    def start(*args):
        cmd = [OVIRT_IMG, args[0], *relay_env.common(),
               *[str(a) for a in args[1:]]]
        proc = subprocess.Popen(cmd, env=relay_env.environ,
                                cwd=relay_env.tmp, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=TIMEOUT)


def test_upload_killed_resume(relay_env, relay_spawn, tmp_path):
    env = relay_env
    size = 64 * MiB
    src = big_image(tmp_path / "big.raw", size)
    # The network stalls 20 MiB into the upload: the first 16 MiB
    # request completes and is journaled, the second does not.
    env.relay.set_budget(20 * MiB)
    proc = relay_spawn("upload-disk", "-s", "nfs", "-f", "raw",
                       "--max-workers", "1", src)
    t = one_transfer(env)
    # New uploads are resumable: paused, not cancelled, when idle.
    assert (t.timeout_policy, t.inactivity_timeout) == ("pause", 3600)
    testutil.wait_for(lambda: journal_done(env, t.id) >= 16 * MiB,
                      timeout=DEADLINE, message="journaled ranges")
    proc.kill()
    finish(proc)
    journal = journal_file(env, t.id)
    assert stat.S_IMODE(os.stat(journal).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(journal)).st_mode) == 0o700
    with open(journal) as f:
        text = f.read()
    # Never the ticket URL (its path is the ticket id, a credential).
    assert t.ticket_uuid not in text
    done = journal_done(env, t.id)
    assert done == 16 * MiB
    assert t.phase == "transferring"
    before = ticket(env, t)["transferred"]

    env.relay.set_budget(None)
    log_file = tmp_path / "resume.log"
    p = env.run("upload-disk", "-s", "nfs", "--resume", t.id,
                "--log-level", "info", "--log-file", log_file, src)
    lines = progress(p.stdout)
    assert lines[-1]["description"] == "upload completed"
    assert lines[-1]["transferred"] == size
    assert t.phase == "finished_success"
    compare(src, t.disk.path)
    assert not os.path.exists(journal)
    assert f"{done} bytes done before" in log_file.read_text()
    # Only the missing part was sent: the daemon's count of the ticket's
    # bytes grew by the missing part, not the whole image.
    sent = t.transferred - before
    print(f"resume: journal had {done} of {size} bytes; daemon counted "
          f"{before} before the resume, {t.transferred} after: {sent} "
          f"sent on resume")
    assert sent <= size - done


def test_upload_network_failure_pauses_and_resumes(relay_env, tmp_path):
    env = relay_env
    size = 32 * MiB
    src = big_image(tmp_path / "big.raw", size)
    # Every connection is cut after 1 MiB: the retries fail too.
    env.relay.cut_all(MiB)
    p = env.run("upload-disk", "-s", "nfs", "-f", "raw", src, check=False)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    # Each retry is a warning on stderr (default log level), then the
    # error, one line.
    assert all(line.startswith(("ovirt-img: ", "20")) for line in lines)
    assert len([m for m in lines if "retrying in" in m]) >= 4
    err = [line for line in lines if line.startswith("ovirt-img: ")]
    assert_one_line(err, "error:", "after 5 attempts", "resume it with: ")
    t = one_transfer(env)
    assert t.ticket_uuid not in p.stderr
    # Paused, not cancelled: the disk is kept.
    assert t.phase == "paused_user"
    assert not t.disk.removed
    assert env.relay.cut >= 5
    command = shlex.split(err[0].split("resume it with: ", 1)[1])
    assert command[:4] == ["ovirt-img", "upload-disk", "--resume", t.id]
    assert command[-1] == src

    # A changed source refuses to resume; the transfer stays paused.
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    p = env.run("upload-disk", "-s", "nfs", "--resume", t.id, src,
                check=False)
    assert p.returncode == 1
    assert_one_line(p.stderr.strip().splitlines(), "error:",
                    "is not the file it started with", "mtime_ns")
    assert t.phase == "paused_user"

    # The network is back, the source as it was: the printed command
    # finishes the upload.
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    env.relay.heal()
    p = subprocess.run([OVIRT_IMG, *command[1:]], env=env.environ,
                       cwd=env.tmp, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert progress(p.stdout)[-1]["description"] == "upload completed"
    assert t.phase == "finished_success"
    compare(src, t.disk.path)
    assert not os.path.exists(journal_file(env, t.id))


def test_download_network_failure_resumes(relay_env, relay_spawn, tmp_path):
    env = relay_env
    size = 64 * MiB
    src = big_image(tmp_path / "big.raw", size)
    disk = env.engine.add_disk_from_image(src, fmt="raw")
    dst = str(tmp_path / "dst.raw")
    # The network stalls 20 MiB into the download: the first 16 MiB
    # range is written and journaled; then it is cut for good.
    env.relay.set_budget(20 * MiB)
    proc = relay_spawn("download-disk", "-f", "raw", "--max-workers", "1",
                       disk.id, dst)
    t = one_transfer(env)
    assert (t.timeout_policy, t.inactivity_timeout) == ("pause", 3600)
    testutil.wait_for(lambda: journal_done(env, t.id) >= 16 * MiB,
                      timeout=DEADLINE, message="journaled ranges")
    env.relay.cut_all(MiB)
    env.relay.set_budget(None)
    code, _, lines = finish(proc)
    assert code == 1, lines
    err = [line for line in lines if line.startswith("ovirt-img: ")]
    assert_one_line(err, "error:", "after 5 attempts", "resume it with: ")
    assert t.ticket_uuid not in "".join(lines)
    # Not finalized, the partial image kept.
    assert t.phase == "transferring"
    assert os.path.exists(dst)
    done = journal_done(env, t.id)
    assert done == 16 * MiB
    command = shlex.split(err[0].split("resume it with: ", 1)[1])
    assert command[:4] == ["ovirt-img", "download-disk", "--resume", t.id]

    env.relay.heal()
    before = env.relay.moved
    p = subprocess.run([OVIRT_IMG, *command[1:]], env=env.environ,
                       cwd=env.tmp, capture_output=True, text=True,
                       timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert progress(p.stdout)[-1]["description"] == "download completed"
    assert t.phase == "finished_success"
    compare(src, dst)
    assert not os.path.exists(journal_file(env, t.id))
    # Only the missing part crossed the relay (and TLS, HTTP and the
    # checksum's few bytes).
    moved = env.relay.moved - before
    print(f"download resume: journal had {done} of {size} bytes; "
          f"{moved} bytes crossed the relay on resume")
    assert moved < size - done + MiB


def test_backup_backing_file_with_colon(env, tmp_path):
    # A previous backup named like a qemu protocol ("nbd:...") is still
    # a file to the incremental's qcow2 header.
    disk = vm_disk(env, tmp_path)
    env.engine.add_vm("vm1", [disk.id])
    full = tmp_path / "nbd:full.qcow2"
    p = env.run("backup-disk", disk.id, full)
    checkpoint = backup_result(p.stdout)[1]["checkpoint_id"]
    qemu_io(disk.path, "qcow2", "write -P 0x51 0 64k")
    incr = tmp_path / "incr.qcow2"
    env.run("backup-disk", "--from-checkpoint", checkpoint,
            "--backing-file", full, disk.id, incr)
    assert client.info(str(incr))["backing-filename"] == "./nbd:full.qcow2"
    compare(snapshot_of(disk, tmp_path / "now.raw"), incr)


# upload-disk from a URL (urlsource.py), from an HTTP(S) server on
# loopback (imageserver.py).

SECRET = "tok-5e3c2et-value"


@pytest.fixture
def image_server():
    from imageserver import ImageServer
    with ImageServer() as srv:
        yield srv


def url_image(tmp_path, fmt, size=8 * MiB):
    path = make_image(tmp_path / f"image.{fmt}", fmt, size=size)
    # Data past the first 2 MiB of the file, read by ranged GETs.
    qemu_io(path, fmt, "write -P 0x45 5m 2m")
    return path


@pytest.mark.parametrize("src_fmt,disk_fmt,sd", [
    ("qcow2", "qcow2", "nfs"), ("raw", "qcow2", "nfs"),
    ("qcow2", "raw", "iscsi"),
])
def test_upload_url(env, tmp_path, image_server, src_fmt, disk_fmt, sd):
    src = url_image(tmp_path, src_fmt)
    image_server.files["/images/fedora.img"] = src
    p = env.run("upload-disk", "-s", sd, "-f", disk_fmt,
                image_server.url("/images/fedora.img?sig=abc"))
    lines = progress(p.stdout)
    assert [r["description"] for r in lines][-1] == "upload completed"
    assert lines[-1]["transferred"] == 8 * MiB
    disk, = env.disks("fedora")
    assert disk.format == ("cow" if disk_fmt == "qcow2" else "raw")
    assert disk.provisioned_size == 8 * MiB
    compare(src, disk.path)
    assert any(r[3] == 206 for r in image_server.requests)


def test_upload_url_without_ranges(env, tmp_path):
    from imageserver import ImageServer
    src = url_image(tmp_path, "raw")
    with ImageServer(ranges=False) as srv:
        srv.files["/disk.raw"] = src
        env.run("upload-disk", "-s", "nfs", srv.url("/disk.raw"))
        assert len(srv.requests) == 1
    disk, = env.disks("disk")
    compare(src, disk.path)


def test_upload_url_without_ranges_qcow2_refused(env, tmp_path):
    from imageserver import ImageServer
    src = url_image(tmp_path, "qcow2")
    with ImageServer(ranges=False) as srv:
        srv.files["/disk.qcow2"] = src
        p = env.run("upload-disk", "-s", "nfs", srv.url("/disk.qcow2"),
                    check=False)
    assert p.returncode == 1
    assert "serves no ranges" in p.stderr
    assert "random access" in p.stderr
    assert not env.engine.disks


def test_upload_url_header_never_shown(env, tmp_path, image_server):
    """The header's value is sent, and never in a log or a command
    line (ps) of ovirt-img or its children."""
    src = url_image(tmp_path, "qcow2")
    image_server.files["/disk.qcow2"] = src
    image_server.required = {"X-Auth-Token": SECRET}
    headers = tmp_path / "headers"
    headers.write_text(f"X-Auth-Token: {SECRET}\n")
    log_file = tmp_path / "ovirt-img.log"
    # Hold the reads past the head, to look at the processes meanwhile.
    image_server.hold_after = 2 * MiB
    cmd = [OVIRT_IMG, "upload-disk", *env.common(), "--log-level", "debug",
           "--log-file", str(log_file), "-s", "nfs", "--header-file",
           str(headers), image_server.url("/disk.qcow2")]
    proc = subprocess.Popen(cmd, env=env.environ, cwd=env.tmp,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert image_server.held.wait(TIMEOUT)
        cmdlines = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmdlines.append(f.read())
                except OSError:
                    pass
        # ovirt-img and its qemu-nbd are running, without the secret.
        assert any(b"disk.qcow2" in c for c in cmdlines)
        assert any(c.startswith(b"qemu-nbd") for c in cmdlines)
        assert not [c for c in cmdlines if SECRET.encode() in c]
        image_server.release.set()
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        image_server.release.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    disk, = env.disks("disk")
    compare(src, disk.path)
    log = log_file.read_text()
    assert SECRET not in log + out + err
    assert "loopback address" in log
    # The header was sent with every request.
    assert all(r[2].get("x-auth-token") == SECRET
               for r in image_server.requests)


def test_upload_url_unauthorized(env, tmp_path, image_server):
    src = url_image(tmp_path, "qcow2")
    image_server.files["/disk.qcow2"] = src
    image_server.required = {"X-Auth-Token": SECRET}
    p = env.run("upload-disk", "-s", "nfs", "--header",
                "X-Auth-Token: wrong-value", image_server.url("/disk.qcow2"),
                check=False)
    assert p.returncode == 1
    assert "401" in p.stderr
    assert "wrong-value" not in p.stderr
    assert not env.engine.disks


def test_upload_url_redirect(env, tmp_path, image_server):
    src = url_image(tmp_path, "qcow2")
    image_server.files["/disk.qcow2"] = src
    image_server.redirects["/same"] = "/disk.qcow2"
    image_server.redirects["/other"] = image_server.url(
        "/disk.qcow2", host="localhost")
    p = env.run("upload-disk", "-s", "nfs", image_server.url("/other"),
                check=False)
    assert p.returncode == 1
    assert "another host (localhost)" in p.stderr
    assert "--allow-redirect-host" in p.stderr
    assert not env.engine.disks
    assert not any(r[2]["host"].startswith("localhost")
                   for r in image_server.requests)

    env.run("upload-disk", "-s", "nfs", "--name", "same",
            image_server.url("/same"))
    env.run("upload-disk", "-s", "nfs", "--name", "other",
            "--allow-redirect-host", image_server.url("/other"))
    for name in ("same", "other"):
        disk, = env.disks(name)
        compare(src, disk.path)


def test_upload_url_backing_file_refused(env, tmp_path, image_server):
    base = url_image(tmp_path, "qcow2")
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base,
                    "-F", "qcow2", str(top)], check=True, timeout=TIMEOUT)
    image_server.files["/top.qcow2"] = str(top)
    p = env.run("upload-disk", "-s", "nfs", image_server.url("/top.qcow2"),
                check=False)
    assert p.returncode == 1
    assert "backing file" in p.stderr
    assert "never followed" in p.stderr
    assert not env.engine.disks


def test_upload_url_https(env, tmp_path):
    from imageserver import ImageServer
    src = url_image(tmp_path, "qcow2")
    with ImageServer(pki=env.pki) as srv:
        srv.files["/disk.qcow2"] = src
        url = srv.url("/disk.qcow2", host="localhost")
        env.run("upload-disk", "-s", "nfs", "--source-cafile",
                env.pki["ca_file"], url)
    disk, = env.disks("disk")
    compare(src, disk.path)


@pytest.mark.parametrize("args,message", [
    (["--member", "x"], "--member cannot be used with a URL"),
    (["--allow-backing"], "--allow-backing cannot be used with a URL"),
    (["--header", f"no colon {SECRET}"], "argument --header"),
])
def test_upload_url_usage_errors(env, image_server, args, message):
    p = env.run("upload-disk", "-s", "nfs", *args,
                image_server.url("/disk"), check=False)
    assert p.returncode == 2
    assert message in p.stderr
    assert SECRET not in p.stderr


def test_upload_url_options_need_url(env, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = env.run("upload-disk", "-s", "nfs", "--header", "A: b", src,
                check=False)
    assert p.returncode == 2
    assert "--header needs a URL" in p.stderr


def test_upload_url_credentials_refused(env):
    p = env.run("upload-disk", "-s", "nfs",
                f"http://user:{SECRET}@127.0.0.1:1/disk", check=False)
    assert p.returncode == 2
    assert "credentials" in p.stderr
    assert SECRET not in p.stderr
