"""
Packaging: `make rpm` (and the `make dist` sdist it builds from), the wheel
and sdist of `python -m build`, the systemd unit and the vendor
configuration as packaged.

Everything is built once per session, from a copy of the working tree
without its build products (as a fresh clone with the current changes
would be), with the venv running the tests, offline.
"""

import configparser
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile

import pytest

import testutil
from ovirt_imageio import config

ROOT = testutil.ROOT
VENV = sys.prefix

# What is not in a fresh clone (.gitignore), and the VCS.
IGNORED = shutil.ignore_patterns(
    ".git", ".venv", ".dev", "build", "dist", "*.egg-info", "__pycache__",
    "*.pyc", ".pytest_cache")

# The daemon package's commands; every other command is the client's.
DAEMON_COMMANDS = {"ovirt-imageio", "ovirt-imageioctl"}

UNIT = "/usr/lib/systemd/system/ovirt-imageio.service"
VENDOR_CONF = "/usr/lib/ovirt-imageio/conf.d/50-ovirt-imageio.conf"
LOG_DIR = "/var/log/ovirt-imageio"


def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


VERSION = project()["version"]
SCRIPTS = project()["scripts"]


def run(*cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       **kw)
    assert r.returncode == 0, (
        f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


class Build:

    def __init__(self, src, out):
        self.src = src
        self.out = out
        # The sources built, as they were copied.
        self.package = os.path.join(src, "ovirt_imageio")

    def rpm(self, name):
        return os.path.join(
            self.src, "dist", f"ovirt-imageio-{name}-{VERSION}-1.noarch.rpm")

    def files(self, name):
        """{path: (mode, user, group, flags)} of an RPM's files."""
        out = run("rpm", "-qp", "--qf",
                  "[%{FILENAMES}\t%{FILEMODES:perms}\t%{FILEUSERNAME}\t"
                  "%{FILEGROUPNAME}\t%{FILEFLAGS:fflags}\n]",
                  self.rpm(name))
        result = {}
        for line in out.splitlines():
            path, *attrs = line.split("\t")
            result[path] = tuple(attrs)
        return result

    def sitelib(self):
        """The site-packages directory of the packages."""
        for path in self.files("common"):
            if path.endswith("/ovirt_imageio/__init__.py"):
                return path[:-len("/ovirt_imageio/__init__.py")]
        raise AssertionError("No ovirt_imageio/__init__.py in common")

    def extract(self, name):
        """Extract an RPM's files under out/root-NAME; return that root."""
        root = os.path.join(self.out, f"root-{name}")
        if not os.path.isdir(root):
            with open(self.rpm(name), "rb") as f:
                data = subprocess.run(
                    ["rpm2archive", "-"], stdin=f, capture_output=True,
                    check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                tar.extractall(root)
        return root


@pytest.fixture(scope="session")
def build(tmp_path_factory):
    if shutil.which("rpmbuild") is None:
        pytest.skip("rpmbuild is not installed (make check installs "
                    "Debian's rpm package)")
    out = str(tmp_path_factory.mktemp("packaging"))
    src = os.path.join(out, "src")
    shutil.copytree(ROOT, src, ignore=IGNORED, symlinks=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    # The venv is ready (it runs us): do not remake it, nor look for
    # system packages (rpm is there).
    run("make", "-C", src, "rpm", f"VENV={VENV}",
        "-o", f"{VENV}/.installed", "-o", "system-packages", env=env)
    wheels = os.path.join(out, "wheels")
    run(sys.executable, "-m", "build", "--no-isolation", "--outdir", wheels,
        src, env=env)
    return Build(src, out)


# make rpm


def test_rpms(build):
    for name in ("common", "daemon", "client"):
        info = run("rpm", "-qp", "--qf", "%{NAME} %{VERSION} %{ARCH}",
                   build.rpm(name))
        assert info == f"ovirt-imageio-{name} {VERSION} noarch"
    requires = run("rpm", "-qpR", build.rpm("daemon")).split("\n")
    assert f"ovirt-imageio-common = {VERSION}-1" in requires
    requires = run("rpm", "-qpR", build.rpm("client")).split("\n")
    assert f"ovirt-imageio-common = {VERSION}-1" in requires


def test_daemon_files(build):
    files = build.files("daemon")
    assert files["/usr/bin/ovirt-imageio"][0] == "-rwxr-xr-x"
    assert files["/usr/bin/ovirt-imageioctl"][0] == "-rwxr-xr-x"
    assert files[UNIT][0] == "-rw-r--r--"
    assert files[VENDOR_CONF][0] == "-rw-r--r--"
    assert files["/etc/ovirt-imageio/conf.d"][0] == "drwxr-xr-x"
    assert files["/usr/lib/ovirt-imageio/conf.d"][0] == "drwxr-xr-x"
    # The daemon creates and rotates its logs after dropping privileges.
    assert files[LOG_DIR][:3] == ("drwxr-xr-x", "ovirtimg", "ovirtimg")
    mode, user, group, flags = files[f"{LOG_DIR}/daemon.log"]
    assert (user, group) == ("ovirtimg", "ovirtimg")
    assert "g" in flags  # %ghost: removed with the package
    # No Python modules: they are common's and the client's.
    assert not [p for p in files if "/ovirt_imageio/" in p]


def test_daemon_scripts(build):
    scripts = run("rpm", "-qp", "--scripts", build.rpm("daemon"))
    pre = scripts.split("preinstall scriptlet")[1].split("scriptlet")[0]
    assert "groupadd --system ovirtimg" in pre
    assert "useradd --system --gid ovirtimg" in pre
    assert "getent passwd ovirtimg" in pre


def source_modules(package_dir):
    """Paths of the .py files under package_dir, relative to its parent."""
    parent = os.path.dirname(package_dir)
    result = set()
    for d, dirs, names in os.walk(package_dir):
        dirs[:] = [n for n in dirs if n != "__pycache__"]
        if "__init__.py" not in names:
            # Not a package (yet): setuptools does not install it.
            dirs[:] = []
            continue
        for name in names:
            if name.endswith(".py"):
                result.add(os.path.relpath(os.path.join(d, name), parent))
    return result


def page_files(package_dir):
    """Paths of the page's files (http/static.py), relative to the
    package's parent."""
    static = os.path.join(package_dir, "http", "static")
    names = [n for n in os.listdir(static) if not n.startswith(".")]
    assert "index.html" in names
    return {f"ovirt_imageio/http/static/{n}" for n in names}


def test_common_files(build):
    files = build.files("common")
    sitelib = build.sitelib()
    assert sitelib.startswith("/usr/lib/python3")
    packaged = {p[len(sitelib) + 1:] for p in files if p.endswith(".py")}
    # All of them, the client library too: the daemon's proxy uses it.
    assert packaged == source_modules(build.package)
    # The page the daemon serves at /.
    for path in page_files(build.package):
        assert files[f"{sitelib}/{path}"][0] == "-rw-r--r--"
    distinfo = f"{sitelib}/ovirt_imageio-{VERSION}.dist-info"
    assert f"{distinfo}/entry_points.txt" in files
    assert f"{distinfo}/RECORD" not in files
    assert f"{distinfo}/direct_url.json" not in files


def test_client_files(build):
    # The commands but the daemon's, as they are added.
    files = build.files("client")
    commands = {p for p in files if not p.startswith("/usr/share/doc/")}
    assert commands == {f"/usr/bin/{name}" for name in SCRIPTS
                        if name not in DAEMON_COMMANDS}


def test_client_installs_ovirt_img(build):
    listed = run("rpm", "-qpl", build.rpm("client")).splitlines()
    assert "/usr/bin/ovirt-img" in listed
    assert build.files("client")["/usr/bin/ovirt-img"][0] == "-rwxr-xr-x"
    # Nobody else ships it.
    for name in ("common", "daemon"):
        assert "/usr/bin/ovirt-img" not in run(
            "rpm", "-qpl", build.rpm(name)).splitlines()


def test_client_requires_sdk(build):
    # ovirt-img talks to the engine through the oVirt SDK: Fedora's and
    # EL's package of it (pip: the sdk extra).
    requires = [r.strip() for r in run(
        "rpm", "-qp", "--requires", build.rpm("client")).splitlines()]
    assert "python3-ovirt-engine-sdk4" in requires
    assert "qemu-img" in requires
    # Only the client needs it.
    for name in ("common", "daemon"):
        assert not [r for r in run("rpm", "-qp", "--requires",
                                   build.rpm(name)).splitlines()
                    if "ovirt-engine-sdk" in r]


def packaged_command(build, name, *args, package="daemon"):
    """
    Run a command of an RPM (the daemon's by default) with the common
    RPM's modules, and nothing else of ours: a command needs only its
    package and common.
    """
    root = build.extract(package)
    common = build.extract("common")
    path = os.path.join(root, "usr/bin", name)
    with open(path) as f:
        shebang = f.readline().split()
    assert shebang == ["#!/usr/bin/python3", "-s"]
    env = dict(os.environ, PYTHONPATH=common + build.sitelib())
    return run("/usr/bin/python3", "-s", path, *args, env=env)


def test_packaged_commands(build):
    assert "--show-config" in packaged_command(build, "ovirt-imageio",
                                               "--help")
    assert "add-ticket" in packaged_command(build, "ovirt-imageioctl",
                                            "--help")
    # The SDK is imported when a command talks to the engine, not for
    # --help.
    usage = packaged_command(build, "ovirt-img", "--help", package="client")
    assert "upload-disk" in usage and "download-disk" in usage
    usage = packaged_command(build, "ovirt-img", "download-disk", "--help",
                             package="client")
    assert "--no-verify" in usage


def test_packaged_default_conf(build, tmp_path):
    # The vendor file, as the only file: what it sets and the defaults.
    root = build.extract("daemon")
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    shutil.copy(root + VENDOR_CONF, conf_d)
    cfg = json.loads(packaged_command(
        build, "ovirt-imageio", "--conf-dir", str(tmp_path), "--show-config"))
    assert cfg["handlers"]["keys"] == "logfile"
    assert cfg["logger_root"]["handlers"] == "logfile"
    logfile = cfg["handler_logfile"]
    assert logfile["class"] == "logging.handlers.RotatingFileHandler"
    assert logfile["args"] == '("/var/log/ovirt-imageio/daemon.log",)'
    assert json.loads(logfile["kwargs"]) == {
        "maxBytes": 20971520, "backupCount": 10}
    daemon = cfg["daemon"]
    assert daemon["drop_privileges"] is True
    assert (daemon["user_name"], daemon["group_name"]) == (
        "ovirtimg", "ovirtimg")
    assert daemon["run_dir"] == "/run/ovirt-imageio"
    assert daemon["systemd_enable"] is True
    assert cfg["control"]["socket"] == "/run/ovirt-imageio/sock"


def test_vendor_conf_sets_little(build):
    # It sorts after the engine's 50-engine.conf and before vdsm's
    # 60-vdsm.conf: it must not set what they set.
    root = build.extract("daemon")
    parser = configparser.RawConfigParser()
    parser.read(root + VENDOR_CONF)
    assert parser.sections() == ["handler_logfile"]


# The systemd unit


def unit_settings(path):
    settings = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith(("#", ";", "[")):
                key, _, value = line.partition("=")
                settings.setdefault(key, []).append(value)
    return settings


def test_unit_settings(build):
    s = unit_settings(build.extract("daemon") + UNIT)
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == ["/usr/bin/ovirt-imageio"]
    assert s["RuntimeDirectory"] == ["ovirt-imageio"]
    assert s["RuntimeDirectoryMode"] == ["0750"]
    assert s["Restart"] == ["on-failure"]
    # Started as root: the daemon drops privileges itself.
    assert s["User"] == ["root"]
    assert s["WantedBy"] == ["multi-user.target"]
    # Able to drop privileges and to give its files away.
    caps = s["CapabilityBoundingSet"][0].split()
    assert {"CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"} <= set(caps)
    # Reaches block volumes (/dev/dm-*): no device restrictions.
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow",
                "ProtectClock"):
        assert key not in s
    # Images are under /rhev/data-center, NBD sockets under /run/vdsm.
    assert s["ProtectSystem"] == ["full"]
    # Fds for 1,000 transfer connections at 4 each (client socket, NBD
    # socket, splice pipe) besides the unauthorized connections each
    # service may hold; systemd's default is 1024.
    unauthorized = config.DEFAULTS["daemon"]["max_unauthorized_connections"]
    assert int(s["LimitNOFILE"][0]) >= 4 * 1000 + 3 * unauthorized


def test_unit_verify(build, tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package "
                    "systemd)")
    # The packaged unit in a root holding the daemon's files and the
    # host's units (the targets it depends on).
    root = tmp_path / "root"
    shutil.copytree(build.extract("daemon"), root, symlinks=True)
    units = root / "usr/lib/systemd/system"
    for host_units in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isdir(host_units):
            shutil.copytree(host_units, units, symlinks=True,
                            dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("ovirt-imageio*"))
            break
    else:
        pytest.skip("No systemd units on this host")
    r = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}",
         "ovirt-imageio.service"],
        capture_output=True, text=True, timeout=60)
    # verify only warns about values it ignores: no output at all.
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")


