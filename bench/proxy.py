#!/usr/bin/env python3
"""
Proxy throughput: download and upload through our proxy, against direct
to our daemon and against upstream 2.5.1's proxy in front of upstream's
daemon, in the same run.

    .venv/bin/python bench/proxy.py [--size-mib 512] [--runs 5] [--conns 4]
        [--same-host] [--cross] [--json FILE] [--keep]

Setups (each its own processes, started once):

    direct-ours     client -> our daemon
    proxy-ours      client -> our proxy -> our daemon
    proxy-upstream  client -> upstream proxy -> upstream daemon
    direct-upstream client -> upstream daemon (reference)
    proxy-ours>up   client -> our proxy -> upstream daemon (--cross: the
                    proxy alone differs from proxy-upstream)

Proxies are configured as engine-setup does (50-engine.conf: their own
PKI, [backend_http] ca_file = the daemons' CA, local service off, control
over TCP). By default the daemons' local services are off too, so the
proxy-daemon hop is TLS over TCP, as with a daemon on another host; with
--same-host they are on and both proxies switch to the daemon's unix
socket after OPTIONS (an all-in-one engine host).

Data: one image of random bytes (no holes, so every byte crosses both
hops) on /dev/shm; each daemon serves it through its own qemu-nbd export
(--cache writeback), read-only for downloads, and a writable export of a
second file for uploads, so only the daemons and proxies differ.

Client: the neutral client of the shared harness (shared/bench/
clients.py, run by the anchor venv's python) for every setup: OPTIONS,
/extents, 8 MiB ranged GETs on N keep-alive HTTPS connections / 8 MiB
PUTs ?flush=n and one PATCH flush. It times itself (interpreter start-up
excluded).

Rounds are interleaved: every round runs each setup once, in an order
rotated per round; the first round is a warm-up, also used to verify the
bytes. Reported: median seconds, MiB/s, median proxy (or daemon) CPU
seconds per run, and per-round ratios (median [min-max]) of proxy-ours
against proxy-upstream and against direct-ours.
"""

import argparse
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))

import upstream  # noqa: E402  (test/upstream.py: the anchor venv)

MiB = 1024**2
OUR_DAEMON = os.path.join(ROOT, ".venv", "bin", "ovirt-imageio")
DEFAULT_CLIENTS = os.path.join(os.path.dirname(ROOT), "shared", "bench",
                               "clients.py")
TICKET_ID = "bench-proxy-ticket"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mkpki(directory):
    subprocess.run([os.path.join(ROOT, "dev", "mkpki"), directory],
                   check=True)
    return {"ca_file": os.path.join(directory, "ca.pem"),
            "cert_file": os.path.join(directory, "cert.pem"),
            "key_file": os.path.join(directory, "key.pem")}


def write_conf(conf_dir, name, sections):
    d = os.path.join(conf_dir, "conf.d")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "w") as f:
        for section, values in sections.items():
            f.write(f"[{section}]\n")
            for k, v in values.items():
                f.write(f"{k} = {v}\n")
            f.write("\n")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    """An imageio daemon or proxy process (ours or upstream's)."""

    def __init__(self, name, binary, workdir, pki, *, proxy=False,
                 daemon_ca=None, local=False):
        self.name = name
        self.dir = os.path.join(workdir, name)
        os.makedirs(self.dir)
        self.port = free_port()
        self.run_dir = os.path.join(self.dir, "run")
        os.makedirs(self.run_dir)
        base = {
            "daemon": {"run_dir": self.run_dir, "drop_privileges": "false",
                       "systemd_enable": "false", "max_connections": "8"},
            "tls": {"enable": "true", **pki},
            "remote": {"host": "127.0.0.1", "port": str(self.port)},
            "handlers": {"keys": "logfile"},
            "handler_logfile": {
                "args": repr((os.path.join(self.dir, "log"),))},
            "logger_root": {"handlers": "logfile", "level": "INFO"},
        }
        if proxy:
            self.control_port = free_port()
            base["backend_http"] = {"ca_file": daemon_ca}
            base["local"] = {"enable": "false"}
            base["control"] = {"transport": "tcp",
                               "port": str(self.control_port)}
        else:
            self.control_port = None
            self.control_socket = os.path.join(self.dir, "control.sock")
            base["control"] = {"transport": "unix",
                               "socket": self.control_socket}
            if local:
                sock = os.path.join(self.dir, "local.sock")
                base["local"] = {"enable": "true", "socket": sock}
            else:
                base["local"] = {"enable": "false"}
        write_conf(self.dir, "50-bench.conf", base)
        self.stderr = open(os.path.join(self.dir, "stderr"), "wb")
        self.proc = subprocess.Popen(
            [binary, "--conf-dir", self.dir], stdin=subprocess.DEVNULL,
            stdout=self.stderr, stderr=self.stderr, cwd=self.dir,
            env=upstream.client_env(), start_new_session=True)
        self._wait_ready()

    def _control(self):
        if self.control_port:
            return http.client.HTTPConnection("127.0.0.1", self.control_port,
                                              timeout=30)
        import testutil
        return testutil.UnixHTTPConnection(self.control_socket)

    def control(self, method, path, body=None):
        con = self._control()
        try:
            if body is not None:
                body = json.dumps(body).encode()
            con.request(method, path, body=body)
            resp = con.getresponse()
            data = resp.read()
            return resp.status, data
        finally:
            con.close()

    def _wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: "
                                   f"{open(self.stderr.name).read()}")
            try:
                status, _ = self.control("GET", "/tickets/probe")
                with socket.create_connection(("127.0.0.1", self.port), 1):
                    pass
                if status == 404:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready")
            time.sleep(0.05)

    def add_ticket(self, url, size, ops):
        t = {"uuid": TICKET_ID, "size": size, "ops": ops, "timeout": 3600,
             "url": url, "transfer_id": f"bench-{self.name}",
             "sparse": True}
        status, data = self.control("PUT", f"/tickets/{TICKET_ID}", t)
        if status != 200:
            raise RuntimeError(f"{self.name}: add ticket: {status} {data}")

    def url(self):
        return f"https://localhost:{self.port}/images/{TICKET_ID}"

    def cpu(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


class Export:
    """A qemu-nbd export of a raw file, one per daemon and direction."""

    def __init__(self, path, sock, readonly):
        self.sock = sock
        argv = ["qemu-nbd", "--format", "raw", "--socket", sock,
                "--shared", "8", "--persistent", "--cache", "writeback"]
        if readonly:
            argv.append("--read-only")
        argv.append(path)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-nbd for {path} did not start")
            time.sleep(0.02)

    def url(self):
        return f"nbd:unix:{self.sock}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Setup:
    """One way to reach the image: a URL, its CA, and the process whose CPU
    is reported (the proxy, or the daemon for direct setups)."""

    def __init__(self, name, ca, measured, daemon):
        self.name = name
        self.ca = ca
        self.measured = measured
        self.daemon = daemon
        self.url = None


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(8 * MiB)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)


