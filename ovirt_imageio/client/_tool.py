"""
ovirt-img: upload a disk image to an oVirt storage domain, or download
an oVirt disk, in one command, with upstream ovirt-img 2.5.1's options,
output and exit codes (ENGINE-SIM.md section 4).

    ovirt-img upload-disk -c engine1 -s nfs-01 fedora.qcow2
    ovirt-img download-disk -c engine1 DISK_ID fedora.qcow2
    ovirt-img checksum -c engine1 DISK_ID
    ovirt-img info -c engine1 -o json DISK_ID
    ovirt-img download-snapshot -c engine1 DISK_ID DIR
    ovirt-img upload-snapshot -c engine1 -s nfs-01 --vm VM_ID DIR/TOP.qcow2
    ovirt-img backup-disk -c engine1 DISK_ID full.qcow2
    ovirt-img export-glance -c engine1 --glance-url URL DISK_ID
    ovirt-img import-glance -c engine1 --glance-url URL -s nfs-01 IMAGE_ID

Upload: inspect the image with qemu-img, create a disk of the right
format, allocation and initial size for the storage domain, wait for it,
start an upload transfer (on this host when it is an oVirt host), copy
the guest data with the client library (over the unix socket when the
server is local, the proxy if the host cannot be reached), check the
server's checksum against the image's, finalize. A failure once the
transfer exists cancels it, and the engine removes the new disk; a
failure before that removes the disk here.

Download: start a download transfer of the disk, download it as raw or
qcow2 into a file or onto a block device, verify, and always finalize
(a download cannot harm the disk).

Checksum: the daemon's checksum of the disk's guest data, computed on the
host through a download transfer (nothing crosses the network but the
answer), always finalized. It is the value ovirt_imageio.client.checksum()
gives for a local image with the same algorithm and block size, so a copy
can be checked against the disk.

Info: what the engine knows of a disk, as text or one JSON object.

Backup: a full or incremental backup of a VM's disk through the VM backup
API, into a qcow2 (an incremental on top of the previous backup); never a
silent full copy when an incremental cannot be had.

Resume: requests failing on the network are retried on new connections;
past the retries an upload is paused (a download kept), a journal of the
completed ranges is kept, and --resume TRANSFER_ID sends only what is
missing (_journal.py).

Safe sources: an upload source that names other files (backing file,
data file, vmdk extents elsewhere) is refused unless --allow-backing
(sources.py).

URL sources: upload-disk's FILE may be an http:// or https:// URL of a
raw or qcow2 image, read through our own reader (urlsource.py) with
--header / --header-file (values never logged), --source-cafile and
--allow-redirect-host; a remote image's backing or data file is always
refused, and such an upload is not resumable.

Snapshots: download-snapshot copies a disk's layers (its disk snapshots
and the active layer) into a folder as a local qcow2 chain, one file per
layer; upload-snapshot makes a new disk with the same layers from such a
chain, through VM snapshots of a VM it attaches the disk to
(doc/engine-api.md).

Glance: export-glance makes a new OpenStack Glance image from a disk,
import-glance a new disk from a Glance image (_tool_glance.py).

Exit codes: 0 done, 1 failed (one line on stderr; the traceback in the
debug log), 2 usage, 128+N killed by signal N (SIGINT, SIGTERM), after
cleaning up.
"""

import contextlib
import getpass
import json
import logging
import os
import re
import shlex
import signal
import stat
import sys
import uuid

from ovirt_imageio import checksum as _blkhash
from ovirt_imageio import errors

from . import _api as client
from . import _journal
from . import _options as opts
from . import _ovirt
from . import progress as _progress
from . import qemu_img
from . import sources
from . import transfer as _transfer

log = logging.getLogger("ovirt-img")

LOG_FORMAT = ("%(asctime)s %(levelname)-7s (%(threadName)s) [%(name)s] "
              "%(message)s")

# An ISO 9660 image: the primary volume descriptor at 32 KiB.
ISO_OFFSET = 0x8000
ISO_MAGIC = b"\x01CD001\x01\x00"

# --resume's help; the transfer's inactivity timeout is stated here.
RESUME_HELP = (
    "finish the {what} of an earlier run that failed: the same FILE, "
    "sending only the ranges its journal ($XDG_STATE_HOME/ovirt-img/"
    "TRANSFER_ID.json) lacks. When the network fails for longer than "
    "the retries, ovirt-img {verb} the transfer and prints this "
    "command; if ovirt-img is killed, the engine pauses the transfer "
    "after {timeout} seconds without a client (its inactivity timeout) "
    "instead of cancelling it; either way it can be resumed. Ctrl-C and "
    "SIGTERM cancel it as before")

