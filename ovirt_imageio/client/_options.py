"""
ovirt-img's command line and configuration file, with upstream
ovirt-img 2.5.1's options, defaults and config keys (ENGINE-SIM.md 4.1).

An option may come from the command line or from a section of the
configuration file (`-c SECTION`); the command line wins, then the
config, then the default. Every value, from either place, goes through
the same validation; a bad one is a usage error (exit 2) that names the
option or the config key and quotes the value.

    [engine1]
    engine_url = https://engine1.example.com
    username = admin@internal
    password = secret
    cafile = /etc/pki/ovirt-engine/ca.pem
"""

import argparse
import configparser
import os
import re
import unicodedata
import uuid

from ovirt_imageio import version

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

CONFIG_NAME = "ovirt-img.conf"

# Upstream's limits.
MIN_WORKERS = 1
MAX_WORKERS = 8
MIN_BUFFER_SIZE = 64 * KiB
MAX_BUFFER_SIZE = 16 * MiB

# A unit may be spelled k, kb or kib; a bare "b" or "ib" is not one.
_SIZE = re.compile(r"(\d+)\s*(?:([kmgt])(?:i?b)?)?", re.I)
_UNITS = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}
_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")


class Invalid(ValueError):
    """A value that does not parse; the message says what is expected."""


# Value parsers: text -> value, raising Invalid.

def size(text):
    """'4m' -> 4194304; suffixes k, m, g, t (KiB...TiB), any case."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise Invalid("expected a size like 4194304, 64k or 4m")
    return int(m.group(1)) * _UNITS[(m.group(2) or "").lower()]


def size_between(low, high):
    def parse(text):
        n = size(text)
        if not low <= n <= high:
            raise Invalid(f"expected a size from {_human(low)} to "
                          f"{_human(high)}")
        return n
    return parse


def integer_between(low, high):
    def parse(text):
        try:
            n = size(text)
        except Invalid:
            raise Invalid(f"expected an integer from {low} to {high}")
        if not low <= n <= high:
            raise Invalid(f"expected an integer from {low} to {high}")
        return n
    return parse


def positive_integer(text):
    try:
        n = int(text.strip())
    except ValueError:
        raise Invalid("expected a positive integer")
    if n < 1:
        raise Invalid("expected a positive integer")
    return n


def boolean(text):
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise Invalid(f"expected one of {', '.join(_TRUE + _FALSE)}")


def choice(*values):
    def parse(text):
        if text not in values:
            raise Invalid(f"expected one of {', '.join(values)}")
        return text
    return parse


def text(value):
    """Any text but control characters (C0, DEL, C1): a name or a path
    cannot hold them, and they would reach the terminal and the log."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise Invalid("control characters are not allowed")
    return value


def url(value):
    value = value.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", value):
        raise Invalid("expected an http:// or https:// URL")
    return value


def disk_id(value):
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise Invalid("expected a UUID")


