"""
The public client API (ovirt_imageio.client) against our daemon: uploads
of every format, downloads, incremental backup, verification, sparse
images, failures and cleanup.
"""

import contextlib
import errno
import filecmp
import io
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import testutil

from ovirt_imageio import client
from ovirt_imageio import errors
from ovirt_imageio.nbd import qemu_nbd as qemu_nbd_module

MiB = 1024**2
GiB = 1024**3
TiB = 1024**4
SIZE = 8 * MiB

# Data, zeros and holes, with extents of several sizes and a data extent
# larger than the buffer used below.
COMMANDS = [
    "write -P 0x41 0 1M", "write -P 0x42 1100k 4k", "write -z 2M 1M",
    "write -P 0x43 4M 3M", "write -P 0x44 8188k 4k"]

# Small buffers: many pieces per request.
BUFFER_SIZE = 256 * 1024


@pytest.fixture
def daemon(client_daemon):
    return client_daemon


def add_ticket(daemon, url, ops=("write",), size=SIZE, uuid="api-secret",
               **kw):
    t = {"uuid": uuid, "size": size, "ops": list(ops), "timeout": 300,
         "url": url, "transfer_id": f"tr-{uuid}"}
    t.update(kw)
    resp, data = daemon.api.put(t)
    assert resp.status == 200, data
    return t


def https_url(daemon, ticket_id="api-secret"):
    port = daemon.remote.server.address()[1]
    return f"https://localhost:{port}/images/{ticket_id}"


def compare(a, b, fmt_a, fmt_b):
    # -U: a target may still be exported by its qemu-nbd (raw only; stop
    # qemu-nbd before comparing a qcow2 target, whose metadata it caches).
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F",
                        fmt_b, a, b], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True,
                          capture_output=True, text=True).stdout


def convert(src, dst, src_fmt, dst_fmt, *options):
    qemu_img("convert", "-f", src_fmt, "-O", dst_fmt, *options, src, dst)


def new_disk(make_image, qemu_nbd, fmt="raw", size=SIZE, name="dst"):
    """An empty target disk exported by qemu-nbd, as vdsm does."""
    path = make_image(name=name, fmt=fmt, size=size)
    return path, qemu_nbd(path, fmt=fmt, shared=8)


@pytest.fixture
def raw_source(make_image):
    return make_image(name="src", size=SIZE, commands=COMMANDS)


@pytest.fixture
def qcow2_source(make_image):
    return make_image(name="src", fmt="qcow2", size=SIZE, commands=COMMANDS)


def data_length(path):
    """Bytes of data extents in an image (guest view)."""
    return sum(e.length for e in client.extents(path) if e.data)


class Progress:
    def __init__(self):
        self.size = None
        self.updates = []
        self.lock = threading.Lock()

    def update(self, n):
        with self.lock:
            self.updates.append(n)

    @property
    def done(self):
        return sum(self.updates)


# Upload

@pytest.mark.parametrize("fmt,options", [
    ("raw", ()),
    ("qcow2", ()),
    ("qcow2", ("-c",)),
    ("vmdk", ()),
    ("vhdx", ()),
    ("vdi", ()),
], ids=["raw", "qcow2", "qcow2-compressed", "vmdk", "vhdx", "vdi"])
def test_upload_formats(daemon, pki, make_image, qemu_nbd, raw_source,
                        tmp_path, fmt, options):
    src = str(tmp_path / f"image.{fmt}")
    convert(raw_source, src, "raw", fmt, *options)
    assert client.info(src)["format"] == fmt
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    progress = Progress()
    client.upload(src, https_url(daemon), pki["ca_file"],
                  buffer_size=BUFFER_SIZE, progress=progress, verify=True)
    compare(raw_source, dst, "raw", "raw")
    assert progress.size == SIZE
    assert progress.done == SIZE


def test_upload_iso(daemon, pki, make_image, qemu_nbd, tmp_path):
    # An ISO 9660 image: qemu probes it as raw. A primary volume
    # descriptor at 32 KiB, the rest data.
    iso = str(tmp_path / "disk.iso")
    data = bytearray(os.urandom(2 * MiB))
    data[32768:32768 + 6] = b"\x01CD001"
    with open(iso, "wb") as f:
        f.write(data)
    assert client.info(iso)["format"] == "raw"
    dst, srv = new_disk(make_image, qemu_nbd, size=len(data))
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=len(data))
    client.upload(iso, https_url(daemon), pki["ca_file"], verify=True)
    compare(iso, dst, "raw", "raw")


def test_upload_qcow2_target(daemon, pki, make_image, qemu_nbd,
                             qcow2_source):
    dst, srv = new_disk(make_image, qemu_nbd, fmt="qcow2")
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    client.upload(qcow2_source, https_url(daemon), pki["ca_file"],
                  buffer_size=BUFFER_SIZE)
    srv.stop()
    compare(qcow2_source, dst, "qcow2", "qcow2")
    # Nothing was written for zeros and holes: the target's allocation
    # is the source's data.
    allocated = [e for e in json.loads(qemu_img(
        "map", "--output=json", "-U", dst)) if e["data"]]
    assert sum(e["length"] for e in allocated) <= 5 * MiB
    # Only data went over the wire (qcow2 data extents are whole clusters).
    ticket = daemon.api.get("api-secret")
    assert ticket["transferred"] == data_length(qcow2_source)


def test_upload_zeroes_old_data(daemon, pki, make_image, qemu_nbd,
                                qcow2_source):
    # The target is not empty: zero extents of the source must be zeroed.
    dst = make_image(name="dst", size=SIZE, commands=["write -P 0xff 0 8M"])
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    client.upload(qcow2_source, https_url(daemon), pki["ca_file"],
                  buffer_size=BUFFER_SIZE, verify=True)
    compare(qcow2_source, dst, "qcow2", "raw")


def test_upload_file_ticket(daemon, pki, tmp_path, raw_source):
    # A file:// ticket: the daemon exports the file itself; its extents
    # say nothing about zeros, so zeros are sent as PATCH zero.
    dst = str(tmp_path / "dst.raw")
    with open(dst, "wb") as f:
        f.write(b"\xff" * SIZE)
    add_ticket(daemon, f"file://{dst}")
    client.upload(raw_source, https_url(daemon), pki["ca_file"],
                  max_workers=2)
    compare(raw_source, dst, "raw", "raw")


