import configparser
import json
import logging
import logging.config
import logging.handlers
import textwrap

import pytest

from ovirt_imageio import config


@pytest.fixture
def conf_dir(tmp_path):
    path = tmp_path / "etc"
    (path / "conf.d").mkdir(parents=True)
    return path


@pytest.fixture
def vendor_dir(tmp_path):
    path = tmp_path / "usr"
    (path / "conf.d").mkdir(parents=True)
    return path


def write(directory, name, text):
    """Write directory/conf.d/name and return its path as a string."""
    path = directory / "conf.d" / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load(conf_dir, vendor_dir):
    return config.load(str(conf_dir), vendor_dir=str(vendor_dir))


# Defaults.

def test_defaults_with_empty_file(conf_dir, vendor_dir):
    path = write(conf_dir, "50-empty.conf", "")
    cfg = load(conf_dir, vendor_dir)

    assert cfg.files == [path]
    assert config.to_dict(cfg) == config.DEFAULTS
    assert cfg.daemon.max_connections == 8
    assert cfg.daemon.poll_interval == 1.0
    assert cfg.tls.enable is True
    assert cfg.local.socket == "\0/org/ovirt/imageio"
    assert cfg.control.transport == "unix"
    assert cfg.control.port == -1
    assert cfg.backend_nbd.buffer_size == 8 * 1024**2
    assert cfg.backend_nbd.timeout == 300.0
    assert cfg.logger_root.propagate == 0
    assert getattr(cfg.handler_logfile, "class") == \
        "logging.handlers.RotatingFileHandler"


def test_missing_vendor_dir_is_fine(conf_dir, tmp_path):
    write(conf_dir, "50-x.conf", "[daemon]\nmax_connections = 4\n")
    cfg = config.load(str(conf_dir), vendor_dir=str(tmp_path / "missing"))
    assert cfg.daemon.max_connections == 4


