"""
Safe upload sources: an image that names other files is refused, unless
the caller asks for them.

Why. qemu reads what an image's metadata names: a qcow2's (or qed's,
vmdk's) backing file, a qcow2's external data file, a vmdk descriptor's
extents. An upload sends the guest data qemu reads, so an "image" whose
qcow2 header names /etc/shadow as its backing file, or whose vmdk
descriptor has /etc/shadow as a flat extent, uploads /etc/shadow into
the disk. Such a file is easy to come by: a guest can write a qcow2
header at the start of its own raw disk, and whoever downloads that disk
and uploads it again as "any format qemu reads" would upload the host's
files. This is the lesson of Glance's format inspector (OpenStack
CVE-2022-47951, vmdk extents; CVE-2024-32498, qcow2 data files).

The check runs `qemu-img info` first (it opens the image without its
backing chain and reads no guest data) and refuses:
- any backing file (a URL or json: specification too: qemu would connect
  to it);
- a qcow2 external data file;
- a vmdk extent outside the descriptor's own folder (after symlinks are
  resolved), named by an absolute path, or any extent but the file itself
  for a vmdk inside an OVA.

What the check saw is also what qemu opens: the upload opens a checked
qcow2 with `"backing": null`, so a backing file added to the header after
the check is not followed, and with the format the check found, so a
file rewritten to look like another format is still read as the first.
"""

import json
import os

from . import qemu_img

# A text vmdk descriptor starts so; its extents are lines like
#   RW 2048 FLAT "disk-flat.vmdk" 0
DESCRIPTOR_MAGIC = b"# Disk DescriptorFile"
DESCRIPTOR_MAX = 64 * 1024
EXTENT_ACCESS = (b"RW", b"RDONLY", b"NOACCESS")


class UnsafeImage(ValueError):
    """
    The image names other files that qemu would read and the upload would
    send. Attributes: filename, references (descriptions, e.g.
    "backing file '/etc/shadow'").
    """

    def __init__(self, filename, references):
        self.filename = filename
        self.references = references
        super().__init__(
            f"Image {filename} refers to other files, which would be "
            f"uploaded as part of it: {'; '.join(references)}")


def check(filename, image_info=None, member=None):
    """
    Raise UnsafeImage if filename (or its tar member) names other files.
    image_info is `qemu-img info` of it (client.info()); it is run here
    if not given. Returns image_info.
    """
    if image_info is None:
        if member is not None:
            raise ValueError("check() of a tar member needs its image_info")
        image_info = qemu_img.info(filename)
    references = unsafe_references(filename, image_info, member=member)
    if references:
        raise UnsafeImage(
            f"{filename} member {member}" if member else filename,
            references)
    return image_info


def unsafe_references(filename, image_info, member=None):
    """What qemu would read besides the image itself, as descriptions."""
    found = []
    backing = image_info.get("backing-filename")
    if backing:
        found.append(f"backing file {backing!r}")
    specific = image_info.get("format-specific") or {}
    data = specific.get("data") or {}
    fmt = image_info.get("format")
    if fmt == "qcow2" and data.get("data-file"):
        found.append(f"external data file {data['data-file']!r}")
    if fmt == "vmdk":
        found.extend(_vmdk_references(filename, image_info, data, member))
    return found


def _vmdk_references(filename, image_info, data, member):
    extents = [e.get("filename") for e in data.get("extents") or ()]
    if member is not None:
        # Inside a tar file the only safe extent is the member itself:
        # the file node of the member's json: specification.
        member_file = _json_spec(image_info.get("filename")).get("file")
        return [f"vmdk extent {name!r}" for name in extents
                if member_file is None or _json_spec(name) != member_file]
    found = []
    folder = os.path.dirname(os.path.realpath(filename))
    for name in extents:
        if not name or os.path.dirname(os.path.realpath(name)) != folder:
            found.append(f"vmdk extent {name!r} outside {folder}")
    for name in _descriptor_extents(filename):
        if os.path.isabs(name):
            found.append(f"vmdk extent {name!r} (an absolute path)")
    return found


def _json_spec(name):
    """The node of a json: image specification, or {}."""
    if not isinstance(name, str) or not name.startswith("json:"):
        return {}
    try:
        node = json.loads(name[len("json:"):])
    except ValueError:
        return {}
    return node if isinstance(node, dict) else {}


def _descriptor_extents(filename):
    """The extent names of a text vmdk descriptor, as written in it."""
    try:
        with open(filename, "rb") as f:
            head = f.read(DESCRIPTOR_MAX)
    except OSError:
        return []
    if not head.startswith(DESCRIPTOR_MAGIC):
        return []
    names = []
    for line in head.splitlines():
        fields = line.strip().split(None, 3)
        if (len(fields) >= 4 and fields[0] in EXTENT_ACCESS
                and fields[3].startswith(b'"')):
            name = fields[3][1:].split(b'"', 1)[0]
            names.append(name.decode("utf-8", "replace"))
    return names
