"""
OpenSSL's socket I/O for an ssl.SSLObject, through ctypes: see tls.py.

Python's SSLObject encrypts into a memory BIO; once its handshake is done
we give its SSL a socket BIO for reading (with read-ahead into a large
buffer, so one read() brings many records) and one under a buffer BIO
for writing (records are gathered and sent in batches), and call
SSL_read_ex/SSL_write_ex ourselves: ctypes releases the GIL for the
call, and a whole piece is encrypted and sent in one call.

Everything here is checked before use: the library must be the libssl
the _ssl module runs on (the same version, mapped once in this process),
and the SSL pointer found in the _ssl object must have the object's own
memory BIOs. If anything does not match, load() returns None and the
caller keeps the memory BIO path.
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
BIO_CTRL_FLUSH = 11
BIO_C_SET_BUFF_SIZE = 117
BIO_FLAGS_SHOULD_RETRY = 0x08

# ERR_GET_LIB / ERR_GET_REASON of OpenSSL 3.
ERR_LIB_SSL = 20
SSL_R_UNEXPECTED_EOF_WHILE_READING = 294

P = ctypes.c_void_p


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
        "SSL_set_read_ahead": ([P, ctypes.c_int], None),
        "SSL_set_default_read_buffer_len": ([P, ctypes.c_size_t], None),
        "SSL_has_pending": ([P], ctypes.c_int),
        "SSL_read_ex": ([P, P, ctypes.c_size_t,
                         ctypes.POINTER(ctypes.c_size_t)], ctypes.c_int),
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
    obj = sslobj._sslobj
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


class Error(Exception):
    pass


class Native:
    """
    Socket I/O of one SSL, after its handshake. The object owning the
    SSL (the SSLObject) must live as long as this one.
    """

    def __init__(self, lib, ptr, sock, batch):
        self._lib = lib
        self._ssl = ptr
        self._sock = sock
        self._batch = batch
        self._fd = sock.fileno()
        self._rsock = None
        self._wsock = None
        self._buffered = False
        self._n = ctypes.c_size_t()
        self._peek = bytearray(1)

    @staticmethod
    def prepare(lib, ptr, read_buffer):
        """Before the handshake: read ahead into a large buffer, freed
        whenever it is empty."""
        lib.SSL_set_default_read_buffer_len(ptr, read_buffer)
        lib.SSL_set_read_ahead(ptr, 1)
        lib.SSL_ctrl(ptr, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)

    def start_writing(self):
        """Write to the socket from now on (the memory BIO is empty)."""
        self._wsock = self._socket_bio()
        self._lib.BIO_up_ref(self._wsock)
        self._lib.SSL_set0_wbio(self._ssl, self._wsock)

    def start_reading(self):
        """Read from the socket from now on (the memory BIO is empty)."""
        self._rsock = self._socket_bio()
        self._lib.SSL_set0_rbio(self._ssl, self._rsock)

    def _socket_bio(self):
        bio = self._lib.BIO_new_socket(self._fd, BIO_NOCLOSE)
        if not bio:
            raise MemoryError("BIO_new_socket")
        return bio

    def _buffer(self, on):
        """
        Gather records in a buffer BIO of a batch while sending a large
        body; send them straight otherwise, so that an idle connection
        keeps no buffer.
        """
        if on == self._buffered:
            return
        lib = self._lib
        if on:
            buf = lib.BIO_new(lib.BIO_f_buffer())
            if not buf:
                raise MemoryError("BIO_new")
            if lib.BIO_ctrl(buf, BIO_C_SET_BUFF_SIZE, self._batch,
                            ctypes.byref(ctypes.c_int(1))) != 1:
                lib.BIO_free(buf)
                raise MemoryError("BIO_set_write_buffer_size")
            # The chain and SSL_set0_wbio's free of the bare BIO each
            # take one reference.
            lib.BIO_up_ref(self._wsock)
            lib.BIO_push(buf, self._wsock)
            lib.SSL_set0_wbio(self._ssl, buf)
        else:
            lib.BIO_up_ref(self._wsock)
            # Frees the buffer BIO and drops its reference to ours.
            lib.SSL_set0_wbio(self._ssl, self._wsock)
        self._buffered = on

    def write(self, data, large):
        with Buffer(data) as buf:
            if not buf.length:
                return
            if large:
                self._buffer(True)
            self._write(buf.address, buf.length)
        self._flush()

    def idle(self):
        if self._buffered:
            self._buffer(False)

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
        if not self._buffered:
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

    def read(self, address, length):
        """
        Read up to length bytes into address: as many as OpenSSL has
        already received, waiting (through the socket's recv_into, with
        its timeouts and deadlines) only for the first. 0 at end of
        stream.
        """
        lib = self._lib
        n = self._n
        got = 0
        while got < length:
            if (got == 0 and not lib.SSL_has_pending(self._ssl)
                    and self._sock.gettimeout() is None):
                # A blocking socket: OpenSSL's read() would not keep the
                # caller's deadline; wait through the socket first.
                if not self._wait_readable():
                    return 0
            ctypes.set_errno(0)
            ret = lib.SSL_read_ex(self._ssl, address + got, length - got,
                                  ctypes.byref(n))
            if ret == 1:
                got += n.value
                continue
            code = ctypes.get_errno()
            err = lib.SSL_get_error(self._ssl, ret)
            if err == SSL_ERROR_WANT_READ:
                lib.ERR_clear_error()
                if got:
                    return got
                if not self._wait_readable():
                    return 0
            elif err == SSL_ERROR_WANT_WRITE:
                # A reply of OpenSSL's (a key update) waits for the socket.
                lib.ERR_clear_error()
                self._wait_socket(select.POLLOUT)
            elif got:
                # The end (or the error) is reported by the next call.
                lib.ERR_clear_error()
                return got
            else:
                return self._read_error(err, code)
        return got

    def shutdown(self):
        """Send close_notify, not waiting for the peer's."""
        self._lib.SSL_shutdown(self._ssl)
        self._lib.ERR_clear_error()
        try:
            self._flush()
        finally:
            self._buffer(False)

    def _read_error(self, err, code):
        lib = self._lib
        if err == SSL_ERROR_ZERO_RETURN:
            lib.ERR_clear_error()
            return 0
        if err == SSL_ERROR_SYSCALL:
            lib.ERR_clear_error()
            if code == 0:
                return 0
            raise OSError(code, os.strerror(code))
        e = lib.ERR_get_error()
        if ((e >> 23) & 0xff) == ERR_LIB_SSL and \
                (e & 0x7fffff) == SSL_R_UNEXPECTED_EOF_WHILE_READING:
            lib.ERR_clear_error()
            return 0
        raise self._ssl_error(e)

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
