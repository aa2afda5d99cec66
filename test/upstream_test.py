"""The tooling for upstream ovirt-imageio 2.5.1 (test/upstream.py)."""

import json
import os
import time

import pytest

import testutil
import upstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_client_is_upstream(upstream_venv):
    info = upstream.run_json(
        "import json, ovirt_imageio\n"
        "from ovirt_imageio import client\n"
        "from ovirt_imageio._internal import version\n"
        "print(json.dumps({'version': version.string,\n"
        "                  'package': ovirt_imageio.__path__[0],\n"
        "                  'client': client.__file__}))\n",
        cwd=ROOT)  # Where `import ovirt_imageio` would find ours if on path.
    assert info["version"] == "2.5.1"
    venv = os.path.realpath(upstream_venv) + os.sep
    for path in info["package"], info["client"]:
        assert os.path.realpath(path).startswith(venv)
        assert not os.path.realpath(path).startswith(ROOT + os.sep)


def test_venv_marked_ready(upstream_venv):
    assert upstream.anchor_venv() == upstream_venv
    with open(os.path.join(upstream_venv, upstream.MARKER)) as f:
        assert json.load(f)["version"] == "2.5.1"


def test_run_client_args_and_stdin(upstream_venv):
    out = upstream.run_client(
        "import sys; print(sys.argv[1:], sys.stdin.read())", "a", 2,
        input="in")
    assert out.stdout == "['a', '2'] in\n"


def test_run_client_failure_shows_stderr(upstream_venv):
    with pytest.raises(upstream.ClientError) as e:
        upstream.run_client("import sys; sys.exit('client broke')")
    assert e.value.returncode == 1
    assert "client broke" in str(e.value)


def test_run_client_timeout_kills_group(upstream_venv, tmp_path,
                                        processes_with, wait_for):
    marker = str(tmp_path / "sleeper")
    start = time.monotonic()
    with pytest.raises(upstream.ClientError, match="timed out"):
        upstream.run_client(
            "import subprocess, sys, time\n"
            "subprocess.Popen(['sleep', '60', sys.argv[1]])\n"
            "print('started', file=sys.stderr, flush=True)\n"
            "time.sleep(60)\n",
            marker, timeout=2)
    assert time.monotonic() - start < 30
    # The grandchild went with the client.
    wait_for(lambda: not processes_with(marker), message="sleep killed")


def test_daemon_options(upstream_venv, tmp_path, pki, processes_with,
                        pid_alive):
    d = upstream.UpstreamDaemon(tmp_path, pki)
    try:
        d.wait_ready()
        assert os.path.realpath(d.proc.args[0]).startswith(
            os.path.realpath(upstream_venv))

        status, body = _https_options(d.remote_port, pki["ca_file"])
        assert status == 200
        assert "unix_socket" in body
        assert body["unix_socket"] == d.local_socket

        conn = testutil.UnixHTTPConnection(d.local_socket)
        try:
            conn.request("OPTIONS", "/images/*")
            resp = conn.getresponse()
            local = json.loads(resp.read())
        finally:
            conn.close()
        assert resp.status == 200
        assert "extents" in local["features"]
        # Upstream advertises the socket on the socket too.
        assert local["unix_socket"] == d.local_socket
    finally:
        assert d.stop() == 0, d.stderr
    assert not pid_alive(d.pid)
    assert processes_with(d.tmp) == []


def _https_options(port, ca_file):
    import http.client
    import ssl
    ctx = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection("localhost", port, context=ctx,
                                       timeout=10)
    try:
        conn.request("OPTIONS", "/images/*")
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_daemon_context_manager(upstream_venv, tmp_path, pki, pid_alive):
    with upstream.UpstreamDaemon(tmp_path, pki) as d:
        resp, _ = d.api.request("GET", "/tickets/nothing")
        assert resp.status == 404
        assert d.url("t").startswith(f"https://127.0.0.1:{d.remote_port}/")
    assert not pid_alive(d.pid)
    assert d.proc.returncode == 0


def test_daemon_bad_config_reports(upstream_venv, tmp_path, pki):
    d = upstream.UpstreamDaemon(
        tmp_path, pki, tls={"key_file": str(tmp_path / "missing.pem")})
    with pytest.raises(AssertionError, match="upstream daemon exited"):
        d.wait_ready()
    d.stop()
