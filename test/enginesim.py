"""
An oVirt engine simulator, for tests and demos: the REST API subset the
oVirt SDK (ovirtsdk4 4.6.3) and its example scripts use, with what the
engine and vdsm do behind each call (/work/shared/ENGINE-SIM.md).

- HTTPS (or plain HTTP) on 127.0.0.1, stdlib http.server, XML as the SDK
  reads and writes it; SSO token and logout as JSON.
- Storage domains of file type (nfs) and block type (iscsi, fcp). A block
  domain follows the engine's rules (no sparse raw disk, no discard, no
  sparse ticket) while its volumes are still files; a new raw volume
  there holds stale data, as a new logical volume does.
- Volumes are real raw/qcow2 files under the store directory, made with
  qemu-img. A disk is a chain of them: its base ({disk id}.img), then a
  qcow2 layer per VM snapshot taken of it ({volume id}.img), each naming
  its parent by file name, relative, as vdsm does; the last one is the
  active layer. The layers are the API's disk snapshots
  (doc/engine-api.md).
- Transfers start qemu-nbd with vdsm's flags and add, extend and remove
  tickets on the daemon's control socket as vdsm does: of the disk's
  active layer, or of a disk snapshot's (download only); shallow, that
  layer alone, else with the chain below it.
- Phases move forward in background threads, after delays scaled down
  from the engine's (Engine(delay=...)): clients poll.

Not the product: this module lives with the tests.

State: everything is in the Engine, under engine.lock: entities by id
(disks with their volumes, transfers, VMs with their checkpoints and
snapshots, backups), events, SSO tokens. A transfer's ticket calls to the daemon are serialized by its
own lock. Background steps run in threads started by Engine.later().

Transfer phases (ENGINE-SIM.md 2.8), as this simulator moves them:

    initializing -> transferring         qemu-nbd greets, ticket added
    initializing -> paused_system        upload that failed to start
    initializing -> cancelled_system     download that failed to start
                 -> finished_failure
    transferring -> finalizing_success   finalize: ticket removed,
                 -> finished_success     qemu-nbd stopped, upload verified
    finalizing_success -> finalizing_failure -> finished_failure
                                         verification failed (disk removed)
    transferring -> cancelled_user -> finalizing_cleanup
                 -> finished_cleanup -> finished_failure   (cancel)
    transferring -> paused_user -> resuming -> transferring
    transferring -> paused_system | cancelled_system  idle past the
                                         inactivity timeout (by policy) or
                                         ticket lost; cancelled ends in
                                         finished_failure

An upload's disk is removed when its transfer ends in finished_failure.

Injected faults: engine.inject(name) makes a step fail as the engine or
vdsm can (FAULTS lists them), until engine.faults.discard(name).
engine.hold(name) makes POST /disks ("add_disk") or POST /imagetransfers
("add_transfer") wait, its work done, before it answers, until the Event
it returns is set: a client can be interrupted while it waits for the
answer, as with a slow engine. hold("finish_failed") keeps a failed
transfer in cancelled_system or finalizing_failure until it is set, as
a busy engine does.

    engine = Engine(store_dir, control_socket, daemon_port, pki)
    engine.start()
    engine.url              # https://127.0.0.1:PORT (the SDK adds the path)
    vm = engine.add_vm("vm1", [disk_id])
    engine.take_snapshot(vm.id)     # a new layer on each of its disks
    engine.stop()

Run as a script for a manual session:

    python test/enginesim.py --store DIR --control-socket SOCK \\
        --daemon-port 54322 --pki DIR
"""

import argparse
import http.server
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
import xml.etree.ElementTree as ET

from ovirt_imageio import admin

log = logging.getLogger("enginesim")

API = "/ovirt-engine/api"
TOKEN_PATH = "/ovirt-engine/sso/oauth/token"
LOGOUT_PATH = "/ovirt-engine/services/sso-logout"

# vdsm's ticket timeout (engine ImageTransferClientTicketValidityInSeconds)
# and the margin below which the engine extends a ticket.
TICKET_TIMEOUT = 300
TICKET_EXTEND_MARGIN = 240
# Engine TransferImageClientInactivityTimeoutInSeconds.
INACTIVITY_TIMEOUT = 60
# How long a child process (qemu-img, qemu-nbd start) may take.
COMMAND_TIMEOUT = 60
# How long finalize waits for the daemon to release a ticket; the daemon's
# own control.remove_timeout bounds each DELETE.
REMOVE_TICKET_TIMEOUT = 90

BLOCK_TYPES = ("iscsi", "fcp")

# The faults Engine.inject() knows: name -> what goes wrong.
FAULTS = {
    "create_volume": "vdsm cannot create a new disk's volume: the disk "
                     "becomes illegal",
    "stale_volume": "a new volume reads old data, not zeros (storage that "
                    "does not zero what it allocates)",
    "add_transfer": "POST /imagetransfers is refused (409)",
    "start_transfer": "a transfer cannot start, as when qemu-nbd cannot "
                      "open the volume: an upload pauses (paused_system), "
                      "a download is cancelled",
    "create_snapshot": "vdsm cannot create a VM snapshot's new layers: the "
                       "engine removes the snapshot, with an event",
    "start_layer_upload": "an upload into a layer on top of others (a disk "
                          "with snapshots) cannot start, as start_transfer",
}
FINISHED = ("finished_success", "finished_failure", "finished_cleanup")


class Fault(Exception):
    """An API error: HTTP status, reason and detail of the <fault>."""

    def __init__(self, status, reason, detail=""):
        super().__init__(f"{status} {reason}: {detail}")
        self.status = status
        self.reason = reason
        self.detail = detail


def not_found(kind, ident):
    return Fault(404, "Not Found", f"Entity not found: {kind} {ident}")


def conflict(detail):
    return Fault(409, "Operation Failed", f"[{detail}]")


def now_iso():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + \
        ".%03d+00:00" % (int(t * 1000) % 1000)


# XML helpers.


def sub(parent, tag, text=None, **attrs):
    e = ET.SubElement(parent, tag, {k: str(v) for k, v in attrs.items()})
    if text is not None:
        e.text = xml_text(text)
    return e


def xml_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def child_text(e, tag, default=None):
    c = e.find(tag) if e is not None else None
    if c is None or c.text is None:
        return default
    return c.text.strip()


def child_bool(e, tag, default=None):
    v = child_text(e, tag)
    if v is None:
        return default
    return v == "true"


def child_int(e, tag, default=None):
    v = child_text(e, tag)
    return default if v is None else int(v)


def child_id(e, tag):
    c = e.find(tag)
    return None if c is None else c.get("id")


def link(parent, tag, kind, ident, base=API):
    return sub(parent, tag, href=f"{base}/{kind}/{ident}", id=ident)


# Entities.


class StorageDomain:

    def __init__(self, name, storage_type):
        self.id = str(uuid.uuid4())
        self.name = name
        self.storage_type = storage_type

    @property
    def block(self):
        return self.storage_type in BLOCK_TYPES

    def xml(self, dc):
        e = ET.Element("storage_domain",
                       href=f"{API}/storagedomains/{self.id}", id=self.id)
        sub(e, "name", self.name)
        sub(e, "type", "data")
        storage = sub(e, "storage")
        sub(storage, "type", self.storage_type)
        sub(e, "storage_format", "v5")
        sub(e, "available", 1 << 40)
        sub(e, "used", 0)
        sub(e, "committed", 0)
        dcs = sub(e, "data_centers")
        link(dcs, "data_center", "datacenters", dc.id)
        return e


class DataCenter:

    def __init__(self, name):
        self.id = str(uuid.uuid4())
        self.name = name

    def xml(self):
        e = ET.Element("data_center", href=f"{API}/datacenters/{self.id}",
                       id=self.id)
        sub(e, "name", self.name)
        sub(e, "status", "up")
        return e


class Host:

    def __init__(self, name, address, hw_id):
        self.id = str(uuid.uuid4())
        self.name = name
        self.address = address
        self.hw_id = hw_id

    def xml(self):
        e = ET.Element("host", href=f"{API}/hosts/{self.id}", id=self.id)
        sub(e, "name", self.name)
        sub(e, "address", self.address)
        sub(e, "status", "up")
        hw = sub(e, "hardware_information")
        sub(hw, "uuid", self.hw_id)
        return e


class Volume:
    """
    One layer of a disk, as vdsm keeps it: a volume file whose id is the
    engine's image id (a disk snapshot's id). A qcow2 layer names its
    parent by the parent's file name, relative, as vdsm does. snapshot:
    the VM snapshot that holds this layer (None for a floating disk's
    active layer).
    """

    def __init__(self, ident, path, fmt, parent=None):
        self.id = ident
        self.path = path
        self.format = fmt                      # "raw" or "cow"
        self.parent = parent
        self.snapshot = None
        self.creation_date = now_iso()

    @property
    def qemu_format(self):
        return "qcow2" if self.format == "cow" else "raw"

    def actual_size(self):
        try:
            return os.stat(self.path).st_blocks * 512
        except FileNotFoundError:
            return 0


