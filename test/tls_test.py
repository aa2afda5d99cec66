"""tls.Connection: TLS through memory BIOs with batched socket I/O, against
the stdlib's ssl client."""

import hashlib
import io
import mmap
import os
import socket
import ssl
import threading

import pytest

from ovirt_imageio import tls
from ovirt_imageio.http import server


@pytest.fixture(params=["native", "memory"])
def contexts(pki, request, monkeypatch):
    """Both paths: OpenSSL's socket I/O, and the memory BIOs it falls
    back to."""
    monkeypatch.setattr(tls, "NATIVE", request.param == "native")
    srv = server.tls_context(pki["cert_file"], pki["key_file"])
    cli = ssl.create_default_context(cafile=pki["ca_file"])
    return srv, cli


def pair(contexts):
    """A connected (server tls.Connection, client SSLSocket)."""
    srv_ctx, cli_ctx = contexts
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result = {}

    def client():
        result["client"] = cli_ctx.wrap_socket(b, server_hostname="localhost")

    t = threading.Thread(target=client)
    t.start()
    conn = tls.Connection(a, srv_ctx)
    conn.handshake()
    t.join(10)
    assert (conn._native is not None) == tls.NATIVE
    return conn, result["client"]


def test_ssl_pointer_is_proved_by_its_bios(contexts):
    from ovirt_imageio import _openssl
    lib = _openssl.load()
    if lib is None:
        pytest.skip("No libssl to use here")
    a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = contexts[0].wrap_bio(a, b, server_side=True)
    assert _openssl.ssl_pointer(lib, obj, a, b)
    # Another object's BIOs, or these swapped: not this SSL.
    assert _openssl.ssl_pointer(lib, obj, b, a) is None
    c, d = ssl.MemoryBIO(), ssl.MemoryBIO()
    assert _openssl.ssl_pointer(lib, obj, c, d) is None
    assert _openssl.ssl_pointer(lib, object(), a, b) is None


def test_large_transfer_both_ways(contexts):
    conn, client = pair(contexts)
    data = os.urandom(3 * tls.BATCH + 12345)
    received = []

    def receive():
        buf = bytearray()
        while len(buf) < len(data):
            buf += client.recv(65536)
        received.append(bytes(buf))
        client.sendall(data[::-1])

    t = threading.Thread(target=receive)
    t.start()
    conn.sendall(memoryview(data))
    reader = io.BufferedReader(tls.Reader(conn))
    back = bytearray(len(data))
    view = memoryview(back)
    got = 0
    while got < len(back):
        n = reader.readinto(view[got:])
        assert n
        got += n
    t.join(10)
    assert received == [data]
    assert hashlib.sha256(back).digest() == hashlib.sha256(data[::-1]).digest()
    assert conn.version() in ("TLSv1.2", "TLSv1.3")


def test_large_read_leaves_no_hold_on_the_readers_buffer(contexts):
    # The reader's buffer is a piece from the process's pool, which
    # releases the piece's view and madvises or closes its mmap after the
    # request: the connection must keep no view of it.
    conn, client = pair(contexts)
    data = os.urandom(2 * tls.BATCH + 777)
    sender = threading.Thread(target=client.sendall, args=(data,))
    sender.start()
    # Room to spare: every read is a large one.
    buf = mmap.mmap(-1, len(data) + tls.SMALL)
    view = memoryview(buf)
    got = 0
    while got < len(data):
        n = conn.recv_into(view[got:])
        assert n
        got += n
    sender.join(10)
    assert buf[:len(data)] == data
    view.release()
    buf.close()


def test_idle_drops_the_receive_buffer(contexts):
    # Between requests a connection keeps no receive buffer; the next
    # large read makes one again.
    conn, client = pair(contexts)
    if conn._native is not None:
        pytest.skip("OpenSSL frees its read buffer whenever it is empty")
    data = os.urandom(tls.BATCH + 1)
    for _ in range(2):
        sender = threading.Thread(target=client.sendall, args=(data,))
        sender.start()
        buf = bytearray(len(data))
        view = memoryview(buf)
        got = 0
        while got < len(data):
            n = conn.recv_into(view[got:])
            assert n
            got += n
        sender.join(10)
        assert buf == data
        assert conn._rbuf is not None
        conn.idle()
        assert conn._rbuf is None


def test_idle_drops_the_send_buffer(contexts):
    # A large send gathers records in a buffer of a batch; between
    # requests the connection keeps none.
    conn, client = pair(contexts)
    if conn._native is None:
        pytest.skip("The out BIO is read empty after every piece")
    data = os.urandom(tls.BATCH + 1)
    for _ in range(2):
        t = threading.Thread(target=conn.sendall, args=(data,))
        t.start()
        received = bytearray()
        while len(received) < len(data):
            received += client.recv(65536)
        t.join(10)
        assert received == data
        assert conn._native._buffered["write"]
        conn.idle()
        assert not conn._native._buffered["write"]


def test_send_survives_partial_sends(contexts):
    # A small socket buffer and a slow reader: sendmsg() takes part of a
    # batch's pieces at a time.
    conn, client = pair(contexts)
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    data = os.urandom(tls.BATCH + tls.HALF + 99)
    received = bytearray()

    def receive():
        while len(received) < len(data):
            chunk = client.recv(1000)
            if not chunk:
                break
            received.extend(chunk)

    t = threading.Thread(target=receive)
    t.start()
    conn.sendall(data)
    t.join(10)
    assert bytes(received) == data


