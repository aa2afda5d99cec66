"""
The engine simulator (test/enginesim.py) driven by the oVirt SDK's own
example scripts (ovirt-engine-sdk-python 4.6.3, from its sdist on PyPI),
against our daemon and real qemu-nbd: what they upload, download and back
up compares equal with qemu-img compare.

Upstream's ovirt-img 2.5.1 (the anchor venv, test/upstream.py) runs the
same way: the reference for our own ovirt-img.

The examples poll the engine every second (time.sleep(1) in the scripts),
so each run takes a few seconds however fast the simulator is; they run
concurrently (see Examples).
"""

import fcntl
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import uuid

import pytest

import enginesim
import testutil
import upstream
from testutil import compare, make_image, qemu_io

SDK_VERSION = "4.6.3"
SDK_REQUIREMENT = f"ovirt-engine-sdk-python=={SDK_VERSION}"
SDK_NAME = f"ovirt_engine_sdk_python-{SDK_VERSION}"
EXAMPLES = ("upload_disk.py", "download_disk.py", "backup_vm.py",
            "checksum_disk.py", "download_disk_snapshot.py",
            "list_disk_snapshots.py")
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


def start_engine(store, daemon, pki):
    eng = enginesim.Engine(
        store, daemon.control.server.address(),
        daemon.remote.server.address()[1], pki, delay=0.1)
    eng.start()
    eng.daemon = daemon
    return eng


@pytest.fixture
def engine(tmp_path, make_daemon, pki):
    eng = start_engine(tmp_path / "store", make_daemon(), pki)
    yield eng
    eng.stop()


def image_info(path):
    out = subprocess.check_output(
        ["qemu-img", "info", "-U", "--output", "json", str(path)])
    return json.loads(out)


def layer_spec(path):
    """A qcow2 image as one layer, opened without its backing file."""
    return "json:" + json.dumps({
        "driver": "qcow2", "backing": None,
        "file": {"driver": "file", "filename": str(path)}})


def top_data(path):
    """Bytes of data allocated in the qcow2 image itself (not its
    backing chain)."""
    out = subprocess.check_output(
        ["qemu-img", "map", "--output", "json", layer_spec(path)])
    return sum(e["length"] for e in json.loads(out) if e["data"])


# Guest writes between VM snapshots: data, and zeros over the data of a
# layer below.
GUEST_WRITES = (
    ("write -P 0x51 1m 64k", "write -z 0 64k"),
    ("write -P 0x52 2m 128k",),
    ("write -P 0x53 3m 64k", "write -z 1m 64k"),
)


def snapshot_chain(engine, src, name="vm1"):
    """A disk from src on a new VM, with a VM snapshot before each of
    GUEST_WRITES: four layers."""
    disk = engine.add_disk_from_image(src)
    vm = engine.add_vm(name, [disk.id])
    for writes in GUEST_WRITES:
        engine.take_snapshot(vm.id)
        qemu_io(disk.path, "qcow2", *writes)
    return disk, vm


# The SDK's example scripts. Each spends seconds in its own one-second
# polls, so the scenarios below run at the same time, each in a thread,
# against one engine and daemon; each test waits for its scenario and
# checks what it left. Running them together is also a test: concurrent
# transfers on one engine and daemon.


class Examples:
    """The module's engine and daemon, and the example scenarios started
    on them."""

    def __init__(self, engine, examples, pki, tmp):
        self.engine = engine
        self.examples = examples
        self.tmp = tmp
        self.ca_file = pki["ca_file"]
        home = os.path.join(tmp, "home")
        os.makedirs(os.path.join(home, ".config"))
        with open(os.path.join(home, ".config", "ovirt.conf"), "w") as f:
            f.write("[engine]\n"
                    f"engine_url = {engine.url}\n"
                    "username = admin@internal\n"
                    "password = password\n"
                    f"cafile = {pki['ca_file']}\n")
        self.env = dict(os.environ, HOME=home)
        self.threads = {}
        self.results = {}

    def run(self, name, *args, check=True):
        """Run the example script name; return its CompletedProcess."""
        p = subprocess.run(
            [sys.executable, os.path.join(self.examples, name), "-c",
             "engine", *map(str, args)],
            cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, timeout=EXAMPLE_TIMEOUT)
        if check and p.returncode != 0:
            raise AssertionError(
                f"{name} exited {p.returncode}\nstdout:\n{p.stdout}\n"
                f"stderr:\n{p.stderr}")
        return p

    def upload(self, src, *args):
        p = self.run("upload_disk.py", src, *args)
        assert "Upload completed successfully" in p.stdout
        m = re.search(r"Disk ID: (\S+)", p.stdout)
        assert m, p.stdout
        disk = self.engine.disks[m.group(1)]
        assert disk.status == "ok"
        return disk

    def start(self, scenario):
        workdir = os.path.join(self.tmp, scenario.__name__)
        os.mkdir(workdir)

        def run():
            try:
                self.results[scenario.__name__] = (
                    scenario(self, workdir), None)
            except BaseException as exc:
                self.results[scenario.__name__] = (None, exc)

        t = threading.Thread(target=run, name=scenario.__name__,
                             daemon=True)
        self.threads[scenario.__name__] = t
        t.start()

    def result(self, name):
        self.threads[name].join(EXAMPLE_TIMEOUT * 3)
        assert not self.threads[name].is_alive(), f"{name} still running"
        value, exc = self.results[name]
        if exc is not None:
            raise exc
        return value

    def transfers(self, disk):
        return [t for t in self.engine.transfers.values() if t.disk is disk]