# Tar (OVA) members that are not disks.
_NOT_DISKS = (".ovf", ".mf", ".cert", ".nvram")


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM, as SIGINT raises
    KeyboardInterrupt: everything started is stopped on the way out."""

    def __init__(self, signo):
        super().__init__(signo)
        self.signo = signo


# Upload.

def upload_disk(args):
    if args.resume:
        return _resume_upload(args)
    with progress_bar(args, "inspecting image") as bar, \
            _url_source(args) as source:
        image = inspect_image(args, source)
        with connect(args) as engine:
            sd = engine.storage_domain(args.storage_domain)
            block = engine.is_block(sd)
            params = disk_params(args, image, block)
            if args.disk_id is None:
                # Our own new id: the disk is ours to remove even if the
                # engine's answer never came (Ctrl-C while it worked).
                params["id"] = str(uuid.uuid4())
            bar.phase = "creating disk"
            try:
                disk = engine.add_disk(storage_domain=sd.name, **params)
            except BaseException as e:
                if args.disk_id is None:
                    bar.phase = "removing disk"
                    _cleanup(engine.remove_disk, params["id"])
                elif not isinstance(e, _ovirt.Error):
                    # Not refused: the engine may have made it, or the
                    # disk may be someone else's.
                    log.warning("Disk %s may have been created",
                                args.disk_id)
                raise
            log.info("Created disk %s", disk.id)
            try:
                disk = engine.wait_for_disk(disk.id, args.disk_timeout)
                host = engine.this_host(sd.name)
                bar.phase = "creating transfer"
                # An upload from a URL has no journal to resume with.
                transfer = engine.add_transfer(disk, "upload", host,
                                               resumable=source is None)
            except BaseException:
                # No transfer we know of: nothing will remove the disk
                # but us.
                bar.phase = "removing disk"
                _cleanup(_remove_new_disk, engine, disk.id)
                raise
            journal = None
            disk_is_zero = new_disk_is_zero(params, block)
            try:
                transfer = engine.wait_for_transfer(transfer)
                if source is None:
                    journal = _journal.Journal.create(transfer.id, {
                        "command": "upload-disk",
                        "disk_id": disk.id,
                        "source": _journal.identity(args.filename),
                        "member": image.member,
                        "disk_is_zero": disk_is_zero,
                    })
                    _upload(args, engine, bar, transfer, journal)
                else:
                    _upload_url(args, bar, transfer, source, disk_is_zero)
            except BaseException as e:
                if journal is not None and _resumable(e):
                    _pause(args, engine, bar, transfer, journal, e)
                # The engine removes the disk of a cancelled upload.
                bar.phase = "cancelling transfer"
                _cleanup(engine.cancel_transfer, transfer)
                if journal is not None:
                    journal.remove()
                raise
            _finalize_upload(engine, bar, transfer, disk.id, journal)


def _resume_upload(args):
    """upload-disk --resume: send what the journal does not have."""
    journal = _journal.Journal.load(args.resume)
    if journal.info.get("command") != "upload-disk":
        raise _journal.Error(f"Transfer {args.resume} is not an upload")
    journal.check_source(args.filename)
    disk_id = journal.info["disk_id"]
    with progress_bar(args, "resuming transfer") as bar:
        with connect(args) as engine:
            transfer = engine.get_transfer(args.resume)
            if engine.transfer_disk_id(transfer) != disk_id:
                raise _ovirt.Error(f"Transfer {transfer.id} is not of disk "
                                   f"{disk_id}")
            transfer = engine.resume_transfer(transfer)
            log.info("Resuming transfer %s: %s bytes done before",
                     transfer.id, journal.done)
            try:
                _upload(args, engine, bar, transfer, journal)
            except BaseException as e:
                # Resuming, even Ctrl-C keeps the transfer resumable.
                if _resumable(e) or isinstance(
                        e, (KeyboardInterrupt, Terminated)):
                    _pause(args, engine, bar, transfer, journal, e)
                bar.phase = "cancelling transfer"
                _cleanup(engine.cancel_transfer, transfer)
                journal.remove()
                raise
            _finalize_upload(engine, bar, transfer, disk_id, journal)


def _upload(args, engine, bar, transfer, journal):
    bar.phase = "uploading image"
    url, proxy_url = transfer_urls(transfer)
    client.upload(
        args.filename, url, args.cafile,
        proxy_url=proxy_url,
        secure=args.secure,
        buffer_size=args.buffer_size,
        max_workers=args.max_workers,
        member=journal.info.get("member"),
        disk_is_zero=journal.info.get("disk_is_zero", False),
        verify=args.verify,
        safe=not args.allow_backing,
        progress=bar,
        journal=journal)


def _upload_url(args, bar, transfer, source, disk_is_zero):
    """Upload from an HTTP(S) source (urlsource.py): never resumable, and
    never following a backing file."""
    bar.phase = "uploading image"
    url, proxy_url = transfer_urls(transfer)
    client.upload(
        source, url, args.cafile,
        proxy_url=proxy_url,
        secure=args.secure,
        buffer_size=args.buffer_size,
        max_workers=args.max_workers,
        disk_is_zero=disk_is_zero,
        verify=args.verify,
        progress=bar)


def _url_source(args):
    """
    upload-disk's source when FILE is a URL: the probed urlsource.Source,
    closed when the command ends; else None. Header values go to the
    redacting log formatter first, so no log line can show them.
    """
    if not _is_url(args.filename):
        return contextlib.nullcontext(None)
    from . import urlsource

    headers = source_headers(args)
    _SECRETS.update(v for v in headers.values() if len(v) >= 4)
    try:
        return urlsource.open(
            args.filename, headers,
            cafile=args.source_cafile,
            allow_redirect_host=args.allow_redirect_host,
            max_connections=args.max_workers)
    except sources.UnsafeImage as e:
        raise _ovirt.Error(
            f"{e}. A remote image's backing or data files are never "
            f"followed") from None


def source_headers(args):
    """{name: value} of --header-file files, then --header options."""
    from . import urlsource

    headers = {}
    for path in args.header_file or ():
        try:
            headers.update(urlsource.read_header_file(path))
        except (OSError, UnicodeDecodeError) as e:
            raise _ovirt.Error(f"Cannot read header file {path}: "
                               f"{getattr(e, 'strerror', None) or e}")
        except ValueError as e:
            raise _ovirt.Error(f"Invalid header file: {e}") from None
    for line in args.header or ():
        name, value = urlsource.parse_header(line)
        headers[name] = value
    return headers


def _is_url(name):
    return isinstance(name, str) and name.lower().startswith(
        ("http://", "https://"))


def _finalize_upload(engine, bar, transfer, disk_id, journal):
    if journal is not None:
        journal.close()
    bar.phase = "finalizing transfer"
    engine.finalize_transfer(transfer, disk_id)
    if journal is not None:
        journal.remove()
    bar.phase = "upload completed"


def _resumable(e):
    """True if the transfer failed for the network (after the client's
    retries): worth pausing for --resume."""
    if isinstance(e, _transfer.TransferError):
        e = e.__cause__
    return isinstance(e, Exception) and _transfer.retriable(e)


class Paused(Exception):
    """The transfer failed for the network and was paused; the message
    says how to resume it."""


def _pause(args, engine, bar, transfer, journal, error):
    """Keep the transfer for --resume: pause an upload (a download cannot
    be paused: the engine pauses it after the inactivity timeout),
    save the journal, and raise Paused with the command that resumes."""
    journal.close()
    if journal.info.get("command") == "upload-disk":
        bar.phase = "pausing transfer"
        _cleanup(engine.pause_transfer, transfer)
    message = error_message(error)
    if isinstance(error, (KeyboardInterrupt, Terminated)):
        message = "interrupted"
    raise Paused(f"{message}; transfer {transfer.id} is kept "
                 f"({journal.done} bytes done), resume it with: "
                 f"{resume_command(args, transfer.id)}") from error


def resume_command(args, transfer_id):
    """The command line that resumes transfer_id: this one, with
    --resume."""
    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if "--resume" not in argv:
        at = argv.index(args.command) + 1 if args.command in argv else 0
        argv[at:at] = ["--resume", transfer_id]
    return shlex.join(["ovirt-img", *argv])


def _remove_new_disk(engine, disk_id):
    """Remove the disk this command created, and cancel its transfer
    if the engine created one whose answer did not come (the engine
    then removes the disk). Such a transfer may show up only while we
    wait for the disk: its inactivity policy pauses it, never ends it."""
    cancelled = set()

    def cancel_transfers():
        for transfer in engine.unfinished_transfers(disk_id):
            if transfer.id not in cancelled:
                cancelled.add(transfer.id)
                engine.cancel_transfer(transfer)

    cancel_transfers()
    engine.remove_disk(disk_id, on_locked=cancel_transfers)


class Image:
    """What inspect_image() found: format, virtual size, tar member,
    whether it is an ISO, qcow2 measure."""

    def __init__(self, fmt, size, member=None, iso=False):
        self.format = fmt
        self.size = size
        self.member = member
        self.iso = iso
        self.required = None
        # A URL's file name (its path's last part), for the disk's name.
        self.source_name = None


def inspect_image(args, source=None):
    if source is not None:
        return _inspect_source(args, source)
    filename = args.filename
    member = args.member
    if member is None and _is_tar(filename):
        member = _pick_member(filename)
    info = client.info(filename, member=member)
    if not args.allow_backing:
        # Before qemu-img measure, which would open what the image names.
        try:
            sources.check(filename, info, member=member)
        except sources.UnsafeImage as e:
            raise _ovirt.Error(
                f"{e}. Use --allow-backing to upload them") from None
    image = Image(info["format"], info["virtual-size"], member=member)
    if image.format == "raw":
        image.iso = _is_iso(filename, info.get("member-offset", 0))
    if info.get("backing-filename"):
        log.info("Uploading %s with its backing chain (%s)", filename,
                 info["backing-filename"])
    if args.format == "qcow2" and not args.preallocated and not image.iso:
        image.required = client.measure(
            filename, "qcow2", member=member)["required"]
    log.info("Image %s%s: format %s, virtual size %d%s", filename,
             f" member {member}" if member else "", image.format,
             image.size, ", ISO" if image.iso else "")
    return image


def _inspect_source(args, source):
    """inspect_image() of a urlsource.Source: format and size probed
    from its bytes (checked: no backing or data file)."""
    image = Image(source.format, source.virtual_size)
    image.source_name = source.url.rstrip("/").rsplit("/", 1)[-1] or "image"
    if image.format == "raw":
        head = source.head
        image.iso = head[ISO_OFFSET:ISO_OFFSET + len(ISO_MAGIC)] == ISO_MAGIC
    if args.format == "qcow2" and not args.preallocated and not image.iso:
        if source.ranges:
            measured = qemu_img.measure(source.qemu_spec(), "qcow2")
            image.required = measured["required"]
        else:
            # Read once: the data's allocation is not known before.
            image.required = qemu_img.measure_size(
                image.size, "qcow2")["fully-allocated"]
    log.info("Image %s: format %s, virtual size %d%s%s", source.url,
             image.format, image.size, ", ISO" if image.iso else "",
             "" if source.ranges else ", no ranges: read once")
    return image


def disk_params(args, image, block):
    """The new disk's attributes, by the engine's rules for the storage
    domain (ENGINE-SIM.md 3.1)."""
    types = _sdk_types()
    name = args.name
    if name is None:
        name = os.path.splitext(os.path.basename(
            image.member or image.source_name or args.filename))[0]
    if image.iso:
        # An ISO is a read-only raw disk: preallocated, no backup.
        fmt, sparse, content = "raw", False, types.DiskContentType.ISO
    else:
        fmt, sparse = args.format, not args.preallocated
        content = types.DiskContentType.DATA
        if fmt == "raw" and sparse and block:
            # A raw volume on block storage is a logical volume of the
            # whole size: it cannot be sparse.
            log.info("Raw disks on block storage are preallocated")
            sparse = False
    params = dict(
        name=name,
        description=args.description,
        format=types.DiskFormat.COW if fmt == "qcow2" else types.DiskFormat.RAW,
        provisioned_size=image.size,
        sparse=sparse,
        content_type=content)
    if fmt == "qcow2":
        # Every qcow2 disk can be backed up incrementally.
        params["backup"] = types.DiskBackup.INCREMENTAL
        if sparse:
            # A sparse qcow2 volume on block storage starts as a logical
            # volume of this size (file storage ignores it).
            params["initial_size"] = image.required
    if args.disk_id:
        params["id"] = args.disk_id
    return params


def new_disk_is_zero(params, block):
    """
    Whether the new disk reads zeros, so the upload may skip zero
    extents instead of zeroing them: a qcow2 disk, or any disk on file
    storage (a sparse or fallocated file). A raw disk on block storage
    is a logical volume holding what the storage held before.
    """
    return params["format"] == _sdk_types().DiskFormat.COW or not block


def _is_iso(filename, offset):
    try:
        with open(filename, "rb") as f:
            f.seek(offset + ISO_OFFSET)
            return f.read(len(ISO_MAGIC)) == ISO_MAGIC
    except OSError:
        return False


def _is_tar(filename):
    """A POSIX or GNU tar file (an OVA), by the magic at offset 257."""
    try:
        with open(filename, "rb") as f:
            f.seek(257)
            return f.read(5) == b"ustar"
    except OSError:
        return False


def _pick_member(filename):
    import tarfile

    with tarfile.open(filename) as tar:
        disks = [m.name for m in tar.getmembers()
                 if m.isfile() and not m.name.lower().endswith(_NOT_DISKS)]
    if len(disks) == 1:
        return disks[0]
    if not disks:
        raise _ovirt.Error(f"{filename} is a tar file without a disk")
    raise _ovirt.Error(
        f"{filename} holds {len(disks)} disks ({', '.join(disks)}); choose "
        f"one with --member")


# Download.

def download_disk(args):
    if args.resume:
        return _resume_download(args)
    with progress_bar(args, "creating transfer") as bar:
        with connect(args) as engine:
            disk = engine.get_disk(args.disk_id)
            host = _download_host(engine, disk)
            transfer = engine.add_transfer(disk, "download", host,
                                           resumable=True)
            journal = None
            try:
                transfer = engine.wait_for_transfer(transfer)
                journal = _journal.Journal.create(transfer.id, {
                    "command": "download-disk",
                    "disk_id": disk.id,
                    "target": os.path.abspath(args.filename),
                    "format": args.format,
                })
                _download(args, bar, transfer, journal)
            except BaseException as e:
                if journal is not None and _resumable(e):
                    _pause(args, engine, bar, transfer, journal, e)
                # Finalized: a download cannot harm the disk.
                bar.phase = "finalizing transfer"
                _cleanup(engine.finalize_transfer, transfer, disk.id)
                if journal is not None:
                    journal.remove()
                    _remove_partial(args.filename, e)
                raise
            _finalize_download(engine, bar, transfer, disk.id, journal)


def _resume_download(args):
    """download-disk --resume: download what the journal does not have
    into the partial image."""
    journal = _journal.Journal.load(args.resume)
    info = journal.info
    if info.get("command") != "download-disk":
        raise _journal.Error(f"Transfer {args.resume} is not a download")
    if (info.get("target") != os.path.abspath(args.filename)
            or info.get("format") != args.format):
        raise _journal.Error(
            f"Cannot resume transfer {args.resume}: it downloads into "
            f"{info.get('target')} as {info.get('format')}")
    if info.get("disk_id") != args.disk_id:
        raise _journal.Error(
            f"Cannot resume transfer {args.resume}: it is of disk "
            f"{info.get('disk_id')}")
    with progress_bar(args, "resuming transfer") as bar:
        with connect(args) as engine:
            transfer = engine.get_transfer(args.resume)
            if engine.transfer_disk_id(transfer) != args.disk_id:
                raise _ovirt.Error(f"Transfer {transfer.id} is not of disk "
                                   f"{args.disk_id}")
            transfer = engine.resume_transfer(transfer)
            log.info("Resuming transfer %s: %s bytes done before",
                     transfer.id, journal.done)
            try:
                _download(args, bar, transfer, journal)
            except BaseException as e:
                if _resumable(e) or isinstance(
                        e, (KeyboardInterrupt, Terminated)):
                    _pause(args, engine, bar, transfer, journal, e)
                bar.phase = "finalizing transfer"
                _cleanup(engine.finalize_transfer, transfer, args.disk_id)
                journal.remove()
                _remove_partial(args.filename, e)
                raise
            _finalize_download(engine, bar, transfer, args.disk_id,
                               journal)


def _download(args, bar, transfer, journal):
    bar.phase = "downloading image"
    url, proxy_url = transfer_urls(transfer)
    client.download(
        url, args.filename, args.cafile,
        proxy_url=proxy_url,
        fmt=args.format,
        secure=args.secure,
        buffer_size=args.buffer_size,
        max_workers=args.max_workers,
        verify=args.verify,
        progress=bar,
        journal=journal)


def _finalize_download(engine, bar, transfer, disk_id, journal):
    journal.close()
    bar.phase = "finalizing transfer"
    engine.finalize_transfer(transfer, disk_id)
    journal.remove()
    bar.phase = "download completed"


def _remove_partial(filename, error):
    """A download that will not be resumed: remove its partial image, as
    the client library does without a journal (never a block device;
    not after a checksum mismatch, kept to look at)."""
    if isinstance(error, client.transfer.ChecksumMismatch):
        return
    if not client.rawfile.is_block_device(filename):
        client._remove(filename)


def _download_host(engine, disk):
    """This host if it is an oVirt host (the data stays local), else the
    engine's choice."""
    if _ovirt.read_vdsm_id() is None:
        return None
    sd = engine.storage_domain_by_id(disk.storage_domains[0].id)
    return engine.this_host(sd.name)


