"""
The fuzzer (test/fuzz.py) against a daemon in a child process, on its
three services: the HTTPS remote service, the local unix socket and the
control socket.

Batches of cases run four connections at a time. After each batch: the
daemon still runs, good requests are served on every service with the
right bytes, the read-only images are unchanged, the model ticket's image
is exactly its model (a write is added and read back each batch), and once
the batch's connections are gone the daemon has no more threads, file
descriptors or child processes than before it.

make check runs a few thousand requests with a fixed seed; make stress
(IMAGEIO_STRESS=1) runs test_fuzz_stress for IMAGEIO_FUZZ_SECONDS (default
600) with a new seed, printed. Rerun a failure with FUZZ_SEED=<seed>.
Generators of known defects are off (fuzz.KNOWN_DEFECTS); FUZZ_ENABLE
turns them on.
"""

import concurrent.futures
import hashlib
import http.client
import os
import random
import socket
import ssl
import time

import pytest

import fuzz
import testutil

MiB = 1024**2
IMAGE_SIZE = MiB
CHECK_SEED = 20261202
CHECK_BATCHES = 6
CASES_PER_BATCH = 250
WORKERS = 4


def image_bytes(seed):
    """Data, a zero run, data, a repeating pattern: so GETs go through
    the zero-skipping path too."""
    rnd = random.Random(seed)
    q = IMAGE_SIZE // 4
    return (rnd.randbytes(q) + bytes(q) + rnd.randbytes(q) +
            bytes(range(256)) * (q // 256))


def write_image(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Fuzzed:
    """The daemon under fuzzing, its tickets and their images."""

    def __init__(self, tmp_path, pki, qemu_nbd):
        self.tmp = tmp_path
        self.pki = pki
        rnd = random.Random()
        # Ticket ids are credentials: unguessable, as in production.
        ids = {name: f"{name}-{rnd.getrandbits(64):016x}"
               for name in ("ro-file", "ro-nbd", "ro-named", "scratch",
                            "model", "short")}
        images = tmp_path / "images"
        images.mkdir()
        self.ro_data = {
            "ro-file": image_bytes(1), "ro-nbd": image_bytes(2),
            "ro-named": image_bytes(2)}
        self.paths = {
            "ro-file": write_image(images / "ro-file.raw",
                                   self.ro_data["ro-file"]),
            "ro-nbd": write_image(images / "ro-nbd.raw",
                                  self.ro_data["ro-nbd"]),
            "scratch": write_image(images / "scratch.raw",
                                   bytes(IMAGE_SIZE)),
            "model": write_image(images / "model.raw", bytes(IMAGE_SIZE)),
            "short": write_image(images / "short.raw", bytes(IMAGE_SIZE)),
        }
        self.digests = {name: sha256(self.paths[name])
                        for name in ("ro-file", "ro-nbd")}
        self.model = bytearray(IMAGE_SIZE)
        # qemu-nbd queues connections past --shared: room for every
        # connection the fuzzer and the checks open at once.
        ro_nbd = qemu_nbd(self.paths["ro-nbd"], read_only=True, shared=32)
        model_nbd = qemu_nbd(self.paths["model"], shared=32)
        short_nbd = qemu_nbd(self.paths["short"], shared=32)

        self.daemon = testutil.DaemonProcess(tmp_path / "daemon", pki)
        self.daemon.wait_ready()
        self.pid = self.daemon.proc.pid
        self.local = self.daemon.conf["local"]["socket"]
        self.port = fuzz.remote_port(self.daemon.log)

        tickets = [
            ("ro-file", ["read"], f"file://{self.paths['ro-file']}",
             IMAGE_SIZE),
            ("ro-nbd", ["read"], f"nbd:unix:{ro_nbd.socket}", IMAGE_SIZE),
            ("ro-named", ["read"], f"nbd:unix:{ro_nbd.socket}",
             IMAGE_SIZE),
            ("scratch", ["read", "write"],
             f"file://{self.paths['scratch']}", IMAGE_SIZE),
            ("model", ["read", "write"], f"nbd:unix:{model_nbd.socket}",
             IMAGE_SIZE),
            ("short", ["read", "write"], f"nbd:unix:{short_nbd.socket}",
             2 * IMAGE_SIZE),
        ]
        for name, ops, url, size in tickets:
            ticket = {
                "uuid": ids[name], "size": size, "ops": ops,
                "timeout": 3600, "url": url, "transfer_id": f"fz-{name}"}
            if name == "ro-named":
                # A name for downloads (Content-Disposition).
                ticket["filename"] = (
                    "disk \u20ac.img" if fuzz.enabled("non-latin1-filename")
                    else "disk \u00e9.img")
            resp, data = self.daemon.api.put(ticket)
            assert resp.status == 200, data
        self.ids = ids
        missing = tmp_path / "missing.raw"
        self.env = fuzz.Env(
            readonly=[fuzz.Ticket(ids[n], IMAGE_SIZE, self.ro_data[n])
                      for n in ("ro-file", "ro-nbd", "ro-named")],
            scratch=fuzz.Ticket(ids["scratch"], IMAGE_SIZE),
            model=fuzz.Ticket(ids["model"], IMAGE_SIZE),
            short=fuzz.Ticket(ids["short"], 2 * IMAGE_SIZE),
            ctl_ids=[f"fz-ctl-{i}" for i in range(6)],
            ctl_urls=[f"nbd:unix:{ro_nbd.socket}", f"file://{missing}",
                      "nbd:unix:/nonexistent/x.sock",
                      "nbd://127.0.0.1:1/x", "https://127.0.0.1:1/images/x",
                      "ftp://x/y", "file:relative.img", "nbd:unix:"],
            image_size=IMAGE_SIZE)
        self.targets = {
            "local": (self.local, socket.AF_UNIX),
            "remote": (("127.0.0.1", self.port), socket.AF_INET),
            "control": (self.daemon.control_socket, socket.AF_UNIX),
        }

    # Clients for the checks.

    def local_client(self):
        return testutil.UnixHTTPConnection(self.local, timeout=30)

    def remote_client(self):
        ctx = ssl.create_default_context(cafile=self.pki["ca_file"])
        return http.client.HTTPSConnection(
            "localhost", self.port, context=ctx, timeout=30)

    def usage(self):
        """(threads, fds, children) of the daemon now."""
        return (len(os.listdir(f"/proc/{self.pid}/task")),
                len(os.listdir(f"/proc/{self.pid}/fd")),
                len(testutil.children(self.pid)))

    def stop(self):
        self.daemon.stop()


def request(conn, method, path, body=None, headers=None):
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp, resp.read()
    finally:
        conn.close()


def verify(f, rnd):
    """After a batch: the daemon serves, and no image changed wrongly."""
    assert f.daemon.proc.poll() is None, "the daemon exited"
    for client in (f.local_client, f.remote_client):
        resp, data = request(client(), "OPTIONS", "/images/*")
        assert resp.status == 200, data
        for name, expected in f.ro_data.items():
            resp, data = request(client(), "GET", f"/images/{f.ids[name]}")
            assert resp.status == 200, data
            assert data == expected, f"GET {name}: wrong bytes"
    for name in f.ids:
        info = f.daemon.api.get(f.ids[name])
        assert info["transfer_id"] == f"fz-{name}"
    for name, digest in f.digests.items():
        assert sha256(f.paths[name]) == digest, f"{name} image changed"

    # The model ticket: one more write, then all of it read back.
    length = rnd.choice([1, 4096, 65536])
    offset = rnd.randrange(IMAGE_SIZE - length)
    data = rnd.randbytes(length)
    client = rnd.choice([f.local_client, f.remote_client])
    resp, body = request(
        client(), "PUT", f"/images/{f.ids['model']}", body=data,
        headers={"content-range": f"bytes {offset}-{offset + length - 1}/*"})
    assert resp.status == 200, body
    f.model[offset:offset + length] = data
    resp, body = request(client(), "GET", f"/images/{f.ids['model']}")
    assert resp.status == 200
    assert body == f.model, (
        f"model image differs from its model: smuggled requests served, "
        f"from {fuzz.smugglers(body, f.model)}")
    with open(f.paths["model"], "rb") as img:
        assert img.read() == f.model

    # Control tickets of the batch go; their exports with them.
    for tid in f.env.ctl_ids:
        resp, body = f.daemon.api.delete(tid)
        assert resp.status == 204, body


def settle(f, baseline):
    """Wait until the batch's connections are gone: no leaked thread, fd
    or child process."""
    def settled():
        now = f.usage()
        return all(n <= b for n, b in zip(now, baseline)) and now
    try:
        testutil.wait_for(settled, timeout=30, message="connections to end")
    except AssertionError:
        raise AssertionError(
            f"leak: (threads, fds, children) {f.usage()}, before "
            f"{baseline}") from None


def run_batch(f, gen, batch, n, stats):
    cases = [gen.case(batch, i) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(fuzz.run_case, c, f.targets,
                               f.pki["ca_file"]) for c in cases]
        for case, future in zip(cases, futures):
            result, responses = future.result()
            stats.add(case, result, responses)


def fuzz_daemon(f, seed, batches=None, seconds=None, report=None):
    stats = fuzz.Stats()
    gen = fuzz.Generator(f.env, seed)
    rnd = random.Random(f"verify:{seed}")
    # A first batch warms the daemon up (buffers, log handlers); the
    # baseline is taken after it.
    baseline = None
    deadline = seconds and time.monotonic() + seconds
    batch = 0
    try:
        while True:
            run_batch(f, gen, batch, CASES_PER_BATCH, stats)
            verify(f, rnd)
            if baseline is None:
                baseline = settle_baseline(f)
            else:
                settle(f, baseline)
            batch += 1
            if batches is not None and batch >= batches:
                break
            if deadline and time.monotonic() >= deadline:
                break
    except AssertionError as e:
        raise AssertionError(
            f"fuzz seed={seed} batch={batch} (rerun: FUZZ_SEED={seed}): "
            f"{e}") from None
    finally:
        if report:
            report(stats, batch)
    return stats


def settle_baseline(f):
    """The usage once the first batch's connections ended: it stops
    falling."""
    last = [None]

    def stable():
        now = f.usage()
        same = now == last[0]
        last[0] = now
        return same
    # Polling twice in a row with the same figures: threads of closed
    # connections are gone.
    testutil.wait_for(stable, timeout=30, interval=0.2,
                      message="daemon usage to settle")
    return last[0]


@pytest.fixture
def fuzzed(tmp_path, pki, qemu_nbd):
    f = Fuzzed(tmp_path, pki, qemu_nbd)
    yield f
    f.stop()


def seed_from_env(default):
    value = os.environ.get("FUZZ_SEED")
    return int(value) if value else default


def test_fuzz(fuzzed):
    seed = seed_from_env(CHECK_SEED)
    stats = fuzz_daemon(fuzzed, seed, batches=CHECK_BATCHES)
    assert stats.requests >= CHECK_BATCHES * CASES_PER_BATCH
    # The generator reaches the interesting answers.
    for status in (200, 206, 400, 403, 404, 416):
        assert stats.statuses.get(status), (status, stats.statuses)


@pytest.mark.stress
def test_fuzz_stress(fuzzed, capsys):
    seed = seed_from_env(random.randrange(2**32))
    seconds = float(os.environ.get("IMAGEIO_FUZZ_SECONDS", "600"))
    start = time.monotonic()

    def report(stats, batches):
        rss = peak_rss(fuzzed.pid)
        with capsys.disabled():
            print(f"\nfuzz: seed={seed} batches={batches} "
                  f"connections={stats.cases} requests={stats.requests} "
                  f"responses={stats.responses} "
                  f"sent={stats.bytes_sent} received={stats.bytes_received} "
                  f"statuses={dict(sorted(stats.statuses.items()))} "
                  f"ends={stats.ends} daemon_peak_rss_kib={rss} "
                  f"seconds={time.monotonic() - start:.0f}")

    fuzz_daemon(fuzzed, seed, seconds=seconds, report=report)


def peak_rss(pid):
    """The process's peak resident set (VmHWM), KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


# The strict response parser the verdicts rely on.

GOOD = (b"HTTP/1.1 200 OK\r\nserver: x\r\ncontent-length: 3\r\n\r\nabc"
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n"
        b"connection: close\r\n\r\n")


def test_parser_accepts():
    responses = fuzz.parse_responses(GOOD)
    assert [(r.status, r.body) for r in responses] == [
        (200, b"abc"), (204, b"")]
    assert responses[-1].close


def test_parser_head():
    data = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"
    assert fuzz.parse_responses(data, head_requests={0})[0].body == b""
    with pytest.raises(fuzz.ProtocolError):
        fuzz.parse_responses(data)


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",
    b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\nx",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nbad header\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 99 X\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n",
    b"garbage",
], ids=["short-body", "no-length", "bare-lf", "http-1.0", "signed-length",
        "two-lengths", "bad-header", "after-close", "bad-status",
        "truncated-head", "garbage"])
def test_parser_rejects(data):
    with pytest.raises(fuzz.ProtocolError):
        fuzz.parse_responses(data)


def test_generator_is_deterministic(tmp_path):
    env = fuzz.Env(
        readonly=[fuzz.Ticket("ro", IMAGE_SIZE, bytes(IMAGE_SIZE))],
        scratch=fuzz.Ticket("s", IMAGE_SIZE),
        model=fuzz.Ticket("m", IMAGE_SIZE),
        short=fuzz.Ticket("x", 2 * IMAGE_SIZE),
        ctl_ids=["fz-ctl-0"], ctl_urls=["nbd:unix:/x"],
        image_size=IMAGE_SIZE)
    a = fuzz.Generator(env, 7)
    b = fuzz.Generator(env, 7)
    # Case (batch, index) does not depend on what was generated before.
    b.case(0, 1)
    assert a.case(3, 5).data == b.case(3, 5).data
    assert a.case(3, 5).data != a.case(3, 6).data


def test_known_defects_are_off():
    # Each name is a defect being fixed elsewhere; after the fixes are
    # merged, remove it from fuzz.KNOWN_DEFECTS to fuzz it in make check.
    if os.environ.get("FUZZ_ENABLE"):
        pytest.skip("FUZZ_ENABLE set")
    for name in fuzz.KNOWN_DEFECTS:
        assert not fuzz.enabled(name)
    assert fuzz.enabled("mutated")
