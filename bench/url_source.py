"""
Reading an image from an HTTP server through urlsource.py: qemu-img
convert of src.qemu_spec() to a local raw file, with 1 and 4 HTTP
connections, against nbdkit's curl plugin (which needs Accept-Ranges, so
the server sends it here) and a plain curl download, with an optional
delay per request standing in for a WAN round trip.

    .venv/bin/python bench/url_source.py [--size-mib 256] [--delay-ms 0]
        [--runs 3]

Prints the median seconds of each way. The server is test/imageserver.py
(Python's http.server in threads, in a process of its own), the same
for every way.
"""

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "test")]

from imageserver import ImageServer  # noqa: E402
from ovirt_imageio.client import urlsource  # noqa: E402

MiB = 1024**2


class SlowServer(ImageServer):
    """Sends Accept-Ranges (for nbdkit) and waits delay per GET."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def _get(self, h, head=False):
        if self.delay:
            time.sleep(self.delay)
        if not hasattr(h, "_orig_send_header"):
            # Once per handler: it serves every request of a connection.
            h._orig_send_header = orig = h.send_header

            def send_header(name, value):
                orig(name, value)
                if name == "Content-Length":
                    orig("Accept-Ranges", "bytes")

            h.send_header = send_header
        super()._get(h, head)


def run(cmd):
    start = time.monotonic()
    subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def ours(url, connections, out):
    start = time.monotonic()
    with urlsource.open(url, max_connections=connections) as src:
        subprocess.run(["qemu-img", "convert", "-O", "raw", "-W", "-m", "8",
                        src.qemu_spec(), out], check=True, timeout=600)
    return time.monotonic() - start


def nbdkit(url, out, sock):
    node = {"driver": "raw", "file": {
        "driver": "nbd", "server": {"type": "unix", "path": sock}}}
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen(["nbdkit", "-f", "-r", "-U", sock, "curl",
                          f"url={url}"])
    try:
        deadline = time.monotonic() + 10
        while not serving(sock):
            if time.monotonic() > deadline:
                raise RuntimeError("nbdkit did not start")
            time.sleep(0.01)
        return run(["qemu-img", "convert", "-O", "raw", "-W", "-m", "8",
                    "json:" + json.dumps(node), out])
    finally:
        p.terminate()
        p.wait(timeout=10)


def serve(image, delay_ms, ports):
    with SlowServer(delay_ms / 1000) as srv:
        srv.files["/image"] = image
        ports.put(srv.port)
        threading.Event().wait()


def serving(sock):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(sock)
        return True
    except OSError:
        return False
    finally:
        s.close()


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--size-mib", type=int, default=256)
    a.add_argument("--delay-ms", type=float, default=0)
    a.add_argument("--runs", type=int, default=3)
    args = a.parse_args()
    tmp = tempfile.mkdtemp(prefix="bench-url-")
    image = os.path.join(tmp, "image.raw")
    with open(image, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    out = os.path.join(tmp, "out.raw")
    results = {}
    # The server in a process of its own: not sharing our GIL.
    ctx = multiprocessing.get_context("fork")
    ports = ctx.Queue()
    server = ctx.Process(target=serve, args=(image, args.delay_ms, ports),
                         daemon=True)
    server.start()
    try:
        url = f"http://127.0.0.1:{ports.get(timeout=30)}/image"
        ways = {
            "curl (one GET)": lambda: run(["curl", "-s", "-o", out, url]),
            "urlsource 1 conn": lambda: ours(url, 1, out),
            "urlsource 4 conns": lambda: ours(url, 4, out),
            "nbdkit curl": lambda: nbdkit(url, out,
                                          os.path.join(tmp, "nbdkit.sock")),
        }
        for _ in range(args.runs):
            for name, way in ways.items():
                results.setdefault(name, []).append(way())
                os.unlink(out)
    finally:
        server.terminate()
        server.join(timeout=10)
    for name, times in results.items():
        median = statistics.median(times)
        print(f"{name:20} median {median:6.2f} s "
              f"({args.size_mib / median:7.1f} MiB/s)")
    subprocess.run(["rm", "-rf", tmp], check=True)


if __name__ == "__main__":
    main()
