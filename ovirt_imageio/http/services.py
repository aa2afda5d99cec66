"""
The daemon's services, built from the configuration:

    remote   HTTPS on [remote] host:port       /images, /info, the page at
                                               / ([remote] page), /ca.pem
    local    HTTP on the [local] unix socket   /images
    control  HTTP on a unix socket or TCP      /tickets, /profile,
             localhost port ([control])        /transfers, /metrics
    metrics  HTTP on [metrics] host:port,      /metrics
             when [metrics] enable

Every router reports its requests to the process's metrics.Recorder
(`metrics`, optional); /metrics is never served where a ticket holder
connects (remote, local).

Tickets are shared by all services: the control service adds them, the
others serve them.

Start-up errors name what failed: the service and its address, the TLS
file (errors.Error; the daemon prints "Cannot start: ..." and exits).
"""

import contextlib
import logging
import ssl
import types
import urllib.parse

from .. import errors
from ..nbd import backend
from . import checksum
from . import images
from . import info
from . import metrics
from . import relay
from . import router
from . import server
from . import static
from . import tickets as tickets_api
from . import transfers

log = logging.getLogger("services")


def buffer_pool(cfg):
    """The buffers of data requests, one pool for the process: pass it to
    every service."""
    return images.buffer_pool(cfg)


def _observer(sources):
    return sources.recorder.request if sources is not None else None


def remote(cfg, store, unix_socket=None, pool=None, signed=None,
           metrics_sources=None):
    """signed: the SignedTickets of signed_tickets(), with [proxy]
    signed_tickets on."""
    if signed is None:
        routes = data_routes(cfg, store, unix_socket, pool)
    else:
        from . import sessions
        routes = sessions.routes(
            signed, data_routes(cfg, signed.tickets, unix_socket, pool))
    # The page and the CA: on this service only, never on the unix
    # sockets (static.py).
    page_routes, ca_url = static.routes(cfg)
    routes += [(r"/info/", info.Handler(ca_url=ca_url))] + page_routes
    tls = None
    if cfg.tls.enable:
        tls = tls_context(cfg.tls)
    with starting("remote", tcp_address(cfg.remote.host, cfg.remote.port)):
        srv = server.TCPServer(
            "remote", cfg.remote.host, cfg.remote.port,
            router.Router(routes, observe=_observer(metrics_sources)),
            tls_context=tls,
            limits=server.Limits.from_config(cfg))
    return server.Service(srv)


def tls_context(tls):
    """The remote service's TLS context from [tls]; errors name the file."""
    if not tls.cert_file or not tls.key_file:
        raise errors.Error(
            "[tls] cert_file and key_file are required when [tls] "
            "enable = true")
    # OpenSSL's errors name no file ("[Errno 2] No such file or
    # directory"): check each can be read first.
    for key in ("cert_file", "key_file", "ca_file"):
        path = getattr(tls, key)
        if not path:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise errors.Error(f"[tls] {key} {path!r}: [Errno {e.errno}] "
                               f"{e.strerror}")
    try:
        return server.tls_context(tls.cert_file, tls.key_file, tls.ca_file,
                                  tls.enable_tls1_1)
    except (OSError, ssl.SSLError) as e:
        # OpenSSL does not say which file is wrong either ("PEM lib").
        if tls.ca_file and not _loads_ca(tls.ca_file):
            raise errors.Error(f"[tls] ca_file {tls.ca_file!r}: {e}")
        raise errors.Error(f"[tls] cert_file {tls.cert_file!r}, key_file "
                           f"{tls.key_file!r}: {e}")


def _loads_ca(path):
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(path)
        return True
    except (OSError, ssl.SSLError):
        return False


@contextlib.contextmanager
def starting(name, address):
    """Name the service and its address in an error binding it."""
    try:
        yield
    except OSError as e:
        raise errors.Error(f"{name} service on {address}: {e}") from e


def tcp_address(host, port):
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host or '*'}:{port}"


def unix_address(path):
    if not path:
        return "an abstract socket"
    if path.startswith("\0"):
        # As ss(8) shows abstract names.
        return repr("@" + path[1:])
    return repr(path)


def local(cfg, store, pool=None, metrics_sources=None):
    """The local service; its routes are set once its address is known."""
    with starting("local", unix_address(cfg.local.socket)):
        srv = server.UnixServer("local", cfg.local.socket, None,
                                limits=server.Limits.from_config(cfg))
    srv.router = router.Router(
        data_routes(cfg, store, srv.address(), pool),
        observe=_observer(metrics_sources))
    return server.Service(srv)


def control(cfg, store, metrics_sources=None):
    routes = [
        (r"/tickets/(.*)", tickets_api.Handler(store, export=exporter(cfg))),
        (r"/profile/", tickets_api.ProfileHandler()),
        (r"/transfers/(.*)", transfers.Handler(store)),
    ]
    if metrics_sources is not None:
        routes.append((METRICS_PATH, metrics.Handler(metrics_sources)))
    r = router.Router(routes, observe=_observer(metrics_sources))
    if cfg.control.transport == "tcp":
        if cfg.control.port == -1:
            raise errors.Error(
                "[control] port is required when [control] transport = tcp")
        with starting("control", tcp_address("localhost",
                                             cfg.control.port)):
            srv = server.TCPServer(
                "control", "localhost", cfg.control.port, r,
                prefer_ipv4=cfg.control.prefer_ipv4,
                limits=server.Limits.from_config(cfg))
    else:
        # vdsm and the engine only: owner and group (mode 0660).
        with starting("control", unix_address(cfg.control.socket)):
            srv = server.UnixServer(
                "control", cfg.control.socket, r, mode=0o660,
                limits=server.Limits.from_config(cfg))
    return server.Service(srv)


