"""
The public client API, with the names and arguments of upstream
ovirt-imageio 2.5.1's ovirt_imageio.client, so scripts written for it
(the oVirt SDK examples, backup tools) work unchanged.

Upload and download open the local image with a private qemu-nbd (see
local.py), or directly if it is a raw file (rawfile.py), the server with
RemoteImage (remote.py), and copy between them with transfer.py.
Nothing they start outlives the call: qemu-nbd, worker
threads and connections are closed on success, error and
KeyboardInterrupt alike.

A download may write to a block device (Forklift/MTV runs `ovirt-img
download-disk -f raw DISK /dev/xxx`). The device is the user's, not
ours: it is never created, truncated or removed, even on failure. Raw:
written directly (rawfile.py) after checking that it is large enough,
and every zero extent is zeroed on it, as its old contents would show
through (the kernel zeroes the device; no zeros cross the network).
qcow2: `qemu-img create -f qcow2` formats the device (on a host_device it
writes the new image's metadata only), and qemu-nbd serves it; zero and
unallocated areas stay unallocated, as in a file.

Start-up time. A client command pays for every module imported, once
when it starts and again when it exits; a download of an empty image is
over in ~25 ms, less than the imports. So modules only some calls need
(tarfile for OVA members, checksum and hashlib for verification, and the
NBD modules, used only once there is something to read or write
locally) are imported by the functions that use them.
"""

import collections
import logging
import os

from ..nbd import extents as nbd_extents
from . import local
from . import progress as _progress
from . import qemu_img
from . import rawfile
from . import remote
from . import sources
from . import transfer

log = logging.getLogger("client")

BUFFER_SIZE = transfer.BUFFER_SIZE
MAX_WORKERS = transfer.MAX_WORKERS

# checksum()'s defaults: ovirt_imageio.checksum's DEFAULT_BLOCK_SIZE and
# DEFAULT_ALGORITHM (a test keeps them equal), written out so that
# importing the client does not import checksum and hashlib.
_CHECKSUM_BLOCK_SIZE = 4 * 1024**2
_CHECKSUM_ALGORITHM = "blake2b"


