"""
ovirt-img's engine glue (client/_ovirt.py): polling, this host's vdsm id,
error messages from real SDK errors, and a few Engine calls against the
engine simulator (the flows are in tool_test.py).
"""

import logging
import os
import uuid

import pytest

import enginesim
from ovirt_imageio.client import _ovirt

ovirtsdk4 = pytest.importorskip("ovirtsdk4")
import ovirtsdk4.types as types  # noqa: E402


class FakeTime:
    """now() and sleep() of a clock that moves only when slept on."""

    def __init__(self):
        self.t = 1000.0
        self.sleeps = []

    def now(self):
        return self.t

    def sleep(self, seconds):
        self.sleeps.append(seconds)
        self.t += seconds


# Poller.

def test_poller_intervals():
    clock = FakeTime()
    poller = _ovirt.Poller(10, "disk 1 to be created", sleep=clock.sleep,
                           now=clock.now)
    for _ in range(8):
        poller.wait()
    assert clock.sleeps == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]


def test_poller_deadline():
    clock = FakeTime()
    poller = _ovirt.Poller(2, "transfer t1 to start", sleep=clock.sleep,
                           now=clock.now)
    with pytest.raises(_ovirt.Error) as e:
        while True:
            poller.wait()
    assert str(e.value) == ("Timed out after 2 seconds waiting for "
                            "transfer t1 to start")
    # The last sleep ends at the deadline, not past it.
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 0.45])
    assert clock.t == pytest.approx(1002.0)


def test_poller_slow_polls():
    # Time spent polling counts: a poll that takes the whole timeout
    # leaves no time for another.
    clock = FakeTime()
    poller = _ovirt.Poller(5, "disk d1 to be unlocked", sleep=clock.sleep,
                           now=clock.now)
    poller.wait()
    clock.t += 5
    with pytest.raises(_ovirt.Error) as e:
        poller.wait()
    assert "disk d1 to be unlocked" in str(e.value)
    assert clock.sleeps == [0.05]


def test_poller_real_clock():
    poller = _ovirt.Poller(0.2, "nothing")
    with pytest.raises(_ovirt.Error):
        for _ in range(100):
            poller.wait()


# This host's vdsm id.

HW_ID = "4c4c4544-0054-4b10-8030-c2c04f4d3132"


def write(path, text):
    path.write_text(text)
    return str(path)


def test_vdsm_id_missing(tmp_path, caplog):
    assert _ovirt.read_vdsm_id(str(tmp_path / "vdsm.id")) is None
    assert caplog.records == []


@pytest.mark.parametrize("text", [HW_ID, HW_ID + "\n", f"  {HW_ID}\n\n",
                                  HW_ID.upper()])
def test_vdsm_id(tmp_path, text):
    path = write(tmp_path / "vdsm.id", text)
    assert _ovirt.read_vdsm_id(path) == text.strip()


@pytest.mark.parametrize("text", [
    "",
    "\n",
    "two words",
    f'"{HW_ID}"',
    f"{HW_ID}' or hw_id='*",
    "id and status=Up",
    "x" * 200,
    "-leading-dash",
])
def test_vdsm_id_garbage(tmp_path, caplog, text):
    path = write(tmp_path / "vdsm.id", text)
    with caplog.at_level(logging.WARNING, logger="ovirt"):
        assert _ovirt.read_vdsm_id(path) is None
    record, = caplog.records
    assert record.levelno == logging.WARNING
    assert path in record.getMessage()


def test_vdsm_id_binary(tmp_path, caplog):
    path = tmp_path / "vdsm.id"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="ovirt"):
        assert _ovirt.read_vdsm_id(str(path)) is None
    record, = caplog.records
    assert str(path) in record.getMessage()


