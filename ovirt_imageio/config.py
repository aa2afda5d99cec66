"""
Daemon configuration: documented defaults, overridden by INI files.

State: process. load() runs once at start-up; the Config it returns is never
changed afterwards, so every thread may read it without locking.

Files are read from DIR/conf.d/*.conf (DIR is --conf-dir, default
/etc/ovirt-imageio; at least one file must exist there, so a mistyped
--conf-dir fails fast, upstream issue #33) and from
/usr/lib/ovirt-imageio/conf.d/*.conf. All of them are sorted by basename only
and read in that order, each one overriding the keys it sets:

    /usr/lib/ovirt-imageio/conf.d/50-vendor.conf
    /etc/ovirt-imageio/conf.d/60-vdsm.conf      overrides 50-vendor.conf
    /usr/lib/ovirt-imageio/conf.d/70-vendor.conf overrides 60-vdsm.conf
    /etc/ovirt-imageio/conf.d/99-local.conf     overrides everything

When both directories hold a file with the same basename, the one in DIR is
read last, so the administrator wins.

Each file is parsed with configparser.RawConfigParser (no interpolation, so
"%(asctime)s" stays literal; "#" and ";" comments; key names are case
insensitive, section names are not; a [DEFAULT] section applies to the
sections of the same file). Unknown sections and keys are ignored, as
upstream does. Values take the type of their default; a value that cannot be
converted, or that would break the daemon, fails the start-up with an error
naming the file, section, key and value.
"""

import configparser
import glob
import logging
import math
import os
import types

VENDOR_DIR = "/usr/lib/ovirt-imageio"

MiB = 1024**2