def upload_download_raw(ex, workdir):
    src = make_image(os.path.join(workdir, "src.raw"), "raw")
    disk = ex.upload(src, "--sd-name", "nfs", "--disk-format", "raw",
                     "--disk-sparse")
    compare(src, disk.path)
    dst = os.path.join(workdir, "dst.raw")
    p = ex.run("download_disk.py", disk.id, dst, "--format", "raw")
    assert "Download completed successfully" in p.stdout
    return src, disk, dst


def upload_qcow2(ex, workdir):
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    return src, ex.upload(src, "--sd-name", "nfs", "--disk-sparse")


def upload_qcow2_to_raw_block_disk(ex, workdir):
    # Format conversion through qemu-nbd; a preallocated raw disk is what
    # a block domain allows.
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    return src, ex.upload(src, "--sd-name", "iscsi", "--disk-format", "raw")


def download_qcow2(ex, workdir):
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    disk = ex.engine.add_disk_from_image(src)
    dst = os.path.join(workdir, "dst.qcow2")
    ex.run("download_disk.py", disk.id, dst)
    return src, disk, dst


def checksum_disk(ex, workdir):
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    disk = ex.engine.add_disk_from_image(src)
    return src, disk, ex.run("checksum_disk.py", disk.id)


def failed_uploads(ex, workdir):
    src = make_image(os.path.join(workdir, "rejected.raw"), "raw")
    block = ex.run("upload_disk.py", src, "--sd-name", "fcp",
                   "--disk-format", "raw", "--disk-sparse", check=False)
    unknown = ex.run("upload_disk.py", src, "--sd-name", "nosuch",
                     "--disk-sparse", check=False)
    return block, unknown


def backup_full_and_incremental(ex, workdir):
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    disk = ex.engine.add_disk_from_image(src, backup="incremental")
    vm = ex.engine.add_vm("vm1", [disk.id])
    backup_dir = os.path.join(workdir, "backups")
    os.mkdir(backup_dir)
    full = ex.run("backup_vm.py", "full", vm.id, "--backup-dir", backup_dir)
    full_files = glob.glob(os.path.join(backup_dir, "*.full.qcow2"))
    assert len(full_files) == 1, full_files
    compare(disk.path, full_files[0])
    after_full = {
        "checkpoints": list(vm.checkpoints),
        "bitmaps": [b["name"] for b in image_info(disk.path)[
            "format-specific"]["data"].get("bitmaps", [])],
        "disk": (disk.status, disk.backup_mode),
        "backups": [b.phase for b in ex.engine.backups.values()
                    if b.vm is vm],
    }
    # The guest writes 64 KiB (one bitmap granule) and zeroes 64 KiB.
    qemu_io(disk.path, "qcow2", "write -P 0x55 1m 64k", "write -z 0 64k")
    incr = ex.run("backup_vm.py", "incremental", vm.id,
                  "--from-checkpoint-uuid", vm.checkpoints[0].id,
                  "--backup-dir", backup_dir)
    return disk, vm, backup_dir, full, after_full, incr


def upstream_ovirt_img(ex, workdir):
    """Upstream's ovirt-img 2.5.1 (the anchor venv), the client our own
    ovirt-img must match, through the same engine and daemon."""
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2", 8 * MiB)
    password = os.path.join(workdir, "password")
    with open(password, "w") as f:
        f.write("password\n")
    common = ["--engine-url", ex.engine.url, "--username", "admin@internal",
              "--password-file", password, "--cafile", ex.ca_file,
              "-o", "json"]

    def run(*args):
        p = subprocess.run(
            [ex.ovirt_img, *args], env=ex.upstream_env, cwd=workdir,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            timeout=EXAMPLE_TIMEOUT)
        assert p.returncode == 0, f"ovirt-img {args[0]}: {p.stderr}"
        return [json.loads(line) for line in p.stdout.splitlines()]

    up = run("upload-disk", *common, "-s", "nfs", src)
    disk, = [d for d in ex.engine.disks.values()
             if d.name == "src" and not d.removed]
    dst = os.path.join(workdir, "dst.raw")
    down = run("download-disk", *common, "-f", "raw", disk.id, dst)
    return src, disk, dst, up, down


def disk_snapshots(ex, workdir):
    """A disk with three VM snapshots: list_disk_snapshots.py shows the
    chain, download_disk_snapshot.py downloads each snapshot layer on
    top of the one below (--backing-file: shallow; the base without it:
    the chain up to it, itself). test_snapshot_transfer checks the
    non-shallow export of an upper layer; each example run costs seconds
    of its own polling."""
    src = make_image(os.path.join(workdir, "src.qcow2"), "qcow2")
    disk, vm = snapshot_chain(ex.engine, src, name="vm-snapshots")
    listed = json.loads(ex.run("list_disk_snapshots.py", disk.id).stdout)
    files = []
    for volume in disk.volumes[:-1]:
        dst = os.path.join(workdir, f"{volume.id}.qcow2")
        backing = ["--backing-file", files[-1]] if files else []
        p = ex.run("download_disk_snapshot.py", "nfs", volume.id, dst,
                   *backing)
        assert "Download completed successfully" in p.stdout
        files.append(dst)
    return disk, listed, files


SCENARIOS = (upload_download_raw, upload_qcow2,
             upload_qcow2_to_raw_block_disk, download_qcow2, checksum_disk,
             failed_uploads, backup_full_and_incremental, upstream_ovirt_img,
             disk_snapshots)


