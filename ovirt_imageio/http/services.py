"""
The daemon's three services, built from the configuration:

    remote   HTTPS on [remote] host:port       /images, /info
    local    HTTP on the [local] unix socket   /images
    control  HTTP on a unix socket or TCP      /tickets, /profile
             localhost port ([control])

Tickets are shared by all services: the control service adds them, the
others serve them.
"""

import logging
import urllib.parse

from .. import errors
from ..nbd import backend
from . import checksum
from . import images
from . import info
from . import relay
from . import router
from . import server
from . import tickets as tickets_api

log = logging.getLogger("services")


def remote(cfg, store, unix_socket=None):
    routes = data_routes(cfg, store, unix_socket) + [
        (r"/info/", info.Handler())]
    tls = None
    if cfg.tls.enable:
        if not cfg.tls.cert_file or not cfg.tls.key_file:
            raise errors.Error(
                "[tls] cert_file and key_file are required when [tls] "
                "enable = true")
        tls = server.tls_context(cfg.tls.cert_file, cfg.tls.key_file,
                                 cfg.tls.ca_file, cfg.tls.enable_tls1_1)
    return server.Service(server.TCPServer(
        "remote", cfg.remote.host, cfg.remote.port, router.Router(routes),
        tls_context=tls, limits=server.Limits.from_config(cfg)))


def local(cfg, store):
    """The local service; its routes are set once its address is known."""
    srv = server.UnixServer("local", cfg.local.socket, None,
                            limits=server.Limits.from_config(cfg))
    srv.router = router.Router(data_routes(cfg, store, srv.address()))
    return server.Service(srv)


def control(cfg, store):
    routes = [
        (r"/tickets/(.*)", tickets_api.Handler(store, export=exporter(cfg))),
        (r"/profile/", tickets_api.ProfileHandler()),
    ]
    r = router.Router(routes)
    if cfg.control.transport == "tcp":
        if cfg.control.port == -1:
            raise errors.Error(
                "[control] port is required when [control] transport = tcp")
        srv = server.TCPServer(
            "control", "localhost", cfg.control.port, r,
            prefer_ipv4=cfg.control.prefer_ipv4,
            limits=server.Limits.from_config(cfg))
    else:
        # vdsm and the engine only: owner and group (mode 0660).
        srv = server.UnixServer("control", cfg.control.socket, r, mode=0o660,
                                limits=server.Limits.from_config(cfg))
    return server.Service(srv)


def data_routes(cfg, store, unix_socket):
    """The /images routes, the same on the remote and local services."""
    img = images.Handler(cfg, store, unix_socket=unix_socket)
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
            return backend.create(
                ticket.url,
                run_dir=cfg.daemon.run_dir,
                read_only="write" not in ticket.ops,
                # Clients open up to max_connections workers plus a
                # connection for OPTIONS and extents; qemu-nbd queues
                # connections past --shared instead of serving them.
                shared=2 * cfg.daemon.max_connections,
                dirty=ticket.dirty)
        except ValueError as e:
            raise errors.InvalidTicket(
                f"Invalid value for 'url': {ticket.url!r}: {e}")
        except errors.ExportError as e:
            log.error("Cannot export transfer=%s: %s", ticket.transfer_id, e)
            raise errors.ExportError(
                f"Cannot serve transfer {ticket.transfer_id}: {e}")
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
