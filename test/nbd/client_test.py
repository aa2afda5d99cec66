import errno
import os
import subprocess
import threading
import time
import tracemalloc

import pytest

from ovirt_imageio import errors
from ovirt_imageio.nbd import client
from ovirt_imageio.nbd import extents
from ovirt_imageio.nbd import url

K = 1024
M = 1024**2

# Written in every test image: data, a zero cluster, more data, and holes
# everywhere else.
COMMANDS = (
    "write -P 0x55 0 64k",
    "write -z 1M 64k",
    "write -P 0xaa 2M 128k",
)


def expected_zero_extents(qemu_img_map, path, fmt):
    """Extents as qemu-img map sees them: present=false is a hole."""
    return extents.merge([
        extents.ZeroExtent(e["start"], e["length"],
                           zero=e["zero"], hole=not e["present"])
        for e in qemu_img_map(path, fmt)
    ])


@pytest.fixture(params=["raw", "qcow2"])
def image(request, make_image):
    fmt = request.param
    return make_image(fmt=fmt, size=4 * M, commands=COMMANDS), fmt


@pytest.fixture
def served(image, qemu_nbd):
    path, fmt = image
    return qemu_nbd(path, fmt=fmt)


@pytest.fixture
def memory(nbdkit):
    return nbdkit("memory", "size=4M")


# Connecting and capabilities


def test_capabilities(make_image, qemu_nbd):
    path = make_image(fmt="qcow2", size=4 * M)
    server = qemu_nbd(path, fmt="qcow2")
    with client.open(server.address) as c:
        assert c.size == 4 * M
        assert not c.read_only
        assert c.can_zero
        assert c.can_flush
        assert c.can_trim
        assert c.can_multi_conn
        assert c.minimum_block_size == 1
        assert c.preferred_block_size == 4096
        assert c.maximum_block_size == 32 * M
        assert c.has_base_allocation
        assert c.has_allocation_depth
        assert c.dirty_bitmap is None
        assert c.export_name == ""
        assert c.address == server.address


def test_capabilities_read_only(make_image, qemu_nbd):
    path = make_image(size=M)
    server = qemu_nbd(path, read_only=True, allocation_depth=False)
    with client.open(server.address) as c:
        assert c.read_only
        assert not c.has_allocation_depth
        with pytest.raises(client.Error) as e:
            c.write(b"x" * 512, 0)
        assert e.value.op == "write"
        assert e.value.errno == errno.EPERM


def test_block_sizes_from_server(nbdkit):
    server = nbdkit(
        "memory", "size=1M", "blocksize-minimum=512",
        "blocksize-preferred=8K", "blocksize-maximum=64K",
        filters=["blocksize-policy"])
    with client.open(server.address) as c:
        assert c.minimum_block_size == 512
        assert c.preferred_block_size == 8 * K
        assert c.maximum_block_size == 64 * K


def test_block_sizes_defaults(memory):
    with client.open(memory.address) as c:
        # nbdkit memory advertises no block sizes.
        assert c.minimum_block_size == client.DEFAULT_MINIMUM_BLOCK_SIZE
        assert c.preferred_block_size == client.DEFAULT_PREFERRED_BLOCK_SIZE
        assert c.maximum_block_size == client.DEFAULT_MAXIMUM_BLOCK_SIZE


def test_open_missing_socket(sock_dir):
    address = url.Address(socket=os.path.join(sock_dir, "missing.sock"))
    with pytest.raises(client.Error) as e:
        client.open(address)
    assert e.value.op == "connect"
    assert e.value.errno == errno.ENOENT
    assert "missing.sock" in str(e.value)


def test_open_wrong_export_name(make_image, qemu_nbd):
    server = qemu_nbd(make_image(size=M))
    address = url.Address(socket=server.socket, export="wrong")
    with pytest.raises(client.Error) as e:
        client.open(address)
    assert e.value.op == "connect"


def test_open_tcp(nbdkit):
    server = nbdkit("memory", "size=1M", tcp=True)
    assert not server.address.is_unix
    with client.open(server.address) as c:
        c.write(b"tcp!", 0)
        assert c.read(4, 0) == b"tcp!"