@pytest.fixture(scope="module")
def ex(tmp_path_factory, pki, examples, upstream_venv):
    from ovirt_imageio import clock, config, server
    tmp = str(tmp_path_factory.mktemp("examples"))
    testutil.write_conf(tmp, testutil.daemon_conf(tmp, pki))
    cfg = config.load(tmp, vendor_dir=os.path.join(tmp, "vendor"))
    daemon = server.Daemon(cfg, clock=clock.FakeClock())
    daemon.start()
    try:
        engine = start_engine(os.path.join(tmp, "store"), daemon, pki)
        try:
            examples = Examples(engine, examples, pki, tmp)
            examples.ovirt_img = os.path.join(upstream_venv, "bin",
                                              "ovirt-img")
            examples.upstream_env = dict(
                os.environ, PYTHONSAFEPATH="1",
                PYTHONPATH=upstream.sdk_path(os.path.join(tmp, "sdk")))
            for scenario in SCENARIOS:
                examples.start(scenario)
            yield examples
            for name in examples.threads:
                examples.threads[name].join(EXAMPLE_TIMEOUT * 3)
        finally:
            engine.stop()
    finally:
        daemon.stop()
        shutil.rmtree(cfg.daemon.run_dir, ignore_errors=True)


def test_upload_download_raw(ex):
    src, disk, dst = ex.result("upload_download_raw")
    assert (disk.format, disk.sparse, disk.sd.name) == ("raw", True, "nfs")
    assert image_info(disk.path)["format"] == "raw"
    assert image_info(dst)["format"] == "raw"
    compare(src, dst)
    assert disk.status == "ok"
    up, down = ex.transfers(disk)
    assert (up.direction, up.phase) == ("upload", "finished_success")
    assert (down.direction, down.phase) == ("download", "finished_success")


def test_upload_qcow2(ex):
    src, disk = ex.result("upload_qcow2")
    assert (disk.format, disk.sparse) == ("cow", True)
    info = image_info(disk.path)
    assert info["format"] == "qcow2"
    assert info["format-specific"]["data"]["compat"] == "1.1"
    compare(src, disk.path)


def test_upload_qcow2_to_raw_block_disk(ex):
    src, disk = ex.result("upload_qcow2_to_raw_block_disk")
    assert (disk.format, disk.sparse, disk.sd.block) == ("raw", False, True)
    assert image_info(disk.path)["format"] == "raw"
    compare(src, disk.path)


def test_download_qcow2(ex):
    src, disk, dst = ex.result("download_qcow2")
    assert image_info(dst)["format"] == "qcow2"
    compare(src, dst)
    t, = ex.transfers(disk)
    assert (t.direction, t.phase) == ("download", "finished_success")
    assert disk.status == "ok"


def test_checksum_disk(ex):
    from ovirt_imageio import client
    src, disk, p = ex.result("checksum_disk")
    assert json.loads(p.stdout) == client.checksum(src)
    assert disk.status == "ok"


def test_failed_uploads(ex):
    block, unknown = ex.result("failed_uploads")
    # The engine's rule for block domains, as the SDK reports it.
    assert block.returncode != 0
    assert "Operation Failed" in block.stderr
    assert "incompatible with the storage domain type" in block.stderr
    assert unknown.returncode != 0
    assert "404" in unknown.stderr
    assert not [d for d in ex.engine.disks.values()
                if d.name.startswith("rejected.")]


def test_backup_full_and_incremental(ex):
    disk, vm, backup_dir, full, after_full, incr = ex.result(
        "backup_full_and_incremental")
    checkpoint, = after_full["checkpoints"]
    assert f"Created checkpoint '{checkpoint.id}'" in full.stdout
    # The checkpoint's bitmap is on the volume; the disk was unlocked.
    assert after_full["bitmaps"] == [checkpoint.id]
    assert after_full["disk"] == ("ok", None)
    assert after_full["backups"] == ["succeeded"]

    assert [c.parent_id for c in vm.checkpoints] == [None, checkpoint.id]
    assert f"Created checkpoint '{vm.checkpoints[1].id}'" in incr.stdout
    incr_file, = glob.glob(os.path.join(backup_dir, "*.incremental.qcow2"))
    full_file, = glob.glob(os.path.join(backup_dir, "*.full.qcow2"))
    assert os.path.basename(full_file) in \
        image_info(incr_file)["backing-filename"]
    compare(disk.path, incr_file)
    # Only the dirty granule carries data; the zeroed one is a zero
    # cluster, not a copy.
    assert top_data(incr_file) == 64 * 1024
    assert (disk.status, disk.backup_mode) == ("ok", None)


def test_upstream_ovirt_img(ex):
    src, disk, dst, up, down = ex.result("upstream_ovirt_img")
    # ovirt-img's defaults: a sparse qcow2 disk with incremental backup.
    assert (disk.format, disk.sparse, disk.backup) == \
        ("cow", True, "incremental")
    compare(src, disk.path)
    compare(src, dst)
    assert image_info(dst)["format"] == "raw"
    assert up[-1]["description"] == "upload completed"
    assert down[-1]["description"] == "download completed"
    assert up[-1]["transferred"] == down[-1]["transferred"] == 8 * MiB


