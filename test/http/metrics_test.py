"""
GET /metrics (http/metrics.py): real transfers through the daemon's
services on nbdkit exports, the text parsed by prometheus-client's
parser; counters checked against the bytes the test moved.
"""

import http.client
import socket

import pytest

import imagesutil
import testutil
from imagesutil import Client, add_ticket

MiB = imagesutil.MiB
TICKET_ID = "tid-secret"


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def names(samples):
    return {name for name, _ in samples}


def wait_metrics(daemon, name, expected, **labels):
    """
    Poll /metrics until the sample has the expected value; return the
    samples. A request is counted when it ends, a moment after the client
    got its response.
    """
    key = (name, tuple(sorted(labels.items())))

    def counted():
        text, samples = testutil.get_metrics(daemon)
        if samples.get(key) == expected:
            return text, samples

    return testutil.wait_for(counted, message=f"{name} {labels} == "
                                              f"{expected}")


def series_of(samples, transfer_id):
    return [k for k in samples if ("transfer_id", transfer_id) in k[1]]


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(**imagesutil.DAEMON_CONF)


@pytest.fixture(params=["unix", "https"])
def client(request, daemon):
    c = Client(daemon, request.param)
    yield c
    c.close()


def test_counts_data_zero_and_holes(daemon, client, nbdkit):
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"])
    data = b"x" * MiB
    resp, body = client.request("PUT", f"/images/{TICKET_ID}", body=data)
    assert resp.status == 200, body
    resp, body = client.request("PATCH", f"/images/{TICKET_ID}", body={
        "op": "zero", "offset": MiB, "size": 2 * MiB})
    assert resp.status == 200, body
    resp, body = client.request("GET", f"/images/{TICKET_ID}")
    assert resp.status == 200
    assert body[:MiB] == data and body[MiB:] == bytes(3 * MiB)

    info = testutil.wait_for_ticket(daemon.api, TICKET_ID, active=False)
    t = {"transfer_id": "tr-1"}
    text, samples = wait_metrics(
        daemon, "ovirt_imageio_ticket_requests_total", 1, op="read",
        status="200", **t)
    assert value(samples, "ovirt_imageio_ticket_bytes_total",
                 op="write", **t) == MiB
    assert value(samples, "ovirt_imageio_ticket_bytes_total",
                 op="zero", **t) == 2 * MiB
    assert value(samples, "ovirt_imageio_ticket_bytes_total",
                 op="read", **t) == 4 * MiB
    # The memory plugin reports unwritten and zeroed ranges as zero
    # extents: the GET never read them.
    assert value(samples, "ovirt_imageio_ticket_read_zero_bytes_total",
                 **t) == 3 * MiB
    assert value(samples, "ovirt_imageio_ticket_requests_total",
                 op="write", status="200", **t) == 1
    assert value(samples, "ovirt_imageio_ticket_requests_total",
                 op="zero", status="200", **t) == 1
    assert value(samples, "ovirt_imageio_ticket_requests_total",
                 op="read", status="200", **t) == 1
    assert value(samples, "ovirt_imageio_ticket_errors_total", **t) == 0
    assert value(samples, "ovirt_imageio_ticket_connections", **t) == 1
    assert value(samples, "ovirt_imageio_ticket_size_bytes", **t) == 4 * MiB
    assert value(samples, "ovirt_imageio_ticket_transferred_bytes",
                 **t) == info["transferred"] == 4 * MiB
    # Process totals: operations that ended.
    assert value(samples, "ovirt_imageio_bytes_total", op="read") == 4 * MiB
    assert value(samples, "ovirt_imageio_bytes_total", op="write") == MiB
    assert value(samples, "ovirt_imageio_bytes_total", op="zero") == 2 * MiB
    assert value(samples, "ovirt_imageio_read_zero_bytes_total") == 3 * MiB
    # Durations by operation, no ticket label.
    for op in ("read", "write", "zero"):
        assert value(samples, "ovirt_imageio_request_duration_seconds_count",
                     op=op) == 1
        assert value(samples, "ovirt_imageio_request_duration_seconds_bucket",
                     op=op, le="+Inf") == 1
    assert TICKET_ID not in text


