"""
The in-process NBD server (ovirt_imageio/nbd/server.py), with real
clients: libnbd (python3-libnbd, through nbd/client.py and directly),
qemu-img and qemu-nbd.
"""

import json
import os
import subprocess
import threading

import nbd
import pytest

from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import server

from testutil import compare, make_image

MiB = 1024**2
TIMEOUT = 10


class BytesReader:
    """A reader of a bytes object; counts calls."""

    def __init__(self, data):
        self.data = data
        self.calls = 0

    def read_into(self, buf, offset):
        self.calls += 1
        buf[:] = self.data[offset:offset + len(buf)]


@pytest.fixture
def serve(sock_dir):
    servers = []

    def start(reader, size, **options):
        path = os.path.join(sock_dir, f"s{len(servers)}.sock")
        s = server.serve(reader, size, path, **options)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def test_read(serve):
    data = os.urandom(3 * MiB + 5)
    s = serve(BytesReader(data), len(data))
    with client.open(s.address) as c:
        assert c.size == len(data)
        assert c.read(100, 0) == data[:100]
        assert c.read(2 * MiB, MiB + 1) == data[MiB + 1:3 * MiB + 1]
        # No block status: everything is data.
        assert [(e.start, e.length, e.zero) for e in c.extents("zero")] == [
            (0, len(data), False)]


def test_large_read_split(serve):
    data = os.urandom(10 * MiB)
    s = serve(BytesReader(data), len(data), max_block=MiB)
    with client.open(s.address) as c:
        buf = bytearray(10 * MiB)
        c.read_into(buf, 0)
        assert buf == data


def test_libnbd_sees_read_only_export(serve):
    s = serve(BytesReader(b"x" * MiB), MiB)
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(s.url)
    exports = []
    h.opt_list(lambda name, desc: exports.append(name))
    assert exports == [""]
    h.opt_go()
    assert h.is_read_only()
    assert h.can_multi_conn()
    assert not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert h.get_block_size(nbd.SIZE_MAXIMUM) == server.MAX_BLOCK
    with pytest.raises(nbd.Error):
        h.pwrite(b"y" * 512, 0)
    h.shutdown()


def test_unknown_export_refused(serve, sock_dir):
    s = serve(BytesReader(b"x" * MiB), MiB)
    h = nbd.NBD()
    h.set_export_name("other")
    with pytest.raises(nbd.Error):
        h.connect_unix(s.address.socket)


def test_export_name_option(serve):
    # NBD_OPT_EXPORT_NAME, the old way to enter transmission.
    s = serve(BytesReader(b"abc" * 1000), 3000)
    h = nbd.NBD()
    h.set_request_structured_replies(False)
    h.set_full_info(False)
    h.set_handshake_flags(nbd.HANDSHAKE_FLAG_FIXED_NEWSTYLE)
    h.set_opt_mode(False)
    h.connect_unix(s.address.socket)
    assert h.pread(6, 0) == b"abcabc"
    h.shutdown()


def test_requests_in_flight_served_at_once(serve):
    """Reads on one connection run in parallel workers."""
    workers = 3
    barrier = threading.Barrier(workers, timeout=TIMEOUT)

    class Reader:
        def read_into(self, buf, offset):
            # Every worker waits until all are reading: passes only if
            # the reads run at once.
            barrier.wait()
            buf[:] = bytes([offset // MiB]) * len(buf)

    s = serve(Reader(), workers * MiB, workers=workers)
    h = nbd.NBD()
    h.connect_uri(s.url)
    bufs = [nbd.Buffer(MiB) for _ in range(workers)]
    cookies = [h.aio_pread(buf, i * MiB) for i, buf in enumerate(bufs)]
    for cookie in cookies:
        while not h.aio_command_completed(cookie):
            h.poll(TIMEOUT * 1000)
    assert [buf.to_bytearray()[:1] for buf in bufs] == [
        bytes([i]) for i in range(workers)]
    h.shutdown()


def test_reader_error_is_eio(serve, caplog):
    class Reader:
        def read_into(self, buf, offset):
            if offset >= MiB:
                raise RuntimeError("source failed")
            buf[:] = b"a" * len(buf)

    s = serve(Reader(), 2 * MiB)
    with client.open(s.address) as c:
        with pytest.raises(client.Error) as e:
            c.read(10, MiB)
        assert "EIO" in str(e.value) or "Input/output" in str(e.value)
        # The connection goes on.
        assert c.read(3, 0) == b"aaa"
    assert "source failed" in caplog.text


def test_close_ends_connections(serve):
    s = serve(BytesReader(b"x" * MiB), MiB)
    c = client.open(s.address, timeout=TIMEOUT)
    s.close()
    with pytest.raises(client.Error):
        c.read(10, 0)
    c.close()
    assert not os.path.exists(s.address.socket)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_qemu_reads_format_on_top(serve, tmp_path, fmt):
    path = make_image(tmp_path / f"disk.{fmt}", fmt, size=8 * MiB)
    with open(path, "rb") as f:
        data = f.read()
    s = serve(BytesReader(data), len(data))
    spec = "json:" + json.dumps({"file": s.qemu_node()})
    p = subprocess.run(["qemu-img", "info", "--output", "json", spec],
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["format"] == fmt
    compare("json:" + json.dumps({"driver": fmt, "file": s.qemu_node()}),
            path)


def test_qemu_nbd_on_top(serve, tmp_path, qemu_nbd):
    """As urlsource.export(): qemu-nbd serving a qcow2 read from us."""
    path = make_image(tmp_path / "disk.qcow2", "qcow2", size=8 * MiB)
    with open(path, "rb") as f:
        data = f.read()
    reader = BytesReader(data)
    s = serve(reader, len(data))
    overlay = tmp_path / "overlay.qcow2"
    backing = "json:" + json.dumps({"driver": "qcow2",
                                    "file": s.qemu_node()})
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b",
                    backing, "-F", "qcow2", str(overlay), str(8 * MiB)],
                   check=True, timeout=TIMEOUT)
    q = qemu_nbd(str(overlay), fmt="qcow2", read_only=True)
    with client.open(q.address) as c:
        data_extents = [e for e in c.extents("zero") if not e.zero]
        assert 0 < sum(e.length for e in data_extents) < 2 * MiB
        buf = bytearray(8 * MiB)
        c.read_into(buf, 0)
    out = tmp_path / "out.raw"
    out.write_bytes(buf)
    compare(out, path)
    assert reader.calls > 0
