"""
ovirt-img's side of the oVirt engine, through the oVirt SDK
(ovirt-engine-sdk-python 4.6.3): the disks, storage domains, hosts and
image transfers of ENGINE-SIM.md sections 1.1 and 1.2, the VM
backups of section 1.5, and the disk snapshots, VM snapshots and disk
attachments of doc/engine-api.md.

Every engine error comes out as Error with one line that says what was
being done and the engine's fault reason and detail, never the SDK's
traceback. Every wait has a deadline.

Polling. The engine moves a transfer or a disk forward in the
background; clients poll. Upstream sleeps 1 s before every poll, which
costs about a second per wait even when the engine is done at once. Here
the first poll comes after 50 ms and the interval doubles up to 1 s
(Poller), so a wait costs what the engine takes, plus at most half of it.
"""

import contextlib
import logging
import os
import re
import time
import uuid

log = logging.getLogger("ovirt")

API_PATH = "/ovirt-engine/api"

# Where vdsm keeps this host's hardware id; ovirt-img runs the transfer
# on this host when the file names one the engine knows.
VDSM_ID = "/etc/vdsm/vdsm.id"
VDSM_ID_ENV = "OVIRT_IMG_VDSM_ID"

# Seconds. One engine request (the SDK's total time per request).
REQUEST_TIMEOUT = 120
# Waiting for a transfer to start, to finalize and to be cancelled.
START_TIMEOUT = 60
FINALIZE_TIMEOUT = 300
CANCEL_TIMEOUT = 60

# Seconds without a client after which the engine pauses a resumable
# transfer (upload-disk, download-disk): long enough to notice that
# ovirt-img died and run it again with --resume.
RESUMABLE_INACTIVITY_TIMEOUT = 3600

# Poll intervals: the first, then doubling up to the last.
POLL_FIRST = 0.05
POLL_MAX = 1.0

# A vdsm hardware id: a UUID or a similar token; nothing that could
# change the meaning of the engine's search query.
_HW_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")


class Error(Exception):
    """A failure to report in one line."""


class NotStarted(Error):
    """A transfer that ended, or went away, before it started."""


class Poller:
    """
    Intervals for polling something that changes soon: POLL_FIRST, then
    doubling up to POLL_MAX, until the deadline (time.monotonic()).
    """

    def __init__(self, timeout, what, sleep=time.sleep,
                 now=time.monotonic):
        self.what = what
        self._sleep = sleep
        self._now = now
        self._deadline = now() + timeout
        self._timeout = timeout
        self._interval = POLL_FIRST

    def wait(self):
        """Sleep until the next poll; raise Error past the deadline."""
        left = self._deadline - self._now()
        if left <= 0:
            raise Error(f"Timed out after {self._timeout} seconds waiting "
                        f"for {self.what}")
        self._sleep(min(self._interval, left))
        self._interval = min(self._interval * 2, POLL_MAX)


def _sdk():
    try:
        import ovirtsdk4
        import ovirtsdk4.types
    except ImportError as e:
        raise Error(
            f"ovirt-img needs the oVirt engine SDK (ovirt-engine-sdk-python"
            f"; pip install 'ovirt-imageio[sdk]'): {e}") from None
    return ovirtsdk4


def describe(e):
    """One line for an SDK error: the engine's fault reason and detail
    and the HTTP status, or the SDK's message."""
    fault = getattr(e, "fault", None)
    if fault is not None and (fault.reason or fault.detail):
        parts = [p for p in (fault.reason, fault.detail) if p]
        msg = " ".join(": ".join(parts).split())
        code = getattr(e, "code", None)
        return f"{msg} (HTTP {code})" if code else msg
    msg = " ".join(str(e).split())
    # The SDK's wording of curl and SSO errors, without its wrapping.
    m = _CURL_ERROR.fullmatch(msg)
    if m:
        return f"{m.group(2)} (curl error {m.group(1)})"
    m = _SSO_ERROR.fullmatch(msg)
    if m:
        return f"{m.group(2)} ({m.group(1)})"
    return msg or type(e).__name__


