"""
A fuzzer of raw requests against a live daemon (test/fuzz_test.py runs it).

It writes bytes, not requests: methods, paths, versions, headers, lengths
and bodies are generated, then mutated, truncated, pipelined several to a
connection, and on the HTTPS service sent through TLS records cut short.
Every answer must be a valid HTTP/1.1 response stream (parse_responses,
a strict parser of our own) ending in a clean close, never more responses
than requests (body bytes parsed as requests), no 5xx but the ones a
request may cause (an export that cannot start), and, for the requests
known to be well formed, the expected status and bytes.

Determinism: case (batch, index) of a seed is generated from its own
random.Random, so it is the same whatever ran before it or beside it.
A failure message names seed, batch and case; FUZZ_SEED=seed reruns them.

What the fuzzer may touch (Env): read-only tickets with known bytes, a
scratch write ticket whose content is not checked, and the model ticket,
which no fuzzed request targets: only smuggled requests (inside bodies)
name it, so any change to its image means the daemon parsed a body as a
request. Control requests use their own ticket ids (fz-ctl-N) and never
DELETE: DELETE /tickets/ removes every ticket.
"""

import dataclasses
import json
import os
import random
import re
import selectors
import socket
import ssl
import time

# Generators of known defects, name -> the defect: they find the defect
# every time, so they stay off until it is fixed; FUZZ_ENABLE=name,name
# (or "all") turns them on. None now: the hardening issue's defects are
# fixed and every generator runs in make check.
KNOWN_DEFECTS = {
}


# The byte each generator's smuggled writes put in the model image, to
# name the generator when one is found there.
SMUGGLERS = {
    "forbidden-put": 0xe1,
    "wrong-length": 0xe2,
    "bad-header-line": 0xe3,
    "duplicate-length": 0xe4,
    "put-past-image-end": 0xe5,
}


def smugglers(data, model):
    """Names of the generators whose bytes are in data but not model."""
    found = set()
    for i in range(len(data)):
        if data[i] != model[i]:
            found.add(data[i])
    return sorted(name for name, b in SMUGGLERS.items() if b in found)


def enabled(name):
    value = os.environ.get("FUZZ_ENABLE", "")
    names = {n.strip() for n in value.split(",")}
    return name not in KNOWN_DEFECTS or "all" in names or name in names


def remote_port(log):
    """The port of a daemon's remote service, from its log file."""
    import testutil

    def port():
        try:
            with open(log) as f:
                m = re.search(r"Serving remote on \('[^']*', (\d+)",
                              f.read())
        except FileNotFoundError:
            return None
        return m and int(m.group(1))
    return testutil.wait_for(port, message="remote service port")


# Responses

class ProtocolError(Exception):
    """The daemon's bytes are not a valid HTTP/1.1 response stream."""


@dataclasses.dataclass
class Response:
    status: int
    reason: bytes
    headers: dict
    body: bytes

    @property
    def close(self):
        return self.headers.get("connection", "").lower() == "close"


_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([1-5][0-9][0-9]) ([\x20-\x7e]*)")
_HEADER = re.compile(
    rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): ?([\x20-\x7e\x80-\xff]*)")
MAX_HEAD = 16 * 1024


def parse_responses(data, head_requests=()):
    """
    Parse a stream of responses: status line, headers (each name once),
    CRLF line ends, Content-Length on every final response and exactly
    that many body bytes (none for a response to HEAD: head_requests holds
    the indexes of final responses answering HEAD). 1xx interim responses
    carry no body. Nothing may follow a `connection: close` response.
    Returns the final responses; raises ProtocolError.
    """
    pos = 0
    finals = []
    while pos < len(data):
        if finals and finals[-1].close:
            raise ProtocolError(
                f"{len(data) - pos} bytes after connection: close")
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ProtocolError(f"truncated head: {data[pos:pos + 200]!r}")
        if end - pos > MAX_HEAD:
            raise ProtocolError(f"head of {end - pos} bytes")
        lines = data[pos:end].split(b"\r\n")
        m = _STATUS_LINE.fullmatch(lines[0])
        if not m:
            raise ProtocolError(f"bad status line {lines[0][:200]!r}")
        status = int(m.group(1))
        headers = {}
        for line in lines[1:]:
            h = _HEADER.fullmatch(line)
            if not h or b"\n" in line:
                raise ProtocolError(f"bad header line {line[:200]!r}")
            name = h.group(1).decode().lower()
            if name in headers:
                raise ProtocolError(f"header {name!r} twice")
            headers[name] = h.group(2).decode("latin-1")
        pos = end + 4
        if status < 200:
            if headers:
                raise ProtocolError(f"{status} with headers {headers}")
            continue
        value = headers.get("content-length")
        if value is None or not re.fullmatch(r"[0-9]{1,19}", value):
            raise ProtocolError(
                f"{status} with content-length {value!r}")
        length = 0 if len(finals) in head_requests else int(value)
        if pos + length > len(data):
            raise ProtocolError(
                f"{status}: body of {len(data) - pos} bytes, "
                f"content-length {length}")
        finals.append(Response(status, m.group(2), headers,
                               data[pos:pos + length]))
        pos += length
    return finals


