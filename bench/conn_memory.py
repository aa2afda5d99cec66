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
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))

import testutil  # noqa: E402

MiB = 1 << 20


def status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "Threads"):
                out[key] = line.split()[1]
    return out


def largest_mappings(pid, count=10):
    regions = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and not fields[0].endswith(":"):
                regions.append([0, line.strip()])
            elif fields[0] == "Rss:":
                regions[-1][0] = int(fields[1])
    regions.sort(reverse=True)
    return regions[:count]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Timed out waiting for {what}")
        time.sleep(0.05)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--daemon", default=os.path.join(
        os.path.dirname(sys.executable), "ovirt-imageio"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--connections", type=int, default=256)
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="conn-memory-", dir="/tmp")
    procs = []
    try:
        pki = testutil.make_pki(os.path.join(work, "pki"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        conf_dir = os.path.join(work, "daemon")
        os.mkdir(conf_dir)
        conf = testutil.daemon_conf(conf_dir, pki)
        conf["remote"]["port"] = str(port)
        testutil.write_conf(conf_dir, conf)
        image = os.path.join(work, "image.raw")
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", image,
                        "64M"], check=True)
        nbd_sock = os.path.join(work, "nbd.sock")
        procs.append(subprocess.Popen(
            ["qemu-nbd", "--persistent", "--shared",
             str(args.connections + 16), "--format", "raw", "--socket",
             nbd_sock, image]))
        daemon = subprocess.Popen(
            [*shlex.split(args.daemon), "--conf-dir", conf_dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(daemon)
        control = conf["control"]["socket"]
        wait_for(lambda: os.path.exists(nbd_sock) and
                 os.path.exists(control), 30, "the daemon")
        ctl = testutil.Control(control)
        wait_for(lambda: _put_ticket(ctl, nbd_sock), 30, "the ticket")
        ctx = ssl.create_default_context(cafile=pki["ca_file"])
        for n in range(args.rounds):
            with open(f"/proc/{daemon.pid}/clear_refs", "w") as f:
                f.write("5")
            conns = []
            for _ in range(args.connections):
                c = http.client.HTTPSConnection("localhost", port,
                                                context=ctx, timeout=60)
                c.request("GET", "/images/bench",
                          headers={"Range": f"bytes=0-{MiB - 1}"})
                r = c.getresponse()
                r.read()
                assert r.status == 206, r.status
                conns.append(c)
            held = status(daemon.pid)
            for c in conns:
                c.close()
            wait_for(lambda: int(status(daemon.pid)["Threads"]) <= 8, 30,
                     "the connections to close")
            print(f"round {n}: open {held}, closed {status(daemon.pid)}",
                  flush=True)
        for rss, mapping in largest_mappings(daemon.pid):
            print(f"{rss:8d} KiB {mapping}")
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def _put_ticket(ctl, nbd_sock):
    try:
        ctl.request("PUT", "/tickets/bench", {
            "uuid": "bench", "size": 64 * MiB, "url": f"nbd:unix:{nbd_sock}",
            "timeout": 3000, "ops": ["read"]})
        return True
    except OSError:
        return False


if __name__ == "__main__":
    main()