def test_upload_disk_is_zero(daemon, pki, make_image, qemu_nbd, raw_source):
    dst = make_image(name="dst", size=SIZE, commands=["write -P 0xff 2M 1M"])
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    # The caller says the disk is zero (it is not): zeros are skipped.
    client.upload(raw_source, https_url(daemon), pki["ca_file"],
                  disk_is_zero=True)
    with open(dst, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(MiB) == b"\xff" * MiB


def test_upload_member(daemon, pki, make_image, qemu_nbd, qcow2_source,
                       raw_source, tmp_path):
    ova = str(tmp_path / "vm.ova")
    with tarfile.open(ova, "w") as tar:
        ovf = tarfile.TarInfo("vm.ovf")
        data = b"<Envelope/>\n"
        ovf.size = len(data)
        tar.addfile(ovf, io.BytesIO(data))
        tar.add(qcow2_source, "disk1.qcow2")
        tar.add(raw_source, "disk2.raw")
    info = client.info(ova, member="disk1.qcow2")
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    assert info["member-size"] == os.path.getsize(qcow2_source)
    assert client.measure(ova, "qcow2", member="disk1.qcow2")["required"]
    assert (client.checksum(ova, member="disk1.qcow2")
            == client.checksum(qcow2_source))
    # A tar member's bytes are all data to qemu.
    assert list(client.extents(ova, member="disk2.raw")) == [
        client.ZeroExtent(0, SIZE, False, False)]

    for member in ("disk1.qcow2", "disk2.raw"):
        dst, srv = new_disk(make_image, qemu_nbd, name=member)
        add_ticket(daemon, f"nbd:unix:{srv.socket}", uuid=member)
        client.upload(ova, https_url(daemon, member), pki["ca_file"],
                      member=member, verify=True)
        compare(raw_source, dst, "raw", "raw")


def test_upload_without_backing_chain(daemon, pki, make_image, qemu_nbd,
                                      tmp_path):
    base = make_image(name="base", fmt="qcow2", size=SIZE,
                      commands=["write -P 0x01 0 8M"])
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 1M",
                    "-c", "write -z 3M 1M", top], check=True,
                   capture_output=True)
    # The target: an empty snapshot on a copy of the base.
    dst_base = str(tmp_path / "dst-base.qcow2")
    convert(base, dst_base, "qcow2", "qcow2")
    dst = str(tmp_path / "dst-top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", dst_base, "-F", "qcow2", dst)
    srv = qemu_nbd(dst, fmt="qcow2", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    client.upload(top, https_url(daemon), pki["ca_file"],
                  backing_chain=False)
    srv.stop()
    compare(top, dst, "qcow2", "qcow2")
    # Only the top layer's clusters were written.
    allocated = [e for e in json.loads(qemu_img(
        "map", "--output=json", dst)) if e["depth"] == 0]
    assert sum(e["length"] for e in allocated) == 2 * MiB


def test_upload_safe_refuses_backing_file(daemon, pki, make_image,
                                          qemu_nbd, tmp_path):
    # A qcow2 whose backing file is a host file: by default (upstream's
    # behaviour) the chain is uploaded; safe=True refuses before sending.
    secret = str(tmp_path / "secret")
    with open(secret, "wb") as f:
        f.write(b"root:secret\n".ljust(SIZE, b"\0"))
    top = str(tmp_path / "top.qcow2")
    qemu_img("create", "-f", "qcow2", "-b", secret, "-F", "raw", top)
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    with pytest.raises(client.UnsafeImage) as e:
        client.upload(top, https_url(daemon), pki["ca_file"], safe=True)
    assert e.value.references == [f"backing file {secret!r}"]
    info = daemon.api.get("api-secret")
    assert info["transferred"] == 0
    assert info["connections"] == 0
    client.upload(top, https_url(daemon), pki["ca_file"])
    srv.stop()
    compare(secret, dst, "raw", "raw")


def test_upload_safe_self_contained(daemon, pki, make_image, qemu_nbd,
                                    qcow2_source):
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    client.upload(qcow2_source, https_url(daemon), pki["ca_file"],
                  safe=True, verify=True)
    srv.stop()
    compare(qcow2_source, dst, "qcow2", "raw")


# Download

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download(daemon, pki, qemu_nbd, qcow2_source, tmp_path, fmt):
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    out = str(tmp_path / f"out.{fmt}")
    progress = Progress()
    client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt,
                    buffer_size=BUFFER_SIZE, progress=progress)
    assert client.info(out)["format"] == fmt
    compare(qcow2_source, out, "qcow2", fmt)
    assert progress.size == SIZE
    assert progress.done == SIZE
    # Only data went over the wire.
    testutil.wait_for_ticket(
        daemon.api, "api-secret", transferred=data_length(qcow2_source))
    if fmt == "qcow2":
        allocated = [e for e in json.loads(qemu_img(
            "map", "--output=json", out)) if e["data"]]
        assert sum(e["length"] for e in allocated) <= 5 * MiB


def test_download_file_ticket(daemon, pki, raw_source, tmp_path):
    add_ticket(daemon, f"file://{raw_source}", ops=["read"])
    out = str(tmp_path / "out.raw")
    client.download(https_url(daemon), out, pki["ca_file"], fmt="raw",
                    max_workers=3)
    compare(raw_source, out, "raw", "raw")


def test_download_with_backing_file(daemon, pki, qemu_nbd, make_image,
                                    tmp_path):
    # A layer (its unallocated clusters are holes) downloaded on top of a
    # local backing file: holes show the backing file, zeros hide it.
    layer = make_image(name="layer", fmt="qcow2", size=SIZE, commands=[
        "write -P 1 0 1M", "write -z 2M 1M"])
    srv = qemu_nbd(layer, fmt="qcow2", read_only=True)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    make_image(name="base", fmt="qcow2", size=SIZE, commands=[
        "write -P 9 0 8M"])
    out = str(tmp_path / "out.qcow2")
    client.download(https_url(daemon), out, pki["ca_file"],
                    backing_file="base.qcow2")
    assert json.loads(qemu_img("info", "--output=json", out))[
        "backing-filename"] == "base.qcow2"
    top = [e for e in json.loads(qemu_img("map", "--output=json", out))
           if e["depth"] == 0]
    assert {(e["start"], e["length"], e["zero"]) for e in top} == {
        (0, MiB, False), (2 * MiB, MiB, True)}
    # The chain reads as the layer on top of the base.
    expected = str(tmp_path / "expected.qcow2")
    shutil.copyfile(layer, expected)
    qemu_img("rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", expected)
    compare(expected, out, "qcow2", "qcow2")


def test_download_on_backing_file_without_allocation_depth(
        daemon, pki, qemu_nbd, make_image, tmp_path):
    # A raw volume exported as vdsm does (no qemu:allocation-depth),
    # downloaded on top of a previous backup holding other data: its
    # sparse ranges read as zeros, so they must hide the backing file.
    # They were reported as holes and skipped, and the backing file's
    # data showed through.
    disk = make_image(name="disk", size=SIZE, commands=[
        "write -P 0x41 0 1M", "write -z 2M 1M", "write -P 0x43 4M 1M"])
    srv = qemu_nbd(disk, fmt="raw", read_only=True, shared=8,
                   allocation_depth=False)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    make_image(name="base", fmt="qcow2", size=SIZE, commands=[
        "write -P 9 0 8M"])
    out = str(tmp_path / "out.qcow2")
    client.download(https_url(daemon), out, pki["ca_file"],
                    backing_file="base.qcow2", backing_format="qcow2")
    compare(disk, out, "raw", "qcow2")
    # The zeros are zero clusters, not data.
    top = [e for e in json.loads(qemu_img("map", "--output=json", out))
           if e["depth"] == 0]
    assert sum(e["length"] for e in top if e["data"]) == 2 * MiB


