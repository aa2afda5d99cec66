"""
qemu-img for the client: info, measure, create.

Paths are made absolute before they reach qemu-img, so a local file name
with a colon ("disk:1.qcow2") is never taken for a protocol ("nbd:...").
Image specifications built here ("json:{...}") are passed as they are.
"""

import json
import logging
import os
import subprocess

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"

# Seconds qemu-img may take. info, measure and create read only metadata
# (measure walks the allocation map), which takes seconds even for a
# large image on slow storage; past this qemu-img is stuck (a hung NFS
# mount) and is killed.
TIMEOUT = 300


class Error(RuntimeError):
    """qemu-img failed; str() has the command's error output."""

    def __init__(self, op, filename, returncode, stderr):
        self.op = op
        self.filename = filename
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(
            f"qemu-img {op} {filename} failed with exit code {returncode}: "
            f"{stderr.strip()}")


def spec(filename):
    """The name qemu-img is given for filename."""
    if filename.startswith("json:"):
        return filename
    return os.path.abspath(filename)


def info(filename):
    """Return `qemu-img info --output json` of filename (format probed)."""
    out = _run("info", filename,
               [QEMU_IMG, "info", "--output", "json", spec(filename)])
    return json.loads(out)


def measure(filename, dst_fmt):
    """Return `qemu-img measure` of converting filename to dst_fmt."""
    out = _run("measure", filename,
               [QEMU_IMG, "measure", "--output", "json", "-O", dst_fmt,
                spec(filename)])
    return json.loads(out)


def measure_size(size, dst_fmt):
    """Return `qemu-img measure` of a new dst_fmt image of size bytes
    ("fully-allocated": its size once every cluster is written)."""
    out = _run("measure", f"--size {size}",
               [QEMU_IMG, "measure", "--output", "json", "-O", dst_fmt,
                "--size", str(size)])
    return json.loads(out)


def create(filename, fmt, size=None, backing_file=None, backing_format=None,
           unsafe=False):
    """
    Create an image. backing_file is kept as given (qemu resolves a
    relative name from the new image's directory); backing_format is
    required by qemu for a backing file, so callers probe it first.
    unsafe (-u) does not open the backing file, and needs size.
    """
    cmd = [QEMU_IMG, "create", "-q", "-f", fmt]
    if backing_file is not None:
        cmd += ["-b", backing_file]
        if backing_format is not None:
            cmd += ["-F", backing_format]
        if unsafe:
            cmd.append("-u")
    cmd.append(spec(filename))
    if size is not None:
        cmd.append(str(size))
    _run("create", filename, cmd)


def _run(op, filename, cmd):
    log.debug("Running %s", cmd)
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL,
                           capture_output=True, timeout=TIMEOUT)
    except OSError as e:
        raise Error(op, filename, None, f"cannot run {QEMU_IMG}: {e}") \
            from None
    except subprocess.TimeoutExpired:
        raise Error(op, filename, None,
                    f"no answer within {TIMEOUT} seconds") from None
    if p.returncode != 0:
        raise Error(op, filename, p.returncode,
                    p.stderr.decode("utf-8", "replace"))
    return p.stdout
