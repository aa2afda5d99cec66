"""/checksum and /checksum/algorithms (API.md 1.6) on our daemon."""

import json

import pytest

import testutil
from ovirt_imageio import checksum
from ovirt_imageio.nbd import client as nbd_client
from ovirt_imageio.nbd import url as nbd_url

MiB = 1024**2


@pytest.fixture
def export(qemu_nbd, make_image):
    path = make_image(size=6 * MiB, commands=[
        "write -P 0x41 0 1M", "write -z 2M 1M", "write -P 0x42 5M 4k"])
    return qemu_nbd(path, read_only=True)


@pytest.fixture
def ticket(daemon, export):
    t = {"uuid": "sum-ticket", "size": 6 * MiB, "ops": ["read"],
         "timeout": 300, "url": f"nbd:unix:{export.socket}",
         "transfer_id": "tr-sum"}
    assert daemon.api.put(t)[0].status == 200
    return t


def get(daemon, path):
    c = testutil.UnixHTTPConnection(daemon.cfg.local.socket)
    c.request("GET", path)
    resp = c.getresponse()
    data = resp.read()
    c.close()
    return resp, data


def test_algorithms(daemon):
    for path in ["/images/x/checksum/algorithms",
                 "/images//checksum/algorithms"]:
        resp, data = get(daemon, path)
        assert resp.status == 200
        assert json.loads(data) == {"algorithms": checksum.ALGORITHMS}
    assert "blake2b" in checksum.ALGORITHMS


def test_checksum(daemon, ticket, export):
    resp, data = get(daemon, "/images/sum-ticket/checksum")
    assert resp.status == 200
    result = json.loads(data)
    with nbd_client.open(nbd_url.Address(socket=export.socket)) as image:
        assert result == checksum.compute(image)
    assert result["algorithm"] == "blake2b"
    assert result["block_size"] == 4 * MiB
    info = daemon.api.get("sum-ticket")
    assert info["transferred"] == 6 * MiB
    assert info["active"] is False


@pytest.mark.parametrize("query,message", [
    ("algorithm=nope", "Unsupported value 'nope' for 'algorithm', "
                       "expecting one of"),
    ("block_size=abc", "Invalid block size: 'abc'"),
    ("block_size=4096", "Block size out of allowed range: 1048576-16777216"),
    ("block_size=1050000", "Block size is not aligned to 4096"),
], ids=["algorithm", "not-int", "range", "aligned"])
def test_invalid(daemon, query, message):
    # Validation comes before authorization.
    resp, data = get(daemon, f"/images/nope/checksum?{query}")
    assert resp.status == 400
    assert data.decode().startswith(message)


def test_unauthorized_keeps_connection(daemon):
    resp, data = get(daemon, "/images/nope/checksum")
    assert resp.status == 403
    assert resp.getheader("connection") is None


def test_empty_id(daemon):
    resp, data = get(daemon, "/images//checksum")
    assert resp.status == 400
    assert data == b"Ticket id is required\n"