def host_port(value):
    """"localhost:9100", "[::1]:9100", ":9100" (every address) ->
    (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise Invalid(f"expecting HOST:PORT: {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def existing_file(value):
    if not os.path.isfile(value):
        raise Invalid("no such file")
    return value


def _human(n):
    for unit, factor in (("g", GiB), ("m", MiB), ("k", KiB)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


class Option:
    """
    One option: its flags, the config key it may come from (None: command
    line only), the parser of its value, its default (None: unset) and
    whether the command needs it.
    """

    def __init__(self, *flags, key=None, type=text, default=None,
                 required=False, metavar=None, help=None, choices=None,
                 config=True):
        self.flags = flags
        self.dest = flags[-1].lstrip("-").replace("-", "_")
        self.key = (key or self.dest) if config else None
        self.type = type
        self.default = default
        self.required = required
        self.metavar = metavar
        self.help = help
        self.choices = choices

    def add_to(self, parser):
        # argparse keeps the text; values are parsed in resolve(), the
        # same way for the command line and the config file.
        parser.add_argument(*self.flags, dest=self.dest, default=None,
                            metavar=self.metavar, help=self.help,
                            choices=self.choices)


class Repeated(Option):
    """
    An option that may be given several times (command line only): a
    list of texts, or None. Values are checked with text() only; the
    command parses them, so that an error need not quote a value that
    may be a secret.
    """

    def __init__(self, *flags, **kwargs):
        super().__init__(*flags, type=_texts, config=False, **kwargs)

    def add_to(self, parser):
        parser.add_argument(*self.flags, dest=self.dest, action="append",
                            default=None, metavar=self.metavar,
                            help=self.help)


def _texts(values):
    for value in values:
        if any(unicodedata.category(c) == "Cc" for c in value):
            raise Invalid("control characters are not allowed")
    return values


class Flag(Option):
    """
    An on/off option: --NAME sets it; with negate, --no-NAME clears it.
    From the config, a boolean (1/yes/true/on, 0/no/false/off).
    """

    def __init__(self, *flags, negate=False, invert=False, **kwargs):
        super().__init__(*flags, type=boolean, **kwargs)
        self.negate = negate
        # --insecure is stored as secure=False, its config key "secure".
        self.invert = invert

    def add_to(self, parser):
        action = (argparse.BooleanOptionalAction if self.negate
                  else "store_true")
        parser.add_argument(*self.flags, dest=self.dest, action=action,
                            default=None, help=self.help)


COMMON = (
    Option("-c", "--config", metavar="SECTION", config=False,
           help=f"read options from this section of $XDG_CONFIG_HOME/"
                f"{CONFIG_NAME} (default ~/.config/{CONFIG_NAME})"),
    Option("--engine-url", type=url, required=True,
           help="the engine's URL, e.g. https://engine.example.com"),
    Option("--username", required=True,
           help="engine user name, e.g. admin@internal"),
    Option("--password-file", config=False, type=existing_file,
           help="read the password from this file (default: the config "
                "file's password, else ask)"),
    Option("--cafile", help="CA certificates to verify the engine and the "
                            "hosts with (default: the system's)"),
    Flag("--insecure", key="secure", invert=True, default=False,
         help="do not verify the engine's and the hosts' certificates"),
    Option("-o", "--output", choices=("text", "json"), config=False,
           type=choice("text", "json"), default="text",
           help="progress as a text line or JSON lines (default text)"),
    Option("--progress-file", metavar="PATH", config=False,
           help="also write the progress as Prometheus text to PATH, "
                "rewritten atomically every second; the last value stays "
                "after exit"),
    Option("--progress-listen", metavar="HOST:PORT", config=False,
           type=host_port,
           help="also serve the progress as Prometheus text at "
                "http://HOST:PORT/metrics while the command runs"),
    Option("--log-file", help="log to this file (default: stderr)"),
    Option("--log-level", choices=("debug", "info", "warning", "error"),
           type=choice("debug", "info", "warning", "error"),
           default="warning", help="default warning"),
    Option("-d", "--description", default="Uploaded by ovirt-img",
           help="the new disk's description (upload-disk)"),
    Option("--max-workers", type=integer_between(MIN_WORKERS, MAX_WORKERS),
           config=False, default=4,
           help=f"connections to use ({MIN_WORKERS}-{MAX_WORKERS}, "
                f"default 4; at most what the server allows)"),
    Option("--buffer-size", config=False,
           type=size_between(MIN_BUFFER_SIZE, MAX_BUFFER_SIZE),
           default=4 * MiB,
           help="bytes per request and worker (64k-16m, default 4m)"),
)

# Config-only keys: (key, parser, default).
CONFIG_ONLY = (
    ("password", str, None),
    ("disk_timeout", positive_integer, 120),
    # import-glance, export-glance: the Keystone token, if no
    # --token-file.
    ("glance_token", str, None),
)


class Parser(argparse.ArgumentParser):
    """
    An ArgumentParser whose parse_args() also reads the configuration
    file and validates every value (usage errors exit 2).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.commands = {}

    def parse_args(self, args=None, namespace=None, environ=os.environ):
        ns = super().parse_args(args, namespace)
        if getattr(ns, "command", None) is None:
            self.print_help()
            self.exit(2)
        command = self.commands[ns.command]
        return command.resolve(ns, environ)


