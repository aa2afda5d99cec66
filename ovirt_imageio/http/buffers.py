"""
The process's pool of data buffers, for bytes crossing TLS.

State: process. One Pool is made by the daemon and shared by every
connection of every service; a request holds a buffer while it moves data
(one GET, PUT or PATCH), never while its connection idles, so memory grows
with the transfers in flight, not with the connections open.

Theory of operation. A buffer is one piece (half [backend_nbd]
buffer_size) of private anonymous memory (mmap): the kernel gives it pages
only as they are touched, so a 4 KiB request costs a page or so, not a
piece. At most capacity // size buffers exist; a request finding none free
waits its turn (first come, first served) up to its timeout, then gets
Timeout (the handler answers 503). Released buffers are reused most
recently used first, so the few kept warm serve most requests; beyond
`keep` idle buffers, a released buffer's pages are given back to the
kernel (madvise MADV_DONTNEED) and it stays mapped, costing no memory,
until it is needed again.
"""

import collections
import mmap
import threading

# Idle buffers kept resident, so the next requests skip page faults.
KEEP = 4


class Timeout(Exception):
    """No buffer was free within the timeout."""


class Pool:

    def __init__(self, size, capacity, keep=KEEP):
        """
        Buffers of size bytes, at most capacity bytes of them (at least
        one buffer); up to keep idle ones stay resident.
        """
        self.size = size
        self.limit = max(1, capacity // size)
        self.keep = keep
        self._lock = threading.Lock()
        # Idle buffers, most recently released last: resident ones (hot),
        # and ones whose pages were given back (cold).
        self._hot = []
        self._cold = []
        self._allocated = 0
        self._waiters = collections.deque()

    def stats(self):
        """Counts for logs and tests: allocated, in use, idle, waiting."""
        with self._lock:
            idle = len(self._hot) + len(self._cold)
            return {"allocated": self._allocated,
                    "in_use": self._allocated - idle,
                    "resident_idle": len(self._hot),
                    "waiting": len(self._waiters),
                    "limit": self.limit}

    def acquire(self, timeout=None):
        """
        Return a Lease on a free buffer, waiting up to timeout seconds
        (None: forever) behind earlier waiters. Raise Timeout if none was
        given in time.
        """
        with self._lock:
            buf = self._take()
            if buf is not None:
                return Lease(self, buf)
            waiter = _Waiter()
            self._waiters.append(waiter)
        waiter.event.wait(timeout)
        with self._lock:
            if waiter.buffer is None:
                self._waiters.remove(waiter)
                raise Timeout(
                    f"No buffer free within {timeout} seconds "
                    f"({self.limit} in use)")
        return Lease(self, waiter.buffer)

    def _take(self):
        """A buffer for a new request, or None if it must wait."""
        if self._waiters:
            # Earlier requests first.
            return None
        if self._hot:
            return self._hot.pop()
        if self._cold:
            return self._cold.pop()
        if self._allocated < self.limit:
            self._allocated += 1
            return mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE)
        return None

    def _release(self, buf):
        with self._lock:
            if self._waiters:
                waiter = self._waiters.popleft()
                waiter.buffer = buf
                waiter.event.set()
                return
            self._hot.append(buf)
            if len(self._hot) > self.keep:
                # Under the lock: a buffer is never advised while in use.
                oldest = self._hot.pop(0)
                oldest.madvise(mmap.MADV_DONTNEED)
                self._cold.append(oldest)


class _Waiter:

    def __init__(self):
        self.event = threading.Event()
        self.buffer = None


class Lease:
    """
    One request's hold on a buffer: a context manager whose value is a
    memoryview of it; leaving it (or release()) returns the buffer. The
    view is released too, so a request cannot use it afterwards.
    """

    def __init__(self, pool, buf):
        self._pool = pool
        self._buf = buf
        self.view = memoryview(buf)

    def __enter__(self):
        return self.view

    def __exit__(self, *exc):
        self.release()

    def release(self):
        buf, self._buf = self._buf, None
        if buf is not None:
            try:
                self.view.release()
            finally:
                self._pool._release(buf)
