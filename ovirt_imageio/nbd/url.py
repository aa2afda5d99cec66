"""
NBD addresses: parse the URLs a ticket may carry into an Address.

Two syntaxes are accepted:

- qemu's legacy syntax, which vdsm sends:

      nbd:unix:/path[:exportname=NAME]
      nbd:HOST:PORT[:exportname=NAME]        (IPv6 as [ADDR]:PORT)

- the standard NBD URI (https://github.com/NetworkBlockDevice/nbd/blob/
  master/doc/uri.md), without TLS:

      nbd://HOST[:PORT][/NAME]              (default port 10809)
      nbd+unix:///[NAME]?socket=/path

Pure functions over strings; no I/O.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

DEFAULT_PORT = 10809

# NBD protocol limit on export names (NBD_MAX_STRING_SIZE).
MAX_EXPORT_NAME = 4096

# Longest unix socket path the kernel accepts (sun_path is 108 bytes,
# including the terminating NUL).
MAX_SOCKET_PATH = 107

_LEGACY_EXPORT = ":exportname="


@dataclasses.dataclass(frozen=True)
class Address:
    """
    Where an NBD export is: a unix socket, or a host and port, and the
    export name. Exactly one of socket or host/port is set.
    """

    socket: str | None = None
    host: str | None = None
    port: int | None = None
    export: str = ""

    def __post_init__(self):
        if self.socket is not None:
            if self.host is not None or self.port is not None:
                raise ValueError(
                    "NBD address needs a socket or a host and port, not both")
        elif self.host is None or self.port is None:
            raise ValueError("NBD address needs a socket or a host and port")

    @property
    def is_unix(self):
        return self.socket is not None

    def __str__(self):
        # For logs and messages only; the legacy syntax vdsm uses, since it
        # reads well and round-trips through parse().
        if self.is_unix:
            s = f"nbd:unix:{self.socket}"
        elif ":" in self.host:
            s = f"nbd:[{self.host}]:{self.port}"
        else:
            s = f"nbd:{self.host}:{self.port}"
        if self.export:
            s += f"{_LEGACY_EXPORT}{self.export}"
        return s


def parse(url: str) -> Address:
    """
    Parse an NBD URL into an Address.

    Raises ValueError naming what is wrong with url.
    """
    if not isinstance(url, str):
        raise ValueError(f"NBD URL must be a string, got {type(url).__name__}")
    if url.startswith(("nbd://", "nbd+unix://")):
        return _parse_uri(url)
    if url.startswith("nbd:"):
        return _parse_legacy(url)
    scheme = url.partition(":")[0] if ":" in url else ""
    if scheme in ("nbds", "nbds+unix"):
        raise ValueError(f"Unsupported NBD URL {url!r}: TLS is not supported")
    raise ValueError(
        f"Unsupported NBD URL {url!r}: expecting nbd:unix:/path, "
        f"nbd:HOST:PORT, nbd://HOST[:PORT][/NAME] or "
        f"nbd+unix:///[NAME]?socket=/path")


def _parse_legacy(url):
    # As qemu's nbd_parse_filename(): the export name is everything after
    # the first ":exportname=", so a socket path cannot contain it.
    spec = url[len("nbd:"):]
    spec, sep, export = spec.partition(_LEGACY_EXPORT)
    if sep:
        _check_export(url, export)
    if spec.startswith("unix:"):
        socket = spec[len("unix:"):]
        _check_socket(url, socket)
        return Address(socket=socket, export=export)
    host, port = _split_host_port(url, spec)
    return Address(host=host, port=port, export=export)


def _split_host_port(url, spec):
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not host:
            raise ValueError(f"Invalid NBD URL {url!r}: bad IPv6 address")
        if not rest.startswith(":"):
            raise ValueError(f"Invalid NBD URL {url!r}: port is missing")
        port = rest[1:]
    else:
        host, sep, port = spec.rpartition(":")
        if not sep:
            raise ValueError(
                f"Invalid NBD URL {url!r}: expecting nbd:unix:/path or "
                f"nbd:HOST:PORT")
        if not host:
            raise ValueError(f"Invalid NBD URL {url!r}: host is missing")
        if ":" in host:
            raise ValueError(
                f"Invalid NBD URL {url!r}: IPv6 address must be in brackets")
    return host, _check_port(url, port)


def _parse_uri(url):
    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as e:
        raise ValueError(f"Invalid NBD URL {url!r}: {e}") from None
    if u.fragment:
        raise ValueError(f"Invalid NBD URL {url!r}: fragment is not allowed")
    if u.username is not None or u.password is not None:
        raise ValueError(f"Invalid NBD URL {url!r}: user info is not allowed")

    # The export name is the path without its leading "/", percent-decoded.
    try:
        export = urllib.parse.unquote(u.path[1:], errors="strict")
    except UnicodeDecodeError:
        raise ValueError(
            f"Invalid NBD URL {url!r}: export name is not UTF-8") from None
    _check_export(url, export)

    try:
        query = urllib.parse.parse_qs(
            u.query, keep_blank_values=True, strict_parsing=bool(u.query),
            errors="strict")
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"Invalid NBD URL {url!r}: bad query: {e}") from None

    if u.scheme == "nbd+unix":
        if u.netloc:
            raise ValueError(
                f"Invalid NBD URL {url!r}: nbd+unix URL must not have a "
                f"host; expecting nbd+unix:///[NAME]?socket=/path")
        socket = query.pop("socket", None)
        if socket is None:
            raise ValueError(
                f"Invalid NBD URL {url!r}: socket parameter is missing")
        if len(socket) != 1:
            raise ValueError(
                f"Invalid NBD URL {url!r}: socket parameter is repeated")
        _check_query_empty(url, query)
        _check_socket(url, socket[0])
        return Address(socket=socket[0], export=export)

    host = u.hostname
    if not host:
        raise ValueError(f"Invalid NBD URL {url!r}: host is missing")
    _check_query_empty(url, query)
    if port is None:
        if u.netloc.endswith(":"):
            raise ValueError(f"Invalid NBD URL {url!r}: port is empty")
        port = DEFAULT_PORT
    elif port == 0:
        raise ValueError(f"Invalid NBD URL {url!r}: port must be 1-65535")
    return Address(host=host, port=port, export=export)


def _check_query_empty(url, query):
    if query:
        names = ", ".join(sorted(query))
        raise ValueError(
            f"Invalid NBD URL {url!r}: unsupported parameters: {names}")


def _check_socket(url, socket):
    if not socket:
        raise ValueError(f"Invalid NBD URL {url!r}: socket path is missing")
    if not socket.startswith("/"):
        raise ValueError(
            f"Invalid NBD URL {url!r}: socket path must be absolute")
    if "\0" in socket:
        raise ValueError(f"Invalid NBD URL {url!r}: socket path contains NUL")
    if len(socket.encode("utf-8", "surrogateescape")) > MAX_SOCKET_PATH:
        raise ValueError(
            f"Invalid NBD URL {url!r}: socket path is longer than "
            f"{MAX_SOCKET_PATH} bytes")


def _check_export(url, export):
    if "\0" in export:
        raise ValueError(f"Invalid NBD URL {url!r}: export name contains NUL")
    if len(export.encode("utf-8", "surrogateescape")) > MAX_EXPORT_NAME:
        raise ValueError(
            f"Invalid NBD URL {url!r}: export name is longer than "
            f"{MAX_EXPORT_NAME} bytes")


def _check_port(url, port):
    if not port:
        raise ValueError(f"Invalid NBD URL {url!r}: port is missing")
    if not port.isascii() or not port.isdigit():
        raise ValueError(
            f"Invalid NBD URL {url!r}: port {port!r} is not a number")
    value = int(port)
    if not 1 <= value <= 65535:
        raise ValueError(f"Invalid NBD URL {url!r}: port must be 1-65535")
    return value
