"""
TLS for one connection: the daemon's connections (server side) and the
client library's and proxy's connections to a daemon (client side).

ssl.SSLSocket lets OpenSSL do the socket I/O one TLS record (at most 16
KiB) at a time: a send() per record, and two read()s per record (header,
then body; Python does not enable read-ahead): hundreds of thousands of
system calls over an image, each also pushing a segment through TCP.

Here the handshake runs through memory BIOs (ssl.SSLObject), so the
socket stays a plain socket: timeouts, deadlines, TCP_NODELAY and
shutdown apply to it as to any other connection. Then, when it can
(_openssl.py: the libssl the _ssl module runs on, and an SSL object
proved by its own BIOs), OpenSSL gets socket BIOs and does the I/O
itself: a large send is one SSL_write_ex() of the whole piece with the
GIL released, its records gathered in a buffer BIO of BATCH bytes and
sent in one write() per batch; a large read fills a buffer BIO with one
read() per batch, from which OpenSSL takes its records (OpenSSL 3.0's
own read-ahead is worse: it memmoves the rest of its buffer for every
record). Small messages go straight, and an idle connection keeps no
buffer. Waits go through the socket: poll() to write, a peek through the
caller's recv_into (the server handler's deadlines and cancel) to read.
Where that cannot be had, the memory BIOs stay, and we move ciphertext
between them and the socket in batches (two more passes over it:
MemoryBIO.read() copies it out of OpenSSL's buffer, which OpenSSL zeroes
as it grows).

Measured (issue 13; shared/bench/compare --runs 3, A = the native path,
B = the memory BIOs, same run): daemon CPU 0.86 download-https, 0.89
upload-https, 0.91 curl-full, 0.95 parallel-https. What a GiB of
download-https costs the daemon now (perf, 2 cores; upstream's
SSLSocket daemon in brackets): AES-256-GCM 0.51 (0.49); memmove 0.21
(0.15: OpenSSL copies the plaintext into its record buffer, and we copy
records into the batch buffer; without that buffer one write() per
record measured more); kernel 0.67 (0.73), of which copying from the
NBD socket 0.18 and into TCP 0.12; Python 0.28 (0.15: request handling
and the NBD stream, not TLS). An upload: AES 0.52 (0.56), memmove 0.25
(0.19), kernel 0.89 (1.23), Python 0.34 (0.35). The floor of a user
space TLS daemon here, AES and the two kernel copies and OpenSSL's
copy, is about 0.9 CPU-s per GiB; upstream is at 1.7. Only kernel TLS
(not on the bench's kernel) would remove the record copies and let NBD
payloads be spliced to the client's socket as on the unix socket.
"""

import io
import ssl

# Bytes of ciphertext moved per send or recv. Large enough to amortize the
# system call and TCP overhead; small enough to stay in cache.
BATCH = 256 * 1024

# Plaintext encrypted at once. The out BIO's buffer grows to hold the
# ciphertext of one write (and a third more, as OpenSSL grows it) and
# never shrinks while the connection lives: a whole batch left ~300 KiB
# with every connection that had sent a large response, half of one ~150
# KiB. A batch's pieces go out in one sendmsg(). (32 KiB pieces cost 7-9%
# more CPU sending.)
HALF = BATCH // 2

# Let OpenSSL do the socket I/O when it can (see _openssl); False keeps
# the memory BIOs.
NATIVE = True

# Ciphertext received at once for a small read (the handshake, request
# heads, small bodies): two full TLS records. A read into a buffer at
# least this large (a request body's piece) receives a batch.
SMALL = 32 * 1024