# /metrics, or /metrics/, and nothing under it.
METRICS_PATH = r"/metrics/?$"


def metrics_service(cfg, sources):
    """The [metrics] service: /metrics only, plain HTTP on host:port."""
    r = router.Router([(METRICS_PATH, metrics.Handler(sources))],
                      observe=_observer(sources))
    with starting("metrics", tcp_address(cfg.metrics.host,
                                         cfg.metrics.port)):
        srv = server.TCPServer(
            "metrics", cfg.metrics.host, cfg.metrics.port, r,
            limits=server.Limits.from_config(cfg))
    return server.Service(srv)


def data_routes(cfg, store, unix_socket, pool=None):
    """The /images routes, the same on the remote and local services."""
    img = images.Handler(cfg, store, unix_socket=unix_socket, pool=pool)
    return [
        (r"/images/(.*)/extents", images.ExtentsHandler(img)),
        (r"/images/(.*)/checksum/algorithms", checksum.AlgorithmsHandler()),
        (r"/images/(.*)/checksum", checksum.Handler(img)),
        (r"/images/(.*)", img),
    ]


def exporter(cfg):
    """
    Return a function making what serves a new ticket's bytes: for nbd URLs
    the address of the export, for file URLs our own qemu-nbd, for http and
    https URLs (the proxy on the engine host) a relay to the daemon.
    """
    def export(ticket):
        scheme = urllib.parse.urlparse(ticket.url).scheme
        if scheme in ("http", "https"):
            return relay_for(cfg, ticket)
        try:
            resource = backend.create(
                ticket.url,
                run_dir=cfg.daemon.run_dir,
                read_only="write" not in ticket.ops,
                # Clients open up to max_connections workers plus a
                # connection for OPTIONS and extents; qemu-nbd queues
                # connections past --shared instead of serving them.
                shared=2 * cfg.daemon.max_connections,
                dirty=ticket.dirty,
                timeout=cfg.backend_nbd.timeout,
                transfer_id=ticket.transfer_id)
        except ValueError as e:
            raise errors.InvalidTicket(
                f"Invalid value for 'url': {ticket.url!r}: {e}")
        except errors.ExportError as e:
            log.error("Cannot export transfer=%s: %s", ticket.transfer_id, e)
            raise errors.ExportError(
                f"Cannot serve transfer {ticket.transfer_id}: {e}")
        if resource.error:
            # A file that does not exist yet; requests fail until it does.
            log.warning("Transfer=%s cannot be served yet: %s",
                        ticket.transfer_id, resource.error)
        return resource
    return export


def relay_for(cfg, ticket):
    """The relay of a proxy ticket, to the daemon at ticket.url."""
    u = urllib.parse.urlsplit(ticket.url)
    try:
        u.port
    except ValueError as e:
        raise errors.InvalidTicket(
            f"Invalid value for 'url': {ticket.url!r}: {e}")
    if not u.hostname:
        raise errors.InvalidTicket(
            f"Invalid value for 'url': {ticket.url!r}: host is required")
    # engine-setup writes the CA that signed the hosts' certificates in
    # [backend_http]; without it the proxy trusts its own CA.
    cafile = cfg.backend_http.ca_file or cfg.tls.ca_file or None
    return relay.Relay(
        ticket.url, cafile=cafile, buffer_size=cfg.backend_http.buffer_size,
        transfer_id=ticket.transfer_id)


def signed_tickets(cfg, store):
    """
    The signed tickets of [proxy] signed_tickets (http/sessions.py), their
    certificates loaded. Errors name what is missing: the cryptography
    package (imported only here), a certificate, a file.
    """
    try:
        from .. import signed
    except ImportError as e:
        raise errors.Error(
            f"[proxy] signed_tickets = true needs the cryptography package "
            f"(python3-cryptography): {e}")
    from . import sessions
    verifier = signed.Verifier.from_config(cfg.proxy)
    log.info("Accepting tickets signed by the engine (verify_certificate=%s "
             "allowed_skew_seconds=%s)", cfg.proxy.verify_certificate,
             cfg.proxy.allowed_skew_seconds)
    return sessions.SignedTickets(
        verifier, store, probe=lambda verified: probe(cfg, verified))


def probe(cfg, verified):
    """
    What serves a signed ticket: a relay to its daemon, and the
    operations and size of the daemon's ticket (the signed ticket names
    neither), from the daemon's OPTIONS and extents. The daemon's refusal
    (403 no such ticket) or a daemon out of reach (502) fails the request
    that brought the signed ticket.
    """
    resource = relay_for(cfg, types.SimpleNamespace(
        url=verified.url, transfer_id=verified.transfer_id))
    with resource.open() as image:
        writes = image.can_zero or image.can_flush
        size = image.size
    return resource, (["read", "write"] if writes else ["read"]), size
