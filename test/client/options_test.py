"""
ovirt-img's options and configuration file (client/_options.py), through
the real parser of the command (_tool.parser()).
"""

import pytest

from ovirt_imageio.client import _options as opts
from ovirt_imageio.client import _ovirt
from ovirt_imageio.client import _tool

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

DISK_ID = "12345678-1234-1234-1234-1234567890ab"

REQUIRED = ["--engine-url", "https://engine.example.com",
            "--username", "admin@internal"]


# Value parsers.

@pytest.mark.parametrize("text,value", [
    ("0", 0),
    ("4194304", 4 * MiB),
    ("64k", 64 * KiB),
    ("64K", 64 * KiB),
    ("4m", 4 * MiB),
    ("4M", 4 * MiB),
    ("2g", 2 * GiB),
    ("2G", 2 * GiB),
    ("1t", 1024 * GiB),
    ("1T", 1024 * GiB),
    ("4MiB", 4 * MiB),
    ("4mb", 4 * MiB),
    (" 4m ", 4 * MiB),
])
def test_size(text, value):
    assert opts.size(text) == value


@pytest.mark.parametrize("text", [
    "", "m", "-1", "1.5m", "4x", "4p", "4 m m", "0x10", "4ib", "4b", "k4",
])
def test_size_invalid(text):
    with pytest.raises(opts.Invalid) as e:
        opts.size(text)
    assert "size" in str(e.value)


@pytest.mark.parametrize("text,value", [
    ("64k", 64 * KiB),
    ("65536", 64 * KiB),
    ("4m", 4 * MiB),
    ("16m", 16 * MiB),
    ("16M", 16 * MiB),
])
def test_buffer_size(text, value):
    parse = opts.size_between(opts.MIN_BUFFER_SIZE, opts.MAX_BUFFER_SIZE)
    assert parse(text) == value


@pytest.mark.parametrize("text", ["65535", "63k", "16385k", "17m", "1g"])
def test_buffer_size_out_of_range(text):
    parse = opts.size_between(opts.MIN_BUFFER_SIZE, opts.MAX_BUFFER_SIZE)
    with pytest.raises(opts.Invalid) as e:
        parse(text)
    assert str(e.value) == "expected a size from 64k to 16m"


@pytest.mark.parametrize("text,value", [("1", 1), ("4", 4), ("8", 8)])
def test_max_workers(text, value):
    assert opts.integer_between(1, 8)(text) == value


@pytest.mark.parametrize("text", ["0", "9", "1k", "-1", "x", "", "2.5"])
def test_max_workers_invalid(text):
    with pytest.raises(opts.Invalid) as e:
        opts.integer_between(1, 8)(text)
    assert str(e.value) == "expected an integer from 1 to 8"


@pytest.mark.parametrize("text", ["1", "yes", "true", "on", "YES", "True",
                                  " on "])
def test_boolean_true(text):
    assert opts.boolean(text) is True


@pytest.mark.parametrize("text", ["0", "no", "false", "off", "NO", "Off"])
def test_boolean_false(text):
    assert opts.boolean(text) is False


@pytest.mark.parametrize("text", ["", "y", "2", "enabled", "nope"])
def test_boolean_invalid(text):
    with pytest.raises(opts.Invalid) as e:
        opts.boolean(text)
    assert "yes" in str(e.value) and "off" in str(e.value)


@pytest.mark.parametrize("text,value", [
    ("https://engine.example.com", "https://engine.example.com"),
    ("https://engine.example.com/", "https://engine.example.com"),
    ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
    ("https://[::1]:8443/", "https://[::1]:8443"),
    ("https://engine/prefix/", "https://engine/prefix"),
])
def test_url(text, value):
    assert opts.url(text) == value


@pytest.mark.parametrize("text", [
    "", "engine.example.com", "ftp://engine", "https://", "https:///x",
    "https://engine/a b", "https://engine?x=1", "https://engine#x",
])
def test_url_invalid(text):
    with pytest.raises(opts.Invalid):
        opts.url(text)