# python -m build: the sdist (make dist, the RPMs' source) and the wheel


def only(directory, suffix):
    names = [n for n in os.listdir(directory) if n.endswith(suffix)]
    assert len(names) == 1, names
    return os.path.join(directory, names[0])


def test_sdist(build):
    top = f"ovirt_imageio-{VERSION}"
    # make dist's, the RPMs' Source0.
    sdist = os.path.join(build.src, "dist", f"{top}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = set(tar.getnames())
        spec = tar.extractfile(f"{top}/ovirt-imageio.spec").read().decode()
    for path in ("ovirt-imageio.spec", "pyproject.toml", "README.md",
                 "data/ovirt-imageio.service", "data/50-ovirt-imageio.conf",
                 "data/README", "ovirt_imageio/__init__.py",
                 "ovirt_imageio/server.py"):
        assert f"{top}/{path}" in names
    for path in page_files(build.package):
        assert f"{top}/{path}" in names
    spec_fields = dict(line.split(":", 1) for line in spec.splitlines()
                       if line.startswith(("Version:", "Source0:")))
    assert spec_fields["Version"].strip() == VERSION
    assert spec_fields["Source0"].strip() == "ovirt_imageio-%{version}.tar.gz"
    # python -m build's sdist is the same.
    with tarfile.open(only(os.path.join(build.out, "wheels"),
                           ".tar.gz")) as tar:
        assert set(tar.getnames()) == names


def test_wheel(build):
    wheel = only(os.path.join(build.out, "wheels"), ".whl")
    assert os.path.basename(wheel) == (
        f"ovirt_imageio-{VERSION}-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(
            f"ovirt_imageio-{VERSION}.dist-info/entry_points.txt").decode()
    modules = {n for n in names if n.endswith(".py")}
    assert modules == source_modules(build.package)
    assert page_files(build.package) <= names
    parser = configparser.RawConfigParser()
    parser.read_string(entry_points)
    assert dict(parser["console_scripts"]) == SCRIPTS
    assert SCRIPTS["ovirt-imageio"] == "ovirt_imageio.server:main"
    assert SCRIPTS["ovirt-imageioctl"] == "ovirt_imageio.admin:main"


def test_pip_install_wheel(build, tmp_path):
    # pip install gives the commands.
    wheel = only(os.path.join(build.out, "wheels"), ".whl")
    target = tmp_path / "target"
    run(sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
        "--disable-pip-version-check", "--target", str(target), wheel)
    env = dict(os.environ, PYTHONPATH=str(target))
    for name in SCRIPTS:
        assert "usage:" in run(str(target / "bin" / name), "--help", env=env)
