"""
What alternating data and metadata requests on one HTTP connection costs:
rounds of a ranged GET followed by GET /extents (or /checksum) on one
keep-alive connection to an in-process daemon, against a qemu-nbd export
of a raw image. Prints the median time per round and how many NBD
connections the daemon opened (nbd.client.connect calls, which both NBD
clients use), next to rounds of GET only.

    .venv/bin/python bench/alternation.py [--rounds 200] [--transport unix]

Issue 13: a link held either the splicing stream or the libnbd client
and reconnected whenever the kind of request changed, two NBD handshakes
per round.
"""

import argparse
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import http.client

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))

import testutil  # noqa: E402
from ovirt_imageio import config, server  # noqa: E402
from ovirt_imageio.nbd import client as nbd_client  # noqa: E402
from ovirt_imageio.nbd import qemu_nbd  # noqa: E402

MiB = 1 << 20

connects = 0
_connect = nbd_client.connect


def counting_connect(*args, **kw):
    global connects
    connects += 1
    return _connect(*args, **kw)


nbd_client.connect = counting_connect


def connection(daemon, transport):
    if transport == "unix":
        return testutil.UnixHTTPConnection(daemon.cfg.local.socket)
    ctx = ssl.create_default_context(cafile=daemon.cfg.tls.ca_file)
    port = daemon.remote.server.address()[1]
    return http.client.HTTPSConnection("localhost", port, context=ctx)


def request(conn, path, headers=None):
    conn.request("GET", path, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status not in (200, 206):
        raise RuntimeError(f"{path}: {resp.status} {data[:200]}")
    return data


def run(daemon, transport, rounds, second):
    conn = connection(daemon, transport)
    times = []
    request(conn, "/images/bench-secret", {"range": "bytes=0-4095"})
    before = connects
    for i in range(rounds):
        start = time.monotonic()
        offset = (i % 64) * MiB
        request(conn, "/images/bench-secret",
                {"range": f"bytes={offset}-{offset + MiB - 1}"})
        if second is not None:
            request(conn, second)
        times.append(time.monotonic() - start)
    conn.close()
    return statistics.median(times), connects - before


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--transport", choices=["unix", "https"], default="unix")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="alternation-", dir="/tmp")
    try:
        pki = testutil.make_pki(os.path.join(work, "pki"))
        image = os.path.join(work, "disk.raw")
        subprocess.run(["qemu-img", "create", "-f", "raw", image, "64M"],
                       check=True, stdout=subprocess.DEVNULL, timeout=30)
        subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 32M",
                        image], check=True, stdout=subprocess.DEVNULL,
                       timeout=60)
        srv = qemu_nbd.start(image, os.path.join(work, "nbd.sock"),
                             fmt="raw", read_only=True, shared=1)
        os.makedirs(os.path.join(work, "conf"))
        testutil.write_conf(os.path.join(work, "conf"), testutil.daemon_conf(
            os.path.join(work, "conf"), pki))
        cfg = config.load(os.path.join(work, "conf"),
                          vendor_dir=os.path.join(work, "vendor"))
        daemon = server.Daemon(cfg)
        daemon.start()
        try:
            api = testutil.Control(daemon.control.server.address())
            ticket = {"uuid": "bench-secret", "size": 64 * MiB,
                      "ops": ["read"], "timeout": 3600,
                      "url": f"nbd:unix:{srv.address.socket}"}
            resp, data = api.put(ticket)
            assert resp.status == 200, data
            for name, second in [
                    ("GET only", None),
                    ("GET + /extents", "/images/bench-secret/extents"),
                    ("GET + /checksum",
                     "/images/bench-secret/checksum?block_size=4194304")]:
                median, opened = run(daemon, args.transport, args.rounds,
                                     second)
                print(json.dumps({"rounds": name, "transport": args.transport,
                                  "median_ms": round(median * 1000, 3),
                                  "nbd_connects": opened}))
        finally:
            daemon.stop()
            srv.stop()
            shutil.rmtree(cfg.daemon.run_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