# Exchanges

@dataclasses.dataclass
class Result:
    """What the daemon sent back, and how the connection ended."""
    data: bytes
    # eof, reset, timeout; through TLS also tls-close (close_notify) and
    # tls-eof (EOF inside or between records, or an alert)
    end: str


def exchange(address, data, family=socket.AF_UNIX, timeout=30.0):
    """
    Send data on a new plain connection, reading meanwhile (so a big
    response never blocks our send), then shut our side and read until
    the daemon closes. A deadline bounds it all.
    """
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(address)
        got, end = _pump(s, data, deadline)
    return Result(got, end)


def _pump(s, data, deadline):
    """Send data on s while receiving; return (received, how it ended)."""
    s.setblocking(False)
    out = memoryview(data)
    received = []
    end = "timeout"
    with selectors.DefaultSelector() as sel:
        sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = sel.select(min(left, 1.0))
            readable = any(ev & selectors.EVENT_READ for _, ev in events)
            writable = any(ev & selectors.EVENT_WRITE for _, ev in events)
            if readable:
                try:
                    chunk = s.recv(262144)
                except BlockingIOError:
                    chunk = None
                except ConnectionResetError:
                    end = "reset"
                    break
                if chunk == b"":
                    end = "eof"
                    break
                if chunk:
                    received.append(chunk)
            if writable and out is not None:
                try:
                    n = s.send(out[:262144])
                    out = out[n:]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    # The daemon closed first; read what it sent.
                    out = memoryview(b"")
                if not len(out):
                    out = None
                    try:
                        s.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    sel.modify(s, selectors.EVENT_READ)
    return b"".join(received), end


def tls_exchange(address, data, ca_file, mode="normal", cut=0,
                 timeout=30.0):
    """
    HTTPS through an SSLObject over a raw socket, so records can be cut:

        normal     handshake, data, shut the socket (no close_notify)
        record-cut handshake, the first `cut` bytes of the encrypted data
        hello-cut  the first `cut` bytes of the ClientHello only
        plaintext  data sent in clear to the TLS port
        garbage    handshake, then data sent as raw bytes, not records

    Returns a Result with the decrypted bytes.
    """
    deadline = time.monotonic() + timeout
    ctx = ssl.create_default_context(cafile=ca_file)
    incoming = ssl.MemoryBIO()
    outgoing = ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(address, timeout=timeout) as s:
        if mode == "plaintext":
            got, end = _pump(s, data, deadline)
            return Result(b"", end)
        if mode == "hello-cut":
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
            hello = outgoing.read()
            got, end = _pump(s, hello[:cut], deadline)
            return Result(b"", end)
        _handshake(s, obj, incoming, outgoing, deadline)
        if mode == "garbage":
            raw = data
        else:
            obj.write(data)
            raw = outgoing.read()
            if mode == "record-cut":
                raw = raw[:cut]
        got, end = _pump(s, raw, deadline)
    incoming.write(got)
    incoming.write_eof()
    plain = []
    while True:
        try:
            chunk = obj.read(262144)
        except ssl.SSLZeroReturnError:
            end = "tls-close"
            break
        except ssl.SSLWantReadError:
            break
        except ssl.SSLError:
            # EOF without close_notify, or an alert: the daemon closed.
            if end == "eof":
                end = "tls-eof"
            break
        if not chunk:
            break
        plain.append(chunk)
    return Result(b"".join(plain), end)


def _handshake(s, obj, incoming, outgoing, deadline):
    while True:
        try:
            obj.do_handshake()
            s.sendall(outgoing.read())
            return
        except ssl.SSLWantReadError:
            s.sendall(outgoing.read())
            s.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("EOF during TLS handshake")
            incoming.write(chunk)


# Requests

@dataclasses.dataclass
class Request:
    """
    One request's bytes. valid: well formed, its answer is known (status
    in expect, and check(response) passes). Invalid requests may leave the
    connection's framing unknown: nothing after them is checked but the
    stream's validity.
    """
    data: bytes
    valid: bool = False
    expect: frozenset = frozenset()
    check: object = None
    head: bool = False
    name: str = ""


