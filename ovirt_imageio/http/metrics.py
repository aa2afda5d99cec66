"""
GET /metrics: the daemon's metrics in the Prometheus text format, on the
control service and on the optional [metrics] service, never on the
remote or local service, where a ticket holder could read other
transfers.

State: process. The Recorder counts requests and their durations by
operation when each request ends (routers call it); everything else is
read when scraped: the tickets' counters (tickets.py), the servers'
connection counters (server.Stats), the buffer pool, the qemu-nbd
processes. Nothing is counted per piece, and nothing here takes a lock
the data path waits for, except once per request.

Tickets are labelled by transfer_id, never by ticket id (a credential);
a ticket's series go away when it is removed, and the process's totals
keep counting. Labels have bounded values: operations, statuses,
services, transfer ids of the tickets present; no client addresses.
"""

import threading

from .. import prometheus
from .. import version
from ..nbd import qemu_nbd
from . import server

PREFIX = "ovirt_imageio_"

# A data request's operation by method; PATCH and HEAD say theirs
# (req.op).
IMAGE_OPS = {"GET": "read", "PUT": "write", "OPTIONS": "options",
             "HEAD": "head", "PATCH": "patch"}

# Routes whose name is the operation, whatever the method.
NAMED_ROUTES = frozenset(["extents", "checksum", "algorithms", "info",
                          "metrics", "transfers", "profile"])


def operation(req):
    """A request's operation label: read, write, zero, flush, options,
    extents, checksum..., tickets_get, tickets_put..."""
    op = getattr(req, "op", None)
    if op is not None:
        return op
    if req.route is None:
        return "none"
    if req.route == "images":
        return IMAGE_OPS.get(req.method, "other")
    if req.route in NAMED_ROUTES:
        return req.route
    method = req.method if req.method in server.METHODS else "other"
    return f"{req.route}_{method.lower()}"


class Recorder:
    """Requests of every service by operation and status, and their
    durations by operation."""

    def __init__(self):
        self.durations = prometheus.Histogram()
        self._lock = threading.Lock()
        self._requests = {}

    def request(self, req, resp, seconds, cut=False):
        """Called by the routers when a request ends."""
        op = operation(req)
        status = "cut" if cut else str(resp.status)
        self.durations.observe((op,), seconds)
        key = (op, status)
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1
        ticket = getattr(req, "ticket", None)
        if ticket is not None:
            ticket.count_request(op, status,
                                 failed=cut or resp.status >= 500)

    def requests(self):
        with self._lock:
            return dict(self._requests)


class Sources:
    """What /metrics reads: set by the daemon as it starts services."""

    def __init__(self, store, recorder, pool=None):
        self.store = store
        self.recorder = recorder
        self.pool = pool
        self.services = []


class Handler:
    """/metrics"""

    name = "metrics"

    def __init__(self, sources):
        self.sources = sources

    def get(self, req, resp):
        body = prometheus.render(collect(self.sources)).encode("utf-8")
        resp.headers["content-type"] = prometheus.CONTENT_TYPE
        resp.send_body(body)


def collect(src):
    """The metric families, read now."""
    families = []

    def family(name, kind, help):
        f = prometheus.Family(PREFIX + name, kind, help)
        families.append(f)
        return f

    family("info", "gauge", "The daemon's version.").add(
        1, {"version": version.string})
    _tickets(src.store, family)
    _totals(src.store.totals.snapshot(), family)
    _requests(src.recorder, family)
    _services(src.services, family)
    family("threads", "gauge", "Threads of the daemon.").add(
        threading.active_count())
    family("qemu_nbd_processes", "gauge",
           "qemu-nbd processes started and owned by the daemon.").add(
        len(qemu_nbd.running()))
    if src.pool is not None:
        _buffers(src.pool, family)
    return families