class Disk:

    def __init__(self, ident, name, fmt, sparse, backup, content_type,
                 provisioned_size, initial_size, sd, description, path):
        self.id = ident
        self.name = name
        self.sparse = sparse
        self.backup = backup                   # "incremental" or "none"
        self.content_type = content_type
        self.provisioned_size = provisioned_size
        self.initial_size = initial_size
        self.sd = sd
        self.description = description
        # Base first; the last one is the active layer, the one a disk
        # transfer writes.
        self.volumes = [Volume(str(uuid.uuid4()), path, fmt)]
        self.status = "locked"
        self.backup_mode = None
        self.removed = False

    @property
    def active(self):
        return self.volumes[-1]

    @property
    def image_id(self):
        return self.active.id

    @property
    def path(self):
        return self.active.path

    @property
    def format(self):
        # The engine shows the active layer's format: a raw disk with a
        # snapshot is a cow disk.
        return self.active.format

    @property
    def qemu_format(self):
        return self.active.qemu_format

    def volume(self, volume_id):
        for v in self.volumes:
            if v.id == volume_id:
                return v
        return None

    def actual_size(self):
        return self.active.actual_size()

    def total_size(self):
        return sum(v.actual_size() for v in self.volumes)

    def xml(self, tag="disk"):
        e = ET.Element(tag, href=f"{API}/disks/{self.id}", id=self.id)
        sub(e, "actual_size", self.actual_size())
        sub(e, "alias", self.name)
        sub(e, "backup", self.backup)
        if self.backup_mode:
            sub(e, "backup_mode", self.backup_mode)
        sub(e, "content_type", self.content_type)
        sub(e, "description", self.description)
        sub(e, "format", self.format)
        sub(e, "image_id", self.image_id)
        sub(e, "name", self.name)
        sub(e, "propagate_errors", False)
        sub(e, "provisioned_size", self.provisioned_size)
        if self.format == "cow":
            sub(e, "qcow_version", "qcow2_v3")
        sub(e, "shareable", False)
        sub(e, "sparse", self.sparse)
        sub(e, "status", self.status)
        sub(e, "storage_type", "image")
        sub(e, "total_size", self.total_size())
        sub(e, "wipe_after_delete", False)
        sds = sub(e, "storage_domains")
        link(sds, "storage_domain", "storagedomains", self.sd.id)
        return e

    def snapshot_xml(self, volume, base):
        """
        A layer as a disk snapshot (DiskSnapshotMapper): the disk's
        fields, with the layer's id, format and size, its parent layer,
        the VM snapshot holding it and the disk it belongs to. base: the
        collection's path (storagedomains/{sd} or disks/{d}).
        """
        e = ET.Element("disk_snapshot",
                       href=f"{API}/{base}/disksnapshots/{volume.id}",
                       id=volume.id)
        sub(e, "actual_size", volume.actual_size())
        sub(e, "alias", self.name)
        sub(e, "content_type", self.content_type)
        sub(e, "description", self.description)
        sub(e, "format", volume.format)
        sub(e, "image_id", volume.id)
        sub(e, "name", self.name)
        sub(e, "propagate_errors", False)
        sub(e, "provisioned_size", self.provisioned_size)
        if volume.format == "cow":
            sub(e, "qcow_version", "qcow2_v3")
        sub(e, "shareable", False)
        sub(e, "sparse", self.sparse or volume is not self.volumes[0])
        sub(e, "status", self.status)
        sub(e, "storage_type", "image")
        sub(e, "total_size", volume.actual_size())
        sub(e, "wipe_after_delete", False)
        link(e, "disk", "disks", self.id)
        if volume.parent is not None:
            link(e, "parent", f"storagedomains/{self.sd.id}/disksnapshots",
                 volume.parent.id)
        if volume.snapshot is not None:
            link(e, "snapshot", f"vms/{volume.snapshot.vm.id}/snapshots",
                 volume.snapshot.id)
        sds = sub(e, "storage_domains")
        link(sds, "storage_domain", "storagedomains", self.sd.id)
        return e


class Vm:

    def __init__(self, name, disks, status="down"):
        self.id = str(uuid.uuid4())
        self.name = name
        self.disks = list(disks)
        self.status = status
        self.checkpoints = []               # oldest first
        # The "Active VM" snapshot first, then the regular ones, oldest
        # first.
        self.snapshots = [VmSnapshot(str(uuid.uuid4()), self, "Active VM",
                                     "active")]
        self.snapshots[0].status = "ok"

    @property
    def active_snapshot(self):
        return self.snapshots[0]

    def xml(self):
        e = ET.Element("vm", href=f"{API}/vms/{self.id}", id=self.id)
        sub(e, "name", self.name)
        sub(e, "status", self.status)
        return e


class VmSnapshot:
    """A VM snapshot: the VM's disks' layers as they were when it was
    taken (the layers whose snapshot it is), or the VM as it runs now
    ("Active VM", type active)."""

    def __init__(self, ident, vm, description, kind="regular"):
        self.id = ident
        self.vm = vm
        self.description = description
        self.type = kind
        self.status = "locked"
        self.date = now_iso()

    def xml(self):
        e = ET.Element("snapshot",
                       href=f"{API}/vms/{self.vm.id}/snapshots/{self.id}",
                       id=self.id)
        sub(e, "date", self.date)
        sub(e, "description", self.description)
        sub(e, "persist_memorystate", False)
        sub(e, "snapshot_status", self.status)
        sub(e, "snapshot_type", self.type)
        link(e, "vm", "vms", self.vm.id)
        return e


class Checkpoint:

    def __init__(self, ident, vm, parent_id, disk_ids):
        self.id = ident
        self.vm = vm
        self.parent_id = parent_id
        self.disk_ids = set(disk_ids)
        self.creation_date = now_iso()
        self.state = "created"

    def xml(self):
        base = f"{API}/vms/{self.vm.id}"
        e = ET.Element("checkpoint", href=f"{base}/checkpoints/{self.id}",
                       id=self.id)
        sub(e, "creation_date", self.creation_date)
        if self.parent_id:
            sub(e, "parent_id", self.parent_id)
        sub(e, "state", self.state)
        link(e, "vm", "vms", self.vm.id)
        return e


class Backup:

    def __init__(self, ident, vm, disks, from_checkpoint_id, description,
                 host):
        self.id = ident
        self.vm = vm
        self.disks = disks
        self.from_checkpoint_id = from_checkpoint_id
        self.to_checkpoint_id = None
        self.description = description
        self.host = host
        self.phase = "initializing"
        self.creation_date = now_iso()
        self.transfers = []

    def xml(self):
        base = f"{API}/vms/{self.vm.id}"
        e = ET.Element("backup", href=f"{base}/backups/{self.id}", id=self.id)
        sub(e, "creation_date", self.creation_date)
        if self.description:
            sub(e, "description", self.description)
        if self.from_checkpoint_id:
            sub(e, "from_checkpoint_id", self.from_checkpoint_id)
        sub(e, "phase", self.phase)
        if self.to_checkpoint_id and self.phase != "initializing":
            sub(e, "to_checkpoint_id", self.to_checkpoint_id)
        link(e, "host", "hosts", self.host.id)
        link(e, "vm", "vms", self.vm.id)
        return e


class Transfer:

    def __init__(self, disk, host, direction, backend, backup,
                 inactivity_timeout, timeout_policy, shallow):
        self.id = str(uuid.uuid4())
        self.disk = disk
        self.host = host
        self.direction = direction
        self.backend = backend                 # "nbd" or "file"
        self.backup = backup
        self.inactivity_timeout = inactivity_timeout
        self.timeout_policy = timeout_policy
        self.shallow = shallow
        # The layer exported: the disk's active one, or a disk snapshot.
        self.volume = disk.active
        self.snapshot_transfer = False
        self.phase = "initializing"
        # The host the client asked for (None: the engine chose one).
        self.requested_host = None
        # The ticket's id, kept when the engine adds the ticket again on
        # resume; ticket_id is set while the ticket is on the daemon.
        self.ticket_uuid = str(uuid.uuid4())
        self.ticket_id = None
        self.transfer_url = None
        self.proxy_url = None
        self.active = False
        self.transferred = 0
        self.nbd = None                        # qemu-nbd Popen
        self.extended = 0.0                    # when added or extended
        self.lock = threading.Lock()           # serializes ticket calls

    def xml(self):
        e = ET.Element("image_transfer",
                       href=f"{API}/imagetransfers/{self.id}", id=self.id)
        sub(e, "active", self.active)
        sub(e, "direction", self.direction)
        sub(e, "format", "raw" if self.backend == "nbd" else "cow")
        sub(e, "inactivity_timeout", self.inactivity_timeout)
        sub(e, "phase", self.phase)
        if self.transfer_url:
            sub(e, "proxy_url", self.proxy_url or self.transfer_url)
        sub(e, "shallow", self.shallow)
        sub(e, "timeout_policy", self.timeout_policy)
        if self.transfer_url:
            sub(e, "transfer_url", self.transfer_url)
        sub(e, "transferred", self.transferred)
        if self.host:
            link(e, "host", "hosts", self.host.id)
        sub(e, "image", id=self.disk.id)
        return e


# vdsm's side: the daemon's control socket and qemu-nbd.


class ImageioControl:
    """vdsm's imagetickets.py: one connection per call."""

    def __init__(self, path, timeout=90):
        self.path = path
        self.timeout = timeout

    def _request(self, method, ticket_id, body=None):
        conn = admin.UnixHTTPConnection(self.path, self.timeout)
        try:
            headers = {}
            if body is not None:
                body = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, f"/tickets/{ticket_id}", body=body,
                         headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, data
        finally:
            conn.close()

    def add(self, ticket):
        status, data = self._request("PUT", ticket["uuid"], ticket)
        if status != 200:
            raise RuntimeError(f"add ticket: {status} {data[:200]!r}")

    def get(self, ticket_id):
        status, data = self._request("GET", ticket_id)
        if status != 200:
            raise RuntimeError(f"get ticket: {status} {data[:200]!r}")
        return json.loads(data)

    def extend(self, ticket_id, timeout):
        status, data = self._request("PATCH", ticket_id, {"timeout": timeout})
        if status != 200:
            raise RuntimeError(f"extend ticket: {status} {data[:200]!r}")

    def remove(self, ticket_id):
        """Return True once removed, False while the daemon answers 409."""
        status, data = self._request("DELETE", ticket_id)
        if status in (200, 204, 404):
            return True
        if status == 409:
            return False
        raise RuntimeError(f"remove ticket: {status} {data[:200]!r}")


