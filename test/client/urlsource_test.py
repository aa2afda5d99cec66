"""
URL sources (ovirt_imageio/client/urlsource.py) against a real HTTP(S)
server on loopback (imageserver.py), read by real qemu-img and qemu-nbd.
"""

import hashlib
import logging
import os
import subprocess

import pytest

from ovirt_imageio.client import sources
from ovirt_imageio.client import urlsource

from imageserver import ImageServer
from testutil import compare, make_image, qemu_io

MiB = 1024**2
SECRET = "s3cr3t-t0ken-value"


@pytest.fixture
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture
def plain_server():
    """A server without ranges."""
    with ImageServer(ranges=False) as srv:
        yield srv


@pytest.fixture
def qcow2(tmp_path):
    return make_image(tmp_path / "disk.qcow2", "qcow2", size=8 * MiB)


@pytest.fixture
def big_qcow2(tmp_path):
    """A qcow2 file larger than the head served from memory."""
    path = make_image(tmp_path / "big.qcow2", "qcow2", size=16 * MiB)
    qemu_io(path, "qcow2", "write -P 0x44 8m 3m")
    return path


@pytest.fixture
def raw(tmp_path):
    return make_image(tmp_path / "disk.raw", "raw", size=8 * MiB)


def qemu_img_compare(a, b):
    p = subprocess.run(["qemu-img", "compare", a, b], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_probe_and_read_through_qemu(server, tmp_path, fmt):
    path = make_image(tmp_path / f"disk.{fmt}", fmt, size=8 * MiB)
    server.files["/disk"] = path
    with urlsource.open(server.url("/disk")) as src:
        assert src.ranges
        assert src.format == fmt
        assert src.virtual_size == 8 * MiB
        qemu_img_compare(src.qemu_spec(), path)
    # The server sent no Accept-Ranges; we asked with a ranged GET.
    assert "range" in server.requests[0][2]


def test_export_serves_guest_data(server, qcow2, tmp_path):
    server.files["/disk.qcow2"] = qcow2
    with urlsource.open(server.url("/disk.qcow2"), max_connections=3) as src:
        with src.export(shared=2) as exp:
            with exp.connect() as c:
                assert c.size == 8 * MiB
                data = [e for e in c.extents("zero") if not e.zero]
                # Only the qcow2's data clusters, from its allocation map.
                assert sum(e.length for e in data) < 2 * MiB
                assert c.read(4, 1 * MiB) == b"\x42" * 4
                out = tmp_path / "copy.raw"
                buf = bytearray(8 * MiB)
                c.read_into(buf, 0)
                out.write_bytes(buf)
    compare(out, qcow2)


def test_read_into_head_and_ranges(server, tmp_path):
    path = tmp_path / "big.raw"
    data = bytes(range(256)) * (12 * MiB // 256)
    path.write_bytes(data)
    server.files["/big"] = str(path)
    with urlsource.open(server.url("/big")) as src:
        assert src.size == len(data)
        # Across the end of the head, then past it.
        for offset, length in ((urlsource.HEAD_SIZE - 10, 20),
                               (5 * MiB + 3, 1 * MiB), (0, 100)):
            buf = bytearray(length)
            src.read_into(buf, offset)
            assert buf == data[offset:offset + length]
        with pytest.raises(urlsource.Error):
            src.read_into(bytearray(10), len(data) - 5)


def test_head_is_read_once(server, big_qcow2):
    server.files["/disk"] = big_qcow2
    with urlsource.open(server.url("/disk")) as src:
        qemu_img_compare(src.qemu_spec(), big_qcow2)
    # Every later GET starts past the head, served from memory.
    starts = [int(r[2]["range"].split("=")[1].split("-")[0])
              for r in server.requests[1:]]
    assert starts and all(s >= urlsource.HEAD_SIZE for s in starts)


def test_no_ranges_raw_streams_once(plain_server, raw):
    plain_server.files["/disk.raw"] = raw
    with urlsource.open(plain_server.url("/disk.raw")) as src:
        assert not src.ranges
        assert (src.format, src.virtual_size) == ("raw", 8 * MiB)
        h = hashlib.sha256()
        buf = bytearray(1 * MiB + 7)
        while n := src.stream_into(buf):
            h.update(buf[:n])
        with pytest.raises(urlsource.RangesNotSupported):
            src.qemu_spec()
    with open(raw, "rb") as f:
        assert h.hexdigest() == hashlib.sha256(f.read()).hexdigest()
    assert len(plain_server.requests) == 1


def test_no_ranges_qcow2_refused(plain_server, big_qcow2):
    plain_server.files["/disk.qcow2"] = big_qcow2
    with pytest.raises(urlsource.RangesNotSupported) as e:
        urlsource.open(plain_server.url("/disk.qcow2"))
    assert "qcow2" in str(e.value)
    assert "random access" in str(e.value)


def test_no_ranges_small_image_from_memory(plain_server, qcow2):
    # The whole file fits in the head: read once, then served from
    # memory to qemu.
    assert os.path.getsize(qcow2) <= urlsource.HEAD_SIZE
    plain_server.files["/disk.qcow2"] = qcow2
    with urlsource.open(plain_server.url("/disk.qcow2")) as src:
        assert src.ranges
        assert src.format == "qcow2"
        qemu_img_compare(src.qemu_spec(), qcow2)
    assert len(plain_server.requests) == 1


def test_backing_file_refused(server, tmp_path, qcow2):
    top = tmp_path / "top.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", qcow2,
                    "-F", "qcow2", str(top)], check=True)
    server.files["/top.qcow2"] = str(top)
    with pytest.raises(sources.UnsafeImage) as e:
        urlsource.open(server.url("/top.qcow2"))
    assert qcow2 in str(e.value)


