"""
A daemon's memory across rounds of many HTTPS connections: each round
opens N connections one after another, one 1 MiB ranged GET each, holds
them open, then closes them all. Prints the daemon's VmRSS, VmHWM
(reset every round) and RssAnon with the connections open and after
they closed, and at the end the daemon's largest mappings (smaps).

    .venv/bin/python bench/conn_memory.py [--daemon CMD] [--rounds 4]

A daemon whose memory grows from round to round keeps something per
connection after it closed. (Issue 13: ours grew by about 115 MiB per
round of 256 connections, up to about 440 MiB, with malloc_trim(0)
releasing nothing; upstream's many-conns peak stays at 295 MiB.)
"""

import argparse
import http.client
import shutil
import tempfile

import _daemon

MiB = _daemon.MiB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--daemon", default=_daemon.OURS)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--connections", type=int, default=256)
    args = p.parse_args()

    _daemon.raise_nofile()
    work = tempfile.mkdtemp(prefix="conn-memory-", dir="/tmp")
    bench = _daemon.Bench(work)
    try:
        url = bench.export("image", 64 * MiB, args.connections + 16)
        daemon = bench.daemon("daemon", args.daemon)
        daemon.add_ticket("bench", url, 64 * MiB)
        ctx = bench.client_context()
        for n in range(args.rounds):
            _daemon.reset_hwm(daemon.pid)
            conns = []
            for _ in range(args.connections):
                c = http.client.HTTPSConnection("localhost", daemon.port,
                                                context=ctx, timeout=60)
                c.request("GET", "/images/bench",
                          headers={"Range": f"bytes=0-{MiB - 1}"})
                r = c.getresponse()
                r.read()
                assert r.status == 206, r.status
                conns.append(c)
            held = daemon.status()
            for c in conns:
                c.close()
            _daemon.wait_for(lambda: daemon.status()["Threads"] <= 8, 30,
                             "the connections to close")
            print(f"round {n}: open {held}, closed {daemon.status()}",
                  flush=True)
        for rss, mapping in _daemon.largest_mappings(daemon.pid):
            print(f"{rss:8d} KiB {mapping}")
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
