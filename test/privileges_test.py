"""
The daemon started as root with [daemon] drop_privileges = true, as systemd
starts it: it binds and opens as root, then runs as user_name:group_name,
owning its run directory, control socket and log file, and the qemu-nbd
processes it starts run as that user too.

Runs only as root. The configured identity is nobody:nogroup (no users are
created on the machine). The daemon's files are in a directory owned by
nobody, as the daemon's are in /run/ovirt-imageio, so that it can remove its
sockets at exit; its run directory is made by root and given to it.
"""

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile

import pytest

import testutil

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="Dropping privileges needs root")

USER = "nobody"
UNIT = os.path.join(testutil.ROOT, "data", "ovirt-imageio.service")


def nobody_group():
    for name in ("nogroup", "nobody"):
        try:
            return grp.getgrnam(name)
        except KeyError:
            pass
    pytest.skip("No nogroup or nobody group")


@pytest.fixture(scope="module")
def identity():
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"No {USER} user")
    return user, nobody_group()


@pytest.fixture(scope="module")
def home(identity):
    """A short directory owned by the daemon's identity."""
    user, group = identity
    path = tempfile.mkdtemp(prefix="oi-priv-", dir="/tmp")
    os.chown(path, user.pw_uid, group.gr_gid)
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(home, identity, tmp_path_factory):
    user, group = identity
    # The TLS files are in a private directory of root's: read before
    # dropping privileges.
    pki = testutil.make_pki(tmp_path_factory.mktemp("pki"))
    d = testutil.DaemonProcess(
        home, pki,
        daemon={"drop_privileges": "true", "user_name": user.pw_name,
                "group_name": group.gr_name})
    try:
        d.wait_ready()
        # Ready answers before the last chown; wait until it runs as the user.
        testutil.wait_for(lambda: ids(d.proc.pid)["Uid"][0] == user.pw_uid,
                          message="privileges dropped")
        yield d
    finally:
        if d.proc.poll() is None:
            d.stop()


def ids(pid):
    """Uid, Gid (real, effective, saved, filesystem) and Groups of pid."""
    result = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                result[key] = [int(v) for v in value.split()]
    return result


