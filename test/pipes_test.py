"""Pipes and waiting on descriptors (ovirt_imageio/pipes.py)."""

import os
import select
import time

import pytest

from ovirt_imageio import pipes


@pytest.fixture
def pipe():
    r, w, capacity = pipes.open_pipe(100000)
    yield r, w, capacity
    os.close(r)
    os.close(w)


def test_open_pipe(pipe):
    r, w, capacity = pipe
    # The kernel rounds the capacity up to a power of two pages.
    assert capacity >= 100000
    assert not os.get_inheritable(r) and not os.get_inheritable(w)
    os.write(w, b"x" * 5000)
    assert os.read(r, 10000) == b"x" * 5000


def test_ready(pipe):
    r, w, _ = pipe
    assert not pipes.ready(r, select.POLLIN, 0)
    assert pipes.ready(w, select.POLLOUT, 0)
    os.write(w, b"x")
    assert pipes.ready(r, select.POLLIN, None)


def test_wait_times_out(pipe):
    r, _, _ = pipe
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        pipes.wait(r, select.POLLIN, 0.05)
    assert time.monotonic() - start >= 0.04


def test_wait_ready(pipe):
    r, w, _ = pipe
    os.write(w, b"x")
    pipes.wait(r, select.POLLIN, 0)