def upload(filename, url, cafile, buffer_size=BUFFER_SIZE, secure=True,
           progress=None, proxy_url=None, max_workers=MAX_WORKERS,
           member=None, backing_chain=True, disk_is_zero=False,
           verify=False, safe=False, retry=None, journal=None):
    """
    Upload the image in filename (any format qemu reads: raw, qcow2,
    vmdk, vhdx, vdi, ISO...) to the transfer URL url, as guest data.

    Args:
        filename (str): the image to upload, or a urlsource.Source (an
            image at an HTTP(S) URL, open_url()); member, backing_chain
            and safe do not apply to it: a remote image never has its
            backing or data files followed.
        url (str): transfer URL on the host running imageio, e.g.
            https://host:54322/images/<ticket-id>.
        cafile (str): CA certificates file to verify the server with
            (None: the system's CAs).
        buffer_size (int): bytes read and sent at a time, per worker.
        secure (bool): verify the server's certificate and host name.
        progress: an object with a `size` attribute and an `update(n)`
            method (e.g. ProgressBar), or an update(n) callable.
        proxy_url (str): transfer URL of the proxy, used if url cannot be
            reached.
        max_workers (int): connections to use (at most what the server
            allows).
        member (str): upload this file of the tar (OVA) filename, the name
            `tar tf vm.ova` shows.
        backing_chain (bool): upload a qcow2 with its backing chain (the
            default). False uploads only the top layer, keeping
            unallocated areas unallocated (for an empty snapshot).
        disk_is_zero (bool): the target disk is known to read zeros: zero
            extents are skipped without asking the server.
        verify (bool): after uploading, compare the server's checksum
            with the local image's; raise ChecksumMismatch if they differ.
        safe (bool): refuse an image that names other files (a backing
            file, a qcow2 external data file, vmdk extents outside its
            folder) with UnsafeImage, before anything is sent, and open
            it so that qemu follows no backing file (check_source()).
            Off by default, as in upstream's library, which uploads
            backing chains. Turn it on whenever the image comes from
            someone else: a downloaded disk, a guest's disk, a file a
            user hands in. qemu would read the files it names, and the
            upload would send them.
        retry (Retry): how requests failing with a network error (a
            connection cut or reset, a timeout, a 503) are retried on a
            new connection; None: the default, 5 attempts with a backoff
            of 0.5 seconds doubling to 8. Retry(attempts=1): none.
        journal: resume an interrupted upload: an object with `ranges`,
            the (start, length) ranges already uploaded, which are not
            sent again, and `add(start, length)`, called from the worker
            threads for each range uploaded. None (the default): upload
            everything.

    Zero extents are never sent as bytes: they are zeroed on the server,
    or skipped where the server reports its image already reads zeros.

    Raises TransferError (with the failed operation, range, HTTP status
    and server message), errors.PeerError (the server refused the
    transfer), OSError (network), qemu_img.Error, ChecksumMismatch.
    """
    if not isinstance(filename, (str, bytes, os.PathLike)):
        return _upload_url(
            filename, url, cafile, buffer_size=buffer_size, secure=secure,
            progress=progress, proxy_url=proxy_url, max_workers=max_workers,
            disk_is_zero=disk_is_zero, verify=verify, retry=retry,
            journal=journal)
    if verify and not backing_chain:
        raise ValueError("verify=True needs backing_chain=True: the server "
                         "checksums the whole disk, backing chain included")
    buffer_size = _buffer_size(buffer_size)
    progress = _progress.wrap(progress)
    image_info = info(filename, member=member)
    if safe:
        sources.check(filename, image_info, member=member)

    with _open_remote(url, cafile, secure, proxy_url) as dst:
        workers = max(1, min(max_workers, dst.max_writers))
        # A checked image has no backing file: opened without one, qemu
        # cannot follow one added since.
        with _open_local(filename, image_info, read_only=True,
                         shared=workers + 1,
                         backing_chain=backing_chain and not safe) as src:
            transfer.upload(
                src, dst,
                max_workers=workers,
                buffer_size=buffer_size,
                # A zero disk needs no zeroing, unless holes must hide a
                # backing chain's data.
                zero=not (disk_is_zero and backing_chain),
                # Without the backing chain, holes stay unallocated so
                # they expose the target's backing chain.
                hole=backing_chain,
                progress=progress,
                **_retry_options(retry, journal))
            if verify:
                _set_phase(progress, "verifying upload")
                with src.connect() as image:
                    transfer.verify(image, dst, "upload")


def open_url(url, headers=None, **options):
    """
    Probe the image at an http:// or https:// URL and return a
    urlsource.Source to give upload() (as its filename); close it when
    done (it is a context manager). headers: {name: value} sent with
    every request. Options (urlsource.open()): cafile (the source's CA),
    secure, allow_redirect_host, refresh (called on 401 for new headers),
    max_connections, timeout. Raises urlsource.Error,
    sources.UnsafeImage (a backing or data file), qemu_img.Error.
    """
    # Imported here: ssl contexts, ipaddress and tempfile are for URL
    # sources only.
    from . import urlsource
    return urlsource.open(url, headers, **options)


def _upload_url(src, url, cafile, *, buffer_size, secure, progress,
                proxy_url, max_workers, disk_is_zero, verify, retry,
                journal):
    """
    upload() of a urlsource.Source (an image at an HTTP(S) URL, probed
    and checked: no backing or data file is ever followed). A server
    with ranges: qemu-nbd reads the image through the source's NBD
    export with up to max_workers ranged GETs at once, converting the
    format on the fly; a qcow2's allocation map and, for raw, the zero
    blocks found in the data decide what is sent; verify reads the
    source again. Without ranges (raw only): read once, in order, on one
    connection; verify compares the checksum computed while sending.
    """
    buffer_size = _buffer_size(buffer_size)
    progress = _progress.wrap(progress)
    with _open_remote(url, cafile, secure, proxy_url) as dst:
        if not src.ranges:
            if journal is not None and journal.ranges:
                raise ValueError(f"{src.url} serves no ranges: an upload "
                                 f"from it cannot be resumed")
            _upload_stream(src, dst, buffer_size, disk_is_zero, verify,
                           progress)
            return
        workers = max(1, min(max_workers, dst.max_writers))
        with src.export(shared=workers + 1) as exp:
            transfer.upload(
                exp, dst,
                max_workers=workers,
                buffer_size=buffer_size,
                zero=not disk_is_zero,
                progress=progress,
                detect_zeros=src.format == "raw",
                **_retry_options(retry, journal))
            if verify:
                _set_phase(progress, "verifying upload")
                with exp.connect() as image:
                    transfer.verify(image, dst, "upload")


