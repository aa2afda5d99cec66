"""
ovirt-img's OpenStack Glance commands (../shared/CLIENTS.md section 4):

    ovirt-img export-glance -c engine1 --glance-url URL DISK_ID
    ovirt-img import-glance -c engine1 --glance-url URL -s nfs IMAGE_ID

Export: a new Glance image (disk_format raw or qcow2, container_format
bare, our own id so that it can be deleted even if Glance's answer to
the create never came) gets the disk's guest data through a download
transfer. Raw streams: the disk is read block by block from the daemon
(zero extents are not read, their zeros are made here) and sent as one
PUT /file, hashed as it goes. A qcow2 cannot be streamed (qemu writes
its tables after the data they map), so it is staged: downloaded into a
temporary qcow2 in --tmp-dir (as large as the disk's data plus its
tables; the log and the result say which file and how much), then sent.
Verified: Glance's size, checksum (MD5) and os_hash_value
(os_hash_algo, SHA-512 by default) must equal what we computed while
sending; and with --verify, what we sent must equal the disk (raw: the
daemon's checksum of the disk against the one computed over the bytes
sent; qcow2: download-disk's verification of the staged file). A
failure deletes the half-made image; if Glance cannot be reached to do
it (it stopped), the error names the image left behind.

Import: the image's metadata and its first bytes say what it is; the
disk is made for it and the image is uploaded into it (see
import_glance()).

Token: from --token-file, else glance_token in the config section;
read again when Glance answers 401 (Keystone tokens expire), and never
logged or put on a command line.
"""

import configparser
import hashlib
import logging
import os
import queue
import tempfile
import threading
import uuid

from ovirt_imageio import checksum as _blkhash

from . import _api as client
from . import _options as opts
from . import _ovirt
from . import _tool
from . import glance as _glance

log = logging.getLogger("ovirt-img")

# Read from the daemon and sent to Glance at a time: the checksum's
# block, so that each block is one ranged GET and its digest is computed
# from the buffer as it is.
BLOCK_SIZE = _blkhash.DEFAULT_BLOCK_SIZE

# Blocks read ahead of the one being sent to Glance (4 MiB each).
QUEUE_DEPTH = 4

# The reader thread ends with its current read: within the daemon
# connection's timeout.
READER_TIMEOUT = 90

# File bytes read and sent at a time when sending a staged image.
FILE_BUFFER = 4 * opts.MiB

# Where qcow2 images are staged without --tmp-dir or $TMPDIR: /tmp is
# often a small tmpfs (memory); /var/tmp is on disk.
DEFAULT_TMP_DIR = "/var/tmp"


class Error(_ovirt.Error):
    """A Glance command failed; the message says what is left where."""


# Export.

def export_glance(args):
    g = glance_client(args)
    with g, _tool.progress_bar(args, "connecting to glance") as bar:
        g.check()
        with _tool.connect(args) as engine:
            disk = engine.get_disk(args.disk_id)
            host = _tool._download_host(engine, disk)
            name = args.name or disk.alias or disk.name or disk.id
            image_id = args.image_id or str(uuid.uuid4())
            if args.format == "raw":
                result = _export_raw(args, engine, bar, g, disk, host,
                                     name, image_id)
            else:
                result = _export_qcow2(args, engine, bar, g, disk, host,
                                       name, image_id)
        bar.phase = "export completed"
    _tool._print_result(args, result)


def _export_raw(args, engine, bar, g, disk, host, name, image_id):
    """Stream the disk's bytes into a new raw image."""
    bar.phase = "creating transfer"
    with _tool.download_transfer(engine, bar, disk, host) as urls:
        with client._open_remote(urls[0], args.cafile, args.secure,
                                 urls[1]) as src:
            size = src.size
            bar.size = size
            sent = _Hashes()
            with _NewImage(bar, g, name, "raw", image_id, disk):
                bar.phase = "exporting image"
                blkhash = {}

                def write(send):
                    blkhash.update(_send_disk(src, send, sent, bar))

                g.upload(image_id, size, write)
                if args.verify:
                    bar.phase = "verifying export"
                    _verify_sent(args, urls, blkhash, disk)
                bar.phase = "verifying glance image"
                image = _check_image(g, image_id, size, sent)
    return _result(disk, image, sent, staged=None)