def run_client(args, cmd, *argv):
    out = upstream.run_python(
        args.clients, cmd, *argv, "--transport", "https",
        "--conns", str(args.conns), "--chunk", str(args.chunk_mib * MiB),
        timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size-mib", type=int, default=512)
    p.add_argument("--runs", type=int, default=5,
                   help="timed rounds (after one warm-up round)")
    p.add_argument("--conns", type=int, default=4)
    p.add_argument("--chunk-mib", type=int, default=8)
    p.add_argument("--scenarios", default="download,upload")
    p.add_argument("--same-host", action="store_true",
                   help="daemons with their local unix socket: proxies "
                        "switch to it")
    p.add_argument("--cross", action="store_true",
                   help="also our proxy in front of upstream's daemon")
    p.add_argument("--no-direct-upstream", action="store_true")
    p.add_argument("--clients", default=DEFAULT_CLIENTS)
    p.add_argument("--json")
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    upstream.anchor_venv()
    work = tempfile.mkdtemp(prefix="imageio-proxy-bench-", dir="/dev/shm")
    servers, exports = [], []
    try:
        results = bench(args, work, servers, exports)
    finally:
        for s in servers:
            s.stop()
        for e in exports:
            e.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def bench(args, work, servers, exports):
    size = args.size_mib * MiB
    src = os.path.join(work, "src.raw")
    log(f"writing {args.size_mib} MiB of random data to {src}")
    with open(src, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    src_sum = sha256(src)
    daemon_pki = mkpki(os.path.join(work, "daemon-pki"))
    proxy_pki = mkpki(os.path.join(work, "proxy-pki"))
    up_bin = upstream.daemon_path()

    def start(*a, **kw):
        s = Server(*a, **kw)
        servers.append(s)
        return s

    def export(name, path, readonly):
        e = Export(path, os.path.join(work, name + ".nbd"), readonly)
        exports.append(e)
        return e

    daemons = {}
    for side, binary in (("ours", OUR_DAEMON), ("upstream", up_bin)):
        d = start(f"daemon-{side}", binary, work, daemon_pki,
                  local=args.same_host)
        dst = os.path.join(work, f"dst-{side}.raw")
        with open(dst, "wb") as f:
            f.truncate(size)
        d.read_export = export(f"read-{side}", src, True)
        d.write_export = export(f"write-{side}", dst, False)
        d.dst = dst
        daemons[side] = d

    def daemon_ticket(d, ops):
        # Tickets are replaced between directions: one id per daemon.
        d.add_ticket(d.read_export.url() if ops == ["read"]
                     else d.write_export.url(), size, ops)

    proxies = {
        "ours": start("proxy-ours", OUR_DAEMON, work, proxy_pki, proxy=True,
                      daemon_ca=daemon_pki["ca_file"]),
        "upstream": start("proxy-upstream", up_bin, work, proxy_pki,
                          proxy=True, daemon_ca=daemon_pki["ca_file"]),
    }
    cross = None
    if args.cross:
        cross = start("proxy-cross", OUR_DAEMON, work, proxy_pki, proxy=True,
                      daemon_ca=daemon_pki["ca_file"])

    ours, theirs = daemons["ours"], daemons["upstream"]
    setups = [
        Setup("direct-ours", daemon_pki["ca_file"], ours, ours),
        Setup("proxy-ours", proxy_pki["ca_file"], proxies["ours"], ours),
        Setup("proxy-upstream", proxy_pki["ca_file"], proxies["upstream"],
              theirs),
    ]
    if not args.no_direct_upstream:
        setups.append(Setup("direct-upstream", daemon_pki["ca_file"],
                            theirs, theirs))
    if cross:
        setups.append(Setup("proxy-ours>up", proxy_pki["ca_file"], cross,
                            theirs))

    def prepare(ops):
        for d in daemons.values():
            daemon_ticket(d, ops)
        proxies["ours"].add_ticket(daemons["ours"].url(), size, ops)
        proxies["upstream"].add_ticket(daemons["upstream"].url(), size, ops)
        if cross:
            cross.add_ticket(daemons["upstream"].url(), size, ops)
        for s in setups:
            s.url = s.measured.url()

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    runs = {sc: {s.name: [] for s in setups} for sc in scenarios}
    cpu = {sc: {s.name: [] for s in setups} for sc in scenarios}
    out = os.path.join(work, "out.raw")
    for sc in scenarios:
        prepare(["read"] if sc == "download" else ["write"])
        for rnd in range(args.runs + 1):
            shift = rnd % len(setups)
            order = setups[shift:] + setups[:shift]
            for s in order:
                if rnd == 0 and sc == "upload":
                    # Verified after the warm-up upload: start from zeros.
                    with open(s.daemon.dst, "r+b") as f:
                        f.truncate(0)
                        f.truncate(size)
                before = s.measured.cpu()
                if sc == "download":
                    res = run_client(args, "download", s.url, out, s.ca)
                else:
                    res = run_client(args, "upload", src, s.url, s.ca)
                used = s.measured.cpu() - before
                if rnd == 0:
                    verify(sc, s, out, src_sum)
                else:
                    runs[sc][s.name].append(res["seconds"])
                    cpu[sc][s.name].append(used)
                if sc == "download":
                    os.unlink(out)
                log(f"{sc} round {rnd}{' (warm-up)' if rnd == 0 else ''} "
                    f"{s.name}: {res['seconds']:.3f} s cpu {used:.2f} s "
                    f"conns {res.get('connections')}")
    report(args, setups, scenarios, runs, cpu, size)
    return {"args": vars(args), "seconds": runs, "cpu": cpu}


def verify(sc, s, out, src_sum):
    # The upload ended with PATCH flush: the export wrote back to the file.
    path = out if sc == "download" else s.daemon.dst
    if sha256(path) != src_sum:
        raise RuntimeError(f"{sc} via {s.name}: bytes differ")


def report(args, setups, scenarios, runs, cpu, size):
    mode = "proxy->daemon over the daemon's unix socket" if args.same_host \
        else "proxy->daemon over TLS"
    print(f"\n{args.size_mib} MiB random data on /dev/shm, {args.runs} "
          f"timed rounds (+1 warm-up), clients.py --conns {args.conns} "
          f"--chunk {args.chunk_mib} MiB over HTTPS; {mode}; "
          f"{os.cpu_count()} CPUs\n")
    print("| scenario | setup | median s | MiB/s | median cpu s "
          "(proxy or daemon) |")
    print("| --- | --- | --- | --- | --- |")
    for sc in scenarios:
        for s in setups:
            t = statistics.median(runs[sc][s.name])
            c = statistics.median(cpu[sc][s.name])
            print(f"| {sc} | {s.name} | {t:.3f} | "
                  f"{args.size_mib / t:.0f} | {c:.2f} |")
    print("\n| scenario | ratio | median [min-max] per round | "
          "ratio of medians |")
    print("| --- | --- | --- | --- |")
    pairs = [("proxy-ours", "proxy-upstream"), ("proxy-ours", "direct-ours"),
             ("proxy-upstream", "direct-upstream"),
             ("proxy-ours>up", "proxy-upstream")]
    names = {s.name for s in setups}
    for sc in scenarios:
        for a, b in pairs:
            if a not in names or b not in names:
                continue
            ratios = [x / y for x, y in zip(runs[sc][a], runs[sc][b])]
            med = statistics.median(runs[sc][a]) / statistics.median(
                runs[sc][b])
            print(f"| {sc} | {a} / {b} | {statistics.median(ratios):.2f} "
                  f"[{min(ratios):.2f}-{max(ratios):.2f}] | {med:.2f} |")


if __name__ == "__main__":
    main()