def _upload_stream(src, dst, buffer_size, disk_is_zero, verify, progress):
    hasher = None
    if verify:
        from ovirt_imageio import checksum as blkhash
        hasher = blkhash.Hasher()
    transfer.upload_stream(
        src.stream_into, src.size, dst, buffer_size=buffer_size,
        zero=not disk_is_zero, progress=progress,
        hasher=hasher.update if hasher else None)
    if verify:
        _set_phase(progress, "verifying upload")
        transfer.verify_streamed(hasher.result(), dst, "upload")


def download(url, filename, cafile, fmt="qcow2", incremental=False,
             buffer_size=BUFFER_SIZE, secure=True, progress=None,
             proxy_url=None, max_workers=MAX_WORKERS, backing_file=None,
             backing_format=None, verify=False, retry=None, journal=None):
    """
    Download the image at the transfer URL url into a new image filename
    in format fmt ("qcow2" or "raw"). Zero and unallocated areas are not
    transferred and stay unallocated.

    Args:
        url (str): transfer URL on the host running imageio.
        filename (str): the image to create (replaced if it exists).
        cafile (str): CA certificates file (None: the system's CAs).
        fmt (str): "qcow2" (default) or "raw".
        incremental (bool): download only the blocks changed since the
            backup's checkpoint (dirty extents); needs fmt="qcow2".
        buffer_size (int): bytes received and written at a time, per
            worker.
        secure (bool): verify the server's certificate and host name.
        progress: as for upload().
        proxy_url (str): transfer URL of the proxy, used if url cannot be
            reached.
        max_workers (int): connections to use (at most what the server
            allows).
        backing_file (str): create the qcow2 on top of this image (e.g.
            the previous backup); zeros are then written where the
            server's image reads zeros, to hide the backing file's data.
        backing_format (str): the backing file's format (probed if not
            given).
        verify (bool): after downloading, compare the server's checksum
            with the local image's (through its backing chain); raise
            ChecksumMismatch if they differ.
        retry (Retry): as for upload().
        journal: as for upload(). With ranges done, the download is
            resumed into the existing filename (its format and size
            checked, not created again), and only the other ranges are
            downloaded. With a journal the partial filename is kept on
            failure, to be resumed.

    filename may be a block device (or a link to one): raw writes the
    image's size bytes at its start, zeros included, and fails before
    writing anything if the device is smaller than the image or in use
    (mounted); qcow2 formats it. The device may be larger than the image.

    If the download fails, the partly written filename is removed (but
    not after a checksum mismatch, to let you look at it); a block device
    is never removed.
    """
    if incremental and fmt != "qcow2":
        raise ValueError(
            f"incremental={incremental} is incompatible with fmt={fmt}")
    if backing_file is not None and fmt != "qcow2":
        raise ValueError(f"backing_file needs fmt=qcow2, not {fmt}")
    if verify and incremental and backing_file is None:
        raise ValueError(
            "verify=True with incremental=True needs backing_file: only "
            "the whole chain equals the server's image")
    buffer_size = _buffer_size(buffer_size)
    progress = _progress.wrap(progress)
    # Ranges done: the image exists, partly written.
    resuming = journal is not None and bool(journal.ranges)

    with _open_remote(url, cafile, secure, proxy_url) as src:
        workers = max(1, min(max_workers, src.max_readers))
        # Ask for what we need before creating anything: a server that
        # cannot give dirty extents fails here.
        size = src.size
        src.extents("dirty" if incremental else "zero")

        if backing_file is not None and backing_format is None:
            backing_format = _probe_backing_format(filename, backing_file)
        device = rawfile.is_block_device(filename)
        raw_device = device and fmt == "raw"
        if device:
            # A qcow2 needs no more than its data; a raw image its size.
            rawfile.check_device(filename, size if raw_device else None)
        if raw_device:
            # Written directly, zeros included (rawfile.py).
            dst = rawfile.Export(filename, size, read_only=False)
        elif backing_file is None and rawfile.usable(filename, fmt):
            # Written directly, without a qemu-nbd (rawfile.py).
            if resuming:
                _check_partial(filename, fmt, size)
            else:
                rawfile.create(filename, size)
            dst = rawfile.Export(filename, size, read_only=False)
        else:
            if resuming:
                _check_partial(filename, fmt, size)
            else:
                qemu_img.create(filename, fmt, size=size,
                                backing_file=backing_file,
                                backing_format=backing_format)
            # qemu-nbd starts only if something is written or verified.
            dst = local.open_lazily(filename, fmt, read_only=False,
                                    shared=workers + 1)
        try:
            with dst:
                transfer.download(
                    src, dst,
                    dirty=incremental,
                    # Only a backing file (or a raw device's old
                    # contents, also under its holes) can show through;
                    # a new image reads zeros where nothing is written.
                    zero=raw_device or backing_file is not None,
                    hole=raw_device,
                    max_workers=workers,
                    buffer_size=buffer_size,
                    progress=progress,
                    **_retry_options(retry, journal))
                if verify:
                    _set_phase(progress, "verifying download")
                    with dst.connect() as image:
                        transfer.verify(image, src, "download")
        except transfer.ChecksumMismatch:
            raise
        except BaseException:
            # A journal's partial image is kept to be resumed.
            if not device and journal is None:
                _remove(filename)
            raise