def _export_qcow2(args, engine, bar, g, disk, host, name, image_id):
    """Stage the disk in a temporary qcow2, then send the file."""
    tmp_dir = args.tmp_dir or os.environ.get("TMPDIR") or DEFAULT_TMP_DIR
    fd, path = tempfile.mkstemp(prefix="ovirt-img-export-",
                                suffix=".qcow2", dir=tmp_dir)
    os.close(fd)
    try:
        bar.size = disk.provisioned_size * 2
        log.info("Staging disk %s as qcow2 in %s", disk.id, path)
        bar.phase = "creating transfer"
        with _tool.download_transfer(engine, bar, disk, host) as urls:
            bar.phase = "staging image"
            client.download(
                urls[0], path, args.cafile,
                proxy_url=urls[1],
                fmt="qcow2",
                secure=args.secure,
                buffer_size=args.buffer_size,
                max_workers=args.max_workers,
                verify=args.verify,
                progress=_tool._Share(bar))
        staged = os.path.getsize(path)
        log.info("Staged %d bytes of disk %s in %s", staged, disk.id, path)
        sent = _Hashes()
        with _NewImage(bar, g, name, "qcow2", image_id, disk):
            bar.phase = "exporting image"
            with open(path, "rb") as f:
                g.upload(image_id, staged, lambda send: _send_file(
                    f, send, sent, _Scaled(bar, disk.provisioned_size,
                                           staged)))
            bar.phase = "verifying glance image"
            image = _check_image(g, image_id, staged, sent)
    finally:
        _tool._remove_file(path)
    return _result(disk, image, sent, staged={"path": path,
                                              "bytes": staged})


class _NewImage:
    """
    A new Glance image for the block; a failure in the block deletes it.
    If it cannot be deleted (Glance stopped), the error says it is left.
    """

    def __init__(self, bar, g, name, disk_format, image_id, disk):
        self._bar = bar
        self._g = g
        self._id = image_id
        self._create = dict(
            name=name, disk_format=disk_format, id=image_id,
            ovirt_disk_id=disk.id,
            description=f"Exported by ovirt-img from oVirt disk {disk.id}")

    def __enter__(self):
        self._bar.phase = "creating glance image"
        try:
            self._g.create(**self._create)
        except BaseException as e:
            # Glance may have made it and its answer been lost.
            if not isinstance(e, _glance.Error) or e.status is None:
                self._delete()
            raise
        log.info("Created Glance image %s", self._id)

    def __exit__(self, kind, error, tb):
        if kind is None:
            return False
        self._bar.phase = "deleting glance image"
        left = self._delete()
        if left is not None and isinstance(error, Exception):
            raise Error(f"{_tool.error_message(error)}; {left}") from error
        if left is not None:
            log.error("%s", left)
        return False

    def _delete(self):
        """None if deleted, else what is left, in words."""
        try:
            self._g.delete(self._id)
            log.info("Deleted Glance image %s", self._id)
            return None
        except Exception as e:
            log.info("Cannot delete Glance image %s: %s", self._id, e)
            return (f"Glance image {self._id} may be left half made (it "
                    f"could not be deleted: {_tool.error_message(e)}); "
                    f"delete it when Glance is back")


class _Hashes:
    """What Glance computes over the bytes it stores: MD5 (checksum) and
    SHA-512 (os_hash_value, Glance's default os_hash_algo)."""

    def __init__(self):
        self.md5 = hashlib.md5(usedforsecurity=False)
        self.sha512 = hashlib.sha512()
        self.length = 0

    def update(self, data):
        self.md5.update(data)
        self.sha512.update(data)
        self.length += len(data)