_CURL_ERROR = re.compile(r"Error while sending HTTP request: \((\d+), "
                         r"['\"](.*)['\"]\)")
_SSO_ERROR = re.compile(r"Error during SSO authentication (\S+) : (.*)")


class Engine:
    """
    A connection to the engine: log in with the first request, log out
    on close().
    """

    def __init__(self, engine_url, username, password, cafile=None,
                 secure=True, debug=False, timeout=REQUEST_TIMEOUT):
        self.sdk = _sdk()
        self.types = self.sdk.types
        if secure and cafile is not None and not os.path.isfile(cafile):
            raise Error(f"CA file {cafile} does not exist")
        self.url = engine_url
        with self.step(f"Cannot connect to {engine_url}"):
            self.connection = self.sdk.Connection(
                url=engine_url + API_PATH,
                username=username,
                password=password,
                ca_file=cafile,
                insecure=not secure,
                debug=debug,
                log=logging.getLogger("ovirtsdk") if debug else None,
                timeout=timeout)
        # Log in now, so that a wrong password or an engine that cannot
        # be reached is reported as such, not as the first request's
        # failure.
        try:
            with self.step(f"Cannot log in to {engine_url} as {username}"):
                self.connection.authenticate()
        except BaseException:
            self.connection.close(logout=False)
            raise
        self.system = self.connection.system_service()

    def close(self):
        # Log out. The transfer is done (or failed) by now: a failed
        # logout is not the command's failure.
        try:
            self.connection.close()
        except self.sdk.Error as e:
            log.warning("Cannot log out of %s: %s", self.url, describe(e))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def step(self, what):
        """Turn the SDK's errors in the block into Error("what: why")."""
        try:
            yield
        except self.sdk.Error as e:
            raise Error(f"{what}: {describe(e)}") from e

    def _not_found(self, e):
        return isinstance(e, self.sdk.NotFoundError)

    # Storage domains, hosts.

    def storage_domain(self, name):
        """The storage domain named name; Error if there is none."""
        with self.step("Cannot list storage domains"):
            sds = self.system.storage_domains_service().list()
        for sd in sds:
            if sd.name == name:
                return sd
        names = ", ".join(sorted(sd.name for sd in sds if sd.name))
        raise Error(f"No storage domain named {name!r} (there are: "
                    f"{names or 'none'})")

    def storage_domain_by_id(self, sd_id):
        with self.step(f"Cannot get storage domain {sd_id}"):
            return self.system.storage_domains_service().storage_domain_service(
                sd_id).get()

    def is_block(self, sd):
        """True for a block storage domain (iscsi, fcp): its volumes are
        logical volumes, allocated up front."""
        storage = sd.storage
        kind = storage.type if storage is not None else None
        return kind is not None and kind.value in ("iscsi", "fcp")

    def this_host(self, sd_name, vdsm_id=None):
        """
        The host this command runs on, if it is an oVirt host the engine
        has Up in the storage domain's data center, else None.
        """
        hw_id = read_vdsm_id(vdsm_id)
        if hw_id is None:
            return None
        with self.step(f"Cannot find the data center of storage domain "
                       f"{sd_name}"):
            dcs = self.system.data_centers_service().list(
                search=f"storage.name={_search_value(sd_name)}",
                case_sensitive=True)
        if not dcs:
            raise Error(f"Storage domain {sd_name} is not attached to a "
                        f"data center")
        with self.step("Cannot look up this host"):
            hosts = self.system.hosts_service().list(
                search=(f"hw_id={hw_id} and "
                        f"datacenter={_search_value(dcs[0].name)} "
                        f"and status=Up"),
                case_sensitive=True)
        if not hosts:
            log.info("This host (hardware id %s) is not an Up host of data "
                     "center %s", hw_id, dcs[0].name)
            return None
        log.info("Transferring on this host: %s", hosts[0].name)
        return hosts[0]

    # Disks.

    def disk_service(self, disk_id):
        return self.system.disks_service().disk_service(disk_id)

    def get_disk(self, disk_id):
        with self.step(f"Cannot get disk {disk_id}"):
            return self.disk_service(disk_id).get()

    def add_disk(self, **params):
        """Create a disk: params as types.Disk's, with storage_domain the
        storage domain's name."""
        types = self.types
        sd_name = params.pop("storage_domain")
        disk = types.Disk(
            storage_domains=[types.StorageDomain(name=sd_name)], **params)
        with self.step("Cannot create disk"):
            return self.system.disks_service().add(disk)

    def wait_for_disk(self, disk_id, timeout, on_poll=None):
        """Wait until the new disk is ok; Error if it becomes illegal,
        disappears or stays locked past timeout."""
        status = self.types.DiskStatus
        poller = Poller(timeout, f"disk {disk_id} to be created")
        while True:
            poller.wait()
            try:
                disk = self.disk_service(disk_id).get()
            except self.sdk.NotFoundError:
                raise Error(f"Disk {disk_id} was removed while it was "
                            f"created") from None
            except self.sdk.Error as e:
                raise Error(f"Cannot get disk {disk_id}: "
                            f"{describe(e)}") from e
            if disk.status == status.OK:
                return disk
            if disk.status == status.ILLEGAL:
                raise Error(f"Disk {disk_id} became ILLEGAL")

    def remove_disk(self, disk_id, timeout=CANCEL_TIMEOUT, on_locked=None):
        """
        Remove a disk this command created. A disk that is still locked
        (being created, or by a transfer) cannot be removed yet: wait
        for it, calling on_locked() (if given) at each poll.
        """
        status = self.types.DiskStatus
        poller = Poller(timeout, f"disk {disk_id} to be unlocked")
        while True:
            try:
                disk = self.disk_service(disk_id).get()
            except self.sdk.NotFoundError:
                return
            except self.sdk.Error as e:
                raise Error(f"Cannot remove disk {disk_id}: "
                            f"{describe(e)}") from e
            if disk.status != status.LOCKED:
                break
            if on_locked is not None:
                on_locked()
            poller.wait()
        with self.step(f"Cannot remove disk {disk_id}"):
            try:
                self.disk_service(disk_id).remove()
            except self.sdk.NotFoundError:
                pass

    # Image transfers.

    def transfer_service(self, transfer_id):
        return self.system.image_transfers_service().image_transfer_service(
            transfer_id)

    def add_transfer(self, disk, direction, host=None, backup=None,
                     snapshot=None, shallow=None, resumable=False):
        """Create an image transfer of disk (raw: the guest's view, over
        NBD), cancelled by the engine if the client goes away; of the
        disk as a backup sees it with backup; of the disk snapshot (a
        layer) snapshot instead of the disk. shallow: only the layer
        itself (the disk's active one, or snapshot), its holes reported,
        not its backing chain. resumable: paused instead, after
        RESUMABLE_INACTIVITY_TIMEOUT seconds without a client, so that
        `--resume` can finish it."""
        types = self.types
        policy = types.ImageTransferTimeoutPolicy
        extra = {"timeout_policy": policy.CANCEL}
        if resumable:
            extra = {"timeout_policy": policy.PAUSE,
                     "inactivity_timeout": RESUMABLE_INACTIVITY_TIMEOUT}
        transfer = types.ImageTransfer(
            disk=types.Disk(id=disk.id) if snapshot is None else None,
            snapshot=(types.DiskSnapshot(id=snapshot.id)
                      if snapshot is not None else None),
            host=types.Host(id=host.id) if host is not None else None,
            backup=types.Backup(id=backup.id) if backup is not None else None,
            direction=types.ImageTransferDirection(direction),
            format=types.DiskFormat.RAW,
            shallow=shallow,
            **extra)
        what = (f"disk snapshot {snapshot.id} of disk {disk.id}"
                if snapshot is not None else f"disk {disk.id}")
        with self.step(f"Cannot create {direction} transfer for {what}"):
            return self.system.image_transfers_service().add(transfer)

    def get_transfer(self, transfer_id):
        with self.step(f"Cannot get transfer {transfer_id}"):
            return self.transfer_service(transfer_id).get()

    def transfer_disk_id(self, transfer):
        """The id of the disk the transfer is of (the engine names it as
        <image>, the SDK's input as <disk>)."""
        return _id(transfer.image) or _id(transfer.disk)

    def pause_transfer(self, transfer):
        """Pause an upload (transferring -> paused_user), for --resume."""
        with self.step(f"Cannot pause transfer {transfer.id}"):
            self.transfer_service(transfer.id).pause()

    def resume_transfer(self, transfer, timeout=START_TIMEOUT):
        """
        Resume a transfer left by an interrupted ovirt-img: paused (by
        the user, or by the engine on inactivity) or still transferring.
        Return it once transferring, with its URLs; Error if it cannot be.
        """
        phase = self.types.ImageTransferPhase
        current = self.get_transfer(transfer.id)
        if current.phase in (phase.PAUSED_USER, phase.PAUSED_SYSTEM):
            with self.step(f"Cannot resume transfer {transfer.id}"):
                self.transfer_service(transfer.id).resume()
            current = self.get_transfer(transfer.id)
            if current.phase in (phase.PAUSED_USER, phase.PAUSED_SYSTEM):
                current.phase = phase.RESUMING
        elif current.phase not in (phase.TRANSFERRING, phase.RESUMING):
            name = current.phase.value if current.phase else "unknown"
            raise Error(f"Cannot resume transfer {transfer.id}: its phase "
                        f"is {name}")
        return self.wait_for_transfer(current, timeout)

    def unfinished_transfers(self, disk_id):
        """The disk's transfers that have not finished: for a new disk,
        one this command created without hearing the answer (the request
        was interrupted)."""
        phase = self.types.ImageTransferPhase
        finished = (phase.FINISHED_SUCCESS, phase.FINISHED_FAILURE,
                    phase.FINISHED_CLEANUP)
        with self.step("Cannot list image transfers"):
            transfers = self.system.image_transfers_service().list()
        # The engine names the disk as <image>, the SDK's input as <disk>.
        return [t for t in transfers
                if t.phase not in finished
                and disk_id in (_id(t.image), _id(t.disk))]

    def wait_for_transfer(self, transfer, timeout=START_TIMEOUT):
        """
        Wait until the transfer is transferring and return it. Any other
        outcome raises Error; the caller cancels (upload) or finalizes
        (download).
        """
        phase = self.types.ImageTransferPhase
        service = self.transfer_service(transfer.id)
        poller = Poller(timeout, f"transfer {transfer.id} to start")
        current = transfer
        while True:
            if current.phase == phase.TRANSFERRING:
                return current
            if current.phase not in (phase.INITIALIZING, phase.RESUMING,
                                     phase.UNKNOWN):
                name = current.phase.value if current.phase else "unknown"
                raise NotStarted(f"Transfer {transfer.id} did not start: "
                                 f"phase is {name}")
            poller.wait()
            current = self._get(
                service, f"transfer {transfer.id}",
                lambda: NotStarted(f"Transfer {transfer.id} was removed"))

    def finalize_transfer(self, transfer, disk_id,
                          timeout=FINALIZE_TIMEOUT):
        """
        Finalize the transfer and wait until the engine says it
        succeeded (for an upload: the disk is verified and ok).
        """
        phase = self.types.ImageTransferPhase
        service = self.transfer_service(transfer.id)
        with self.step(f"Cannot finalize transfer {transfer.id}"):
            service.finalize()
        poller = Poller(timeout, f"transfer {transfer.id} to finalize")
        while True:
            poller.wait()
            try:
                current = service.get()
            except self.sdk.NotFoundError:
                # Older engines remove the transfer at once; the disk
                # tells how it ended.
                return self._check_disk_after(transfer, disk_id)
            except self.sdk.Error as e:
                raise Error(f"Cannot get transfer {transfer.id}: "
                            f"{describe(e)}") from e
            if current.phase == phase.FINISHED_SUCCESS:
                return
            if current.phase in (phase.FINISHED_FAILURE,
                                 phase.FINISHED_CLEANUP,
                                 phase.FINALIZING_FAILURE):
                raise Error(f"Transfer {transfer.id} failed: the engine "
                            f"could not finalize it (phase "
                            f"{current.phase.value})")

    def _check_disk_after(self, transfer, disk_id):
        try:
            disk = self.disk_service(disk_id).get()
        except self.sdk.NotFoundError:
            raise Error(f"Transfer {transfer.id} failed: disk {disk_id} "
                        f"was removed") from None
        except self.sdk.Error as e:
            raise Error(f"Cannot get disk {disk_id}: {describe(e)}") from e
        if disk.status != self.types.DiskStatus.OK:
            raise Error(f"Transfer {transfer.id} failed: disk {disk_id} is "
                        f"{disk.status.value if disk.status else 'unknown'}")

    def cancel_transfer(self, transfer, timeout=CANCEL_TIMEOUT):
        """
        Cancel the transfer and wait until the engine has cleaned up
        (for an upload, the engine then removes the new disk). Errors
        are logged: this runs while another error is on its way out.
        """
        phase = self.types.ImageTransferPhase
        service = self.transfer_service(transfer.id)
        try:
            service.cancel()
        except self.sdk.NotFoundError:
            return
        except self.sdk.Error as e:
            log.error("Cannot cancel transfer %s: %s", transfer.id,
                      describe(e))
            return
        poller = Poller(timeout, f"transfer {transfer.id} to be cancelled")
        try:
            while True:
                poller.wait()
                try:
                    current = service.get()
                except self.sdk.NotFoundError:
                    return
                if current.phase in (phase.FINISHED_FAILURE,
                                     phase.FINISHED_CLEANUP,
                                     phase.FINISHED_SUCCESS):
                    return
        except (Error, self.sdk.Error) as e:
            log.error("Transfer %s was cancelled, but: %s", transfer.id,
                      e if isinstance(e, Error) else describe(e))


    def wait_for_end(self, transfer, timeout=CANCEL_TIMEOUT):
        """
        Wait until a transfer the engine stopped (cancelled_system: it
        did not start) has ended, so that what holds it (a backup, the
        disk's lock) can be released. Errors are logged: this runs while
        another error is on its way out.
        """
        phase = self.types.ImageTransferPhase
        service = self.transfer_service(transfer.id)
        poller = Poller(timeout, f"transfer {transfer.id} to end")
        try:
            while True:
                try:
                    current = service.get()
                except self.sdk.NotFoundError:
                    return
                if current.phase in (phase.FINISHED_FAILURE,
                                     phase.FINISHED_CLEANUP,
                                     phase.FINISHED_SUCCESS):
                    return
                poller.wait()
        except (Error, self.sdk.Error) as e:
            log.error("Transfer %s did not end: %s", transfer.id,
                      e if isinstance(e, Error) else describe(e))

    # VMs and backups (ENGINE-SIM.md 1.5, 2.5, 3.4; doc/engine-api.md).

    def vm_of_disk(self, disk_id):
        """
        The VM the disk is attached to: one request, the VMs with their
        attachments inline (follow). Error if none or several.
        """
        with self.step("Cannot list VMs"):
            vms = self.system.vms_service().list(follow="disk_attachments")
        found = [vm for vm in vms
                 if any(_id(a.disk) == disk_id or a.id == disk_id
                        for a in vm.disk_attachments or ())]
        if not found:
            raise Error(f"Disk {disk_id} is not attached to a VM: a backup "
                        f"is of a VM's disk (download-disk copies a "
                        f"floating disk)")
        if len(found) > 1:
            names = ", ".join(f"{vm.name} ({vm.id})" for vm in found)
            raise Error(f"Disk {disk_id} is attached to several VMs "
                        f"({names}); cannot tell whose backup to take")
        return found[0]

    def backup_service(self, vm_id, backup_id):
        return (self.system.vms_service().vm_service(vm_id)
                .backups_service().backup_service(backup_id))

    def start_backup(self, vm, disk_id, backup_id, from_checkpoint=None,
                     description=None):
        """Start a backup of one disk of vm, with our own id (so that an
        interrupted request can still be finalized)."""
        types = self.types
        backup = types.Backup(
            id=backup_id,
            disks=[types.Disk(id=disk_id)],
            from_checkpoint_id=from_checkpoint,
            description=description)
        what = (f"Cannot start an incremental backup of disk {disk_id} "
                f"from checkpoint {from_checkpoint}" if from_checkpoint
                else f"Cannot start a backup of disk {disk_id}")
        with self.step(what):
            return (self.system.vms_service().vm_service(vm.id)
                    .backups_service().add(backup))

    def wait_for_backup(self, vm, backup, timeout=START_TIMEOUT):
        """Wait until the backup is ready and return it; Error with the
        engine's event if it failed."""
        phase = self.types.BackupPhase
        service = self.backup_service(vm.id, backup.id)
        poller = Poller(timeout, f"backup {backup.id} to be ready")
        current = backup
        while current.phase != phase.READY:
            if current.phase in (phase.FAILED, phase.SUCCEEDED,
                                 phase.FINALIZING):
                raise Error(f"Backup {backup.id} failed"
                            f"{self._backup_event(backup.id)}")
            poller.wait()
            current = self._get(service, f"backup {backup.id}", lambda: Error(
                f"Backup {backup.id} failed{self._backup_event(backup.id)}"))
        return current

    def _get(self, service, what, gone):
        """service.get(); gone() is the Error raised when the engine no
        longer has it."""
        try:
            return service.get()
        except self.sdk.NotFoundError:
            raise gone() from None
        except self.sdk.Error as e:
            raise Error(f"Cannot get {what}: {describe(e)}") from e

    def _backup_event(self, backup_id):
        """': the engine's last word on the backup', or ''."""
        try:
            events = self.system.events_service().list(
                search=_search_value(backup_id), max=1)
        except self.sdk.Error:
            return ""
        if events and events[0].description:
            return f": {events[0].description}"
        return ""

    def finalize_backup(self, vm, backup, timeout=FINALIZE_TIMEOUT):
        """Finalize the backup (its transfers finished) and wait until it
        succeeded: the disks are unlocked, the checkpoint kept."""
        phase = self.types.BackupPhase
        service = self.backup_service(vm.id, backup.id)
        with self.step(f"Cannot finalize backup {backup.id}"):
            service.finalize()
        poller = Poller(timeout, f"backup {backup.id} to finalize")
        while True:
            poller.wait()
            try:
                current = service.get()
            except self.sdk.NotFoundError:
                return
            except self.sdk.Error as e:
                raise Error(f"Cannot get backup {backup.id}: "
                            f"{describe(e)}") from e
            if current.phase == phase.SUCCEEDED:
                return
            if current.phase == phase.FAILED:
                raise Error(f"Backup {backup.id} failed to finalize"
                            f"{self._backup_event(backup.id)}")


    # Disk snapshots, VM snapshots, disk attachments (doc/engine-api.md).

    def disk_chain(self, disk):
        """
        The disk's layers, base first, the active one last: its disk
        snapshots with the active one (include_active), ordered by their
        parent links. Error if they do not make one chain.
        """
        with self.step(f"Cannot list the snapshots of disk {disk.id}"):
            layers = self.disk_service(disk.id).disk_snapshots_service().list(
                include_active=True, include_template=True)
        return chain(disk.id, layers)

    def vm_service(self, vm_id):
        return self.system.vms_service().vm_service(vm_id)

    def get_vm(self, vm_id):
        with self.step(f"Cannot get VM {vm_id}"):
            return self.vm_service(vm_id).get()

    def attach_disk(self, vm, disk_id):
        """Attach the disk to the VM, not bootable, active (plugged)."""
        types = self.types
        attachment = types.DiskAttachment(
            disk=types.Disk(id=disk_id), active=True, bootable=False,
            interface=types.DiskInterface.VIRTIO_SCSI)
        with self.step(f"Cannot attach disk {disk_id} to VM {vm.id}"):
            return self.vm_service(vm.id).disk_attachments_service().add(
                attachment)

    def add_vm_snapshot(self, vm, disk_id, description):
        """A snapshot of one disk of the VM (disk_attachments names
        only it): a new empty layer on top of the disk."""
        types = self.types
        snapshot = types.Snapshot(
            description=description,
            persist_memorystate=False,
            disk_attachments=[types.DiskAttachment(
                disk=types.Disk(id=disk_id))])
        with self.step(f"Cannot create a snapshot of disk {disk_id} on "
                       f"VM {vm.id}"):
            return self.vm_service(vm.id).snapshots_service().add(snapshot)

    def wait_for_vm_snapshot(self, vm, snapshot, timeout=START_TIMEOUT):
        """Wait until the snapshot is ok; Error with the engine's event
        if it failed (the engine removes a failed snapshot)."""
        status = self.types.SnapshotStatus
        service = self.vm_service(vm.id).snapshots_service() \
            .snapshot_service(snapshot.id)
        poller = Poller(timeout, f"snapshot {snapshot.id} to be created")
        current = snapshot
        while current.snapshot_status != status.OK:
            poller.wait()
            current = self._get(
                service, f"snapshot {snapshot.id}", lambda: Error(
                    f"Snapshot {snapshot.id} failed"
                    f"{self._backup_event(snapshot.id)}"))
        return current


