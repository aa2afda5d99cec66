"""
The engine simulator (test/enginesim.py) driven by the oVirt SDK's own
example scripts (ovirt-engine-sdk-python 4.6.3, from its sdist on PyPI),
against our daemon and real qemu-nbd: what they upload, download and back
up compares equal with qemu-img compare.

The examples poll the engine every second (time.sleep(1) in the scripts),
so each run takes a few seconds however fast the simulator is.
"""

import fcntl
import glob
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile

import pytest

import enginesim

SDK_VERSION = "4.6.3"
SDK_REQUIREMENT = f"ovirt-engine-sdk-python=={SDK_VERSION}"
SDK_NAME = f"ovirt_engine_sdk_python-{SDK_VERSION}"
EXAMPLES = ("upload_disk.py", "download_disk.py", "backup_vm.py",
            "checksum_disk.py")
EXAMPLE_TIMEOUT = 120
MiB = 1 << 20


def sdk_cache():
    return os.environ.get("IMAGEIO_SDK_CACHE") or os.path.expanduser(
        "~/.cache/imageio-sdk")


@pytest.fixture(scope="session")
def examples():
    """
    The SDK's examples/ directory, unpacked once per machine from the
    sdist (pip download) into the cache, under a lock; the directory is
    renamed into place only when complete.
    """
    cache = sdk_cache()
    os.makedirs(cache, exist_ok=True)
    final = os.path.join(cache, SDK_NAME)
    with open(os.path.join(cache, f"{SDK_NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(final, "examples", EXAMPLES[0])):
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                subprocess.run(
                    [sys.executable, "-m", "pip", "download", "-q",
                     "--no-deps", "--no-binary", ":all:", "-d", tmp,
                     SDK_REQUIREMENT],
                    check=True, timeout=600, stdout=subprocess.DEVNULL)
                sdist, = glob.glob(os.path.join(tmp, "*.tar.gz"))
                with tarfile.open(sdist) as tar:
                    members = [m for m in tar.getmembers()
                               if m.name.startswith(f"{SDK_NAME}/examples/")
                               and ".." not in m.name.split("/")
                               and (m.isfile() or m.isdir())]
                    tar.extractall(tmp, members=members)
                os.rename(os.path.join(tmp, SDK_NAME), final)
    path = os.path.join(final, "examples")
    for name in EXAMPLES:
        assert os.path.isfile(os.path.join(path, name))
    return path


@pytest.fixture
def engine(tmp_path, make_daemon, pki):
    daemon = make_daemon()
    eng = enginesim.Engine(
        tmp_path / "store", daemon.control.server.address(),
        daemon.remote.server.address()[1], pki, delay=0.1)
    eng.start()
    eng.daemon = daemon
    yield eng
    eng.stop()


@pytest.fixture
def run_example(tmp_path, engine, examples, pki):
    """Run an SDK example as a child process, with ~/.config/ovirt.conf
    pointing at the simulator; return its CompletedProcess."""
    home = tmp_path / "home"
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "ovirt.conf").write_text(
        "[engine]\n"
        f"engine_url = {engine.url}\n"
        "username = admin@internal\n"
        "password = password\n"
        f"cafile = {pki['ca_file']}\n")
    workdir = tmp_path / "work"
    workdir.mkdir()
    env = dict(os.environ, HOME=str(home))

    def run(name, *args, check=True):
        p = subprocess.run(
            [sys.executable, os.path.join(examples, name), "-c", "engine",
             *map(str, args)],
            cwd=workdir, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, timeout=EXAMPLE_TIMEOUT)
        if check and p.returncode != 0:
            raise AssertionError(
                f"{name} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                f"stderr:\n{p.stderr}")
        return p

    return run


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


def image_info(path):
    out = subprocess.check_output(
        ["qemu-img", "info", "-U", "--output", "json", str(path)])
    return json.loads(out)


def disk_id(stdout):
    m = re.search(r"Disk ID: (\S+)", stdout)
    assert m, stdout
    return m.group(1)


def upload(engine, run_example, src, *args):
    p = run_example("upload_disk.py", src, *args)
    assert "Upload completed successfully" in p.stdout
    disk = engine.disks[disk_id(p.stdout)]
    assert disk.status == "ok"
    return disk


def assert_no_tickets(engine):
    assert all(t.ticket_id is None and t.nbd is None
               for t in engine.transfers.values())


def test_upload_download_raw(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    disk = upload(engine, run_example, src, "--sd-name", "nfs",
                  "--disk-format", "raw", "--disk-sparse")
    assert (disk.format, disk.sparse, disk.sd.name) == ("raw", True, "nfs")
    assert image_info(disk.path)["format"] == "raw"
    compare(src, disk.path)
    t, = engine.transfers.values()
    assert (t.direction, t.phase) == ("upload", "finished_success")

    dst = tmp_path / "dst.raw"
    p = run_example("download_disk.py", disk.id, dst, "--format", "raw")
    assert "Download completed successfully" in p.stdout
    assert image_info(dst)["format"] == "raw"
    compare(src, dst)
    assert disk.status == "ok"
    assert_no_tickets(engine)
    # Logged out: every token the examples got was revoked.
    assert not engine.tokens


def test_upload_qcow2(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = upload(engine, run_example, src, "--sd-name", "nfs",
                  "--disk-sparse")
    assert (disk.format, disk.sparse) == ("cow", True)
    info = image_info(disk.path)
    assert info["format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    compare(src, disk.path)


def test_download_qcow2(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src)
    dst = tmp_path / "dst.qcow2"
    run_example("download_disk.py", disk.id, dst)
    assert image_info(dst)["format"] == "qcow2"
    compare(src, dst)
    t, = engine.transfers.values()
    assert (t.direction, t.phase) == ("download", "finished_success")
    assert disk.status == "ok"
    assert_no_tickets(engine)


def test_upload_qcow2_to_raw_block_disk(engine, run_example, tmp_path):
    # Format conversion through qemu-nbd; a preallocated raw disk is what
    # a block domain allows.
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = upload(engine, run_example, src, "--sd-name", "iscsi",
                  "--disk-format", "raw")
    assert (disk.format, disk.sparse, disk.sd.block) == ("raw", False, True)
    assert image_info(disk.path)["format"] == "raw"
    compare(src, disk.path)


def test_upload_qcow2_with_backup(engine, run_example, tmp_path):
    # Preallocated qcow2 is allowed only with incremental backup.
    src = make_image(tmp_path / "src.raw", "raw")
    disk = upload(engine, run_example, src, "--sd-name", "nfs",
                  "--disk-format", "qcow2", "--enable-backup")
    assert (disk.format, disk.sparse, disk.backup) == \
        ("cow", False, "incremental")
    compare(src, disk.path)


def test_block_domain_rejects_sparse_raw(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    p = run_example("upload_disk.py", src, "--sd-name", "fcp",
                    "--disk-format", "raw", "--disk-sparse", check=False)
    assert p.returncode != 0
    assert "Operation Failed" in p.stderr
    assert "incompatible with the storage domain type" in p.stderr
    assert not engine.disks


def test_preallocated_qcow2_needs_backup(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    p = run_example("upload_disk.py", src, "--sd-name", "nfs", check=False)
    assert p.returncode != 0
    assert "Operation Failed" in p.stderr
    assert not engine.disks


def test_unknown_storage_domain(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.raw", "raw")
    p = run_example("upload_disk.py", src, "--sd-name", "nosuch",
                    "--disk-sparse", check=False)
    assert p.returncode != 0
    assert "404" in p.stderr
    assert not engine.disks


def test_checksum_disk(engine, run_example, tmp_path):
    from ovirt_imageio import client
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src)
    p = run_example("checksum_disk.py", disk.id)
    assert json.loads(p.stdout) == client.checksum(src)
    assert disk.status == "ok"
    assert_no_tickets(engine)


def backup_files(backup_dir, mode):
    return glob.glob(os.path.join(backup_dir, f"*.{mode}.qcow2"))


def top_data(path):
    """Bytes of data allocated in the qcow2 image itself (not its
    backing chain)."""
    spec = json.dumps({"driver": "qcow2", "backing": None,
                       "file": {"driver": "file", "filename": str(path)}})
    out = subprocess.check_output(
        ["qemu-img", "map", "--output", "json", "json:" + spec])
    return sum(e["length"] for e in json.loads(out) if e["data"])


def test_backup_full_and_incremental(engine, run_example, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src, backup="incremental")
    vm = engine.add_vm("vm1", [disk.id])
    backup_dir = tmp_path / "backups"
    backup_dir.mkdir()

    p = run_example("backup_vm.py", "full", vm.id, "--backup-dir",
                    backup_dir)
    checkpoint, = vm.checkpoints
    assert f"Created checkpoint '{checkpoint.id}'" in p.stdout
    full, = backup_files(backup_dir, "full")
    compare(disk.path, full)
    # The bitmap of the checkpoint is on the volume; the disk is unlocked.
    bitmaps = image_info(disk.path)["format-specific"]["data"]["bitmaps"]
    assert [b["name"] for b in bitmaps] == [checkpoint.id]
    assert (disk.status, disk.backup_mode) == ("ok", None)
    backup, = engine.backups.values()
    assert backup.phase == "succeeded"

    # The guest writes 64 KiB (one bitmap granule) and zeroes 64 KiB.
    qemu_io(disk.path, "qcow2", "write -P 0x55 1m 64k", "write -z 0 64k")

    p = run_example("backup_vm.py", "incremental", vm.id,
                    "--from-checkpoint-uuid", checkpoint.id,
                    "--backup-dir", backup_dir)
    assert len(vm.checkpoints) == 2
    assert vm.checkpoints[1].parent_id == checkpoint.id
    incr, = backup_files(backup_dir, "incremental")
    assert os.path.basename(full) in image_info(incr)["backing-filename"]
    compare(disk.path, incr)
    # Only the dirty granule carries data; the zeroed one is a zero
    # cluster, not a copy.
    assert top_data(incr) == 64 * 1024
    assert_no_tickets(engine)