def _send_disk(src, send, hashes, bar):
    """
    Send the disk's bytes in order with send(), block by block of the
    daemon's checksum; returns that checksum of what was sent. A block
    that the zero extents cover is not read: zeros are sent.

    Reading and hashing overlap sending: a thread reads each block from
    the daemon and hashes it (MD5, SHA-512, the block's digest) while
    this one sends the block before to Glance; QUEUE_DEPTH blocks wait
    between them. Measured (a 256 MiB disk of random data, --no-verify,
    whole command, medians of 5 interleaved runs on a busy 2-core
    machine): 4.38 s against 5.25 s without the overlap; curl's PUT of
    the same file to Glance takes about 2 s (Glance hashes too).
    """
    size = src.size
    algorithm = _blkhash.DEFAULT_ALGORITHM
    outer = _blkhash._new(algorithm)
    length = min(BLOCK_SIZE, size)
    zeros = memoryview(bytes(length))
    free = queue.Queue()
    for _ in range(QUEUE_DEPTH + 1):
        free.put(memoryview(bytearray(length)))
    ready = queue.Queue()
    stop = threading.Event()

    def read():
        try:
            for offset, n, zero in _blkhash._blocks(
                    src.extents("zero"), size, BLOCK_SIZE):
                if stop.is_set():
                    return
                if zero:
                    buf = None
                    block = zeros[:n]
                    digest = _blkhash._zero_digest(algorithm, n)
                else:
                    buf = free.get()
                    if buf is None:
                        return
                    block = buf[:n]
                    src.read_into(block, offset)
                    digest = _blkhash._new(algorithm, block).digest()
                hashes.update(block)
                outer.update(digest)
                ready.put((block, buf))
            ready.put(None)
        except BaseException as e:
            ready.put(e)

    reader = threading.Thread(target=read, name="export/read", daemon=True)
    reader.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            block, buf = item
            send(block)
            bar.update(len(block))
            if buf is not None:
                free.put(buf)
    finally:
        stop.set()
        free.put(None)
        reader.join(READER_TIMEOUT)
    return {"algorithm": algorithm, "block_size": BLOCK_SIZE,
            "checksum": outer.hexdigest()}


def _send_file(f, send, hashes, progress):
    buf = bytearray(FILE_BUFFER)
    with memoryview(buf) as view:
        while True:
            n = f.readinto(buf)
            if not n:
                return
            with view[:n] as chunk:
                hashes.update(chunk)
                send(chunk)
            progress.update(n)


class _Scaled:
    """The staged file's bytes counted as the disk's: the bar of a qcow2
    export covers the disk twice, staging then sending."""

    def __init__(self, bar, disk_size, file_size):
        self._bar = bar
        self._disk_size = disk_size
        self._file_size = file_size or 1
        self._done = 0
        self._shown = 0

    def update(self, n):
        self._done += n
        shown = self._done * self._disk_size // self._file_size
        self._bar.update(shown - self._shown)
        self._shown = shown


def _verify_sent(args, urls, sent, disk):
    """The daemon's checksum of the disk against the bytes sent."""
    remote = _tool._remote_checksum(
        args, *urls, algorithm=sent["algorithm"],
        block_size=sent["block_size"])
    if remote["checksum"] != sent["checksum"]:
        raise Error(f"Verification failed: disk {disk.id}'s checksum "
                    f"{remote['checksum']} differs from that of the bytes "
                    f"sent, {sent['checksum']}")


def _check_image(g, image_id, length, sent):
    """Glance's image against what we sent; returns its metadata."""
    image = g.get(image_id)
    problems = []
    if image.get("status") != "active":
        problems.append(f"status {image.get('status')!r}, expecting "
                        f"'active'")
    if image.get("size") != length:
        problems.append(f"size {image.get('size')}, sent {length}")
    if image.get("checksum") != sent.md5.hexdigest():
        problems.append(f"checksum {image.get('checksum')}, sent "
                        f"{sent.md5.hexdigest()}")
    algo = image.get("os_hash_algo")
    if algo == "sha512":
        if image.get("os_hash_value") != sent.sha512.hexdigest():
            problems.append(f"os_hash_value {image.get('os_hash_value')}, "
                            f"sent {sent.sha512.hexdigest()}")
    elif algo:
        log.warning("Glance hashes with %s, not computed here: "
                    "os_hash_value not verified (checksum was)", algo)
    if problems:
        raise Error(f"Glance image {image_id} does not hold what was sent: "
                    f"{'; '.join(problems)}")
    return image


