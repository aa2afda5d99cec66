"""
Checksums (API.md 1.6): the blkhash construction against a naive oracle,
vectors and the live output of upstream ovirt-imageio 2.5.1, over fake
images and real NBD exports.
"""

import collections
import hashlib
import subprocess

import pytest

from ovirt_imageio import checksum
from ovirt_imageio import errors
from ovirt_imageio.nbd import client

MiB = 1024**2

Extent = collections.namedtuple("Extent", "start,length,zero,hole")


class Image:
    """An in-memory image recording its reads and the buffers used."""

    def __init__(self, data, extents=None):
        self.data = bytes(data)
        self.size = len(self.data)
        if extents is None:
            extents = [Extent(0, self.size, False, False)]
        self._extents = extents
        self.reads = []
        self.buffers = set()

    def read_into(self, buf, offset):
        view = memoryview(buf)
        self.buffers.add(id(view.obj))
        view[:] = self.data[offset:offset + len(view)]
        self.reads.append((offset, len(view)))

    def extents(self, context):
        assert context == "zero"
        return self._extents


def naive(data, algorithm, block_size):
    """The construction, written the obvious way: hash every block."""
    kw = {"digest_size": 32} if algorithm.startswith("blake2") else {}
    outer = hashlib.new(algorithm, **kw)
    for i in range(0, len(data), block_size):
        outer.update(
            hashlib.new(algorithm, data[i:i + block_size], **kw).digest())
    return outer.hexdigest()


PATTERN = bytes(range(256)) * 4096 * 3  # 3 MiB, no zero blocks.


# Vectors printed by upstream 2.5.1's checksum.compute() over an in-memory
# backend, so they hold even where the anchor venv is missing.
@pytest.mark.parametrize("data,extents,block_size,algorithm,expected", [
    (PATTERN, None, MiB, "blake2b",
     "6d887963409c0137bc0a074f6841cdd2d85eb9ef53613de492a6bd4f6c857374"),
    (PATTERN, None, MiB, "sha256",
     "12b75ff6d718b30df9e98a1ef26bfd70522528093fc2a1bacf5c4c989925859a"),
    (PATTERN, None, MiB, "blake2s",
     "250a1a9489d5ead39b063a41e7b78dd80cecd6d654b5d450101dee207e56ec89"),
    (PATTERN, None, MiB, "sha1",
     "0f073170123e513eeedaec16bb6bab1841c47119"),
    (PATTERN, None, MiB, "md5",
     "31e0f4697bc201e636f9455db8882a23"),
    (b"x" * (MiB + 4096), None, MiB, "blake2b",
     "32d03456e3235f6bd8fe945197e781c423ee8b4a925a9e7986bd125f2bf82b93"),
    (bytes(2 * MiB), [Extent(0, 2 * MiB, True, True)], MiB, "blake2b",
     "1ef6e64709c8dcf9a2bdb63de33335dcd64febdc6657a3c14ce7bd3ad50af011"),
    (b"", [], MiB, "blake2b",
     "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8"),
    (b"x" * 10000, None, 4096, "blake2b",
     "72f77682a7ab00ee52bff548b42386ff5e7eb216dda80e1559f33d6ff868e7b8"),
    (b"x" * 10000, None, 4096, "sha256",
     "1d910d634395302660a6c59f5c8cf8436b72a3851ff1e585a475761e156877aa"),
], ids=[
    "blake2b", "sha256", "blake2s", "sha1", "md5", "short-last-block",
    "all-zero", "empty", "small-blocks-blake2b", "small-blocks-sha256",
])
def test_upstream_vectors(data, extents, block_size, algorithm, expected):
    image = Image(data, extents)
    result = checksum.compute(image, algorithm, block_size)
    assert result == {"algorithm": algorithm, "block_size": block_size,
                      "checksum": expected}


@pytest.mark.parametrize("algorithm", checksum.ALGORITHMS)
def test_algorithms_match_naive(algorithm):
    # A short last block, a zero block found by reading, and data.
    data = PATTERN[:MiB] + bytes(MiB) + PATTERN[:12345]
    image = Image(data)
    result = checksum.compute(image, algorithm, MiB)
    assert result["checksum"] == naive(data, algorithm, MiB)


