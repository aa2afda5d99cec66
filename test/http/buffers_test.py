"""The process's buffer pool: bounded, fair, never sharing a buffer."""

import threading

import pytest

import testutil
from ovirt_imageio.http import buffers

SIZE = 64 * 1024

# Every wait in these tests is bounded; a correct pool never needs it.
DEADLINE = 10


def acquire_in_thread(pool, timeout=DEADLINE):
    """Start acquiring in a thread; return (thread, result dict)."""
    result = {}
    started = threading.Event()

    def run():
        started.set()
        try:
            result["lease"] = pool.acquire(timeout)
        except buffers.Timeout as e:
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert started.wait(DEADLINE)
    return t, result


def wait_waiting(pool, n):
    testutil.wait_for(lambda: pool.stats()["waiting"] == n,
                      message=f"{n} waiting")


def test_bounded():
    pool = buffers.Pool(SIZE, 2 * SIZE)
    a = pool.acquire(0)
    b = pool.acquire(0)
    with pytest.raises(buffers.Timeout):
        pool.acquire(0)
    assert pool.stats()["allocated"] == 2
    a.release()
    b.release()


def test_at_least_one_buffer():
    pool = buffers.Pool(SIZE, 1)
    with pool.acquire(0) as view:
        assert len(view) == SIZE


def test_lazy_allocation():
    pool = buffers.Pool(SIZE, 100 * SIZE)
    assert pool.stats()["allocated"] == 0
    with pool.acquire(0):
        pass
    with pool.acquire(0):
        pass
    # The released buffer was reused, not a new one made.
    assert pool.stats()["allocated"] == 1


def test_writable_view_of_size():
    pool = buffers.Pool(SIZE, SIZE)
    with pool.acquire(0) as view:
        assert len(view) == SIZE
        view[:5] = b"hello"
        assert bytes(view[:5]) == b"hello"


def test_concurrent_never_share():
    pool = buffers.Pool(SIZE, 4 * SIZE)
    leases = [pool.acquire(0) for _ in range(4)]
    # Writing each one's mark shows no other lease sees it.
    for i, lease in enumerate(leases):
        lease.view[:] = bytes([i]) * SIZE
    for i, lease in enumerate(leases):
        assert bytes(lease.view) == bytes([i]) * SIZE
    for lease in leases:
        lease.release()


def test_view_released_with_lease():
    pool = buffers.Pool(SIZE, SIZE)
    with pool.acquire(0) as view:
        pass
    with pytest.raises(ValueError):
        view[0] = 1


def test_release_twice_returns_once():
    pool = buffers.Pool(SIZE, 2 * SIZE)
    lease = pool.acquire(0)
    lease.release()
    lease.release()
    a = pool.acquire(0)
    b = pool.acquire(0)
    # Two buffers, not the same one twice.
    assert pool.stats()["allocated"] == 2
    a.view[0] = 1
    b.view[0] = 2
    assert a.view[0] == 1
    a.release()
    b.release()


def test_released_on_error():
    pool = buffers.Pool(SIZE, SIZE)
    with pytest.raises(RuntimeError):
        with pool.acquire(0):
            raise RuntimeError("request failed")
    assert pool.stats()["in_use"] == 0
    with pool.acquire(0):
        pass


def test_waiter_served_on_release():
    pool = buffers.Pool(SIZE, SIZE)
    first = pool.acquire(0)
    t, result = acquire_in_thread(pool)
    wait_waiting(pool, 1)
    first.release()
    t.join(DEADLINE)
    assert "lease" in result
    assert pool.stats()["in_use"] == 1
    result["lease"].release()


def test_fifo():
    pool = buffers.Pool(SIZE, SIZE)
    holder = pool.acquire(0)
    waiters = []
    for i in range(3):
        waiters.append(acquire_in_thread(pool))
        wait_waiting(pool, i + 1)
    # A newcomer does not jump the queue, though a buffer is released.
    for i, (t, result) in enumerate(waiters):
        holder.release()
        t.join(DEADLINE)
        assert "lease" in result, f"waiter {i} not served first"
        for _, later in waiters[i + 1:]:
            assert not later
        holder = result["lease"]
    holder.release()


def test_newcomer_waits_behind_waiters():
    pool = buffers.Pool(SIZE, SIZE)
    holder = pool.acquire(0)
    t, result = acquire_in_thread(pool)
    wait_waiting(pool, 1)
    holder.release()
    t.join(DEADLINE)
    # The buffer went to the waiter: a newcomer finds none.
    with pytest.raises(buffers.Timeout):
        pool.acquire(0)
    result["lease"].release()


def test_timeout_leaves_queue():
    pool = buffers.Pool(SIZE, SIZE)
    holder = pool.acquire(0)
    with pytest.raises(buffers.Timeout):
        pool.acquire(0)
    assert pool.stats()["waiting"] == 0
    holder.release()
    # The buffer was not given to the waiter that left.
    with pool.acquire(0):
        pass


def test_timed_out_waiter_skipped():
    pool = buffers.Pool(SIZE, SIZE)
    holder = pool.acquire(0)
    t1, r1 = acquire_in_thread(pool)
    wait_waiting(pool, 1)
    # A second waiter with no patience leaves at once; the first stays.
    with pytest.raises(buffers.Timeout):
        pool.acquire(0)
    assert pool.stats()["waiting"] == 1
    holder.release()
    t1.join(DEADLINE)
    assert "lease" in r1
    r1["lease"].release()


def test_idle_beyond_keep_given_back():
    pool = buffers.Pool(SIZE, 4 * SIZE, keep=1)
    leases = [pool.acquire(0) for _ in range(3)]
    for lease in leases:
        lease.view[:] = b"x" * SIZE
    for lease in leases:
        lease.release()
    assert pool.stats()["resident_idle"] == 1
    # Given-back buffers read as zeros (their pages were dropped), and are
    # still usable.
    seen = []
    leases = [pool.acquire(0) for _ in range(3)]
    for lease in leases:
        seen.append(bytes(lease.view[:1]))
        lease.view[0] = 7
        assert lease.view[0] == 7
    assert sorted(seen) == [b"\0", b"\0", b"x"]
    assert pool.stats()["allocated"] == 3
    for lease in leases:
        lease.release()