def test_disk_snapshots(ex):
    disk, listed, files = ex.result("disk_snapshots")
    volumes = disk.volumes
    ids = [v.id for v in volumes]
    # The chain from parent links, base first, the active layer last.
    assert [x["id"] for x in listed] == ids
    assert [x["parent"] for x in listed] == [None, *ids[:-1]]
    assert {x["status"] for x in listed} == {"ok"}
    assert {x["format"] for x in listed} == {"cow"}
    # Each shallow download is its layer alone, holes kept, on top of the
    # one below by name.
    for path, volume in zip(files, volumes):
        compare(layer_spec(path), layer_spec(volume.path))
        assert top_data(path) == top_data(volume.path)
    for lower, upper in zip(files, files[1:]):
        assert image_info(upper)["backing-filename"] == \
            os.path.basename(lower)
    compare(files[-1], volumes[-2].path)
    transfers = ex.transfers(disk)
    assert [(t.volume.id, t.shallow, t.snapshot_transfer, t.phase)
            for t in transfers] == \
        [(v.id, i > 0, True, "finished_success")
         for i, v in enumerate(volumes[:-1])]
    assert disk.status == "ok"


def test_examples_clean_up(ex):
    for name in ex.threads:
        ex.result(name)
    # Every transfer finished, its ticket removed and qemu-nbd stopped;
    # every token the examples got was revoked by their logout.
    for t in ex.engine.transfers.values():
        assert t.phase in ("finished_success", "finished_failure")
        assert t.ticket_id is None and t.nbd is None
    assert len(ex.engine.daemon.store) == 0
    assert not ex.engine.tokens


# The simulator's state machines and faults through the SDK, in process
# (no example script, so no one-second polls).


@pytest.fixture
def connection(engine, pki):
    import ovirtsdk4 as sdk
    conn = sdk.Connection(url=engine.url + enginesim.API,
                          username="admin@internal", password="password",
                          ca_file=pki["ca_file"])
    yield conn
    conn.close()


def wait_phase(service, *phases):
    seen = []

    def reached():
        entity = service.get()
        seen.append(entity.phase and entity.phase.value)
        return entity if seen[-1] in phases else None
    try:
        return testutil.wait_for(reached, message=f"phase in {phases}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last phase {seen[-1]}") from None


def new_disk(connection, sd_name="nfs", fmt="cow", sparse=True, size=MiB,
             backup=None):
    from ovirtsdk4 import types
    disks = connection.system_service().disks_service()
    disk = disks.add(types.Disk(
        name="test", format=types.DiskFormat(fmt), sparse=sparse,
        provisioned_size=size, backup=backup,
        storage_domains=[types.StorageDomain(name=sd_name)]))
    service = disks.disk_service(disk.id)
    testutil.wait_for(lambda: service.get().status == types.DiskStatus.OK,
                      message="disk ok")
    return service.get()


def start_transfer(connection, disk, direction="upload", fmt="raw",
                   backup=None, inactivity_timeout=None,
                   timeout_policy=None):
    from ovirtsdk4 import types
    transfers = connection.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id),
        direction=types.ImageTransferDirection(direction),
        format=types.DiskFormat(fmt),
        backup=types.Backup(id=backup.id) if backup else None,
        inactivity_timeout=inactivity_timeout,
        timeout_policy=(types.ImageTransferTimeoutPolicy(timeout_policy)
                        if timeout_policy else None)))
    assert t.phase == types.ImageTransferPhase.INITIALIZING
    service = transfers.image_transfer_service(t.id)
    return service, wait_phase(service, "transferring")


def nbd_args(engine, transfer_id):
    with open(f"/proc/{engine.transfers[transfer_id].nbd.pid}/cmdline") as f:
        return f.read().rstrip("\0").split("\0")


def test_api_root(connection):
    api = connection.system_service().get()
    assert api.product_info.name == "oVirt Engine"
    assert api.product_info.version.major == 4


def test_wrong_password(engine, pki):
    import ovirtsdk4 as sdk
    conn = sdk.Connection(url=engine.url + enginesim.API,
                          username="admin@internal", password="wrong",
                          ca_file=pki["ca_file"])
    with pytest.raises(sdk.AuthError, match="access_denied"):
        conn.system_service().disks_service().list()
    assert not engine.tokens


def test_expired_token_logs_in_again(engine, connection):
    connection.system_service().disks_service().list()
    old = set(engine.tokens)
    engine.tokens.clear()
    # The SDK answers the 401 with a new SSO token and retries.
    assert connection.system_service().disks_service().list() == []
    assert engine.tokens and not engine.tokens & old


def test_logout_revokes_token(engine, connection):
    connection.system_service().disks_service().list()
    assert len(engine.tokens) == 1
    connection.close()
    assert not engine.tokens


def test_add_disk_incomplete(connection):
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types
    disks = connection.system_service().disks_service()
    with pytest.raises(sdk.Error, match="Incomplete parameters"):
        disks.add(types.Disk(name="x", format=types.DiskFormat.COW,
                             storage_domains=[types.StorageDomain(
                                 name="nfs")]))


# ImagesHandler.checkImageConfiguration: (domain, format, sparse, backup).
@pytest.mark.parametrize("sd_name,fmt,sparse,backup,allowed", [
    ("nfs", "raw", True, None, True),
    ("nfs", "raw", False, None, True),
    ("nfs", "cow", True, None, True),
    ("nfs", "cow", False, None, False),
    ("nfs", "cow", False, "incremental", True),
    ("nfs", "raw", False, "incremental", False),
    ("iscsi", "raw", True, None, False),
    ("fcp", "raw", True, None, False),
    ("iscsi", "raw", False, None, True),
    ("iscsi", "cow", True, "incremental", True),
])
def test_disk_configuration(engine, connection, sd_name, fmt, sparse,
                            backup, allowed):
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types
    kind = types.DiskBackup(backup) if backup else None
    if allowed:
        disk = new_disk(connection, sd_name, fmt, sparse, backup=kind)
        info = image_info(engine.disks[disk.id].path)
        assert info["format"] == ("qcow2" if fmt == "cow" else "raw")
        assert disk.backup == (kind or types.DiskBackup.NONE)
    else:
        with pytest.raises(sdk.Error, match="409"):
            new_disk(connection, sd_name, fmt, sparse, backup=kind)
        assert not engine.disks


