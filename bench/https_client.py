#!/usr/bin/env python3
"""
Our client library and daemon against upstream 2.5.1's client and daemon,
end to end, over HTTPS. The shared harness's own-client mode
(--client-a) covers the unix socket only: its daemons always offer one.

    .venv/bin/python bench/https_client.py [--runs 5] [--scenarios
        download,upload] [--json FILE] [--keep]

Pairs (each its own processes, started once):

    ours      bench/client.py (our client.download / client.upload) -> our
              daemon
    upstream  shared/bench/clients.py lib-download / lib-upload (upstream's
              client.download(fmt="raw") / client.upload, 4 workers) ->
              upstream's daemon

The daemons run with their local service off, so both clients stay on
HTTPS (TLS over TCP loopback), as a client on another host would.

Data: the shared harness's src.raw on /dev/shm: 4 GiB virtual, 1 GiB of
random data in eight 128 MiB extents. Downloads read it through a
read-only qemu-nbd export per daemon; uploads go to a new 4 GiB raw file
behind a writable qemu-nbd, started afresh (not timed) for every run.

Rounds alternate ours and upstream, the order swapped every round; the
first round is a warm-up that also checks the result byte for byte. Each
run is timed from outside the client process (interpreter start-up
included, as in the harness's own-client mode). Reported: median seconds,
median daemon CPU seconds, and the per-round ratios ours / upstream,
median [min-max].
"""

import argparse
import filecmp
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
SIZE = 4 * GiB
OUR_CLIENT = os.path.join(BENCH, "client.py")


def make_source(path):
    """The harness's image: 1 GiB of data in eight 128 MiB extents."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for i in range(8):
            f.seek(i * 512 * MiB + i * MiB)
            for _ in range(128):
                f.write(os.urandom(MiB))


def client_command(side, scenario, url, path, ca):
    if side == "ours":
        python = os.path.join(proxy.ROOT, ".venv", "bin", "python")
        if scenario == "download":
            return [python, OUR_CLIENT, "download", url, path, ca]
        return [python, OUR_CLIENT, "upload", path, url, ca]
    # -P: the script's directory stays off sys.path (upstream.run_python).
    python = [upstream.python_path(), "-P", proxy.DEFAULT_CLIENTS]
    if scenario == "download":
        return python + ["lib-download", url, path, ca]
    return python + ["lib-upload", path, url, ca]


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5,
                   help="timed rounds (after one warm-up round)")
    p.add_argument("--scenarios", default="download,upload")
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    upstream.anchor_venv()
    work = tempfile.mkdtemp(prefix="imageio-https-bench-", dir="/dev/shm")
    servers, exports = [], []
    try:
        results = bench(args, work, servers, exports)
    finally:
        for s in servers:
            s.stop()
        for e in exports:
            e.stop()
        if args.keep:
            proxy.log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def bench(args, work, servers, exports):
    src = os.path.join(work, "src.raw")
    proxy.log(f"writing {src}")
    make_source(src)
    pki = proxy.mkpki(os.path.join(work, "pki"))
    daemons = {}
    for side, binary in (("ours", proxy.OUR_DAEMON),
                         ("upstream", upstream.daemon_path())):
        d = proxy.Server(side, binary, work, pki)
        servers.append(d)
        daemons[side] = d
    scenarios = args.scenarios.split(",")
    times = {(sc, side): [] for sc in scenarios for side in daemons}
    cpu = {(sc, side): [] for sc in scenarios for side in daemons}
    ratios = {sc: [] for sc in scenarios}
    for sc in scenarios:
        readers = {}
        if sc == "download":
            for side, d in daemons.items():
                e = proxy.Export(src, os.path.join(work, f"{side}-r.nbd"),
                                 readonly=True)
                exports.append(e)
                readers[side] = e
        for rnd in range(args.runs + 1):
            sides = list(daemons)
            if rnd % 2:
                sides.reverse()
            seconds = {}
            for side in sides:
                d = daemons[side]
                export = readers.get(side)
                dst = os.path.join(work, f"{side}-dst.raw")
                if os.path.exists(dst):
                    os.unlink(dst)
                if sc == "upload":
                    with open(dst, "wb") as f:
                        f.truncate(SIZE)
                    export = proxy.Export(
                        dst, os.path.join(work, f"{side}-w.nbd"),
                        readonly=False)
                d.add_ticket(export.url(), SIZE,
                             ["read"] if sc == "download" else ["write"])
                path = dst if sc == "download" else src
                cmd = client_command(side, sc, d.url(), path, pki["ca_file"])
                c0 = d.cpu()
                t0 = time.monotonic()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                               env=upstream.client_env())
                elapsed = time.monotonic() - t0
                used = d.cpu() - c0
                d.control("DELETE", f"/tickets/{proxy.TICKET_ID}")
                if sc == "upload":
                    export.stop()
                if rnd == 0:
                    if not filecmp.cmp(src, dst, shallow=False):
                        raise RuntimeError(f"{sc} {side}: result differs")
                    proxy.log(f"[{sc}] warm-up {side}: {elapsed:.3f} s, "
                              f"verified")
                else:
                    times[sc, side].append(elapsed)
                    cpu[sc, side].append(used)
                    proxy.log(f"[{sc}] run {rnd} {side}: {elapsed:.3f} s, "
                              f"daemon cpu {used:.2f} s")
                seconds[side] = elapsed
                os.unlink(dst)
            if rnd:
                ratios[sc].append(seconds["ours"] / seconds["upstream"])
        for e in readers.values():
            e.stop()

    print(f"Own client + daemon vs upstream 2.5.1's, HTTPS, {args.runs} "
          f"interleaved rounds; 1 GiB of data in a 4 GiB image")
    print(f"{'scenario':10} {'side':9} {'median s':>9} {'MiB/s':>7} "
          f"{'cpu s':>6} | ours/upstream time med [min-max]")
    results = {}
    for sc in scenarios:
        r = ratios[sc]
        for i, side in enumerate(daemons):
            med = statistics.median(times[sc, side])
            c = statistics.median(cpu[sc, side])
            ratio = (f"{statistics.median(r):.2f} "
                     f"[{min(r):.2f}-{max(r):.2f}]") if i == 0 else ""
            print(f"{sc:10} {side:9} {med:9.3f} {1024 / med:7.0f} "
                  f"{c:6.2f} | {ratio}")
            results[f"{sc}-{side}"] = {"seconds": times[sc, side],
                                       "cpu": cpu[sc, side]}
        results[f"{sc}-ratios"] = r
    return results


if __name__ == "__main__":
    main()