def test_incremental_without_allocation_depth(daemon, pki, qemu_nbd,
                                              make_image, tmp_path):
    # As backup_vm.py does: a full backup, then an incremental one on
    # top of it, from an export without allocation depth.
    disk = make_image(name="disk", fmt="qcow2", size=SIZE, commands=[
        "write -P 0x01 0 8M"])
    qemu_img("bitmap", "--add", disk, "b1")
    srv = qemu_nbd(disk, fmt="qcow2", read_only=True, shared=8,
                   allocation_depth=False)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    full = str(tmp_path / "full.qcow2")
    client.download(https_url(daemon), full, pki["ca_file"])
    srv.stop()
    compare(disk, full, "qcow2", "qcow2")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 64k",
                    "-c", "write -z 5M 1M", "-c", "discard 6M 1M", disk],
                   check=True, capture_output=True)
    srv = qemu_nbd(disk, fmt="qcow2", read_only=True, bitmap="b1",
                   shared=8, allocation_depth=False)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], dirty=True,
               uuid="incr")
    incr = str(tmp_path / "incr.qcow2")
    client.download(https_url(daemon, "incr"), incr, pki["ca_file"],
                    incremental=True, backing_file=full,
                    backing_format="qcow2")
    compare(disk, incr, "qcow2", "qcow2")


def test_incremental(daemon, pki, qemu_nbd, make_image, tmp_path):
    path = make_image(fmt="qcow2", size=SIZE, commands=[
        "write -P 0x01 0 8M"])
    full = str(tmp_path / "full.qcow2")
    convert(path, full, "qcow2", "qcow2")
    qemu_img("bitmap", "--add", path, "b1")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 64k",
                    "-c", "write -z 5M 1M", path], check=True,
                   capture_output=True)
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], dirty=True)
    incr = str(tmp_path / "incr.qcow2")
    client.download(https_url(daemon), incr, pki["ca_file"],
                    incremental=True, backing_file=full,
                    backing_format="qcow2")
    compare(path, incr, "qcow2", "qcow2")
    top = [e for e in json.loads(qemu_img("map", "--output=json", incr))
           if e["depth"] == 0]
    assert {(e["start"], e["length"], e["zero"]) for e in top} == {
        (MiB, 64 * 1024, False), (5 * MiB, MiB, True)}
    # Only the dirty data went over the wire.
    testutil.wait_for_ticket(daemon.api, "api-secret", transferred=64 * 1024)
    # And the chain equals the source, checksums agree.
    client.download(https_url(daemon), incr, pki["ca_file"],
                    incremental=True, backing_file=full, verify=True)


def test_incremental_without_backing(daemon, pki, qemu_nbd, make_image,
                                     tmp_path):
    # As backup_vm.py does: download, then rebase on the previous one.
    path = make_image(fmt="qcow2", size=SIZE, bitmaps=["b1"],
                      commands=["write -P 0x02 1M 64k"])
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], dirty=True)
    incr = str(tmp_path / "incr.qcow2")
    client.download(https_url(daemon), incr, pki["ca_file"],
                    incremental=True)
    compare(path, incr, "qcow2", "qcow2")


def test_incremental_unsupported(daemon, pki, qemu_nbd, qcow2_source,
                                 tmp_path):
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    out = str(tmp_path / "incr.qcow2")
    with pytest.raises(errors.Unsupported) as e:
        client.download(https_url(daemon), out, pki["ca_file"],
                        incremental=True)
    assert str(e.value) == "Ticket does not support dirty extents"
    assert not os.path.exists(out)


def test_download_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        client.download("https://localhost:1/images/x",
                        str(tmp_path / "x"), None, fmt="raw",
                        incremental=True)


# Verification

def test_upload_verify_detects_corruption(daemon, pki, make_image, qemu_nbd,
                                          raw_source):
    # Upload, then change the disk behind the daemon's back before the
    # verification: the checksum must catch it.
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    with pytest.raises(client.ChecksumMismatch) as e:
        client.upload(raw_source, https_url(daemon), pki["ca_file"],
                      verify=True, progress=_Corrupt(dst))
    assert "upload verification failed" in str(e.value)


class _Corrupt:
    """
    A progress object that corrupts the target when done: in a hole of
    the source (3M-4M), which the upload never writes (the new disk reads
    zeros there already). Progress counts bytes sent, and the daemon may
    still be writing the last piece, so corrupting data the upload writes
    could be overwritten by it.
    """

    def __init__(self, path):
        self.path = path
        self.size = None
        self.done = 0

    def update(self, n):
        self.done += n
        if self.done == self.size:
            subprocess.run(["qemu-io", "-f", "raw", "-c",
                            "write -P 0x66 3M 4k", self.path], check=True,
                           capture_output=True)


def test_upload_verify_disk_not_zero(daemon, pki, make_image, qemu_nbd,
                                     raw_source):
    # The caller says the disk is zero, but the ticket is on an image with
    # old data where the source has zeros: verification catches it.
    dst = make_image(name="dst", size=SIZE, commands=[
        "write -P 0x66 2M 64k"])
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    with pytest.raises(client.ChecksumMismatch):
        client.upload(raw_source, https_url(daemon), pki["ca_file"],
                      verify=True, disk_is_zero=True)


def test_download_verify_mismatch_keeps_file(daemon, pki, qemu_nbd,
                                             make_image, tmp_path):
    src = make_image(name="src", size=SIZE, commands=["write -P 1 0 1M"])
    srv = qemu_nbd(src, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    out = str(tmp_path / "out.raw")

    class ChangeSource(Progress):
        def update(self, n):
            super().update(n)
            if self.done == self.size:
                # The source changes after it was downloaded.
                subprocess.run(["qemu-io", "-f", "raw", "-c",
                                "write -P 2 0 4k", src], check=True,
                               capture_output=True)

    with pytest.raises(client.ChecksumMismatch):
        client.download(https_url(daemon), out, pki["ca_file"], fmt="raw",
                        verify=True, progress=ChangeSource())
    assert os.path.exists(out)


# Empty images: nothing to write, so no local qemu-nbd.

@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_empty_starts_no_qemu_nbd(daemon, pki, qemu_nbd,
                                           make_image, tmp_path, monkeypatch,
                                           fmt):
    src = make_image(name="src", fmt="qcow2", size=TiB)
    srv = qemu_nbd(src, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], size=TiB)
    data = make_image(name="data", size=SIZE, commands=["write 0 4k"])
    srv = qemu_nbd(data, fmt="raw", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], uuid="data")
    # The daemon's exports run already; a local one could not start.
    monkeypatch.setattr(qemu_nbd_module, "QEMU_NBD", "/nonexistent/qemu-nbd")
    out = str(tmp_path / f"out.{fmt}")
    progress = Progress()
    client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt,
                    progress=progress)
    info = client.info(out)
    assert (info["format"], info["virtual-size"]) == (fmt, TiB)
    assert os.stat(out).st_blocks * 512 <= MiB
    assert progress.size == progress.done == TiB
    if fmt == "raw":
        # A raw image is written directly (rawfile.py), never through a
        # qemu-nbd.
        client.download(https_url(daemon, "data"), out, pki["ca_file"],
                        fmt=fmt)
        assert filecmp.cmp(out, data, shallow=False)
    else:
        # A download with something to write does need it.
        with pytest.raises(errors.ExportError):
            client.download(https_url(daemon, "data"), out, pki["ca_file"],
                            fmt=fmt)
        assert not os.path.exists(out)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_empty_verify(daemon, pki, qemu_nbd, make_image, tmp_path,
                               fmt):
    # Verification reads the new image: its qemu-nbd starts then.
    src = make_image(name="src", fmt="qcow2", size=SIZE)
    srv = qemu_nbd(src, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    out = str(tmp_path / f"out.{fmt}")
    running = len(qemu_nbd_running())
    client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt,
                    verify=True)
    compare(src, out, "qcow2", fmt)
    assert len(qemu_nbd_running()) == running