# Backup.

def backup_disk(args):
    """
    A full or incremental backup of one disk through the VM backup API
    of the VM it is attached to, into a qcow2 (an incremental on top of
    the previous backup); prints the new checkpoint.
    """
    incremental = args.from_checkpoint is not None
    with progress_bar(args, "starting backup") as bar:
        with connect(args) as engine:
            disk = engine.get_disk(args.disk_id)
            vm = engine.vm_of_disk(disk.id)
            backup_id = str(uuid.uuid4())
            try:
                backup = engine.start_backup(
                    vm, disk.id, backup_id,
                    from_checkpoint=args.from_checkpoint,
                    description=f"ovirt-img backup-disk {disk.id}")
            except BaseException as e:
                if not isinstance(e, _ovirt.Error):
                    # Interrupted: the engine may have started it.
                    _cleanup(engine.finalize_backup, vm,
                             _Entity(backup_id))
                elif incremental:
                    raise _ovirt.Error(
                        f"{e}. Take a full backup (without "
                        f"--from-checkpoint)") from None
                raise
            try:
                backup = engine.wait_for_backup(vm, backup)
                mode = _backup_mode(engine, disk.id)
                if incremental and mode != "incremental":
                    raise _ovirt.Error(
                        f"Checkpoint {args.from_checkpoint} does not cover "
                        f"disk {disk.id}: the engine would copy all of it. "
                        f"Take a full backup (without --from-checkpoint)")
                _backup_transfer(args, engine, bar, disk, backup,
                                 incremental)
            except BaseException:
                bar.phase = "finalizing backup"
                _cleanup(engine.finalize_backup, vm, backup)
                raise
            bar.phase = "finalizing backup"
            engine.finalize_backup(vm, backup)
            bar.phase = "backup completed"
    _print_result(args, {
        "disk_id": disk.id,
        "vm_id": vm.id,
        "backup_id": backup.id,
        "mode": "incremental" if incremental else "full",
        "checkpoint_id": backup.to_checkpoint_id,
        "filename": args.filename,
        "backing_file": args.backing_file,
    })