def test_data_file_refused(server, tmp_path):
    img = tmp_path / "img.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={tmp_path / 'data.raw'}", str(img), "1M"],
                   check=True)
    server.files["/img.qcow2"] = str(img)
    with pytest.raises(sources.UnsafeImage) as e:
        urlsource.open(server.url("/img.qcow2"))
    assert "data file" in str(e.value)


def test_other_format_refused(server, tmp_path, qcow2):
    vmdk = tmp_path / "disk.vmdk"
    subprocess.run(["qemu-img", "convert", "-q", "-O", "vmdk", qcow2,
                    str(vmdk)], check=True)
    server.files["/disk.vmdk"] = str(vmdk)
    with pytest.raises(urlsource.Error) as e:
        urlsource.open(server.url("/disk.vmdk"))
    assert "vmdk" in str(e.value)


def test_redirect_same_host(server, qcow2):
    server.files["/disk"] = qcow2
    server.redirects["/old"] = "/disk"
    with urlsource.open(server.url("/old?sig=abc")) as src:
        assert src.format == "qcow2"
        qemu_img_compare(src.qemu_spec(), qcow2)
    paths = [r[1] for r in server.requests]
    # Later reads go where the probe was redirected.
    assert paths[0] == "/old?sig=abc"
    assert set(paths[1:]) == {"/disk"}


def test_redirect_other_host_refused(server, qcow2):
    server.files["/disk"] = qcow2
    server.redirects["/old"] = server.url("/disk", host="localhost")
    server.required = {"X-Auth-Token": SECRET}
    with pytest.raises(urlsource.Error) as e:
        urlsource.open(server.url("/old"), {"X-Auth-Token": SECRET})
    assert "another host (localhost)" in str(e.value)
    assert "--allow-redirect-host" in str(e.value)
    # Nothing was sent to the other host.
    assert len(server.requests) == 1


def test_redirect_other_host_allowed(server, qcow2, caplog):
    server.files["/disk"] = qcow2
    server.redirects["/old"] = server.url("/disk", host="localhost")
    server.required = {"X-Auth-Token": SECRET}
    caplog.set_level(logging.DEBUG)
    with urlsource.open(server.url("/old"), {"X-Auth-Token": SECRET},
                        allow_redirect_host=True) as src:
        qemu_img_compare(src.qemu_spec(), qcow2)
    assert all(r[2]["host"].startswith(("localhost", "127.0.0.1"))
               for r in server.requests)
    assert any(r[2]["host"].startswith("localhost")
               and r[2]["x-auth-token"] == SECRET for r in server.requests)
    # Loopback is allowed, and said.
    assert "loopback address" in caplog.text
    assert SECRET not in caplog.text


