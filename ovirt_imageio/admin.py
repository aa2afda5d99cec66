"""
ovirt-imageioctl: manage tickets through the daemon's control service.

Finds the control socket (or TCP port) in the same configuration the
daemon reads, so `-c DIR` points both at the same daemon. Upstream's
syntax puts `-c` after the sub-command (`show-ticket -c DIR ID`); it may
come before it too.
"""

import argparse
import http.client
import json
import socket
import sys

from . import config


class UnixHTTPConnection(http.client.HTTPConnection):

    def __init__(self, path, timeout=60):
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class Error(Exception):

    def __init__(self, text, status=None, message=None):
        super().__init__(text)
        # The control service's answer, when it gave one.
        self.status = status
        self.message = message


class Client:
    """A small client of the control API."""

    def __init__(self, cfg, timeout=60):
        self.cfg = cfg
        self.timeout = timeout

    def _connect(self):
        c = self.cfg.control
        if c.transport == "tcp":
            return http.client.HTTPConnection(
                "localhost", c.port, timeout=self.timeout)
        return UnixHTTPConnection(c.socket, timeout=self.timeout)

    def request(self, method, ticket_id, body=None, expect=200):
        return self._request(method, f"/tickets/{ticket_id}", body=body,
                             expect=expect)

    def _request(self, method, path, body=None, expect=200):
        conn = self._connect()
        try:
            data = None if body is None else json.dumps(body).encode()
            headers = {}
            if data is not None:
                headers["content-type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            payload = resp.read()
        except OSError as e:
            raise Error(f"Cannot reach the control service: {e}")
        finally:
            conn.close()
        if resp.status != expect:
            message = payload.decode("utf-8", "replace").strip()
            raise Error(f"{resp.status} {resp.reason}: {message}",
                        status=resp.status, message=message)
        return payload

    def add(self, ticket):
        self.request("PUT", ticket["uuid"], body=ticket)

    def show(self, ticket_id):
        return json.loads(self.request("GET", ticket_id))

    def modify(self, ticket_id, timeout):
        self.request("PATCH", ticket_id, body={"timeout": timeout})

    def delete(self, ticket_id):
        self.request("DELETE", ticket_id, expect=204)

    def profile(self, run):
        """Start (run=True) or stop the daemon's profiler (API.md 2.5)."""
        path = "/profile/?run=" + ("y" if run else "n")
        try:
            self._request("POST", path)
        except Error as e:
            if e.status == 404:
                # Upstream's answer when its profiler (yappi) is missing.
                raise Error(f"Profiling is not supported by the daemon: "
                            f"{e.message}")
            raise


DEFAULT_CONF_DIR = "/etc/ovirt-imageio"


def parse_args(argv=None):
    conf_help = (f"the daemon's configuration directory (default "
                 f"{DEFAULT_CONF_DIR})")
    p = argparse.ArgumentParser(
        prog="ovirt-imageioctl",
        description="Manage ovirt-imageio tickets through the control "
                    "service.")
    p.add_argument("-c", "--conf-dir", default=DEFAULT_CONF_DIR,
                   help=conf_help)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, help):
        cmd = sub.add_parser(name, help=help)
        # After the sub-command, as upstream; SUPPRESS keeps a -c given
        # before it when this one is absent.
        cmd.add_argument("-c", "--conf-dir", default=argparse.SUPPRESS,
                         help=conf_help)
        return cmd

    add = command("add-ticket", help="add a ticket from a JSON file")
    add.add_argument("filename", help="ticket JSON file, - for stdin")

    show = command("show-ticket", help="print a ticket's status")
    show.add_argument("ticket_id")

    mod = command("mod-ticket", help="extend a ticket")
    mod.add_argument("ticket_id")
    mod.add_argument("--timeout", type=int, required=True,
                     help="expire TIMEOUT seconds from now")

    delete = command("del-ticket", help="cancel and remove a ticket")
    delete.add_argument("ticket_id")

    command("start-profile", help="start profiling the daemon")
    command("stop-profile",
            help="stop profiling the daemon and write the profile")

    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg = config.load(args.conf_dir)
        client = Client(cfg)
        if args.command == "add-ticket":
            client.add(read_ticket(args.filename))
        elif args.command == "show-ticket":
            print(json.dumps(client.show(args.ticket_id), indent=2))
        elif args.command == "mod-ticket":
            if args.timeout < 0:
                raise Error("--timeout must be >= 0")
            client.modify(args.ticket_id, args.timeout)
        elif args.command == "del-ticket":
            client.delete(args.ticket_id)
        elif args.command == "start-profile":
            client.profile(True)
        elif args.command == "stop-profile":
            client.profile(False)
    except (config.Error, Error) as e:
        sys.exit(f"ovirt-imageioctl: {e}")


def read_ticket(filename):
    try:
        if filename == "-":
            ticket = json.load(sys.stdin)
        else:
            with open(filename, "rb") as f:
                ticket = json.load(f)
    except (OSError, ValueError) as e:
        raise Error(f"Cannot read ticket {filename}: {e}")
    if not isinstance(ticket, dict) or not isinstance(ticket.get("uuid"), str):
        raise Error(f"Invalid ticket {filename}: expecting a JSON object "
                    f"with a 'uuid' string")
    return ticket