def test_disk_is_locked_until_created(engine, connection):
    from ovirtsdk4 import types
    engine.delay = 0.5
    disks = connection.system_service().disks_service()
    disk = disks.add(types.Disk(
        name="x", format=types.DiskFormat.RAW, provisioned_size=MiB,
        storage_domains=[types.StorageDomain(name="nfs")]))
    assert disk.status == types.DiskStatus.LOCKED
    service = disks.disk_service(disk.id)
    testutil.wait_for(lambda: service.get().status == types.DiskStatus.OK,
                      message="disk ok")
    assert image_info(engine.disks[disk.id].path)["virtual-size"] == MiB


@pytest.mark.parametrize("sd_name,sparse,discard", [
    ("nfs", True, True),
    ("nfs", False, False),
    ("iscsi", False, False),
])
def test_upload_ticket_and_qemu_nbd(engine, connection, sd_name, sparse,
                                    discard):
    disk = new_disk(connection, sd_name, fmt="raw", sparse=sparse)
    service, t = start_transfer(connection, disk)
    sim = engine.transfers[t.id]
    ticket = engine.daemon.api.get(sim.ticket_id)
    assert ticket["transfer_id"] == t.id
    assert ticket["ops"] == ["write"]
    assert ticket["size"] == MiB
    assert ticket["sparse"] is discard
    assert ticket["dirty"] is False
    args = nbd_args(engine, t.id)
    for flag in ("--persistent", "--shared=8", "--export-name="):
        assert flag in args
    assert ("--discard=unmap" in args) is discard
    assert f"--detect-zeroes={'unmap' if discard else 'on'}" in args
    assert "--read-only" not in args
    assert t.transfer_url == t.proxy_url
    assert t.transfer_url.endswith(f"/images/{sim.ticket_id}")
    assert t.host.id == engine.host.id
    # The disk stays locked for the transfer.
    disks = connection.system_service().disks_service()
    with pytest.raises(Exception, match="locked"):
        start_transfer(connection, disk)
    service.finalize()
    wait_phase(service, "finished_success")
    assert disks.disk_service(disk.id).get().status.value == "ok"
    resp, _ = engine.daemon.api.request("GET", f"/tickets/{sim.ticket_id}"
                                        if sim.ticket_id else "/tickets/x")
    assert resp.status == 404
    assert sim.nbd is None


def test_poll_extends_ticket(engine, connection):
    disk = new_disk(connection)
    # No inactivity timeout: the clock moves past the default one.
    service, t = start_transfer(connection, disk, inactivity_timeout=0)
    assert t.inactivity_timeout == 0
    ticket_id = engine.transfers[t.id].ticket_id
    expires = engine.daemon.api.get(ticket_id)["expires"]
    engine.daemon.clock.advance(100)
    service.get()
    assert engine.daemon.api.get(ticket_id)["expires"] == expires
    # Within the margin: the poll extends the ticket by the full timeout.
    engine.ticket_extend_margin = engine.ticket_timeout
    assert service.get().phase.value == "transferring"
    assert engine.daemon.api.get(ticket_id)["expires"] == expires + 100
    service.cancel()
    wait_phase(service, "finished_failure")


def test_search_local_host(engine, connection):
    # helpers/imagetransfer.py find_host(), on an oVirt host.
    system = connection.system_service()
    dcs = system.data_centers_service().list(search="storage.name=iscsi",
                                             case_sensitive=True)
    assert [dc.name for dc in dcs] == ["dc1"]
    assert system.data_centers_service().list(
        search="storage.name=nosuch", case_sensitive=True) == []
    hosts = system.hosts_service()
    found = hosts.list(search=f"hw_id={engine.host.hw_id} and "
                       "datacenter=dc1 and status=Up", case_sensitive=True)
    assert [h.id for h in found] == [engine.host.id]
    assert hosts.list(search="hw_id=other and datacenter=dc1 and "
                      "status=Up", case_sensitive=True) == []


def test_transfer_of_running_vm_disk(engine, connection, tmp_path):
    import ovirtsdk4 as sdk
    disk = engine.add_disk_from_image(make_image(tmp_path / "s", "raw"),
                                      fmt="raw")
    engine.add_vm("vm1", [disk.id], status="up")
    with pytest.raises(sdk.Error, match="running.*409"):
        start_transfer(connection, disk, "download")
    assert disk.status == "ok"


def test_download_is_read_only(engine, connection, tmp_path):
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src)
    service, t = start_transfer(connection, disk, "download")
    sim = engine.transfers[t.id]
    ticket = engine.daemon.api.get(sim.ticket_id)
    assert ticket["ops"] == ["read"]
    args = nbd_args(engine, t.id)
    assert "--read-only" in args
    assert "--allocation-depth" in args
    assert json.loads(args[-1][len("json:"):])["driver"] == "qcow2"
    service.finalize()
    wait_phase(service, "finished_success")
    assert disk.status == "ok"


