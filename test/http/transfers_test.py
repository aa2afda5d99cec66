"""GET /transfers/ (http/transfers.py): the control service's listing."""

import json
import os

import pytest

import imagesutil
import testutil
from imagesutil import Client, add_ticket

MiB = imagesutil.MiB


@pytest.fixture
def daemon(make_daemon):
    return make_daemon(**imagesutil.DAEMON_CONF)


def listing(daemon):
    resp, data = daemon.api.request("GET", "/transfers/")
    assert resp.status == 200, data
    return data.decode(), json.loads(data)


def test_empty(daemon):
    _, d = listing(daemon)
    assert d["transfers"] == []
    assert isinstance(d["time"], float)


def test_tickets_listing_stays_upstreams(daemon):
    resp, _ = daemon.api.request("GET", "/tickets/")
    assert resp.status == 400


def test_unknown_path(daemon):
    resp, _ = daemon.api.request("GET", "/transfers/x")
    assert resp.status == 404


@pytest.mark.parametrize("transport", ["unix", "https"])
def test_connections(daemon, nbdkit, transport):
    srv = nbdkit("memory", "size=4M")
    add_ticket(daemon, f"nbd:unix:{srv.socket}", ops=["write"])
    add_ticket(daemon, f"nbd:unix:{srv.socket}", uuid="b-secret",
               transfer_id="tr-0")
    c = Client(daemon, transport)
    resp, _ = c.request("PUT", "/images/tid-secret", body=b"z" * MiB)
    assert resp.status == 200
    resp, _ = c.request("GET", "/images/tid-secret",
                        headers={"range": "bytes=0-4095"})
    assert resp.status == 206
    testutil.wait_for_ticket(daemon.api, "tid-secret", active=False)

    text, d = listing(daemon)
    assert "secret" not in text
    assert "url" not in text
    assert [t["transfer_id"] for t in d["transfers"]] == ["tr-0", "tr-1"]
    idle, t = d["transfers"]
    assert idle["clients"] == []
    assert t["written_bytes"] == MiB
    assert t["read_bytes"] == 4096
    assert t["connections"] == 1
    assert t["size"] == 4 * MiB
    [conn] = t["clients"]
    assert conn["bytes"] == MiB + 4096
    assert conn["active"] is False
    assert conn["seconds"] >= 0
    if transport == "https":
        host, port = c.conn.sock.getsockname()[:2]
        assert conn["client"] == f"{host}:{port}"
        assert conn["service"] == "remote"
    else:
        # The client's process, this one.
        assert conn["client"] == f"pid={os.getpid()}"
        assert conn["service"] == "local"
    c.close()
    testutil.wait_for(
        lambda: listing(daemon)[1]["transfers"][1]["clients"] == [],
        message="connection gone")
