"""
ovirt-img against upstream's ovirt-img 2.5.1, side by side: the same
engine simulator (test/enginesim.py), the same daemon (ours, as a
process), the same image, runs interleaved A B A B, medians and the
median of the pair ratios (A / B; below 1 is faster).

    .venv/bin/python bench/ovirt_img.py [--runs 5] [--no-tmpfs]

The image is the side-by-side benchmark's (../shared/bench/README.md):
4 GiB raw holding 1 GiB of random data in eight 128 MiB extents. Images
and volumes live on a private tmpfs (as root), so the disk does not add
noise. Both commands run on the daemon's host, so both move the data on
the daemon's unix socket.

Rows:
  upload       upload-disk (a sparse qcow2 disk, the default), ours with
               --no-verify (upstream does not verify) vs upstream
  upload+verify  ours with verification (the default) vs upstream
  download     download-disk -f raw (Forklift's), ours --no-verify vs
               upstream
  download+verify  ours verifying vs upstream

Upstream comes from the anchor venv (test/upstream.py), run with this
venv's SDK on its PYTHONPATH (it shares our import name ovirt_imageio).
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))
sys.path.insert(0, ROOT)

import enginesim  # noqa: E402
import testutil  # noqa: E402
import upstream  # noqa: E402

MiB = 1 << 20
GiB = 1 << 30
IMAGE_SIZE = 4 * GiB
EXTENT = 128 * MiB
EXTENTS = 8
RUN_TIMEOUT = 600


def make_image(path):
    with open(path, "wb") as f:
        f.truncate(IMAGE_SIZE)
        for i in range(EXTENTS):
            f.seek(i * (IMAGE_SIZE // EXTENTS) + i * MiB)
            for _ in range(EXTENT // (8 * MiB)):
                f.write(os.urandom(8 * MiB))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"Timed out waiting for {what}")
        time.sleep(0.05)


class Bench:

    def __init__(self, work, engine, ca_file, anchor):
        self.work = work
        self.engine = engine
        self.password = os.path.join(work, "password")
        with open(self.password, "w") as f:
            f.write("password\n")
        self.common = ["--engine-url", engine.url,
                       "--username", "admin@internal",
                       "--password-file", self.password,
                       "--cafile", ca_file, "-o", "json"]
        ours = os.path.join(os.path.dirname(sys.executable), "ovirt-img")
        theirs = os.path.join(anchor, "bin", "ovirt-img")
        self.sides = {
            "ours": ([ours], dict(os.environ)),
            "upstream": ([theirs], dict(
                os.environ, PYTHONSAFEPATH="1",
                PYTHONPATH=upstream.sdk_path(os.path.join(work, "sdk")))),
        }
        # Both run "on the host" the same way: no vdsm.id.
        for _, env in self.sides.values():
            env["OVIRT_IMG_VDSM_ID"] = os.path.join(work, "no-vdsm.id")

    def run(self, side, *args):
        cmd, env = self.sides[side]
        start = time.monotonic()
        p = subprocess.run([*cmd, args[0], *self.common, *args[1:]],
                           env=env, cwd=self.work, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True,
                           timeout=RUN_TIMEOUT)
        elapsed = time.monotonic() - start
        if p.returncode != 0:
            raise RuntimeError(f"{side} {args[0]} failed: {p.stderr}")
        last = json.loads(p.stdout.splitlines()[-1])
        if not last["description"].endswith("completed"):
            raise RuntimeError(f"{side} {args[0]}: {last}")
        return elapsed

    def upload(self, side, src, *extra):
        name = f"bench-{side}-{time.monotonic_ns()}"
        elapsed = self.run(side, "upload-disk", "-s", "nfs", "--name", name,
                           *extra, src)
        disk, = [d for d in self.engine.disks.values()
                 if d.name == name and not d.removed]
        return elapsed, disk

    def download(self, side, disk, dst, *extra):
        elapsed = self.run(side, "download-disk", "-f", "raw", *extra,
                           disk.id, dst)
        os.unlink(dst)
        return elapsed


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--no-tmpfs", action="store_true")
    args = p.parse_args()

    anchor = upstream.anchor_venv()
    work = tempfile.mkdtemp(prefix="bench-ovirt-img-", dir="/tmp")
    mounted = False
    try:
        img = os.path.join(work, "img")
        os.mkdir(img)
        if not args.no_tmpfs and os.getuid() == 0:
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7g",
                            "tmpfs", img], check=True)
            mounted = True
        pki = testutil.make_pki(os.path.join(work, "pki"))
        src = os.path.join(img, "src.raw")
        print("Making the 4 GiB image (1 GiB of random data)...",
              flush=True)
        make_image(src)
        rows = run_bench(args, work, img, pki, anchor, src)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", img])
        shutil.rmtree(work, ignore_errors=True)
    report(rows)


def run_bench(args, work, img, pki, anchor, src):
    port = free_port()
    daemon_dir = os.path.join(work, "daemon")
    os.mkdir(daemon_dir)
    conf = testutil.daemon_conf(daemon_dir, pki)
    conf["remote"]["port"] = str(port)
    conf["logger_root"] = {"level": "WARNING"}
    testutil.write_conf(daemon_dir, conf)
    control = conf["control"]["socket"]
    daemon = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), "ovirt-imageio"),
         "--conf-dir", daemon_dir], stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    engine = None
    try:
        wait_for(lambda: os.path.exists(control), 30, "the daemon")
        engine = enginesim.Engine(os.path.join(img, "store"), control, port,
                                  pki, delay=0.2).start()
        bench = Bench(work, engine, pki["ca_file"], anchor)
        rows = {name: {"ours": [], "upstream": []} for name in
                ("upload", "upload+verify", "download", "download+verify")}
        dst = os.path.join(img, "dst.raw")
        # Warm-up: page cache, bytecode, the disk to download.
        _, disk = bench.upload("ours", src, "--no-verify")
        bench.download("upstream", disk, dst)
        for i in range(args.runs):
            print(f"Round {i + 1}/{args.runs}", flush=True)
            for row, side, extra in (
                    ("upload", "ours", ["--no-verify"]),
                    ("upload", "upstream", []),
                    ("upload+verify", "ours", []),
                    ("upload+verify", "upstream", [])):
                elapsed, new = bench.upload(side, src, *extra)
                rows[row][side].append(elapsed)
                engine.remove_disk(new.id)
            for row, side, extra in (
                    ("download", "ours", ["--no-verify"]),
                    ("download", "upstream", []),
                    ("download+verify", "ours", []),
                    ("download+verify", "upstream", [])):
                rows[row][side].append(bench.download(side, disk, dst,
                                                      *extra))
        return rows
    finally:
        if engine is not None:
            engine.stop()
        daemon.terminate()
        daemon.wait(60)
        shutil.rmtree(conf["daemon"]["run_dir"], ignore_errors=True)


def report(rows):
    print()
    print(f"{'scenario':<18} {'ours s':>8} {'upstream s':>11} "
          f"{'ratio':>6}  (medians; ratio: median of pairs)")
    for name, sides in rows.items():
        ours, theirs = sides["ours"], sides["upstream"]
        ratios = [a / b for a, b in zip(ours, theirs)]
        print(f"{name:<18} {statistics.median(ours):8.2f} "
              f"{statistics.median(theirs):11.2f} "
              f"{statistics.median(ratios):6.2f}  "
              f"[{min(ratios):.2f}-{max(ratios):.2f}]")


if __name__ == "__main__":
    main()