def test_cancel_upload_removes_disk(engine, connection):
    import ovirtsdk4 as sdk
    disk = new_disk(connection)
    service, t = start_transfer(connection, disk)
    ticket_id = engine.transfers[t.id].ticket_id
    path = engine.disks[disk.id].path
    service.cancel()
    wait_phase(service, "finished_failure")
    with pytest.raises(sdk.NotFoundError):
        connection.system_service().disks_service().disk_service(
            disk.id).get()
    assert not os.path.exists(path)
    resp, _ = engine.daemon.api.request("GET", f"/tickets/{ticket_id}")
    assert resp.status == 404


def test_cancel_download_keeps_disk(engine, connection, tmp_path):
    disk = engine.add_disk_from_image(make_image(tmp_path / "s", "raw"),
                                      fmt="raw")
    service, t = start_transfer(connection, disk, "download")
    service.cancel()
    wait_phase(service, "finished_failure")
    assert disk.status == "ok" and not disk.removed


def test_upload_start_failure_pauses(engine, connection):
    disk = new_disk(connection)
    os.unlink(engine.disks[disk.id].path)  # qemu-nbd cannot open it
    transfers = connection.system_service().image_transfers_service()
    from ovirtsdk4 import types
    t = transfers.add(types.ImageTransfer(disk=types.Disk(id=disk.id),
                                          format=types.DiskFormat.RAW))
    service = transfers.image_transfer_service(t.id)
    wait_phase(service, "paused_system")
    assert engine.transfers[t.id].nbd is None
    assert any("failed to start" in e["description"] for e in engine.events)
    service.cancel()
    wait_phase(service, "finished_failure")
    assert engine.disks[disk.id].removed


def test_resume_after_system_pause(engine, connection):
    from ovirtsdk4 import types
    disk = new_disk(connection, fmt="raw")
    path = engine.disks[disk.id].path
    os.rename(path, path + ".away")  # the storage goes away
    transfers = connection.system_service().image_transfers_service()
    t = transfers.add(types.ImageTransfer(disk=types.Disk(id=disk.id),
                                          format=types.DiskFormat.RAW))
    service = transfers.image_transfer_service(t.id)
    wait_phase(service, "paused_system")
    assert engine.transfers[t.id].ticket_id is None
    os.rename(path + ".away", path)  # and comes back
    service.resume()
    t = wait_phase(service, "transferring")
    sim = engine.transfers[t.id]
    assert t.transfer_url.endswith(f"/images/{sim.ticket_uuid}")
    assert engine.daemon.api.get(sim.ticket_id)["transfer_id"] == t.id
    service.finalize()
    wait_phase(service, "finished_success")
    assert engine.disks[disk.id].status == "ok"


def test_pause_and_resume_keep_ticket(engine, connection):
    disk = new_disk(connection)
    service, t = start_transfer(connection, disk)
    ticket_id = engine.transfers[t.id].ticket_id
    service.pause()
    assert service.get().phase.value == "paused_user"
    service.resume()
    wait_phase(service, "transferring")
    assert engine.transfers[t.id].ticket_id == ticket_id
    assert engine.daemon.api.get(ticket_id)["transfer_id"] == t.id
    service.cancel()
    wait_phase(service, "finished_failure")


def test_download_start_failure_ends(engine, connection, tmp_path):
    disk = engine.add_disk_from_image(make_image(tmp_path / "s", "raw"),
                                      fmt="raw")
    os.unlink(disk.path)
    transfers = connection.system_service().image_transfers_service()
    from ovirtsdk4 import types
    t = transfers.add(types.ImageTransfer(
        disk=types.Disk(id=disk.id), format=types.DiskFormat.RAW,
        direction=types.ImageTransferDirection.DOWNLOAD))
    wait_phase(transfers.image_transfer_service(t.id), "finished_failure")
    assert disk.status == "ok" and not disk.removed


def test_lost_ticket_ends_download(engine, connection, tmp_path):
    disk = engine.add_disk_from_image(make_image(tmp_path / "s", "raw"),
                                      fmt="raw")
    service, t = start_transfer(connection, disk, "download")
    sim = engine.transfers[t.id]
    resp, _ = engine.daemon.api.delete(sim.ticket_id)
    assert resp.status == 204
    # The next poll fails to get the ticket: the engine cancels.
    assert service.get().phase.value in ("cancelled_system",
                                         "finished_failure")
    wait_phase(service, "finished_failure")
    assert sim.nbd is None
    assert disk.status == "ok"


def test_upload_failing_verification_removes_disk(engine, connection, pki):
    # format=cow: the file backend writes the volume's bytes as they
    # come; raw bytes in a qcow2 volume fail vdsm's verification.
    import http.client
    import ssl
    import urllib.parse
    disk = new_disk(connection, fmt="cow", sparse=True)
    service, t = start_transfer(connection, disk, fmt="cow")
    assert engine.transfers[t.id].backend == "file"
    url = urllib.parse.urlsplit(t.transfer_url)
    ctx = ssl.create_default_context(cafile=pki["ca_file"])
    con = http.client.HTTPSConnection(url.netloc, context=ctx, timeout=30)
    try:
        con.request("PUT", url.path, body=b"not qcow2" * 1000)
        resp = con.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        con.close()
    service.finalize()
    wait_phase(service, "finished_failure")
    assert disk.id in engine.disks and engine.disks[disk.id].removed
    assert any("failed" in e["description"] for e in engine.events)