@pytest.mark.parametrize("size,block_size,lengths", [
    (4 * MiB, MiB, [MiB] * 4),
    (4 * MiB + 4096, MiB, [MiB] * 4 + [4096]),
    (3 * MiB + 1, 2 * MiB, [2 * MiB, MiB + 1]),
    (4096, MiB, [4096]),
    (1, MiB, [1]),
    (0, MiB, []),
], ids=["aligned", "short-last", "odd", "smaller-than-block", "one-byte",
        "empty"])
def test_blocks_and_progress(size, block_size, lengths):
    data = (PATTERN * 2)[:size]
    image = Image(data)
    seen = []
    result = checksum.compute(image, "sha256", block_size,
                              progress=seen.append)
    assert seen == lengths
    assert sum(seen) == size
    assert result["checksum"] == naive(data, "sha256", block_size)
    offsets = [i * block_size for i in range(len(lengths))]
    assert image.reads == list(zip(offsets, lengths))


def test_one_buffer_for_all_reads():
    image = Image(PATTERN * 3)
    checksum.compute(image, "blake2b", MiB)
    assert len(image.reads) == 9
    assert len(image.buffers) == 1


def test_zero_extents_not_read():
    # data | zero zero | data+zero | zero (short)
    size = 4 * MiB + 8192
    data = bytearray(size)
    data[:MiB] = PATTERN[:MiB]
    data[3 * MiB:3 * MiB + 4096] = b"x" * 4096
    extents = [
        Extent(0, MiB, False, False),
        Extent(MiB, 2 * MiB, True, True),
        Extent(3 * MiB, 4096, False, False),
        Extent(3 * MiB + 4096, MiB - 4096 + 8192, True, False),
    ]
    image = Image(data, extents)
    seen = []
    result = checksum.compute(image, "blake2b", MiB, progress=seen.append)
    assert image.reads == [(0, MiB), (3 * MiB, MiB)]
    assert seen == [MiB] * 4 + [8192]
    assert result["checksum"] == naive(bytes(data), "blake2b", MiB)


def test_zero_extents_same_as_allocated():
    size = 6 * MiB + 4096
    data = bytearray(size)
    data[2 * MiB:3 * MiB] = PATTERN[:MiB]
    sparse = Image(data, [
        Extent(0, 2 * MiB, True, True),
        Extent(2 * MiB, MiB, False, False),
        Extent(3 * MiB, size - 3 * MiB, True, False),
    ])
    allocated = Image(data)
    a = checksum.compute(sparse, "blake2b", 2 * MiB)
    b = checksum.compute(allocated, "blake2b", 2 * MiB)
    assert a == b
    assert len(sparse.reads) == 1
    assert len(allocated.reads) == 4


def test_all_zero_image():
    size = 5 * MiB + 512
    extents = [Extent(0, 3 * MiB, True, True),
               Extent(3 * MiB, size - 3 * MiB, True, False)]
    image = Image(bytes(size), extents)
    result = checksum.compute(image)
    assert image.reads == []
    assert result == {
        "algorithm": "blake2b",
        "block_size": 4 * MiB,
        "checksum": naive(bytes(size), "blake2b", 4 * MiB),
    }


@pytest.mark.parametrize("extents,reads", [
    # A data extent inside a zero block makes it a data block.
    ([Extent(0, 4096, True, True), Extent(4096, 4096, False, False),
      Extent(8192, 2 * MiB - 8192, True, True)], [(0, MiB)]),
    # Many small zero extents make a zero block.
    ([Extent(i, 4096, True, i % 8192 == 0) for i in range(0, 2 * MiB, 4096)],
     []),
    # A gap is not known to be zero: read.
    ([Extent(0, MiB - 4096, True, True), Extent(MiB, MiB, True, True)],
     [(0, MiB)]),
    # Extents ending early: the rest is read.
    ([Extent(0, MiB, True, True)], [(MiB, MiB)]),
    # No extents at all: everything is read.
    ([], [(0, MiB), (MiB, MiB)]),
    # Extents past the end are ignored.
    ([Extent(0, 4 * MiB, True, True)], []),
    # Empty extents are harmless.
    ([Extent(0, 0, False, False), Extent(0, 2 * MiB, True, True),
      Extent(2 * MiB, 0, False, False)], []),
], ids=["data-inside-zero-block", "small-zero-extents", "gap",
        "short-extents", "no-extents", "past-end", "empty-extents"])
def test_extents_to_blocks(extents, reads):
    data = bytes(2 * MiB)
    image = Image(data, extents)
    result = checksum.compute(image, "sha1", MiB)
    assert image.reads == reads
    assert result["checksum"] == naive(data, "sha1", MiB)


