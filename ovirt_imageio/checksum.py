"""
Image checksums: the "blkhash" construction of upstream ovirt-imageio 2.5.1
(API.md 1.6), bit for bit.

Theory of operation. The image is split into blocks of block_size bytes
at offsets 0, block_size, 2 * block_size... (the last block is shorter
when block_size does not divide the size). Each block gets its own
digest H(block); the checksum is the hex digest of H over the
concatenation of the block digests. For blake2b and blake2s both H use
digest_size=32; other algorithms use their standard digest. Because every
block is hashed on its own, a block of zeros has a digest that depends only
on its length, so:

- A block that the image's zero extents cover entirely is never read: its
  digest is H(bytes(length)), computed once and cached.
- A full block that was read and turned out to be all zeros (e.g. a
  preallocated image) uses the same cached digest. Comparing with zeros
  (memcmp) costs a small fraction of hashing (0.15 ms against 5 ms for
  4 MiB of blake2b here), and stops at the first non-zero byte.

Either way the result equals hashing every byte, which is how upstream's
client computes it from a file without extents, so a checksum computed
here matches upstream's server and `ovirt_imageio.client.checksum()` for
the same block size and algorithm.

Algorithms: hashlib.algorithms_available, minus the extendable-output
functions (shake_128, shake_256). Those have no fixed digest length, so
the construction is undefined for them; upstream lists them but fails
(digest() needs a length) with a 500. Upstream also fails with a 500 for
the algorithms that hashlib knows only by name (md5-sha1, ripemd160,
sha512_224, sha512_256, sm3: getattr(hashlib, name) fails); we construct
them with hashlib.new() and compute the same construction.

State: none kept between calls except the cache of zero-block digests.
One buffer of block_size bytes is reused for all reads of a call.

This is a root module: it knows neither HTTP nor NBD. An image is any
object with `size`, `read_into(buf, offset)` and `extents("zero")`
(extents with start, length and zero, covering 0 to size).
"""

import functools
import hashlib

from . import errors

MiB = 1024**2

DEFAULT_ALGORITHM = "blake2b"

# Upstream's default; it must match for clients that compare checksums
# computed with the default.
DEFAULT_BLOCK_SIZE = 4 * MiB

# Allowed block sizes for the /checksum API (upstream): the buffer is
# allocated per request, so the maximum bounds a request's memory.
MIN_BLOCK_SIZE = DEFAULT_BLOCK_SIZE // 4
MAX_BLOCK_SIZE = DEFAULT_BLOCK_SIZE * 4
BLOCK_ALIGNMENT = 4096

# Digest size for blake2b and blake2s, block and outer digests alike
# (upstream: valid for both and large enough).
BLAKE2_DIGEST_SIZE = 32

# Zero-block digests kept: one per (algorithm, length); a call uses the
# full block and at most one short last block.
ZERO_DIGEST_CACHE = 64


class InvalidArgument(errors.Error, ValueError):
    """A checksum request's algorithm or block size is invalid; str() is
    the client-facing message (HTTP: 400)."""


def _new(algorithm, data=b""):
    # usedforsecurity=False: a checksum is not a security function, and
    # on a FIPS host md5 would otherwise be refused.
    if algorithm in ("blake2b", "blake2s"):
        return hashlib.new(algorithm, data, digest_size=BLAKE2_DIGEST_SIZE,
                           usedforsecurity=False)
    return hashlib.new(algorithm, data, usedforsecurity=False)


def _computable(algorithm):
    try:
        h = _new(algorithm)
    except ValueError:
        # Listed by OpenSSL but not usable here (e.g. disabled provider).
        return False
    # Extendable-output functions (shake) report digest_size 0.
    return h.digest_size > 0


ALGORITHMS = sorted(a for a in hashlib.algorithms_available
                    if _computable(a))


def validate(algorithm=None, block_size=None):
    """
    Validate a /checksum request's query values (strings, or None for the
    defaults) and return (algorithm, block_size) with block_size an int.

    Raises InvalidArgument with upstream's messages:
        Unsupported value 'nope' for 'algorithm', expecting one of [...]
        Invalid block size: 'abc'
        Block size out of allowed range: 1048576-16777216
        Block size is not aligned to 4096
    """
    if algorithm is None:
        algorithm = DEFAULT_ALGORITHM
    elif algorithm not in ALGORITHMS:
        raise InvalidArgument(
            f"Unsupported value {algorithm!r} for 'algorithm', expecting "
            f"one of {ALGORITHMS}")

    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    else:
        try:
            # int() as upstream: it accepts " 42", "4_194_304" and
            # non-ASCII digits; the range check below bounds the value.
            # More than 4300 digits raise ValueError.
            value = int(block_size)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f"Invalid block size: {block_size!r}") from None
        block_size = value

    if not MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE:
        raise InvalidArgument(
            f"Block size out of allowed range: "
            f"{MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}")
    if block_size % BLOCK_ALIGNMENT:
        raise InvalidArgument(
            f"Block size is not aligned to {BLOCK_ALIGNMENT}")

    return algorithm, block_size