def test_close_twice_and_use_after_close(memory):
    c = client.open(memory.address)
    c.close()
    c.close()
    with pytest.raises(ValueError):
        c.read(1, 0)
    with pytest.raises(ValueError):
        c.read_into(bytearray(1), 0)
    with pytest.raises(ValueError):
        c.flush()


# Reading and writing


def test_read_image_content(served):
    with client.open(served.address) as c:
        assert c.read(64 * K, 0) == b"\x55" * 64 * K
        assert c.read(64 * K, M) == b"\0" * 64 * K
        assert c.read(128 * K, 2 * M) == b"\xaa" * 128 * K
        assert c.read(4 * K, 3 * M) == b"\0" * 4 * K


def test_write_read_round_trip(served):
    data = os.urandom(256 * K)
    with client.open(served.address) as c:
        c.write(data, 1 * M - 100 * K)
        c.flush()
        assert c.read(len(data), 1 * M - 100 * K) == data
        buf = bytearray(len(data))
        c.read_into(buf, 1 * M - 100 * K)
        assert buf == data


def test_write_fua(memory):
    with client.open(memory.address) as c:
        assert c.can_fua
        c.write(b"fua!" * K, 0, fua=True)
        assert c.read(4 * K, 0) == b"fua!" * K


def test_write_persists_to_image(image, qemu_nbd, qemu_io):
    path, fmt = image
    server = qemu_nbd(path, fmt=fmt)
    with client.open(server.address) as c:
        c.write(b"\x77" * 64 * K, 3 * M)
        c.flush()
    server.stop()
    # qemu-io fails if the pattern does not match.
    qemu_io(path, fmt, "read -P 0x77 3M 64k")


def test_read_into_memoryview_slice(memory):
    with client.open(memory.address) as c:
        c.write(b"abcdefgh", 0)
        buf = bytearray(b"-" * 16)
        c.read_into(memoryview(buf)[4:12], 0)
        assert buf == b"----abcdefgh----"


def test_read_into_non_byte_format(memory):
    with client.open(memory.address) as c:
        c.write(b"\x01\x00\x00\x00\x02\x00\x00\x00", 0)
        buf = memoryview(bytearray(8)).cast("I")
        c.read_into(buf, 0)
        assert buf.tolist() == [1, 2]


def test_read_into_readonly_buffer(memory):
    with client.open(memory.address) as c:
        with pytest.raises(TypeError):
            c.read_into(b"immutable", 0)


def test_read_zero_length(memory):
    with client.open(memory.address) as c:
        assert c.read(0, 0) == b""
        c.read_into(bytearray(0), 0)


def test_read_into_does_not_allocate(memory):
    with client.open(memory.address) as c:
        c.write(b"\x42" * 4 * M, 0)
        buf = bytearray(4 * M)
        c.read_into(buf, 0)  # Warm up.
        tracemalloc.start()
        try:
            c.read_into(buf, 0)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert buf == b"\x42" * 4 * M
        # pread() would allocate a new 4 MiB bytes object.
        assert peak < 64 * K


def test_split_at_server_maximum(nbdkit):
    # The server refuses requests larger than 64k; reads and writes of
    # 1 MiB must be split.
    server = nbdkit(
        "memory", "size=2M", "blocksize-maximum=64K",
        "blocksize-error-policy=error", filters=["blocksize-policy"])
    data = os.urandom(M + 3 * K)
    with client.open(server.address) as c:
        assert c.maximum_block_size == 64 * K
        c.write(data, 5 * K)
        buf = bytearray(len(data))
        c.read_into(buf, 5 * K)
        assert buf == data
        assert c.read(len(data), 5 * K) == data


def test_read_larger_than_qemu_nbd_maximum(make_image, qemu_nbd):
    # qemu-nbd accepts at most 32 MiB per request; 40 MiB must be split.
    path = make_image(size=48 * M, commands=(
        "write -P 0x11 0 1M",
        "write -P 0x22 31M 2M",
        "write -P 0x33 39M 1M"))
    server = qemu_nbd(path)
    with client.open(server.address) as c:
        buf = bytearray(40 * M)
        c.read_into(buf, 0)
        assert buf[:M] == b"\x11" * M
        assert buf[31 * M:33 * M] == b"\x22" * 2 * M
        assert buf[39 * M:] == b"\x33" * M
        assert buf[M:31 * M].count(0) == 30 * M