@dataclasses.dataclass
class Case:
    """One connection: its service, its requests, how they are sent."""
    seed: str
    service: str
    requests: list
    data: bytes
    truncate: int = None
    tls_mode: str = "normal"
    tls_cut: int = 0
    # 5xx statuses this case may cause, with the message they carry.
    allow_5xx: tuple = ()

    def describe(self):
        names = ",".join(r.name for r in self.requests)
        return (f"case {self.seed} service={self.service} "
                f"requests=[{names}] tls={self.tls_mode} "
                f"truncate={self.truncate} data={self.data[:600]!r}")


@dataclasses.dataclass
class Ticket:
    id: str
    size: int
    data: bytes = None


@dataclasses.dataclass
class Env:
    """What the generator knows of the daemon under test."""
    readonly: list          # Tickets with their bytes
    scratch: Ticket         # written by fuzzed requests, never checked
    model: Ticket           # never targeted but by smuggled requests
    short: Ticket           # ticket size past its image's end (writable)
    ctl_ids: list           # ids control requests may add and change
    ctl_urls: list          # URLs for control-added tickets
    image_size: int


class Generator:
    """Cases for a seed; case(batch, index) is deterministic."""

    def __init__(self, env, seed):
        self.env = env
        self.seed = seed

    def case(self, batch, index):
        tag = f"{self.seed}:{batch}:{index}"
        rnd = random.Random(tag)
        service = rnd.choices(["local", "remote", "control"],
                              [4, 4, 2])[0]
        n = rnd.choices([1, 2, 3, 5], [5, 3, 2, 1])[0]
        requests = []
        allow_5xx = []
        for _ in range(n):
            prefix_valid = all(r.valid for r in requests)
            if service == "control":
                req = self._control(rnd, allow_5xx)
            else:
                req = self._data(rnd, service, prefix_valid)
                if req.name == "put-past-image-end":
                    # NBD refuses the write: the daemon's 500 says so.
                    allow_5xx.append((500, b""))
            requests.append(req)
        data = b"".join(r.data for r in requests)
        case = Case(tag, service, requests, data,
                    allow_5xx=tuple(allow_5xx))
        r = rnd.random()
        if r < 0.12:
            case.truncate = rnd.randrange(len(data) + 1)
        if service == "remote" and rnd.random() < 0.25:
            case.tls_mode = rnd.choice(
                ["record-cut", "hello-cut", "plaintext", "garbage"])
            case.tls_cut = rnd.randrange(1, len(data) + 200)
        if any(r.head for r in requests):
            # A HEAD cut short is no HEAD: its answer has a body. Whole,
            # so the parser knows which answers have none.
            case.truncate = None
            case.tls_mode = "normal"
        return case

    # Data services (/images on the unix socket and over HTTPS).

    def _data(self, rnd, service, prefix_valid):
        kinds = [
            (self._get_valid, 6), (self._head_valid, 1 if prefix_valid
                                   else 0),
            (self._options_valid, 2), (self._extents_valid, 1),
            (self._checksum_valid, 1), (self._put_valid, 3),
            (self._patch_valid, 2), (self._get_range, 4),
            (self._put_fuzzed, 3), (self._patch_fuzzed, 3),
            (self._forbidden_put, 2), (self._odd_path, 2),
            (self._no_ticket, 1), (self._chunked, 1),
            (self._wrong_length, 2), (self._mutated, 6),
            (self._bad_header_line, 2),
            (self._duplicate_length,
             1 if enabled("duplicate-length") else 0),
            (self._garbage, 1), (self._info, 1 if service == "remote"
                                 else 0),
            (self._malformed_length, 1 if enabled("malformed-length")
             else 0),
            (self._put_past_image_end, 1),
        ]
        gens, weights = zip(*kinds)
        return rnd.choices(gens, weights)[0](rnd)

    def _ro(self, rnd):
        return rnd.choice(self.env.readonly)

    def _get_valid(self, rnd):
        t = self._ro(rnd)
        headers = self._common_headers(rnd)
        if rnd.random() < 0.6:
            a = rnd.randrange(t.size)
            b = rnd.randrange(a, t.size)
            headers.append(f"Range: bytes={a}-{b}")
            expect, part = {206}, t.data[a:b + 1]
        else:
            expect, part = {200}, t.data
        return Request(
            head("GET", f"/images/{t.id}", headers), True,
            frozenset(expect), check=body_is(part), name="get")

    def _head_valid(self, rnd):
        t = self._ro(rnd)
        return Request(head("HEAD", f"/images/{t.id}", []), True,
                       frozenset({200}), check=length_is(t.size),
                       head=True, name="head")

    def _options_valid(self, rnd):
        target = rnd.choice([self._ro(rnd).id, "*", self.env.scratch.id])
        return Request(head("OPTIONS", f"/images/{target}",
                            self._common_headers(rnd)),
                       True, frozenset({200}), check=json_body,
                       name="options")

    def _extents_valid(self, rnd):
        t = self._ro(rnd)
        return Request(head("GET", f"/images/{t.id}/extents",
                            self._common_headers(rnd)),
                       True, frozenset({200}), check=json_body,
                       name="extents")

    def _checksum_valid(self, rnd):
        t = self._ro(rnd)
        path = rnd.choice([f"/images/{t.id}/checksum",
                           f"/images/{t.id}/checksum/algorithms"])
        return Request(head("GET", path, []), True, frozenset({200}),
                       check=json_body, name="checksum")

    def _put_valid(self, rnd):
        t = self.env.scratch
        length = rnd.choice([0, 1, 511, 4096, rnd.randrange(70000)])
        length = min(length, t.size)
        offset = rnd.randrange(t.size - length + 1)
        body = rnd.randbytes(length)
        flush = rnd.choice(["", "?flush=n", "?flush=y"])
        headers = [f"Content-Length: {length}",
                   f"Content-Range: bytes {offset}-{offset + length}/*"]
        if rnd.random() < 0.2:
            headers.append("Expect: 100-continue")
        return Request(
            head("PUT", f"/images/{t.id}{flush}",
                 headers + self._common_headers(rnd)) + body,
            True, frozenset({200}), name="put")

    def _patch_valid(self, rnd):
        t = self.env.scratch
        size = rnd.randrange(t.size)
        offset = rnd.randrange(t.size - size + 1)
        msg = rnd.choice([
            {"op": "zero", "offset": offset, "size": size,
             "flush": rnd.choice([True, False])},
            {"op": "flush"},
        ])
        return Request(json_request("PATCH", f"/images/{t.id}", msg),
                       True, frozenset({200}), name="patch")

    def _get_range(self, rnd):
        t = self._ro(rnd)
        header = rnd.choice([
            f"bytes={number(rnd)}-{number(rnd)}",
            f"bytes={number(rnd)}-", f"bytes=-{number(rnd)}",
            f"bytes={number(rnd)}-{number(rnd)},{number(rnd)}-",
            "bytes=", "bytes=-", "items=0-1", "bytes=\u0661-\u0662",
            f"bytes = {number(rnd)}-{number(rnd)}",
        ])
        return Request(
            head("GET", f"/images/{t.id}", [f"Range: {header}"]),
            True, frozenset({200, 206, 416}), check=range_body(t),
            name="get-range")

    def _put_fuzzed(self, rnd):
        t = self.env.scratch
        length = rnd.randrange(0, 5000)
        header = rnd.choice([
            f"bytes {number(rnd)}-{number(rnd)}/{number(rnd)}",
            f"bytes {number(rnd)}-*/*", f"bytes {number(rnd)}-{number(rnd)}/*",
            "bytes */*", "bytes 1-2", "bytes=0-1/2", f"{number(rnd)}",
            "bytes \u0661-\u0662/*",
        ])
        return Request(
            head("PUT", f"/images/{t.id}",
                 [f"Content-Length: {length}", f"Content-Range: {header}"])
            + rnd.randbytes(length),
            True, frozenset({200, 400, 416}), name="put-fuzzed")

    def _patch_fuzzed(self, rnd):
        t = rnd.choice([self.env.scratch, self._ro(rnd)])
        values = [None, True, 0, -1, 1, 2**63, 10**30, 1.5, "1", [], {},
                  rnd.randrange(2 * t.size)]
        msg = {}
        for key in ("op", "offset", "size", "flush"):
            if rnd.random() < 0.8:
                msg[key] = rnd.choice(values + ["zero", "flush", "copy"])
        body = json.dumps(msg).encode()
        if rnd.random() < 0.3:
            body = rnd.choice([b"[", b"{}" * 3, b"[" * 5000, b"\xff",
                               b"null", b'"x"', body[:-1]])
        if rnd.random() < 0.05:
            body = b" " * (70 * 1024)
        return Request(
            head("PATCH", f"/images/{t.id}",
                 [f"Content-Length: {len(body)}"]) + body,
            True, frozenset({200, 400, 403, 413, 416}), name="patch-fuzzed")

    def _smuggled(self, rnd, name):
        """
        A request inside a body: a write to the model ticket, of bytes
        saying which generator smuggled it (SMUGGLERS).
        """
        m = self.env.model
        length = rnd.choice([1, 512, 4096])
        offset = rnd.randrange(m.size - length)
        return head("PUT", f"/images/{m.id}?flush=y",
                    [f"Content-Length: {length}",
                     f"Content-Range: bytes {offset}-{offset + length}/*"]
                    ) + bytes([SMUGGLERS[name]]) * length

    def _forbidden_put(self, rnd):
        t = self._ro(rnd)
        body = self._smuggled(rnd, "forbidden-put") * rnd.randint(1, 3)
        return Request(
            head("PUT", f"/images/{t.id}", [f"Content-Length: {len(body)}"])
            + body, True, frozenset({403}), name="forbidden-put")

    def _odd_path(self, rnd):
        t = self._ro(rnd)
        path = rnd.choice([
            "/", "/images", "/images/", f"/images/{t.id}/", "/images/*/x",
            f"/images/{t.id}/extents/x", f"/images/{t.id}%00",
            "/images/%zz", "/images/../tickets/x", "/tickets/x",
            "/images/" + "a" * rnd.choice([100, 3000, 5000]),
            f"http://localhost/images/{t.id}", "*",
            f"/images/{t.id}?close=y", f"/images/{t.id}?flush=x",
            f"/images/{t.id}/extents?context=dirty",
            f"/images/{t.id}/extents?context=x",
            f"/images/{t.id}/checksum?algorithm=md17",
            f"/images/{t.id}/checksum?block_size=3",
            "/images/\u00e9", "/info/x", "/images/x;y",
        ])
        method = rnd.choice(["GET", "OPTIONS", "PATCH", "DELETE", "POST",
                             "PUT", "BREW", "get", "M-SEARCH"])
        headers = ["Content-Length: 0"]
        return Request(head(method, path, headers),
                       True, frozenset(range(200, 500)), name="odd-path")

    def _no_ticket(self, rnd):
        tid = rnd.choice(["nope", "x" * 40, self._ro(rnd).id[:-1],
                          self._ro(rnd).id.upper()])
        method = rnd.choice(["GET", "OPTIONS", "PUT"])
        return Request(head(method, f"/images/{tid}", ["Content-Length: 0"]),
                       True, frozenset({403}), name="no-ticket")

    def _info(self, rnd):
        return Request(head("GET", "/info/", []), True, frozenset({200}),
                       check=json_body, name="info")

    def _chunked(self, rnd):
        t = self.env.scratch
        body = b"5\r\nhello\r\n0\r\n\r\n"
        return Request(
            head("PUT", f"/images/{t.id}", ["Transfer-Encoding: chunked"])
            + body, True, frozenset({400}), name="chunked")

    def _wrong_length(self, rnd):
        # The declared length is not the body's: framing is unknown after.
        t = rnd.choice([self.env.scratch, self._ro(rnd)])
        body = self._smuggled(rnd, "wrong-length")
        # Never 0: a body-less request followed by the smuggled one is
        # what a client may send; from byte 1 on it is no request.
        declared = max(1, len(body) + rnd.choice([-100, -1, 1, 100,
                                                  10**6, 2**40]))
        method = rnd.choice(["PUT", "PATCH"])
        return Request(
            head(method, f"/images/{t.id}", [f"Content-Length: {declared}"])
            + body, name="wrong-length")

    def _bad_header_line(self, rnd):
        # A header line the parser cannot read before Content-Length:
        # the body, a smuggled request, must never be served.
        t = rnd.choice([self.env.scratch, self._ro(rnd)])
        body = self._smuggled(rnd, "bad-header-line")
        line = rnd.choice([
            f"Content-Length : {len(body)}", f"Content-Length\t: {len(body)}",
            f"X-No-Colon\r\nContent-Length: {len(body)}",
            f" folded\r\nContent-Length: {len(body)}",
            f": x\r\nContent-Length: {len(body)}",
            f"Content Length: {len(body)}",
        ])
        return Request(
            head(rnd.choice(["PUT", "PATCH"]), f"/images/{t.id}", [line])
            + body, name="bad-header-line")

    def _duplicate_length(self, rnd):
        # Two Content-Lengths that differ: invalid framing (RFC 9112 6.3),
        # which a server must refuse; taking the first (0) serves the body.
        t = rnd.choice([self.env.scratch, self._ro(rnd)])
        body = self._smuggled(rnd, "duplicate-length")
        return Request(
            head(rnd.choice(["PUT", "PATCH"]), f"/images/{t.id}",
                 ["Content-Length: 0", f"Content-Length: {len(body)}"])
            + body, name="duplicate-length")

    def _malformed_length(self, rnd):
        t = self.env.scratch
        # Whitespace around the digits is allowed (RFC 9112 5.1: OWS
        # around a field value), so " 10" is not here.
        value = rnd.choice(["+10", "1_0", "0x0a", "1e1", "\u0661\u0660",
                            "10, 10", "-0", "1 0"])
        return Request(
            head("PUT", f"/images/{t.id}",
                 [f"Content-Length: {value}"]) + b"0123456789",
            True, frozenset({400}), name="malformed-length")

    def _put_past_image_end(self, rnd):
        # Inside the ticket, past the image: the write fails in NBD, on
        # the unix socket after the body was handed to the splicing
        # path; its bytes, a smuggled request, must not be served.
        t = self.env.short
        body = self._smuggled(rnd, "put-past-image-end") * 2
        offset = self.env.image_size - rnd.randrange(0, 100)
        return Request(
            head("PUT", f"/images/{t.id}",
                 [f"Content-Length: {len(body)}",
                  f"Content-Range: bytes {offset}-{offset + len(body)}/*"])
            + body, name="put-past-image-end")

    def _mutated(self, rnd):
        base = self._data_base(rnd)
        return Request(mutate(rnd, base.data), name="mutated-" + base.name)

    def _data_base(self, rnd):
        # No smuggled bodies here: a mutated Content-Length may rightly
        # make the body the next request.
        return rnd.choice([self._get_valid, self._put_valid,
                           self._patch_valid, self._get_range,
                           self._put_fuzzed])(rnd)

    def _garbage(self, rnd):
        data = rnd.choice([
            rnd.randbytes(rnd.randrange(1, 300)),
            b"\r\n" * rnd.randrange(1, 10),
            b"GET / HTTP/1.1\r\n" + b"x: y\r\n" * 150 + b"\r\n",
            b"GET /images/x HTTP/1.1\r\nx: " + b"v" * 70000 + b"\r\n\r\n",
            b"G" * 5000 + b"\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ])
        return Request(data, name="garbage")

    def _common_headers(self, rnd):
        headers = []
        r = rnd.random()
        if r < 0.1:
            headers.append("Connection: close")
        elif r < 0.2:
            headers.append("Connection: keep-alive")
        if rnd.random() < 0.2:
            headers.append("Host: localhost")
        if rnd.random() < 0.1:
            headers.append(f"X-{rnd.randrange(100)}: " +
                           "v" * rnd.randrange(2000))
        if rnd.random() < 0.1:
            headers.append("Origin: https://engine.example")
        return headers

    # Control service (/tickets).

    def _control(self, rnd, allow_5xx):
        kinds = [(self._ctl_get, 3), (self._ctl_put, 5),
                 (self._ctl_patch, 2), (self._ctl_delete, 1),
                 (self._ctl_mutated, 4), (self._ctl_odd, 1)]
        gens, weights = zip(*kinds)
        req = rnd.choices(gens, weights)[0](rnd)
        if req.name in ("ctl-put", "ctl-mutated"):
            # A ticket whose export cannot start (a missing file) is the
            # daemon's 500 with a message, not a failure.
            allow_5xx.append((500, b"Cannot serve transfer"))
        return req

    def _ctl_get(self, rnd):
        tid = rnd.choice([self._ro(rnd).id, self.env.model.id,
                          rnd.choice(self.env.ctl_ids), "nope"])
        return Request(head("GET", f"/tickets/{tid}", []), True,
                       frozenset({200, 404}), name="ctl-get")

    def _ticket(self, rnd):
        size = rnd.choice([0, 1, self.env.image_size, 2**40,
                           rnd.randrange(2**62)])
        ticket = {
            "uuid": rnd.choice(self.env.ctl_ids),
            "size": size,
            "ops": rnd.choice([["read"], ["write"], ["read", "write"], [],
                               ["zero"]]),
            "timeout": rnd.choice([0, 1, 300, 2**31, -1]),
            "url": rnd.choice(self.env.ctl_urls),
        }
        for key, values in [
            ("inactivity_timeout", [0, 60, 3600, None, "60"]),
            ("transfer_id", ["tr", "", "\u00e9", 1]),
            ("filename", ["a.img", "a b.raw", "\u00e9.img", "",
                          "x" * 300]),
            ("sparse", [True, False, 1]),
            ("dirty", [True, False, "yes"]),
        ]:
            if rnd.random() < 0.3:
                ticket[key] = rnd.choice(values)
        if rnd.random() < 0.1:
            del ticket[rnd.choice(list(ticket))]
        if enabled("huge-int-ticket") and rnd.random() < 0.1:
            ticket[rnd.choice(["size", "timeout"])] = 10**rnd.randrange(
                20, 400)
        if enabled("non-latin1-filename") and rnd.random() < 0.1:
            ticket["filename"] = "\u20ac.img"
        return ticket

    def _ctl_put(self, rnd):
        ticket = self._ticket(rnd)
        return Request(json_request("PUT", f"/tickets/{ticket.get('uuid')}",
                                    ticket),
                       True, frozenset({200, 400, 500}), name="ctl-put")

    def _ctl_patch(self, rnd):
        msg = rnd.choice([{"timeout": 300}, {"timeout": -1}, {},
                          {"timeout": "1"}, [], {"timeout": True}])
        return Request(json_request(
            "PATCH", f"/tickets/{rnd.choice(self.env.ctl_ids)}", msg),
            True, frozenset({200, 400, 404}), name="ctl-patch")

    def _ctl_delete(self, rnd):
        return Request(head("DELETE",
                            f"/tickets/{rnd.choice(self.env.ctl_ids)}",
                            ["Content-Length: 0"]),
                       True, frozenset({204}), name="ctl-delete")

    def _ctl_mutated(self, rnd):
        base = rnd.choice([self._ctl_put, self._ctl_patch,
                           self._ctl_get])(rnd)
        return Request(mutate(rnd, base.data), name="ctl-mutated")

    def _ctl_odd(self, rnd):
        path = rnd.choice(["/tickets", "/profile/", "/profile/?run=y",
                           "/images/x", "/", "/tickets/a/b"])
        method = rnd.choice(["GET", "POST", "OPTIONS", "HEAD_X"])
        return Request(head(method, path, ["Content-Length: 0"]), True,
                       frozenset(range(200, 500)), name="ctl-odd")


def head(method, path, headers, version="HTTP/1.1"):
    lines = [f"{method} {path} {version}"] + list(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def json_request(method, path, msg):
    body = json.dumps(msg).encode()
    return head(method, path, [f"Content-Length: {len(body)}",
                               "Content-Type: application/json"]) + body


def number(rnd):
    return rnd.choice([
        0, 1, 511, 512, 4095, 65536, 1024**2 - 1, 1024**2, 1024**2 + 1,
        rnd.randrange(1024**2), rnd.randrange(2**64), 10**40,
    ])


def mutate(rnd, data):
    """A few random edits of request bytes."""
    data = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(9)
        pos = rnd.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(pos, len(data) - 1)] ^= 1 << rnd.randrange(8)
        elif op == 1:
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 8))
        elif op == 2:
            del data[pos:pos + rnd.randint(1, 20)]
        elif op == 3:
            data[pos:pos] = rnd.choice([b"\r\n", b"\n", b"\r", b"\x00",
                                        b" ", b":", b"\t", b"\r\n\r\n"])
        elif op == 4:
            # Duplicate a header line (two Content-Lengths, say).
            lines = bytes(data).split(b"\r\n")
            if len(lines) > 2:
                i = rnd.randrange(1, len(lines) - 1)
                lines.insert(i, lines[i])
                data = bytearray(b"\r\n".join(lines))
        elif op == 5:
            data = data.replace(b"HTTP/1.1", rnd.choice(
                [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 x", b"http/1.1",
                 b"HTTP/1.10", b""]), 1)
        elif op == 6:
            data = data.replace(b"\r\n", b"\n")
        elif op == 7:
            # Obsolete line folding.
            data[pos:pos] = b"\r\n folded"
        else:
            data = data.replace(b"Content-Length", rnd.choice(
                [b"content-length", b"Content-Length ", b"Content_Length",
                 b"Transfer-Encoding: chunked\r\nContent-Length"]), 1)
    return bytes(data)