def compute(image, algorithm=DEFAULT_ALGORITHM,
            block_size=DEFAULT_BLOCK_SIZE, progress=None):
    """
    Compute the checksum of the whole image (0 to image.size) and return
    {"algorithm": algorithm, "block_size": block_size, "checksum": hex}.

    Any positive block_size works here; validate() applies the API's
    limits. progress(length), if given, is called after each block with
    the block's length; an exception it raises stops the computation and
    propagates (cancellation). Errors from the image propagate too.

    Raises InvalidArgument for an unknown algorithm or a block size < 1.
    """
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(
            f"Unsupported value {algorithm!r} for 'algorithm', expecting "
            f"one of {ALGORITHMS}")
    if block_size < 1:
        raise InvalidArgument(f"Invalid block size: {block_size!r}")

    size = image.size
    outer = _new(algorithm)
    buf = bytearray(min(block_size, size))
    view = memoryview(buf)
    zeros = None

    with view:
        blocks = _blocks(image.extents("zero"), size, block_size)
        for offset, length, zero in blocks:
            if zero:
                digest = _zero_digest(algorithm, length)
            else:
                with view[:length] as block:
                    image.read_into(block, offset)
                    if length == block_size:
                        if zeros is None:
                            # calloc'ed: pages never written cost nothing.
                            zeros = bytes(block_size)
                        is_zero = buf == zeros
                    else:
                        # The short last block: hashing is the cheaper
                        # way than copying it for a compare.
                        is_zero = False
                    if is_zero:
                        digest = _zero_digest(algorithm, length)
                    else:
                        digest = _new(algorithm, block).digest()
            outer.update(digest)
            if progress:
                progress(length)

    return {
        "algorithm": algorithm,
        "block_size": block_size,
        "checksum": outer.hexdigest(),
    }


@functools.lru_cache(maxsize=ZERO_DIGEST_CACHE)
def _zero_digest(algorithm, length):
    return _new(algorithm, bytes(length)).digest()


def _blocks(extents, size, block_size):
    """
    Yield (offset, length, zero) for the blocks of an image of size bytes.
    A block is zero iff zero extents cover all of it; a block touching a
    data extent, or a gap in the extents, must be read. Extents past size
    are ignored.
    """
    it = iter(extents)
    cur = next(it, None)
    for offset in range(0, size, block_size):
        end = min(offset + block_size, size)
        zero = True
        pos = offset
        while pos < end:
            # Drop extents that end before pos.
            while cur is not None and cur.start + cur.length <= pos:
                cur = next(it, None)
            if cur is None or cur.start > pos or not cur.zero:
                zero = False
                break
            pos = cur.start + cur.length
        yield offset, end - offset, zero


class Hasher:
    """
    The checksum of an image read once, in order (a stream that cannot
    be read again): update(data) with every byte from offset 0, then
    result(), equal to compute() of the same bytes.
    """

    def __init__(self, algorithm=DEFAULT_ALGORITHM,
                 block_size=DEFAULT_BLOCK_SIZE):
        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"Unsupported algorithm {algorithm!r}")
        if block_size < 1:
            raise InvalidArgument(f"Invalid block size: {block_size!r}")
        self.algorithm = algorithm
        self.block_size = block_size
        self._outer = _new(algorithm)
        self._block = _new(algorithm)
        self._filled = 0

    def update(self, data):
        with memoryview(data) as view, view.cast("B") as view:
            while len(view):
                n = min(len(view), self.block_size - self._filled)
                self._block.update(view[:n])
                self._filled += n
                view = view[n:]
                if self._filled == self.block_size:
                    self._end_block()

    def result(self):
        if self._filled:
            self._end_block()
        return {"algorithm": self.algorithm, "block_size": self.block_size,
                "checksum": self._outer.hexdigest()}

    def _end_block(self):
        self._outer.update(self._block.digest())
        self._block = _new(self.algorithm)
        self._filled = 0
