"""
ovirt-imageioctl: manage tickets through the daemon's control service,
and watch its transfers (status: a table of tickets and connections,
redrawn in place like top; --once and -o json for scripts).

Finds the control socket (or TCP port) in the same configuration the
daemon reads, so `-c DIR` points both at the same daemon. Upstream's
syntax puts `-c` after the sub-command (`show-ticket -c DIR ID`); it may
come before it too.
"""

import argparse
import http.client
import json
import signal
import socket
import sys
import time

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

    def transfers(self):
        """The listing of tickets and connections (GET /transfers/)."""
        return json.loads(self._request("GET", "/transfers/"))

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

    status = command(
        "status", help="show transfers and their connections, refreshed "
                       "like top (q or Ctrl-C quits)")
    status.add_argument("--once", action="store_true",
                        help="print once and exit")
    status.add_argument("-o", "--output", choices=("text", "json"),
                        default="text",
                        help="a table, or a JSON document per refresh "
                             "(default text)")
    status.add_argument("-n", "--interval", type=positive_float,
                        default=2.0, metavar="SECONDS",
                        help="seconds between refreshes (default 2)")

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
        elif args.command == "status":
            show_status(client, args)
        elif args.command == "start-profile":
            client.profile(True)
        elif args.command == "stop-profile":
            client.profile(False)
    except (config.Error, Error) as e:
        sys.exit(f"ovirt-imageioctl: {e}")


def positive_float(value):
    try:
        f = float(value)
    except ValueError:
        f = 0
    if not f > 0:
        raise argparse.ArgumentTypeError(f"expecting seconds > 0: {value!r}")
    return f


# Status.

# Clear the screen from the top: the table is redrawn in place.
CLEAR = "\x1b[H\x1b[2J"


def show_status(client, args):
    """Print the listing once, or refresh it every interval until
    interrupted."""
    rates = Rates()
    if args.once:
        print(status_text(client, args, rates), end="")
        return
    # A SIGTERM (or the terminal closing) ends it like Ctrl-C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    try:
        while True:
            text = status_text(client, args, rates)
            if args.output == "text":
                text = CLEAR + text
            sys.stdout.write(text)
            sys.stdout.flush()
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass


def status_text(client, args, rates):
    listing = client.transfers()
    rates.update(listing)
    if args.output == "json":
        return json.dumps(listing, sort_keys=True) + "\n"
    return render(listing)


class Rates:
    """
    Each connection's rate: bytes moved since the last listing, per
    second; for the first listing of a connection, its average since it
    opened. Added to the listing as "rate" (bytes per second).
    """

    def __init__(self):
        self._last = {}

    def update(self, listing):
        now = listing["time"]
        seen = {}
        for t in listing["transfers"]:
            for c in t["clients"]:
                key = (t["transfer_id"], c.get("connection"))
                prev = self._last.get(key)
                if prev is not None and now > prev[0]:
                    c["rate"] = (c["bytes"] - prev[1]) / (now - prev[0])
                elif c.get("seconds"):
                    c["rate"] = c["bytes"] / c["seconds"]
                else:
                    c["rate"] = 0.0
                seen[key] = (now, c["bytes"])
        self._last = seen


def render(listing):
    """The status: a table of tickets, then one of their connections."""
    transfers = listing["transfers"]
    stamp = time.strftime("%Y-%m-%d %H:%M:%S",
                          time.localtime(listing["time"]))
    conns = [(t, c) for t in transfers for c in t["clients"]]
    lines = [f"ovirt-imageio {stamp}: {len(transfers)} transfers, "
             f"{len(conns)} connections", ""]
    rows = [("TRANSFER", "OPS", "SIZE", "DONE", "READ", "WRITTEN", "ZEROED",
             "CONNS", "ERRORS", "STATE")]
    for t in transfers:
        rows.append((
            t["transfer_id"], ",".join(t["ops"]), humansize(t["size"]),
            _done(t), humansize(t["read_bytes"]),
            humansize(t["written_bytes"]), humansize(t["zeroed_bytes"]),
            str(t["connections"]), str(t["failed_requests"]), _state(t)))
    lines.extend(_columns(rows))
    if conns:
        lines.append("")
        rows = [("TRANSFER", "CONN", "SERVICE", "CLIENT", "BYTES", "RATE",
                 "AGE", "STATE")]
        for t, c in conns:
            rows.append((
                t["transfer_id"], str(c.get("connection", "-")),
                c.get("service", "-"), str(c.get("client", "-")),
                humansize(c["bytes"]), f"{humansize(c['rate'])}/s",
                f"{c.get('seconds', 0):.0f}s",
                "busy" if c["active"] else "idle"))
        lines.extend(_columns(rows))
    return "\n".join(lines) + "\n"


def _done(t):
    if "transferred" not in t or not t["size"]:
        return "-"
    return f"{100 * t['transferred'] // t['size']}%"


def _state(t):
    if t["canceled"]:
        return "canceled"
    if t.get("error"):
        return "error"
    if t["active"]:
        return "active"
    return f"idle {t['idle_time']}s"


def _columns(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip()
            for r in rows]


def humansize(n):
    """1536 -> '1.5K'."""
    for unit in ("B", "K", "M", "G", "T", "P"):
        if n < 1024 or unit == "P":
            break
        n /= 1024
    if unit == "B":
        return f"{n:.0f}B"
    return f"{n:.1f}{unit}"


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
