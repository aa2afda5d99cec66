"""
OpenSSL's socket I/O for an ssl.SSLObject, through ctypes: see tls.py.

Python's SSLObject encrypts into memory BIOs; once its handshake is done
we give its SSL socket BIOs, under a buffer BIO of a batch while a large
body moves (one read() brings many records, one write() sends many), and
call SSL_write_ex ourselves: ctypes releases the GIL, and a whole piece
is encrypted and sent in one call. Records are read with the _ssl
object's read(), cheaper per call than ctypes.

Everything here is checked before use: the library must be the libssl
the _ssl module runs on (the same version, mapped once in this process),
and the SSL pointer found in the _ssl object must have the object's own
memory BIOs. If anything does not match, load() or ssl_pointer() returns
None and the caller keeps the memory BIO path.
"""

import ctypes
import errno
import logging
import os
import select
import socket
import ssl

log = logging.getLogger("tls")

SSL_ERROR_SSL = 1
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_SYSCALL = 5
SSL_ERROR_ZERO_RETURN = 6

SSL_CTRL_MODE = 33
SSL_MODE_RELEASE_BUFFERS = 0x10

BIO_NOCLOSE = 0
BIO_CTRL_PENDING = 10
BIO_CTRL_FLUSH = 11
BIO_C_SET_BUFF_SIZE = 117
BIO_FLAGS_SHOULD_RETRY = 0x08


P = ctypes.c_void_p

READ, WRITE = "read", "write"


class _Py_buffer(ctypes.Structure):
    _fields_ = [
        ("buf", P), ("obj", P), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int), ("format", P), ("shape", P),
        ("strides", P), ("suboffsets", P), ("internal", P),
    ]


PyBUF_WRITABLE = 0x1

_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_Py_buffer),
                        ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_Py_buffer)]
_release_buffer.restype = None


class Buffer:
    """The address of a contiguous buffer's bytes, held while in use."""

    def __init__(self, obj, writable=False):
        self._view = _Py_buffer()
        _get_buffer(obj, ctypes.byref(self._view),
                    PyBUF_WRITABLE if writable else 0)
        self.address = self._view.buf
        self.length = self._view.len

    def __enter__(self):
        return self

    def __exit__(self, *args):
        _release_buffer(ctypes.byref(self._view))