def run(*cmd):
    log.debug("Running %s", cmd)
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=COMMAND_TIMEOUT)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {p.stderr.decode()[:500]}")
    return p.stdout


# What a new logical volume holds: vdsm does not zero a raw LV (lvcreate
# zeroes its first 4 KiB), so it reads what the storage held before.
STALE_DATA = b"stale LV data!\n\0" * 256
STALE_INTERVAL = 256 * 1024


def write_stale_data(path, size):
    """Leave STALE_DATA every STALE_INTERVAL bytes of a new raw volume on
    block storage, past the first 4 KiB: a client that skips zero
    extents on it (instead of zeroing them) leaves this behind."""
    with open(path, "r+b") as f:
        for offset in range(STALE_INTERVAL, size, STALE_INTERVAL):
            f.seek(offset)
            f.write(STALE_DATA[:size - offset])


def supports_direct_io(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def nbd_greets(sock, timeout=5):
    """Whether an NBD server on the unix socket sock sends its greeting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(sock)
            greeting = b""
            while len(greeting) < 8:
                chunk = s.recv(8 - len(greeting))
                if not chunk:
                    return False
                greeting += chunk
        except OSError:
            return False
    return greeting == b"NBDMAGIC"


def qemu_nbd_command(sock, path, fmt, readonly, discard, bitmap=None,
                     shallow=False):
    """vdsm's storage/nbd.py: the qemu-nbd command of StartNbdServer."""
    cmd = ["qemu-nbd", "--socket", sock, "--persistent", "--shared=8",
           "--export-name="]
    if supports_direct_io(path):
        cmd += ["--cache=none", "--aio=native"]
    else:
        # tmpfs and others without O_DIRECT (ENGINE-SIM.md 3.5).
        cmd += ["--cache=writeback", "--aio=threads"]
    if fmt != "raw":
        cmd.append("--allocation-depth")
    if readonly:
        cmd.append("--read-only")
    else:
        if discard:
            cmd.append("--discard=unmap")
        cmd.append("--detect-zeroes=" + ("unmap" if discard else "on"))
    if bitmap:
        cmd.append("--bitmap=" + bitmap)
    # A block domain's volumes are files here: the driver stays "file"
    # where vdsm would use "host_device".
    image = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2" and shallow:
        image["backing"] = None
    cmd.append("json:" + json.dumps(image))
    return cmd


# The engine.


class Engine:
    """
    The simulated engine and its one host. delay: seconds each
    asynchronous step takes (the engine's take seconds to minutes).
    """

    def __init__(self, store_dir, control_socket, daemon_port, pki=None,
                 users=None, delay=0.2, host_address="127.0.0.1",
                 hw_id=None):
        self.store_dir = str(store_dir)
        self.run_dir = None
        self.imageio = ImageioControl(control_socket)
        self.daemon_port = daemon_port
        self.pki = pki
        self.users = users or {"admin@internal": "password"}
        self.delay = delay
        # vdsm's ticket timeout and the engine's extension margin (tests
        # raise the margin to see an extension without waiting).
        self.ticket_timeout = TICKET_TIMEOUT
        self.ticket_extend_margin = TICKET_EXTEND_MARGIN
        # host:port of the engine's imageio proxy, for proxy_url (None:
        # proxy_url is transfer_url, as with the proxy disabled).
        self.proxy_address = None
        self.tokens = set()
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.threads = []
        self.dc = DataCenter("dc1")
        self.host = Host("host1", host_address, hw_id or str(uuid.uuid4()))
        self.storage_domains = {}
        for name, kind in (("nfs", "nfs"), ("iscsi", "iscsi"),
                           ("fcp", "fcp")):
            sd = StorageDomain(name, kind)
            self.storage_domains[sd.id] = sd
        self.disks = {}
        self.transfers = {}
        self.vms = {}
        self.backups = {}
        self.events = []
        # (method, path, query dict) of every API and SSO request, in
        # order: tests check a client's request sequence.
        self.requests = []
        self.faults = set()
        self.holds = {}
        self.server = None

    # Life cycle.

    def start(self):
        os.makedirs(self.store_dir, exist_ok=True)
        # qemu-nbd sockets: a unix socket path has at most 107 bytes.
        self.run_dir = tempfile.mkdtemp(prefix="enginesim-", dir="/tmp")
        context = None
        if self.pki:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.pki["cert_file"],
                                    self.pki["key_file"])
        self.server = _Server(("127.0.0.1", 0), _Handler, self, context)
        # A short poll interval: stop() waits for one.
        t = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                             name="enginesim", daemon=True)
        t.start()
        self.threads.append(t)
        return self

    @property
    def url(self):
        scheme = "https" if self.pki else "http"
        return f"{scheme}://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.stopping.set()
        if self.server:
            self.server.shutdown()
            self.server.server_close()
        for t in self.threads:
            if t is not threading.current_thread():
                t.join(30)
        with self.lock:
            transfers = list(self.transfers.values())
        for t in transfers:
            try:
                self._teardown(t)
            except Exception as exc:
                log.warning("Cannot tear down transfer %s: %s", t.id, exc)
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def later(self, func, *args, delay=None):
        """Run func(*args) after delay seconds in a thread."""
        def run_later():
            if self.stopping.wait(self.delay if delay is None else delay):
                return
            try:
                func(*args)
            except Exception:
                log.exception("Background step %s failed", func.__name__)
        t = threading.Thread(target=run_later, name=func.__name__,
                             daemon=True)
        with self.lock:
            self.threads = [x for x in self.threads if x.is_alive()]
            self.threads.append(t)
        t.start()

    def event(self, code, description, *ids):
        with self.lock:
            self.events.insert(0, {"id": str(len(self.events) + 1),
                                   "code": code, "description": description,
                                   "ids": set(ids)})

    # Test helpers (what an admin does in the UI).

    def inject(self, name):
        """Make the step name (a key of FAULTS) fail from now on."""
        if name not in FAULTS:
            raise ValueError(f"Unknown fault {name!r}")
        with self.lock:
            self.faults.add(name)

    def _injected(self, name):
        with self.lock:
            return name in self.faults

    def hold(self, name):
        """Make the request name ("add_disk", "add_transfer") wait before
        it answers, or a failed transfer ("finish_failed") before it
        ends, until the returned Event is set."""
        if name not in ("add_disk", "add_transfer", "finish_failed"):
            raise ValueError(f"Cannot hold {name!r}")
        event = threading.Event()
        with self.lock:
            self.holds[name] = event
        return event

    def _hold(self, name):
        with self.lock:
            event = self.holds.get(name)
        if event is not None and not event.wait(COMMAND_TIMEOUT):
            log.warning("Held %s for %s seconds", name, COMMAND_TIMEOUT)

    def storage_domain(self, name):
        for sd in self.storage_domains.values():
            if sd.name == name:
                return sd
        raise not_found("storage domain", name)

    def add_disk_from_image(self, image, sd_name="nfs", fmt="cow",
                            sparse=True, backup="none"):
        """An existing disk, status ok, holding a copy of image's guest
        data (qemu-img convert)."""
        with self.lock:
            sd = self.storage_domain(sd_name)
            ident = str(uuid.uuid4())
            size = json.loads(run("qemu-img", "info", "--output", "json",
                                  str(image)))["virtual-size"]
            disk = Disk(ident, os.path.basename(str(image)), fmt, sparse,
                        backup, "data", size, None, sd, "",
                        os.path.join(self.store_dir, f"{ident}.img"))
        cmd = ["qemu-img", "convert", "-O", disk.qemu_format]
        opts = ["compat=1.1"] if fmt == "cow" else []
        if not sparse:
            opts.append("preallocation=falloc")
        if opts:
            cmd += ["-o", ",".join(opts)]
        run(*cmd, str(image), disk.path)
        with self.lock:
            disk.status = "ok"
            self.disks[ident] = disk
        return disk

    def add_vm(self, name, disk_ids, status="down"):
        with self.lock:
            disks = [self._disk(d) for d in disk_ids]
            vm = Vm(name, disks, status)
            self.vms[vm.id] = vm
            for disk in disks:
                disk.active.snapshot = vm.active_snapshot
            return vm

    def take_snapshot(self, vm_id, description="snapshot",
                      timeout=COMMAND_TIMEOUT):
        """A snapshot of all the VM's disks, as taken in the UI; returns
        it once it is ok (a new qcow2 layer on each disk)."""
        e = ET.Element("snapshot")
        sub(e, "description", description)
        snap = self.add_snapshot(vm_id, e)
        deadline = time.monotonic() + timeout
        while snap.status != "ok":
            if snap not in snap.vm.snapshots:
                raise RuntimeError(f"Snapshot {snap.id} failed")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Timeout creating snapshot {snap.id}")
            if self.stopping.wait(0.02):
                raise RuntimeError("engine stopping")
        return snap

    # SSO.

    def login(self, username, password):
        if self.users.get(username) != password or password is None:
            return None
        token = secrets.token_urlsafe(32)
        with self.lock:
            self.tokens.add(token)
        return token

    def logout(self, token):
        with self.lock:
            self.tokens.discard(token)

    def authorized(self, token):
        with self.lock:
            return token in self.tokens

    # Lookups.

    def _disk(self, disk_id):
        d = self.disks.get(disk_id)
        if d is None or d.removed:
            raise not_found("disk", disk_id)
        return d

    def _transfer(self, transfer_id):
        t = self.transfers.get(transfer_id)
        if t is None:
            raise not_found("image transfer", transfer_id)
        return t

    def _vm(self, vm_id):
        vm = self.vms.get(vm_id)
        if vm is None:
            raise not_found("vm", vm_id)
        return vm

    def _backup(self, vm, backup_id):
        b = self.backups.get(backup_id)
        if b is None or b.vm is not vm:
            raise not_found("backup", backup_id)
        return b

    def _checkpoint(self, vm, checkpoint_id):
        for c in vm.checkpoints:
            if c.id == checkpoint_id:
                return c
        raise not_found("checkpoint", checkpoint_id)

    # Disks (AddDisk, ImagesHandler.checkImageConfiguration).

    def add_disk(self, e):
        fmt = child_text(e, "format")
        size = child_int(e, "provisioned_size")
        if fmt is None or size is None:
            raise Fault(400, "Incomplete parameters",
                        "Disk [provisionedSize|format] required for add")
        if fmt not in ("raw", "cow"):
            raise Fault(400, "Invalid value", f"format {fmt}")
        sds = e.find("storage_domains")
        sd_elem = None if sds is None else sds.find("storage_domain")
        if sd_elem is None:
            raise Fault(400, "Incomplete parameters",
                        "Disk [storageDomain] required for add")
        with self.lock:
            if sd_elem.get("id"):
                sd = self.storage_domains.get(sd_elem.get("id"))
                if sd is None:
                    raise not_found("storage domain", sd_elem.get("id"))
            else:
                sd = self.storage_domain(child_text(sd_elem, "name"))
            sparse = child_bool(e, "sparse", True)
            content_type = child_text(e, "content_type", "data")
            backup = child_text(e, "backup", "none")
            if not sparse and fmt == "cow" and backup != "incremental":
                raise conflict("Cannot add Virtual Disk. Disk configuration "
                               "(COW Preallocated) is incompatible with the "
                               "storage domain type.")
            if fmt == "raw" and backup == "incremental":
                raise conflict("Cannot add Virtual Disk. Incremental backup "
                               "is not supported for RAW disks.")
            if sd.block and sparse and fmt == "raw":
                raise conflict("Cannot add Virtual Disk. Disk configuration "
                               "(RAW Sparse) is incompatible with the "
                               "storage domain type.")
            ident = e.get("id") or str(uuid.uuid4())
            if ident in self.disks and not self.disks[ident].removed:
                raise conflict("Cannot add Virtual Disk. The disk already "
                               "exists.")
            initial_size = child_int(e, "initial_size")
            if not (sd.block and sparse):
                # Forwarded only for sparse disks on block storage.
                initial_size = None
            disk = Disk(ident, child_text(e, "name") or child_text(e, "alias")
                        or f"disk-{ident[:8]}", fmt, sparse, backup,
                        content_type, size, initial_size, sd,
                        child_text(e, "description", ""),
                        os.path.join(self.store_dir, f"{ident}.img"))
            self.disks[ident] = disk
        self.later(self._create_volume, disk)
        return disk

    def _create_volume(self, disk):
        """vdsm createVolume (file SD layout, also for block SDs)."""
        cmd = ["qemu-img", "create", "-f", disk.qemu_format]
        opts = []
        if disk.format == "cow":
            opts.append("compat=1.1")
        if not disk.sparse:
            opts.append("preallocation=falloc")
        if opts:
            cmd += ["-o", ",".join(opts)]
        cmd += [disk.path, str(disk.provisioned_size)]
        try:
            if self._injected("create_volume"):
                raise RuntimeError("injected fault create_volume")
            run(*cmd)
            if self._injected("stale_volume"):
                run("qemu-io", "-f", disk.qemu_format, "-c",
                    f"write -P 0xde 0 {disk.provisioned_size}", disk.path)
            elif disk.sd.block and disk.format == "raw":
                write_stale_data(disk.path, disk.provisioned_size)
        except Exception as exc:
            log.error("Creating volume for disk %s failed: %s", disk.id, exc)
            with self.lock:
                disk.status = "illegal"
            return
        with self.lock:
            disk.status = "ok"

    def remove_disk(self, disk_id):
        with self.lock:
            disk = self._disk(disk_id)
            if disk.status == "locked":
                raise conflict("Cannot remove Virtual Disk. Disk is locked.")
            self._delete_disk(disk)

    def _delete_disk(self, disk):
        """RemoveDisk: all of the disk's layers go."""
        disk.removed = True
        for volume in disk.volumes:
            try:
                os.unlink(volume.path)
            except FileNotFoundError:
                pass
        for vm in self.vms.values():
            if disk in vm.disks:
                vm.disks.remove(disk)

    # Image transfers (TransferDiskImageCommand).

    def add_transfer(self, e):
        disk_id = child_id(e, "disk") or child_id(e, "image")
        snapshot_id = child_id(e, "snapshot")
        if disk_id is None and snapshot_id is None:
            raise Fault(400, "Incomplete parameters",
                        "ImageTransfer [disk.id|snapshot.id] required for add")
        direction = child_text(e, "direction", "upload")
        fmt = child_text(e, "format")
        with self.lock:
            volume = None
            if snapshot_id is not None:
                # addForSnapshot: the disk is the snapshot's.
                disk, volume = self._disk_snapshot(snapshot_id)
                if direction != "download":
                    raise conflict("Cannot transfer Virtual Disk. A disk "
                                   "snapshot can only be downloaded.")
            else:
                disk = self._disk(disk_id)
            if "add_transfer" in self.faults:
                raise conflict("Cannot transfer Virtual Disk. Injected "
                               "fault add_transfer.")
            backup = None
            backup_id = child_id(e, "backup")
            if backup_id:
                backup = self.backups.get(backup_id)
                if backup is None:
                    raise not_found("backup", backup_id)
                if backup.phase != "ready":
                    raise conflict("Cannot transfer Virtual Disk. The backup "
                                   "is not ready.")
                if disk not in backup.disks:
                    raise conflict("Cannot transfer Virtual Disk. The disk "
                                   "is not part of the backup.")
                if fmt == "cow":
                    raise conflict("Cannot transfer Virtual Disk. Backup "
                                   "transfer format must be raw.")
                if direction != "download":
                    raise conflict("Cannot transfer Virtual Disk. A backup "
                                   "can only be downloaded.")
            else:
                if disk.status == "illegal":
                    raise conflict("Cannot transfer Virtual Disk. Disk is "
                                   "illegal.")
                if disk.status == "locked":
                    raise conflict("Cannot transfer Virtual Disk: Disk "
                                   f"{disk.name} is locked. Please try again "
                                   "later.")
                # A snapshot's layer is read only: the VM may run.
                for vm in self.vms.values():
                    if disk in vm.disks and vm.status == "up" and \
                            volume is None:
                        raise conflict("Cannot transfer Virtual Disk. The VM "
                                       "is running.")
            host_id = child_id(e, "host")
            if host_id and host_id != self.host.id:
                raise not_found("host", host_id)
            backend = "nbd" if backup or fmt == "raw" else "file"
            if fmt is None:
                backend = "nbd" if disk.format == "raw" else "file"
            t = Transfer(
                disk, None, direction, backend, backup,
                child_int(e, "inactivity_timeout", INACTIVITY_TIMEOUT),
                child_text(e, "timeout_policy", "legacy"),
                child_bool(e, "shallow", False))
            if host_id:
                t.requested_host = self.host
            if volume is not None:
                t.volume = volume
                t.snapshot_transfer = True
            disk.status = "locked"
            self.transfers[t.id] = t
            if backup:
                backup.transfers.append(t)
        self.later(self._start_transfer, t)
        return t

    def _start_transfer(self, t):
        """Prepare the image, start qemu-nbd and add the ticket; also on
        resume when the ticket is gone (a system pause)."""
        with self.lock:
            if t.phase not in ("initializing", "resuming"):
                return
            if t.ticket_id:
                t.phase = "transferring"
                return
            t.host = self.host
        disk = t.disk
        readonly = t.direction == "download"
        file_sd = not disk.sd.block
        self._stop_nbd(t)
        try:
            if self._injected("start_transfer"):
                raise RuntimeError("injected fault start_transfer")
            if self._injected("start_layer_upload") and \
                    t.direction == "upload" and len(disk.volumes) > 1:
                raise RuntimeError("injected fault start_layer_upload")
            if t.backend == "nbd":
                sock = os.path.join(self.run_dir, f"{t.id}.sock")
                bitmap = None
                if t.backup and t.backup.from_checkpoint_id and \
                        disk.backup_mode == "incremental":
                    bitmap = t.backup.from_checkpoint_id
                cmd = qemu_nbd_command(
                    sock, t.volume.path, t.volume.qemu_format, readonly,
                    discard=disk.sparse and file_sd, bitmap=bitmap,
                    shallow=t.shallow)
                log.debug("Starting %s", cmd)
                t.nbd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE)
                self._wait_for_socket(t.nbd, sock)
                url = f"nbd:unix:{sock}"
                size = disk.provisioned_size
            else:
                url = f"file://{t.volume.path}"
                size = self._file_ticket_size(t)
            ticket = {
                "uuid": t.ticket_uuid,
                "timeout": self.ticket_timeout,
                "inactivity_timeout": t.inactivity_timeout,
                "size": size,
                "url": url,
                "ops": ["read"] if readonly else ["write"],
                "sparse": disk.sparse and file_sd,
                "dirty": bool(t.backup and t.backup.from_checkpoint_id
                              and disk.backup_mode == "incremental"),
                "transfer_id": t.id,
            }
            with t.lock:
                self.imageio.add(ticket)
                t.ticket_id = t.ticket_uuid
                t.extended = time.monotonic()
        except Exception as exc:
            log.error("Starting transfer %s failed: %s", t.id, exc)
            self._stop_nbd(t)
            with self.lock:
                t.ticket_id = None
                self._system_failure(t, f"failed to start: {exc}")
            return
        with self.lock:
            t.transfer_url = (f"https://{self.host.address}:"
                              f"{self.daemon_port}/images/{t.ticket_uuid}")
            if self.proxy_address:
                t.proxy_url = (f"https://{self.proxy_address}/images/"
                               f"{t.ticket_uuid}")
            if t.phase in ("initializing", "resuming"):
                t.phase = "transferring"

    def _file_ticket_size(self, t):
        disk = t.disk
        if t.volume.format == "raw":
            return disk.provisioned_size
        if t.direction == "download":
            return os.path.getsize(t.volume.path)
        if disk.sd.block:
            return disk.initial_size or disk.provisioned_size
        return -(-disk.provisioned_size * 11 // 10) + (1 << 20)

    def _wait_for_socket(self, proc, sock, timeout=COMMAND_TIMEOUT):
        """Wait until qemu-nbd greets on sock. The socket alone proves
        nothing: qemu-nbd creates it before opening the image, and leaves
        it behind when the image cannot be opened."""
        deadline = time.monotonic() + timeout
        while not nbd_greets(sock):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"qemu-nbd exited {proc.returncode}: "
                    f"{proc.stderr.read().decode()[:500]}")
            if time.monotonic() > deadline:
                raise RuntimeError("timeout waiting for qemu-nbd")
            if self.stopping.wait(0.02):
                raise RuntimeError("engine stopping")

    def get_transfer(self, transfer_id):
        with self.lock:
            t = self._transfer(transfer_id)
            monitor = t.phase == "transferring" and t.ticket_id
        if monitor:
            self._monitor(t)
        return t

    def _monitor(self, t):
        """TransferImageStatusCommand on a poll: ticket status, extension,
        inactivity policy."""
        try:
            with t.lock:
                if not t.ticket_id:
                    return
                status = self.imageio.get(t.ticket_id)
                if time.monotonic() - t.extended >= \
                        self.ticket_timeout - self.ticket_extend_margin:
                    self.imageio.extend(t.ticket_id, self.ticket_timeout)
                    t.extended = time.monotonic()
        except Exception as exc:
            log.error("Monitoring transfer %s failed: %s", t.id, exc)
            with self.lock:
                if t.phase == "transferring":
                    self._system_failure(t, f"failed: {exc}")
            return
        with self.lock:
            t.active = status.get("active", False)
            t.transferred = status.get("transferred", 0)
            idle = status.get("idle_time", 0)
            if (t.phase == "transferring" and t.inactivity_timeout
                    and not t.active and idle > t.inactivity_timeout):
                self._inactive(t)

    def _system_failure(self, t, why):
        """The engine stops a transfer: an upload pauses (the user may
        resume or cancel), a download is cancelled and ends."""
        self.event(1033, f"Transfer {t.id} {why}", t.id, t.disk.id)
        if t.direction == "upload":
            t.phase = "paused_system"
        else:
            t.phase = "cancelled_system"
            self.later(self._finish_failed, t)

    def _inactive(self, t):
        policy = t.timeout_policy
        if policy == "legacy":
            t.phase = ("paused_system" if t.direction == "upload"
                       else "cancelled_system")
        elif policy == "pause":
            t.phase = "paused_system"
        else:
            t.phase = "cancelled_system"
        self.event(1071, f"Transfer {t.id} was stopped by the system: "
                   "inactivity timeout", t.id, t.disk.id)
        if t.phase == "cancelled_system":
            self.later(self._finish_failed, t)

    def transfer_action(self, transfer_id, action):
        with self.lock:
            t = self._transfer(transfer_id)
            phase = t.phase
            if phase in FINISHED:
                raise conflict(f"Cannot {action} transfer. The transfer "
                               f"is in phase {phase}.")
            if action == "finalize":
                if phase not in ("transferring", "paused_user",
                                 "paused_system"):
                    raise conflict("Cannot finalize transfer. The transfer "
                                   f"is in phase {phase}.")
                t.phase = "finalizing_success"
                self.later(self._finalize, t)
            elif action == "cancel":
                t.phase = "cancelled_user"
                self.later(self._cancel, t)
            elif action == "pause":
                if t.direction != "upload" or phase != "transferring":
                    raise conflict("Cannot pause transfer.")
                t.phase = "paused_user"
            elif action == "resume":
                if phase not in ("paused_user", "paused_system"):
                    raise conflict("Cannot resume transfer.")
                t.phase = "resuming"
                self.later(self._start_transfer, t)
            elif action == "extend":
                pass
            else:
                raise not_found("action", action)

    def _teardown(self, t):
        """Remove the ticket and stop qemu-nbd; raise if the daemon would
        not release the ticket."""
        with t.lock:
            if t.ticket_id:
                try:
                    status = self.imageio.get(t.ticket_id)
                    t.transferred = status.get("transferred", t.transferred)
                except Exception as exc:
                    log.warning("Cannot get ticket: %s", exc)
                deadline = time.monotonic() + REMOVE_TICKET_TIMEOUT
                while not self.imageio.remove(t.ticket_id):
                    if time.monotonic() > deadline:
                        raise RuntimeError("ticket still in use")
                    if self.stopping.wait(0.1):
                        break
                t.ticket_id = None
                t.active = False
        self._stop_nbd(t)

    def _stop_nbd(self, t):
        if t.nbd is None:
            return
        if t.nbd.poll() is None:
            t.nbd.terminate()
            try:
                t.nbd.wait(COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                t.nbd.kill()
                t.nbd.wait()
        t.nbd.stderr.close()
        t.nbd = None

    def _finalize(self, t):
        disk = t.disk
        try:
            self._teardown(t)
            if t.direction == "upload":
                self._verify(disk, t.volume)
        except Exception as exc:
            log.error("Finalizing transfer %s failed: %s", t.id, exc)
            with self.lock:
                t.phase = "finalizing_failure"
                if t.direction == "upload":
                    disk.status = "illegal"
                self.event(1034, f"Transfer {t.id} failed: {exc}",
                           t.id, disk.id)
            self.later(self._finish_failed, t)
            return
        with self.lock:
            disk.status = "locked" if t.backup else "ok"
            t.phase = "finished_success"

    def _verify(self, disk, volume):
        """vdsm verify_untrusted_volume: the backing file must be the
        volume's parent (none for a base)."""
        out = run("qemu-img", "info", "--output", "json", "-U",
                  "-f", volume.qemu_format, volume.path)
        info = json.loads(out)
        if info.get("format") != volume.qemu_format:
            raise RuntimeError(f"volume format {info.get('format')} is not "
                               f"{volume.qemu_format}")
        if info["virtual-size"] > disk.provisioned_size:
            raise RuntimeError(f"virtual size {info['virtual-size']} is "
                               f"larger than {disk.provisioned_size}")
        expected = (os.path.basename(volume.parent.path)
                    if volume.parent else None)
        if info.get("backing-filename") != expected:
            raise RuntimeError(f"backing file "
                               f"{info.get('backing-filename')} is not "
                               f"{expected}")
        if volume.format == "cow" and \
                info.get("format-specific", {}).get("data", {}).get(
                    "compat") not in ("1.1", None):
            raise RuntimeError("unsupported qcow2 compat")

    def _finish_failed(self, t):
        """finalizing_failure or cancelled_system → finished_failure; an
        upload's disk is removed."""
        try:
            self._teardown(t)
        except Exception as exc:
            log.error("Cleaning up transfer %s failed: %s", t.id, exc)
        self._hold("finish_failed")
        with self.lock:
            self._fail(t)

    def _fail(self, t):
        disk = t.disk
        if t.direction == "upload":
            self._delete_disk(disk)
        else:
            disk.status = "locked" if t.backup else "ok"
        t.phase = "finished_failure"

    def _cancel(self, t):
        with self.lock:
            if t.phase != "cancelled_user":
                return
            t.phase = "finalizing_cleanup"
        try:
            self._teardown(t)
        except Exception as exc:
            log.error("Cancelling transfer %s failed: %s", t.id, exc)
        with self.lock:
            if t.direction == "upload":
                t.disk.status = "illegal"
            t.phase = "finished_cleanup"
        self.later(self._cleaned, t)

    def _cleaned(self, t):
        with self.lock:
            self._fail(t)

    # Disk snapshots: the disks' layers.

    def _disk_snapshot(self, volume_id, sd_id=None, disk_id=None):
        """(disk, volume) of the layer volume_id, on storage domain sd_id
        or of disk disk_id if given."""
        for disk in self.disks.values():
            if disk.removed or disk_id not in (None, disk.id) or \
                    sd_id not in (None, disk.sd.id):
                continue
            volume = disk.volume(volume_id)
            if volume is not None:
                return disk, volume
        raise not_found("disk snapshot", volume_id)

    def disk_snapshots(self, sd_id=None, disk_id=None, include_active=False):
        """(disk, volume) of every layer on sd_id or of disk_id; the
        active layers only with include_active, as the engine does."""
        if sd_id is not None and sd_id not in self.storage_domains:
            raise not_found("storage domain", sd_id)
        if disk_id is not None:
            self._disk(disk_id)
        found = []
        for disk in self.disks.values():
            if disk.removed or disk_id not in (None, disk.id) or \
                    sd_id not in (None, disk.sd.id):
                continue
            for volume in disk.volumes:
                if include_active or volume is not disk.active:
                    found.append((disk, volume))
        return found

    # VM disks and snapshots (AttachDiskToVm, CreateSnapshotForVm, cold).

    def attach_disk(self, vm_id, e):
        disk_id = child_id(e, "disk")
        if disk_id is None:
            raise Fault(400, "Incomplete parameters",
                        "DiskAttachment [disk.id] required for add")
        with self.lock:
            vm = self._vm(vm_id)
            disk = self._disk(disk_id)
            if any(disk in v.disks for v in self.vms.values()):
                raise conflict("Cannot attach Virtual Disk. The disk is "
                               "already attached to a VM.")
            if disk.status == "locked":
                raise conflict(f"Cannot attach Virtual Disk: Disk "
                               f"{disk.name} is locked.")
            if len(disk.volumes) > 1:
                raise conflict("Cannot attach Virtual Disk. The disk has "
                               "snapshots.")
            vm.disks.append(disk)
            disk.active.snapshot = vm.active_snapshot
            return vm, disk

    def add_snapshot(self, vm_id, e):
        """
        A snapshot of the VM's disks (all of them, or those its
        disk_attachments name; an image_id there is the new layer's id,
        as in a restore from backup): each disk gets a new empty qcow2
        layer on top of its active one, made in the background while the
        snapshot and the disks are locked.
        """
        with self.lock:
            vm = self._vm(vm_id)
            if vm.status not in ("up", "down"):
                raise conflict("Cannot create Snapshot. The VM status is "
                               f"{vm.status}.")
            if any(s.status == "locked" for s in vm.snapshots):
                raise conflict("Cannot create Snapshot. Snapshot is "
                               "currently being created for VM "
                               f"{vm.name}.")
            attachments = e.find("disk_attachments")
            if attachments is None:
                chosen = [(d, None) for d in vm.disks]
            else:
                chosen = []
                for a in attachments.findall("disk_attachment"):
                    d = a.find("disk")
                    disk = self._disk(d.get("id") if d is not None else None)
                    if disk not in vm.disks:
                        raise conflict(f"Cannot create Snapshot. Disk "
                                       f"{disk.id} is not attached to the "
                                       f"VM.")
                    chosen.append((disk, child_text(d, "image_id")))
            for disk, image_id in chosen:
                if disk.status != "ok":
                    raise conflict(f"Cannot create Snapshot. Disk "
                                   f"{disk.name} is {disk.status}.")
                if image_id and any(x.volume(image_id)
                                    for x in self.disks.values()):
                    raise conflict(f"Cannot create Snapshot. Image "
                                   f"{image_id} already exists.")
            ident = e.get("id") or str(uuid.uuid4())
            snap = VmSnapshot(ident, vm, child_text(e, "description", ""))
            vm.snapshots.append(snap)
            for disk, _ in chosen:
                disk.status = "locked"
        self.later(self._snapshot_created, snap, chosen)
        return snap

    def _snapshot_created(self, snap, chosen):
        """vdsm createVolume per disk: qcow2 on top of the active layer,
        named by it relative (vdsm's backing links)."""
        made = []
        try:
            if self._injected("create_snapshot"):
                raise RuntimeError("injected fault create_snapshot")
            for disk, image_id in chosen:
                parent = disk.active
                ident = image_id or str(uuid.uuid4())
                path = os.path.join(self.store_dir, f"{ident}.img")
                run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    "compat=1.1", "-b", os.path.basename(parent.path),
                    "-F", parent.qemu_format, path,
                    str(disk.provisioned_size))
                made.append((disk, Volume(ident, path, "cow", parent)))
        except Exception as exc:
            log.error("Creating snapshot %s failed: %s", snap.id, exc)
            for _, volume in made:
                os.unlink(volume.path)
            with self.lock:
                snap.vm.snapshots.remove(snap)
                for disk, _ in chosen:
                    if not disk.removed:
                        disk.status = "ok"
                self.event(1, f"Failed to complete snapshot "
                           f"'{snap.description}' creation for VM "
                           f"{snap.vm.name}: {exc}", snap.id, snap.vm.id)
            return
        with self.lock:
            for disk, volume in made:
                disk.active.snapshot = snap
                volume.snapshot = snap.vm.active_snapshot
                disk.volumes.append(volume)
                disk.status = "ok"
            snap.status = "ok"
            self.event(68, f"Snapshot '{snap.description}' creation for VM "
                       f"'{snap.vm.name}' has been completed.", snap.id,
                       snap.vm.id)

    def _vm_snapshot(self, vm, snapshot_id):
        for s in vm.snapshots:
            if s.id == snapshot_id:
                return s
        raise not_found("snapshot", snapshot_id)

    def snapshot_disks(self, vm_id, snapshot_id):
        """The disks as the snapshot holds them: (disk, its layer)."""
        with self.lock:
            vm = self._vm(vm_id)
            snap = self._vm_snapshot(vm, snapshot_id)
            return [(d, v) for d in self.disks.values() if not d.removed
                    for v in d.volumes if v.snapshot is snap]

    # Backups (StartVmBackupCommand, cold backup).

    def add_backup(self, vm_id, e):
        with self.lock:
            vm = self._vm(vm_id)
            if vm.status not in ("up", "down"):
                raise conflict("Cannot backup VM. The VM status is "
                               f"{vm.status}.")
            for b in self.backups.values():
                if b.vm is vm and b.phase not in ("succeeded", "failed"):
                    raise conflict("Cannot backup VM. The VM is during a "
                                   "backup operation.")
            elems = e.findall("disks/disk")
            if not elems:
                raise Fault(400, "Incomplete parameters",
                            "Backup [disks] required for add")
            disks = []
            for d in elems:
                disk = self._disk(d.get("id"))
                if disk not in vm.disks:
                    raise conflict(f"Cannot backup VM. Disk {disk.id} is "
                                   "not attached to the VM.")
                if disk.status != "ok":
                    raise conflict(f"Cannot backup VM. Disk {disk.name} is "
                                   "locked.")
                disks.append(disk)
            from_id = child_text(e, "from_checkpoint_id")
            checkpoint = None
            if from_id:
                checkpoint = self._checkpoint(vm, from_id)
                if checkpoint.state != "created":
                    raise conflict("Cannot backup VM. The checkpoint is "
                                   "invalid.")
            ident = e.get("id") or str(uuid.uuid4())
            if ident in self.backups:
                raise conflict("Cannot backup VM. The backup already exists.")
            b = Backup(ident, vm, disks, from_id,
                       child_text(e, "description"), self.host)
            for disk in disks:
                disk.status = "locked"
                disk.backup_mode = (
                    "incremental" if checkpoint and disk.id in
                    checkpoint.disk_ids else "full")
            if any(d.format == "cow" for d in disks):
                b.to_checkpoint_id = str(uuid.uuid4())
            self.backups[b.id] = b
        self.later(self._backup_ready, b)
        return b

    def _backup_ready(self, b):
        """vdsm AddVolumeBitmap per qcow2 disk, then the checkpoint."""
        cow = [d for d in b.disks if d.format == "cow"]
        try:
            for disk in cow:
                run("qemu-img", "bitmap", "--add", "-f", "qcow2",
                    disk.path, b.to_checkpoint_id)
        except Exception as exc:
            log.error("Starting backup %s failed: %s", b.id, exc)
            with self.lock:
                b.phase = "failed"
                self._unlock_backup(b)
                self.event(10792, f"Backup {b.id} for VM {b.vm.name} "
                           f"failed: {exc}", b.id, b.vm.id)
            return
        with self.lock:
            if cow:
                vm = b.vm
                parent = vm.checkpoints[-1].id if vm.checkpoints else None
                vm.checkpoints.append(Checkpoint(
                    b.to_checkpoint_id, vm, parent, [d.id for d in cow]))
            b.phase = "ready"
            self.event(10790, f"Backup {b.id} for VM {b.vm.name} is ready",
                       b.id, b.vm.id)

    def _unlock_backup(self, b):
        for disk in b.disks:
            if not disk.removed:
                disk.status = "ok"
                disk.backup_mode = None

    def finalize_backup(self, vm_id, backup_id):
        with self.lock:
            b = self._backup(self._vm(vm_id), backup_id)
            if b.phase in ("finalizing", "succeeded", "failed"):
                raise conflict(f"Cannot stop VM backup. The backup is "
                               f"{b.phase}.")
            if any(t.phase not in FINISHED for t in b.transfers):
                raise conflict("Cannot stop VM backup. The backup has "
                               "image transfers in progress.")
            b.phase = "finalizing"
        self.later(self._backup_finalized, b)

    def _backup_finalized(self, b):
        with self.lock:
            self._unlock_backup(b)
            b.phase = "succeeded"
            self.event(10791, f"Backup {b.id} for VM {b.vm.name} "
                       "finished", b.id, b.vm.id)

    def remove_checkpoint(self, vm_id, checkpoint_id):
        with self.lock:
            vm = self._vm(vm_id)
            c = self._checkpoint(vm, checkpoint_id)
            if vm.checkpoints[0] is not c:
                raise conflict("Cannot remove checkpoint. Only the oldest "
                               "checkpoint can be removed.")
            for b in self.backups.values():
                if b.vm is vm and b.phase not in ("succeeded", "failed"):
                    raise conflict("Cannot remove checkpoint. The VM is "
                                   "during a backup operation.")
            disks = [self.disks[d] for d in c.disk_ids
                     if not self.disks[d].removed]
        for disk in disks:
            run("qemu-img", "bitmap", "--remove", "-f", "qcow2", disk.path,
                c.id)
        with self.lock:
            vm.checkpoints.remove(c)
            if vm.checkpoints:
                vm.checkpoints[0].parent_id = None


