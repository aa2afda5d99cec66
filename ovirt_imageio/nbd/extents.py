"""
Block status to extents: pure functions over libnbd's replies.

libnbd calls back once per meta context with a flat list
[length, flags, length, flags, ...] describing the image from the offset
of the request. Each context may split the range at different
boundaries and may cover a different length, so the replies are walked
together: a new segment starts wherever any context starts a new extent,
and the walk stops where the shortest reply ends; the caller continues
with a new request from there.

    base:allocation        [ 64k data ][ 192k zero                  ]
    qemu:allocation-depth  [ 128k depth 1     ][ 256k depth 0             ]
    segments               [ 64k ][ 64k       ][ 128k          ] -> at 256k

Contexts:

- base:allocation: NBD_STATE_ZERO => zero. Its NBD_STATE_HOLE is never
  a hole: it means "reads as zeros, may take no space" (a sparse range
  of a raw file, a zero cluster), not "unallocated in this layer".
- qemu:allocation-depth: depth 0 => hole (unallocated in this image and
  its backing chain); a raw file or an allocated cluster is not a hole,
  even where it reads as zeros. Without this context nothing is a hole,
  as upstream reports: a client downloading on top of a backing file
  skips holes, and a range called a hole wrongly would show the backing
  file's data instead of the export's zeros.
- qemu:dirty-bitmap:NAME: bit 0 => dirty.
"""

from __future__ import annotations

import dataclasses

from ovirt_imageio import errors

# The NBD protocol's names and flags, spelled out rather than taken from
# libnbd: the client library imports this module, and loading libnbd's
# bindings for three constants cost every client command ~10 ms.
BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 0x1
STATE_ZERO = 0x2

# qemu's contexts; libnbd has no constants for them.
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# qemu:dirty-bitmap:* flag for a dirty block (qemu's docs/interop/nbd.txt).
STATE_DIRTY = 0x1


@dataclasses.dataclass(frozen=True)
class ZeroExtent:
    start: int
    length: int
    zero: bool
    hole: bool

    def flags(self):
        return (self.zero, self.hole)

    def to_dict(self):
        return {
            "start": self.start,
            "length": self.length,
            "zero": self.zero,
            "hole": self.hole,
        }


@dataclasses.dataclass(frozen=True)
class DirtyExtent:
    start: int
    length: int
    dirty: bool
    zero: bool

    def flags(self):
        return (self.dirty, self.zero)

    def to_dict(self):
        return {
            "start": self.start,
            "length": self.length,
            "dirty": self.dirty,
            "zero": self.zero,
        }


def split(offset, replies):
    """
    Walk block status replies together, splitting at every boundary.

    offset: where the replies start.
    replies: one flat list [length, flags, ...] per context.

    Returns a list of (start, length, flags) where flags is a tuple with
    one item per reply, covering offset up to where the shortest reply
    ends. An empty reply covers nothing, so the result is empty.
    """
    for r in replies:
        if len(r) % 2:
            raise ValueError(f"Block status reply has odd length: {len(r)}")
    if not replies:
        return []

    n = len(replies)
    index = [0] * n
    ends = [offset] * n
    flags = [0] * n
    segments = []
    pos = offset

    while True:
        # Advance every context whose current extent ended at pos.
        # Zero-length entries are skipped by the same loop.
        for i, reply in enumerate(replies):
            while ends[i] <= pos:
                if index[i] == len(reply):
                    return segments
                ends[i] += reply[index[i]]
                flags[i] = reply[index[i] + 1]
                index[i] += 2
        end = min(ends)
        segments.append((pos, end - pos, tuple(flags)))
        pos = end


def zero_extents(offset, base, depth=None):
    """
    Combine base:allocation and, when available, qemu:allocation-depth
    replies starting at offset into a list of ZeroExtent (not merged).

    depth=None means the export has no allocation depth: then nothing is
    known to be unallocated, and no extent is a hole (base:allocation's
    NBD_STATE_HOLE does not mean that; see the module's docstring).
    """
    if depth is None:
        return [
            ZeroExtent(start, length,
                       zero=bool(f[0] & STATE_ZERO), hole=False)
            for start, length, f in split(offset, [base])
        ]
    return [
        ZeroExtent(start, length,
                   zero=bool(f[0] & STATE_ZERO),
                   hole=f[1] == 0)
        for start, length, f in split(offset, [base, depth])
    ]


def dirty_extents(offset, bitmap, base=None):
    """
    Combine a qemu:dirty-bitmap:NAME reply and, when available, a
    base:allocation reply starting at offset into a list of DirtyExtent
    (not merged). Without base:allocation nothing is known to be zero.
    """
    if base is None:
        return [
            DirtyExtent(start, length,
                        dirty=bool(f[0] & STATE_DIRTY), zero=False)
            for start, length, f in split(offset, [bitmap])
        ]
    return [
        DirtyExtent(start, length,
                    dirty=bool(f[0] & STATE_DIRTY),
                    zero=bool(f[1] & STATE_ZERO))
        for start, length, f in split(offset, [bitmap, base])
    ]


def merge(extents):
    """
    Merge consecutive extents with identical flags. Extents must be
    sorted and of one type; returns a new list.
    """
    merged = []
    for ext in extents:
        if merged:
            last = merged[-1]
            if (last.start + last.length == ext.start
                    and last.flags() == ext.flags()):
                merged[-1] = dataclasses.replace(
                    last, length=last.length + ext.length)
                continue
        merged.append(ext)
    return merged


def clip(extents, end):
    """Drop what lies at or after end, and shorten an extent crossing it."""
    clipped = []
    for ext in extents:
        if ext.start >= end:
            break
        if ext.start + ext.length > end:
            ext = dataclasses.replace(ext, length=end - ext.start)
        clipped.append(ext)
    return clipped


def contexts(context, *, base_allocation, allocation_depth, bitmap):
    """
    The meta contexts whose replies make the extents of context ("zero"
    or "dirty") on an export that negotiated them: base_allocation and
    allocation_depth say whether those were, bitmap is the dirty bitmap's
    name or None.
    """
    if context == "zero":
        names = [BASE_ALLOCATION]
        if allocation_depth:
            names.append(ALLOCATION_DEPTH)
    else:
        names = [DIRTY_BITMAP_PREFIX + bitmap]
        if base_allocation:
            names.append(BASE_ALLOCATION)
    return names


def combine(context, offset, replies, *, base_allocation, allocation_depth,
            bitmap):
    """
    The extents of context ("zero" or "dirty") from one block status
    request at offset: replies maps a context name to its flat list
    (missing: an empty reply). Not merged.
    """
    if context == "zero":
        depth = None
        if allocation_depth:
            depth = replies.get(ALLOCATION_DEPTH, [])
        return zero_extents(offset, replies.get(BASE_ALLOCATION, []), depth)
    base = None
    if base_allocation:
        base = replies.get(BASE_ALLOCATION, [])
    return dirty_extents(
        offset, replies.get(DIRTY_BITMAP_PREFIX + bitmap, []), base)


def validate(context, *, bitmap, export_name):
    """
    Raise ValueError for an unknown context, errors.Unsupported for
    "dirty" on an export without exactly one dirty bitmap (bitmap None).
    """
    if context not in ("zero", "dirty"):
        raise ValueError(
            f"Unsupported extents context {context!r}, expecting one of "
            f"['dirty', 'zero']")
    if context == "dirty" and bitmap is None:
        raise errors.Unsupported(
            f"NBD export '{export_name}' does not support dirty extents")