# Sparse images: nothing but data on the wire.

def test_sparse_1tib(daemon, pki, make_image, qemu_nbd, tmp_path):
    src = make_image(name="src", fmt="qcow2", size=TiB, commands=[
        "write -P 0x01 0 1M", "write -P 0x02 500G 2M",
        "write -P 0x03 1023G 1M"])
    dst, srv = new_disk(make_image, qemu_nbd, fmt="qcow2", size=TiB)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=TiB)
    start = time.monotonic()
    client.upload(src, https_url(daemon), pki["ca_file"])
    upload_time = time.monotonic() - start
    assert daemon.api.get("api-secret")["transferred"] == 4 * MiB
    srv.stop()
    compare(src, dst, "qcow2", "qcow2")

    srv = qemu_nbd(dst, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], size=TiB,
               uuid="down")
    out = str(tmp_path / "out.qcow2")
    start = time.monotonic()
    client.download(https_url(daemon, "down"), out, pki["ca_file"])
    download_time = time.monotonic() - start
    testutil.wait_for_ticket(daemon.api, "down", transferred=4 * MiB)
    compare(src, out, "qcow2", "qcow2")
    allocated = [e for e in json.loads(qemu_img(
        "map", "--output=json", out)) if e["data"]]
    assert sum(e["length"] for e in allocated) == 4 * MiB
    assert upload_time < 10, upload_time
    assert download_time < 10, download_time


# Preallocated images: data extents that are mostly zeros.

PREALLOCATED_SIZE = 128 * MiB

# 57 MiB of data, as in the 1 GiB disk: 56 MiB in 1 MiB pieces
# every 2 MiB, and 16 pieces of 64 KiB not aligned to 64 KiB (68k written,
# then its first 4k zeroed). The rest are written zeros, reported as data
# (preallocation=full).
PREALLOCATED_DATA = 57 * MiB
PREALLOCATED_COMMANDS = (
    [f"write -P {0x10 + i} {i * 2}M 1M" for i in range(56)]
    + [f"write -P 0x77 {112 + j}M 68k" for j in range(16)]
    + [f"write -z {112 + j}M 4k" for j in range(16)])


def run_qemu_io(path, fmt, *commands):
    cmd = ["qemu-io", "-f", fmt]
    for c in commands:
        cmd += ["-c", c]
    out = subprocess.run(cmd + [path], check=True, capture_output=True,
                         text=True).stdout
    assert "failed" not in out, out