# Zero


def test_zero(served):
    with client.open(served.address) as c:
        c.zero(32 * K, 16 * K)
        c.zero(64 * K, 2 * M + 32 * K, punch_hole=True)
        assert c.read(64 * K, 0) == (
            b"\x55" * 16 * K + b"\0" * 32 * K + b"\x55" * 16 * K)
        assert c.read(128 * K, 2 * M) == (
            b"\xaa" * 32 * K + b"\0" * 64 * K + b"\xaa" * 32 * K)


def test_zero_keeps_allocation_unless_punch_hole(make_image, qemu_nbd):
    path = make_image(size=4 * M, commands=("write -P 0x55 0 4M",))
    server = qemu_nbd(path)
    allocated = os.stat(path).st_blocks
    with client.open(server.address) as c:
        c.zero(2 * M, 0)
        c.flush()
        assert os.stat(path).st_blocks == allocated
        c.zero(2 * M, 0, punch_hole=True)
        c.flush()
        assert os.stat(path).st_blocks <= allocated - 2 * M // 512
        assert c.read(4 * M, 0) == b"\0" * 2 * M + b"\x55" * 2 * M


def test_zero_requests(nbdkit, sock_dir):
    # Zero of 2.5 GiB: requests of at most 1 GiB with NO_HOLE, as the
    # server's log shows.
    log = os.path.join(sock_dir, "log")
    server = nbdkit("memory", "size=3G", f"logfile={log}", filters=["log"])
    with client.open(server.address) as c:
        c.zero(2 * 1024**3 + 512 * M, 256 * M)
        c.zero(M, 0, punch_hole=True)
    with open(log) as f:
        zeros = [line for line in f if " Zero id=" in line]
    assert len(zeros) == 4
    assert "offset=0x10000000 count=0x40000000 trim=0 " in zeros[0]
    assert "offset=0x50000000 count=0x40000000 trim=0 " in zeros[1]
    assert "offset=0x90000000 count=0x20000000 trim=0 " in zeros[2]
    assert "offset=0x0 count=0x100000 trim=1 " in zeros[3]


def test_zero_without_server_zero(nbdkit):
    server = nbdkit("memory", "size=16M", filters=["nozero"])
    with client.open(server.address) as c:
        assert not c.can_zero
        c.write(b"\x99" * 10 * M, 0)
        c.zero(9 * M, 512 * K)
        assert c.read(10 * M, 0) == (
            b"\x99" * 512 * K + b"\0" * 9 * M + b"\x99" * 512 * K)


# Flush


def test_flush_without_server_flush(nbdkit):
    server = nbdkit(
        "eval", "get_size=echo 1048576",
        "pread=head -c $3 /dev/zero", "pwrite=cat >/dev/null")
    with client.open(server.address) as c:
        assert not c.can_flush
        assert not c.can_fua
        c.flush()
        c.write(b"x" * 512, 0, fua=True)


# Extents


def test_zero_extents_match_qemu_img_map(image, qemu_nbd, qemu_img_map):
    path, fmt = image
    server = qemu_nbd(path, fmt=fmt)
    with client.open(server.address) as c:
        found = c.extents("zero")
    assert found == expected_zero_extents(qemu_img_map, path, fmt)
    assert found[0].start == 0
    assert found[-1].start + found[-1].length == 4 * M


def test_zero_extents_qcow2_holes(make_image, qemu_nbd):
    path = make_image(fmt="qcow2", size=4 * M, commands=COMMANDS)
    server = qemu_nbd(path, fmt="qcow2")
    with client.open(server.address) as c:
        found = [e.to_dict() for e in c.extents()]
    Z = extents.ZeroExtent
    assert found == [e.to_dict() for e in [
        Z(0, 64 * K, zero=False, hole=False),
        Z(64 * K, 960 * K, zero=True, hole=True),
        Z(M, 64 * K, zero=True, hole=False),
        Z(M + 64 * K, 960 * K, zero=True, hole=True),
        Z(2 * M, 128 * K, zero=False, hole=False),
        Z(2 * M + 128 * K, 2 * M - 128 * K, zero=True, hole=True),
    ]]