def owner(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid


def test_process_identity(daemon, identity):
    user, group = identity
    status = ids(daemon.proc.pid)
    assert status["Uid"] == [user.pw_uid] * 4
    assert status["Gid"] == [group.gr_gid] * 4
    # The user's supplementary groups (vdsm gives it access to images this
    # way), and no others: no root group left.
    assert sorted(status["Groups"]) == sorted(
        set(os.getgrouplist(user.pw_name, group.gr_gid)))
    assert 0 not in status["Groups"]


def test_owns_its_files(daemon, identity):
    user, group = identity
    expected = (user.pw_uid, group.gr_gid)
    # The control service answers before the daemon drops privileges,
    # gives its files away and logs it.
    line = f"Running as {user.pw_name}:{group.gr_name}"

    def logged():
        with open(daemon.log) as f:
            return line in f.read()

    testutil.wait_for(logged, message="privileges dropped")
    assert owner(daemon.conf["daemon"]["run_dir"]) == expected
    assert owner(daemon.log) == expected
    assert owner(daemon.control_socket) == expected


def test_control_socket(daemon, identity):
    user, group = identity
    st = os.stat(daemon.control_socket)
    assert stat.S_ISSOCK(st.st_mode)
    # Owner and group only: vdsm connects as a member of the group.
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == group.gr_gid
    resp, _ = daemon.api.request("GET", "/tickets/probe")
    assert resp.status == 404


def image(home, name, data, mode):
    path = os.path.join(home, name)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def add_ticket(daemon, ticket_id, path, size):
    ticket = {"uuid": ticket_id, "size": size, "ops": ["read"],
              "timeout": 300, "url": f"file://{path}",
              "transfer_id": f"transfer-{ticket_id}"}
    return daemon.api.put(ticket)


def download(daemon, ticket_id):
    conn = testutil.UnixHTTPConnection(daemon.conf["local"]["socket"])
    try:
        conn.request("GET", f"/images/{ticket_id}")
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_file_ticket(daemon, home, identity):
    user, _ = identity
    data = os.urandom(64 * 1024) + b"\0" * (64 * 1024)
    # Root's file, readable by everyone.
    path = image(home, "readable.raw", data, 0o644)
    resp, body = add_ticket(daemon, "readable", path, len(data))
    assert resp.status == 200, body
    try:
        status, body = download(daemon, "readable")
        assert status == 200
        assert body == data
        # Our qemu-nbd was started by the unprivileged daemon.
        pids = [p for p in testutil.children(daemon.proc.pid)
                if p in testutil.qemu_nbd_pids()]
        assert pids
        for pid in pids:
            assert ids(pid)["Uid"] == [user.pw_uid] * 4
    finally:
        resp, body = daemon.api.delete("readable")
        assert resp.status == 204, body


def test_file_ticket_unreadable(daemon, home):
    # Root's private file: the daemon is not root any more.
    data = b"x" * 4096
    path = image(home, "private.raw", data, 0o600)
    resp, body = add_ticket(daemon, "private", path, len(data))
    try:
        if resp.status == 200:
            status, body = download(daemon, "private")
        else:
            status = resp.status
        assert status >= 400
        assert data not in body
    finally:
        daemon.api.delete("private")


def test_clean_stop(daemon):
    # Last in this module: stops the shared daemon. As the user, it removes
    # its sockets and stops cleanly.
    assert daemon.stop(signal.SIGTERM) == 0
    assert not os.path.exists(daemon.control_socket)
    assert not os.path.exists(daemon.conf["local"]["socket"])
    with open(daemon.log) as f:
        log = f.read()
    # Earlier tests log expected errors; the shutdown logs none.
    shutdown = log[log.index("Received signal"):]
    assert "Stopped" in shutdown
    assert "ERROR" not in shutdown
    assert "Traceback" not in daemon.stderr


def user_with_groups():
    """A user of this machine with supplementary groups, or None."""
    for user in pwd.getpwall():
        if user.pw_uid == 0:
            continue
        groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
        if groups - {user.pw_gid}:
            return user
    return None


def test_supplementary_groups(tmp_path, pki):
    # As a user with supplementary groups (vdsm adds the daemon's user to
    # the groups owning images), the daemon keeps them.
    user = user_with_groups()
    if user is None:
        pytest.skip("No user with supplementary groups on this machine")
    group = grp.getgrgid(user.pw_gid)
    path = tempfile.mkdtemp(prefix="oi-priv-", dir="/tmp")
    try:
        os.chown(path, user.pw_uid, group.gr_gid)
        d = testutil.DaemonProcess(
            path, pki,
            daemon={"drop_privileges": "true", "user_name": user.pw_name,
                    "group_name": group.gr_name})
        try:
            d.wait_ready()
            testutil.wait_for(
                lambda: ids(d.proc.pid)["Uid"][0] == user.pw_uid,
                message="privileges dropped")
            status = ids(d.proc.pid)
        finally:
            assert d.stop() == 0
        assert status["Gid"] == [group.gr_gid] * 4
        assert sorted(status["Groups"]) == sorted(
            set(os.getgrouplist(user.pw_name, group.gr_gid)))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def unit_capabilities():
    """The unit's CapabilityBoundingSet, as setpriv --bounding-set."""
    with open(UNIT) as f:
        for line in f:
            key, _, value = line.strip().partition("=")
            if key == "CapabilityBoundingSet":
                caps = [c.lower().replace("cap_", "+", 1)
                        for c in value.split()]
                return ",".join(["-all"] + caps)
    raise AssertionError(f"No CapabilityBoundingSet in {UNIT}")


def test_unit_restrictions(home, identity, tmp_path, pki):
    # As the unit runs it: NoNewPrivileges=yes and only the capabilities of
    # its CapabilityBoundingSet. The daemon still drops privileges, and its
    # qemu-nbd still serves a file ticket.
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv is not installed (util-linux)")
    user, group = identity
    conf_dir = str(tmp_path)
    conf = testutil.daemon_conf(
        home, pki,
        daemon={"drop_privileges": "true", "user_name": user.pw_name,
                "group_name": group.gr_name},
        control={"socket": os.path.join(home, "restricted.sock")},
        local={"socket": os.path.join(home, "restricted-local.sock")},
        handler_logfile={
            "args": repr((os.path.join(home, "restricted.log"),))})
    testutil.write_conf(conf_dir, conf)
    proc = subprocess.Popen(
        [setpriv, "--no-new-privs", f"--bounding-set={unit_capabilities()}",
         testutil.bin_path("ovirt-imageio"), "--conf-dir", conf_dir],
        stderr=subprocess.PIPE)
    api = testutil.Control(conf["control"]["socket"])
    try:
        def ready():
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return (ids(proc.pid)["Uid"][0] == user.pw_uid
                        and api.request("GET", "/tickets/x")[0].status == 404)
            except OSError:
                return False
        testutil.wait_for(ready, message="daemon ready")
        with open(f"/proc/{proc.pid}/status") as f:
            assert "NoNewPrivs:\t1\n" in f.read()

        data = os.urandom(65536)
        path = image(home, "restricted.raw", data, 0o644)
        ticket = {"uuid": "restricted", "size": len(data), "ops": ["read"],
                  "timeout": 300, "url": f"file://{path}"}
        resp, body = api.put(ticket)
        assert resp.status == 200, body
        conn = testutil.UnixHTTPConnection(conf["local"]["socket"])
        try:
            conn.request("GET", "/images/restricted")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, data)
        finally:
            conn.close()
        resp, body = api.delete("restricted")
        assert resp.status == 204, body
    finally:
        proc.terminate()
        try:
            assert proc.wait(20) == 0
        finally:
            proc.stderr.close()
            shutil.rmtree(conf["daemon"]["run_dir"], ignore_errors=True)