def test_ticket_status_has_byte_counters(daemon, client, nbdkit):
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"])
    resp, _ = client.request("PUT", f"/images/{TICKET_ID}",
                             body=b"y" * 4096)
    assert resp.status == 200
    resp, _ = client.request("PATCH", f"/images/{TICKET_ID}", body={
        "op": "zero", "offset": MiB, "size": MiB})
    assert resp.status == 200
    info = testutil.wait_for_ticket(daemon.api, TICKET_ID, active=False,
                                    zeroed_bytes=MiB)
    assert info["written_bytes"] == 4096
    assert info["zeroed_bytes"] == MiB
    assert info["read_bytes"] == 0
    assert info["failed_requests"] == 0
    # Upstream's fields are all there, unchanged.
    assert info["transferred"] == 4096 + MiB
    assert info["uuid"] == TICKET_ID


def test_nbd_errors_counted(daemon, client, nbdkit):
    srv = nbdkit("memory", "size=4M", "error-pread=EIO",
                 "error-pread-rate=100%", filters=["error"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    for _ in range(2):
        resp, _ = client.request("GET", f"/images/{TICKET_ID}",
                                 headers={"range": "bytes=0-4095"})
        assert resp.status == 500
        if client.conn.sock is None:
            # The failed NBD connection closed the HTTP one.
            client.conn.close()
    t = {"transfer_id": "tr-1"}
    _, samples = wait_metrics(
        daemon, "ovirt_imageio_ticket_errors_total", 2, **t)
    assert value(samples, "ovirt_imageio_ticket_requests_total",
                 op="read", status="500", **t) == 2
    assert value(samples, "ovirt_imageio_ticket_bytes_total",
                 op="read", **t) == 0
    assert value(samples, "ovirt_imageio_errors_total") == 2
    assert value(samples, "ovirt_imageio_requests_total",
                 op="read", status="500") == 2


def test_series_removed_with_ticket(daemon, client, nbdkit):
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    resp, _ = client.request("GET", f"/images/{TICKET_ID}",
                             headers={"range": "bytes=0-65535"})
    assert resp.status == 206
    testutil.wait_for_ticket(daemon.api, TICKET_ID, active=False)
    _, samples = testutil.get_metrics(daemon)
    assert series_of(samples, "tr-1")
    assert value(samples, "ovirt_imageio_tickets") == 1

    resp, _ = daemon.api.delete(TICKET_ID)
    assert resp.status == 204
    text, samples = testutil.get_metrics(daemon)
    assert series_of(samples, "tr-1") == []
    assert "tr-1" not in text
    assert value(samples, "ovirt_imageio_tickets") == 0
    # The process keeps counting what the ticket moved.
    assert value(samples, "ovirt_imageio_bytes_total", op="read") == 65536


def test_in_flight_bytes_counted(make_daemon, nbdkit):
    daemon = make_daemon(**imagesutil.DAEMON_CONF)
    size = 64 * MiB
    srv = nbdkit("pattern", f"size={size}")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=size,
               inactivity_timeout=3600)
    s = imagesutil.raw_client(daemon, "https", rcvbuf=4096)
    try:
        s.sendall(b"GET /images/tid-secret HTTP/1.1\r\n"
                  b"host: localhost\r\n\r\n")
        imagesutil.wait_until_stalled(daemon)
        info = daemon.api.get(TICKET_ID)
        _, samples = testutil.get_metrics(daemon)
        read = value(samples, "ovirt_imageio_ticket_bytes_total",
                     op="read", transfer_id="tr-1")
        # The stalled GET's pieces so far, not yet ended.
        assert 0 < read < size
        assert read == info["read_bytes"]
        assert value(samples, "ovirt_imageio_ticket_active_operations",
                     transfer_id="tr-1") == 1
        assert value(samples, "ovirt_imageio_buffer_memory_bytes") == (
            daemon.buffers.size)
        # Not counted in the totals until it ends.
        assert value(samples, "ovirt_imageio_bytes_total", op="read") == 0
    finally:
        s.close()


def test_buffer_cap(daemon):
    _, samples = testutil.get_metrics(daemon)
    pool = daemon.buffers
    assert value(samples, "ovirt_imageio_buffer_memory_limit_bytes") == (
        pool.limit * pool.size)
    assert value(samples, "ovirt_imageio_buffer_memory_bytes") == 0
    assert value(samples, "ovirt_imageio_buffer_waiters") == 0


def test_qemu_nbd_processes(daemon, make_image):
    path = make_image(size=MiB)
    before = value(testutil.get_metrics(daemon)[1],
                   "ovirt_imageio_qemu_nbd_processes")
    add_ticket(daemon, f"file://{path}", size=MiB)
    _, samples = testutil.get_metrics(daemon)
    assert value(samples, "ovirt_imageio_qemu_nbd_processes") == before + 1
    resp, _ = daemon.api.delete(TICKET_ID)
    assert resp.status == 204
    _, samples = testutil.get_metrics(daemon)
    assert value(samples, "ovirt_imageio_qemu_nbd_processes") == before


def test_tls_handshakes_and_connections(daemon):
    port = daemon.remote.server.address()[1]
    c = Client(daemon, "https")
    resp, _ = c.request("OPTIONS", "/images/*")
    assert resp.status == 200
    # A client that does not speak TLS.
    with socket.create_connection(("localhost", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n")
        s.settimeout(10)
        while s.recv(4096):
            pass

    def counted():
        _, samples = testutil.get_metrics(daemon)
        if value(samples, "ovirt_imageio_tls_handshake_failures_total",
                 service="remote") == 1:
            return samples

    samples = testutil.wait_for(counted, message="handshake failure")
    assert value(samples, "ovirt_imageio_tls_handshakes_total",
                 service="remote") == 1
    assert value(samples, "ovirt_imageio_connections",
                 service="remote") == 1
    assert value(samples, "ovirt_imageio_connections_opened_total",
                 service="remote") == 1
    # The unix services have no TLS.
    assert ("ovirt_imageio_tls_handshakes_total",
            (("service", "local"),)) not in samples
    c.close()
    testutil.wait_for(
        lambda: value(testutil.get_metrics(daemon)[1],
                      "ovirt_imageio_connections", service="remote") == 0,
        message="connection closed")
    assert value(samples, "ovirt_imageio_threads") >= 1


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_not_on_data_services(daemon, client, path):
    resp, _ = client.request("GET", path)
    assert resp.status == 404


def test_control_paths(daemon):
    resp, _ = daemon.api.request("GET", "/metrics/more")
    assert resp.status == 404
    resp, _ = daemon.api.request("GET", "/metrics/")
    assert resp.status == 200


def test_own_port(make_daemon, nbdkit):
    daemon = make_daemon(metrics={"enable": "true", "host": "127.0.0.1",
                                  "port": "0"}, **imagesutil.DAEMON_CONF)
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}")
    port = daemon.metrics_service.server.address()[1]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        assert resp.status == 200
        samples = testutil.parse_metrics(text)
        assert value(samples, "ovirt_imageio_tickets") == 1
        assert value(samples, "ovirt_imageio_ticket_size_bytes",
                     transfer_id="tr-1") == 4 * MiB
        assert value(samples, "ovirt_imageio_connections",
                     service="metrics") == 1
        assert TICKET_ID not in text
        # Only /metrics there: no tickets, no images.
        for path in ("/tickets/tid-secret", "/images/tid-secret",
                     "/transfers/"):
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
    finally:
        conn.close()


def test_transfer_id_escaped(daemon, nbdkit):
    srv = nbdkit("memory", "size=1M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", size=MiB,
               transfer_id='a "quoted" \\ id')
    _, samples = testutil.get_metrics(daemon)
    assert value(samples, "ovirt_imageio_ticket_size_bytes",
                 transfer_id='a "quoted" \\ id') == MiB


def test_tickets_sharing_a_transfer_id(daemon, nbdkit):
    srv = nbdkit("memory", "size=1M")
    for uuid in ("one-secret", "two-secret"):
        add_ticket(daemon, f"nbd:unix:{srv.socket}", size=MiB, uuid=uuid,
                   transfer_id="same")
    text, samples = testutil.get_metrics(daemon)
    # One series (the parser refuses duplicates).
    assert value(samples, "ovirt_imageio_ticket_size_bytes",
                 transfer_id="same") == MiB
    assert value(samples, "ovirt_imageio_tickets") == 2
    assert "secret" not in text