def test_zero_extents_in_small_requests(image, qemu_nbd, qemu_img_map,
                                        monkeypatch):
    # Many block status calls, each replying for part of the image.
    monkeypatch.setattr(client, "MAX_BLOCK_STATUS", 48 * K)
    path, fmt = image
    server = qemu_nbd(path, fmt=fmt)
    with client.open(server.address) as c:
        assert c.extents() == expected_zero_extents(qemu_img_map, path, fmt)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_zero_extents_without_allocation_depth(make_image, qemu_nbd, fmt):
    # How vdsm exports raw volumes. base:allocation's HOLE does not say
    # "unallocated in this layer", so nothing is a hole: a download on
    # top of a backing file must zero these ranges, not skip them.
    path = make_image(fmt=fmt, size=4 * M, commands=COMMANDS)
    server = qemu_nbd(path, fmt=fmt, allocation_depth=False)
    with client.open(server.address) as c:
        assert not c.has_allocation_depth
        found = c.extents()
    Z = extents.ZeroExtent
    assert found == [
        Z(0, 64 * K, zero=False, hole=False),
        Z(64 * K, 2 * M - 64 * K, zero=True, hole=False),
        Z(2 * M, 128 * K, zero=False, hole=False),
        Z(2 * M + 128 * K, 2 * M - 128 * K, zero=True, hole=False),
    ]


def test_zero_extents_without_base_allocation(nbdkit):
    # Without structured replies there are no meta contexts.
    server = nbdkit("memory", "size=3M", options=["--no-sr"])
    with client.open(server.address) as c:
        assert not c.has_base_allocation
        assert c.extents() == [
            extents.ZeroExtent(0, 3 * M, zero=False, hole=False)]


def test_zero_extents_unaligned_size(make_image, qemu_nbd):
    path = make_image(size=M + 512, commands=("write -P 1 1M 512",))
    server = qemu_nbd(path)
    with client.open(server.address) as c:
        found = c.extents()
    assert found[-1].start + found[-1].length == M + 512
    assert found[-1].zero is False


def test_extents_bad_context(memory):
    with client.open(memory.address) as c:
        with pytest.raises(ValueError) as e:
            c.extents("foo")
        assert "'foo'" in str(e.value)


def test_dirty_extents(make_image, qemu_nbd, qemu_io):
    path = make_image(fmt="qcow2", size=4 * M,
                      commands=("write -P 1 0 1M",))
    add_bitmap(path, "b0")
    qemu_io(path, "qcow2", "write -P 2 512k 64k", "write -z 3M 64k")
    server = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    with client.open(server.address, dirty=True) as c:
        assert c.dirty_bitmap == "b0"
        found = c.extents("dirty")
    D = extents.DirtyExtent
    assert found == [
        D(0, 512 * K, dirty=False, zero=False),
        D(512 * K, 64 * K, dirty=True, zero=False),
        D(576 * K, 448 * K, dirty=False, zero=False),
        D(M, 2 * M, dirty=False, zero=True),
        D(3 * M, 64 * K, dirty=True, zero=True),
        D(3 * M + 64 * K, M - 64 * K, dirty=False, zero=True),
    ]
    assert found[1].to_dict() == {
        "start": 512 * K, "length": 64 * K, "dirty": True, "zero": False}


def test_dirty_extents_zero_context_still_works(make_image, qemu_nbd):
    path = make_image(fmt="qcow2", size=4 * M, commands=COMMANDS,
                      bitmaps=["b0"])
    server = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    with client.open(server.address, dirty=True) as c:
        assert c.has_base_allocation
        assert c.has_allocation_depth
        assert c.extents("zero")[0] == extents.ZeroExtent(
            0, 64 * K, zero=False, hole=False)
        # Everything written after the bitmap was added is dirty.
        dirty = [e for e in c.extents("dirty") if e.dirty]
        assert [(e.start, e.length) for e in dirty] == [
            (0, 64 * K), (M, 64 * K), (2 * M, 128 * K)]