def _result(disk, image, sent, staged):
    return {
        "disk_id": disk.id,
        "image_id": image["id"],
        "name": image.get("name"),
        "disk_format": image.get("disk_format"),
        "size": image.get("size"),
        "virtual_size": image.get("virtual_size"),
        "checksum": image.get("checksum"),
        "os_hash_algo": image.get("os_hash_algo"),
        "os_hash_value": image.get("os_hash_value"),
        "staged_file": staged["path"] if staged else None,
        "staged_bytes": staged["bytes"] if staged else None,
    }


# Import.

def import_glance(args):
    """
    A new disk from a Glance image. What the image is comes from its
    bytes: the format and virtual size qemu reads from them (urlsource's
    probe: raw or qcow2, no backing or data file), an ISO by its volume
    descriptor. Glance's metadata must agree (its disk_format is only a
    hint, and virtual_size may be null, but a qcow2 called raw, a size
    other than the bytes' or a virtual size other than the header's is an
    error: the image is not what its owner said). Then as upload-disk:
    the disk is made (our own id), the image uploaded through the
    urlsource reader (ranged GETs, several at once, read by qemu, only
    data extents sent), and with --verify the disk's checksum compared
    with the source's read through qemu. A failure removes the disk; an
    image deleted or deactivated meanwhile is named as the cause.
    """
    g = glance_client(args)
    with g, _tool.progress_bar(args, "inspecting image") as bar:
        g.check()
        meta = g.get(args.image_id)
        _check_active(meta)
        if args.name is None:
            args.name = meta.get("name") or meta["id"]
        with _open_source(args, g, meta) as src:
            image = _inspect_source(args, meta, src)
            with _tool.connect(args) as engine:
                disk_id = _import(args, engine, bar, g, src, image)
        bar.phase = "import completed"
    _tool._print_result(args, {
        "image_id": meta["id"],
        "disk_id": disk_id,
        "format": image.format,
        "virtual_size": image.size,
        "iso": image.iso,
    })


def _check_active(meta):
    status = meta.get("status")
    if status != "active":
        raise Error(f"Glance image {meta.get('id')} is {status}, not "
                    f"active: it has no data to import")


def _open_source(args, g, meta):
    """The image's data as a urlsource.Source, with the token as a
    header, asked for again when Glance answers 401."""
    source = token_source(args)
    current = [g.current_token()]

    def refresh():
        token = source()
        if token == current[0]:
            return None
        log.info("Glance refused the token; using the token read again")
        current[0] = token
        return {"X-Auth-Token": token}

    url = f"{args.glance_url}/v2/images/{meta['id']}/file"
    try:
        return client.open_url(
            url, {"X-Auth-Token": current[0]},
            cafile=args.glance_cafile, refresh=refresh,
            max_connections=args.max_workers)
    except Exception as e:
        raise Error(f"Cannot read Glance image {meta['id']}: "
                    f"{_tool.error_message(e)}") from e