def test_defaults_are_not_shared(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", "[daemon]\nmax_connections = 4\n")
    load(conf_dir, vendor_dir)
    assert config.DEFAULTS["daemon"]["max_connections"] == 8


# Finding files.

def test_no_files(conf_dir, vendor_dir):
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == f"Could not find {conf_dir}/conf.d/*.conf"


def test_no_conf_dir(tmp_path, vendor_dir):
    with pytest.raises(config.Error) as e:
        load(tmp_path / "missing", vendor_dir)
    assert str(e.value) == f"Could not find {tmp_path}/missing/conf.d/*.conf"


def test_vendor_files_alone_are_not_enough(conf_dir, vendor_dir):
    # A mistyped --conf-dir must fail, even if the vendor ships files.
    write(vendor_dir, "50-vendor.conf", "[daemon]\nmax_connections = 4\n")
    with pytest.raises(config.Error, match="Could not find"):
        load(conf_dir, vendor_dir)


def test_only_conf_files_are_read(conf_dir, vendor_dir):
    path = write(conf_dir, "50-x.conf", "")
    write(conf_dir, "60-x.conf.rpmnew", "[daemon]\nmax_connections = 4\n")
    write(conf_dir, "README", "not ini")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.files == [path]
    assert cfg.daemon.max_connections == 8


# Layering.

def test_layering_by_basename(conf_dir, vendor_dir):
    vendor_50 = write(vendor_dir, "50-vendor.conf", """
        [daemon]
        max_connections = 2
        inactivity_timeout = 120
        poll_interval = 5.0
        """)
    admin_60 = write(conf_dir, "60-vdsm.conf", """
        [daemon]
        max_connections = 4
        inactivity_timeout = 300
        """)
    vendor_70 = write(vendor_dir, "70-vendor.conf", """
        [daemon]
        inactivity_timeout = 600
        """)
    cfg = load(conf_dir, vendor_dir)

    assert cfg.files == [vendor_50, admin_60, vendor_70]
    # Set only by vendor 50.
    assert cfg.daemon.poll_interval == 5.0
    # Admin 60 overrides vendor 50.
    assert cfg.daemon.max_connections == 4
    # Vendor 70 overrides admin 60.
    assert cfg.daemon.inactivity_timeout == 600
    # Set by nobody.
    assert cfg.daemon.run_dir == "/run/ovirt-imageio"


def test_same_basename_admin_wins(conf_dir, vendor_dir):
    vendor = write(vendor_dir, "50-x.conf", "[remote]\nport = 1111\n")
    admin = write(conf_dir, "50-x.conf", "[remote]\nport = 2222\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.files == [vendor, admin]
    assert cfg.remote.port == 2222


def test_later_file_overrides_only_its_keys(conf_dir, vendor_dir):
    write(conf_dir, "50-a.conf", "[tls]\nenable = false\nca_file = /a\n")
    write(conf_dir, "60-b.conf", "[tls]\nca_file = /b\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.tls.enable is False
    assert cfg.tls.ca_file == "/b"


# Parsing.

def test_unknown_sections_and_keys_ignored(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", """
        [daemon]
        max_connections = 4
        no_such_key = bad value

        [no_such_section]
        port = not a port

        [handler_syslog]
        class = logging.handlers.SysLogHandler
        """)
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.max_connections == 4
    assert not hasattr(cfg.daemon, "no_such_key")
    assert not hasattr(cfg, "no_such_section")
    assert "handler_syslog" not in config.to_dict(cfg)


def test_comments_and_key_case(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", """
        # A comment.
        ; Another comment.
        [daemon]
        # max_connections = 1
        MAX_Connections = 4
        """)
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.max_connections == 4


def test_section_names_are_case_sensitive(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", "[DAEMON]\nmax_connections = 4\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.max_connections == 8


def test_str_values_are_raw(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", """
        [local]
        socket =

        [tls]
        ca_file = "/quoted path/ca.pem"

        [formatter_long]
        format = %(levelname)s %(message)s
        """)
    cfg = load(conf_dir, vendor_dir)
    # Empty: a random abstract socket.
    assert cfg.local.socket == ""
    # No quote removal, no interpolation.
    assert cfg.tls.ca_file == '"/quoted path/ca.pem"'
    assert cfg.formatter_long.format == "%(levelname)s %(message)s"


def test_page_defaults(conf_dir, vendor_dir):
    # The page is served, no CA offered (http/static.py).
    write(conf_dir, "50-x.conf", "")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.remote.page is True
    assert cfg.remote.offer_ca_file == ""


# Conversion: (section, key, text, expected).
CONVERSIONS = [
    pytest.param("tls", "enable", "false", False, id="bool-false"),
    pytest.param("tls", "enable", "No", False, id="bool-no"),
    pytest.param("tls", "enable", "0", False, id="bool-0"),
    pytest.param("tls", "enable", "OFF", False, id="bool-off"),
    pytest.param("tls", "enable_tls1_1", "TRUE", True, id="bool-true"),
    pytest.param("tls", "enable_tls1_1", "yes", True, id="bool-yes"),
    pytest.param("tls", "enable_tls1_1", "1", True, id="bool-1"),
    pytest.param("tls", "enable_tls1_1", "On", True, id="bool-on"),
    pytest.param("daemon", "max_connections", "16", 16, id="int"),
    pytest.param("remote", "port", "0", 0, id="int-zero-port"),
    pytest.param("control", "port", "-1", -1, id="int-negative"),
    pytest.param("backend_nbd", "buffer_size", "4194304", 4 * 1024**2,
                 id="int-buffer-size"),
    pytest.param("backend_nbd", "timeout", "0.5", 0.5, id="nbd-timeout"),
    pytest.param("daemon", "poll_interval", "0.5", 0.5, id="float"),
    pytest.param("daemon", "poll_interval", "2", 2.0, id="float-from-int"),
    pytest.param("remote", "host", "0.0.0.0", "0.0.0.0", id="str"),
    pytest.param("remote", "page", "false", False, id="remote-page"),
    pytest.param("remote", "offer_ca_file", "/etc/pki/ca.pem",
                 "/etc/pki/ca.pem", id="remote-offer-ca-file"),
    pytest.param("control", "socket", "/tmp/sock", "/tmp/sock",
                 id="str-path"),
    pytest.param("logger_root", "propagate", "1", 1, id="int-logging"),
    pytest.param("logger_root", "level", "DEBUG", "DEBUG", id="level"),
]


@pytest.mark.parametrize("section,key,text,expected", CONVERSIONS)
def test_convert(conf_dir, vendor_dir, section, key, text, expected):
    write(conf_dir, "50-x.conf", f"[{section}]\n{key} = {text}\n")
    cfg = load(conf_dir, vendor_dir)
    value = getattr(getattr(cfg, section), key)
    assert value == expected
    assert type(value) is type(expected)


# Invalid values: (section, key, text, reason).
INVALID = [
    pytest.param("tls", "enable", "maybe",
                 "is not a boolean (true/false, yes/no, on/off, 1/0)",
                 id="bool"),
    pytest.param("tls", "enable", "",
                 "is not a boolean (true/false, yes/no, on/off, 1/0)",
                 id="bool-empty"),
    pytest.param("daemon", "max_connections", "many", "is not an integer",
                 id="int"),
    pytest.param("daemon", "max_connections", "1.5", "is not an integer",
                 id="int-float"),
    pytest.param("daemon", "max_connections", "", "is not an integer",
                 id="int-empty"),
    pytest.param("daemon", "poll_interval", "fast", "is not a number",
                 id="float"),
    pytest.param("daemon", "poll_interval", "nan", "is not a finite number",
                 id="float-nan"),
    pytest.param("daemon", "poll_interval", "0", "must be greater than 0",
                 id="poll-interval-zero"),
    pytest.param("daemon", "max_connections", "0", "must be at least 1",
                 id="max-connections-zero"),
    pytest.param("daemon", "inactivity_timeout", "0", "must be at least 1",
                 id="inactivity-timeout-zero"),
    pytest.param("control", "remove_timeout", "-1", "must be at least 0",
                 id="remove-timeout-negative"),
    pytest.param("backend_file", "buffer_size", "1024",
                 "must be a multiple of 4096, at least 4096",
                 id="buffer-size-small"),
    pytest.param("backend_http", "buffer_size", "0",
                 "must be a multiple of 4096, at least 4096",
                 id="buffer-size-zero"),
    pytest.param("backend_nbd", "buffer_size", "1000000",
                 "must be a multiple of 4096, at least 4096",
                 id="buffer-size-unaligned"),
    pytest.param("backend_nbd", "timeout", "0", "must be greater than 0",
                 id="nbd-timeout-zero"),
    pytest.param("remote", "port", "-1", "must be between 0 and 65535",
                 id="remote-port-negative"),
    pytest.param("remote", "port", "65536", "must be between 0 and 65535",
                 id="remote-port-large"),
    pytest.param("control", "port", "-2", "must be between -1 and 65535",
                 id="control-port-negative"),
    pytest.param("control", "transport", "udp",
                 "must be one of: unix, tcp", id="transport"),
    pytest.param("handlers", "keys", "syslog",
                 "must name some of: logfile, stderr", id="handlers"),
    pytest.param("handlers", "keys", "",
                 "must name some of: logfile, stderr", id="handlers-empty"),
    pytest.param("loggers", "keys", "root, imageio",
                 "must name some of: root", id="loggers"),
    pytest.param("logger_root", "level", "LOUD",
                 "is not a logging level (DEBUG, INFO, WARNING, ERROR, "
                 "CRITICAL)", id="level"),
    pytest.param("handler_stderr", "level", "debug",
                 "is not a logging level (DEBUG, INFO, WARNING, ERROR, "
                 "CRITICAL)", id="level-lower-case"),
    pytest.param("handler_logfile", "formatter", "short",
                 "must name some of: long", id="formatter"),
]


@pytest.mark.parametrize("section,key,text,reason", INVALID)
def test_invalid_value(conf_dir, vendor_dir, section, key, text, reason):
    write(conf_dir, "50-x.conf", "")
    path = write(conf_dir, "99-local.conf", f"[{section}]\n{key} = {text}\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == (
        f"Invalid value in {path} [{section}] {key}: {text!r} {reason}")


def test_invalid_value_message(conf_dir, vendor_dir):
    path = write(conf_dir, "99-local.conf", """
        [daemon]
        max_connections = many
        """)
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == (
        f"Invalid value in {path} [daemon] max_connections: "
        f"'many' is not an integer")


def test_invalid_value_in_vendor_file(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", "")
    path = write(vendor_dir, "50-vendor.conf", "[remote]\nport = http\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value).startswith(f"Invalid value in {path} [remote] port:")


def test_invalid_value_overridden_later_still_fails(conf_dir, vendor_dir):
    # Every file must be valid on its own, so that fixing a file is never
    # needed only once someone removes another.
    write(conf_dir, "50-x.conf", "[daemon]\nmax_connections = many\n")
    write(conf_dir, "60-x.conf", "[daemon]\nmax_connections = 4\n")
    with pytest.raises(config.Error, match="50-x.conf"):
        load(conf_dir, vendor_dir)


INVALID_FILES = [
    pytest.param(b"max_connections = 4\n", id="no-section-header"),
    pytest.param(b"[daemon]\nmax_connections = 4\nmax_connections = 5\n",
                 id="duplicate-key"),
    pytest.param(b"[daemon]\n[daemon]\n", id="duplicate-section"),
    pytest.param(b"[daemon]\nmax_connections\n", id="no-value"),
    pytest.param(b"[daemon\n", id="bad-section-header"),
    pytest.param(b"[daemon]\nuser_name = \xff\n", id="not-utf8"),
]


@pytest.mark.parametrize("content", INVALID_FILES)
def test_invalid_file(conf_dir, vendor_dir, content):
    path = conf_dir / "conf.d" / "50-x.conf"
    path.write_bytes(content)
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    message = str(e.value)
    assert message.startswith(f"Invalid configuration file {path}: ")
    assert "\n" not in message


def test_unreadable_file(conf_dir, vendor_dir):
    # A directory matching the pattern cannot be read as a file.
    path = conf_dir / "conf.d" / "50-x.conf"
    path.mkdir()
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value).startswith(f"Invalid configuration file {path}: ")


# Control transport.

@pytest.mark.parametrize("text,expected", [
    pytest.param("unix", "unix", id="unix"),
    pytest.param("Unix", "unix", id="unix-mixed-case"),
    pytest.param("tcp", "tcp", id="tcp"),
    pytest.param("TCP", "tcp", id="tcp-upper-case"),
])
def test_transport(conf_dir, vendor_dir, text, expected):
    write(conf_dir, "50-x.conf", f"""
        [control]
        transport = {text}
        port = 54324
        """)
    cfg = load(conf_dir, vendor_dir)
    assert cfg.control.transport == expected


def test_tcp_transport_requires_port(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", "[control]\ntransport = tcp\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == (
        "Invalid configuration: [control] port must be set when "
        "[control] transport is 'tcp'")


def test_tcp_transport_random_port(conf_dir, vendor_dir):
    write(conf_dir, "50-x.conf", "[control]\ntransport = tcp\nport = 0\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.control.port == 0


def test_root_handler_must_be_configured(conf_dir, vendor_dir):
    # Only [handlers] changed: root still uses logfile.
    write(conf_dir, "50-x.conf", "[handlers]\nkeys = stderr\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == (
        "Invalid configuration: [logger_root] handlers uses 'logfile', "
        "missing in [handlers] keys")


# What vdsm and engine write.

VDSM_CONF = """
    # Configuration overrides for ovirt-imageio-daemon.
    [tls]
    enable = true
    key_file = /etc/pki/vdsm/keys/vdsmkey.pem
    cert_file = /etc/pki/vdsm/certs/vdsmcert.pem
    ca_file = /etc/pki/vdsm/certs/cacert.pem

    [remote]
    port = 54322

    [local]
    enable = true

    [control]
    transport = unix
    """

ENGINE_CONF = """
    # Configuration overrides for ovirt-imageio-daemon on the engine host.
    [tls]
    enable = true
    key_file = /etc/pki/ovirt-engine/keys/apache.key.nopass
    cert_file = /etc/pki/ovirt-engine/certs/apache.cer
    ca_file = /etc/pki/ovirt-engine/apache-ca.pem

    [backend_http]
    ca_file = /etc/pki/ovirt-engine/ca.pem

    [remote]
    port = 54323

    [local]
    enable = false

    [control]
    transport = tcp
    port = 54324

    [handlers]
    keys = logfile

    [logger_root]
    handlers = logfile
    level = INFO
    """


def test_vdsm_conf(conf_dir, vendor_dir):
    path = write(conf_dir, "60-vdsm.conf", VDSM_CONF)
    cfg = load(conf_dir, vendor_dir)

    assert cfg.files == [path]
    assert cfg.tls.enable is True
    assert cfg.tls.key_file == "/etc/pki/vdsm/keys/vdsmkey.pem"
    assert cfg.tls.cert_file == "/etc/pki/vdsm/certs/vdsmcert.pem"
    assert cfg.tls.ca_file == "/etc/pki/vdsm/certs/cacert.pem"
    assert cfg.remote.host == "::"
    assert cfg.remote.port == 54322
    assert cfg.local.enable is True
    assert cfg.local.socket == "\0/org/ovirt/imageio"
    assert cfg.control.transport == "unix"
    # vdsm hard-codes this path.
    assert cfg.control.socket == "/run/ovirt-imageio/sock"
    assert cfg.backend_http.ca_file == ""


def test_engine_conf(conf_dir, vendor_dir):
    write(conf_dir, "50-engine.conf", ENGINE_CONF)
    cfg = load(conf_dir, vendor_dir)

    assert cfg.tls.enable is True
    assert cfg.tls.key_file == "/etc/pki/ovirt-engine/keys/apache.key.nopass"
    assert cfg.tls.cert_file == "/etc/pki/ovirt-engine/certs/apache.cer"
    assert cfg.tls.ca_file == "/etc/pki/ovirt-engine/apache-ca.pem"
    assert cfg.backend_http.ca_file == "/etc/pki/ovirt-engine/ca.pem"
    assert cfg.remote.port == 54323
    assert cfg.local.enable is False
    assert cfg.control.transport == "tcp"
    assert cfg.control.port == 54324
    assert cfg.control.prefer_ipv4 is True
    assert cfg.handlers.keys == "logfile"
    assert cfg.logger_root.handlers == "logfile"
    assert cfg.logger_root.level == "INFO"


def test_engine_conf_with_user_override(conf_dir, vendor_dir):
    write(conf_dir, "50-engine.conf", ENGINE_CONF)
    write(conf_dir, "99-local.conf", """
        [handlers]
        keys = stderr

        [logger_root]
        handlers = stderr
        level = DEBUG
        """)
    cfg = load(conf_dir, vendor_dir)
    assert cfg.remote.port == 54323
    assert cfg.handlers.keys == "stderr"
    assert cfg.logger_root.level == "DEBUG"


# --show-config.

def test_to_dict_json_round_trip(conf_dir, vendor_dir):
    write(conf_dir, "50-engine.conf", ENGINE_CONF)
    cfg = load(conf_dir, vendor_dir)
    d = config.to_dict(cfg)

    assert json.loads(json.dumps(d)) == d
    assert list(d) == list(config.DEFAULTS)
    for section, keys in config.DEFAULTS.items():
        assert list(d[section]) == list(keys)
    assert d["remote"]["port"] == 54323
    assert d["local"]["enable"] is False
    assert d["local"]["socket"] == "\0/org/ovirt/imageio"
    assert d["handler_logfile"]["class"] == \
        "logging.handlers.RotatingFileHandler"
    assert "files" not in d


# Logging.

@pytest.fixture
def root_logger():
    """Restore the root logger after logging.config.fileConfig."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    level = root.level
    yield root
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    for h in handlers:
        if h not in root.handlers:
            root.addHandler(h)
    root.setLevel(level)


def test_logging_config_sections(conf_dir, vendor_dir):
    write(conf_dir, "50-engine.conf", ENGINE_CONF)
    parser = config.logging_config(load(conf_dir, vendor_dir))

    assert isinstance(parser, configparser.RawConfigParser)
    assert tuple(parser.sections()) == config.LOGGING_SECTIONS
    assert parser["logger_root"]["level"] == "INFO"
    assert parser["logger_root"]["propagate"] == "0"
    assert parser["handler_logfile"]["class"] == \
        "logging.handlers.RotatingFileHandler"
    assert parser["formatter_long"]["format"] == \
        config.DEFAULTS["formatter_long"]["format"]


def test_logging_config_stderr(conf_dir, vendor_dir, root_logger):
    write(conf_dir, "50-x.conf", """
        [handlers]
        keys = stderr

        [logger_root]
        handlers = stderr
        level = WARNING
        """)
    parser = config.logging_config(load(conf_dir, vendor_dir))
    logging.config.fileConfig(parser, disable_existing_loggers=False)

    assert root_logger.level == logging.WARNING
    [handler] = root_logger.handlers
    assert type(handler) is logging.StreamHandler
    assert handler.level == logging.DEBUG


def test_logging_config_logfile(conf_dir, vendor_dir, root_logger, tmp_path):
    logfile = tmp_path / "daemon.log"
    write(conf_dir, "50-x.conf", f"""
        [handler_logfile]
        args = ("{logfile}",)
        """)
    parser = config.logging_config(load(conf_dir, vendor_dir))
    logging.config.fileConfig(parser, disable_existing_loggers=False)

    [handler] = root_logger.handlers
    assert isinstance(handler, logging.handlers.RotatingFileHandler)
    assert handler.maxBytes == 20971520
    assert handler.backupCount == 10

    logging.getLogger("test").info("hello %s", "world")
    logging.getLogger("test").debug("hidden")
    handler.flush()
    text = logfile.read_text()
    assert "INFO    (MainThread) [test] hello world\n" in text
    assert "hidden" not in text


# Connection limits ([daemon]; http/server.py Limits).

def test_connection_limits(conf_dir, vendor_dir):
    write(conf_dir, "50-empty.conf", "")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.handshake_timeout == 10.0
    assert cfg.daemon.header_timeout == 30.0
    assert cfg.daemon.max_unauthorized_connections == 512
    write(conf_dir, "60-x.conf", "[daemon]\nhandshake_timeout = 0.5\n"
          "header_timeout = 2\nmax_unauthorized_connections = 10\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.handshake_timeout == 0.5
    assert cfg.daemon.header_timeout == 2.0
    assert cfg.daemon.max_unauthorized_connections == 10


@pytest.mark.parametrize("key,text,reason", [
    ("handshake_timeout", "0", "must be greater than 0"),
    ("header_timeout", "-1", "must be greater than 0"),
    ("max_unauthorized_connections", "0", "must be at least 1"),
])
def test_connection_limits_invalid(conf_dir, vendor_dir, key, text, reason):
    write(conf_dir, "50-x.conf", f"[daemon]\n{key} = {text}\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert reason in str(e.value)


# Buffer memory ([daemon]; http/buffers.py).

def test_buffer_memory(conf_dir, vendor_dir):
    write(conf_dir, "50-empty.conf", "")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.buffer_memory == 256 * 1024**2
    assert cfg.daemon.buffer_wait_timeout == 30.0
    write(conf_dir, "60-x.conf", "[daemon]\nbuffer_memory = 16777216\n"
          "buffer_wait_timeout = 0\n")
    cfg = load(conf_dir, vendor_dir)
    assert cfg.daemon.buffer_memory == 16 * 1024**2
    assert cfg.daemon.buffer_wait_timeout == 0.0


@pytest.mark.parametrize("key,text,reason", [
    ("buffer_memory", "0", "must be at least 4096"),
    ("buffer_wait_timeout", "-1", "must be at least 0"),
])
def test_buffer_memory_invalid(conf_dir, vendor_dir, key, text, reason):
    write(conf_dir, "50-x.conf", f"[daemon]\n{key} = {text}\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert reason in str(e.value)


@pytest.mark.parametrize("backend", ["backend_nbd", "backend_http"])
def test_buffer_memory_holds_a_piece(conf_dir, vendor_dir, backend):
    # The other backend's pieces fit.
    write(conf_dir, "50-x.conf", "[daemon]\nbuffer_memory = 1048576\n"
          "[backend_nbd]\nbuffer_size = 1048576\n"
          "[backend_http]\nbuffer_size = 1048576\n")
    write(conf_dir, "60-x.conf", f"[{backend}]\nbuffer_size = 4194304\n")
    with pytest.raises(config.Error) as e:
        load(conf_dir, vendor_dir)
    assert str(e.value) == (
        f"Invalid configuration: [daemon] buffer_memory must be at least "
        f"half of [{backend}] buffer_size (2097152 bytes)")
