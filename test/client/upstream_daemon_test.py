"""
Our client library against upstream ovirt-imageio 2.5.1's daemon (from
the anchor venv, test/upstream.py): uploads and downloads both ways, over
its HTTPS port and its unix socket, with its file and NBD backends.
"""

import json
import subprocess

import pytest

import upstream
from ovirt_imageio import client
from ovirt_imageio import errors
from ovirt_imageio.client import remote

MiB = 1024**2
SIZE = 8 * MiB

COMMANDS = [
    "write -P 0x41 0 1M", "write -P 0x42 1100k 4k", "write -z 2M 1M",
    "write -P 0x43 4M 3M", "write -P 0x44 8188k 4k"]


@pytest.fixture(scope="module")
def daemon(upstream_venv, tmp_path_factory, pki):
    tmp = tmp_path_factory.mktemp("upstream-daemon")
    with upstream.UpstreamDaemon(tmp, pki, venv=upstream_venv) as d:
        yield d


@pytest.fixture
def ticket(daemon):
    """add(url, ops, **kw) adds a ticket; all are removed at teardown."""
    added = []

    def add(url, ops=("write",), size=SIZE, **kw):
        uuid = f"up-secret-{len(added)}"
        t = {"uuid": uuid, "size": size, "ops": list(ops), "timeout": 300,
             "url": url, "transfer_id": f"tr-{uuid}"}
        t.update(kw)
        resp, data = daemon.api.put(t)
        assert resp.status == 200, data
        added.append(uuid)
        return daemon.url(uuid, host="localhost")

    yield add
    for uuid in added:
        daemon.api.delete(uuid)


def compare(a, b, fmt_a, fmt_b):
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F",
                        fmt_b, a, b], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def qcow2_source(make_image):
    return make_image(name="src", fmt="qcow2", size=SIZE, commands=COMMANDS)


def test_options_and_unix_socket(daemon, ticket, pki, make_image):
    url = ticket(f"file://{make_image(size=SIZE)}")
    with remote.RemoteImage(url, pki["ca_file"]) as img:
        # Upstream's file backend: one writer.
        assert img.transport == "unix"
        assert img.features == {"checksum", "extents", "flush", "zero"}
        assert img.max_writers == 1
        assert img.size == SIZE
    with remote.RemoteImage(url, pki["ca_file"],
                            use_unix_socket=False) as img:
        assert img.transport == "https"
        img.write(b"abc", 0)
        buf = bytearray(3)
        img.read_into(buf, 0)
        assert buf == b"abc"


def test_errors(daemon, ticket, pki, make_image):
    with pytest.raises(errors.PeerError) as e:
        remote.RemoteImage(daemon.url("nope", host="localhost"),
                           pki["ca_file"])
    assert e.value.status == 403
    assert str(e.value) == (
        "You are not allowed to access this resource: No such ticket nope")
    url = ticket(f"file://{make_image(size=SIZE)}", ops=["read"])
    with remote.RemoteImage(url, pki["ca_file"]) as img:
        with pytest.raises(errors.PeerError) as e:
            img.read_into(bytearray(10), SIZE - 5)
        assert e.value.status == 416
        with pytest.raises(errors.Unsupported):
            img.extents("dirty")


def test_upload_nbd(daemon, ticket, pki, make_image, qemu_nbd,
                    qcow2_source):
    dst = make_image(name="dst", size=SIZE)
    srv = qemu_nbd(dst, fmt="raw", shared=8)
    url = ticket(f"nbd:unix:{srv.socket}")
    client.upload(qcow2_source, url, pki["ca_file"], verify=True)
    compare(qcow2_source, dst, "qcow2", "raw")


def test_upload_file(daemon, ticket, pki, make_image, qcow2_source):
    # Upstream's file backend: host bytes, one writer, extents say all
    # data, so zeros go as PATCH zero.
    dst = make_image(name="dst", size=SIZE, commands=["write -P 0xff 0 8M"])
    url = ticket(f"file://{dst}")
    client.upload(qcow2_source, url, pki["ca_file"], verify=True)
    compare(qcow2_source, dst, "qcow2", "raw")


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_download_nbd(daemon, ticket, pki, qemu_nbd, qcow2_source, tmp_path,
                      fmt):
    srv = qemu_nbd(qcow2_source, fmt="qcow2", read_only=True, shared=8)
    url = ticket(f"nbd:unix:{srv.socket}", ops=["read"])
    out = str(tmp_path / f"out.{fmt}")
    client.download(url, out, pki["ca_file"], fmt=fmt, verify=True)
    compare(qcow2_source, out, "qcow2", fmt)


def test_download_file(daemon, ticket, pki, make_image, tmp_path):
    src = make_image(name="src", size=SIZE, commands=COMMANDS)
    url = ticket(f"file://{src}", ops=["read"])
    out = str(tmp_path / "out.raw")
    client.download(url, out, pki["ca_file"], fmt="raw")
    compare(src, out, "raw", "raw")


def test_incremental(daemon, ticket, pki, qemu_nbd, make_image, tmp_path):
    path = make_image(fmt="qcow2", size=SIZE, commands=[
        "write -P 0x01 0 8M"])
    full = str(tmp_path / "full.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                    path, full], check=True)
    subprocess.run(["qemu-img", "bitmap", "--add", path, "b1"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x02 1M 64k",
                    "-c", "write -z 5M 1M", path], check=True,
                   capture_output=True)
    srv = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b1", shared=8)
    url = ticket(f"nbd:unix:{srv.socket}", ops=["read"], dirty=True)
    incr = str(tmp_path / "incr.qcow2")
    client.download(url, incr, pki["ca_file"], incremental=True,
                    backing_file=full, verify=True)
    compare(path, incr, "qcow2", "qcow2")
    out = subprocess.run(["qemu-img", "map", "--output=json", incr],
                         check=True, capture_output=True)
    top = [e for e in json.loads(out.stdout) if e["depth"] == 0]
    assert {(e["start"], e["length"], e["zero"]) for e in top} == {
        (MiB, 64 * 1024, False), (5 * MiB, MiB, True)}