# Checks of known answers; each raises AssertionError.

def body_is(expected):
    def check(resp):
        assert resp.body == expected, (
            f"body of {len(resp.body)} bytes differs from the image's "
            f"{len(expected)}")
    return check


def length_is(length):
    def check(resp):
        assert resp.headers["content-length"] == str(length)
    return check


def json_body(resp):
    assert resp.headers.get("content-type") == "application/json"
    json.loads(resp.body)


def range_body(ticket):
    def check(resp):
        if resp.status == 200:
            assert resp.body == ticket.data
        elif resp.status == 206:
            m = re.fullmatch(r"bytes ([0-9]+)-([0-9]+)/([0-9]+)",
                             resp.headers["content-range"])
            assert m, resp.headers
            a, b, total = map(int, m.groups())
            assert total == ticket.size
            assert resp.body == ticket.data[a:b + 1]
        elif "content-range" in resp.headers:
            # Only a range past the end says the size (upstream).
            assert re.fullmatch(r"bytes \*/[0-9]+",
                                resp.headers["content-range"])
    return check


# Verdicts

@dataclasses.dataclass
class Stats:
    cases: int = 0
    requests: int = 0
    responses: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    statuses: dict = dataclasses.field(default_factory=dict)
    ends: dict = dataclasses.field(default_factory=dict)

    def add(self, case, result, responses):
        self.cases += 1
        self.requests += len(case.requests)
        self.responses += len(responses)
        self.bytes_sent += len(case.data)
        self.bytes_received += len(result.data)
        self.ends[result.end] = self.ends.get(result.end, 0) + 1
        for r in responses:
            self.statuses[r.status] = self.statuses.get(r.status, 0) + 1