@pytest.mark.parametrize("text", [
    DISK_ID,
    DISK_ID.upper(),
    DISK_ID.replace("-", ""),
    "{" + DISK_ID + "}",
    "urn:uuid:" + DISK_ID,
])
def test_disk_id_normalised(text):
    assert opts.disk_id(text) == DISK_ID


@pytest.mark.parametrize("text", ["", "not-a-uuid", DISK_ID[:-1],
                                  DISK_ID + "0"])
def test_disk_id_invalid(text):
    with pytest.raises(opts.Invalid) as e:
        opts.disk_id(text)
    assert str(e.value) == "expected a UUID"


@pytest.mark.parametrize("value", ["disk", "a disk, with ünïcode", ""])
def test_text(value):
    assert opts.text(value) == value


@pytest.mark.parametrize("value", ["a\nb", "a\rb", "a\tb", "\x1b[2J",
                                   "a\x00b", "a\x7fb", "a\x9b2J"])
def test_text_control_chars(value):
    with pytest.raises(opts.Invalid) as e:
        opts.text(value)
    assert "control characters" in str(e.value)


def test_positive_integer():
    assert opts.positive_integer("120") == 120
    for bad in ("0", "-1", "x", "1.5", ""):
        with pytest.raises(opts.Invalid):
            opts.positive_integer(bad)


# Whole command lines.

class Config:
    """A configuration file in a fake home directory."""

    def __init__(self, tmp_path):
        self.home = tmp_path / "home"
        (self.home / ".config").mkdir(parents=True)
        self.xdg = tmp_path / "xdg"
        self.xdg.mkdir()
        self.environ = {"HOME": str(self.home)}
        self.path = self.home / ".config" / "ovirt-img.conf"

    def write(self, text, xdg=False):
        path = self.xdg / "ovirt-img.conf" if xdg else self.path
        if xdg:
            self.environ["XDG_CONFIG_HOME"] = str(self.xdg)
        path.write_text(text)
        return path


@pytest.fixture
def config(tmp_path):
    return Config(tmp_path)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "image.qcow2"
    path.write_bytes(b"\0" * 4096)
    return str(path)


ENGINE1 = """\
[engine1]
engine_url = https://engine1.example.com
username = admin@internal
password = secret
cafile = /etc/pki/ovirt-engine/ca.pem
"""


def parse(argv, environ):
    return _tool.parser().parse_args([str(a) for a in argv],
                                     environ=environ)


def usage_error(capsys, argv, environ):
    """Parse argv, expecting a usage error; return its stderr."""
    with pytest.raises(SystemExit) as e:
        parse(argv, environ)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_defaults(config, image):
    args = parse(["upload-disk", *REQUIRED, "-s", "nfs", image],
                 config.environ)
    assert args.func is _tool.upload_disk
    assert args.engine_url == "https://engine.example.com"
    assert args.username == "admin@internal"
    assert args.password is None
    assert args.password_file is None
    assert args.cafile is None
    assert args.secure is True
    assert args.output == "text"
    assert args.log_file is None
    assert args.log_level == "warning"
    assert args.description == "Uploaded by ovirt-img"
    assert args.disk_timeout == 120
    assert args.max_workers == 4
    assert args.buffer_size == 4 * MiB
    assert args.storage_domain == "nfs"
    assert args.format == "qcow2"
    assert args.preallocated is False
    assert args.disk_id is None
    assert args.name is None
    assert args.member is None
    assert args.verify is True
    assert args.filename == image


def test_download_command_line(config, tmp_path):
    args = parse(["download-disk", *REQUIRED, "-f", "raw", "--no-verify",
                  "--insecure", "-o", "json", "--max-workers", "8",
                  "--buffer-size", "64K", DISK_ID.upper(),
                  tmp_path / "out.raw"], config.environ)
    assert args.func is _tool.download_disk
    assert args.disk_id == DISK_ID
    assert args.filename == str(tmp_path / "out.raw")
    assert args.format == "raw"
    assert args.verify is False
    assert args.secure is False
    assert args.output == "json"
    assert args.max_workers == 8
    assert args.buffer_size == 64 * KiB