def _backup_transfer(args, engine, bar, disk, backup, incremental):
    bar.phase = "creating transfer"
    try:
        with download_transfer(engine, bar, disk,
                               backup=backup) as (url, proxy_url):
            bar.phase = "downloading image"
            try:
                client.download(
                    url, args.filename, args.cafile,
                    proxy_url=proxy_url,
                    fmt="qcow2",
                    incremental=incremental,
                    backing_file=_relative_backing(args),
                    secure=args.secure,
                    buffer_size=args.buffer_size,
                    max_workers=args.max_workers,
                    verify=args.verify,
                    progress=bar)
            except errors.Unsupported as e:
                # The server has no dirty extents: the disk lost the
                # bitmap.
                raise _ovirt.Error(
                    f"Disk {disk.id} has no changed blocks since "
                    f"checkpoint {args.from_checkpoint} ({e}). Take a full "
                    f"backup (without --from-checkpoint)") from None
    except _ovirt.NotStarted as e:
        if not incremental:
            raise
        # vdsm could not export the changes: no bitmap for the
        # checkpoint (the disk was copied, restored, or the bitmap
        # removed).
        raise _ovirt.Error(
            f"{e}; the disk may have lost the bitmap of checkpoint "
            f"{args.from_checkpoint}. Take a full backup (without "
            f"--from-checkpoint)") from None


def _check_backup_args(args):
    if (args.from_checkpoint is None) != (args.backing_file is None):
        return ("--from-checkpoint and --backing-file go together: an "
                "incremental backup is written on top of the previous one")
    return None


def _backup_mode(engine, disk_id):
    mode = engine.get_disk(disk_id).backup_mode
    return mode.value if mode is not None else None


def _relative_backing(args):
    """The previous backup as the new one names it: relative to the new
    file's folder, so a chain can be moved as a folder."""
    if args.backing_file is None:
        return None
    folder = os.path.dirname(os.path.abspath(args.filename))
    name = os.path.relpath(os.path.abspath(args.backing_file), folder)
    if ":" in name and not name.startswith((".", "/")):
        # qemu would take "nbd:x.qcow2" for a protocol, not a file.
        name = "./" + name
    return name


class _Entity:
    """An engine entity known by its id only."""

    def __init__(self, ident):
        self.id = ident


# Snapshots.

# A chain deeper than this is refused (a loop qemu would reject too).
MAX_LAYERS = 256

# A backing file name qemu would take for a protocol or a json:
# specification, not a file: "nbd:...", "http://...", "json:{...}".
_PROTOCOL = re.compile(r"[^/]*:")


def download_snapshot(args):
    """
    A disk's layers, base first, into DIR as a qcow2 chain: one file per
    layer named by its id (the disk snapshot's, <id>.qcow2), each the
    layer alone through a shallow transfer (its holes stay unallocated,
    its zeros are zero clusters hiding the layers below), backed by the
    file of the layer below by its relative name. Each layer is verified
    against the server's checksum of the same shallow export. On failure
    the files written are removed. Prints the chain.
    """
    folder = args.directory
    written = []
    with progress_bar(args, "listing snapshots") as bar:
        with connect(args) as engine:
            disk = engine.get_disk(args.disk_id)
            layers = engine.disk_chain(disk)
            if disk.image_id and layers[-1].id != disk.image_id:
                raise _ovirt.Error(
                    f"The top of disk {disk.id}'s chain, {layers[-1].id}, "
                    f"is not its active layer {disk.image_id}")
            names = [f"{layer.id}.qcow2" for layer in layers]
            _check_new_files(folder, names)
            host = _download_host(engine, disk)
            # Each layer's transfer covers the whole virtual size.
            bar.size = disk.provisioned_size * len(layers)
            try:
                for i, layer in enumerate(layers):
                    path = os.path.join(folder, names[i])
                    written.append(path)
                    active = i == len(layers) - 1
                    _download_layer(
                        args, engine, bar, disk, host, path,
                        snapshot=None if active else layer,
                        backing_file=names[i - 1] if i else None,
                        what=f"layer {i + 1}/{len(layers)}")
            except BaseException:
                bar.phase = "removing files"
                for path in reversed(written):
                    _cleanup(_remove_file, path)
                raise
            bar.phase = "download completed"
    _print_result(args, {
        "disk_id": disk.id,
        "directory": folder,
        "layers": [_layer_result(layer, name, names[i - 1] if i else None)
                   for i, (layer, name) in enumerate(zip(layers, names))],
        "top": os.path.join(folder, names[-1]),
    })


def _check_new_files(folder, names):
    existing = [n for n in names if os.path.lexists(os.path.join(folder, n))]
    if existing:
        raise _ovirt.Error(f"{folder} already holds {', '.join(existing)}; "
                           f"a download never replaces a file")


def _download_layer(args, engine, bar, disk, host, path, snapshot,
                    backing_file, what):
    """One layer through a shallow transfer: of the disk snapshot, or of
    the disk for the active layer (not reachable as a disk snapshot)."""
    bar.phase = f"creating transfer ({what})"
    with download_transfer(engine, bar, disk, host, snapshot=snapshot,
                           shallow=True) as (url, proxy_url):
        bar.phase = f"downloading {what}"
        client.download(
            url, path, args.cafile,
            proxy_url=proxy_url,
            fmt="qcow2",
            backing_file=backing_file,
            backing_format="qcow2" if backing_file else None,
            secure=args.secure,
            buffer_size=args.buffer_size,
            max_workers=args.max_workers,
            progress=_Share(bar))
        if args.verify:
            bar.phase = f"verifying {what}"
            _verify_layer(args, url, proxy_url, path, what)


