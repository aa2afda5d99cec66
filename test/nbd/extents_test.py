import nbd
import pytest

from ovirt_imageio.nbd import extents

K = 1024
DATA = 0
ZERO = nbd.STATE_ZERO
HOLE = nbd.STATE_HOLE | nbd.STATE_ZERO
CLEAN = 0
DIRTY = extents.STATE_DIRTY

SPLIT = [
    # (offset, replies, expected segments)
    pytest.param(
        0, [[64 * K, DATA]],
        [(0, 64 * K, (DATA,))],
        id="one-context-one-extent"),
    pytest.param(
        4 * K, [[K, DATA, 2 * K, ZERO]],
        [(4 * K, K, (DATA,)), (5 * K, 2 * K, (ZERO,))],
        id="starts-at-offset"),
    pytest.param(
        0, [[64 * K, DATA, 64 * K, ZERO], [64 * K, 1, 64 * K, 0]],
        [(0, 64 * K, (DATA, 1)), (64 * K, 64 * K, (ZERO, 0))],
        id="same-boundaries"),
    pytest.param(
        0, [[64 * K, DATA, 192 * K, HOLE], [128 * K, 1, 256 * K, 0]],
        [(0, 64 * K, (DATA, 1)),
         (64 * K, 64 * K, (HOLE, 1)),
         (128 * K, 128 * K, (HOLE, 0))],
        id="different-boundaries-shortest-wins"),
    pytest.param(
        0, [[256 * K, DATA], [K, 1, K, 0, 254 * K, 1]],
        [(0, K, (DATA, 1)), (K, K, (DATA, 0)), (2 * K, 254 * K, (DATA, 1))],
        id="one-long-many-short"),
    pytest.param(
        0, [[64 * K, DATA], [128 * K, 1]],
        [(0, 64 * K, (DATA, 1))],
        id="first-shorter"),
    pytest.param(
        0, [[128 * K, DATA], [64 * K, 1]],
        [(0, 64 * K, (DATA, 1))],
        id="second-shorter"),
    pytest.param(
        0, [[0, ZERO, 64 * K, DATA, 0, ZERO]],
        [(0, 64 * K, (DATA,))],
        id="zero-length-entries-skipped"),
    pytest.param(
        0, [[64 * K, DATA], []],
        [],
        id="empty-reply-covers-nothing"),
    pytest.param(
        0, [],
        [],
        id="no-replies"),
    pytest.param(
        2**40, [[2**31, DATA, 2**31, ZERO]],
        [(2**40, 2**31, (DATA,)), (2**40 + 2**31, 2**31, (ZERO,))],
        id="large-offsets"),
]


@pytest.mark.parametrize("offset,replies,expected", SPLIT)
def test_split(offset, replies, expected):
    assert extents.split(offset, replies) == expected


def test_split_odd_reply():
    with pytest.raises(ValueError) as e:
        extents.split(0, [[K, DATA, K]])
    assert "odd length" in str(e.value)


ZERO_EXTENTS = [
    pytest.param(
        0, [64 * K, DATA, 64 * K, ZERO, 128 * K, HOLE], None,
        [extents.ZeroExtent(0, 64 * K, zero=False, hole=False),
         extents.ZeroExtent(64 * K, 64 * K, zero=True, hole=False),
         extents.ZeroExtent(128 * K, 128 * K, zero=True, hole=False)],
        # base:allocation's HOLE says "may read zeros cheaply", not
        # "unallocated in this layer": without allocation depth nothing
        # is a hole (upstream reports the same).
        id="no-depth-no-hole"),
    pytest.param(
        0, [64 * K, DATA, 64 * K, ZERO, 128 * K, HOLE],
        [128 * K, 1, 128 * K, 0],
        [extents.ZeroExtent(0, 64 * K, zero=False, hole=False),
         extents.ZeroExtent(64 * K, 64 * K, zero=True, hole=False),
         extents.ZeroExtent(128 * K, 128 * K, zero=True, hole=True)],
        id="depth-0-is-hole"),
    pytest.param(
        0, [256 * K, HOLE], [256 * K, 1],
        [extents.ZeroExtent(0, 256 * K, zero=True, hole=False)],
        id="raw-hole-is-allocated-with-depth"),
    pytest.param(
        0, [256 * K, DATA], [128 * K, 2, 128 * K, 0],
        [extents.ZeroExtent(0, 128 * K, zero=False, hole=False),
         extents.ZeroExtent(128 * K, 128 * K, zero=False, hole=True)],
        id="depth-from-backing-is-not-hole"),
    pytest.param(
        K, [64 * K, ZERO], [32 * K, 0],
        [extents.ZeroExtent(K, 32 * K, zero=True, hole=True)],
        id="depth-shorter"),
    pytest.param(
        0, [64 * K, ZERO], [],
        [],
        id="depth-empty"),
]