# The defaults, in the order --show-config prints them. Sections and keys are
# upstream's, since vdsm and engine-setup write them.
DEFAULTS = {
    "daemon": {
        # Seconds between checks of termination conditions. Shorter stops the
        # daemon faster, at the cost of waking up more often.
        "poll_interval": 1.0,
        # Connections per ticket advertised to clients in OPTIONS
        # (max_readers/max_writers); advisory, extra connections are not
        # refused. More connections speed up one transfer, but slow down
        # concurrent transfers competing for the same storage.
        "max_connections": 8,
        # Seconds before an idle connection is closed, for tickets that do
        # not set their own inactivity_timeout. Longer tolerates slow clients,
        # but keeps dead clients' connections and backends open longer.
        "inactivity_timeout": 60,
        # Seconds from accepting a TLS connection to the end of its
        # handshake. A client trickling its ClientHello holds a thread and
        # an fd until then; a real handshake takes milliseconds, so this
        # only needs room for a slow network.
        "handshake_timeout": 10.0,
        # Seconds from the first byte of a request to the end of its
        # headers (a request line and a few headers, sent at once by every
        # client). Shorter frees connections of clients trickling headers
        # sooner; too short fails clients on a congested network. Waiting
        # idle between requests is not bounded by this but by the
        # ticket's inactivity timeout.
        "header_timeout": 30.0,
        # Connections per service (remote, local, control) that have not
        # authorized a ticket yet (still handshaking, reading headers, or
        # idle before their first ticket request). Past it the oldest is
        # closed and logged: a flood of connections evicts itself, and a
        # new client still gets in. Each costs a thread and an fd; the
        # unit's LimitNOFILE is sized for 3 x 512 of them plus 1,500
        # transfer connections.
        "max_unauthorized_connections": 512,
        # Bytes of buffers for data crossing TLS, shared by every
        # connection: a data request over HTTPS (GET, PUT) holds one piece
        # (half [backend_nbd] buffer_size, 4 MiB by default) while it runs,
        # and only the pages it touches are resident; an idle connection
        # and the unix socket hold none. The default serves 64 transfer
        # requests at once; more wait for a buffer. Larger serves more
        # concurrent requests over HTTPS at the cost of memory.
        "buffer_memory": 256 * MiB,
        # Seconds a data request waits for a free buffer before it is
        # answered 503 with Retry-After, so clients retry later instead of
        # piling up. 0 answers at once.
        "buffer_wait_timeout": 30.0,
        # Run directory (sockets, profile). For development only: vdsm and
        # systemd (RuntimeDirectory) assume the default.
        "run_dir": "/run/ovirt-imageio",
        # Start as root (to bind and open root-owned images) and then run as
        # user_name:group_name. Turned off only by tests running as a user.
        "drop_privileges": True,
        # Identity after dropping privileges; vdsm gives this group access to
        # images and to the control socket.
        "user_name": "ovirtimg",
        "group_name": "ovirtimg",
        # Send READY=1 to systemd (Type=notify) once listening, so that
        # vdsm's dependency on us waits until tickets can be added. Turned off
        # when not run by systemd.
        "systemd_enable": True,
    },
    "tls": {
        # Without TLS, tickets and image data cross the network in clear
        # text; turned off only for development.
        "enable": True,
        # Server key and certificate; required when TLS is enabled.
        "key_file": "",
        "cert_file": "",
        # CA bundle used as the trust store; empty uses the system's CAs.
        "ca_file": "",
        # Allow TLS 1.1 for legacy clients that cannot do 1.2, at the cost of
        # a weaker protocol. By default TLS 1.2 is the minimum.
        "enable_tls1_1": False,
    },
    "backend_file": {
        # Bytes per read or write, and per connection in memory. 8 MiB gave
        # the best throughput on both low- and high-end iSCSI and FC storage
        # upstream; larger buffers gained little and sometimes lost a lot.
        "buffer_size": 8 * MiB,
    },
    "backend_http": {
        # CA that signed the hosts' certificates, used by the proxy to verify
        # the daemons it talks to; empty uses [tls] ca_file. Needed only when
        # the two CAs differ.
        "ca_file": "",
        # Twice the piece streamed at a time through the proxy (each client
        # request is one request to the daemon), taken from [daemon]
        # buffer_memory while a request runs, and the granularity of
        # "transferred" progress.
        "buffer_size": 8 * MiB,
    },
    "backend_nbd": {
        # Twice the piece moved at a time over TLS (one NBD read or write
        # request), taken from [daemon] buffer_memory while a request runs,
        # and the granularity of "transferred" progress. Plain connections
        # (the unix socket) splice data and use no buffer. A piece is at
        # most 8 MiB (one NBD request), so more than 16 MiB buys nothing.
        "buffer_size": 8 * MiB,
        # Seconds an NBD connection may wait for the server without any
        # progress (handshake, a reply, a send) before the request fails
        # with a 500 and the connection is closed. Without it a hung
        # export holds a thread and two descriptors per request forever.
        # Generous: a slow export is not a hung one (one request, such as
        # a 1 GiB zero on slow storage, must finish within it); shorter
        # frees threads sooner but may fail transfers on busy storage.
        # Canceling a ticket (DELETE) interrupts blocked I/O at once,
        # whatever this says.
        "timeout": 300.0,
    },
    "remote": {
        # Address of the HTTPS service. "::" listens on every interface, IPv4
        # and IPv6; "0.0.0.0" on IPv4 only.
        "host": "::",
        # Changing the port needs matching firewall rules and engine
        # configuration. The engine host's proxy uses 54323.
        "port": 54322,
        # Serve the upload and download page at / (its files are the
        # package's ovirt_imageio/http/static/): a browser uploads to and
        # downloads from a transfer URL without the engine's UI. The page
        # holds no secret; a ticket id is typed in it, never sent in its
        # URL. false answers 404 for the page, as upstream.
        "page": True,
        # A CA certificate (PEM) offered at /ca.pem, for users to import
        # so their browser trusts this service's certificate (the page
        # links to it when its test connection fails). Usually the file
        # of [tls] ca_file, named here on purpose: it is public, but
        # serving it is the administrator's choice. Empty offers none.
        "offer_ca_file": "",
    },
    "local": {
        # Serve /images over a unix socket, letting clients on this host skip
        # TLS and TCP for faster transfers. Disabled on the engine host.
        "enable": True,
        # Linux abstract socket: no file to clean up or protect. An empty
        # value binds a random abstract name; a path binds a file socket.
        # Clients learn the address from OPTIONS, so it need not be fixed.
        "socket": "\0/org/ovirt/imageio",
    },
    "control": {
        # The control service manages tickets; without it no transfer can
        # start. Turned off only in container mode (--ticket).
        "enable": True,
        # "unix" (vdsm) or "tcp" (engine, whose Java client cannot use unix
        # sockets). Unix is safer: only the ovirtimg group may connect, while
        # any local user can reach a TCP port.
        "transport": "unix",
        # Control socket for the unix transport; vdsm hard-codes this path.
        "socket": "/run/ovirt-imageio/sock",
        # Port for the tcp transport, on localhost. -1: unset, and required
        # with tcp; 0: a random port (tests). Engine uses 54324.
        "port": -1,
        # Resolve "localhost" to IPv4 first: Java clients may try only one
        # address on a dual-stack host.
        "prefer_ipv4": True,
        # Seconds DELETE /tickets waits for the ticket's connections to go
        # before failing with 409 Conflict. Longer lets in-flight requests
        # finish, but blocks the caller (engine, vdsm) longer.
        "remove_timeout": 60,
    },
    "metrics": {
        # /metrics (Prometheus text format) is always served on the control
        # service; enable also serves it, alone, over plain HTTP on
        # host:port, for a Prometheus that cannot reach the control
        # socket. Never on the remote port: a ticket holder could read
        # other transfers. Any local user can reach a localhost port; the
        # metrics name transfers by transfer id, never by ticket id.
        "enable": False,
        "host": "localhost",
        # 0: a random port (tests).
        "port": 54325,
    },
    "profile": {
        # Where /profile/ writes profiling data.
        "filename": "/run/ovirt-imageio/profile",
    },
    "proxy": {
        # Accept tickets signed by the engine on the remote service, as the
        # 1.x proxy did (oVirt 4.0-4.2 engines and clients: Authorization
        # headers, /sessions/, PUT /tickets/ on the proxy's port). Off, only
        # tickets added over the control service are served. Only on the
        # engine host's proxy; needs python3-cryptography.
        "signed_tickets": False,
        # The engine's certificate, whose key signs the tickets. Empty uses
        # the certificate inside each ticket, which engine_ca_cert_file
        # must then certify.
        "engine_cert_file": "",
        # The CA that issued the engine's certificate (engine-setup's
        # /etc/pki/ovirt-engine/ca.pem).
        "engine_ca_cert_file": "",
        # Check the signer's certificate against engine_ca_cert_file
        # (issuer, the CA's signature, validity dates). Off trusts
        # engine_cert_file alone.
        "verify_certificate": True,
        # Seconds of tolerance for clocks that differ: a ticket is taken
        # that long before its start (validFrom, nbf) and after its end
        # (validTo, exp). Larger tolerates skewed clocks but lets an
        # expired ticket live longer.
        "allowed_skew_seconds": 0,
    },
    # Logging, in the format of logging.config.fileConfig. Only these
    # sections exist: deployments choose a handler and levels, nothing more.
    "loggers": {
        "keys": "root",
    },
    "handlers": {
        # "logfile" for the service, "stderr" for development and containers.
        "keys": "logfile",
    },
    "formatters": {
        "keys": "long",
    },
    "logger_root": {
        # INFO logs one line per operation; DEBUG adds per-request details at
        # the cost of a much larger log.
        "level": "INFO",
        "handlers": "logfile",
        "propagate": 0,
    },
    "handler_logfile": {
        # Rotating: 11 files of 20 MiB bound the disk used on the host.
        "class": "logging.handlers.RotatingFileHandler",
        "args": '("/var/log/ovirt-imageio/daemon.log",)',
        "kwargs": '{"maxBytes": 20971520, "backupCount": 10}',
        "level": "DEBUG",
        "formatter": "long",
    },
    "handler_stderr": {
        "class": "logging.StreamHandler",
        "args": "()",
        "level": "DEBUG",
        "formatter": "long",
    },
    "formatter_long": {
        # The thread name tells connections apart (thread per connection).
        "format": ("%(asctime)s %(levelname)-7s (%(threadName)s) "
                   "[%(name)s] %(message)s"),
    },
}

