"""
What idle connections cost a daemon: N HTTPS connections over T tickets
(one qemu-nbd export each), each authorized by one small GET (4 KiB, so
it holds its NBD connection) and then held open. Prints, for each daemon,
its VmRSS, RssAnon and VmHWM before, with all connections open and after
they closed, its threads and fds, and memory per connection.

    .venv/bin/python bench/idle_conns.py [--daemon ours|upstream|CMD]...
        [--connections 1000] [--tickets 8]

--daemon may be repeated; the default is ours, "upstream" is 2.5.1 from
the anchor venv. Run it under the benchmark lock (flock /tmp/bench.lock).
The daemons are configured for the load: LimitNOFILE-like fd limit (the
hard limit; each connection takes a client socket and an NBD socket),
qemu-nbd --shared above the connections per export. The connections
authorize as they open, so [daemon] max_unauthorized_connections (512)
is never reached.
"""

import argparse
import http.client
import shutil
import tempfile
import time

import _daemon

KiB = 1024
MiB = _daemon.MiB

SIZE = 64 * MiB
REQUEST = 4 * KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--daemon", action="append",
                   help="ours (default), upstream, or a command line")
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--tickets", type=int, default=8)
    args = p.parse_args()

    nofile = _daemon.raise_nofile()
    # Ours: client and daemon sockets, NBD sockets, some slack.
    if nofile < 3 * args.connections + 100:
        p.error(f"fd limit {nofile} too low for {args.connections} "
                f"connections")
    work = tempfile.mkdtemp(prefix="idle-conns-", dir="/tmp")
    bench = _daemon.Bench(work)
    try:
        shared = args.connections // args.tickets + 16
        urls = [bench.export(f"export{i}", SIZE, shared)
                for i in range(args.tickets)]
        for n, name in enumerate(args.daemon or ["ours"]):
            cmd = {"ours": _daemon.OURS,
                   "upstream": _daemon.UPSTREAM}.get(name, name)
            run(bench, f"daemon{n}", name, cmd, urls, args.connections)
    finally:
        bench.close()
        shutil.rmtree(work, ignore_errors=True)


def run(bench, conf_name, name, cmd, urls, count):
    daemon = bench.daemon(conf_name, cmd)
    tickets = [f"idle-{i}" for i in range(len(urls))]
    for ticket_id, url in zip(tickets, urls):
        daemon.add_ticket(ticket_id, url, SIZE)
    ctx = bench.client_context()
    # Warm up: what the first requests allocate once is not per
    # connection.
    for c in [connect(daemon, ctx, t, i) for i, t in enumerate(tickets)]:
        c.close()
    _daemon.wait_for(lambda: daemon.status()["Threads"] <= 8, 30,
                     "the warm-up connections to close")
    before = daemon.status()
    before_fds = daemon.fds()
    _daemon.reset_hwm(daemon.pid)
    start = time.monotonic()
    conns = [connect(daemon, ctx, tickets[i % len(tickets)], i)
             for i in range(count)]
    seconds = time.monotonic() - start
    held = daemon.status()
    held_fds = daemon.fds()
    for c in conns:
        c.close()
    _daemon.wait_for(lambda: daemon.status()["Threads"] <= before["Threads"],
                     60, "the connections to close")
    after = daemon.status()
    per_conn = (held["VmRSS"] - before["VmRSS"]) / count
    print(f"{name}: {count} connections over {len(urls)} tickets, opened "
          f"in {seconds:.1f} s")
    print(f"  before: RSS {before['VmRSS'] / KiB:.1f} MiB, "
          f"threads {before['Threads']}, fds {before_fds}")
    print(f"  open:   RSS {held['VmRSS'] / KiB:.1f} MiB (anon "
          f"{held['RssAnon'] / KiB:.1f}, peak {held['VmHWM'] / KiB:.1f}), "
          f"threads {held['Threads']}, fds {held_fds}")
    print(f"  closed: RSS {after['VmRSS'] / KiB:.1f} MiB, "
          f"threads {after['Threads']}")
    print(f"  per connection: {per_conn:.0f} KiB RSS, "
          f"{(held_fds - before_fds) / count:.1f} fds, "
          f"{(held['Threads'] - before['Threads']) / count:.1f} threads",
          flush=True)


def connect(daemon, ctx, ticket_id, n):
    """A connection authorized by one small GET, left open."""
    c = http.client.HTTPSConnection("localhost", daemon.port, context=ctx,
                                    timeout=60)
    offset = (n * REQUEST) % SIZE
    c.request("GET", f"/images/{ticket_id}",
              headers={"Range": f"bytes={offset}-{offset + REQUEST - 1}"})
    r = c.getresponse()
    body = r.read()
    if r.status != 206 or len(body) != REQUEST:
        raise RuntimeError(f"connection {n}: {r.status}, {len(body)} bytes")
    return c


if __name__ == "__main__":
    main()
