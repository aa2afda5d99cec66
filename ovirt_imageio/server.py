"""
The ovirt-imageio daemon: reads the configuration, starts the services,
serves until SIGTERM or SIGINT, then stops cleanly, stopping every qemu-nbd
it started.
"""

import argparse
import grp
import json
import logging
import logging.config
import os
import pwd
import signal
import sys

from . import clock as _clock
from . import config
from . import errors
from . import systemd
from . import tickets
from . import version
from .http import metrics
from .http import services
from .nbd import qemu_nbd

log = logging.getLogger("server")


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config.load(args.conf_dir)
    except config.Error as e:
        sys.exit(f"ovirt-imageio: {e}")

    if args.show_config:
        print(json.dumps(config.to_dict(cfg), indent=4))
        return

    try:
        logging.config.fileConfig(
            config.logging_config(cfg), disable_existing_loggers=False)
    except Exception as e:
        sys.exit(f"ovirt-imageio: Cannot configure logging: {e}")

    log.info("Starting ovirt-imageio %s (pid=%s, conf_dir=%s)",
             version.string, os.getpid(), args.conf_dir)

    # Signals only set a flag and wake the main thread through this pipe.
    wakeup_r, wakeup_w = os.pipe()
    os.set_blocking(wakeup_w, False)
    signal.set_wakeup_fd(wakeup_w)
    for signo in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signo, lambda *_: None)

    daemon = Daemon(cfg)
    try:
        daemon.start()
        if cfg.daemon.drop_privileges:
            drop_privileges(cfg, daemon)
        # After dropping privileges: a file ticket's qemu-nbd must run as
        # the daemon's user, or the daemon could neither reach nor stop it.
        if args.ticket:
            daemon.add_ticket_file(args.ticket)
        if cfg.daemon.systemd_enable:
            systemd.notify("READY=1")
        log.info("Ready")
        signo = os.read(wakeup_r, 1)
        log.info("Received signal %d, shutting down",
                 signo[0] if signo else 0)
    except (errors.Error, OSError) as e:
        log.error("Cannot start: %s", e)
        sys.exit(f"ovirt-imageio: Cannot start: {e}")
    finally:
        daemon.stop()
    log.info("Stopped")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="ovirt-imageio",
        description="Serve virtual machine disk images by ticket.")
    p.add_argument(
        "-c", "--conf-dir", default="/etc/ovirt-imageio",
        help="configuration directory, holding conf.d/*.conf "
             "(default /etc/ovirt-imageio)")
    p.add_argument(
        "--show-config", action="store_true",
        help="print the effective configuration as JSON and exit")
    p.add_argument(
        "-t", "--ticket", metavar="FILE",
        help="install the ticket in FILE (JSON) at start")
    return p.parse_args(argv)


class Daemon:
    """The services and the ticket store; usable in-process by tests."""

    def __init__(self, cfg, clock=_clock.system):
        self.cfg = cfg
        self.store = tickets.Store(
            remove_timeout=cfg.control.remove_timeout,
            inactivity_timeout=cfg.daemon.inactivity_timeout,
            clock=clock)
        # One pool of data buffers for the remote and local services.
        self.buffers = services.buffer_pool(cfg)
        # What /metrics reads; every service reports its requests.
        self.metrics = metrics.Sources(self.store, metrics.Recorder(),
                                       self.buffers)
        self.services = []
        self.remote = self.local = self.control = None
        self.metrics_service = None
        # [proxy] signed_tickets: the engine's signed tickets, made at
        # start (it loads certificates and may fail).
        self.signed = None

    def start(self):
        cfg = self.cfg
        os.makedirs(cfg.daemon.run_dir, mode=0o750, exist_ok=True)
        try:
            if cfg.proxy.signed_tickets:
                self.signed = services.signed_tickets(cfg, self.store)
            unix_socket = None
            if cfg.local.enable:
                self.local = self._add(
                    services.local(cfg, self.store, self.buffers,
                                   self.metrics))
                unix_socket = self.local.server.address()
            self.remote = self._add(
                services.remote(cfg, self.store, unix_socket,
                                self.buffers, signed=self.signed,
                                metrics_sources=self.metrics))
            if cfg.control.enable:
                self.control = self._add(
                    services.control(cfg, self.store, self.metrics))
            if cfg.metrics.enable:
                self.metrics_service = self._add(
                    services.metrics_service(cfg, self.metrics))
        except BaseException:
            self.stop()
            raise
        for service in self.services:
            service.start()
            log.info("Serving %s on %r", service.name,
                     service.server.address())

    def _add(self, service):
        self.services.append(service)
        self.metrics.services.append(service)
        return service

    def add_ticket_file(self, path):
        try:
            with open(path, "rb") as f:
                info = json.load(f)
        except (OSError, ValueError, RecursionError) as e:
            raise errors.Error(f"Cannot read ticket {path!r}: {e}")
        ticket = self.store.create(info)
        ticket.resource = services.exporter(self.cfg)(ticket)
        self.store.add(ticket)

    def stop(self):
        for service in reversed(self.services):
            try:
                service.stop()
            except Exception:
                log.exception("Error stopping %s", service.name)
        self.services = []
        self.metrics.services = []
        # Removing the tickets stops the qemu-nbd processes they own.
        self.store.clear()
        if self.signed is not None:
            self.signed.close()
        qemu_nbd.stop_all()


def drop_privileges(cfg, daemon):
    """
    Started as root to bind privileged resources, run as the configured
    user from here on; the run dir, control socket and log files become its
    own. The control socket's group is group_name: its members (vdsm) may
    connect (mode 0660).

    The process keeps the user's supplementary groups (initgroups(), as
    upstream does): hosts give the user access to images and sockets of
    other services through them. Dropping is permanent: setuid() as root
    sets the real, effective and saved ids.
    """
    if os.geteuid() != 0:
        return
    try:
        user = pwd.getpwnam(cfg.daemon.user_name)
        group = grp.getgrnam(cfg.daemon.group_name)
    except KeyError as e:
        raise errors.Error(f"Cannot drop privileges: {e.args[0]}")
    paths = [cfg.daemon.run_dir]
    if daemon.control and cfg.control.transport == "unix":
        paths.append(cfg.control.socket)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "baseFilename", None):
            paths.append(handler.baseFilename)
    for path in paths:
        os.chown(path, user.pw_uid, group.gr_gid)
    os.initgroups(user.pw_name, group.gr_gid)
    os.setgid(group.gr_gid)
    os.setuid(user.pw_uid)
    log.info("Running as %s:%s", user.pw_name, group.gr_name)