def test_vdsm_id_directory(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ovirt"):
        assert _ovirt.read_vdsm_id(str(tmp_path)) is None
    assert len(caplog.records) == 1


def test_vdsm_id_environment(tmp_path, monkeypatch):
    path = write(tmp_path / "my.id", HW_ID)
    monkeypatch.setenv(_ovirt.VDSM_ID_ENV, path)
    assert _ovirt.read_vdsm_id() == HW_ID
    monkeypatch.setenv(_ovirt.VDSM_ID_ENV, str(tmp_path / "missing"))
    assert _ovirt.read_vdsm_id() is None


def test_vdsm_id_path_beats_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(_ovirt.VDSM_ID_ENV, str(tmp_path / "missing"))
    assert _ovirt.read_vdsm_id(write(tmp_path / "vdsm.id", HW_ID)) == HW_ID


# Engine search values.

@pytest.mark.parametrize("value,quoted", [
    ("nfs", "nfs"),
    ("nfs-01.example_2", "nfs-01.example_2"),
    ("my domain", '"my domain"'),
    ('a"b', '"a\\"b"'),
    ("a\\b", '"a\\\\b"'),
    ("sd and status=up", '"sd and status=up"'),
    ("name=x", '"name=x"'),
    ("*", '"*"'),
    ("", '""'),
])
def test_search_value(value, quoted):
    assert _ovirt._search_value(value) == quoted


# describe(): one line for an SDK error.

def sdk_error(cls, reason=None, detail=None, code=None):
    """An error as the SDK raises it (service.Service._raise_error)."""
    fault = None
    if reason is not None or detail is not None:
        fault = types.Fault(reason=reason, detail=detail)
    msg = []
    if reason:
        msg.append(f'Fault reason is "{reason}".')
    if detail:
        msg.append(f'Fault detail is "{detail}".')
    if code:
        msg.append(f"HTTP response code is {code}.")
    return cls(" ".join(msg), code=code, fault=fault)


def test_describe_fault():
    e = sdk_error(ovirtsdk4.Error, "Operation Failed",
                  "[Cannot add Virtual Disk. Disk is locked.]", 409)
    assert _ovirt.describe(e) == ("Operation Failed: [Cannot add Virtual "
                                  "Disk. Disk is locked.] (HTTP 409)")


def test_describe_fault_reason_only():
    e = sdk_error(ovirtsdk4.NotFoundError, "Not Found", None, 404)
    assert _ovirt.describe(e) == "Not Found (HTTP 404)"


def test_describe_fault_without_code():
    e = sdk_error(ovirtsdk4.Error, "Operation Failed", "busy")
    assert _ovirt.describe(e) == "Operation Failed: busy"


def test_describe_multiline_detail():
    e = sdk_error(ovirtsdk4.Error, "Operation Failed",
                  "first line\nsecond line", 409)
    assert "\n" not in _ovirt.describe(e)
    assert "first line second line" in _ovirt.describe(e)


def test_describe_empty_fault():
    e = ovirtsdk4.Error("HTTP response code is 500.", code=500,
                        fault=types.Fault())
    assert _ovirt.describe(e) == "HTTP response code is 500."


def test_describe_without_fault():
    e = ovirtsdk4.ConnectionError(
        "Failed to connect to 127.0.0.1 port 1:\n Connection refused")
    assert _ovirt.describe(e) == ("Failed to connect to 127.0.0.1 port 1: "
                                  "Connection refused")


def test_describe_without_message():
    assert _ovirt.describe(ovirtsdk4.AuthError("")) == "AuthError"


# Engine against the engine simulator (no daemon: no transfers here).

@pytest.fixture
def engine_sim(tmp_path, pki):
    eng = enginesim.Engine(tmp_path / "store", str(tmp_path / "no.sock"), 0,
                           pki, delay=0.05)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture
def engine(engine_sim, pki):
    with _ovirt.Engine(engine_sim.url, "admin@internal", "password",
                       cafile=pki["ca_file"]) as eng:
        yield eng


def test_storage_domain(engine):
    sd = engine.storage_domain("iscsi")
    assert sd.name == "iscsi"
    assert engine.is_block(sd)
    assert not engine.is_block(engine.storage_domain("nfs"))


def test_storage_domain_unknown(engine):
    with pytest.raises(_ovirt.Error) as e:
        engine.storage_domain("nosuchsd")
    assert str(e.value) == ("No storage domain named 'nosuchsd' (there are: "
                            "fcp, iscsi, nfs)")


def test_get_disk_not_found(engine):
    disk_id = str(uuid.uuid4())
    with pytest.raises(_ovirt.Error) as e:
        engine.get_disk(disk_id)
    msg = str(e.value)
    assert msg.startswith(f"Cannot get disk {disk_id}: Not Found")
    assert "(HTTP 404)" in msg
    assert "\n" not in msg


def test_wrong_password(engine_sim, pki):
    # Engine() logs in first: a login failure says so.
    with pytest.raises(_ovirt.Error) as e:
        _ovirt.Engine(engine_sim.url, "admin@internal", "wrong",
                      cafile=pki["ca_file"])
    msg = str(e.value)
    assert msg.startswith(
        f"Cannot log in to {engine_sim.url} as admin@internal: ")
    assert "invalid username or password" in msg
    assert "wrong" not in msg


def test_missing_cafile(engine_sim, tmp_path):
    cafile = str(tmp_path / "no-ca.pem")
    with pytest.raises(_ovirt.Error) as e:
        _ovirt.Engine(engine_sim.url, "admin@internal", "password",
                      cafile=cafile)
    assert str(e.value) == f"CA file {cafile} does not exist"


def test_this_host(engine, engine_sim, tmp_path):
    known = write(tmp_path / "known.id", engine_sim.host.hw_id)
    host = engine.this_host("nfs", vdsm_id=known)
    assert host.name == engine_sim.host.name
    unknown = write(tmp_path / "unknown.id", str(uuid.uuid4()))
    assert engine.this_host("nfs", vdsm_id=unknown) is None
    assert engine.this_host("nfs", vdsm_id=str(tmp_path / "none")) is None


def add_disk(engine, disk_id):
    return engine.add_disk(
        storage_domain="nfs", id=disk_id, name="new", description="",
        format=types.DiskFormat.COW, provisioned_size=1024**2, sparse=True,
        content_type=types.DiskContentType.DATA,
        backup=types.DiskBackup.INCREMENTAL)


def test_wait_for_disk(engine, engine_sim):
    disk = add_disk(engine, str(uuid.uuid4()))
    assert disk.status == types.DiskStatus.LOCKED
    disk = engine.wait_for_disk(disk.id, 30)
    assert disk.status == types.DiskStatus.OK
    assert os.path.isfile(engine_sim.disks[disk.id].path)


def test_wait_for_disk_illegal(engine, engine_sim):
    # Where the volume would be created, a directory: vdsm fails to
    # create the volume, the engine marks the disk illegal.
    disk_id = str(uuid.uuid4())
    os.makedirs(os.path.join(engine_sim.store_dir, f"{disk_id}.img"))
    add_disk(engine, disk_id)
    with pytest.raises(_ovirt.Error) as e:
        engine.wait_for_disk(disk_id, 30)
    assert str(e.value) == f"Disk {disk_id} became ILLEGAL"


def test_wait_for_disk_removed(engine, engine_sim):
    disk_id = str(uuid.uuid4())
    with pytest.raises(_ovirt.Error) as e:
        engine.wait_for_disk(disk_id, 30)
    assert str(e.value) == f"Disk {disk_id} was removed while it was created"


def test_remove_disk(engine, engine_sim):
    disk = add_disk(engine, str(uuid.uuid4()))
    # Still locked: remove_disk() waits for the engine to unlock it.
    engine.remove_disk(disk.id)
    assert engine_sim.disks[disk.id].removed
    # Removing it again is not an error (cleanup after a failure).
    engine.remove_disk(disk.id)


def disk_snapshot(ident, parent=None):
    return types.DiskSnapshot(
        id=ident, parent=types.DiskSnapshot(id=parent) if parent else None)


def test_chain_orders_layers():
    a, b, c = (str(uuid.uuid4()) for _ in range(3))
    layers = [disk_snapshot(c, b), disk_snapshot(a), disk_snapshot(b, a)]
    assert [x.id for x in _ovirt.chain("d", layers)] == [a, b, c]


@pytest.mark.parametrize("bad", ["../../etc/cron.d/x", "a/b", "", None])
def test_chain_refuses_ids_that_are_not_uuids(bad):
    # Layer ids name local files (download-snapshot).
    base = str(uuid.uuid4())
    layers = [disk_snapshot(base), disk_snapshot(bad, base)]
    with pytest.raises(_ovirt.Error, match="invalid id"):
        _ovirt.chain("d", layers)