def _inspect_source(args, meta, src):
    """What the bytes are, checked against Glance's metadata."""
    image_id = meta["id"]
    problems = []
    if meta.get("size") not in (None, src.size):
        problems.append(f"Glance's size is {meta['size']}, the data has "
                        f"{src.size} bytes")
    hint = meta.get("disk_format")
    if hint in ("raw", "qcow2") and hint != src.format:
        problems.append(f"Glance's disk_format is {hint}, the data is a "
                        f"{src.format} image")
    elif hint not in ("raw", "qcow2", "iso", None):
        log.info("Glance image %s: disk_format %s, but the data is %s",
                 image_id, hint, src.format)
    virtual = meta.get("virtual_size")
    if virtual is not None and virtual != src.virtual_size:
        problems.append(f"Glance's virtual_size is {virtual}, the data's "
                        f"is {src.virtual_size}")
    if problems:
        raise Error(f"Glance image {image_id} is not what Glance says: "
                    f"{'; '.join(problems)}")
    image = _tool.Image(src.format, src.virtual_size)
    if src.format == "raw":
        image.iso = _is_iso(src)
    if args.format == "qcow2" and not args.preallocated and not image.iso:
        image.required = client.measure(src.qemu_spec(), "qcow2")["required"]
    log.info("Glance image %s: format %s, virtual size %d%s", image_id,
             image.format, image.size, ", ISO" if image.iso else "")
    return image


def _is_iso(src):
    end = _tool.ISO_OFFSET + len(_tool.ISO_MAGIC)
    if src.size < end:
        return False
    buf = bytearray(len(_tool.ISO_MAGIC))
    src.read_into(buf, _tool.ISO_OFFSET)
    return buf == _tool.ISO_MAGIC


def _import(args, engine, bar, g, src, image):
    """Create the disk and upload src into it; returns the disk's id."""
    sd = engine.storage_domain(args.storage_domain)
    block = engine.is_block(sd)
    args.filename = src.url
    params = _tool.disk_params(args, image, block)
    params.setdefault("id", str(uuid.uuid4()))
    bar.phase = "creating disk"
    try:
        disk = engine.add_disk(storage_domain=sd.name, **params)
    except BaseException as e:
        if args.disk_id is None:
            bar.phase = "removing disk"
            _tool._cleanup(engine.remove_disk, params["id"])
        elif not isinstance(e, _ovirt.Error):
            log.warning("Disk %s may have been created", args.disk_id)
        raise
    log.info("Created disk %s", disk.id)
    try:
        disk = engine.wait_for_disk(disk.id, args.disk_timeout)
        host = engine.this_host(sd.name)
        bar.phase = "creating transfer"
        transfer = engine.add_transfer(disk, "upload", host)
    except BaseException:
        bar.phase = "removing disk"
        _tool._cleanup(_tool._remove_new_disk, engine, disk.id)
        raise
    try:
        transfer = engine.wait_for_transfer(transfer)
        bar.phase = "uploading image"
        url, proxy_url = _tool.transfer_urls(transfer)
        client.upload(
            src, url, args.cafile,
            proxy_url=proxy_url,
            secure=args.secure,
            buffer_size=args.buffer_size,
            max_workers=args.max_workers,
            disk_is_zero=_tool.new_disk_is_zero(params, block),
            verify=args.verify,
            progress=bar)
    except BaseException as e:
        # The engine removes the disk of a cancelled upload.
        bar.phase = "cancelling transfer"
        _tool._cleanup(engine.cancel_transfer, transfer)
        if isinstance(e, Exception):
            gone = _image_gone(g, args.image_id)
            if gone:
                raise Error(f"{gone} during the import "
                            f"({_tool.error_message(e)}); disk {disk.id} is "
                            f"removed") from e
        raise
    bar.phase = "finalizing transfer"
    engine.finalize_transfer(transfer, disk.id)
    return disk.id


def _image_gone(g, image_id):
    """Why the image cannot be read any more, or None."""
    try:
        meta = g.get(image_id)
    except _glance.NotFound:
        return f"Glance image {image_id} was deleted"
    except Exception as e:
        log.debug("Cannot get Glance image %s: %s", image_id, e)
        return None
    if meta.get("status") != "active":
        return f"Glance image {image_id} became {meta.get('status')}"
    return None


# Glance access.

def glance_client(args):
    return _glance.Client(args.glance_url, token_source(args),
                          cafile=args.glance_cafile)