@pytest.mark.parametrize("offset,base,depth,expected", ZERO_EXTENTS)
def test_zero_extents(offset, base, depth, expected):
    assert extents.zero_extents(offset, base, depth) == expected


DIRTY_EXTENTS = [
    pytest.param(
        0, [64 * K, DIRTY, 64 * K, CLEAN], None,
        [extents.DirtyExtent(0, 64 * K, dirty=True, zero=False),
         extents.DirtyExtent(64 * K, 64 * K, dirty=False, zero=False)],
        id="no-base"),
    pytest.param(
        0, [64 * K, DIRTY, 64 * K, CLEAN], [32 * K, DATA, 96 * K, ZERO],
        [extents.DirtyExtent(0, 32 * K, dirty=True, zero=False),
         extents.DirtyExtent(32 * K, 32 * K, dirty=True, zero=True),
         extents.DirtyExtent(64 * K, 64 * K, dirty=False, zero=True)],
        id="with-base"),
    pytest.param(
        0, [128 * K, DIRTY], [64 * K, HOLE],
        [extents.DirtyExtent(0, 64 * K, dirty=True, zero=True)],
        id="base-shorter"),
    pytest.param(
        0, [128 * K, 0x2], None,
        [extents.DirtyExtent(0, 128 * K, dirty=False, zero=False)],
        id="only-bit-0-is-dirty"),
]


@pytest.mark.parametrize("offset,bitmap,base,expected", DIRTY_EXTENTS)
def test_dirty_extents(offset, bitmap, base, expected):
    assert extents.dirty_extents(offset, bitmap, base) == expected


Z = extents.ZeroExtent
D = extents.DirtyExtent

MERGE = [
    pytest.param([], [], id="empty"),
    pytest.param(
        [Z(0, K, False, False), Z(K, K, False, False)],
        [Z(0, 2 * K, False, False)],
        id="same-flags"),
    pytest.param(
        [Z(0, K, False, False), Z(K, K, True, False),
         Z(2 * K, K, True, False)],
        [Z(0, K, False, False), Z(K, 2 * K, True, False)],
        id="different-flags"),
    pytest.param(
        [Z(0, K, True, False), Z(K, K, True, True)],
        [Z(0, K, True, False), Z(K, K, True, True)],
        id="hole-differs"),
    pytest.param(
        [Z(0, K, True, True), Z(2 * K, K, True, True)],
        [Z(0, K, True, True), Z(2 * K, K, True, True)],
        id="not-contiguous"),
    pytest.param(
        [D(0, K, True, False), D(K, K, True, False),
         D(2 * K, K, False, False)],
        [D(0, 2 * K, True, False), D(2 * K, K, False, False)],
        id="dirty"),
]


@pytest.mark.parametrize("items,expected", MERGE)
def test_merge(items, expected):
    assert extents.merge(items) == expected


def test_merge_does_not_modify_input():
    items = [Z(0, K, False, False), Z(K, K, False, False)]
    extents.merge(items)
    assert items == [Z(0, K, False, False), Z(K, K, False, False)]


CLIP = [
    pytest.param([Z(0, 4 * K, True, True)], 4 * K,
                 [Z(0, 4 * K, True, True)], id="exact"),
    pytest.param([Z(0, 8 * K, True, True)], 4 * K,
                 [Z(0, 4 * K, True, True)], id="crossing"),
    pytest.param([Z(0, 4 * K, True, True), Z(4 * K, K, False, False)], 4 * K,
                 [Z(0, 4 * K, True, True)], id="after-end"),
    pytest.param([], 4 * K, [], id="empty"),
]


@pytest.mark.parametrize("items,end,expected", CLIP)
def test_clip(items, end, expected):
    assert extents.clip(items, end) == expected


def test_zero_extent_to_dict_key_order():
    d = Z(0, K, zero=True, hole=False).to_dict()
    assert list(d.items()) == [
        ("start", 0), ("length", K), ("zero", True), ("hole", False)]


def test_dirty_extent_to_dict_key_order():
    d = D(0, K, dirty=True, zero=False).to_dict()
    assert list(d.items()) == [
        ("start", 0), ("length", K), ("dirty", True), ("zero", False)]


def test_protocol_constants_match_libnbd():
    # Spelled out in extents.py so the client does not load libnbd.
    assert extents.BASE_ALLOCATION == nbd.CONTEXT_BASE_ALLOCATION
    assert extents.STATE_ZERO == nbd.STATE_ZERO
    assert extents.STATE_HOLE == nbd.STATE_HOLE