# HTTP.


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, engine, context):
        self.engine = engine
        self.context = context
        super().__init__(address, handler)

    def finish_request(self, request, client_address):
        # The TLS handshake runs in the connection's thread, with a
        # deadline, so a slow client cannot stall the accept loop.
        if self.context:
            request.settimeout(30)
            try:
                request = self.context.wrap_socket(request, server_side=True)
            except (OSError, ssl.SSLError) as exc:
                log.debug("TLS handshake failed: %s", exc)
                return
        super().finish_request(request, client_address)


# (method, regex relative to API, handler name)
ROUTES = [
    ("GET", r"", "get_root"),
    ("GET", r"/disks", "list_disks"),
    ("POST", r"/disks", "post_disk"),
    ("GET", r"/disks/([^/]+)", "get_disk"),
    ("DELETE", r"/disks/([^/]+)", "delete_disk"),
    ("GET", r"/disks/([^/]+)/disksnapshots", "list_disk_snapshots"),
    ("GET", r"/disks/([^/]+)/disksnapshots/([^/]+)", "get_disk_snapshot"),
    ("GET", r"/storagedomains", "list_sds"),
    ("GET", r"/storagedomains/([^/]+)", "get_sd"),
    ("GET", r"/storagedomains/([^/]+)/disksnapshots", "list_sd_snapshots"),
    ("GET", r"/storagedomains/([^/]+)/disksnapshots/([^/]+)",
     "get_sd_snapshot"),
    ("GET", r"/datacenters", "list_dcs"),
    ("GET", r"/datacenters/([^/]+)", "get_dc"),
    ("GET", r"/hosts", "list_hosts"),
    ("GET", r"/hosts/([^/]+)", "get_host"),
    ("GET", r"/imagetransfers", "list_transfers"),
    ("POST", r"/imagetransfers", "post_transfer"),
    ("GET", r"/imagetransfers/([^/]+)", "get_transfer"),
    ("POST", r"/imagetransfers/([^/]+)/(finalize|cancel|pause|resume|extend)",
     "transfer_action"),
    ("GET", r"/vms", "list_vms"),
    ("GET", r"/vms/([^/]+)", "get_vm"),
    ("GET", r"/vms/([^/]+)/diskattachments", "list_attachments"),
    ("POST", r"/vms/([^/]+)/diskattachments", "post_attachment"),
    ("GET", r"/vms/([^/]+)/snapshots", "list_snapshots"),
    ("POST", r"/vms/([^/]+)/snapshots", "post_snapshot"),
    ("GET", r"/vms/([^/]+)/snapshots/([^/]+)", "get_snapshot"),
    ("GET", r"/vms/([^/]+)/snapshots/([^/]+)/disks", "list_snapshot_disks"),
    ("GET", r"/vms/([^/]+)/backups", "list_backups"),
    ("POST", r"/vms/([^/]+)/backups", "post_backup"),
    ("GET", r"/vms/([^/]+)/backups/([^/]+)", "get_backup"),
    ("GET", r"/vms/([^/]+)/backups/([^/]+)/disks", "list_backup_disks"),
    ("POST", r"/vms/([^/]+)/backups/([^/]+)/finalize", "finalize_backup"),
    ("GET", r"/vms/([^/]+)/checkpoints", "list_checkpoints"),
    ("GET", r"/vms/([^/]+)/checkpoints/([^/]+)", "get_checkpoint"),
    ("DELETE", r"/vms/([^/]+)/checkpoints/([^/]+)", "delete_checkpoint"),
    ("GET", r"/events", "list_events"),
]
ROUTES = [(m, re.compile(re.escape(API) + r + "/?$"), h) for m, r, h in ROUTES]


