"""
Load on a daemon in a child process: many keep-alive connections over
several tickets doing mixed reads, writes and zeros, every byte checked
against a model, while trickling attackers (one byte of a request head at
a time, never finishing it) hold connections of their own. The attackers
must not starve the clients: every client finishes its work.

Each connection owns a region of its ticket's image, so the model of a
region is exact: what its connection wrote last. Reads compare with the
model at once; at the end each image on disk is compared whole.

make check runs a small bounded version (16 connections, a few hundred
requests); make stress runs test_load_stress: 64 connections over 8
tickets for IMAGEIO_LOAD_SECONDS (default 120) and prints the figures.
"""

import dataclasses
import http.client
import os
import random
import socket
import ssl
import threading
import time

import pytest

import fuzz
import testutil

KiB = 1024
REGION = 256 * KiB
# Generous: a loaded shared machine is slow, a starved client never ends.
DEADLINE = 300
TRICKLE_INTERVAL = 0.2


@dataclasses.dataclass
class Figures:
    requests: int = 0
    bytes_verified: int = 0
    bytes_written: int = 0
    errors: int = 0
    attacker_connections: int = 0
    attacker_bytes: int = 0
    first_errors: list = dataclasses.field(default_factory=list)

    def error(self, lock, message):
        with lock:
            self.errors += 1
            if len(self.first_errors) < 5:
                self.first_errors.append(message)


class Loaded:
    """A daemon with `tickets` tickets of `per_ticket` regions each."""

    def __init__(self, tmp_path, pki, qemu_nbd, tickets, per_ticket, seed):
        self.pki = pki
        rnd = random.Random(seed)
        self.size = per_ticket * REGION
        self.paths = []
        self.models = []
        self.ids = []
        urls = []
        images = tmp_path / "images"
        images.mkdir()
        for i in range(tickets):
            data = rnd.randbytes(self.size)
            path = str(images / f"disk{i}.raw")
            with open(path, "wb") as f:
                f.write(data)
            self.paths.append(path)
            self.models.append(bytearray(data))
            self.ids.append(f"load-{i}-{random.getrandbits(64):016x}")
            # Half the daemon's own qemu-nbd (file://), half an export it
            # is given (nbd:unix:, what vdsm sends).
            if i % 2:
                urls.append(f"file://{path}")
            else:
                server = qemu_nbd(path, shared=2 * per_ticket + 4)
                urls.append(f"nbd:unix:{server.socket}")
        self.daemon = testutil.DaemonProcess(
            tmp_path / "daemon", pki,
            daemon={"max_connections": str(per_ticket)})
        self.daemon.wait_ready()
        self.pid = self.daemon.proc.pid
        self.port = remote_port(self.daemon.log)
        for i, url in enumerate(urls):
            resp, data = self.daemon.api.put({
                "uuid": self.ids[i], "size": self.size,
                "ops": ["read", "write"], "timeout": 3600, "url": url,
                "transfer_id": f"load-{i}"})
            assert resp.status == 200, data

    def connect(self, transport):
        if transport == "unix":
            return testutil.UnixHTTPConnection(
                self.daemon.conf["local"]["socket"], timeout=60)
        ctx = ssl.create_default_context(cafile=self.pki["ca_file"])
        return http.client.HTTPSConnection(
            "localhost", self.port, context=ctx, timeout=60)

    def peak_rss(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])

    def stop(self):
        self.daemon.stop()


def remote_port(log):
    return fuzz.remote_port(log)


