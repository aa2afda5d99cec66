"""Local images through a private qemu-nbd (client/local.py)."""

import io
import os
import tarfile

import pytest

from ovirt_imageio.client import local
from ovirt_imageio.client import qemu_img
from ovirt_imageio.nbd import qemu_nbd

MiB = 1024**2


def read(export, offset, length):
    with export.connect() as c:
        buf = bytearray(length)
        c.read_into(buf, offset)
        return bytes(buf)


def test_open_raw(make_image):
    path = make_image(size=MiB, commands=["write -P 0x61 0 4k"])
    with local.open(path, "raw", shared=2) as export:
        assert read(export, 0, 4) == b"aaaa"
        with export.connect() as c:
            assert c.size == MiB
            assert c.read_only
        tmp = os.path.dirname(export.server.socket)
        assert export.server.alive
    assert not export.server.alive
    assert not os.path.exists(tmp)


def test_open_writable(make_image):
    path = make_image(fmt="qcow2", size=MiB)
    with local.open(path, "qcow2", read_only=False) as export:
        with export.connect() as c:
            c.write(b"hello", 100)
            c.flush()
    assert qemu_img.info(path)["format"] == "qcow2"
    with local.open(path, "qcow2") as export:
        assert read(export, 100, 5) == b"hello"


def test_open_lazily(make_image):
    path = make_image(size=MiB, commands=["write -P 0x61 0 4k"])
    running = len(qemu_nbd.running())
    with local.open_lazily(path, "raw", shared=2) as export:
        assert not export.started
        assert len(qemu_nbd.running()) == running
        assert read(export, 0, 4) == b"aaaa"
        assert export.started
        assert len(qemu_nbd.running()) == running + 1
        # One qemu-nbd serves every connection.
        assert read(export, 1, 3) == b"aaa"
        assert len(qemu_nbd.running()) == running + 1
    assert len(qemu_nbd.running()) == running
    with pytest.raises(ValueError):
        export.connect()
    export.close()


def test_open_lazily_never_connected(tmp_path):
    # Nothing is checked or started before connect(): not even that the
    # file exists.
    running = len(qemu_nbd.running())
    with local.open_lazily(str(tmp_path / "missing"), "raw") as export:
        pass
    assert not export.started
    assert len(qemu_nbd.running()) == running


def test_open_failure_cleans_up(tmp_path, monkeypatch):
    import tempfile
    path = str(tmp_path / "not-qcow2")
    with open(path, "wb") as f:
        f.write(b"x" * 4096)
    # A private temporary directory: the machine's /tmp changes under
    # other processes (other test runs) while this test looks at it.
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    running = len(qemu_nbd.running())
    with pytest.raises(Exception):
        local.open(path, "qcow2")
    assert len(qemu_nbd.running()) == running
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_open_tar_member(make_image, tmp_path, fmt):
    disk = make_image(fmt=fmt, size=2 * MiB, commands=[
        "write -P 0x62 1M 64k"])
    ova = str(tmp_path / "vm.ova")
    with tarfile.open(ova, "w") as tar:
        info = tarfile.TarInfo("vm.ovf")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"ovf"))
        tar.add(disk, "disk")
    with tarfile.open(ova) as tar:
        member = tar.getmember("disk")
    with local.open(ova, fmt, offset=member.offset_data,
                    size=member.size) as export:
        with export.connect() as c:
            assert c.size == 2 * MiB
            assert c.read_only
        assert read(export, MiB, 4) == b"bbbb"
        assert read(export, 0, 4) == bytes(4)


def test_open_tar_member_writable():
    with pytest.raises(ValueError):
        local.open("vm.ova", "raw", read_only=False, offset=512, size=512)


def test_open_without_backing_chain(make_image, qemu_io, tmp_path):
    base = make_image(name="base", fmt="qcow2", size=MiB, commands=[
        "write -P 1 0 1M"])
    top = str(tmp_path / "top.qcow2")
    qemu_img.create(top, "qcow2", backing_file=base, backing_format="qcow2")
    qemu_io(top, "qcow2", "write -P 2 0 64k")
    with local.open(top, "qcow2") as export:
        assert read(export, 64 * 1024, 1) == b"\x01"
    with local.open(top, "qcow2", backing_chain=False) as export:
        assert read(export, 0, 1) == b"\x02"
        assert read(export, 64 * 1024, 1) == b"\0"
        with export.connect() as c:
            found = c.extents()
        assert found[0].start == 0 and not found[0].zero
        assert found[1].zero and found[1].hole


def test_open_bitmap(make_image):
    path = make_image(fmt="qcow2", size=MiB, bitmaps=["b1"],
                      commands=["write -P 1 0 64k"])
    with local.open(path, "qcow2", bitmap="b1") as export:
        with export.connect() as c:
            assert c.dirty_bitmap == "b1"
            assert c.extents("dirty")[0].dirty


def test_json_spec(tmp_path):
    spec = local.json_spec("disk", 512, 1024)
    assert spec.startswith("json:")
    assert '"offset": 512' in spec and '"size": 1024' in spec
    assert os.path.abspath("disk") in spec