def test_dirty_extents_without_dirty_flag(make_image, qemu_nbd):
    path = make_image(fmt="qcow2", size=M, bitmaps=["b0"])
    server = qemu_nbd(path, fmt="qcow2", read_only=True, bitmap="b0")
    with client.open(server.address) as c:
        assert c.dirty_bitmap is None
        with pytest.raises(errors.Unsupported):
            c.extents("dirty")


def test_dirty_extents_without_bitmap(make_image, qemu_nbd):
    server = qemu_nbd(make_image(fmt="qcow2", size=M), fmt="qcow2")
    with client.open(server.address, dirty=True) as c:
        assert c.dirty_bitmap is None
        with pytest.raises(errors.Unsupported) as e:
            c.extents("dirty")
    assert str(e.value) == (
        "Operation not supported: NBD export '' does not support dirty "
        "extents")


def test_dirty_extents_two_bitmaps(make_image, sock_dir, wait_for):
    # start() exports one bitmap; qemu-nbd can export several.
    path = make_image(fmt="qcow2", size=M, bitmaps=["b0", "b1"])
    sock = os.path.join(sock_dir, "two.sock")
    proc = subprocess.Popen(
        ["qemu-nbd", "--format=qcow2", f"--socket={sock}", "--read-only",
         "--persistent", "--shared=4", "--bitmap=b0", "--bitmap=b1", path],
        stderr=subprocess.DEVNULL)
    try:
        address = url.Address(socket=sock)
        wait_for(lambda: can_connect(address), message="qemu-nbd")
        with client.open(address, dirty=True) as c:
            assert c.dirty_bitmap is None
            with pytest.raises(errors.Unsupported):
                c.extents("dirty")
    finally:
        proc.terminate()
        proc.wait()


def test_dirty_extents_nbdkit_has_no_bitmaps(memory):
    with client.open(memory.address, dirty=True) as c:
        assert c.dirty_bitmap is None
        assert c.has_base_allocation
        with pytest.raises(errors.Unsupported):
            c.extents("dirty")


# Errors


@pytest.mark.parametrize("args,call,op,offset,length,code", [
    pytest.param(
        ["error-pread=EIO", "error-pread-rate=1"],
        lambda c: c.read(4 * K, 8 * K),
        "read", 8 * K, 4 * K, errno.EIO, id="read"),
    pytest.param(
        ["error-pread=EIO", "error-pread-rate=1"],
        lambda c: c.read_into(bytearray(4 * K), 8 * K),
        "read", 8 * K, 4 * K, errno.EIO, id="read_into"),
    pytest.param(
        ["error-pwrite=ENOSPC", "error-pwrite-rate=1"],
        lambda c: c.write(b"x" * 512, K),
        "write", K, 512, errno.ENOSPC, id="write"),
    pytest.param(
        ["error-zero=EPERM", "error-zero-rate=1"],
        lambda c: c.zero(64 * K, 128 * K),
        "zero", 128 * K, 64 * K, errno.EPERM, id="zero"),
    pytest.param(
        ["error-extents=EIO", "error-extents-rate=1"],
        lambda c: c.extents(),
        "block_status", 0, M, errno.EIO, id="block_status"),
])
def test_errors(nbdkit, args, call, op, offset, length, code):
    server = nbdkit("memory", "size=1M", *args, filters=["error"])
    with client.open(server.address) as c:
        with pytest.raises(client.Error) as e:
            call(c)
        # The connection is still usable after a failed request.
        c.flush()
    err = e.value
    assert isinstance(err, OSError)
    assert (err.op, err.offset, err.length, err.errno) == (
        op, offset, length, code)
    text = str(err)
    assert op in text
    assert f"offset={offset}" in text
    assert f"length={length}" in text
    assert errno.errorcode[code] in text


def test_error_among_requests_in_flight(nbdkit):
    # 16 reads of 64k in flight, all failing: one error is raised after
    # all of them completed, and the connection stays in sync.
    server = nbdkit(
        "memory", "size=2M", "blocksize-maximum=64K", "error-pread=EIO",
        "error-pread-rate=1", filters=["error", "blocksize-policy"])
    with client.open(server.address) as c:
        with pytest.raises(client.Error) as e:
            c.read_into(bytearray(M), 0)
        assert e.value.op == "read"
        assert e.value.errno == errno.EIO
        assert e.value.offset % (64 * K) == 0
        assert e.value.length == 64 * K
        c.write(b"after", 0)
        c.flush()