LOGGING_SECTIONS = (
    "loggers", "handlers", "formatters",
    "logger_root", "handler_logfile", "handler_stderr", "formatter_long",
)


class Error(Exception):
    """The configuration cannot be loaded; str() says where and why."""


class Config:
    """
    The effective configuration: one attribute per section, one attribute
    per key in it (cfg.daemon.max_connections). A key that is a Python
    keyword is read with getattr(cfg.handler_logfile, "class").
    cfg.files lists the files read, in order.
    """

    def __init__(self, sections, files):
        for name, values in sections.items():
            setattr(self, name, types.SimpleNamespace(**values))
        self.files = files


def load(conf_dir, vendor_dir=VENDOR_DIR):
    """
    Return the Config of the defaults overridden by conf_dir/conf.d/*.conf
    and vendor_dir/conf.d/*.conf. Raise Error if conf_dir has no such file,
    or a file is not valid INI, or a value is invalid.
    """
    files = _find_files(conf_dir, vendor_dir)
    sections = {name: dict(keys) for name, keys in DEFAULTS.items()}
    for path in files:
        for section, key, value in _read(path):
            if key in DEFAULTS.get(section, ()):
                sections[section][key] = _convert(path, section, key, value)

    _check_together(sections)
    return Config(sections, files)


def to_dict(cfg):
    """
    Return {section: {key: value}} in the order of DEFAULTS, for
    --show-config (json.dumps) and logging.
    """
    return {
        section: {key: getattr(getattr(cfg, section), key) for key in keys}
        for section, keys in DEFAULTS.items()
    }