def _retry_options(retry, journal):
    """transfer.upload() and download()'s retry, skip and done."""
    options = {"retry": transfer.RETRY if retry is None else retry}
    if journal is not None:
        options["skip"] = list(journal.ranges)
        options["done"] = journal.add
    return options


def _check_partial(filename, fmt, size):
    """A download resumed into filename: it must be the image started."""
    found = qemu_img.info(filename)
    if found["format"] != fmt or found["virtual-size"] != size:
        raise ValueError(
            f"Cannot resume the download into {filename}: it is a "
            f"{found['format']} image of {found['virtual-size']} bytes, "
            f"expecting {fmt} of {size} bytes")


def info(filename, member=None):
    """
    Return `qemu-img info` of filename as a dict. With member, filename
    is a tar file, and the information is of its file member, with
    "member-offset" and "member-size" added (where its bytes are in the
    tar file).
    """
    if member:
        offset, size = _find_member(filename, member)
        result = qemu_img.info(local.json_spec(filename, offset, size))
        result["member-offset"] = offset
        result["member-size"] = size
        return result
    return qemu_img.info(filename)


def check_source(filename, member=None):
    """
    Raise UnsafeImage if the image in filename (or its tar member) names
    other files that qemu would read and an upload would send: a backing
    file, a qcow2 external data file, vmdk extents outside its folder or
    by absolute path. upload(safe=True) runs this first.
    """
    sources.check(filename, info(filename, member=member), member=member)


def measure(filename, dst_fmt, member=None):
    """
    Return `qemu-img measure` of converting filename (or its tar member)
    to dst_fmt: {"required": ..., "fully-allocated": ...}.
    """
    if member:
        offset, size = _find_member(filename, member)
        result = qemu_img.measure(local.json_spec(filename, offset, size),
                                  dst_fmt)
        result["member-offset"] = offset
        result["member-size"] = size
        return result
    return qemu_img.measure(filename, dst_fmt)


def checksum(filename, member=None, block_size=_CHECKSUM_BLOCK_SIZE,
             algorithm=_CHECKSUM_ALGORITHM, detect_zeroes=True,
             backing_chain=True):
    """
    Return the checksum of the guest data of filename (or its tar
    member): {"algorithm", "block_size", "checksum"}, equal to the
    server's /checksum of the same image with the same block size and
    algorithm. Zero blocks are always detected (detect_zeroes is kept for
    compatibility; the result does not depend on it). backing_chain=False
    reads a qcow2 without its backing files (unallocated areas read as
    zeros): the checksum of one layer, equal to the server's for a
    shallow transfer of it.
    """
    from ovirt_imageio import checksum as blkhash

    image_info = info(filename, member=member)
    with _open_local(filename, image_info, read_only=True, shared=1,
                     backing_chain=backing_chain) as exp:
        with exp.connect() as image:
            return blkhash.compute(image, algorithm=algorithm,
                                   block_size=block_size)


