"""qemu-img wrappers (client/qemu_img.py)."""

import os

import pytest

from ovirt_imageio.client import qemu_img

MiB = 1024**2


def test_create_info_measure(tmp_path):
    path = str(tmp_path / "disk.qcow2")
    qemu_img.create(path, "qcow2", size=MiB)
    info = qemu_img.info(path)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == MiB
    measure = qemu_img.measure(path, "raw")
    assert measure["required"] == MiB


def test_create_with_backing(tmp_path):
    base = str(tmp_path / "base.qcow2")
    qemu_img.create(base, "qcow2", size=MiB)
    top = str(tmp_path / "top.qcow2")
    qemu_img.create(top, "qcow2", backing_file="base.qcow2",
                    backing_format="qcow2")
    info = qemu_img.info(top)
    assert info["backing-filename"] == "base.qcow2"
    assert info["virtual-size"] == MiB


def test_colon_in_name(tmp_path, monkeypatch):
    # Never taken for a protocol.
    monkeypatch.chdir(tmp_path)
    qemu_img.create("nbd:disk", "raw", size=MiB)
    assert os.path.getsize(tmp_path / "nbd:disk") == MiB
    assert qemu_img.info("nbd:disk")["format"] == "raw"


def test_error(tmp_path):
    path = str(tmp_path / "missing")
    with pytest.raises(qemu_img.Error) as e:
        qemu_img.info(path)
    assert e.value.op == "info"
    assert e.value.returncode == 1
    assert str(e.value).startswith(f"qemu-img info {path} failed with exit "
                                   f"code 1: qemu-img:")


def test_hung_qemu_img_is_killed(tmp_path, monkeypatch):
    # A qemu-img stuck on a dead mount: killed at the deadline, and the
    # error says so.
    hung = tmp_path / "qemu-img"
    hung.write_text("#!/bin/sh\nexec sleep 600\n")
    hung.chmod(0o755)
    monkeypatch.setattr(qemu_img, "QEMU_IMG", str(hung))
    monkeypatch.setattr(qemu_img, "TIMEOUT", 0.2)
    with pytest.raises(qemu_img.Error) as e:
        qemu_img.info(str(tmp_path / "disk.qcow2"))
    assert "no answer within 0.2 seconds" in str(e.value)


def test_measure_size():
    small = qemu_img.measure_size(1024**2, "qcow2")
    large = qemu_img.measure_size(1024**3, "qcow2")
    # Fully allocated: the data and the metadata.
    assert 1024**2 < small["fully-allocated"] < large["fully-allocated"]
    assert large["fully-allocated"] > 1024**3