def _tickets(store, family):
    # Tickets sharing a transfer id are one series: labels must be unique.
    by_transfer = {}
    tickets = store.tickets()
    for ticket in tickets:
        stats = ticket.stats()
        stats["size"] = ticket.size
        stats["transferred"] = ticket.transferred()
        old = by_transfer.get(ticket.transfer_id)
        by_transfer[ticket.transfer_id] = (
            stats if old is None else _merge(old, stats))

    family("tickets", "gauge", "Tickets installed.").add(len(tickets))
    size = family("ticket_size_bytes", "gauge", "The ticket's image size.")
    transferred = family(
        "ticket_transferred_bytes", "gauge",
        "Bytes of the image transferred (the union of the ranges done), "
        "as the ticket status's 'transferred'.")
    nbytes = family(
        "ticket_bytes_total", "counter",
        "Bytes read, written or zeroed for the ticket (op=read, write, "
        "zero), including operations in flight.")
    zeros = family(
        "ticket_read_zero_bytes_total", "counter",
        "Bytes of reads that were zero extents, sent without reading.")
    requests = family(
        "ticket_requests_total", "counter",
        "Requests of the ticket by operation and status (cut: failed "
        "after its response started).")
    errors = family(
        "ticket_errors_total", "counter",
        "Requests of the ticket that failed on the server's side: a 5xx, "
        "or cut after their response started.")
    connections = family("ticket_connections", "gauge",
                         "Connections using the ticket.")
    active = family("ticket_active_operations", "gauge",
                    "Operations of the ticket in flight.")
    for transfer_id in sorted(by_transfer):
        stats = by_transfer[transfer_id]
        labels = {"transfer_id": transfer_id}
        size.add(stats["size"], labels)
        transferred.add(stats["transferred"], labels)
        for kind, n in stats["bytes"].items():
            nbytes.add(n, {**labels, "op": kind})
        zeros.add(stats["read_zero_bytes"], labels)
        for (op, status), n in sorted(stats["requests"].items()):
            requests.add(n, {**labels, "op": op, "status": status})
        errors.add(stats["errors"], labels)
        connections.add(stats["connections"], labels)
        active.add(stats["active_operations"], labels)


def _merge(a, b):
    merged = {}
    for key, value in a.items():
        if isinstance(value, dict):
            merged[key] = dict(value)
            for k, v in b[key].items():
                merged[key][k] = merged[key].get(k, 0) + v
        elif key == "size":
            merged[key] = max(value, b[key])
        else:
            merged[key] = value + b[key]
    return merged


def _totals(totals, family):
    nbytes = family(
        "bytes_total", "counter",
        "Bytes read, written or zeroed for every ticket, removed ones "
        "too (op=read, write, zero); counted when an operation ends.")
    for kind, n in totals["bytes"].items():
        nbytes.add(n, {"op": kind})
    family("read_zero_bytes_total", "counter",
           "Bytes of reads that were zero extents, for every ticket.").add(
        totals["read_zero_bytes"])
    family("errors_total", "counter",
           "Requests of every ticket, removed ones too, that failed on "
           "the server's side.").add(totals["errors"])


def _requests(recorder, family):
    requests = family(
        "requests_total", "counter",
        "Requests of every service by operation and status.")
    for (op, status), n in sorted(recorder.requests().items()):
        requests.add(n, {"op": op, "status": status})
    durations = family(
        "request_duration_seconds", "histogram",
        "Time from a request's headers to the end of its response, by "
        "operation.")
    for (op,), snapshot in sorted(recorder.durations.snapshot().items()):
        durations.add_histogram(snapshot, {"op": op})


def _services(services, family):
    connections = family("connections", "gauge",
                         "Open client connections by service.")
    opened = family("connections_opened_total", "counter",
                    "Client connections accepted by service.")
    shakes = family("tls_handshakes_total", "counter",
                    "TLS handshakes completed by service.")
    failures = family("tls_handshake_failures_total", "counter",
                      "TLS handshakes that failed or timed out by service.")
    for service in services:
        stats = service.server.stats
        labels = {"service": service.name}
        connections.add(stats.connections, labels)
        opened.add(stats.opened.value, labels)
        if service.server.tls_context is not None:
            shakes.add(stats.handshakes.value, labels)
            failures.add(stats.handshake_failures.value, labels)


def _buffers(pool, family):
    stats = pool.stats()
    family("buffer_memory_bytes", "gauge",
           "Memory of data buffers held by requests (TLS and proxy "
           "transfers).").add(stats["in_use"] * pool.size)
    family("buffer_memory_limit_bytes", "gauge",
           "The cap on data buffers ([daemon] buffer_memory, in whole "
           "buffers).").add(pool.limit * pool.size)
    family("buffer_memory_allocated_bytes", "gauge",
           "Memory of data buffers allocated, in use or idle (idle ones "
           "past the few kept give their pages back).").add(
        stats["allocated"] * pool.size)
    family("buffer_waiters", "gauge",
           "Requests waiting for a free buffer.").add(stats["waiting"])