def chain(disk_id, layers):
    """Layers (DiskSnapshot) ordered base first by their parent links;
    Error unless they form one chain."""
    by_parent = {}
    for layer in layers:
        # The ids name local files (download-snapshot): only UUIDs, as
        # the engine makes them, never a path.
        if not _is_uuid(layer.id):
            raise Error(f"Disk {disk_id} has a layer with an invalid id "
                        f"{str(layer.id)[:64]!r}")
        parent = _id(layer.parent)
        if parent in by_parent:
            raise Error(f"Disk {disk_id} has layers that are not one "
                        f"chain: {layer.id} and {by_parent[parent].id} "
                        f"have the same parent")
        by_parent[parent] = layer
    ids = {layer.id for layer in layers}
    bases = [p for p in by_parent if p not in ids]
    if len(bases) != 1:
        raise Error(f"Disk {disk_id} has no layers, or layers that are "
                    f"not one chain")
    ordered = []
    parent = bases[0]
    while parent in by_parent:
        layer = by_parent.pop(parent)
        ordered.append(layer)
        parent = layer.id
    if by_parent:
        raise Error(f"Disk {disk_id} has layers that are not one chain")
    return ordered


def _id(entity):
    return entity.id if entity is not None else None


def _is_uuid(value):
    try:
        return str(uuid.UUID(value)) == value
    except (TypeError, ValueError, AttributeError):
        return False


def read_vdsm_id(path=None):
    """
    This host's vdsm hardware id, or None if this is not an oVirt host.
    The file is VDSM_ID, or $OVIRT_IMG_VDSM_ID if set.
    """
    if path is None:
        path = os.environ.get(VDSM_ID_ENV) or VDSM_ID
    try:
        with open(path, encoding="utf-8") as f:
            hw_id = f.read(4096).strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        log.warning("Cannot read %s: %s; not using this host", path, e)
        return None
    if not _HW_ID.fullmatch(hw_id):
        log.warning("Ignoring %s: %r is not a hardware id", path,
                    hw_id[:64])
        return None
    return hw_id


def _search_value(value):
    """A value for the engine's search language: quoted when it holds
    anything but a plain word."""
    if re.fullmatch(r"[\w.-]+", value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
