#!/usr/bin/env python3
"""
Downloading a preallocated disk that holds little data: our client
against upstream 2.5.1's, both from our daemon.

    .venv/bin/python bench/preallocated.py [--runs 5] [--formats raw,qcow2]
        [--transports unix,https] [--image preallocated|data]
        [--sides ours,upstream] [--dir /var/tmp] [--json FILE]

The image (--image preallocated, the default): a 1 GiB raw file created
with preallocation=full holding 57 MiB of data: 56 pieces of 1 MiB, one
every 18 MiB, and 16 pieces of 64 KiB. Its extents say data everywhere,
so every byte is sent, and the client must find the zeros itself (the
issue: our client wrote all 1 GiB; upstream's qemu-nbd, started with
--detect-zeroes=unmap, wrote 64 MiB). --image data: 1 GiB of random
data instead, for the cost of looking for zeros where there are none.

Sides (each run a new client process, timed from outside, start-up
included):

    ours          bench/client.py download --format FMT
    ours-splice   the same with transfer.SPLICE_DOWNLOADS = True (splice
                  the bytes into the image on the unix socket, no zero
                  detection): the alternative measured
    upstream      upstream's client.download(fmt=FMT), from the anchor
                  venv (test/upstream.py)

Both talk to the same daemon, ours: one with its local unix socket (the
clients switch to it) and one without (HTTPS). The download goes to
--dir (default /var/tmp, a disk: writing zeros costs writeback there; on
tmpfs it costs memory only). Rounds alternate the sides, the order
rotated every round; the first round is a warm-up that checks every
result with qemu-img compare. Reported per format and transport: median
seconds and allocated MiB of the download per side, and the ratios to
upstream of each round, median [min-max].
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import proxy  # noqa: E402  (bench/proxy.py: servers, exports, PKI)
import upstream  # noqa: E402  (test/upstream.py, on proxy's path)

MiB = 1024**2
GiB = 1024**3
SIZE = GiB
OUR_CLIENT = os.path.join(BENCH, "client.py")

UPSTREAM_DOWNLOAD = (
    "import sys\n"
    "from ovirt_imageio import client\n"
    "client.download(sys.argv[1], sys.argv[2], sys.argv[3], "
    "fmt=sys.argv[4])\n")

OURS_SPLICE = (
    "import sys\n"
    f"sys.path.insert(0, {proxy.ROOT!r})\n"
    "from ovirt_imageio import client\n"
    "from ovirt_imageio.client import transfer\n"
    "transfer.SPLICE_DOWNLOADS = True\n"
    "client.download(sys.argv[1], sys.argv[2], sys.argv[3], "
    "fmt=sys.argv[4])\n")


def make_image(path, kind):
    if kind == "data":
        with open(path, "wb") as f:
            for _ in range(SIZE // MiB):
                f.write(os.urandom(MiB))
        return
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", "-o",
                    "preallocation=full", path, str(SIZE)], check=True)
    with open(path, "r+b") as f:
        for i in range(56):
            f.seek(i * 18 * MiB)
            f.write(os.urandom(MiB))
        for j in range(16):
            f.seek(1000 * MiB + j * MiB + 4096)
            f.write(os.urandom(64 * 1024))
        os.fsync(f.fileno())


def command(side, url, out, ca, fmt):
    python = os.path.join(proxy.ROOT, ".venv", "bin", "python")
    if side == "ours":
        return [python, OUR_CLIENT, "download", url, out, ca,
                "--format", fmt]
    if side == "ours-splice":
        return [python, "-c", OURS_SPLICE, url, out, ca, fmt]
    return [upstream.python_path(), "-P", "-c", UPSTREAM_DOWNLOAD, url, out,
            ca, fmt]


def compare(src, out, fmt):
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt,
                    src, out], check=True)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--formats", default="raw,qcow2")
    p.add_argument("--transports", default="unix,https")
    p.add_argument("--image", choices=["preallocated", "data"],
                   default="preallocated")
    p.add_argument("--sides", default="ours,upstream")
    p.add_argument("--dir", default="/var/tmp")
    p.add_argument("--json")
    args = p.parse_args()

    upstream.anchor_venv()
    work = tempfile.mkdtemp(prefix="imageio-prealloc-bench-", dir=args.dir)
    servers, exports = [], []
    try:
        results = bench(args, work, servers, exports)
    finally:
        for s in servers:
            s.stop()
        for e in exports:
            e.stop()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def bench(args, work, servers, exports):
    src = os.path.join(work, "src.raw")
    proxy.log(f"writing {src} ({args.image})")
    make_image(src, args.image)
    pki = proxy.mkpki(os.path.join(work, "pki"))
    daemons = {}
    for transport in args.transports.split(","):
        d = proxy.Server(f"daemon-{transport}", proxy.OUR_DAEMON, work, pki,
                         local=transport == "unix")
        servers.append(d)
        daemons[transport] = d
    export = proxy.Export(src, os.path.join(work, "src.nbd"), readonly=True)
    exports.append(export)
    sides = args.sides.split(",")
    results = {}
    for transport, d in daemons.items():
        for fmt in args.formats.split(","):
            key = f"{fmt}-{transport}"
            times = {side: [] for side in sides}
            space = {side: [] for side in sides}
            ratios = {side: [] for side in sides if side != "upstream"}
            for rnd in range(args.runs + 1):
                order = sides[rnd % len(sides):] + sides[:rnd % len(sides)]
                seconds = {}
                for side in order:
                    out = os.path.join(work, f"out.{fmt}")
                    d.add_ticket(export.url(), SIZE, ["read"])
                    cmd = command(side, d.url(), out, pki["ca_file"], fmt)
                    t0 = time.monotonic()
                    subprocess.run(cmd, check=True,
                                   stdout=subprocess.DEVNULL,
                                   env=upstream.client_env())
                    elapsed = time.monotonic() - t0
                    d.control("DELETE", f"/tickets/{proxy.TICKET_ID}")
                    allocated = os.stat(out).st_blocks * 512 / MiB
                    if rnd == 0:
                        compare(src, out, fmt)
                        proxy.log(f"[{key}] warm-up {side}: {elapsed:.3f} s,"
                                  f" {allocated:.0f} MiB, verified")
                    else:
                        times[side].append(elapsed)
                        space[side].append(allocated)
                        proxy.log(f"[{key}] run {rnd} {side}: "
                                  f"{elapsed:.3f} s, {allocated:.0f} MiB")
                    seconds[side] = elapsed
                    os.unlink(out)
                if rnd and "upstream" in seconds:
                    for side in ratios:
                        ratios[side].append(seconds[side]
                                            / seconds["upstream"])
            results[key] = {"seconds": times, "allocated_mib": space,
                            "ratios_to_upstream": ratios}

    print(f"Download of a 1 GiB raw image ({args.image}) from our daemon, "
          f"{args.runs} interleaved rounds, output in {args.dir}")
    print(f"{'case':12} {'side':12} {'median s':>9} {'MiB':>6} | "
          f"time / upstream med [min-max]")
    for key, r in results.items():
        for side in sides:
            med = statistics.median(r["seconds"][side])
            mib = statistics.median(r["allocated_mib"][side])
            ratio = ""
            rs = r["ratios_to_upstream"].get(side)
            if rs:
                ratio = (f"{statistics.median(rs):.2f} "
                         f"[{min(rs):.2f}-{max(rs):.2f}]")
            print(f"{key:12} {side:12} {med:9.3f} {mib:6.0f} | {ratio}")
    return results


if __name__ == "__main__":
    main()