def test_readline_then_body(contexts):
    conn, client = pair(contexts)
    client.sendall(b"GET / HTTP/1.1\r\n\r\nBODY")
    reader = io.BufferedReader(tls.Reader(conn))
    assert reader.readline() == b"GET / HTTP/1.1\r\n"
    assert reader.readline() == b"\r\n"
    assert reader.read(4) == b"BODY"


def test_recv_into_returns_every_record_received(contexts):
    conn, client = pair(contexts)
    # One TLS record per sendall.
    records = [bytes([i]) * 1000 for i in range(5)]
    for r in records:
        client.sendall(r)
    buf = bytearray(10000)
    # All of them in one call (OpenSSL gives one record per read), and
    # without waiting for more.
    assert conn.recv_into(buf) == 5000
    assert bytes(buf[:5000]) == b"".join(records)
    # At most len(buf): the rest stays for the next call.
    client.sendall(b"x" * 3000)
    assert conn.recv_into(memoryview(buf)[:1000]) == 1000
    assert conn.recv_into(buf) == 2000


def test_closed_socket_is_never_written(contexts):
    # OpenSSL's BIOs hold the fd's number, which a closed socket gives
    # back to the process: the next socket gets it.
    conn, client = pair(contexts)
    fd = conn.sock.fileno()
    conn.sock.close()
    c, d = socket.socketpair()
    try:
        c.settimeout(0)
        d.settimeout(0)
        with pytest.raises(OSError):
            conn.sendall(b"x" * 100)
        with pytest.raises(OSError):
            conn.recv_into(bytearray(100))
        if fd in (c.fileno(), d.fileno()):
            with pytest.raises(BlockingIOError):
                (d if c.fileno() == fd else c).recv(100)
    finally:
        c.close()
        d.close()


def test_blocking_socket_returns_what_came(contexts):
    # Without a timeout (the client's checksum request) a read returns
    # the records that came, without waiting for more that may never
    # come: small and large reads (through the read buffer).
    conn, client = pair(contexts)
    conn.sock.settimeout(None)
    result = []

    def read(size):
        buf = bytearray(size)
        n = conn.recv_into(buf)
        result.append(bytes(buf[:n]))

    for size in (1000, 10 * tls.BATCH):
        result.clear()
        client.sendall(b"x" * 100)
        client.sendall(b"y" * 200)
        t = threading.Thread(target=read, args=(size,), daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive()
        data = result[0]
        # One record at least; the other may still be on its way.
        assert data in (b"x" * 100, b"x" * 100 + b"y" * 200)
        if len(data) == 100:
            buf = bytearray(1000)
            assert conn.recv_into(buf) == 200


@pytest.mark.parametrize("clean", [True, False], ids=["close_notify", "eof"])
def test_end_of_stream(contexts, clean):
    conn, client = pair(contexts)
    client.sendall(b"last")
    closer = None
    if clean:
        # unwrap() sends close_notify, then waits for ours, which never
        # comes: run it aside.
        client.settimeout(2)
        closer = threading.Thread(target=lambda: _quietly(client.unwrap))
        closer.start()
    else:
        # FIN without close_notify (a truncation, as many clients do).
        client.shutdown(socket.SHUT_WR)
    buf = bytearray(100)
    assert conn.recv_into(buf) == 4
    assert conn.recv_into(buf) == 0
    assert conn.recv_into(buf) == 0
    if closer:
        closer.join(10)


def _quietly(fn):
    try:
        fn()
    except (OSError, ssl.SSLError):
        pass


def test_client_leaves_during_handshake(contexts):
    srv_ctx, _ = contexts
    a, b = socket.socketpair()
    a.settimeout(10)
    b.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    b.close()
    conn = tls.Connection(a, srv_ctx)
    with pytest.raises((ConnectionError, ssl.SSLError)):
        conn.handshake()


def test_plain_http_is_refused(contexts):
    srv_ctx, _ = contexts
    a, b = socket.socketpair()
    a.settimeout(10)
    b.sendall(b"GET / HTTP/1.1\r\n\r\n")
    conn = tls.Connection(a, srv_ctx)
    with pytest.raises(ssl.SSLError):
        conn.handshake()


def test_release_frees_tls_state_held_in_a_cycle(contexts):
    # The server's handler, its reader and writer and the connection
    # refer to each other. Without release(), OpenSSL's object and its
    # BIO buffers live until the garbage collector runs, which big C
    # buffers never trigger.
    import gc
    import weakref

    server_ctx = contexts[0]
    a, b = socket.socketpair()
    gc.disable()
    try:
        def cycle(release):
            conn = tls.Connection(a, server_ctx)
            holder = {"conn": conn}
            conn.sock = holder          # conn -> holder -> conn
            tls_object = weakref.ref(conn._tls)
            if release:
                conn.release()
            del conn, holder
            return tls_object

        assert cycle(release=False)() is not None
        assert cycle(release=True)() is None
    finally:
        gc.enable()
        gc.collect()
        a.close()
        b.close()