class Client(threading.Thread):
    """One keep-alive connection working on its own region."""

    def __init__(self, loaded, ticket, region, transport, seed, figures,
                 lock, requests=None, until=None):
        super().__init__(daemon=True, name=f"client-{ticket}-{region}")
        self.loaded = loaded
        self.ticket = ticket
        self.start_offset = region * REGION
        self.transport = transport
        self.rnd = random.Random(seed)
        self.figures = figures
        self.lock = lock
        self.requests = requests
        self.until = until
        self.done = 0
        self.finished = False
        self.path = f"/images/{loaded.ids[ticket]}"
        self.model = loaded.models[ticket]

    def run(self):
        conn = self.loaded.connect(self.transport)
        try:
            while not self._enough():
                try:
                    self._one(conn)
                except (OSError, http.client.HTTPException,
                        AssertionError) as e:
                    self.figures.error(
                        self.lock, f"{self.name} request {self.done}: "
                                   f"{type(e).__name__}: {e}")
                    conn.close()
                    conn = self.loaded.connect(self.transport)
                self.done += 1
            self.finished = True
        finally:
            conn.close()

    def _enough(self):
        if self.requests is not None:
            return self.done >= self.requests
        return time.monotonic() >= self.until

    def _span(self):
        length = self.rnd.choice([1, 511, 4096, 65536, REGION,
                                  self.rnd.randrange(1, REGION)])
        offset = self.start_offset + self.rnd.randrange(REGION - length + 1)
        return offset, length

    def _request(self, conn, method, headers=None, body=None, query=""):
        conn.request(method, self.path + query, body=body,
                     headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()

    def _one(self, conn):
        op = self.rnd.choices(["read", "write", "zero", "flush"],
                              [5, 3, 1, 0.2])[0]
        offset, length = self._span()
        end = offset + length
        if op == "read":
            resp, data = self._request(
                conn, "GET", {"range": f"bytes={offset}-{end - 1}"})
            assert resp.status == 206, (resp.status, data[:200])
            assert data == self.model[offset:end], (
                f"GET {offset}+{length}: bytes differ from the model")
            with self.lock:
                self.figures.bytes_verified += length
        elif op == "write":
            data = self.rnd.randbytes(length)
            resp, body = self._request(
                conn, "PUT", {"content-range": f"bytes {offset}-{end - 1}/*"},
                body=data, query="?flush=n")
            assert resp.status == 200, (resp.status, body[:200])
            self.model[offset:end] = data
            with self.lock:
                self.figures.bytes_written += length
        elif op == "zero":
            msg = ('{"op": "zero", "offset": %d, "size": %d}'
                   % (offset, length)).encode()
            resp, body = self._request(
                conn, "PATCH", {"content-type": "application/json"}, msg)
            assert resp.status == 200, (resp.status, body[:200])
            self.model[offset:end] = bytes(length)
        else:
            resp, body = self._request(
                conn, "PATCH", {"content-type": "application/json"},
                b'{"op": "flush"}')
            assert resp.status == 200, (resp.status, body[:200])
        with self.lock:
            self.figures.requests += 1


class Trickler(threading.Thread):
    """
    An attacker: a request head sent one byte per TRICKLE_INTERVAL,
    never finished; when the daemon drops the connection, a new one.
    """

    HEAD = (b"PUT /images/trickle HTTP/1.1\r\nContent-Length: 100\r\n"
            b"X-Slow: " + b"x" * 4000)

    def __init__(self, address, family, stop, figures, lock, tls_ca=None):
        super().__init__(daemon=True, name="trickler")
        self.address = address
        self.family = family
        self.stop = stop
        self.figures = figures
        self.lock = lock
        self.tls_ca = tls_ca

    def run(self):
        while not self.stop.is_set():
            try:
                self._connection()
            except OSError:
                pass

    def _connection(self):
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.settimeout(30)
            s.connect(self.address)
            if self.tls_ca:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
                s = ctx.wrap_socket(s, server_hostname="localhost")
            with self.lock:
                self.figures.attacker_connections += 1
            for i in range(len(self.HEAD)):
                # Pacing the attack, not waiting for a condition.
                if self.stop.wait(TRICKLE_INTERVAL):
                    return
                s.sendall(self.HEAD[i:i + 1])
                with self.lock:
                    self.figures.attacker_bytes += 1
        finally:
            s.close()


def run_load(loaded, tickets, per_ticket, seed, tricklers, requests=None,
             seconds=None):
    figures = Figures()
    lock = threading.Lock()
    stop = threading.Event()
    attackers = []
    for i in range(tricklers):
        if i % 2:
            attackers.append(Trickler(
                ("127.0.0.1", loaded.port), socket.AF_INET, stop, figures,
                lock, tls_ca=loaded.pki["ca_file"]))
        else:
            attackers.append(Trickler(
                loaded.daemon.conf["local"]["socket"], socket.AF_UNIX, stop,
                figures, lock))
    for a in attackers:
        a.start()
    # The attackers are connected before the clients start.
    testutil.wait_for(lambda: figures.attacker_connections >= tricklers,
                      timeout=60, message="attackers connected")
    until = seconds and time.monotonic() + seconds
    clients = [
        Client(loaded, t, r, "unix" if (t + r) % 2 else "https",
               f"{seed}:{t}:{r}", figures, lock, requests=requests,
               until=until)
        for t in range(tickets) for r in range(per_ticket)]
    start = time.monotonic()
    for c in clients:
        c.start()
    deadline = start + (seconds or 0) + DEADLINE
    for c in clients:
        c.join(max(deadline - time.monotonic(), 0))
    duration = time.monotonic() - start
    stop.set()
    for a in attackers:
        a.join(10)
    starved = [c.name for c in clients if not c.finished]
    assert not starved, (
        f"clients starved (unfinished after {DEADLINE} s): {starved[:8]}; "
        f"{figures}")
    assert figures.errors == 0, figures.first_errors
    # Every image on disk is its model.
    for i in range(tickets):
        conn = loaded.connect("unix")
        conn.request("PATCH", f"/images/{loaded.ids[i]}",
                     body=b'{"op": "flush"}')
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 200
        with open(loaded.paths[i], "rb") as f:
            assert f.read() == loaded.models[i], f"image {i} differs"
        figures.bytes_verified += loaded.size
    return figures, duration


@pytest.fixture
def make_loaded(tmp_path, pki, qemu_nbd):
    started = []

    def make(tickets, per_ticket, seed):
        loaded = Loaded(tmp_path, pki, qemu_nbd, tickets, per_ticket, seed)
        started.append(loaded)
        return loaded

    yield make
    for loaded in started:
        loaded.stop()


def test_load(make_loaded):
    tickets, per_ticket = 4, 4
    loaded = make_loaded(tickets, per_ticket, seed=1)
    figures, _ = run_load(loaded, tickets, per_ticket, seed=1, tricklers=16,
                          requests=25)
    assert figures.requests == tickets * per_ticket * 25
    assert figures.bytes_verified > 0


@pytest.mark.stress
def test_load_stress(make_loaded, capsys):
    tickets, per_ticket = 8, 8
    seconds = float(os.environ.get("IMAGEIO_LOAD_SECONDS", "120"))
    seed = random.randrange(2**32)
    loaded = make_loaded(tickets, per_ticket, seed)
    try:
        figures, duration = run_load(
            loaded, tickets, per_ticket, seed, tricklers=64,
            seconds=seconds)
    finally:
        rss = loaded.peak_rss()
    with capsys.disabled():
        print(f"\nload: seed={seed} connections={tickets * per_ticket} "
              f"tickets={tickets} requests={figures.requests} "
              f"bytes_verified={figures.bytes_verified} "
              f"bytes_written={figures.bytes_written} "
              f"errors={figures.errors} "
              f"attacker_connections={figures.attacker_connections} "
              f"attacker_bytes={figures.attacker_bytes} "
              f"daemon_peak_rss_kib={rss} seconds={duration:.0f}")
    assert figures.requests > 0
