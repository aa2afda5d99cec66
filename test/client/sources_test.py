"""
Safe upload sources (ovirt_imageio/client/sources.py): images made by
qemu-img, checked with qemu-img info, as an upload sees them.
"""

import os
import subprocess
import tarfile

import pytest

from ovirt_imageio import client
from ovirt_imageio.client import sources

from testutil import make_image

MiB = 1 << 20

# What an attacker wants uploaded.
SECRET = "/etc/hostname"


def qemu_img(*args):
    subprocess.run(["qemu-img", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL, timeout=60)


def flat_vmdk(path, extent):
    """A monolithicFlat vmdk descriptor whose extent is named extent."""
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
             path, "1M")
    flat = os.path.basename(path)[:-len(".vmdk")] + "-flat.vmdk"
    with open(path) as f:
        text = f.read()
    assert f'"{flat}"' in text
    with open(path, "w") as f:
        f.write(text.replace(f'"{flat}"', f'"{extent}"'))
    return str(path)


def refused(path, **kw):
    with pytest.raises(client.UnsafeImage) as e:
        client.check_source(str(path), **kw)
    return e.value


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vdi", "vhdx"])
def test_self_contained_images_pass(tmp_path, fmt):
    path = make_image(tmp_path / f"disk.{fmt}", fmt)
    client.check_source(path)


def test_vmdk_flat_extent_in_folder_passes(tmp_path):
    qemu_img("create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
             tmp_path / "disk.vmdk", "1M")
    client.check_source(str(tmp_path / "disk.vmdk"))


def test_qcow2_backing_file(tmp_path):
    base = make_image(tmp_path / "base.qcow2", "qcow2")
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    e = refused(top)
    assert e.references == [f"backing file {base!r}"]
    assert str(e) == (
        f"Image {top} refers to other files, which would be uploaded as "
        f"part of it: backing file {base!r}")


@pytest.mark.parametrize("backing", [
    SECRET, "nbd://attacker.example.com/export",
    'json:{"driver": "file", "filename": "/etc/hostname"}'])
def test_qcow2_backing_anything(tmp_path, backing):
    top = tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw",
             top, "1M")
    assert refused(top).references == [f"backing file {backing!r}"]


def test_qcow2_external_data_file(tmp_path):
    path = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={SECRET}",
             "-o", "data_file_raw=on", path, "1M")
    assert refused(path).references == [f"external data file {SECRET!r}"]


def test_guest_written_qcow2_header_in_raw_disk(tmp_path):
    # A guest wrote a qcow2 header backed by a host file at the start of
    # its raw disk; downloaded and uploaded again, qemu probes a qcow2.
    header = tmp_path / "header.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", SECRET, "-F", "raw",
             header, "4M")
    disk = tmp_path / "downloaded.raw"
    with open(disk, "wb") as f:
        f.write(header.read_bytes())
        f.truncate(4 * MiB)
    assert refused(disk).references == [f"backing file {SECRET!r}"]


def test_vmdk_extent_absolute_outside(tmp_path):
    path = flat_vmdk(tmp_path / "disk.vmdk", SECRET)
    e = refused(path)
    assert e.references == [
        f"vmdk extent {SECRET!r} outside {os.path.realpath(tmp_path)}",
        f"vmdk extent {SECRET!r} (an absolute path)"]


def test_vmdk_extent_absolute_inside_folder(tmp_path):
    # Harmless today, but the descriptor names a place, not its part:
    # moved elsewhere, it would read whatever is there.
    qemu_img("create", "-q", "-f", "raw", tmp_path / "data.raw", "1M")
    inside = str(tmp_path / "data.raw")
    path = flat_vmdk(tmp_path / "disk.vmdk", inside)
    assert refused(path).references == [
        f"vmdk extent {inside!r} (an absolute path)"]


def test_vmdk_extent_parent_folder(tmp_path):
    qemu_img("create", "-q", "-f", "raw", tmp_path / "data.raw", "1M")
    os.mkdir(tmp_path / "ova")
    path = flat_vmdk(tmp_path / "ova" / "disk.vmdk", "../data.raw")
    e = refused(path)
    assert len(e.references) == 1
    assert e.references[0].startswith("vmdk extent ")
    assert "../data.raw" in e.references[0]


def test_vmdk_extent_symlink_out_of_folder(tmp_path):
    os.mkdir(tmp_path / "vm")
    os.symlink(SECRET, tmp_path / "vm" / "data.raw")
    path = flat_vmdk(tmp_path / "vm" / "disk.vmdk", "data.raw")
    e = refused(path)
    assert len(e.references) == 1
    assert "outside" in e.references[0]


def test_ova_member_with_backing(tmp_path):
    member = tmp_path / "disk.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-b", SECRET, "-F", "raw",
             member, "1M")
    # qemu reads a tar member in whole sectors.
    os.truncate(member, 256 * 1024)
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(member, arcname="disk.qcow2")
    e = refused(ova, member="disk.qcow2")
    assert e.filename == f"{ova} member disk.qcow2"
    assert e.references == [f"backing file {SECRET!r}"]


def test_ova_member_self_contained(tmp_path):
    member = make_image(tmp_path / "disk.vmdk", "vmdk")
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(member, arcname="disk.vmdk")
    client.check_source(str(ova), member="disk.vmdk")


def test_check_runs_qemu_img_info(tmp_path):
    path = make_image(tmp_path / "disk.qcow2", "qcow2")
    info = sources.check(path)
    assert info["format"] == "qcow2"
    with pytest.raises(ValueError):
        sources.check(path, member="disk")


def test_ova_member_vmdk_descriptor_extent(tmp_path):
    member = flat_vmdk(tmp_path / "disk.vmdk", SECRET)
    os.truncate(member, 1024)
    ova = tmp_path / "vm.ova"
    with tarfile.open(ova, "w") as tar:
        tar.add(member, arcname="disk.vmdk")
    e = refused(ova, member="disk.vmdk")
    assert e.references == [f"vmdk extent {SECRET!r}"]
