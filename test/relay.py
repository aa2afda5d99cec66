"""
A TCP relay on loopback that cuts connections: a flaky network between a
client and a real daemon, for the client's retries.

Relay(port, cut_after, cuts) listens on 127.0.0.1 and forwards every
connection to 127.0.0.1:port. Each of the first `cuts` connections (None:
every connection) is cut, both ways at once, once cut_after bytes went
through it in either direction; the others are relayed as they are.
`cut` counts the connections cut, `connections` those accepted.

budget (None: no limit) is how many bytes may go through the relay in
all, both ways; past it the relay holds them until set_budget() gives
more (a stalled network, deterministic). heal() stops the cutting,
cut_all() cuts every connection from now on, those open included.
`moved` counts the bytes relayed, both ways.
"""

import socket
import struct
import threading

BUFFER = 64 * 1024


class Relay:

    def __init__(self, port, cut_after=None, cuts=None, budget=None):
        self._target = ("127.0.0.1", port)
        self._cut_after = cut_after
        self._cuts = cuts
        self._lock = threading.Lock()
        self._budget = budget
        self._budget_cond = threading.Condition(self._lock)
        self._closed = False
        self._conns = []
        self.moved = 0
        self.connections = 0
        self.cut = 0
        self._socks = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, daemon=True,
                                        name="relay")
        self._thread.start()

    def url(self, ticket_id):
        return f"https://localhost:{self.port}/images/{ticket_id}"

    def set_budget(self, budget):
        with self._budget_cond:
            self._budget = budget
            self._budget_cond.notify_all()

    def heal(self):
        with self._lock:
            self._cut_after = None

    def cut_all(self, after):
        """Cut the open connections, and every new one after bytes."""
        with self._lock:
            self._cut_after = after
            self._cuts = None
            conns = list(self._conns)
        for conn in conns:
            conn._cut_both()

    def _spend(self, n):
        """Wait until n more bytes may go to the server."""
        with self._budget_cond:
            while (self._budget is not None and self._budget < n
                   and not self._closed):
                self._budget_cond.wait()
            if self._budget is not None:
                self._budget -= n
            self.moved += n

    def close(self):
        with self._budget_cond:
            self._closed = True
            self._budget_cond.notify_all()
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        self._thread.join(10)
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            _shut(s)
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self.connections += 1
                cutting = self._cut_after is not None and (
                    self._cuts is None or self.connections <= self._cuts)
                self._socks += [client, server]
            conn = _Connection(self, client, server,
                               self._cut_after if cutting else None)
            with self._lock:
                self._conns.append(conn)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=conn.pump, args=(a, b),
                                 daemon=True, name="relay-pump").start()

    def _was_cut(self):
        with self._lock:
            self.cut += 1


class _Connection:

    def __init__(self, relay, client, server, limit):
        self._relay = relay
        self._client = client
        self._server = server
        self._limit = limit
        self._lock = threading.Lock()
        self._moved = 0
        self._cut = False

    def pump(self, src, dst):
        try:
            while True:
                data = src.recv(BUFFER)
                if not data:
                    break
                self._relay._spend(len(data))
                if self._limit is not None:
                    with self._lock:
                        room = self._limit - self._moved
                        self._moved += len(data)
                    if room <= len(data):
                        if room > 0:
                            dst.sendall(data[:room])
                        self._cut_both()
                        return
                dst.sendall(data)
        except OSError:
            pass
        # One side closed: pass the close on.
        _shut(dst, socket.SHUT_WR)

    def _cut_both(self):
        with self._lock:
            if self._cut:
                return
            self._cut = True
        self._relay._was_cut()
        # A reset, as a network failure looks: a socket only shut down
        # would still take the peer's bytes into its buffer, and a
        # sender would block until its timeout once it is full.
        for s in (self._client, self._server):
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                             struct.pack("ii", 1, 0))
            except OSError:
                pass
            _shut(s)
            s.close()


def _shut(sock, how=socket.SHUT_RDWR):
    try:
        sock.shutdown(how)
    except OSError:
        pass