def logging_config(cfg):
    """
    Return a RawConfigParser with the effective logging sections, for
    logging.config.fileConfig(parser, disable_existing_loggers=False).
    """
    values = to_dict(cfg)
    parser = configparser.RawConfigParser()
    parser.read_dict({name: values[name] for name in LOGGING_SECTIONS})
    return parser


def _check_together(sections):
    """Raise Error if keys valid alone do not work together."""
    control = sections["control"]
    if control["enable"] and control["transport"] == "tcp" \
            and control["port"] == -1:
        raise Error("Invalid configuration: [control] port must be set when "
                    "[control] transport is 'tcp'")

    daemon = sections["daemon"]
    for backend in ("backend_nbd", "backend_http"):
        piece = sections[backend]["buffer_size"] // 2
        if daemon["buffer_memory"] < piece:
            raise Error(f"Invalid configuration: [daemon] buffer_memory "
                        f"must be at least half of [{backend}] buffer_size "
                        f"({piece} bytes)")

    # fileConfig fails with a bare KeyError on a root handler that is not
    # configured in [handlers].
    configured = _names(sections["handlers"]["keys"])
    for name in _names(sections["logger_root"]["handlers"]):
        if name not in configured:
            raise Error(f"Invalid configuration: [logger_root] handlers "
                        f"uses {name!r}, missing in [handlers] keys")


def _names(value):
    """Return the names of a comma-separated logging keys value."""
    return [n.strip() for n in value.split(",") if n.strip()]


def _find_files(conf_dir, vendor_dir):
    pattern = os.path.join(conf_dir, "conf.d", "*.conf")
    admin = glob.glob(pattern)
    if not admin:
        raise Error(f"Could not find {pattern}")
    vendor = glob.glob(os.path.join(vendor_dir, "conf.d", "*.conf"))
    # For the same basename the admin's file sorts after the vendor's.
    order = [(os.path.basename(p), 0, p) for p in vendor]
    order += [(os.path.basename(p), 1, p) for p in admin]
    return [path for _, _, path in sorted(order)]


def _read(path):
    """Yield (section, key, value) of one file, keys in lower case."""
    parser = configparser.RawConfigParser()
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        reason = " ".join(str(e).splitlines())
        raise Error(f"Invalid configuration file {path}: {reason}") from e
    for section in parser.sections():
        for key, value in parser.items(section):
            yield section, key, value