def test_error_submitting_waits_for_submitted(nbdkit):
    # The last chunk is out of bounds: libnbd refuses it at once, after
    # the first chunks were submitted; those complete and fill buf.
    server = nbdkit(
        "memory", "size=1M", "blocksize-maximum=64K",
        filters=["blocksize-policy"])
    with client.open(server.address) as c:
        c.write(b"\x42" * 256 * K, M - 256 * K)
        buf = bytearray(256 * K + 64 * K)
        with pytest.raises(client.Error) as e:
            c.read_into(buf, M - 256 * K)
        assert (e.value.op, e.value.offset, e.value.length) == (
            "read", M, 64 * K)
        assert e.value.errno == errno.EINVAL
        assert buf[:256 * K] == b"\x42" * 256 * K
        assert c.read(4, M - 4) == b"\x42" * 4


def test_error_str():
    err = client.Error("read", 4096, 512, errno.EIO, "nbd_pread: failed")
    assert str(err) == (
        "NBD read failed: offset=4096 length=512 errno=EIO: nbd_pread: failed")
    assert client.Error("connect", 0, 0, 0, "x").__str__().endswith(
        "errno=none: x")


def test_read_past_end(memory):
    with client.open(memory.address) as c:
        with pytest.raises(client.Error) as e:
            c.read(2, 4 * M - 1)
        assert e.value.errno == errno.EINVAL


def test_dead_server(nbdkit):
    server = nbdkit("memory", "size=1M")
    c = client.open(server.address)
    try:
        server.proc.kill()
        server.proc.wait()
        with pytest.raises(client.Error) as e:
            c.read_into(bytearray(4 * K), 0)
        assert e.value.op == "read"
    finally:
        c.close()


# Concurrency


def test_read_releases_gil(nbdkit):
    """
    While one thread waits 0.5 s for a delayed read, another keeps running
    Python code: the wait releases the GIL.
    """
    delay = 0.5
    server = nbdkit("memory", "size=1M", "rdelay=500ms", filters=["delay"])
    window = {}

    def read():
        with client.open(server.address) as c:
            buf = bytearray(4 * K)
            window["start"] = time.monotonic()
            c.read_into(buf, 0)
            window["end"] = time.monotonic()

    reader = threading.Thread(target=read)
    reader.start()
    ticks = []
    while reader.is_alive():
        for _ in range(1000):
            pass
        ticks.append(time.monotonic())
    reader.join()

    assert window["end"] - window["start"] >= delay * 0.9
    inside = [t for t in ticks
              if window["start"] + 0.1 < t < window["end"] - 0.1]
    # With the GIL held during the read, no tick could happen inside.
    assert len(inside) > 10


def test_parallel_connections(served):
    results = []

    def work(i):
        with client.open(served.address) as c:
            data = bytes([i]) * 64 * K
            c.write(data, 3 * M + i * 64 * K)
            results.append(c.read(64 * K, 3 * M + i * 64 * K) == data)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


def test_shared_client_is_serialized(memory):
    # Threads sharing one Client neither deadlock nor mix replies.
    with client.open(memory.address) as c:
        for i in range(8):
            c.write(bytes([i]) * 64 * K, i * 64 * K)
        failures = []

        def work(i):
            buf = bytearray(64 * K)
            for _ in range(20):
                c.read_into(buf, i * 64 * K)
                if buf != bytes([i]) * 64 * K:
                    failures.append(i)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []


# Helpers


def add_bitmap(path, name):
    subprocess.run(
        ["qemu-img", "bitmap", "--add", "-f", "qcow2", path, name],
        check=True)


def can_connect(address):
    try:
        client.open(address).close()
    except client.Error:
        return False
    return True