def test_disk_id_option_normalised(config, image):
    args = parse(["upload-disk", *REQUIRED, "-s", "nfs", "--disk-id",
                  "{" + DISK_ID.upper() + "}", image], config.environ)
    assert args.disk_id == DISK_ID


@pytest.mark.parametrize("xdg", [True, False])
def test_config_section(config, image, xdg):
    config.write(ENGINE1, xdg=xdg)
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.engine_url == "https://engine1.example.com"
    assert args.username == "admin@internal"
    assert args.password == "secret"
    assert args.cafile == "/etc/pki/ovirt-engine/ca.pem"
    assert args.secure is True


def test_config_xdg_wins_over_home(config, image):
    config.write(ENGINE1.replace("engine1.", "home."))
    config.write(ENGINE1, xdg=True)
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.engine_url == "https://engine1.example.com"


def test_config_path():
    assert opts.config_path({"XDG_CONFIG_HOME": "/x", "HOME": "/h"}) == \
        "/x/ovirt-img.conf"
    assert opts.config_path({"XDG_CONFIG_HOME": "", "HOME": "/h"}) == \
        "/h/.config/ovirt-img.conf"
    assert opts.config_path({"HOME": "/h"}) == "/h/.config/ovirt-img.conf"


def test_config_all_keys(config, image, tmp_path):
    log = tmp_path / "ovirt-img.log"
    config.write(ENGINE1 + f"""\
secure = no
log_file = {log}
log_level = debug
description = From the config
disk_timeout = 300
""")
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.secure is False
    assert args.log_file == str(log)
    assert args.log_level == "debug"
    assert args.description == "From the config"
    assert args.disk_timeout == 300


def test_config_empty_optional_key_is_default(config, image):
    config.write(ENGINE1.replace("cafile = /etc/pki/ovirt-engine/ca.pem",
                                 "cafile =\nlog_file =\n"))
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.cafile is None
    assert args.log_file is None


def test_config_empty_required_key(config, image, capsys):
    config.write(ENGINE1.replace("username = admin@internal",
                                 "username ="))
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert "username" in err


def test_config_no_interpolation(config, image):
    config.write(ENGINE1.replace("password = secret",
                                 "password = 50%%off%(x)s"))
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.password == "50%%off%(x)s"


def test_command_line_beats_config(config, image, tmp_path):
    config.write(ENGINE1 + """\
log_file = /config.log
log_level = debug
description = From the config
""")
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs",
                  "--engine-url", "https://other.example.com/",
                  "--username", "me@internal",
                  "--cafile", "/my/ca.pem",
                  "--log-file", tmp_path / "cli.log",
                  "--log-level", "error",
                  "-d", "From the command line",
                  image], config.environ)
    assert args.engine_url == "https://other.example.com"
    assert args.username == "me@internal"
    assert args.cafile == "/my/ca.pem"
    assert args.log_file == str(tmp_path / "cli.log")
    assert args.log_level == "error"
    assert args.description == "From the command line"
    # Still from the config: no option for it.
    assert args.password == "secret"


@pytest.mark.parametrize("value,secure", [
    ("yes", True), ("1", True), ("true", True), ("on", True), ("TRUE", True),
    ("no", False), ("0", False), ("false", False), ("off", False),
    ("Off", False),
])
def test_config_secure(config, image, value, secure):
    config.write(ENGINE1 + f"secure = {value}\n")
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", image],
                 config.environ)
    assert args.secure is secure
    assert args.insecure is not secure


@pytest.mark.parametrize("value", ["yes", "no"])
def test_insecure_beats_config_secure(config, image, value):
    config.write(ENGINE1 + f"secure = {value}\n")
    args = parse(["upload-disk", "-c", "engine1", "-s", "nfs", "--insecure",
                  image], config.environ)
    assert args.secure is False