def test_progress_raising_stops():
    class Stop(Exception):
        pass

    image = Image(PATTERN * 4)
    seen = []

    def progress(n):
        seen.append(n)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        checksum.compute(image, "blake2b", MiB, progress=progress)
    assert seen == [MiB, MiB]
    assert image.reads == [(0, MiB), (MiB, MiB)]


def test_read_error_propagates():
    class Broken(Image):
        def read_into(self, buf, offset):
            raise OSError("read failed")

    with pytest.raises(OSError, match="read failed"):
        checksum.compute(Broken(PATTERN), "blake2b", MiB)


# Algorithms


def test_algorithms():
    assert checksum.ALGORITHMS == sorted(checksum.ALGORITHMS)
    assert set(checksum.ALGORITHMS) <= hashlib.algorithms_available
    assert "blake2b" in checksum.ALGORITHMS
    assert checksum.DEFAULT_ALGORITHM in checksum.ALGORITHMS
    # Extendable-output functions have no digest length: excluded.
    assert not any(a.startswith("shake") for a in checksum.ALGORITHMS)
    # Everything else available is offered, also the algorithms hashlib
    # knows only by name (upstream fails on those with getattr).
    expected = {a for a in hashlib.algorithms_available
                if not a.startswith("shake")}
    assert set(checksum.ALGORITHMS) == expected


@pytest.mark.parametrize("algorithm", ["shake_128", "shake_256", "nope", ""])
def test_compute_unsupported_algorithm(algorithm):
    with pytest.raises(checksum.InvalidArgument) as e:
        checksum.compute(Image(PATTERN), algorithm, MiB)
    assert str(e.value) == (
        f"Unsupported value {algorithm!r} for 'algorithm', expecting one "
        f"of {checksum.ALGORITHMS}")


def test_compute_invalid_block_size():
    with pytest.raises(checksum.InvalidArgument):
        checksum.compute(Image(PATTERN), "blake2b", 0)


def test_invalid_argument_is_domain_error():
    e = checksum.InvalidArgument("Block size is not aligned to 4096")
    assert isinstance(e, errors.Error)
    assert isinstance(e, ValueError)
    assert str(e) == "Block size is not aligned to 4096"


# validate()


@pytest.mark.parametrize("algorithm,block_size,expected", [
    (None, None, ("blake2b", 4 * MiB)),
    ("sha1", None, ("sha1", 4 * MiB)),
    (None, "1048576", ("blake2b", MiB)),
    ("sha256", "16777216", ("sha256", 16 * MiB)),
    ("blake2s", "8392704", ("blake2s", 8 * MiB + 4096)),
    (None, 2 * MiB, ("blake2b", 2 * MiB)),
    # int() as upstream.
    (None, " 2097152 ", ("blake2b", 2 * MiB)),
    (None, "2_097_152", ("blake2b", 2 * MiB)),
    (None, "0" * 100 + "2097152", ("blake2b", 2 * MiB)),
], ids=["defaults", "algorithm", "min-block-size", "max-block-size",
        "aligned", "int", "spaces", "underscores", "leading-zeros"])
def test_validate(algorithm, block_size, expected):
    assert checksum.validate(algorithm, block_size) == expected


ALLOWED = "Block size out of allowed range: 1048576-16777216"
UNALIGNED = "Block size is not aligned to 4096"


@pytest.mark.parametrize("algorithm,block_size,message", [
    ("nope", None, None),
    ("shake_128", None, None),
    ("BLAKE2B", None, None),
    ("", None, None),
    (None, "abc", "Invalid block size: 'abc'"),
    (None, "", "Invalid block size: ''"),
    (None, "4.0", "Invalid block size: '4.0'"),
    (None, "1" * 5000, "Invalid block size: '" + "1" * 5000 + "'"),
    (None, "1048575", ALLOWED),
    (None, "16777217", ALLOWED),
    (None, "16781312", ALLOWED),
    (None, "0", ALLOWED),
    (None, "-4194304", ALLOWED),
    (None, "9" * 4000, ALLOWED),
    (None, "1048577", UNALIGNED),
    (None, "4194305", UNALIGNED),
    ("nope", "abc", None),
], ids=["unknown", "shake", "case", "empty", "not-a-number",
        "empty-block-size", "float", "too-many-digits", "below-min",
        "above-max", "above-max-aligned", "zero", "negative", "huge",
        "unaligned-near-min", "unaligned", "algorithm-first"])