@pytest.fixture(scope="module")
def preallocated(tmp_path_factory):
    """A preallocated (full) raw disk holding 57 MiB of data."""
    path = str(tmp_path_factory.mktemp("preallocated") / "disk.raw")
    qemu_img("create", "-f", "raw", "-o", "preallocation=full", path,
             str(PREALLOCATED_SIZE))
    run_qemu_io(path, "raw", *PREALLOCATED_COMMANDS)
    return path


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("transport", ["unix", "https"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_preallocated(make_daemon, client_daemon, pki, qemu_nbd,
                               preallocated, tmp_path, fmt, transport):
    # Every byte is in a data extent, so every byte is sent; the blocks of
    # zeros received must take no space in the download.
    if transport == "unix":
        daemon = client_daemon
    else:
        daemon = make_daemon(local={"enable": "false"})
    srv = qemu_nbd(preallocated, fmt="raw", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"],
               size=PREALLOCATED_SIZE)
    assert allocated_bytes(preallocated) >= PREALLOCATED_SIZE
    out = str(tmp_path / f"out.{fmt}")
    client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt)
    # Nearly all of it went over the wire.
    testutil.wait_for_ticket(daemon.api, "api-secret",
                             transferred=data_length(preallocated))
    compare(preallocated, out, "raw", fmt)
    # 64 KiB granularity: each unaligned 64 KiB piece takes two blocks.
    assert allocated_bytes(out) <= PREALLOCATED_DATA + 2 * MiB


@pytest.mark.parametrize("incremental", [False, True],
                         ids=["full", "incremental"])
@pytest.mark.parametrize("transport", ["unix", "https"])
def test_download_preallocated_on_backing_file(
        make_daemon, client_daemon, pki, qemu_nbd, preallocated, tmp_path,
        transport, incremental):
    # With a backing file (and for an incremental backup, which
    # backup_vm.py may rebase on the previous one later), the zeros
    # received must be zero clusters: no space, and they hide the backing
    # file's data. Unallocated clusters would show it.
    if transport == "unix":
        daemon = client_daemon
    else:
        daemon = make_daemon(local={"enable": "false"})
    # The same guest data in a qcow2 whose zeros are written clusters;
    # for the incremental backup, all dirty.
    disk = str(tmp_path / "disk.qcow2")
    qemu_img("create", "-f", "qcow2", disk, str(PREALLOCATED_SIZE))
    if incremental:
        qemu_img("bitmap", "--add", disk, "b1")
    qemu_img("convert", "-n", "-S", "0", "-f", "raw", "-O", "qcow2",
             preallocated, disk)
    srv = qemu_nbd(disk, fmt="qcow2", read_only=True, shared=8,
                   bitmap="b1" if incremental else None)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"],
               size=PREALLOCATED_SIZE, dirty=incremental)
    base = str(tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", base, str(PREALLOCATED_SIZE))
    # Data where the disk has zeros.
    run_qemu_io(base, "qcow2", "write -P 9 1M 1M", "write -P 9 51M 1M",
                "write -P 9 127M 1M")
    out = str(tmp_path / "out.qcow2")
    client.download(https_url(daemon), out, pki["ca_file"],
                    incremental=incremental, backing_file=base,
                    backing_format="qcow2")
    compare(preallocated, out, "raw", "qcow2")
    top = json.loads(qemu_img("map", "--output=json", out))
    data = sum(e["length"] for e in top if e["data"] and e["depth"] == 0)
    assert data <= PREALLOCATED_DATA + 2 * MiB
    assert allocated_bytes(out) <= PREALLOCATED_DATA + 4 * MiB


# Transports and fallback

def test_proxy_url_fallback(daemon, pki, qemu_nbd, qcow2_source, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"https://127.0.0.1:{s.getsockname()[1]}/images/api-secret"
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    out = str(tmp_path / "out.qcow2")
    client.download(dead, out, pki["ca_file"], proxy_url=https_url(daemon))
    compare(qcow2_source, out, "qcow2", "qcow2")
    with pytest.raises(ConnectionRefusedError):
        client.download(dead, out, pki["ca_file"])


def test_https_without_unix_socket(make_daemon, pki, qemu_nbd, make_image,
                                   qcow2_source, tmp_path):
    daemon = make_daemon(local={"enable": "false"})
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    client.upload(qcow2_source, https_url(daemon), pki["ca_file"],
                  buffer_size=BUFFER_SIZE, verify=True)
    compare(qcow2_source, dst, "qcow2", "raw")
    out = str(tmp_path / "out.raw")
    client.download(https_url(daemon), out, pki["ca_file"], fmt="raw")
    compare(qcow2_source, out, "qcow2", "raw")


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_raw_files_without_qemu_nbd(make_daemon, client_daemon, pki,
                                    qemu_nbd, make_image, raw_source,
                                    tmp_path, monkeypatch, transport):
    # Raw files are read and written directly (rawfile.py), spliced on
    # the unix socket and through buffers over HTTPS. The source's last
    # 300 bytes are missing: qemu reads the image as SIZE bytes, the tail
    # as zeros, and so must we.
    if transport == "unix":
        daemon = client_daemon
    else:
        daemon = make_daemon(local={"enable": "false"})
    src = raw_source
    data = data_length(src)
    os.truncate(src, SIZE - 300)
    with open(src, "r+b") as f:
        f.seek(SIZE - 400)
        f.write(b"t" * 100)
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    # The daemon's export runs already; a local one could not start.
    monkeypatch.setattr(qemu_nbd_module, "QEMU_NBD", "/nonexistent/qemu-nbd")
    progress = Progress()
    client.upload(src, https_url(daemon), pki["ca_file"],
                  buffer_size=BUFFER_SIZE, progress=progress, verify=True)
    assert progress.done == SIZE
    out = str(tmp_path / "out.raw")
    progress = Progress()
    client.download(https_url(daemon), out, pki["ca_file"], fmt="raw",
                    buffer_size=BUFFER_SIZE, progress=progress, verify=True)
    assert progress.done == SIZE
    with open(src, "rb") as f:
        expected = f.read() + bytes(300)
    with open(out, "rb") as f:
        assert f.read() == expected
    # Holes stay holes: only the source's data was written.
    assert os.stat(out).st_blocks * 512 <= data + MiB


# Failures and cleanup

def test_upload_forbidden(daemon, pki, make_image, qemu_nbd, raw_source):
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    running = len(qemu_nbd_running())
    with pytest.raises(client.TransferError) as e:
        client.upload(raw_source, https_url(daemon), pki["ca_file"])
    err = e.value
    assert err.status == 403
    assert err.op == "write"
    assert str(err) == (
        f"upload failed: write bytes {err.offset}-"
        f"{err.offset + err.length - 1}: server answered 403: You are not "
        f"allowed to access this resource: Transfer=tr-api-secret forbids "
        f"write")
    assert isinstance(err.__cause__, errors.PeerError)
    assert len(qemu_nbd_running()) == running
    assert not worker_threads()


def test_upload_no_such_ticket(daemon, pki, raw_source):
    with pytest.raises(errors.PeerError) as e:
        client.upload(raw_source, https_url(daemon, "nope"), pki["ca_file"])
    assert e.value.status == 403


def test_upload_too_large(daemon, pki, make_image, qemu_nbd, raw_source):
    dst, srv = new_disk(make_image, qemu_nbd, size=4 * MiB)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=4 * MiB)
    with pytest.raises(client.TransferError) as e:
        client.upload(raw_source, https_url(daemon), pki["ca_file"])
    assert e.value.status == 416
    assert not worker_threads()


def test_download_failure_removes_file(daemon, pki, nbdkit, tmp_path):
    # Once the error file exists, every read of the NBD server behind the
    # daemon fails.
    srv = nbdkit("memory", f"size={SIZE}", "error-pread=EIO",
                 "error-pread-rate=1", "error-file=" + str(tmp_path / "err"),
                 filters=["error"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    with client.ImageioClient(https_url(daemon), pki["ca_file"]) as c:
        c.write(0, b"x" * MiB)
    (tmp_path / "err").write_text("")
    out = str(tmp_path / "out.raw")
    with pytest.raises(client.TransferError) as e:
        client.download(https_url(daemon), out, pki["ca_file"], fmt="raw")
    assert e.value.op == "read"
    assert not os.path.exists(out)
    assert not worker_threads()


def test_keyboard_interrupt(daemon, pki, nbdkit, make_image, tmp_path):
    # A slow target: every write takes 500 ms, so the upload takes
    # seconds and is interrupted in the middle.
    srv = nbdkit("memory", f"size={SIZE}", "wdelay=500ms",
                 filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    src = make_image(name="src", size=SIZE, commands=["write -P 1 0 8M"])
    running = len(qemu_nbd_running())
    start = time.monotonic()
    with sigint_after(0.5), pytest.raises(KeyboardInterrupt):
        client.upload(src, https_url(daemon), pki["ca_file"],
                      buffer_size=BUFFER_SIZE)
    assert time.monotonic() - start < 5
    assert len(qemu_nbd_running()) == running
    assert not worker_threads()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_keyboard_interrupt_download(daemon, pki, nbdkit, tmp_path, fmt):
    # A slow source: every read takes 500 ms. Interrupted in the middle,
    # the download stops its workers and removes the partial image, raw
    # (written directly) or qcow2 (through a local qemu-nbd).
    srv = nbdkit("memory", f"size={SIZE}", "rdelay=500ms",
                 filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    with client.ImageioClient(https_url(daemon), pki["ca_file"]) as c:
        c.write(0, b"x" * SIZE)
    out = str(tmp_path / f"out.{fmt}")
    running = len(qemu_nbd_running())
    start = time.monotonic()
    with sigint_after(0.5), pytest.raises(KeyboardInterrupt):
        client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt,
                        buffer_size=BUFFER_SIZE)
    assert time.monotonic() - start < 5
    assert not os.path.exists(out)
    assert len(qemu_nbd_running()) == running
    assert not worker_threads()


@contextlib.contextmanager
def sigint_after(seconds):
    """Send SIGINT to this thread after seconds, as Ctrl-C would."""
    main = threading.get_ident()
    timer = threading.Timer(
        seconds, lambda: signal.pthread_kill(main, signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def qemu_nbd_running():
    return qemu_nbd_module.running()


def worker_threads():
    return [t for t in threading.enumerate()
            if t.name.startswith(("upload/", "download/"))]


# Local images

def test_info_measure_checksum_extents(raw_source, qcow2_source):
    info = client.info(qcow2_source)
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == SIZE
    m = client.measure(raw_source, "qcow2")
    assert m["fully-allocated"] > SIZE
    assert client.checksum(raw_source) == client.checksum(qcow2_source)
    c = client.checksum(raw_source, block_size=MiB, algorithm="sha256")
    assert c["algorithm"] == "sha256" and c["block_size"] == MiB
    found = list(client.extents(qcow2_source))
    assert found[0] == client.ZeroExtent(0, MiB, False, False)
    assert found[0].data
    assert sum(e.length for e in found) == SIZE
    assert any(e.hole for e in found)


def test_extents_bitmap(make_image):
    path = make_image(fmt="qcow2", size=SIZE, bitmaps=["b1"], commands=[
        "write -P 1 1M 64k"])
    found = list(client.extents(path, bitmap="b1"))
    assert client.DirtyExtent(MiB, 64 * 1024, True, False) in found


def test_info_missing_file(tmp_path):
    from ovirt_imageio.client import qemu_img
    with pytest.raises(qemu_img.Error) as e:
        client.info(str(tmp_path / "missing"))
    assert "missing" in str(e.value)


def test_checksum_defaults():
    # Written out in the client so that importing it does not import
    # checksum (hashlib).
    from ovirt_imageio import checksum as blkhash
    from ovirt_imageio.client import _api
    assert _api._CHECKSUM_BLOCK_SIZE == blkhash.DEFAULT_BLOCK_SIZE
    assert _api._CHECKSUM_ALGORITHM == blkhash.DEFAULT_ALGORITHM


# Start-up: a client command pays for every import when it starts and
# again when it exits; these are needed only by some calls.
LAZY_MODULES = [
    "ovirt_imageio.checksum", "ovirt_imageio.nbd.client",
    "ovirt_imageio.nbd.qemu_nbd", "hashlib", "tarfile", "shutil",
    "tempfile", "typing", "concurrent.futures", "ctypes", "nbd"]


def test_import_is_light():
    code = ("import sys\n"
            "from ovirt_imageio import client\n"
            f"print([m for m in {LAZY_MODULES!r} if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], check=True,
                         capture_output=True, text=True).stdout
    assert out.strip() == "[]"


# ImageioClient

def test_imageio_client(daemon, pki, make_image, qemu_nbd, tmp_path):
    path, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    with client.ImageioClient(https_url(daemon), pki["ca_file"],
                              buffer_size=BUFFER_SIZE) as c:
        assert c.size() == SIZE
        assert c.max_readers == c.max_writers == 4
        found = list(c.extents())
        assert sum(e.length for e in found) == SIZE
        assert found[-1].zero
        c.write(0, b"hello")
        c.zero(100, 50)
        buf = bytearray(5)
        assert c.read(0, buf) == 5
        assert buf == b"hello"
        data = os.urandom(MiB + 7)
        c.read_from(io.BytesIO(data), 3 * MiB, len(data))
        out = io.BytesIO()
        c.write_to(out, 3 * MiB, len(data))
        assert out.getvalue() == data
        c.flush()
        with pytest.raises(RuntimeError):
            c.read(SIZE - 1, bytearray(2))
        with pytest.raises(RuntimeError):
            c.write(SIZE, b"x")
        with pytest.raises(errors.Unsupported):
            list(c.extents("dirty"))
    with open(path, "rb") as f:
        assert f.read(5) == b"hello"
        f.seek(3 * MiB)
        assert f.read(len(data)) == data


def test_progress_bar(daemon, pki, make_image, qemu_nbd, raw_source):
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    out = io.StringIO()
    with client.ProgressBar(output=out, format="json") as pb:
        client.upload(raw_source, https_url(daemon), pki["ca_file"],
                      progress=pb)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["transferred"] == SIZE
    assert last["size"] == SIZE


def test_progress_callable(daemon, pki, make_image, qemu_nbd, raw_source):
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    done = []
    client.upload(raw_source, https_url(daemon), pki["ca_file"],
                  progress=done.append)
    assert sum(done) == SIZE


# The requests on the wire, against a minimal imageio server in memory.

class MemoryServer:
    """An imageio server for one image in memory, allowing 2 connections."""

    def __init__(self, Response, data, zero_extents):
        self.Response = Response
        self.data = bytearray(data)
        self.zero_extents = zero_extents
        self.lock = threading.Lock()

    def __call__(self, req):
        Response = self.Response
        path, _, query = req.path.partition("?")
        if req.method == "OPTIONS":
            return Response(200, json.dumps({
                "features": ["checksum", "extents", "flush", "zero"],
                "max_readers": 2, "max_writers": 2}).encode())
        if req.method == "GET" and path.endswith("/extents"):
            return Response(200, json.dumps(self.zero_extents).encode())
        if req.method == "GET":
            first, last = map(int, req.headers["range"][6:].split("-"))
            return Response(206, bytes(self.data[first:last + 1]), {
                "content-range": f"bytes {first}-{last}/{len(self.data)}"})
        if req.method == "PUT":
            first = int(req.headers["content-range"][6:].split("-")[0])
            with self.lock:
                self.data[first:first + len(req.body)] = req.body
            return Response(200)
        if req.method == "PATCH":
            msg = json.loads(req.body)
            if msg["op"] == "zero":
                with self.lock:
                    self.data[msg["offset"]:msg["offset"] + msg["size"]] = \
                        bytes(msg["size"])
            return Response(200)
        return Response(405)


def test_upload_requests(stub_server, raw_source):
    # The target's second half is zero already, its first half not.
    half = SIZE // 2
    server = MemoryServer(stub_server.Response, b"\xff" * half + bytes(half),
                          [{"start": 0, "length": half, "zero": False,
                            "hole": False},
                           {"start": half, "length": half, "zero": True,
                            "hole": False}])
    stub = stub_server(server)
    # Before reading the file: on ext4, cached pages over an unwritten
    # extent (qemu-io write -z) make SEEK_DATA report data.
    data = data_length(raw_source)
    client.upload(raw_source, stub.url, None, max_workers=4,
                  buffer_size=BUFFER_SIZE)
    with open(raw_source, "rb") as f:
        assert server.data == f.read()
    reqs = stub.requests
    assert [(r.method, r.path) for r in reqs[:2]] == [
        ("OPTIONS", "/images/stub"),
        ("GET", "/images/stub/extents?context=zero")]
    puts = [r for r in reqs if r.method == "PUT"]
    patches = [json.loads(r.body) for r in reqs if r.method == "PATCH"]
    assert {r.path for r in puts} == {"/images/stub?flush=n"}
    assert all(r.headers["content-type"] == "application/octet-stream"
               for r in puts)
    # Only data was sent; zeros only where the target is not zero.
    assert sum(len(r.body) for r in puts) == data
    zeros = [(p["offset"], p["size"]) for p in patches if p["op"] == "zero"]
    assert all(offset + size <= half for offset, size in zeros)
    assert all(p["flush"] is False for p in patches if p["op"] == "zero")
    flushes = [p for p in patches if p["op"] == "flush"]
    # The server allows 2 connections; each that wrote flushed.
    assert stub.connections == 2
    assert 1 <= len(flushes) <= 2
    assert not any(r.method == "GET" and "range" in r.headers for r in reqs)


def test_download_requests(stub_server, raw_source, tmp_path):
    found = [e.to_dict() for e in client.extents(raw_source)]
    length = sum(e["length"] for e in found if not e["zero"])
    with open(raw_source, "rb") as f:
        data = f.read()
    server = MemoryServer(stub_server.Response, data, found)
    stub = stub_server(server)
    out = str(tmp_path / "out.raw")
    client.download(stub.url, out, None, fmt="raw", buffer_size=BUFFER_SIZE)
    compare(raw_source, out, "raw", "raw")
    reqs = stub.requests
    assert [(r.method, r.path) for r in reqs[:2]] == [
        ("OPTIONS", "/images/stub"),
        ("GET", "/images/stub/extents?context=zero")]
    assert {r.method for r in reqs[2:]} == {"GET"}
    ranges = [tuple(map(int, r.headers["range"][6:].split("-")))
              for r in reqs[2:]]
    assert sum(last - first + 1 for first, last in ranges) == length
    assert stub.connections <= 2


# Block devices: Forklift/MTV downloads to a volume that is a block device
# (`ovirt-img download-disk -f raw DISK /dev/xxx`). The device is a real
# loop device, prefilled with a pattern: its old contents are garbage that
# must never show through the downloaded image.

PATTERN = 0x55


@pytest.fixture
def block_device(make_block_device):
    """block_device(size) -> a loop device of size bytes, all PATTERN."""
    return lambda size: make_block_device(size, PATTERN)


def device_spec(device, size):
    """The first size bytes of device, as a raw image."""
    return "json:" + json.dumps({
        "driver": "raw", "size": size,
        "file": {"driver": "host_device", "filename": device}})


def read_device(device, offset, length):
    with open(device, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def assert_is_block_device(path):
    assert os.path.exists(path)
    assert stat.S_ISBLK(os.stat(path).st_mode)


def allocated_backing(device):
    """Bytes allocated in the loop device's backing file."""
    name = os.path.basename(device)
    with open(f"/sys/block/{name}/loop/backing_file") as f:
        return allocated_bytes(f.read().strip())


def can_discard(device):
    name = os.path.basename(device)
    with open(f"/sys/block/{name}/queue/discard_max_bytes") as f:
        return int(f.read()) > 0


def test_download_raw_to_block_device(daemon, pki, qemu_nbd, qcow2_source,
                                      block_device):
    # The source has data, zero clusters and holes; the device is larger
    # than the image.
    device = block_device(2 * SIZE)
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    progress = Progress()
    # Not verified here: the server's checksum counts as transferred.
    client.download(https_url(daemon), device, pki["ca_file"], fmt="raw",
                    buffer_size=BUFFER_SIZE, progress=progress)
    compare(qcow2_source, device_spec(device, SIZE), "qcow2", "raw")
    # Past the image's size the device is as it was.
    assert read_device(device, SIZE, SIZE) == bytes([PATTERN]) * SIZE
    assert_is_block_device(device)
    assert progress.size == progress.done == SIZE
    # Only data went over the wire: the zeros were made on the device.
    testutil.wait_for_ticket(
        daemon.api, "api-secret", transferred=data_length(qcow2_source))
    if can_discard(device):
        # By the kernel (fallocate), not written: the loop device punched
        # holes in its backing file where the image reads zeros.
        zeros = SIZE - data_length(qcow2_source)
        assert allocated_backing(device) <= 2 * SIZE - zeros + MiB


def test_download_raw_to_block_device_unaligned(daemon, pki, qemu_nbd,
                                                tmp_path, block_device):
    # 512 byte clusters: extents that do not start or end on a page, data
    # with blocks of zeros written as data, and a size that is not a
    # multiple of a page. Verified: the checksum covers the image's size,
    # not the device's.
    size = SIZE + 1536
    src = str(tmp_path / "src.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", src,
             str(size))
    run_qemu_io(src, "qcow2",
                "write -P 0x41 512 1536", "write -z 2560 512",
                "write -P 0x42 3584 1M", "write -P 0 1200k 200k",
                "write -P 0x43 1400k 512", "write -z 1M 1536",
                f"write -P 0x44 {size - 1024} 512")
    device = block_device(size + 2048)
    srv = qemu_nbd(src, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"], size=size)
    client.download(https_url(daemon), device, pki["ca_file"], fmt="raw",
                    buffer_size=BUFFER_SIZE, verify=True)
    compare(src, device_spec(device, size), "qcow2", "raw")
    assert read_device(device, size, 2048) == bytes([PATTERN]) * 2048


def test_download_qcow2_to_block_device(daemon, pki, qemu_nbd, qcow2_source,
                                        block_device):
    device = block_device(2 * SIZE)
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    running = len(qemu_nbd_running())
    client.download(https_url(daemon), device, pki["ca_file"],
                    fmt="qcow2", buffer_size=BUFFER_SIZE, verify=True)
    assert len(qemu_nbd_running()) == running
    info = json.loads(qemu_img("info", "--output=json", "-f", "qcow2",
                               device))
    assert info["virtual-size"] == SIZE
    compare(qcow2_source, device, "qcow2", "qcow2")
    assert_is_block_device(device)
    # Unallocated stays unallocated: only the data was written.
    allocated = [e for e in json.loads(qemu_img(
        "map", "--output=json", "-f", "qcow2", device)) if e["data"]]
    assert sum(e["length"] for e in allocated) <= 5 * MiB


def test_download_to_small_block_device(daemon, pki, qemu_nbd, qcow2_source,
                                        block_device):
    device = block_device(SIZE // 2)
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    with pytest.raises(ValueError) as e:
        client.download(https_url(daemon), device, pki["ca_file"],
                        fmt="raw")
    assert f"{SIZE // 2} bytes, the image needs {SIZE}" in str(e.value)
    # Nothing was written, nothing removed.
    assert read_device(device, 0, SIZE // 2) == bytes([PATTERN]) * (SIZE // 2)
    assert_is_block_device(device)
    testutil.wait_for_ticket(daemon.api, "api-secret", transferred=0)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_to_busy_block_device(daemon, pki, qemu_nbd, qcow2_source,
                                       block_device, fmt):
    # Held exclusively, as a mounted file system holds its device.
    device = block_device(2 * SIZE)
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read"])
    fd = os.open(device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(OSError) as e:
            client.download(https_url(daemon), device, pki["ca_file"],
                            fmt=fmt)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    assert read_device(device, 0, 2 * SIZE) == bytes([PATTERN]) * 2 * SIZE


@pytest.mark.parametrize("target", ["device", "link"])
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_failure_keeps_block_device(daemon, pki, nbdkit, tmp_path,
                                             block_device, fmt, target):
    # As test_download_failure_removes_file, to a device or a link to one
    # (/dev/disk/by-id/...): neither is removed.
    srv = nbdkit("memory", f"size={SIZE}", "error-pread=EIO",
                 "error-pread-rate=1", "error-file=" + str(tmp_path / "err"),
                 filters=["error"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    with client.ImageioClient(https_url(daemon), pki["ca_file"]) as c:
        c.write(0, b"x" * MiB)
    (tmp_path / "err").write_text("")
    device = block_device(SIZE)
    out = device
    if target == "link":
        out = str(tmp_path / "disk")
        os.symlink(device, out)
    with pytest.raises(client.TransferError) as e:
        client.download(https_url(daemon), out, pki["ca_file"], fmt=fmt)
    assert e.value.op == "read"
    assert_is_block_device(out)
    assert os.path.realpath(out) == device
    assert not worker_threads()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_keyboard_interrupt_download_block_device(daemon, pki, nbdkit,
                                                  block_device, fmt):
    srv = nbdkit("memory", f"size={SIZE}", "rdelay=500ms",
                 filters=["delay"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["read", "write"])
    with client.ImageioClient(https_url(daemon), pki["ca_file"]) as c:
        c.write(0, b"x" * SIZE)
    device = block_device(SIZE)
    running = len(qemu_nbd_running())
    with sigint_after(0.5), pytest.raises(KeyboardInterrupt):
        client.download(https_url(daemon), device, pki["ca_file"], fmt=fmt,
                        buffer_size=BUFFER_SIZE)
    assert_is_block_device(device)
    assert len(qemu_nbd_running()) == running
    assert not worker_threads()


# Retries: a relay on loopback cuts connections mid-request; HTTPS only
# (the daemon's unix socket would bypass the relay).

def no_wait(seconds, stop):
    return stop.is_set()


@pytest.fixture
def relayed(make_daemon, qemu_nbd, make_image):
    """A daemon without its unix socket, a new disk on it, a data-heavy
    source image."""
    daemon = make_daemon(local={"enable": "false"})
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    src = make_image(name="data", size=SIZE, commands=[
        "write -P 0x61 0 3M", "write -P 0x62 4M 4M"])
    daemon.nbd_url = f"nbd:unix:{srv.socket}"
    return daemon, dst, src


def test_retry_upload_through_cut_connections(relayed, pki, caplog):
    import relay
    daemon, dst, src = relayed
    port = daemon.remote.server.address()[1]
    with relay.Relay(port, cut_after=512 * 1024, cuts=3) as r:
        client.upload(src, r.url("api-secret"), pki["ca_file"],
                      buffer_size=BUFFER_SIZE, verify=True,
                      retry=client.Retry(wait=no_wait))
        assert r.cut > 0
    compare(src, dst, "raw", "raw")
    warnings = [m for m in caplog.messages if "retrying" in m]
    assert warnings
    assert not any("api-secret" in m for m in caplog.messages)


def test_retry_download_through_cut_connections(relayed, pki, tmp_path):
    import relay
    daemon, dst, src = relayed
    client.upload(src, https_url(daemon), pki["ca_file"])
    port = daemon.remote.server.address()[1]
    out = str(tmp_path / "out.qcow2")
    progress = Progress()
    with relay.Relay(port, cut_after=512 * 1024, cuts=3) as r:
        client.download(r.url("api-secret"), out, pki["ca_file"],
                        buffer_size=BUFFER_SIZE, verify=True,
                        progress=progress, retry=client.Retry(wait=no_wait))
        assert r.cut > 0
    compare(src, out, "raw", "qcow2")
    # A retried range is counted once.
    assert sum(progress.updates) == SIZE


def test_retry_gives_up(relayed, pki):
    import relay
    daemon, dst, src = relayed
    port = daemon.remote.server.address()[1]
    waits = []

    def record(seconds, stop):
        waits.append(seconds)
        return False

    with relay.Relay(port, cut_after=512 * 1024) as r:
        with pytest.raises(client.TransferError) as e:
            client.upload(src, r.url("api-secret"), pki["ca_file"],
                          buffer_size=BUFFER_SIZE, max_workers=1,
                          retry=client.Retry(attempts=3, wait=record))
        assert r.cut >= 3
    assert e.value.op == "write"
    assert "(after 3 attempts)" in str(e.value)
    # Doubling backoff: 0.5, 1.
    assert waits == [0.5, 1.0]


def test_retry_not_for_http_errors(relayed, pki):
    # 403, a read-only ticket: the server's answer, not the network's.
    daemon, dst, src = relayed
    add_ticket(daemon, daemon.nbd_url, uuid="ro", ops=("read",))
    waits = []
    with pytest.raises(client.TransferError) as e:
        client.upload(src, https_url(daemon, "ro"), pki["ca_file"],
                      retry=client.Retry(
                          wait=lambda s, stop: waits.append(s)))
    assert e.value.status == 403
    assert waits == []


# Upload from a URL (urlsource.py): a real HTTP server on loopback.

@pytest.fixture
def image_server():
    from imageserver import ImageServer
    with ImageServer() as srv:
        yield srv


@pytest.mark.parametrize("fmt,options", [
    ("raw", ()), ("qcow2", ()), ("qcow2", ("-c",)),
], ids=["raw", "qcow2", "qcow2-compressed"])
def test_upload_url(daemon, pki, make_image, qemu_nbd, raw_source,
                    image_server, tmp_path, fmt, options):
    src = str(tmp_path / f"image.{fmt}")
    convert(raw_source, src, "raw", fmt, *options)
    image_server.files["/image"] = src
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    progress = Progress()
    with client.open_url(image_server.url("/image"),
                         max_connections=3) as url_src:
        assert (url_src.format, url_src.virtual_size) == (fmt, SIZE)
        client.upload(url_src, https_url(daemon), pki["ca_file"],
                      buffer_size=BUFFER_SIZE, progress=progress,
                      max_workers=3)
    compare(raw_source, dst, "raw", "raw")
    assert progress.size == SIZE
    assert progress.done == SIZE
    # Sparse: only data crossed to the daemon, also from a raw source,
    # whose zero blocks were found in the data read.
    ticket = daemon.api.get("api-secret")
    assert ticket["transferred"] <= data_length(raw_source) + 1 * MiB


def test_upload_url_zeroes_old_data(daemon, pki, make_image, qemu_nbd,
                                    raw_source, image_server):
    image_server.files["/image"] = raw_source
    dst = make_image(name="dst", size=SIZE, commands=["write -P 0xff 0 8M"])
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    with client.open_url(image_server.url("/image")) as url_src:
        client.upload(url_src, https_url(daemon), pki["ca_file"],
                      buffer_size=BUFFER_SIZE, verify=True)
    compare(raw_source, dst, "raw", "raw")


@pytest.mark.parametrize("disk_is_zero", [False, True])
def test_upload_url_without_ranges(daemon, pki, make_image, qemu_nbd,
                                   raw_source, disk_is_zero):
    from imageserver import ImageServer
    dst, srv = new_disk(make_image, qemu_nbd)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    progress = Progress()
    with ImageServer(ranges=False) as image_server:
        image_server.files["/image"] = raw_source
        with client.open_url(image_server.url("/image")) as url_src:
            assert not url_src.ranges
            client.upload(url_src, https_url(daemon), pki["ca_file"],
                          buffer_size=BUFFER_SIZE, progress=progress,
                          disk_is_zero=disk_is_zero)
        # Read once.
        assert len(image_server.requests) == 1
    compare(raw_source, dst, "raw", "raw")
    assert progress.done == SIZE
    ticket = daemon.api.get("api-secret")
    assert ticket["transferred"] <= data_length(raw_source) + 1 * MiB


def test_upload_url_stream_verify_mismatch(daemon, pki, make_image, qemu_nbd,
                                           raw_source):
    # A disk that was not empty, and zeros skipped (disk_is_zero lies):
    # the checksum of what was sent differs from the disk's.
    from imageserver import ImageServer
    dst = make_image(name="dst", size=SIZE, commands=["write -P 0xff 2M 1M"])
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    with ImageServer(ranges=False) as image_server:
        image_server.files["/image"] = raw_source
        with client.open_url(image_server.url("/image")) as url_src:
            with pytest.raises(client.ChecksumMismatch):
                client.upload(url_src, https_url(daemon), pki["ca_file"],
                              verify=True, disk_is_zero=True)