def extents(filename, member=None, bitmap=None):
    """
    Iterate over the extents of filename's guest data (or of its tar
    member), as the /extents API reports them: ZeroExtent items, or
    DirtyExtent items for the dirty bitmap bitmap.

    The image is read (and its qemu-nbd stopped) on the first next().
    """
    image_info = info(filename, member=member)
    context = "zero" if bitmap is None else "dirty"
    with _open_local(filename, image_info, read_only=True, shared=1,
                     bitmap=bitmap) as exp:
        with exp.connect() as image:
            found = image.extents(context)
    for ext in found:
        yield _public_extent(ext)


class ZeroExtent(collections.namedtuple("ZeroExtent",
                                        "start,length,zero,hole")):
    """
    An extent of an image (as upstream's): start, length, zero (reads as
    zeros), hole (unallocated: reads from the backing chain, if any).
    """
    __slots__ = ()

    @classmethod
    def from_dict(cls, d):
        return cls(d["start"], d["length"], d["zero"], d.get("hole"))

    @property
    def data(self):
        """True if the extent may hold non-zero bytes."""
        return not self.zero

    def to_dict(self):
        return {"start": self.start, "length": self.length,
                "zero": self.zero, "hole": self.hole}


class DirtyExtent(collections.namedtuple("DirtyExtent",
                                         "start,length,dirty,zero")):
    """
    An extent of an image during an incremental backup: dirty (changed
    since the checkpoint), zero (reads as zeros).
    """
    __slots__ = ()

    @classmethod
    def from_dict(cls, d):
        return cls(d["start"], d["length"], d["dirty"], d.get("zero", False))

    @property
    def data(self):
        """True if the extent may hold non-zero bytes."""
        return not self.zero

    def to_dict(self):
        return {"start": self.start, "length": self.length,
                "dirty": self.dirty, "zero": self.zero}


class ImageioClient:
    """
    A client for one image on an imageio server: random access reads,
    writes and zeroing over one persistent connection (the unix socket
    when the server is on this host).
    """

    def __init__(self, transfer_url, cafile=None, secure=True,
                 proxy_url=None, buffer_size=BUFFER_SIZE):
        """
        Args:
            transfer_url (str): transfer URL on the host running imageio.
            cafile (str): CA certificates file (None: the system's CAs).
            secure (bool): verify the server's certificate and host name.
            proxy_url (str): the proxy's transfer URL, used if
                transfer_url cannot be reached.
            buffer_size (int): buffer for read_from() and write_to().
        """
        self._image = _open_remote(transfer_url, cafile, secure, proxy_url)
        self._buffer_size = _buffer_size(buffer_size)
        self._buf = None

    @property
    def max_readers(self):
        """How many clients may read the image at once."""
        return self._image.max_readers

    @property
    def max_writers(self):
        """How many clients may write the image at once."""
        return self._image.max_writers

    def size(self):
        """The image's virtual size in bytes."""
        return self._image.size

    def extents(self, context="zero"):
        """
        Iterate over the image's extents: ZeroExtent for "zero",
        DirtyExtent for "dirty" (during incremental backup only).
        """
        for ext in self._image.extents(context):
            yield _public_extent(ext)

    def read(self, offset, buffer):
        """
        Fill buffer (bytearray, mmap, memoryview) with the bytes at offset
        and return its length. Raises RuntimeError if the range ends after
        the image's end.
        """
        length = _nbytes(buffer)
        if offset + length > self._image.size:
            raise RuntimeError("Read out of image bounds")
        self._image.read_into(buffer, offset)
        return length

    def write(self, offset, buffer):
        """
        Write buffer (bytes, bytearray, mmap...) at offset (not flushed:
        call flush()). Raises RuntimeError if the range ends after the
        image's end.
        """
        if offset + _nbytes(buffer) > self._image.size:
            raise RuntimeError("Write out of image bounds")
        self._image.write(buffer, offset)

    def zero(self, offset, length):
        """Make length bytes at offset read as zeros (not flushed)."""
        self._image.zero(length, offset)

    def flush(self):
        """Flush what was written to storage."""
        self._image.flush()

    def read_from(self, reader, offset, length):
        """
        Send length bytes from reader (anything with readinto(buf), e.g.
        a file) to offset, in one request.
        """
        self._image.receive(_Reader(reader), offset, length,
                            buf=self._buffer())

    def write_to(self, writer, offset, length):
        """
        Get length bytes at offset and write them to writer (anything
        with write(buf), e.g. a file), in one request.
        """
        self._image.send(_Writer(writer), offset, length, buf=self._buffer())

    def close(self):
        """Close the connection."""
        self._image.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        try:
            self.close()
        except Exception:
            # Do not hide the error of the with block.
            if kind is None:
                raise
            log.exception("Error closing client")

    def _buffer(self):
        if self._buf is None:
            self._buf = bytearray(self._buffer_size)
        return self._buf