def _signatures(lib):
    sigs = {
        "OpenSSL_version_num": ([], ctypes.c_ulong),
        "SSL_get_rbio": ([P], P),
        "SSL_get_wbio": ([P], P),
        "SSL_set0_rbio": ([P, P], None),
        "SSL_set0_wbio": ([P, P], None),
        "SSL_ctrl": ([P, ctypes.c_int, ctypes.c_long, P], ctypes.c_long),
        "SSL_has_pending": ([P], ctypes.c_int),
        "SSL_write_ex": ([P, P, ctypes.c_size_t,
                          ctypes.POINTER(ctypes.c_size_t)], ctypes.c_int),
        "SSL_shutdown": ([P], ctypes.c_int),
        "SSL_get_error": ([P, ctypes.c_int], ctypes.c_int),
        "ERR_get_error": ([], ctypes.c_ulong),
        "ERR_clear_error": ([], None),
        "ERR_error_string_n": ([ctypes.c_ulong, ctypes.c_char_p,
                                ctypes.c_size_t], None),
        "BIO_new_socket": ([ctypes.c_int, ctypes.c_int], P),
        "BIO_f_buffer": ([], P),
        "BIO_new": ([P], P),
        "BIO_push": ([P, P], P),
        "BIO_up_ref": ([P], ctypes.c_int),
        "BIO_free": ([P], ctypes.c_int),
        "BIO_ctrl": ([P, ctypes.c_int, ctypes.c_long, P], ctypes.c_long),
        "BIO_test_flags": ([P, ctypes.c_int], ctypes.c_int),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res


def _libssl_path():
    """The one libssl mapped into this process (by the _ssl module)."""
    paths = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and os.path.basename(
                    fields[5]).startswith("libssl.so"):
                paths.add(fields[5])
    if len(paths) != 1:
        return None
    return paths.pop()


_lib = False


def load():
    """The libssl bindings, or None if they cannot be trusted."""
    global _lib
    if _lib is False:
        _lib = _load()
    return _lib


def _load():
    try:
        path = _libssl_path()
        if path is None:
            return None
        lib = ctypes.CDLL(path, use_errno=True)
        _signatures(lib)
        if lib.OpenSSL_version_num() != ssl.OPENSSL_VERSION_NUMBER:
            return None
        return lib
    except (OSError, AttributeError) as e:
        log.debug("No native TLS I/O: %s", e)
        return None


def ssl_pointer(lib, sslobj, inbio, outbio):
    """
    The SSL* of an ssl.SSLObject, or None. _ssl._SSLSocket starts with
    PyObject_HEAD, the weak reference to its socket (NULL for memory
    BIOs), then SSL *ssl; _ssl.MemoryBIO with PyObject_HEAD then BIO *bio.
    Proved by the SSL's BIOs being the object's memory BIOs.
    """
    obj = getattr(sslobj, "_sslobj", None)
    if type(obj).__name__ != "_SSLSocket" or \
            type(inbio) is not ssl.MemoryBIO or \
            type(outbio) is not ssl.MemoryBIO:
        return None
    head = object.__basicsize__
    word = ctypes.sizeof(P)
    if (type(obj).__basicsize__ < head + 2 * word
            or type(inbio).__basicsize__ < head + word
            or type(outbio).__basicsize__ < head + word):
        return None
    if P.from_address(id(obj) + head).value is not None:
        return None
    ptr = P.from_address(id(obj) + head + word).value
    rbio = P.from_address(id(inbio) + head).value
    wbio = P.from_address(id(outbio) + head).value
    if not ptr or not rbio or not wbio or rbio == wbio:
        return None
    if lib.SSL_get_rbio(ptr) != rbio or lib.SSL_get_wbio(ptr) != wbio:
        return None
    return ptr


class Native:
    """
    Socket I/O of one SSL, after its handshake. The object owning the
    SSL (the SSLObject) must live as long as this one.
    """

    def __init__(self, lib, ptr, sslobj, sock, batch):
        self._lib = lib
        self._ssl = ptr
        self._sslobj = sslobj
        self._sock = sock
        self._batch = batch
        self._fd = sock.fileno()
        # Our references to the socket BIOs; OpenSSL's object holds its
        # own, directly or under a buffer BIO.
        self._bio = {READ: None, WRITE: None}
        self._buffered = {READ: False, WRITE: False}
        self._n = ctypes.c_size_t()
        self._peek = bytearray(1)

    @staticmethod
    def prepare(lib, ptr):
        """Before the handshake: OpenSSL's own record buffers are freed
        whenever they are empty (an idle connection keeps none)."""
        lib.SSL_ctrl(ptr, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)

    def start_writing(self):
        """Write to the socket from now on (the memory BIO is empty)."""
        self._start(WRITE)

    def start_reading(self):
        """Read from the socket from now on (the memory BIO is empty)."""
        self._start(READ)

    def _start(self, way):
        bio = self._lib.BIO_new_socket(self._fd, BIO_NOCLOSE)
        if not bio:
            raise MemoryError("BIO_new_socket")
        self._lib.BIO_up_ref(bio)
        self._bio[way] = bio
        self._set0(way, bio)

    def _set0(self, way, bio):
        if way == READ:
            self._lib.SSL_set0_rbio(self._ssl, bio)
        else:
            self._lib.SSL_set0_wbio(self._ssl, bio)

    def close(self):
        """Drop our references (OpenSSL's object frees its own)."""
        for way, bio in self._bio.items():
            if bio:
                self._lib.BIO_free(bio)
                self._bio[way] = None

    def _buffer(self, way, on):
        """
        Move the ciphertext of a large body through a buffer BIO of a
        batch: one read() brings many records, one write() sends many.
        Without it (small messages, an idle connection) no buffer is
        kept.
        """
        if on == self._buffered[way]:
            return
        lib = self._lib
        bio = self._bio[way]
        if on:
            buf = lib.BIO_new(lib.BIO_f_buffer())
            if not buf:
                raise MemoryError("BIO_new")
            which = ctypes.c_int(0 if way == READ else 1)
            if lib.BIO_ctrl(buf, BIO_C_SET_BUFF_SIZE, self._batch,
                            ctypes.byref(which)) != 1:
                lib.BIO_free(buf)
                raise MemoryError("BIO_C_SET_BUFF_SIZE")
            # The chain and SSL_set0_*bio's free of the bare BIO each
            # take one reference.
            lib.BIO_up_ref(bio)
            lib.BIO_push(buf, bio)
            self._set0(way, buf)
        else:
            lib.BIO_up_ref(bio)
            # Frees the buffer BIO and its reference to ours.
            self._set0(way, bio)
        self._buffered[way] = on

    def _check_open(self):
        """Our BIOs hold the fd's number: once the socket is closed it
        may name another file."""
        if self._sock.fileno() != self._fd:
            raise OSError(errno.EBADF, "Bad file descriptor")

    def write(self, data, large):
        self._check_open()
        with Buffer(data) as buf:
            if not buf.length:
                return
            if large:
                self._buffer(WRITE, True)
            self._write(buf.address, buf.length)
        self._flush()

    def idle(self):
        """Drop the buffers of large bodies; received ciphertext not yet
        read (a pipelined request) keeps the read one."""
        self._flush()
        self._buffer(WRITE, False)
        if self._buffered[READ] and not self._pending():
            self._buffer(READ, False)

    def _received(self):
        """Ciphertext received and not yet read (in OpenSSL's record
        buffer or in the read buffer BIO)."""
        return self._lib.SSL_has_pending(self._ssl) or self._pending()

    def _pending(self):
        """Ciphertext in the read buffer BIO."""
        rbio = self._lib.SSL_get_rbio(self._ssl)
        return self._lib.BIO_ctrl(rbio, BIO_CTRL_PENDING, 0, None) > 0

    def _write(self, address, length):
        lib = self._lib
        n = self._n
        while True:
            ctypes.set_errno(0)
            ret = lib.SSL_write_ex(self._ssl, address, length,
                                   ctypes.byref(n))
            if ret == 1:
                return
            self._wait(ret, ctypes.get_errno())

    def _flush(self):
        if not self._buffered[WRITE]:
            return
        lib = self._lib
        wbio = lib.SSL_get_wbio(self._ssl)
        while True:
            ctypes.set_errno(0)
            if lib.BIO_ctrl(wbio, BIO_CTRL_FLUSH, 0, None) == 1:
                return
            code = ctypes.get_errno()
            if not lib.BIO_test_flags(wbio, BIO_FLAGS_SHOULD_RETRY):
                raise self._oserror(code)
            self._wait_socket(select.POLLOUT)

    def read(self, view, large):
        """
        Read up to len(view) bytes into the byte view: as many as
        OpenSSL has already received, waiting (through the socket's
        recv_into, with its timeouts and deadlines) only for the first.
        0 at end of stream.

        Records are read with the _ssl object's read(): a ctypes call
        costs more, and this runs once per record (16 KiB).
        """
        self._check_open()
        if large:
            self._buffer(READ, True)
        read = self._sslobj.read
        length = len(view)
        got = 0
        # A blocking socket: OpenSSL's read() would block, past the
        # caller's deadline for the first record, for ever for one that
        # may never come: wait through the socket first, and read no
        # more than OpenSSL has.
        blocking = self._sock.gettimeout() is None
        if blocking and not self._received():
            if not self._wait_readable():
                return 0
        while got < length:
            if got and blocking and not self._received():
                return got
            try:
                n = read(length - got, view[got:])
            except ssl.SSLWantReadError:
                if got:
                    return got
                if not self._wait_readable():
                    return 0
                continue
            except ssl.SSLWantWriteError:
                # A reply of OpenSSL's (a key update) waits for the socket.
                self._wait_socket(select.POLLOUT)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # Closed, with or without close_notify: end of stream
                # (reported by the next call if this one read some).
                return got
            except ssl.SSLSyscallError:
                # The socket failed; _ssl keeps no errno without a socket.
                if got:
                    return got
                raise ConnectionResetError(
                    errno.ECONNRESET, "Connection reset by peer") from None
            if n == 0:
                return got
            got += n
        return got

    def shutdown(self):
        """Send close_notify, not waiting for the peer's."""
        self._check_open()
        self._lib.SSL_shutdown(self._ssl)
        self._lib.ERR_clear_error()
        try:
            self._flush()
        finally:
            self._buffer(WRITE, False)

    def _wait(self, ret, code):
        """Wait as OpenSSL asks after a failed write; raise on errors."""
        lib = self._lib
        err = lib.SSL_get_error(self._ssl, ret)
        if err == SSL_ERROR_WANT_WRITE:
            lib.ERR_clear_error()
            self._wait_socket(select.POLLOUT)
        elif err == SSL_ERROR_WANT_READ:
            lib.ERR_clear_error()
            if not self._wait_readable():
                raise ConnectionResetError(
                    errno.ECONNRESET, "Connection closed by peer")
        elif err == SSL_ERROR_SYSCALL:
            raise self._oserror(code)
        elif err == SSL_ERROR_ZERO_RETURN:
            lib.ERR_clear_error()
            raise ConnectionResetError(
                errno.ECONNRESET, "Connection closed by peer")
        else:
            raise self._ssl_error(lib.ERR_get_error())

    def _oserror(self, code):
        self._lib.ERR_clear_error()
        if code == 0:
            code = errno.ECONNRESET
        return OSError(code, os.strerror(code))

    def _ssl_error(self, e):
        lib = self._lib
        buf = ctypes.create_string_buffer(256)
        lib.ERR_error_string_n(e, buf, len(buf))
        lib.ERR_clear_error()
        return ssl.SSLError(SSL_ERROR_SSL, buf.value.decode(errors="replace"))

    def _wait_readable(self):
        """Wait for bytes through the caller's socket (its timeouts and
        deadlines); False at end of stream."""
        return self._sock.recv_into(self._peek, 1, socket.MSG_PEEK) > 0

    def _wait_socket(self, event):
        timeout = self._sock.gettimeout()
        poller = select.poll()
        poller.register(self._fd, event)
        ms = None if timeout is None else int(timeout * 1000)
        if not poller.poll(ms):
            raise TimeoutError("timed out")