def token_source(args):
    """A callable returning the token, read anew on each call: from
    --token-file, else from glance_token in the config section."""
    if args.token_file is not None:
        return lambda: _read_token_file(args.token_file)
    if getattr(args, "glance_token", None) is None:
        raise Error("No Glance token: give --token-file or glance_token in "
                    "the config file")
    first = [args.glance_token]

    def from_config():
        if first:
            return first.pop()
        return _read_config_token(args) or args.glance_token

    return from_config


def _read_token_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise Error(f"Cannot read token file {path}: {e}") from None
    if not value:
        raise Error(f"Token file {path} is empty")
    return value


def _read_config_token(args):
    cfg = configparser.ConfigParser(interpolation=None)
    try:
        with open(opts.config_path(), encoding="utf-8") as f:
            cfg.read_file(f)
        return cfg.get(args.config, "glance_token", fallback=None)
    except (OSError, UnicodeDecodeError, configparser.Error):
        return None


# Command line.

GLANCE_OPTIONS = (
    opts.Option("--glance-url", type=opts.url, required=True,
                help="Glance's endpoint, e.g. https://glance.example.com"
                     ":9292"),
    opts.Option("--token-file", key="glance_token_file",
                type=opts.existing_file,
                help="read the Keystone token (X-Auth-Token) from this "
                     "file, again whenever Glance answers 401 (default: "
                     "the config file's glance_token)"),
    opts.Option("--glance-cafile",
                help="CA certificates to verify Glance with (default: the "
                     "system's)"),
)


def add_commands(p):
    opts.Command(
        p, "export-glance", export_glance,
        "Export a disk to a new OpenStack Glance image: raw is streamed, "
        "qcow2 staged in a temporary file first; Glance's hashes are "
        "checked against the bytes sent.",
        options=GLANCE_OPTIONS + (
            opts.Option("-f", "--format", choices=("raw", "qcow2"),
                        type=opts.choice("raw", "qcow2"), config=False,
                        default="qcow2",
                        help="the image's disk_format (default qcow2: "
                             "staged in --tmp-dir, about the size of the "
                             "disk's data; raw streams all of the disk's "
                             "virtual size, zeros included)"),
            opts.Option("--name", config=False,
                        help="the image's name (default: the disk's "
                             "alias)"),
            opts.Option("--image-id", type=opts.disk_id, config=False,
                        help="the new image's id (default: a new UUID)"),
            opts.Option("--tmp-dir", key="glance_tmp_dir",
                        help=f"where a qcow2 is staged (default: $TMPDIR, "
                             f"else {DEFAULT_TMP_DIR})"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the disk's checksum with the bytes "
                           "sent (default: on); Glance's hashes are "
                           "always checked"),
        ),
        positionals=[(("disk_id",), dict(
            metavar="DISK_ID", type=_tool._argtype(opts.disk_id),
            help="the disk's id"))])
    opts.Command(
        p, "import-glance", import_glance,
        "Create a disk from an OpenStack Glance image and upload the image "
        "into it, read from Glance with ranged GETs (format and size from "
        "the image's bytes; Glance's metadata must agree).",
        options=GLANCE_OPTIONS + (
            opts.Option("-s", "--storage-domain", required=True,
                        config=False, help="the storage domain's name"),
            opts.Option("-f", "--format", choices=("raw", "qcow2"),
                        type=opts.choice("raw", "qcow2"), config=False,
                        default="qcow2",
                        help="the disk's format (default qcow2; an ISO is "
                             "always raw)"),
            opts.Flag("--preallocated", config=False, default=False,
                      help="allocate the whole disk (default: sparse)"),
            opts.Option("--disk-id", type=opts.disk_id, config=False,
                        help="the new disk's id (default: a new UUID)"),
            opts.Option("--name", config=False,
                        help="the disk's name (default: the image's)"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the disk's checksum with the image's, "
                           "read through qemu, before finalizing (default: "
                           "on)"),
        ),
        positionals=[(("image_id",), dict(
            metavar="IMAGE_ID", type=_tool._argtype(opts.disk_id),
            help="the Glance image's id"))])