def test_inactivity_cancels(engine, connection):
    disk = new_disk(connection)
    service, t = start_transfer(connection, disk, inactivity_timeout=10,
                                timeout_policy="cancel")
    engine.daemon.clock.advance(11)
    # The next poll sees the idle ticket.
    assert service.get().phase.value in ("cancelled_system",
                                         "finished_failure")
    wait_phase(service, "finished_failure")
    assert engine.disks[disk.id].removed


def test_inactivity_pauses_upload(engine, connection):
    disk = new_disk(connection)
    service, t = start_transfer(connection, disk, inactivity_timeout=10,
                                timeout_policy="legacy")
    engine.daemon.clock.advance(11)
    assert service.get().phase.value == "paused_system"
    service.cancel()
    wait_phase(service, "finished_failure")


def test_backup_rules(engine, connection, tmp_path):
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src, backup="incremental")
    vm = engine.add_vm("vm1", [disk.id])
    backups = connection.system_service().vms_service().vm_service(
        vm.id).backups_service()
    b = backups.add(types.Backup(disks=[types.Disk(id=disk.id)]))
    assert b.phase == types.BackupPhase.INITIALIZING
    backup_service = backups.backup_service(b.id)
    b = wait_phase(backup_service, "ready")
    checkpoint = b.to_checkpoint_id
    assert checkpoint == vm.checkpoints[0].id
    assert disk.status == "locked" and disk.backup_mode == "full"
    # One backup at a time.
    with pytest.raises(sdk.Error, match="during a backup"):
        backups.add(types.Backup(disks=[types.Disk(id=disk.id)]))
    service, t = start_transfer(connection, disk, "download", backup=b)
    ticket = engine.daemon.api.get(engine.transfers[t.id].ticket_id)
    assert ticket["dirty"] is False
    # Not while a transfer of the backup runs.
    with pytest.raises(sdk.Error, match="in progress"):
        backup_service.finalize()
    service.finalize()
    wait_phase(service, "finished_success")
    backup_service.finalize()
    wait_phase(backup_service, "succeeded")
    assert disk.status == "ok" and disk.backup_mode is None

    # Incremental: qemu-nbd exports the checkpoint's bitmap, the ticket
    # is dirty.
    b = backups.add(types.Backup(disks=[types.Disk(id=disk.id)],
                                 from_checkpoint_id=checkpoint))
    b = wait_phase(backups.backup_service(b.id), "ready")
    assert disk.backup_mode == "incremental"
    service, t = start_transfer(connection, disk, "download", backup=b)
    assert f"--bitmap={checkpoint}" in nbd_args(engine, t.id)
    ticket = engine.daemon.api.get(engine.transfers[t.id].ticket_id)
    assert ticket["dirty"] is True
    service.finalize()
    wait_phase(service, "finished_success")
    backups.backup_service(b.id).finalize()
    wait_phase(backups.backup_service(b.id), "succeeded")

    # Checkpoints: the oldest goes first, with its bitmap; DELETE is 200.
    checkpoints = connection.system_service().vms_service().vm_service(
        vm.id).checkpoints_service()
    assert [c.id for c in checkpoints.list()] == \
        [checkpoint, b.to_checkpoint_id]
    checkpoints.checkpoint_service(checkpoint).remove()
    with pytest.raises(sdk.NotFoundError):
        checkpoints.checkpoint_service(checkpoint).get()
    bitmaps = image_info(disk.path)["format-specific"]["data"]["bitmaps"]
    assert [x["name"] for x in bitmaps] == [b.to_checkpoint_id]


def test_failed_backup_has_event(engine, connection, tmp_path):
    from ovirtsdk4 import types
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src, backup="incremental")
    vm = engine.add_vm("vm1", [disk.id])
    os.unlink(disk.path)  # qemu-img bitmap --add fails
    backups = connection.system_service().vms_service().vm_service(
        vm.id).backups_service()
    b = backups.add(types.Backup(disks=[types.Disk(id=disk.id)]))
    wait_phase(backups.backup_service(b.id), "failed")
    events = connection.system_service().events_service().list(
        search=b.id)
    assert events and "failed" in events[0].description
    assert disk.status == "ok"