class Connection:

    def __init__(self, sock, context, server_hostname=None):
        """
        Server side unless server_hostname is given; a client verifies the
        server's certificate against it (as the context says).
        """
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._in, self._out, server_side=server_hostname is None,
            server_hostname=server_hostname)
        self._eof = False
        # Ciphertext of large reads (request bodies) is received here,
        # made on the first one and dropped when the connection idles.
        self._rbuf = None
        # OpenSSL's own socket I/O once the handshake is done (writes)
        # and the in BIO is empty (reads); None if it cannot be had.
        self._native = None
        self._native_reads = False
        if NATIVE:
            self._start_native(sock)

    def _start_native(self, sock):
        # Imported here: ctypes stays out of a light import of the client
        # library.
        from . import _openssl
        lib = _openssl.load()
        if lib is not None:
            ptr = _openssl.ssl_pointer(lib, self._tls, self._in, self._out)
            if ptr is not None:
                _openssl.Native.prepare(lib, ptr)
                self._native = _openssl.Native(lib, ptr, self._tls._sslobj,
                                               sock, BATCH)

    def handshake(self):
        while True:
            try:
                self._tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionResetError(
                        "Peer closed the connection during the TLS "
                        "handshake")
            except ssl.SSLError:
                # OpenSSL wrote an alert (protocol_version to a TLS 1.0
                # client, say): send it, or the peer sees only EOF.
                try:
                    self._flush()
                except OSError:
                    pass
                raise
        # Session tickets and the end of the handshake.
        self._flush()
        if self._native is not None:
            self._native.start_writing()

    def version(self):
        return self._tls.version()

    def close_notify(self):
        """
        Send close_notify: the peer sees a clean end of stream (OpenSSL 3
        clients report a bare TCP FIN as "unexpected eof"). We do not wait
        for the peer's close_notify.
        """
        if self._native is not None:
            self._native.shutdown()
            return
        try:
            self._tls.unwrap()
        except (ssl.SSLWantReadError, ssl.SSLError):
            pass
        self._flush()

    def release(self):
        """
        Free the TLS state (OpenSSL's object and BIO buffers, up to a
        batch of ciphertext each) once the connection is done. The
        handler, its reader and writer and this object refer to each
        other; without this the memory waits for
        the garbage collector, which big C buffers do not trigger: 256
        closed connections kept 300 MiB.
        """
        if self._native is not None:
            self._native.close()
            self._native = None
        self._tls = self._in = self._out = self._rbuf = None
        self.sock = None

    def recv_into(self, buf):
        """
        Read decrypted bytes into buf; 0 at the end of the stream. Waits
        only if nothing was received yet; then returns as much as the
        received ciphertext holds, up to len(buf): OpenSSL gives one
        record (16 KiB) per read, and the callers above us (buffered
        reader, request body, the image handler's loop) would otherwise
        each run once per record.
        """
        if self._native is not None and self._native_read():
            view = memoryview(buf).cast("B")
            return self._native.read(view, len(view) >= SMALL)
        view = memoryview(buf).cast("B")
        want = len(view)
        while True:
            try:
                n = self._tls.read(want, view)
                break
            except ssl.SSLWantReadError:
                # OpenSSL may have something to say first (key updates).
                self._flush()
                if not self._fill(memoryview(buf).nbytes >= SMALL):
                    return 0
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # Closed, with or without close_notify: end of stream.
                return 0
        while n < want and self._in.pending:
            try:
                got = self._tls.read(want - n, view[n:])
            except ssl.SSLError:
                # The rest of a record is still on its way (or the stream
                # ended): the next call waits, or reports the end.
                break
            if not got:
                break
            n += got
        return n

    def _native_read(self):
        """True if OpenSSL reads the socket: from the first read that
        finds the in BIO empty (what came with the handshake is read
        from it first)."""
        if not self._native_reads and not self._eof and \
                not self._in.pending:
            self._native.start_reading()
            self._native_reads = True
        return self._native_reads

    def sendall(self, data):
        if self._native is not None:
            self._native.write(data, memoryview(data).nbytes >= SMALL)
            return
        view = memoryview(data).cast("B")
        for start in range(0, len(view), BATCH):
            batch = view[start:start + BATCH]
            pieces = []
            for pos in range(0, len(batch), HALF):
                self._tls.write(batch[pos:pos + HALF])
                pieces.append(self._out.read())
            _send_all(self.sock, pieces)

    def _flush(self):
        if self._out.pending:
            self.sock.sendall(self._out.read())

    def idle(self):
        """
        The connection waits for its next request: drop the receive
        buffer of large reads. A connection kept it while it lived: 256
        KiB, resident once zeroed, was most of what an idle connection
        cost.
        """
        self._rbuf = None
        if self._native is not None:
            self._native.idle()

    def _fill(self, large=False):
        """
        Read ciphertext from the socket into the in BIO; False at end of
        stream. A large read (a request body's piece) receives up to a
        batch, into the connection's receive buffer; others (the
        handshake, request heads) up to SMALL, into a buffer made for the
        read.
        """
        if self._eof:
            return False
        if not large:
            buf = memoryview(bytearray(SMALL))
        else:
            if self._rbuf is None:
                self._rbuf = memoryview(bytearray(BATCH))
            buf = self._rbuf
        n = self.sock.recv_into(buf)
        if n == 0:
            self._eof = True
            self._in.write_eof()
            return False
        self._in.write(buf[:n])
        return True


def _send_all(sock, pieces):
    """Send the pieces (bytes) in order, in as few sendmsg() as the
    socket takes."""
    while pieces:
        sent = sock.sendmsg(pieces)
        while pieces and sent >= len(pieces[0]):
            sent -= len(pieces[0])
            pieces.pop(0)
        if sent:
            pieces[0] = memoryview(pieces[0])[sent:]


class Reader(io.RawIOBase):
    """The connection's decrypted input, for io.BufferedReader."""

    def __init__(self, conn):
        self._conn = conn

    def readable(self):
        return True

    def readinto(self, buf):
        return self._conn.recv_into(buf)


class Writer(io.RawIOBase):
    """The connection's output: each write is sent whole before returning."""

    def __init__(self, conn):
        self._conn = conn

    def writable(self):
        return True

    def write(self, data):
        self._conn.sendall(data)
        return memoryview(data).nbytes


class Socket:
    """
    A connected TLS client socket with batched I/O, offering what
    http.client uses of a socket (sendall, makefile("rb")); everything
    else (timeouts, addresses, fileno, close) is the plain socket's.
    """

    def __init__(self, sock, context, server_hostname):
        self._sock = sock
        self._conn = Connection(sock, context, server_hostname)
        self._conn.handshake()

    def sendall(self, data):
        self._conn.sendall(data)

    def makefile(self, mode="rb", *args, **kwargs):
        if mode != "rb":
            raise ValueError(f"Unsupported mode {mode!r}")
        return io.BufferedReader(Reader(self._conn))

    def version(self):
        return self._conn.version()

    def __getattr__(self, name):
        return getattr(self._sock, name)