def _convert(path, section, key, value):
    """Return value converted to the type of the key's default, validated."""
    default = DEFAULTS[section][key]
    try:
        # bool first: bool is a subclass of int.
        if isinstance(default, bool):
            result = _parse_bool(value)
        elif isinstance(default, int):
            result = _parse_int(value)
        elif isinstance(default, float):
            result = _parse_float(value)
        else:
            result = value

        check = CHECKS.get((section, key))
        if check:
            result = check(result)
    except ValueError as e:
        raise Error(f"Invalid value in {path} [{section}] {key}: "
                    f"{value!r} {e}") from None
    return result


def _parse_bool(value):
    try:
        return configparser.RawConfigParser.BOOLEAN_STATES[value.lower()]
    except KeyError:
        raise ValueError("is not a boolean (true/false, yes/no, on/off, 1/0)")


def _parse_int(value):
    try:
        return int(value)
    except ValueError:
        raise ValueError("is not an integer")


def _parse_float(value):
    try:
        result = float(value)
    except ValueError:
        raise ValueError("is not a number")
    if not math.isfinite(result):
        raise ValueError("is not a finite number")
    return result


# Checks of values that convert but would break the daemon. Each takes the
# converted value and returns the value to use, or raises ValueError with
# the end of the sentence "<value> ...".

def _at_least(minimum):
    def check(value):
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value
    return check


def _port(minimum):
    def check(value):
        if not minimum <= value <= 65535:
            raise ValueError(f"must be between {minimum} and 65535")
        return value
    return check


def _positive(value):
    if value <= 0:
        raise ValueError("must be greater than 0")
    return value


def _buffer_size(value):
    # Direct I/O (file backend) needs buffers aligned to the storage block
    # size, 4096 bytes at most on the storage oVirt supports.
    if value < 4096 or value % 4096:
        raise ValueError("must be a multiple of 4096, at least 4096")
    return value


def _one_of(*choices):
    def check(value):
        result = value.lower()
        if result not in choices:
            raise ValueError(f"must be one of: {', '.join(choices)}")
        return result
    return check


def _names_of(*choices):
    # A comma-separated list of the logging sections that exist here;
    # fileConfig fails at start-up on any other name.
    def check(value):
        names = _names(value)
        if not names or not set(names) <= set(choices):
            raise ValueError(f"must name some of: {', '.join(choices)}")
        return value
    return check


def _level(value):
    # fileConfig accepts level names only, in upper case.
    if not isinstance(logging.getLevelName(value), int):
        raise ValueError("is not a logging level (DEBUG, INFO, WARNING, "
                         "ERROR, CRITICAL)")
    return value


CHECKS = {
    ("daemon", "poll_interval"): _positive,
    ("daemon", "max_connections"): _at_least(1),
    # 0 would make sockets non-blocking (socket.settimeout(0)).
    ("daemon", "inactivity_timeout"): _at_least(1),
    ("daemon", "handshake_timeout"): _positive,
    ("daemon", "header_timeout"): _positive,
    ("daemon", "max_unauthorized_connections"): _at_least(1),
    ("daemon", "buffer_memory"): _at_least(4096),
    ("daemon", "buffer_wait_timeout"): _at_least(0),
    ("backend_file", "buffer_size"): _buffer_size,
    ("backend_http", "buffer_size"): _buffer_size,
    ("backend_nbd", "buffer_size"): _buffer_size,
    ("backend_nbd", "timeout"): _positive,
    ("remote", "port"): _port(0),
    ("control", "transport"): _one_of("unix", "tcp"),
    ("control", "port"): _port(-1),
    ("control", "remove_timeout"): _at_least(0),
    ("metrics", "port"): _port(0),
    ("proxy", "allowed_skew_seconds"): _at_least(0),
    ("loggers", "keys"): _names_of("root"),
    ("handlers", "keys"): _names_of("logfile", "stderr"),
    ("formatters", "keys"): _names_of("long"),
    ("logger_root", "level"): _level,
    ("logger_root", "handlers"): _names_of("logfile", "stderr"),
    ("handler_logfile", "level"): _level,
    ("handler_logfile", "formatter"): _names_of("long"),
    ("handler_stderr", "level"): _level,
    ("handler_stderr", "formatter"): _names_of("long"),
}