class Command:
    """A subcommand: its options (COMMON plus its own) and its function."""

    def __init__(self, parser, name, func, help, options, positionals=(),
                 validate=None):
        """validate(ns) returns a usage error message, or None."""
        self.parser = parser
        self.name = name
        self.func = func
        self.validate = validate
        self.options = COMMON + tuple(options)
        self.sub = parser.subparsers.add_parser(name, help=help,
                                                description=help)
        for opt in self.options:
            opt.add_to(self.sub)
        for args, kwargs in positionals:
            self.sub.add_argument(*args, **kwargs)
        self.sub.set_defaults(command=name)
        parser.commands[name] = self

    def error(self, message):
        self.sub.error(message)

    def resolve(self, ns, environ):
        """Merge the config section into ns and validate everything."""
        section = {}
        path = None
        if ns.config is not None:
            path = config_path(environ)
            section = read_section(self, path, ns.config)
        for opt in self.options:
            if opt.dest == "config":
                continue
            value = getattr(ns, opt.dest)
            if isinstance(opt, Flag):
                if value is None and opt.key in section:
                    value = self._config_value(path, ns.config, opt.key,
                                               opt.type, section)
                    # The config says secure=yes for --insecure off.
                    value = not value if opt.invert else value
                elif value is None:
                    value = opt.default
            elif value is not None:
                value = self._value(opt.flags[-1], opt.type, value)
            elif (opt.key is not None and opt.key in section
                  and (section[opt.key] or opt.required)):
                # An empty optional key ("cafile =") means the default.
                value = self._config_value(path, ns.config, opt.key,
                                           opt.type, section)
            else:
                value = opt.default
            setattr(ns, opt.dest, value)
        for key, parse, default in CONFIG_ONLY:
            if key in section:
                value = self._config_value(path, ns.config, key, parse,
                                           section)
            else:
                value = default
            if getattr(ns, key, None) is None:
                setattr(ns, key, value)
        missing = [opt.key or opt.dest for opt in self.options
                   if opt.required and getattr(ns, opt.dest) in (None, "")]
        if missing:
            self.error(f"Missing required options: {', '.join(missing)}")
        ns.secure = not ns.insecure
        ns.func = self.func
        if self.validate is not None:
            message = self.validate(ns)
            if message:
                self.error(message)
        return ns

    def _value(self, flag, parse, value):
        try:
            return parse(value)
        except Invalid as e:
            if isinstance(value, list):
                # A repeated option's values may be secrets (--header).
                self.error(f"argument {flag}: invalid value: {e}")
            self.error(f"argument {flag}: invalid value {value!r}: {e}")

    def _config_value(self, path, name, key, parse, section):
        value = section[key]
        try:
            return parse(value)
        except Invalid as e:
            self.error(f"Invalid value for {key!r} in section [{name}] of "
                       f"{path}: {value!r}: {e}")


def config_path(environ=os.environ):
    """$XDG_CONFIG_HOME/ovirt-img.conf, or ~/.config/ovirt-img.conf."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config")
    return os.path.join(base, CONFIG_NAME)


def read_section(command, path, name):
    cfg = configparser.ConfigParser(interpolation=None)
    try:
        with open(path, encoding="utf-8") as f:
            cfg.read_file(f)
    except FileNotFoundError:
        command.error(f"No configuration file {path} (for -c {name})")
    except (OSError, UnicodeDecodeError, configparser.Error) as e:
        command.error(f"Cannot read configuration file {path}: "
                      f"{str(e).splitlines()[0]}")
    if not cfg.has_section(name):
        command.error(f"No section [{name}] in {path}")
    return dict(cfg.items(name))


def parser(prog="ovirt-img"):
    p = Parser(prog=prog, description="Transfer disk images to and from "
                                      "an oVirt setup.")
    p.add_argument("--version", action="version",
                   version=f"{prog} {version.string}")
    p.subparsers = p.add_subparsers(title="commands", metavar="COMMAND")
    return p