_SEARCH_TERM = re.compile(r'([\w.]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s"]+)')


def search_terms(query):
    """'a=b and c="d e"' → {"a": "b", "c": "d e"} (the engine's search
    syntax, only what the SDK examples and ovirt-img send: terms joined by
    "and", values plain or double-quoted with backslash escapes)."""
    terms = {}
    for key, value in _SEARCH_TERM.findall(query):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        terms[key.lower()] = value
    return terms


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "enginesim"
    timeout = 60

    def log_message(self, fmt, *args):
        log.debug("%s " + fmt, self.address_string(), *args)

    @property
    def engine(self):
        return self.server.engine

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method):
        url = urllib.parse.urlsplit(self.path)
        self.query = dict(urllib.parse.parse_qsl(url.query))
        with self.engine.lock:
            self.engine.requests.append((method, url.path, self.query))
        try:
            body = self._body()
        except (OSError, ValueError):
            self.close_connection = True
            return
        try:
            if url.path == TOKEN_PATH and method == "POST":
                return self._sso_token(body)
            if url.path == LOGOUT_PATH and method == "POST":
                return self._sso_logout(body)
            if not url.path.startswith(API):
                raise Fault(404, "Not Found", url.path)
            auth = self.headers.get("Authorization", "")
            token = auth[len("Bearer "):] if auth.startswith("Bearer ") \
                else None
            if not token or not self.engine.authorized(token):
                return self._send(401, b"", "text/plain")
            known = False
            for m, regex, name in ROUTES:
                match = regex.match(url.path)
                if match:
                    known = True
                    if m == method:
                        elem = None
                        if body:
                            try:
                                elem = ET.fromstring(body)
                            except ET.ParseError as exc:
                                raise Fault(400, "Bad Request",
                                            f"Invalid XML: {exc}")
                        return getattr(self, name)(elem, *match.groups())
            if known:
                raise Fault(405, "Method Not Allowed", method)
            raise Fault(404, "Not Found", url.path)
        except Fault as f:
            self._fault(f)
        except Exception as exc:
            log.exception("Internal error")
            self._fault(Fault(500, "Internal Server Error", str(exc)))

    # Responses.

    def _send(self, status, data, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _xml(self, elem, status=200, headers=()):
        data = b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' \
            + ET.tostring(elem)
        self._send(status, data, "application/xml", headers)

    def _json(self, obj, status=200):
        self._send(status, json.dumps(obj).encode(), "application/json")

    def _fault(self, f):
        e = ET.Element("fault")
        sub(e, "detail", f.detail)
        sub(e, "reason", f.reason)
        self._xml(e, f.status)

    def _action(self, status="complete"):
        e = ET.Element("action")
        sub(e, "status", status)
        self._xml(e)

    def _collection(self, tag, elems):
        e = ET.Element(tag)
        e.extend(elems)
        self._xml(e)

    # SSO.

    def _sso_token(self, body):
        form = dict(urllib.parse.parse_qsl(body.decode()))
        if form.get("grant_type") != "password":
            return self._json({"error": "unsupported_grant_type",
                               "error_description": "Unsupported grant"},
                              400)
        token = self.engine.login(form.get("username"), form.get("password"))
        if token is None:
            return self._json({"error": "access_denied",
                               "error_description": "Cannot authenticate "
                               "user: invalid username or password"}, 400)
        exp = int((time.time() + 36000) * 1000)
        self._json({"access_token": token, "scope": form.get("scope", ""),
                    "exp": str(exp), "token_type": "bearer"})

    def _sso_logout(self, body):
        form = dict(urllib.parse.parse_qsl(body.decode()))
        self.engine.logout(form.get("token"))
        self._json({})

    # API.

    def get_root(self, _):
        e = ET.Element("api")
        for rel in ("disks", "storagedomains", "datacenters", "hosts",
                    "imagetransfers", "vms", "events"):
            sub(e, "link", rel=rel, href=f"{API}/{rel}")
        info = sub(e, "product_info")
        sub(info, "name", "oVirt Engine")
        sub(info, "vendor", "ovirt.org")
        v = sub(info, "version")
        sub(v, "build", 0)
        sub(v, "full_version", "4.5.5-sim")
        sub(v, "major", 4)
        sub(v, "minor", 5)
        sub(v, "revision", 0)
        sub(e, "special_objects")
        sub(e, "summary")
        sub(e, "time", now_iso())
        self._xml(e)

    def list_disks(self, _):
        with self.engine.lock:
            elems = [d.xml() for d in self.engine.disks.values()
                     if not d.removed]
        self._collection("disks", elems)

    def post_disk(self, e):
        if e is None or e.tag != "disk":
            raise Fault(400, "Bad Request", "Expected <disk>")
        disk = self.engine.add_disk(e)
        self.engine._hold("add_disk")
        out = disk.xml()
        sub(out, "creation_status", "pending")
        self._xml(out, 202)

    def get_disk(self, _, disk_id):
        with self.engine.lock:
            out = self.engine._disk(disk_id).xml()
        self._xml(out)

    def delete_disk(self, _, disk_id):
        self.engine.remove_disk(disk_id)
        self._action()

    def list_sds(self, _):
        eng = self.engine
        terms = search_terms(self.query.get("search", ""))
        self._collection("storage_domains", [
            sd.xml(eng.dc) for sd in eng.storage_domains.values()
            if terms.get("name") in (None, sd.name)])

    def _flag(self, name):
        return self.query.get(name, "false").lower() == "true"

    def list_sd_snapshots(self, _, sd_id):
        """GET /storagedomains/{sd}/disksnapshots[?include_active=true]:
        every layer of the domain's disks; the active layers only if
        asked (include_template: no templates here)."""
        with self.engine.lock:
            elems = [d.snapshot_xml(v, f"storagedomains/{sd_id}")
                     for d, v in self.engine.disk_snapshots(
                         sd_id=sd_id,
                         include_active=self._flag("include_active"))]
        self._collection("disk_snapshots", elems)

    def get_sd_snapshot(self, _, sd_id, snapshot_id):
        with self.engine.lock:
            if sd_id not in self.engine.storage_domains:
                raise not_found("storage domain", sd_id)
            disk, volume = self.engine._disk_snapshot(snapshot_id,
                                                      sd_id=sd_id)
            out = disk.snapshot_xml(volume, f"storagedomains/{sd_id}")
        self._xml(out)

    def list_disk_snapshots(self, _, disk_id):
        """GET /disks/{d}/disksnapshots[?include_active=true]: the disk's
        layers (API 4.5, list_disk_snapshots.py)."""
        with self.engine.lock:
            elems = [d.snapshot_xml(v, f"disks/{disk_id}")
                     for d, v in self.engine.disk_snapshots(
                         disk_id=disk_id,
                         include_active=self._flag("include_active"))]
        self._collection("disk_snapshots", elems)

    def get_disk_snapshot(self, _, disk_id, snapshot_id):
        with self.engine.lock:
            self.engine._disk(disk_id)
            disk, volume = self.engine._disk_snapshot(snapshot_id,
                                                      disk_id=disk_id)
            out = disk.snapshot_xml(volume, f"disks/{disk_id}")
        self._xml(out)

    def get_sd(self, _, sd_id):
        sd = self.engine.storage_domains.get(sd_id)
        if sd is None:
            raise not_found("storage domain", sd_id)
        self._xml(sd.xml(self.engine.dc))

    def list_dcs(self, _):
        eng = self.engine
        terms = search_terms(self.query.get("search", ""))
        dcs = [eng.dc]
        name = terms.get("storage.name")
        if name is not None and not any(
                sd.name == name for sd in eng.storage_domains.values()):
            dcs = []
        if terms.get("name") not in (None, eng.dc.name):
            dcs = []
        self._collection("data_centers", [dc.xml() for dc in dcs])

    def get_dc(self, _, dc_id):
        if dc_id != self.engine.dc.id:
            raise not_found("data center", dc_id)
        self._xml(self.engine.dc.xml())

    def list_hosts(self, _):
        eng = self.engine
        terms = search_terms(self.query.get("search", ""))
        host = eng.host
        match = (terms.get("hw_id") in (None, host.hw_id)
                 and terms.get("datacenter") in (None, eng.dc.name)
                 and terms.get("status", "up").lower() == "up"
                 and terms.get("name") in (None, host.name))
        self._collection("hosts", [host.xml()] if match else [])

    def get_host(self, _, host_id):
        if host_id != self.engine.host.id:
            raise not_found("host", host_id)
        self._xml(self.engine.host.xml())

    def list_transfers(self, _):
        with self.engine.lock:
            elems = [t.xml() for t in self.engine.transfers.values()]
        self._collection("image_transfers", elems)

    def post_transfer(self, e):
        if e is None or e.tag != "image_transfer":
            raise Fault(400, "Bad Request", "Expected <image_transfer>")
        t = self.engine.add_transfer(e)
        self.engine._hold("add_transfer")
        with self.engine.lock:
            out = t.xml()
        self._xml(out, 201, [("Location", f"{API}/imagetransfers/{t.id}")])

    def get_transfer(self, _, transfer_id):
        t = self.engine.get_transfer(transfer_id)
        with self.engine.lock:
            out = t.xml()
        self._xml(out)

    def transfer_action(self, _, transfer_id, action):
        self.engine.transfer_action(transfer_id, action)
        self._action()

    def get_vm(self, _, vm_id):
        with self.engine.lock:
            out = self.engine._vm(vm_id).xml()
        self._xml(out)

    def list_vms(self, _):
        """
        GET /vms[?search=name=NAME][&follow=disk_attachments]: with
        follow, each VM carries its attachments inline (the engine's
        "follow" parameter, API 4.2+), so a client finds a disk's VM in
        one request.
        """
        terms = search_terms(self.query.get("search", ""))
        follow = {f.strip() for f in self.query.get("follow", "").split(",")}
        with self.engine.lock:
            elems = []
            for vm in self.engine.vms.values():
                if "name" in terms and vm.name != terms["name"]:
                    continue
                e = vm.xml()
                if "disk_attachments" in follow:
                    attachments = sub(e, "disk_attachments")
                    for a in self._attachments(vm):
                        attachments.append(a)
                elems.append(e)
        self._collection("vms", elems)

    def list_attachments(self, _, vm_id):
        with self.engine.lock:
            elems = self._attachments(self.engine._vm(vm_id))
        self._collection("disk_attachments", elems)

    def post_attachment(self, e, vm_id):
        if e is None or e.tag != "disk_attachment":
            raise Fault(400, "Bad Request", "Expected <disk_attachment>")
        vm, disk = self.engine.attach_disk(vm_id, e)
        with self.engine.lock:
            out = self._attachments(vm)[vm.disks.index(disk)]
        self._xml(out, 201, [("Location", out.get("href"))])

    def list_snapshots(self, _, vm_id):
        with self.engine.lock:
            elems = [s.xml() for s in self.engine._vm(vm_id).snapshots]
        self._collection("snapshots", elems)

    def post_snapshot(self, e, vm_id):
        if e is None or e.tag != "snapshot":
            raise Fault(400, "Bad Request", "Expected <snapshot>")
        snap = self.engine.add_snapshot(vm_id, e)
        with self.engine.lock:
            out = snap.xml()
        self._xml(out, 201, [("Location", out.get("href"))])

    def get_snapshot(self, _, vm_id, snapshot_id):
        eng = self.engine
        with eng.lock:
            out = eng._vm_snapshot(eng._vm(vm_id), snapshot_id).xml()
        self._xml(out)

    def list_snapshot_disks(self, _, vm_id, snapshot_id):
        """The snapshot's disks, each with the layer the snapshot holds
        as its image_id."""
        elems = []
        for disk, volume in self.engine.snapshot_disks(vm_id, snapshot_id):
            with self.engine.lock:
                e = disk.xml()
            e.find("image_id").text = volume.id
            elems.append(e)
        self._collection("disks", elems)

    def _attachments(self, vm):
        elems = []
        for i, disk in enumerate(vm.disks):
            a = ET.Element("disk_attachment",
                           href=f"{API}/vms/{vm.id}/diskattachments/"
                                f"{disk.id}", id=disk.id)
            sub(a, "active", True)
            sub(a, "bootable", i == 0)
            sub(a, "interface", "virtio_scsi")
            link(a, "disk", "disks", disk.id)
            link(a, "vm", "vms", vm.id)
            elems.append(a)
        return elems

    def list_backups(self, _, vm_id):
        with self.engine.lock:
            vm = self.engine._vm(vm_id)
            elems = [b.xml() for b in self.engine.backups.values()
                     if b.vm is vm]
        self._collection("backups", elems)

    def post_backup(self, e, vm_id):
        if e is None or e.tag != "backup":
            raise Fault(400, "Bad Request", "Expected <backup>")
        b = self.engine.add_backup(vm_id, e)
        with self.engine.lock:
            out = b.xml()
        self._xml(out, 201,
                  [("Location", f"{API}/vms/{vm_id}/backups/{b.id}")])

    def get_backup(self, _, vm_id, backup_id):
        eng = self.engine
        with eng.lock:
            out = eng._backup(eng._vm(vm_id), backup_id).xml()
        self._xml(out)

    def list_backup_disks(self, _, vm_id, backup_id):
        with self.engine.lock:
            eng = self.engine
            b = eng._backup(eng._vm(vm_id), backup_id)
            elems = [d.xml() for d in b.disks if not d.removed]
        self._collection("disks", elems)

    def finalize_backup(self, _, vm_id, backup_id):
        self.engine.finalize_backup(vm_id, backup_id)
        self._action()

    def list_checkpoints(self, _, vm_id):
        with self.engine.lock:
            vm = self.engine._vm(vm_id)
            elems = [c.xml() for c in vm.checkpoints]
        self._collection("checkpoints", elems)

    def get_checkpoint(self, _, vm_id, checkpoint_id):
        eng = self.engine
        with eng.lock:
            out = eng._checkpoint(eng._vm(vm_id), checkpoint_id).xml()
        self._xml(out)

    def delete_checkpoint(self, _, vm_id, checkpoint_id):
        self.engine.remove_checkpoint(vm_id, checkpoint_id)
        # The SDK accepts only 200 for a DELETE.
        self._action()

    def list_events(self, _):
        search = self.query.get("search", "").strip()
        with self.engine.lock:
            events = [ev for ev in self.engine.events
                      if not search or search in ev["ids"]
                      or search in ev["description"]]
        elems = []
        for ev in events:
            e = ET.Element("event", href=f"{API}/events/{ev['id']}",
                           id=ev["id"])
            sub(e, "code", ev["code"])
            sub(e, "description", ev["description"])
            sub(e, "severity", "normal")
            elems.append(e)
        self._collection("events", elems)


def main():
    p = argparse.ArgumentParser(description="oVirt engine simulator")
    p.add_argument("--store", required=True, help="volume directory")
    p.add_argument("--control-socket", required=True,
                   help="the imageio daemon's control socket")
    p.add_argument("--daemon-port", type=int, default=54322)
    p.add_argument("--pki", help="directory made by dev/mkpki (HTTPS)")
    p.add_argument("--delay", type=float, default=0.5)
    p.add_argument("--debug", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO)
    pki = None
    if args.pki:
        pki = {"cert_file": os.path.join(args.pki, "cert.pem"),
               "key_file": os.path.join(args.pki, "key.pem")}
    engine = Engine(args.store, args.control_socket, args.daemon_port, pki,
                    delay=args.delay).start()
    print(f"engine_url = {engine.url}", flush=True)
    for sd in engine.storage_domains.values():
        print(f"storage domain {sd.name} ({sd.storage_type}) {sd.id}")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    engine.stop()


if __name__ == "__main__":
    main()