def test_validate_error(algorithm, block_size, message):
    if message is None:
        message = (f"Unsupported value {algorithm!r} for 'algorithm', "
                   f"expecting one of {checksum.ALGORITHMS}")
    with pytest.raises(checksum.InvalidArgument) as e:
        checksum.validate(algorithm, block_size)
    assert str(e.value) == message


def test_validate_message_upstream():
    with pytest.raises(checksum.InvalidArgument) as e:
        checksum.validate("nope", None)
    assert str(e.value).startswith(
        "Unsupported value 'nope' for 'algorithm', expecting one of "
        "['blake2b', 'blake2s', 'md5', ")


# Real images over NBD.

# data, an allocated zero cluster, unallocated clusters, zeros written as
# data, data in the short last block (block size 4 MiB: 4 + 4 + 2 MiB).
COMMANDS = (
    "write -P 0x55 0 1m",
    "write -z 1m 1m",
    "write -P 0 3m 64k",
    "write -P 0xaa 5m 64k",
    "write -z 6m 2m",
    "write -P 0x33 9m 4k",
)
SIZE = 10 * MiB


def raw_bytes(path, fmt):
    """The guest's bytes of an image, converted by qemu-img."""
    raw = f"{path}.converted"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt, "-O", "raw", path, raw],
        check=True, capture_output=True)
    with open(raw, "rb") as f:
        return f.read()


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("algorithm,block_size", [
    ("blake2b", 4 * MiB),
    ("sha1", MiB),
    ("blake2s", 3 * MiB),
])
def test_nbd(make_image, qemu_nbd, fmt, algorithm, block_size):
    path = make_image(fmt=fmt, size=SIZE, commands=COMMANDS)
    server = qemu_nbd(path, fmt=fmt, read_only=True)
    seen = []
    with client.open(server.address) as image:
        reads = []
        read_into = image.read_into
        image.read_into = lambda buf, offset: (
            reads.append(offset), read_into(buf, offset))
        result = checksum.compute(image, algorithm, block_size,
                                  progress=seen.append)
    assert sum(seen) == SIZE
    if block_size == MiB:
        # Blocks 1, 2, 4, 6, 7 and 8 are zero or holes: not read.
        assert reads == [0, 3 * MiB, 5 * MiB, 9 * MiB]
    data = raw_bytes(path, fmt)
    assert len(data) == SIZE
    assert result["checksum"] == naive(data, algorithm, block_size)


UPSTREAM_CHECKSUM = """\
import json, sys
from ovirt_imageio import client
print(json.dumps(client.checksum(
    sys.argv[1], block_size=int(sys.argv[2]), algorithm=sys.argv[3])))
"""


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("algorithm,block_size", [
    ("blake2b", 4 * MiB),
    ("sha256", MiB),
    ("blake2s", 3 * MiB),
])
def test_same_as_upstream_client(make_image, qemu_nbd, upstream_venv, fmt,
                                 algorithm, block_size):
    import upstream
    path = make_image(fmt=fmt, size=SIZE, commands=COMMANDS)
    expected = upstream.run_json(
        UPSTREAM_CHECKSUM, path, block_size, algorithm)
    server = qemu_nbd(path, fmt=fmt, read_only=True)
    with client.open(server.address) as image:
        result = checksum.compute(image, algorithm, block_size)
    assert result == expected


# Hasher: a stream read once, in order.

@pytest.mark.parametrize("size,block_size,piece", [
    (3 * MiB, MiB, 4096), (3 * MiB + 7, MiB, 3 * MiB + 7),
    (10000, 4096, 999), (0, MiB, 1),
])
def test_hasher_equals_compute(size, block_size, piece):
    data = (PATTERN * 2)[:size]
    hasher = checksum.Hasher("blake2b", block_size)
    for i in range(0, size, piece):
        hasher.update(memoryview(data)[i:i + piece])
    expected = checksum.compute(Image(data), "blake2b", block_size)
    assert hasher.result() == expected


def test_hasher_zero_blocks():
    data = bytes(2 * MiB) + b"x" * 100
    hasher = checksum.Hasher()
    hasher.update(data)
    extents = [Extent(0, 2 * MiB, True, True),
               Extent(2 * MiB, 100, False, False)]
    assert hasher.result() == checksum.compute(Image(data, extents))


def test_hasher_invalid():
    with pytest.raises(checksum.InvalidArgument):
        checksum.Hasher("shake_128")
    with pytest.raises(checksum.InvalidArgument):
        checksum.Hasher(block_size=0)