def test_required_header(server, qcow2, caplog):
    server.files["/disk"] = qcow2
    server.required = {"X-Auth-Token": SECRET}
    with pytest.raises(urlsource.Unauthorized):
        urlsource.open(server.url("/disk"))
    with pytest.raises(urlsource.Unauthorized):
        urlsource.open(server.url("/disk"), {"X-Auth-Token": "wrong"})
    caplog.set_level(logging.DEBUG)
    with urlsource.open(server.url("/disk"), {"X-Auth-Token": SECRET}) as src:
        qemu_img_compare(src.qemu_spec(), qcow2)
    assert SECRET not in caplog.text


def test_refresh_after_401(server, big_qcow2):
    server.files["/disk"] = big_qcow2
    server.required = {"X-Auth-Token": "first"}
    calls = []

    def refresh():
        calls.append(1)
        return {"X-Auth-Token": "second"}

    with urlsource.open(server.url("/disk"), {"X-Auth-Token": "first"},
                        refresh=refresh) as src:
        # The token expires mid-transfer.
        server.required = {"X-Auth-Token": "second"}
        qemu_img_compare(src.qemu_spec(), big_qcow2)
    assert len(calls) == 1
    statuses = [r[3] for r in server.requests]
    assert 401 in statuses and statuses[-1] == 206


def test_refresh_gives_up(server, qcow2):
    server.files["/disk"] = qcow2
    server.required = {"X-Auth-Token": "other"}
    with pytest.raises(urlsource.Unauthorized):
        urlsource.open(server.url("/disk"), {"X-Auth-Token": "first"},
                       refresh=lambda: None)


def test_retry_server_errors(server, tmp_path):
    path = tmp_path / "big.raw"
    data = b"x" * (4 * MiB)
    path.write_bytes(data)
    server.files["/big"] = str(path)
    with urlsource.open(server.url("/big")) as src:
        server.fail_next = [503, 502]
        buf = bytearray(MiB)
        src.read_into(buf, 3 * MiB)
        assert buf == data[:MiB]
        server.fail_next = [503] * urlsource.ATTEMPTS
        with pytest.raises(urlsource.Error) as e:
            src.read_into(buf, 3 * MiB)
        assert "503" in str(e.value)


def test_https_with_cafile(pki, qcow2):
    with ImageServer(pki=pki) as srv:
        srv.files["/disk"] = qcow2
        with pytest.raises(Exception):
            urlsource.open(srv.url("/disk", host="localhost"))
        with urlsource.open(srv.url("/disk", host="localhost"),
                            cafile=pki["ca_file"]) as src:
            qemu_img_compare(src.qemu_spec(), qcow2)


def test_not_found(server):
    with pytest.raises(urlsource.Error) as e:
        urlsource.open(server.url("/nothing?sig=SECRETSIG"))
    assert "404" in str(e.value)
    assert "SECRETSIG" not in str(e.value)


@pytest.mark.parametrize("url", [
    "ftp://host/x", "file:///etc/passwd", "http://user:pw@host/x",
    "http:///x",
])
def test_bad_urls(url):
    with pytest.raises(urlsource.Error) as e:
        urlsource.open(url)
    assert "pw" not in str(e.value)


@pytest.mark.parametrize("headers", [
    {"Bad Name": "x"}, {"X-Ok": "a\r\nInjected: 1"}, {"Range": "bytes=0-1"},
])
def test_bad_headers(headers):
    with pytest.raises(ValueError) as e:
        urlsource.check_headers(headers)
    assert "Injected" not in str(e.value)


def test_header_file(tmp_path):
    path = tmp_path / "headers"
    path.write_text(f"# comment\n\nX-Auth-Token: {SECRET}\nX-Other:  a:b \n")
    assert urlsource.read_header_file(str(path)) == {
        "X-Auth-Token": SECRET, "X-Other": "a:b"}
    path.write_text(f"{SECRET}\n")
    with pytest.raises(ValueError) as e:
        urlsource.read_header_file(str(path))
    assert SECRET not in str(e.value)
    assert "line 1" in str(e.value)
