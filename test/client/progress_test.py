"""ProgressBar and progress arguments (client/progress.py)."""

import io
import json

import pytest

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