# Private


class _Reader:
    """A file's readinto() as an image's receive() source: a callable
    filling the whole buffer (ovirt_imageio/image.py)."""

    def __init__(self, reader):
        self._reader = reader

    def __call__(self, buf):
        pos = 0
        while pos < len(buf):
            n = self._reader.readinto(buf[pos:])
            if not n:
                raise RuntimeError(
                    f"Expected {len(buf)} bytes from reader, got {pos}")
            pos += n


class _Writer:
    """A file's write() as an image's send() destination, a callable."""

    def __init__(self, writer):
        self._writer = writer

    def __call__(self, buf):
        pos = 0
        while pos < len(buf):
            n = self._writer.write(buf[pos:])
            # Buffered files and most writers return None or everything.
            if n is None:
                break
            pos += n


def _nbytes(buffer):
    with memoryview(buffer) as view:
        return view.nbytes


def _public_extent(ext):
    if isinstance(ext, nbd_extents.ZeroExtent):
        return ZeroExtent(ext.start, ext.length, ext.zero, ext.hole)
    return DirtyExtent(ext.start, ext.length, ext.dirty, ext.zero)


def _buffer_size(buffer_size):
    if buffer_size < 1:
        raise ValueError(f"Invalid buffer_size {buffer_size}")
    return min(buffer_size, transfer.MAX_BUFFER_SIZE)


def _open_remote(url, cafile, secure, proxy_url):
    """Open url; if it cannot be reached (OSError) and there is a proxy
    URL, open that instead."""
    try:
        return remote.RemoteImage(url, cafile=cafile, secure=secure)
    except OSError as e:
        if proxy_url is None:
            raise
        log.info("Cannot reach the transfer URL (%s), trying the proxy", e)
        return remote.RemoteImage(proxy_url, cafile=cafile, secure=secure)


def _open_local(filename, image_info, *, read_only, shared,
                backing_chain=True, bitmap=None):
    if (bitmap is None and "member-offset" not in image_info
            and rawfile.usable(filename, image_info["format"])):
        # Read directly, without a qemu-nbd (rawfile.py).
        return rawfile.Export(filename, image_info["virtual-size"],
                              read_only=read_only)
    return local.open(
        filename, image_info["format"],
        read_only=read_only,
        shared=shared,
        offset=image_info.get("member-offset"),
        size=image_info.get("member-size"),
        virtual_size=image_info.get("virtual-size"),
        backing_chain=backing_chain,
        bitmap=bitmap)


def _find_member(tarname, name):
    # Imported here: only OVA users need it, and it costs every command
    # ~2 ms (with its own imports) to start and exit.
    import tarfile

    with tarfile.open(tarname) as tar:
        member = tar.getmember(name)
        if not member.isfile():
            raise ValueError(f"Member {name!r} of {tarname} is not a file")
        return member.offset_data, member.size


def _probe_backing_format(filename, backing_file):
    # qemu resolves a relative backing file from the new image's
    # directory, and needs its format.
    path = backing_file
    if not os.path.isabs(path):
        path = os.path.join(os.path.dirname(os.path.abspath(filename)), path)
    return qemu_img.info(path)["format"]


def _set_phase(progress, phase):
    """Show the phase on a progress object that has one (ProgressBar)."""
    if progress is not None and hasattr(progress, "phase"):
        progress.phase = phase


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("Cannot remove %s: %s", path, e)