def _verify_layer(args, url, proxy_url, path, what):
    """The server's checksum of the shallow export against the local
    layer's, read without its backing file: both read the layer's holes
    as zeros."""
    with client._open_remote(url, args.cafile, args.secure,
                             proxy_url) as image:
        timeout = max(CHECKSUM_MIN_TIMEOUT, image.size // CHECKSUM_MIN_RATE)
        remote = image.checksum(timeout=timeout)
    local = client.checksum(path, algorithm=remote["algorithm"],
                            block_size=remote["block_size"],
                            backing_chain=False)
    if local["checksum"] != remote["checksum"]:
        raise _ovirt.Error(
            f"Verification of {what} failed: the server's checksum "
            f"{remote['checksum']} differs from {path}'s "
            f"{local['checksum']}")


def _layer_result(layer, filename, backing_file):
    snapshot = getattr(layer, "snapshot", None)
    return {"id": layer.id, "filename": filename,
            "backing_file": backing_file,
            "snapshot_id": snapshot.id if snapshot is not None else None}


def _remove_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Share:
    """One transfer's progress as a part of the command's bar, whose
    size (set once) covers every transfer of the command."""

    def __init__(self, bar):
        self._bar = bar

    @property
    def size(self):
        return self._bar.size

    @size.setter
    def size(self, value):
        pass

    def update(self, n):
        self._bar.update(n)


class Layer:
    """A local layer: its path, qemu-img info, format and virtual size."""

    def __init__(self, path, info):
        self.path = path
        self.info = info
        self.format = info["format"]
        self.size = info["virtual-size"]
        self.done = False


def inspect_chain(filename, allow_backing=False):
    """
    The local chain whose top is filename, base first. Walked here, one
    `qemu-img info` per layer (which opens no backing file), so that no
    file is opened before it is checked: every layer must be a file in
    the top's folder (after symlinks), named by a plain file name, and
    name no other file (a qcow2 data file, vmdk extents elsewhere);
    --allow-backing lifts the folder and data file checks, never the
    plain name one. All layers but the base are qcow2, all of one
    virtual size.
    """
    folder = os.path.dirname(os.path.realpath(filename))
    layers = []
    seen = set()
    path = filename
    while True:
        real = os.path.realpath(path)
        if real in seen or len(seen) >= MAX_LAYERS:
            raise _ovirt.Error(f"The backing chain of {filename} loops or "
                               f"is deeper than {MAX_LAYERS} layers")
        seen.add(real)
        if not allow_backing and os.path.dirname(real) != folder:
            raise _ovirt.Error(
                f"Layer {path} is outside {folder}, the folder of "
                f"{filename}. Use --allow-backing to upload it")
        try:
            info = client.info(path)
        except client.qemu_img.Error as e:
            raise _ovirt.Error(f"Cannot read layer {path}: {e}") from None
        others = [r for r in sources.unsafe_references(path, info)
                  if not r.startswith("backing file")]
        if others and not allow_backing:
            raise _ovirt.Error(
                f"Layer {path} refers to other files: {'; '.join(others)}. "
                f"Use --allow-backing to upload them")
        layer = Layer(path, info)
        if layers and layers[-1].info.get("backing-filename-format") not in \
                (None, layer.format):
            raise _ovirt.Error(
                f"Layer {layers[-1].path} names {path} as a "
                f"{layers[-1].info['backing-filename-format']} backing file, "
                f"but it is {layer.format}")
        layers.append(layer)
        backing = info.get("backing-filename")
        if not backing:
            break
        if layer.format != "qcow2":
            raise _ovirt.Error(f"Layer {path} is {layer.format}: only a "
                               f"qcow2 layer may have a backing file")
        if _PROTOCOL.match(backing):
            raise _ovirt.Error(f"Layer {path} names {backing!r} as its "
                               f"backing file, which is not a file name")
        path = os.path.join(os.path.dirname(path), backing)
    layers.reverse()
    sizes = {layer.size for layer in layers}
    if len(sizes) > 1:
        raise _ovirt.Error(
            f"The layers of {filename} have different virtual sizes "
            f"({', '.join(str(n) for n in sorted(sizes))}); a disk's "
            f"layers have the disk's size")
    return layers


def upload_snapshot(args):
    """
    A local qcow2 chain into a new disk with the same layers: the disk
    is made for the base, attached to the VM, and each further layer
    comes through a VM snapshot of that disk (a new empty layer), into
    which the local layer alone is uploaded (backing_chain=False: its
    holes stay holes, exposing the layers below). Then the disk's
    checksum is compared with the local chain's.

    Clean-up: until the base's transfer has finished, a failure removes
    the new disk (as upload-disk). After that the disk holds complete
    layers and stays, attached to the VM, and the error says what is
    left; except that the engine itself removes the disk when a layer's
    upload fails (its transfer is cancelled), which the error says too.
    """
    with progress_bar(args, "inspecting images") as bar:
        layers = inspect_chain(args.filename, args.allow_backing)
        with connect(args) as engine:
            vm = engine.get_vm(args.vm)
            if vm.status is None or vm.status.value != "down":
                raise _ovirt.Error(
                    f"VM {vm.id} is {vm.status.value if vm.status else '?'}"
                    f": layers can be uploaded to the disks of a VM that "
                    f"is down")
            sd = engine.storage_domain(args.storage_domain)
            block = engine.is_block(sd)
            params = _snapshot_disk_params(args, layers, block)
            bar.size = layers[0].size * len(layers)
            disk, host = _upload_base(args, engine, bar, sd, params,
                                      block, layers)
            snapshots = []
            try:
                engine.attach_disk(vm, disk.id)
                _upload_layers(args, engine, bar, vm, disk, host, layers,
                               snapshots)
                if args.verify:
                    bar.phase = "verifying disk"
                    _verify_disk(args, engine, disk, host, layers[-1].path)
            except BaseException as e:
                bar.phase = "upload failed"
                left = _left_behind(engine, vm, disk, layers, snapshots)
                if isinstance(e, Exception):
                    raise _ovirt.Error(f"{error_message(e)}. {left}") \
                        from e
                log.error("%s", left)
                raise
            chain = engine.disk_chain(engine.get_disk(disk.id))
            bar.phase = "upload completed"
    _print_result(args, {
        "disk_id": disk.id,
        "vm_id": vm.id,
        "layers": [dict(_layer_result(remote, layer.path, None),
                        backing_file=layers[i - 1].path if i else None)
                   for i, (remote, layer) in enumerate(zip(chain, layers))],
        "top": layers[-1].path,
    })


def _snapshot_disk_params(args, layers, block):
    """The new disk: the format asked for, sparse (a raw disk on block
    storage is preallocated), of the chain's size."""
    types = _sdk_types()
    fmt = args.format
    sparse = not (fmt == "raw" and block)
    name = args.name or os.path.splitext(
        os.path.basename(args.filename))[0]
    params = dict(
        id=str(uuid.uuid4()),
        name=name,
        description=args.description,
        format=(types.DiskFormat.COW if fmt == "qcow2"
                else types.DiskFormat.RAW),
        provisioned_size=layers[0].size,
        sparse=sparse,
        content_type=types.DiskContentType.DATA)
    if fmt == "qcow2":
        params["backup"] = types.DiskBackup.INCREMENTAL
        params["initial_size"] = client.measure(
            layers[0].path, "qcow2")["required"]
    return params


def _upload_base(args, engine, bar, sd, params, block, layers):
    """Create the disk and upload the base into it; any failure removes
    the disk (our own id: also when the engine's answer never came)."""
    what = f"layer 1/{len(layers)}"
    bar.phase = "creating disk"
    try:
        disk = engine.add_disk(storage_domain=sd.name, **params)
    except BaseException:
        bar.phase = "removing disk"
        _cleanup(engine.remove_disk, params["id"])
        raise
    log.info("Created disk %s", disk.id)
    try:
        disk = engine.wait_for_disk(disk.id, args.disk_timeout)
        host = engine.this_host(sd.name)
        _upload_layer(args, engine, bar, disk, host, layers[0], what,
                      backing_chain=True,
                      disk_is_zero=new_disk_is_zero(params, block))
    except BaseException:
        bar.phase = "removing disk"
        _cleanup(_remove_new_disk, engine, disk.id)
        raise
    layers[0].done = True
    return disk, host


def _upload_layers(args, engine, bar, vm, disk, host, layers, snapshots):
    for i in range(1, len(layers)):
        what = f"layer {i + 1}/{len(layers)}"
        bar.phase = f"creating snapshot ({what})"
        snapshot = engine.add_vm_snapshot(
            vm, disk.id, f"ovirt-img upload-snapshot: {what} of "
                         f"{os.path.basename(args.filename)}")
        snapshots.append(snapshot.id)
        engine.wait_for_vm_snapshot(vm, snapshot)
        _upload_layer(args, engine, bar, disk, host, layers[i], what,
                      backing_chain=False, disk_is_zero=False)
        layers[i].done = True


def _upload_layer(args, engine, bar, disk, host, layer, what,
                  backing_chain, disk_is_zero):
    bar.phase = f"creating transfer ({what})"
    transfer = engine.add_transfer(disk, "upload", host)
    try:
        transfer = engine.wait_for_transfer(transfer)
        bar.phase = f"uploading {what}"
        url, proxy_url = transfer_urls(transfer)
        client.upload(
            layer.path, url, args.cafile,
            proxy_url=proxy_url,
            secure=args.secure,
            buffer_size=args.buffer_size,
            max_workers=args.max_workers,
            backing_chain=backing_chain,
            disk_is_zero=disk_is_zero,
            progress=_Share(bar))
    except BaseException:
        # The engine removes the disk of a cancelled upload.
        bar.phase = "cancelling transfer"
        _cleanup(engine.cancel_transfer, transfer)
        raise
    bar.phase = "finalizing transfer"
    engine.finalize_transfer(transfer, disk.id)


def _verify_disk(args, engine, disk, host, top):
    """The disk's checksum (computed on its host) against the local
    chain's."""
    with download_transfer(engine, None, disk, host) as (url, proxy_url):
        remote = _remote_checksum(args, url, proxy_url, algorithm=None,
                                  block_size=None)
    local = client.checksum(top, algorithm=remote["algorithm"],
                            block_size=remote["block_size"])
    if local["checksum"] != remote["checksum"]:
        raise _ovirt.Error(
            f"Verification failed: disk {disk.id}'s checksum "
            f"{remote['checksum']} differs from {top}'s {local['checksum']}")


def _left_behind(engine, vm, disk, layers, snapshots):
    """What a failure after the base left on the engine, in words. An
    unfinished transfer is cancelled first (it would keep the disk
    locked); the engine then removes the disk, as after any failed
    upload."""
    try:
        for transfer in engine.unfinished_transfers(disk.id):
            engine.cancel_transfer(transfer)
        current = engine.get_disk(disk.id)
    except _ovirt.Error as e:
        if not isinstance(e.__cause__, engine.sdk.NotFoundError):
            return f"Disk {disk.id} may be left on VM {vm.id}: {e}"
        current = None
    if current is None or current.status == engine.types.DiskStatus.ILLEGAL:
        made = (f"; VM snapshots {', '.join(snapshots)} remain on VM "
                f"{vm.id} without it" if snapshots else "")
        return (f"The engine removes disk {disk.id} (a failed upload "
                f"removes its disk){made}")
    done = sum(1 for layer in layers if layer.done)
    return (f"Disk {disk.id}, attached to VM {vm.id}, is left with the "
            f"first {done} of the {len(layers)} layers of "
            f"{layers[-1].path}")


# Checksum.

# The daemon reads the disk's data at a few hundred MiB/s and skips
# zeros; waiting for it at less than this rate means it is stuck.
CHECKSUM_MIN_RATE = 16 * opts.MiB
CHECKSUM_MIN_TIMEOUT = 300


def checksum_disk(args):
    with progress_bar(args, "creating transfer") as bar:
        with connect(args) as engine:
            disk = engine.get_disk(args.disk_id)
            host = _download_host(engine, disk)
            with download_transfer(engine, bar, disk, host) as urls:
                bar.phase = "computing checksum"
                result = _remote_checksum(args, *urls,
                                          algorithm=args.algorithm,
                                          block_size=args.block_size)
            bar.phase = "checksum completed"
    result = {"disk_id": disk.id, "algorithm": result["algorithm"],
              "block_size": result["block_size"],
              "checksum": result["checksum"]}
    _print_result(args, result)


def _remote_checksum(args, url, proxy_url, algorithm, block_size):
    """The daemon's checksum of the transfer's image (None: its
    defaults), waiting as long as a slow host takes to read it."""
    with client._open_remote(url, args.cafile, args.secure,
                             proxy_url) as image:
        timeout = max(CHECKSUM_MIN_TIMEOUT, image.size // CHECKSUM_MIN_RATE)
        return image.checksum(algorithm=algorithm, block_size=block_size,
                              timeout=timeout)


def _checksum_block_size(text):
    n = opts.size_between(_blkhash.MIN_BLOCK_SIZE,
                          _blkhash.MAX_BLOCK_SIZE)(text)
    if n % _blkhash.BLOCK_ALIGNMENT:
        raise opts.Invalid(
            f"expected a multiple of {_blkhash.BLOCK_ALIGNMENT}")
    return n


# Info.

def disk_info(args):
    with connect(args) as engine:
        disk = engine.get_disk(args.disk_id)
        sds = [engine.storage_domain_by_id(sd.id)
               for sd in disk.storage_domains or ()]
        layers = engine.disk_chain(disk)
    _print_result(args, describe_disk(disk, sds, layers))


def describe_disk(disk, storage_domains, layers=()):
    """The disk as a dict of JSON values; the text output's keys are the
    same, with spaces for underscores. layers: its volumes, base first
    (Engine.disk_chain()); all but the last are snapshots."""
    def value(enum):
        return None if enum is None else str(enum.value)

    fmt = value(disk.format)
    return {
        "id": disk.id,
        "alias": disk.alias or disk.name,
        "description": disk.description or "",
        "format": {"cow": "qcow2"}.get(fmt, fmt),
        "content_type": value(disk.content_type),
        "status": value(disk.status),
        "virtual_size": disk.provisioned_size,
        "actual_size": disk.actual_size,
        "sparse": disk.sparse,
        "backup": value(disk.backup),
        "storage_domains": [{"id": sd.id, "name": sd.name}
                            for sd in storage_domains],
        "snapshots": [{"id": layer.id,
                       "snapshot_id": _id_of(layer.snapshot),
                       "format": {"cow": "qcow2"}.get(value(layer.format),
                                                      value(layer.format)),
                       "actual_size": layer.actual_size}
                      for layer in layers[:-1]],
    }


def _id_of(entity):
    return entity.id if entity is not None else None


def _print_result(args, result):
    if args.output == "json":
        print(json.dumps(result), flush=True)
        return
    items = []
    for key, value in result.items():
        if key == "layers":
            items.append((key, len(value)))
            for i, layer in enumerate(value, 1):
                extra = [f"id {layer['id']}"]
                if layer["snapshot_id"]:
                    extra.append(f"snapshot {layer['snapshot_id']}")
                items.append((f"layer {i}",
                              f"{layer['filename']} ({', '.join(extra)})"))
        elif key == "snapshots":
            items.append((key, len(value)))
            for i, layer in enumerate(value, 1):
                items.append((
                    f"snapshot {i}",
                    f"volume {layer['id']} of VM snapshot "
                    f"{layer['snapshot_id'] or '-'}, {layer['format']}"))
        else:
            items.append((key, value))
    width = max(len(k) for k, _ in items) + 2
    for key, value in items:
        if key == "storage_domains":
            key, value = "storage_domain", ", ".join(
                f"{sd['name']} ({sd['id']})" for sd in value)
        elif key in ("virtual_size", "actual_size") and value is not None:
            value = f"{value} ({_progress.humansize(value)})"
        elif isinstance(value, bool):
            value = "yes" if value else "no"
        elif value is None:
            value = "-"
        print(f"{key.replace('_', ' ') + ':':<{width}}{value}")
    sys.stdout.flush()


def _existing_target(path):
    """download-disk's FILE: a new or regular file, or a block device."""
    path = opts.text(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return path
    except OSError as e:
        raise opts.Invalid(str(e))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise opts.Invalid("not a regular file or a block device")
    return path


def _new_file(path):
    """backup-disk's FILE: a file that does not exist yet."""
    path = opts.text(path)
    if os.path.lexists(path):
        raise opts.Invalid("exists; a backup never replaces a file")
    return path


def _existing_directory(path):
    path = opts.text(path)
    if not os.path.isdir(path):
        raise opts.Invalid("not an existing directory")
    return path


def _existing_file(path):
    path = opts.text(path)
    if not os.path.isfile(path):
        raise opts.Invalid("not an existing file")
    return path


def _source(path):
    """upload-disk's FILE: a regular file or a block device."""
    path = opts.text(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise opts.Invalid(e.strerror or str(e))
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise opts.Invalid("not a regular file or a block device")
    return path


def _upload_source(path):
    """upload-disk's FILE: a local image (_source()) or an HTTP(S) URL;
    a URL's user info is refused, since a password would show in ps."""
    if not _is_url(path):
        return _source(path)
    import argparse

    from . import urlsource

    path = opts.text(path)
    if "@" in path.split("/", 3)[2]:
        # Not quoted: the password is in it.
        raise argparse.ArgumentTypeError(
            f"{urlsource.display(path)}: a URL cannot carry credentials "
            f"(they would show in ps): give them in a --header-file")
    return path


# Common parts.

@contextlib.contextmanager
def download_transfer(engine, bar, disk, host=None, **kwargs):
    """
    A download transfer of disk (add_transfer()'s keywords: backup,
    snapshot, shallow) for the block, which gets (url, proxy_url). It is
    finalized when the block ends, also after a failure: a download
    cannot harm the disk. bar (or None) shows the finalizing phase.
    """
    transfer = engine.add_transfer(disk, "download", host, **kwargs)
    try:
        transfer = engine.wait_for_transfer(transfer)
    except _ovirt.NotStarted:
        # The engine stopped it (cancelled_system): nothing to finalize,
        # but it must end before the backup holding it can.
        engine.wait_for_end(transfer)
        raise
    except BaseException:
        if bar is not None:
            bar.phase = "finalizing transfer"
        _cleanup(engine.finalize_transfer, transfer, disk.id)
        raise
    try:
        yield transfer_urls(transfer)
    except BaseException:
        if bar is not None:
            bar.phase = "finalizing transfer"
        _cleanup(engine.finalize_transfer, transfer, disk.id)
        raise
    if bar is not None:
        bar.phase = "finalizing transfer"
    engine.finalize_transfer(transfer, disk.id)

def transfer_urls(transfer):
    """(transfer_url, proxy_url): the host's URL, the proxy's as the
    fallback."""
    url = transfer.transfer_url or transfer.proxy_url
    if not url:
        raise _ovirt.Error(f"Transfer {transfer.id} has no transfer URL")
    proxy = transfer.proxy_url if transfer.proxy_url != url else None
    return url, proxy


def connect(args):
    return _ovirt.Engine(
        args.engine_url, args.username, args.password,
        cafile=args.cafile, secure=args.secure,
        debug=args.log_level == "debug")


def password(args):
    """The password: from --password-file, else the config file, else
    asked on the terminal."""
    if args.password_file is not None:
        try:
            with open(args.password_file, encoding="utf-8") as f:
                value = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise _ovirt.Error(
                f"Cannot read password file {args.password_file}: {e}")
        return value[:-1] if value.endswith("\n") else value
    if args.password is not None:
        return args.password
    try:
        return _ask(f"Password for {args.username}: ")
    except EOFError:
        raise _ovirt.Error("No password: give --password-file, a password "
                           "in the config file, or type it") from None


def _ask(prompt):
    """
    Ask on the terminal, without echo (getpass: /dev/tty, else stdin if
    it is a terminal). Without a terminal (a script, a service), read a
    line from stdin as getpass would, but without its warnings and
    prompt on stderr: stderr is for the one line of an error.
    """
    try:
        tty = os.fdopen(os.open("/dev/tty", os.O_WRONLY | os.O_NOCTTY), "w")
    except OSError:
        tty = None
    if tty is None and not (sys.stdin and sys.stdin.isatty()):
        line = sys.stdin.readline() if sys.stdin else ""
        if not line:
            raise EOFError
        return line[:-1] if line.endswith("\n") else line
    try:
        return getpass.getpass(prompt)
    except (EOFError, KeyboardInterrupt):
        # End the prompt's line: the error goes on a line of its own.
        print(file=tty or sys.stderr)
        raise
    finally:
        if tty is not None:
            tty.close()


def progress_bar(args, phase):
    return _Progress(args.output, phase, args)


class _Progress:
    """
    A ProgressBar and its Ticker, as one context manager; with
    --progress-file or --progress-listen, its Exporter too.
    """

    def __init__(self, output, phase, args=None):
        self.bar = _progress.ProgressBar(phase=phase, output=sys.stdout,
                                         format=output)
        self.ticker = _progress.Ticker(self.bar)
        self.exporter = None
        path = getattr(args, "progress_file", None)
        listen = getattr(args, "progress_listen", None)
        if path or listen:
            try:
                self.exporter = _progress.Exporter(
                    self.bar, path=path, listen=listen,
                    command=getattr(args, "command", None))
            except OSError as e:
                self.bar.close()
                raise RuntimeError(
                    f"Cannot serve progress on {listen[0]}:{listen[1]}: "
                    f"{e}") from None

    def __enter__(self):
        self.bar.__enter__()
        self.ticker.__enter__()
        if self.exporter is not None:
            try:
                self.exporter.__enter__()
            except OSError as e:
                self.ticker.__exit__(None, None, None)
                self.bar.close()
                raise RuntimeError(
                    f"Cannot write progress to {self.exporter.path}: "
                    f"{e}") from None
        return self.bar

    def __exit__(self, *exc):
        self.ticker.__exit__(*exc)
        try:
            return self.bar.__exit__(*exc)
        finally:
            if self.exporter is not None:
                self.exporter.__exit__(*exc)


def _cleanup(func, *args):
    """Clean up while an error is on its way out: log what fails, so the
    first error is the one reported."""
    try:
        func(*args)
    except Exception as e:
        log.error("%s", e)


def _sdk_types():
    return _ovirt._sdk().types


def error_message(e):
    """One line: the error's own words (they say what failed), or its
    type when it has none."""
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


class _RedactingFormatter(logging.Formatter):
    """
    Keep credentials out of the log: passwords, tokens and ticket ids
    (the last part of a transfer URL), in messages, tracebacks and the
    SDK's wire log (--log-level debug) alike.
    """

    PATTERNS = (
        (re.compile(r"(password=)[^&\s'\"]*", re.I), r"\1***"),
        (re.compile(r"(token=)[^&\s'\"]*", re.I), r"\1***"),
        (re.compile(r"(Bearer\s+)\S+", re.I), r"\1***"),
        (re.compile(r"(\"access_token\"\s*:\s*\")[^\"]*"), r"\1***"),
        (re.compile(r"(/images/)[^/\s<\"'?]+"), r"\1***"),
    )

    def format(self, record):
        return redact(super().format(record))


# Values never to show: upload-disk's source header values.
_SECRETS = set()


def redact(text):
    for pattern, repl in _RedactingFormatter.PATTERNS:
        text = pattern.sub(repl, text)
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def setup_logging(args):
    if args.log_file:
        handler = logging.FileHandler(args.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_RedactingFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, args.log_level.upper()))


def parser():
    p = opts.parser()
    opts.Command(
        p, "upload-disk", upload_disk,
        "Create a disk from an image and upload the image into it.",
        options=(
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
                        help="the disk's name (default: the file name "
                             "without its extension)"),
            opts.Option("--member", config=False,
                        help="upload this disk of an OVA (tar) file; "
                             "needed only when it holds several"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the server's checksum with the "
                           "image's before finalizing (default: on)"),
            opts.Flag("--allow-backing", config=False, default=False,
                      help="upload an image that names other files (a "
                           "backing file, a qcow2 data file, vmdk "
                           "extents elsewhere) with them; refused by "
                           "default, since qemu would read any file "
                           "they name"),
            opts.Option("--resume", type=opts.disk_id, config=False,
                        metavar="TRANSFER_ID", help=RESUME_HELP.format(
                            what="upload", verb="pauses",
                            timeout=_ovirt.RESUMABLE_INACTIVITY_TIMEOUT)),
            opts.Repeated("--header", metavar="'NAME: VALUE'",
                          help="send this header when FILE is a URL "
                               "(repeatable); ps shows it: put secrets "
                               "in a --header-file"),
            opts.Repeated("--header-file", metavar="PATH",
                          help="send the headers of this file, 'NAME: "
                               "VALUE' lines, when FILE is a URL "
                               "(repeatable); values are never logged"),
            opts.Option("--source-cafile", config=False, metavar="PATH",
                        help="CA certificates to verify an https:// FILE "
                             "with (default: the system's; --cafile is "
                             "the engine's)"),
            opts.Flag("--allow-redirect-host", config=False, default=False,
                      help="follow redirects of a URL to other hosts, "
                           "sending them the headers (refused by "
                           "default)"),
        ),
        validate=_validate_upload,
        positionals=[(("filename",), dict(
            metavar="FILE", type=_argtype(_upload_source),
            help="the image: raw, qcow2, ISO, vmdk, vhdx, vdi, or an "
                 "OVA; or an http:// or https:// URL of a raw or qcow2 "
                 "image (read through our own reader: ranges in "
                 "parallel, or once in order if the server has none, "
                 "raw only)"))])
    opts.Command(
        p, "download-disk", download_disk,
        "Download a disk into an image file or a block device.",
        options=(
            opts.Option("-f", "--format", choices=("raw", "qcow2"),
                        type=opts.choice("raw", "qcow2"), config=False,
                        default="qcow2",
                        help="the image's format (default qcow2)"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the server's checksum with the "
                           "image's before finalizing (default: on)"),
            opts.Option("--resume", type=opts.disk_id, config=False,
                        metavar="TRANSFER_ID", help=RESUME_HELP.format(
                            what="download (into the partial FILE, kept)",
                            verb="keeps",
                            timeout=_ovirt.RESUMABLE_INACTIVITY_TIMEOUT)),
        ),
        positionals=[
            (("disk_id",), dict(metavar="DISK_ID", type=_argtype(
                opts.disk_id), help="the disk's id")),
            (("filename",), dict(metavar="FILE", type=_argtype(
                _existing_target),
                help="the image to write (replaced), or a block device")),
        ])
    disk_id = (("disk_id",), dict(metavar="DISK_ID", type=_argtype(
        opts.disk_id), help="the disk's id"))
    opts.Command(
        p, "checksum", checksum_disk,
        "Print the checksum of a disk's guest data, computed on its host: "
        "the value ovirt_imageio.client.checksum() gives for an image "
        "with the same data.",
        options=(
            opts.Option("--algorithm", config=False,
                        type=opts.choice(*_blkhash.ALGORITHMS),
                        default=_blkhash.DEFAULT_ALGORITHM,
                        help=f"hash algorithm (default "
                             f"{_blkhash.DEFAULT_ALGORITHM})"),
            opts.Option("--block-size", config=False,
                        type=_checksum_block_size,
                        default=_blkhash.DEFAULT_BLOCK_SIZE,
                        help="block size of the construction (1m-16m, "
                             "default 4m)"),
        ),
        positionals=[disk_id])
    opts.Command(
        p, "backup-disk", backup_disk,
        "Back up a VM's disk into a qcow2 image: all of it, or the blocks "
        "changed since a checkpoint on top of the previous backup; prints "
        "the new checkpoint.",
        options=(
            opts.Option("--from-checkpoint", type=opts.disk_id,
                        config=False,
                        help="an incremental backup: only what changed "
                             "since this checkpoint (a previous backup's); "
                             "needs --backing-file"),
            opts.Option("--backing-file", type=_existing_file,
                        config=False,
                        help="the previous backup, the new image's backing "
                             "file (named relative to FILE's folder)"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the server's checksum with the "
                           "backup chain's before finalizing (default: "
                           "on)"),
        ),
        positionals=[disk_id, (("filename",), dict(
            metavar="FILE", type=_argtype(_new_file),
            help="the qcow2 image to write"))],
        validate=_check_backup_args)
    opts.Command(
        p, "download-snapshot", download_snapshot,
        "Download a disk's layers (its snapshots and the active layer) "
        "into a folder as a qcow2 chain, one file <layer id>.qcow2 per "
        "layer, each backed by the one below.",
        options=(
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the server's checksum of each layer "
                           "with the file's (default: on)"),
        ),
        positionals=[disk_id, (("directory",), dict(
            metavar="DIR", type=_argtype(_existing_directory),
            help="an existing folder for the layers"))])
    opts.Command(
        p, "upload-snapshot", upload_snapshot,
        "Create a disk with the layers of a local qcow2 chain: the base, "
        "then each layer through a snapshot of the VM the disk is "
        "attached to.",
        options=(
            opts.Option("-s", "--storage-domain", required=True,
                        config=False, help="the storage domain's name"),
            opts.Option("--vm", required=True, type=opts.disk_id,
                        config=False,
                        help="the id of the VM (down) to attach the disk "
                             "to; its snapshots make the layers"),
            opts.Option("-f", "--format", choices=("raw", "qcow2"),
                        type=opts.choice("raw", "qcow2"), config=False,
                        default="qcow2",
                        help="the base layer's format on the disk "
                             "(default qcow2); the others are qcow2"),
            opts.Option("--name", config=False,
                        help="the disk's name (default: the top file's "
                             "name without its extension)"),
            opts.Flag("--verify", negate=True, default=True,
                      help="compare the disk's checksum with the "
                           "chain's at the end (default: on)"),
            opts.Flag("--allow-backing", config=False, default=False,
                      help="upload a chain whose layers are outside the "
                           "top's folder or name qcow2 data files; "
                           "refused by default"),
        ),
        positionals=[(("filename",), dict(
            metavar="TOP", type=_argtype(_existing_file),
            help="the chain's top layer (download-snapshot's top)"))])
    opts.Command(
        p, "info", disk_info,
        "Show a disk: alias, format, sizes, storage domain, backup mode.",
        options=(), positionals=[disk_id])
    from . import _tool_glance
    _tool_glance.add_commands(p)
    return p


def _validate_upload(ns):
    """upload-disk's usage errors: URL options without a URL, or local
    file options with one. Header syntax is checked here, and an error
    names the header, never its value."""
    from . import urlsource

    url_options = [flag for flag, value in (
        ("--header", ns.header), ("--header-file", ns.header_file),
        ("--source-cafile", ns.source_cafile),
        ("--allow-redirect-host", ns.allow_redirect_host)) if value]
    if not _is_url(ns.filename):
        if url_options:
            return f"{url_options[0]} needs a URL as FILE"
        return None
    for flag, value in (("--member", ns.member), ("--resume", ns.resume),
                        ("--allow-backing", ns.allow_backing)):
        if value:
            return (f"{flag} cannot be used with a URL (an upload from a "
                    f"URL is not resumable, and a remote image's backing "
                    f"files are never followed)")
    for line in ns.header or ():
        try:
            urlsource.parse_header(line)
        except ValueError as e:
            return f"argument --header: {e}"
    return None


def _argtype(parse):
    """An argparse type from an options parser (Invalid -> usage)."""
    import argparse

    def convert(value):
        try:
            return parse(value)
        except opts.Invalid as e:
            raise argparse.ArgumentTypeError(f"{value!r}: {e}")
    convert.__name__ = parse.__name__
    return convert


def main(argv=None):
    if argv is None:
        argv = sys.argv[1:]
    args = parser().parse_args(argv)
    args.argv = argv
    try:
        setup_logging(args)
    except OSError as e:
        print(f"ovirt-img: error: Cannot open log file {args.log_file}: "
              f"{e.strerror or e}", file=sys.stderr)
        return 1
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        # Before the progress line, which would be drawn over the prompt.
        args.password = password(args)
        args.func(args)
        return 0
    except Terminated as e:
        log.debug("Terminated", exc_info=True)
        print(f"ovirt-img: terminated by {signal.Signals(e.signo).name}",
              file=sys.stderr)
        return 128 + e.signo
    except KeyboardInterrupt:
        log.debug("Interrupted", exc_info=True)
        print("ovirt-img: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        log.debug("Command failed", exc_info=True)
        message = redact(error_message(e))
        if args.log_file:
            log.error("Command failed: %s", message)
        print(f"ovirt-img: error: {message}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signo, frame):
    raise Terminated(signo)