def test_config_missing_section(config, image, capsys):
    path = config.write(ENGINE1)
    # Even with every option on the command line.
    err = usage_error(capsys, ["upload-disk", "-c", "engine2", *REQUIRED,
                               "-s", "nfs", image], config.environ)
    assert err.splitlines()[-1] == (
        f"ovirt-img upload-disk: error: No section [engine2] in {path}")


def test_config_missing_file(config, image, capsys):
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert f"No configuration file {config.path}" in err


def test_config_unreadable_file(config, image, capsys):
    config.write("engine_url = https://no.section\n")
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert f"Cannot read configuration file {config.path}" in err
    assert "Traceback" not in err


def test_missing_required(config, image, capsys):
    err = usage_error(capsys, ["upload-disk", "-s", "nfs", image],
                      config.environ)
    assert "Missing required options: engine_url, username" in err


def test_missing_required_in_config(config, image, capsys):
    config.write("[engine1]\nusername = admin@internal\n")
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert "Missing required options: engine_url\n" in err


def test_missing_storage_domain(config, image, capsys):
    err = usage_error(capsys, ["upload-disk", *REQUIRED, image],
                      config.environ)
    assert "Missing required options: storage_domain" in err


@pytest.mark.parametrize("key,value", [
    ("engine_url", "engine1.example.com"),
    ("secure", "maybe"),
    ("log_level", "verbose"),
    ("disk_timeout", "soon"),
    ("disk_timeout", "0"),
    ("description", "two\\tparts"),
    ("username", "admin\\x1b[2J"),
])
def test_config_bad_value(config, image, capsys, key, value):
    real = value.encode().decode("unicode_escape")
    lines = [line for line in ENGINE1.splitlines()
             if not line.startswith(key + " ")]
    config.write("\n".join(lines) + f"\n{key} = {real}\n")
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert f"Invalid value for {key!r} in section [engine1] of " \
           f"{config.path}: {real!r}" in err


def test_config_multiline_value(config, image, capsys):
    config.write(ENGINE1 + "description = one\n  two\n")
    err = usage_error(capsys, ["upload-disk", "-c", "engine1", "-s", "nfs",
                               image], config.environ)
    assert "Invalid value for 'description'" in err
    assert repr("one\ntwo") in err


@pytest.mark.parametrize("argv,words", [
    (["--engine-url", "engine.example.com"], ["--engine-url",
                                              "'engine.example.com'"]),
    (["--buffer-size", "32m"], ["--buffer-size", "'32m'", "64k to 16m"]),
    (["--buffer-size", "1k"], ["--buffer-size", "'1k'"]),
    (["--max-workers", "9"], ["--max-workers", "'9'", "1 to 8"]),
    (["--max-workers", "0"], ["--max-workers", "'0'"]),
    (["--disk-id", "nope"], ["--disk-id", "'nope'", "UUID"]),
    (["--log-level", "loud"], ["--log-level", "'loud'"]),
    (["-o", "xml"], ["'xml'"]),
    (["-f", "vmdk"], ["'vmdk'"]),
    (["-d", "a\nb"], ["-d", "control characters"]),
    (["--password-file", "/no/such/file"], ["--password-file",
                                            "/no/such/file"]),
    (["--no-such-option"], ["--no-such-option"]),
])
def test_bad_command_line_value(config, image, capsys, argv, words):
    err = usage_error(capsys, ["upload-disk", *REQUIRED, "-s", "nfs", *argv,
                               image], config.environ)
    for word in words:
        assert word in err
    assert "Traceback" not in err


def test_max_workers_size_syntax(config, image):
    args = parse(["upload-disk", *REQUIRED, "-s", "nfs", "--max-workers",
                  " 2 ", image], config.environ)
    assert args.max_workers == 2


@pytest.mark.parametrize("name", ["missing", "dir"])
def test_bad_upload_file(config, tmp_path, capsys, name):
    (tmp_path / "dir").mkdir()
    err = usage_error(capsys, ["upload-disk", *REQUIRED, "-s", "nfs",
                               tmp_path / name], config.environ)
    assert str(tmp_path / name) in err


