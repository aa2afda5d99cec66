"""ProgressBar and progress arguments (client/progress.py)."""

import http.client
import io
import json
import os
import socket
import stat

import pytest

import testutil
from ovirt_imageio.client import progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_text():
    out = io.StringIO()
    clock = Clock()
    pb = progress.ProgressBar(phase="uploading", output=out, now=clock,
                              width=60)
    pb.size = 1024**3
    clock.now = 2.0
    pb.update(512 * 1024**2)
    pb.update(1)  # Same percentage: not drawn.
    clock.now = 4.0
    pb.update(512 * 1024**2 - 1)
    pb.close()
    lines = out.getvalue().split("\r")
    assert lines[0] == "[ ---- ] 0 bytes, 0.00 s, 0 bytes/s | uploading".ljust(
        60)
    assert lines[2] == ("[  50% ] 512.00 MiB, 2.00 s, 256.00 MiB/s | "
                        "uploading").ljust(60)
    assert lines[-1] == ("[ 100% ] 1.00 GiB, 4.00 s, 256.00 MiB/s | "
                         "uploading").ljust(60) + "\n"
    assert len(lines) == 5
    assert pb.done == 1024**3


def test_json():
    out = io.StringIO()
    clock = Clock()
    with progress.ProgressBar(output=out, format="json", now=clock,
                              size=100) as pb:
        clock.now = 1.0
        pb.update(50)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[0] == {"transferred": 0, "elapsed": 0.0,
                          "description": "", "size": 100}
    assert records[-1] == {"transferred": 50, "elapsed": 1.0,
                           "description": "", "size": 100}


def test_error_phase():
    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with progress.ProgressBar(output=out, format="json") as pb:
            pb.update(1)
            raise RuntimeError
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["description"] == "command failed"
    # Closed: nothing more is drawn.
    pb.update(1)
    pb.phase = "later"
    assert json.loads(out.getvalue().splitlines()[-1]) == last


def test_wrap():
    assert progress.wrap(None) is None
    pb = progress.ProgressBar(output=io.StringIO())
    assert progress.wrap(pb) is pb
    done = []
    wrapped = progress.wrap(done.append)
    wrapped.size = 10
    wrapped.update(3)
    assert done == [3]
    with pytest.raises(TypeError):
        progress.wrap(42)


@pytest.mark.parametrize("n,text", [
    (0, "0 bytes"), (1023, "1023 bytes"), (1024, "1.00 KiB"),
    (1536 * 1024**2, "1.50 GiB"), (1024**6, "1024.00 PiB")])
def test_humansize(n, text):
    assert progress.humansize(n) == text


def test_refresh_draws_only_when_idle():
    out = io.StringIO()
    clock = Clock()
    pb = progress.ProgressBar(phase="waiting", output=out, format="json",
                              now=clock)
    clock.now = 0.5
    pb.refresh(1.0)
    assert len(out.getvalue().splitlines()) == 1
    clock.now = 1.0
    pb.refresh(1.0)
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert records[-1] == {"transferred": 0, "elapsed": 1.0,
                           "description": "waiting"}
    pb.close()
    # Closing repeats no record: nothing changed since the last one.
    assert len(out.getvalue().splitlines()) == 2
    pb.refresh(0)
    assert len(out.getvalue().splitlines()) == 2


def test_ticker_keeps_a_long_phase_alive():
    import threading
    import time

    out = io.StringIO()
    clock = Clock()
    with progress.ProgressBar(phase="waiting", output=out, format="json",
                              now=clock) as pb:
        with progress.Ticker(pb, interval=0.02):
            clock.now = 7.0
            deadline = time.monotonic() + 30
            while '"elapsed": 7.0' not in out.getvalue():
                assert time.monotonic() < deadline, "no refresh"
                threading.Event().wait(0.01)
    assert not any(t.name == "progress" for t in threading.enumerate())


# Exporter: progress as Prometheus text.

def parse_progress(text):
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[s.name] = (s.value, s.labels)
    return samples


def test_exporter_file(tmp_path):
    clock = Clock()
    path = tmp_path / "progress.prom"
    bar = progress.ProgressBar(phase="uploading", output=io.StringIO(),
                               now=clock)
    # The bar closes first: the last text says how it ended.
    with progress.Exporter(bar, path=str(path),
                           command="upload-disk") as exp, bar:
        samples = parse_progress(path.read_text())
        assert samples["ovirt_img_running"][0] == 1
        assert samples["ovirt_img_transferred_bytes"][0] == 0
        # No size yet: no ratio.
        assert "ovirt_img_progress_ratio" not in samples
        bar.size = 4096
        clock.now = 2.0
        bar.update(1024)
        exp.write()
        samples = parse_progress(path.read_text())
        assert samples["ovirt_img_transferred_bytes"][0] == 1024
        assert samples["ovirt_img_size_bytes"][0] == 4096
        assert samples["ovirt_img_progress_ratio"][0] == 0.25
        assert samples["ovirt_img_elapsed_seconds"][0] == 2.0
        bar.update(3072)
        bar.phase = "upload completed"
    # The last value stays, and only the file: no temporary left.
    samples = parse_progress(path.read_text())
    assert samples["ovirt_img_running"][0] == 0
    assert samples["ovirt_img_failed"][0] == 0
    assert samples["ovirt_img_progress_ratio"][0] == 1.0
    assert samples["ovirt_img_transferred_bytes"][0] == 4096
    assert samples["ovirt_img_info"] == (
        1, {"phase": "upload completed", "command": "upload-disk"})
    assert os.listdir(tmp_path) == ["progress.prom"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_exporter_failure(tmp_path):
    path = tmp_path / "progress.prom"
    bar = progress.ProgressBar(phase="uploading", output=io.StringIO(),
                               error_phase="upload failed")
    with pytest.raises(RuntimeError):
        with progress.Exporter(bar, path=str(path)), bar:
            raise RuntimeError("boom")
    samples = parse_progress(path.read_text())
    assert samples["ovirt_img_failed"][0] == 1
    assert samples["ovirt_img_running"][0] == 0
    assert samples["ovirt_img_info"][1]["phase"] == "upload failed"


def test_exporter_rewrites_atomically(tmp_path):
    """A reader polling the file always sees a complete text: the file is
    replaced, never truncated and written."""
    path = tmp_path / "progress.prom"
    bar = progress.ProgressBar(output=io.StringIO(), size=10**9)
    with bar, progress.Exporter(bar, path=str(path), interval=0.001):
        inode = os.stat(path).st_ino
        for _ in range(200):
            bar.update(10**6)
            text = path.read_text()
            assert text.endswith("\n")
            parse_progress(text)
        testutil.wait_for(lambda: os.stat(path).st_ino != inode,
                          message="file replaced")


def test_exporter_serves(tmp_path):
    bar = progress.ProgressBar(phase="downloading", output=io.StringIO(),
                               size=100)
    with bar, progress.Exporter(bar, listen=("127.0.0.1", 0)) as exp:
        bar.update(40)
        host, port = exp.address
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            text = resp.read().decode()
            assert resp.status == 200
            assert resp.getheader("content-type").startswith("text/plain")
            conn.request("GET", "/other")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404
        finally:
            conn.close()
    samples = parse_progress(text)
    assert samples["ovirt_img_transferred_bytes"][0] == 40
    assert samples["ovirt_img_progress_ratio"][0] == 0.4
    assert samples["ovirt_img_running"][0] == 1
    # Stopped with the command.
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=10).close()
