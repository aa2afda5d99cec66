"""
A small read-only NBD server in this process, serving bytes that come
from a Python object: an export qemu can open as a "file" node and put
its format drivers on top of.

Why. qemu reads images only through its own block drivers. To let qemu
read an image it cannot open itself (an HTTP server without
Accept-Ranges, or one that wants headers qemu's curl driver cannot send),
something must present the bytes as a block device: this server does,
from any object with `read_into(buf, offset)`. It knows nothing of HTTP
(client/urlsource.py gives it a reader of ranged GETs).

State: server. A Server owns its listening unix socket, an accept thread,
one thread per connection reading requests, and a pool of worker threads
doing the reads, so the requests qemu keeps in flight on one connection
(up to 16) are served at once. Replies may leave in any order: simple
replies name their request by its handle. A reply is sent whole under the
connection's send lock.

Protocol (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/
proto.md): fixed newstyle handshake; NBD_OPT_EXPORT_NAME, NBD_OPT_INFO,
NBD_OPT_GO (with NBD_INFO_BLOCK_SIZE, so clients split reads at
max_block), NBD_OPT_LIST, NBD_OPT_ABORT; everything else, structured
replies and meta contexts included, is refused with NBD_REP_ERR_UNSUP, so
clients see an export without block status (all data). Commands: READ and
DISC; writes, trims and zeroes get EPERM (the export is read only),
unknown commands EINVAL. A reader error is an EIO reply, logged once per
connection; the connection goes on.

Waits: the handshake has a deadline (HANDSHAKE_TIMEOUT); later, a
connection waits for its client's next request without one, as a client
may stay idle while it works elsewhere, and close() ends every wait (it
shuts the sockets down, which wakes the threads blocked on them).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

from concurrent import futures

from . import url as nbd_url

log = logging.getLogger(__name__)

MiB = 1024**2

# Seconds a client may take to finish the handshake.
HANDSHAKE_TIMEOUT = 30

# Largest read served in one reply (NBD_INFO_BLOCK_SIZE maximum): each
# worker holds a buffer this big.
MAX_BLOCK = 4 * MiB

# Handshake.
NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3e889045565a9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_INFO = 6
OPT_GO = 7

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_UNKNOWN = (1 << 31) + 6

INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_CAN_MULTI_CONN = 1 << 8

# Transmission.
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2

MAX_OPTION_DATA = 64 * 1024

_REQUEST = struct.Struct("!IHHQQI")
_REPLY = struct.Struct("!IIQ")
_OPTION = struct.Struct("!QII")
_OPTION_REPLY = struct.Struct("!QIII")


class Server:
    """
    Serves reader (an object with read_into(buf, offset), safe to call
    from several threads) as a read-only export of size bytes.

    Attributes: address (url.Address of the unix socket), size.
    """

    def __init__(self, reader, size, path, *, workers=4,
                 max_block=MAX_BLOCK, name="nbd-server"):
        self.size = size
        self.address = nbd_url.Address(socket=path)
        self._reader = reader
        self._max_block = max_block
        self._name = name
        self._lock = threading.Lock()
        self._conns = set()
        self._closed = False
        self._local = threading.local()
        self._pool = futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=f"{name}/read")
        self._workers = workers
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.bind(path)
            self._sock.listen(16)
        except BaseException:
            self._sock.close()
            self._pool.shutdown()
            raise
        self._thread = threading.Thread(
            target=self._accept, name=f"{name}/accept", daemon=True)
        self._thread.start()

    @property
    def url(self):
        """The export as an NBD URI (nbd+unix:///?socket=PATH)."""
        return f"nbd+unix:///?socket={self.address.socket}"

    def qemu_node(self):
        """The export as a qemu block node ("file" of a format driver)."""
        return {"driver": "nbd",
                "server": {"type": "unix", "path": self.address.socket}}

    def close(self):
        """Stop serving: end every connection and wait for the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns)
        _shutdown(self._sock)
        self._thread.join()
        self._sock.close()
        for conn in conns:
            _shutdown(conn.sock)
        for conn in conns:
            conn.thread.join()
        self._pool.shutdown(wait=True)
        try:
            os.unlink(self.address.socket)
        except FileNotFoundError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _accept(self):
        while True:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                # close() shut the socket down.
                return
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                conn = _Connection(self, sock)
                self._conns.add(conn)
            conn.thread.start()

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)

    def _buffer(self):
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(self._max_block)
        return buf


class _Connection:

    def __init__(self, server, sock):
        self.server = server
        self.sock = sock
        self.thread = threading.Thread(
            target=self._run, name=f"{server._name}/conn", daemon=True)
        self._send_lock = threading.Lock()
        # Bounds the requests read ahead of the workers (memory).
        self._slots = threading.BoundedSemaphore(2 * server._workers)
        self._pending = set()
        self._pending_lock = threading.Lock()
        self._failed = False

    def _run(self):
        try:
            self.sock.settimeout(HANDSHAKE_TIMEOUT)
            if self._handshake():
                self.sock.settimeout(None)
                self._transmission()
        except (OSError, EOFError, _ProtocolError) as e:
            log.debug("NBD connection ended: %s", e)
        finally:
            self._wait_pending()
            self.sock.close()
            self.server._forget(self)

    # Handshake.

    def _handshake(self):
        """True if the client entered transmission."""
        self._send(struct.pack("!QQH", NBDMAGIC, IHAVEOPT,
                               FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        (client_flags,) = struct.unpack("!I", self._recv(4))
        if not client_flags & FLAG_FIXED_NEWSTYLE:
            raise _ProtocolError("Client does not support fixed newstyle")
        self._no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        while True:
            magic, option, length = _OPTION.unpack(self._recv(_OPTION.size))
            if magic != IHAVEOPT:
                raise _ProtocolError(f"Bad option magic {magic:#x}")
            if length > MAX_OPTION_DATA:
                raise _ProtocolError(f"Option data too long: {length}")
            data = self._recv(length)
            if option == OPT_EXPORT_NAME:
                reply = struct.pack("!QH", self.server.size, self._flags())
                if not self._no_zeroes:
                    reply += bytes(124)
                self._send(reply)
                return True
            if option == OPT_ABORT:
                self._option_reply(option, REP_ACK)
                return False
            if option == OPT_LIST:
                self._option_reply(option, REP_SERVER,
                                   struct.pack("!I", 0))
                self._option_reply(option, REP_ACK)
            elif option in (OPT_INFO, OPT_GO):
                if self._info(option, data) and option == OPT_GO:
                    return True
            else:
                self._option_reply(option, REP_ERR_UNSUP)

    def _info(self, option, data):
        """Answer NBD_OPT_INFO or NBD_OPT_GO; True if accepted."""
        if len(data) < 6:
            self._option_reply(option, REP_ERR_INVALID)
            return False
        (name_len,) = struct.unpack_from("!I", data)
        if len(data) < 6 + name_len:
            self._option_reply(option, REP_ERR_INVALID)
            return False
        (count,) = struct.unpack_from("!H", data, 4 + name_len)
        if len(data) != 6 + name_len + 2 * count:
            self._option_reply(option, REP_ERR_INVALID)
            return False
        if name_len != 0:
            # One export, the default one.
            self._option_reply(option, REP_ERR_UNKNOWN)
            return False
        self._option_reply(option, REP_INFO, struct.pack(
            "!HQH", INFO_EXPORT, self.server.size, self._flags()))
        self._option_reply(option, REP_INFO, struct.pack(
            "!HIII", INFO_BLOCK_SIZE, 1, 64 * 1024, self.server._max_block))
        self._option_reply(option, REP_ACK)
        return True

    def _flags(self):
        return FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_CAN_MULTI_CONN

    def _option_reply(self, option, reply, data=b""):
        self._send(_OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, reply,
                                      len(data)) + data)

    # Transmission.

    def _transmission(self):
        while True:
            magic, _flags, cmd, handle, offset, length = _REQUEST.unpack(
                self._recv(_REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise _ProtocolError(f"Bad request magic {magic:#x}")
            if cmd == CMD_DISC:
                return
            if cmd == CMD_WRITE:
                # Read the payload to stay in sync, then refuse it.
                self._discard(length)
                self._reply(handle, errno.EPERM)
            elif cmd != CMD_READ:
                self._reply(handle, errno.EPERM if cmd in (3, 4, 6)
                            else errno.EINVAL)
            elif (length > self.server._max_block
                  or offset + length > self.server.size):
                self._reply(handle, errno.EINVAL)
            else:
                self._slots.acquire()
                try:
                    f = self.server._pool.submit(self._read, handle,
                                                 offset, length)
                except BaseException:
                    self._slots.release()
                    raise
                with self._pending_lock:
                    self._pending.add(f)
                f.add_done_callback(self._done)

    def _read(self, handle, offset, length):
        try:
            buf = self.server._buffer()
            with memoryview(buf)[:length] as view:
                try:
                    self.server._reader.read_into(view, offset)
                except Exception as e:
                    if not self._failed:
                        self._failed = True
                        log.error("Cannot read %d bytes at offset %d: %s",
                                  length, offset, e)
                    self._reply(handle, errno.EIO)
                    return
                self._reply(handle, 0, view)
        except OSError as e:
            # The client went away; the connection thread sees it too.
            log.debug("Cannot send reply: %s", e)
        finally:
            self._slots.release()

    def _done(self, f):
        with self._pending_lock:
            self._pending.discard(f)

    def _wait_pending(self):
        with self._pending_lock:
            pending = list(self._pending)
        futures.wait(pending)

    def _reply(self, handle, error, data=None):
        header = _REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        with self._send_lock:
            self.sock.sendall(header)
            if data is not None:
                self.sock.sendall(data)

    def _send(self, data):
        self.sock.sendall(data)

    def _recv(self, length):
        buf = bytearray(length)
        view = memoryview(buf)
        pos = 0
        while pos < length:
            n = self.sock.recv_into(view[pos:])
            if n == 0:
                raise EOFError("Client closed the connection")
            pos += n
        return bytes(buf)

    def _discard(self, length):
        while length:
            chunk = self._recv(min(length, MiB))
            length -= len(chunk)


class _ProtocolError(Exception):
    pass


def _shutdown(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def serve(reader, size, path, **options):
    """Start a Server of reader on the unix socket path (see Server)."""
    return Server(reader, size, path, **options)