def run_case(case, targets, ca_file, timeout=30.0):
    """
    Send the case to its service and judge the answer; return (result,
    responses). Raises AssertionError naming the case.
    """
    data = case.data if case.truncate is None else case.data[:case.truncate]
    address, family = targets[case.service]
    try:
        if case.service == "remote":
            result = tls_exchange(address, data, ca_file, case.tls_mode,
                                  case.tls_cut, timeout)
        else:
            result = exchange(address, data, family, timeout)
    except (OSError, ssl.SSLError) as e:
        # Connecting or the TLS handshake failed: the daemon is not
        # accepting connections.
        raise AssertionError(f"{case.describe()}: {e!r}") from e
    try:
        responses = judge(case, result, data)
    except Exception as e:
        raise AssertionError(
            f"{case.describe()}\nreceived ({result.end}): "
            f"{result.data[:1000]!r}\n{type(e).__name__}: {e}") from None
    return result, responses


def judge(case, result, sent):
    if result.end == "timeout":
        raise AssertionError("the daemon neither answered nor closed")
    valid = []
    for req in case.requests:
        if not req.valid:
            break
        valid.append(req)
    heads = {i for i, r in enumerate(valid) if r.head}
    responses = parse_responses(result.data, heads)
    if case.tls_mode in ("hello-cut", "plaintext", "garbage"):
        assert not responses, "a response to bytes that are not TLS"
        return responses
    # Well-formed requests frame each other: no more responses than
    # requests of which something was sent (a bad request line alone gets
    # an answer). An invalid one may hold any number of requests: there
    # the model ticket finds what should not have been served.
    if len(valid) == len(case.requests) and case.tls_mode == "normal":
        started = 0
        pos = 0
        for req in case.requests:
            if pos < len(sent):
                started += 1
            pos += len(req.data)
        assert len(responses) <= started, (
            f"{len(responses)} responses to {started} requests: body "
            f"bytes parsed as requests")
    for i, resp in enumerate(responses):
        if b"Traceback" in resp.body:
            raise AssertionError(f"response {i}: a traceback")
        # 501 and 505 answer what was sent; the others are failures.
        if resp.status >= 500 and resp.status not in (501, 505):
            allowed = any(resp.status == s and resp.body.startswith(m)
                          for s, m in case.allow_5xx)
            assert allowed, f"response {i}: {resp.status} {resp.body!r}"
    # Known answers: the valid requests sent whole, up to a close.
    if case.tls_mode != "normal":
        return responses
    pos = 0
    closed = False
    for i, req in enumerate(valid):
        pos += len(req.data)
        if pos > len(sent):
            break
        if i >= len(responses):
            assert closed, f"request {i} ({req.name}) not answered"
            break
        resp = responses[i]
        assert resp.status in req.expect, (
            f"request {i} ({req.name}): status {resp.status}, expected "
            f"{sorted(req.expect)[:10]}: {resp.body[:300]!r}")
        if req.check and 200 <= resp.status < 300 or (
                req.check and req.name == "get-range"):
            req.check(resp)
        # The daemon closes after a request asking it to, saying so or
        # not (RFC 9112 9.6: SHOULD).
        closed = resp.close or b"\r\nconnection: close\r\n" in (
            req.data.lower())
        if closed:
            break
    return responses