def test_zero_extents_short_replies(nbdkit, monkeypatch):
    # nbdkit's blocksize filter answers block status for at most maxlen
    # bytes: every window's reply is short, and the rest of the window is
    # asked again before the next window is used.
    monkeypatch.setattr(client, "MAX_BLOCK_STATUS", 256 * K)
    srv = nbdkit("memory", "size=1M", "maxlen=64K", filters=["blocksize"])
    with client.open(srv.address) as c:
        # The memory plugin allocates in 32 KiB pages.
        c.write(b"x" * 4096, 320 * K)
        c.write(b"y" * 4096, 704 * K)
        found = c.extents()
    assert [(e.start, e.length, e.zero) for e in found] == [
        (0, 320 * K, True),
        (320 * K, 32 * K, False),
        (352 * K, 352 * K, True),
        (704 * K, 32 * K, False),
        (736 * K, 288 * K, True),
    ]


# A hung server: timeouts and interrupts.

def open_fds():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("dirty", [False, True], ids=["plain", "dirty"])
def test_open_timeout(nbdkit, dirty):
    server = nbdkit("memory", "size=1M", "delay-open=1000",
                    filters=["delay"])
    before = open_fds()
    with pytest.raises(client.Error) as e:
        client.open(server.address, dirty=dirty, timeout=0.5)
    assert e.value.op == "connect"
    assert e.value.errno == errno.ETIMEDOUT
    assert open_fds() == before


@pytest.mark.parametrize("call,op", [
    (lambda c: c.read_into(bytearray(4 * K), 0), "read"),
    (lambda c: c.read(4 * K, 0), "read"),
    (lambda c: c.write(b"x" * 4 * K, 0), "write"),
    (lambda c: c.zero(4 * K, 0), "zero"),
    (lambda c: c.extents("zero"), "block_status"),
], ids=["read_into", "read", "write", "zero", "extents"])
def test_io_timeout(nbdkit, call, op):
    server = nbdkit("memory", "size=1M", "delay-read=1000",
                    "delay-write=1000", "delay-zero=1000",
                    "delay-extents=1000", filters=["delay"])
    before = open_fds()
    c = client.open(server.address, timeout=0.5)
    try:
        with pytest.raises(client.Error) as e:
            call(c)
        assert e.value.op == op
        assert e.value.errno == errno.ETIMEDOUT
        assert "did not respond within 0.5 seconds" in str(e.value)
    finally:
        # Closing does not wait for the hung server.
        c.close()
    # The error's traceback holds the handle, and libnbd's descriptor.
    del e
    assert open_fds() == before


@pytest.mark.parametrize("call", [
    lambda c: c.read_into(bytearray(4 * K), 0),
    lambda c: c.write(b"x" * 4 * K, 0),
    lambda c: c.zero(4 * K, 0),
    lambda c: c.extents("zero"),
], ids=["read", "write", "zero", "extents"])
def test_interrupt_blocked_io(nbdkit, call):
    server = nbdkit("memory", "size=1M", "delay-read=1000",
                    "delay-write=1000", "delay-zero=1000",
                    "delay-extents=1000", filters=["delay"])
    before = open_fds()
    interrupt = client.Interrupt()
    c = client.open(server.address, interrupt=interrupt)
    failed = []

    def run():
        try:
            call(c)
        except client.Error as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        t.join(0.2)
        assert t.is_alive()
        interrupt.fire()
        t.join(10)
        assert not t.is_alive()
        assert failed[0].errno == errno.ECANCELED
        assert "interrupted" in str(failed[0])
    finally:
        # Closing does not wait for the hung server.
        c.close()
    assert open_fds() == before


@pytest.mark.parametrize("dirty", [False, True], ids=["plain", "dirty"])
def test_interrupt_open(nbdkit, dirty):
    server = nbdkit("memory", "size=1M", "delay-open=1000",
                    filters=["delay"])
    before = open_fds()
    interrupt = client.Interrupt()
    failed = []

    def run():
        try:
            client.open(server.address, dirty=dirty, interrupt=interrupt)
        except client.Error as e:
            failed.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(0.2)
    assert t.is_alive()
    interrupt.fire()
    t.join(10)
    assert not t.is_alive()
    assert failed[0].errno == errno.ECANCELED
    assert open_fds() == before


def test_interrupted_before_open(nbdkit):
    server = nbdkit("memory", "size=1M")
    interrupt = client.Interrupt()
    interrupt.fire()
    with pytest.raises(client.Error) as e:
        client.open(server.address, interrupt=interrupt)
    assert e.value.errno == errno.ECANCELED
