"""
Pipes for splice(2), and waiting on a descriptor: what the NBD stream
(nbd/stream.py) and the client's raw files (client/rawfile.py) share.

Kept apart from both so the client can use it without importing the NBD
modules (libnbd's bindings cost a client command ~10 ms to load).
"""

import fcntl
import os
import select


def open_pipe(size):
    """
    Return (read_fd, write_fd, capacity) of a new pipe, asking for size
    bytes of capacity. A smaller pipe (size above
    /proc/sys/fs/pipe-max-size) still works, in more calls.
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        capacity = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        capacity = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    return r, w, capacity


def ready(fd, event, timeout):
    """Wait up to timeout seconds (None: forever) for event on fd."""
    poller = select.poll()
    poller.register(fd, event)
    ms = None if timeout is None else int(timeout * 1000)
    return bool(poller.poll(ms))


def wait(fd, event, timeout):
    """Like ready(), raising TimeoutError if the time ran out."""
    if not ready(fd, event, timeout):
        raise TimeoutError("timed out")