def test_bad_download_target(config, tmp_path, capsys):
    err = usage_error(capsys, ["download-disk", *REQUIRED, DISK_ID,
                               tmp_path], config.environ)
    assert "not a regular file or a block device" in err


def test_bad_download_disk_id(config, tmp_path, capsys):
    err = usage_error(capsys, ["download-disk", *REQUIRED, "x" * 8,
                               tmp_path / "out"], config.environ)
    assert "'xxxxxxxx'" in err and "UUID" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        _tool.parser().parse_args(["--version"], environ={})
    assert e.value.code == 0
    assert capsys.readouterr().out == "ovirt-img 2.5.1\n"


def test_no_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        _tool.parser().parse_args([], environ={})
    assert e.value.code == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: ovirt-img")
    assert "upload-disk" in out and "download-disk" in out


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        _tool.parser().parse_args(["map"], environ={})
    assert e.value.code == 2
    assert "'map'" in capsys.readouterr().err


def test_main_usage_error_exits_2(config, capsys):
    # main() leaves usage errors to argparse: SystemExit(2), no logging.
    with pytest.raises(SystemExit) as e:
        _tool.main(["upload-disk", "-s", "nfs", "/no/such/image"])
    assert e.value.code == 2



# The password (_tool.password): the file, else the config, else asked.

def password_args(config, tmp_path, password_file=None, conf_password=None):
    text = ENGINE1.replace("password = secret\n", "")
    if conf_password is not None:
        text += f"password = {conf_password}\n"
    config.write(text)
    argv = ["download-disk", "-c", "engine1", DISK_ID, tmp_path / "out"]
    if password_file is not None:
        argv[1:1] = ["--password-file", password_file]
    return parse(argv, config.environ)


@pytest.mark.parametrize("text,password", [
    ("secret", "secret"),
    ("secret\n", "secret"),
    ("secret\n\n", "secret\n"),
    (" spaced out \n", " spaced out "),
    ("", ""),
])
def test_password_file(config, tmp_path, text, password):
    path = tmp_path / "password"
    path.write_text(text)
    args = password_args(config, tmp_path, password_file=path)
    assert _tool.password(args) == password


def test_password_file_beats_config(config, tmp_path):
    path = tmp_path / "password"
    path.write_text("from-file\n")
    args = password_args(config, tmp_path, password_file=path,
                         conf_password="from-config")
    assert _tool.password(args) == "from-file"


def test_password_from_config(config, tmp_path):
    args = password_args(config, tmp_path, conf_password="from-config")
    assert _tool.password(args) == "from-config"


def test_password_file_unreadable(config, tmp_path):
    path = tmp_path / "password"
    path.write_bytes(b"\xff\xfe")
    args = password_args(config, tmp_path, password_file=path)
    with pytest.raises(_ovirt.Error) as e:
        _tool.password(args)
    assert str(e.value).startswith(f"Cannot read password file {path}: ")


# Repeated options (upload-disk --header, --header-file).

def test_repeated(config, image):
    url = "https://images.example.com/disk.qcow2"
    args = parse(["upload-disk", *REQUIRED, "-s", "nfs", "--header",
                  "A: 1", "--header", "B: 2", "--header-file", image, url],
                 config.environ)
    assert args.header == ["A: 1", "B: 2"]
    assert args.header_file == [image]
    assert args.filename == url
    args = parse(["upload-disk", *REQUIRED, "-s", "nfs", url],
                 config.environ)
    assert args.header is None


def test_repeated_invalid_not_echoed(config, capsys):
    err = usage_error(capsys, [
        "upload-disk", *REQUIRED, "-s", "nfs", "--header",
        "X-Token: secret\x07value", "https://images.example.com/d"],
        config.environ)
    assert "argument --header: invalid value: control characters" in err
    assert "secret" not in err