def test_main(tmp_path, make_daemon, pki):
    import ovirtsdk4 as sdk
    daemon = make_daemon()
    proc = subprocess.Popen(
        [sys.executable, enginesim.__file__, "--store", tmp_path / "store",
         "--control-socket", daemon.control.server.address(),
         "--daemon-port", str(daemon.remote.server.address()[1]),
         "--pki", os.path.dirname(pki["cert_file"])],
        stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("engine_url = https://127.0.0.1:")
        conn = sdk.Connection(url=line.split()[-1] + enginesim.API,
                              username="admin@internal",
                              password="password", ca_file=pki["ca_file"])
        try:
            sds = conn.system_service().storage_domains_service().list()
            assert sorted((sd.name, sd.storage.type.value) for sd in sds) \
                == [("fcp", "fcp"), ("iscsi", "iscsi"), ("nfs", "nfs")]
        finally:
            conn.close()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
        proc.stdout.close()


# VM snapshots, disk attachments and disk snapshots (doc/engine-api.md),
# through the SDK.


def test_vm_snapshot_adds_layer(engine, connection, tmp_path):
    from ovirtsdk4 import types
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk = engine.add_disk_from_image(src)
    other = engine.add_disk_from_image(src)
    vm = engine.add_vm("vm1", [])
    vm_service = connection.system_service().vms_service().vm_service(vm.id)
    vm_service.disk_attachments_service().add(types.DiskAttachment(
        disk=types.Disk(id=disk.id), active=True, bootable=False,
        interface=types.DiskInterface.VIRTIO_SCSI))
    vm_service.disk_attachments_service().add(types.DiskAttachment(
        disk=types.Disk(id=other.id), active=True,
        interface=types.DiskInterface.VIRTIO_SCSI))
    assert [a.disk.id for a in vm_service.disk_attachments_service().list()] \
        == [disk.id, other.id]
    base = disk.volumes[0]
    # add_vm_snapshot.py, for one of the two disks, with the new layer's
    # id chosen (a restore keeps the ids of a backup's layers).
    new_id = str(uuid.uuid4())
    snapshots = vm_service.snapshots_service()
    snap = snapshots.add(types.Snapshot(
        description="My snapshot", persist_memorystate=False,
        disk_attachments=[types.DiskAttachment(disk=types.Disk(
            id=disk.id, image_id=new_id))]))
    assert snap.snapshot_status == types.SnapshotStatus.LOCKED
    assert disk.status == "locked"
    service = snapshots.snapshot_service(snap.id)
    testutil.wait_for(
        lambda: service.get().snapshot_status == types.SnapshotStatus.OK,
        message="snapshot ok")
    assert [(s.description, s.snapshot_type.value)
            for s in snapshots.list()] == \
        [("Active VM", "active"), ("My snapshot", "regular")]
    assert [v.id for v in disk.volumes] == [base.id, new_id]
    assert len(other.volumes) == 1
    assert disk.status == "ok"
    top = image_info(disk.path)
    assert (top["format"], top["backing-filename"]) == \
        ("qcow2", os.path.basename(base.path))
    compare(disk.path, src)
    # The snapshot holds the disk's old layer.
    held, = service.disks_service().list()
    assert (held.id, held.image_id) == (disk.id, base.id)

    # list_disk_snapshots.py's request; without include_active, only the
    # snapshots' layers.
    disk_snapshots = connection.system_service().disks_service() \
        .disk_service(disk.id).disk_snapshots_service()
    layers = disk_snapshots.list(include_active=True, include_template=True)
    assert [(x.id, x.parent and x.parent.id, x.snapshot.id, x.disk.id)
            for x in layers] == [
        (base.id, None, snap.id, disk.id),
        (new_id, base.id, vm.active_snapshot.id, disk.id)]
    assert [x.id for x in disk_snapshots.list()] == [base.id]
    # download_disk_snapshot.py's: the storage domain's, by id.
    sd = connection.system_service().storage_domains_service().list(
        search="name=nfs")
    assert [x.name for x in sd] == ["nfs"]
    sd_snapshots = connection.system_service().storage_domains_service() \
        .storage_domain_service(sd[0].id).disk_snapshots_service()
    assert sd_snapshots.snapshot_service(base.id).get().disk.id == disk.id
    assert {x.id for x in sd_snapshots.list(include_active=True)} == \
        {base.id, new_id, other.image_id}
    import ovirtsdk4 as sdk
    with pytest.raises(sdk.NotFoundError):
        sd_snapshots.snapshot_service(str(uuid.uuid4())).get()


def test_snapshot_transfer(engine, connection, tmp_path):
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk, vm = snapshot_chain(engine, src)
    middle = disk.volumes[1]
    transfers = connection.system_service().image_transfers_service()

    def start(shallow, direction="download"):
        t = transfers.add(types.ImageTransfer(
            snapshot=types.DiskSnapshot(id=middle.id), shallow=shallow,
            direction=types.ImageTransferDirection(direction),
            format=types.DiskFormat.RAW))
        service = transfers.image_transfer_service(t.id)
        return service, wait_phase(service, "transferring")

    for shallow in (True, False):
        service, t = start(shallow)
        image = json.loads(nbd_args(engine, t.id)[-1][len("json:"):])
        assert image["file"]["filename"] == middle.path
        assert ("backing" in image) is shallow
        assert "--read-only" in nbd_args(engine, t.id)
        service.finalize()
        wait_phase(service, "finished_success")
    with pytest.raises(sdk.Error, match="can only be downloaded"):
        start(False, "upload")
    assert disk.status == "ok"


def test_attachment_rules(engine, connection, tmp_path):
    import ovirtsdk4 as sdk
    from ovirtsdk4 import types
    src = make_image(tmp_path / "src.qcow2", "qcow2")
    disk, vm = snapshot_chain(engine, src)
    vm2 = engine.add_vm("vm2", [])
    attachments = connection.system_service().vms_service().vm_service(
        vm2.id).disk_attachments_service()
    with pytest.raises(sdk.Error, match="already attached"):
        attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id)))
    vm.disks.remove(disk)
    with pytest.raises(sdk.Error, match="has snapshots"):
        attachments.add(types.DiskAttachment(disk=types.Disk(id=disk.id)))
    assert vm2.disks == []


def test_failed_vm_snapshot(engine, connection, tmp_path):
    from ovirtsdk4 import types
    disk = engine.add_disk_from_image(make_image(tmp_path / "s", "qcow2"))
    vm = engine.add_vm("vm1", [disk.id])
    engine.inject("create_snapshot")
    snapshots = connection.system_service().vms_service().vm_service(
        vm.id).snapshots_service()
    snap = snapshots.add(types.Snapshot(description="x"))
    # The engine removes a snapshot it could not make, with an event.
    testutil.wait_for(lambda: len(snapshots.list()) == 1,
                      message="snapshot removed")
    events = connection.system_service().events_service().list(
        search=snap.id)
    assert events and "Failed" in events[0].description
    assert len(disk.volumes) == 1 and disk.status == "ok"
