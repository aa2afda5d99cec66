"""
A local image, opened through a private qemu-nbd.

State: one Export per transfer. It owns a temporary directory (the NBD
socket, maybe an overlay) and the qemu-nbd serving the image; connect()
gives NBD connections (nbd.client.Client), one per worker.

Why qemu-nbd: any format qemu reads (raw, qcow2, compressed qcow2, vmdk,
vhdx, vdi, ISO) is served as guest data, with block status telling data
from zeros and holes, and writes go through qemu's format drivers.

Images that need options qemu-nbd has no flags for are served through a
tiny qcow2 overlay whose backing file is a `json:` image specification:

- a disk inside an OVA (a tar file): the raw driver's offset and size
  select the member's bytes, and the member's own format driver sits on
  top: json:{"driver": FMT, "file": {"driver": "raw", "offset": N,
  "size": M, "file": {"driver": "file", "filename": OVA}}}
- a qcow2 without its backing chain: json:{"driver": "qcow2",
  "backing": null, ...}; unallocated clusters then read as zeros and
  block status reports them as holes.

The overlay is empty and read only: every read and block status passes
through it (allocation depth counts from the overlay, so a hole is still
"unallocated anywhere"). qemu-nbd (7.2) accepts neither json: nor
--image-opts together with the explicit --format that
ovirt_imageio.nbd.qemu_nbd.start() always passes, and its --offset has no
size limit, so this keeps one way of starting qemu-nbd.
"""

import json
import logging
import os
import stat
import threading

from . import qemu_img

# The NBD modules (ovirt_imageio.nbd.client, qemu_nbd), shutil and
# tempfile are imported where they are used, not here: with their own
# imports (ctypes, concurrent.futures, subprocess, bz2, lzma...) they cost
# a client command ~6 ms to start and exit, and a download with nothing to
# write (LazyExport) never uses them.

log = logging.getLogger(__name__)


class Export:
    """
    A local image served by a private qemu-nbd.

    Attributes: filename, fmt, read_only, server (qemu_nbd.Server).
    """

    def __init__(self, filename, fmt, read_only, server, tmp_dir, dirty):
        self.filename = filename
        self.fmt = fmt
        self.read_only = read_only
        self.server = server
        self._tmp_dir = tmp_dir
        self._dirty = dirty

    def connect(self):
        """A new NBD connection to the image; the caller closes it."""
        from ovirt_imageio.nbd import client as nbd_client
        return nbd_client.open(self.server.address, dirty=self._dirty)

    def connect_stream(self):
        """
        A new NBD connection whose data is spliced to and from a socket
        (nbd.stream.Stream); the caller closes it.
        """
        from ovirt_imageio.nbd import stream
        return stream.open(self.server.address)

    def close(self):
        """Stop qemu-nbd and remove the temporary directory."""
        import shutil

        try:
            self.server.stop()
        finally:
            shutil.rmtree(self._tmp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LazyExport:
    """
    An Export whose qemu-nbd starts on the first connect(), from the
    arguments of open(). Thread safe. Attributes: filename, fmt.
    """

    def __init__(self, filename, fmt, options):
        self.filename = filename
        self.fmt = fmt
        self._options = options
        self._lock = threading.Lock()
        self._export = None
        self._closed = False

    @property
    def started(self):
        """True once qemu-nbd was started."""
        return self._export is not None

    def connect(self):
        """Start qemu-nbd if not started yet; return a new connection."""
        return self._started().connect()

    def connect_stream(self):
        """Start qemu-nbd if not started yet; return a new Stream."""
        return self._started().connect_stream()

    def _started(self):
        with self._lock:
            if self._closed:
                raise ValueError(f"Export of {self.filename} is closed")
            if self._export is None:
                self._export = open(self.filename, self.fmt,
                                    **self._options)
            return self._export

    def close(self):
        """Stop qemu-nbd if it was started. Safe to call more than once."""
        with self._lock:
            self._closed = True
            export = self._export
        if export is not None:
            export.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_lazily(filename, fmt, **options):
    """
    Return a LazyExport: open(filename, fmt, **options) on the first
    connect(). A download with nothing to write (a new image from an
    empty or all zero one) then never starts qemu-nbd, which was a third
    of such a download's time (starting, waiting until it serves, and
    stopping it: 10-20 ms).
    """
    return LazyExport(filename, fmt, options)


def open(filename, fmt, *, read_only=True, shared=8, offset=None,
         size=None, virtual_size=None, backing_chain=True, bitmap=None):
    """
    Serve filename (of format fmt) with a new qemu-nbd and return an
    Export.

    offset, size: the image is these bytes of filename (a tar member).
    virtual_size: the image's virtual size, needed for the overlay
        (probed when not given).
    backing_chain: False serves a qcow2 without its backing files.
    bitmap: also export this dirty bitmap.
    """
    import shutil
    import tempfile

    from ovirt_imageio.nbd import qemu_nbd

    filename = os.path.abspath(filename)
    need_overlay = (offset is not None or size is not None
                    or (fmt == "qcow2" and not backing_chain))
    if need_overlay and not read_only:
        raise ValueError("A tar member or an image without its backing "
                         "chain can be opened only read only")

    tmp_dir = tempfile.mkdtemp(prefix="imageio-")
    try:
        sock = os.path.join(tmp_dir, "sock")
        path, path_fmt, cache = filename, fmt, None
        if need_overlay:
            backing = _backing_spec(filename, fmt, offset, size,
                                    backing_chain)
            if virtual_size is None:
                virtual_size = qemu_img.info(backing)["virtual-size"]
            path = os.path.join(tmp_dir, "overlay.qcow2")
            qemu_img.create(path, "qcow2", size=virtual_size,
                            backing_file=backing, backing_format=fmt,
                            unsafe=True)
            path_fmt = "qcow2"
            # The backing file inherits the overlay's cache mode: direct
            # I/O only if both file systems support it.
            cache = ("none" if qemu_nbd.supports_direct_io(filename)
                     and qemu_nbd.supports_direct_io(path)
                     else "writeback")
        # aio=threads: this export lives for one transfer, and qemu-nbd
        # takes ~40 ms to exit with native AIO (2 ms with threads); that
        # was half of a sparse download.
        server = qemu_nbd.start(
            path, sock, fmt=path_fmt, read_only=read_only, shared=shared,
            cache=cache, aio="threads", bitmap=bitmap)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    log.debug("Serving %s fmt=%s on %s", filename, fmt, sock)
    return Export(filename, fmt, read_only, server, tmp_dir,
                  dirty=bitmap is not None)


def json_spec(filename, offset, size):
    """
    A json: image specification for size bytes at offset of filename,
    leaving the top driver to qemu's probing (for qemu-img info).
    """
    node = {"file": _raw_range(os.path.abspath(filename), offset, size)}
    return "json:" + json.dumps(node)


def _backing_spec(filename, fmt, offset, size, backing_chain):
    if offset is not None or size is not None:
        node = {"driver": fmt, "file": _raw_range(filename, offset, size)}
    else:
        node = {"driver": fmt, "file": _file_node(filename)}
    if fmt == "qcow2" and not backing_chain:
        node["backing"] = None
    return "json:" + json.dumps(node)


def _raw_range(filename, offset, size):
    node = {"driver": "raw", "file": _file_node(filename)}
    if offset is not None:
        node["offset"] = offset
    if size is not None:
        node["size"] = size
    return node


def _file_node(filename):
    try:
        block = stat.S_ISBLK(os.stat(filename).st_mode)
    except OSError:
        block = False
    return {"driver": "host_device" if block else "file",
            "filename": filename}
