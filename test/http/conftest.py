import os
import shutil

import pytest

import testutil
from ovirt_imageio import clock
from ovirt_imageio import config
from ovirt_imageio import server


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()


# Proxy mode (API.md section 5): imageio on the engine host in front of a
# daemon, each with its own PKI, as in a real deployment.

@pytest.fixture(scope="session")
def proxy_pki(tmp_path_factory):
    """The engine's PKI (apache key, cert and CA), for proxies."""
    return testutil.make_pki(tmp_path_factory.mktemp("proxy-pki"))


class TCPControl(testutil.Control):
    """The engine's control client: one TCP connection per call."""

    def __init__(self, host, port):
        self.host = host
        self.port = port

    def request(self, method, path, body=None, headers=None):
        import http.client
        import json
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp, resp.read()
        finally:
            conn.close()


def engine_conf(proxy_pki, daemon_ca_file):
    """
    What engine-setup writes in /etc/ovirt-imageio/conf.d/50-engine.conf:
    the engine's apache PKI for TLS, the CA that signed the hosts'
    certificates for the daemons, fixed ports, no local socket, control
    over TCP, INFO logs to the log file.
    """
    return {
        "tls": {"enable": "true", **proxy_pki},
        "backend_http": {"ca_file": daemon_ca_file},
        "remote": {"port": "54323"},
        "local": {"enable": "false"},
        "control": {"transport": "tcp", "port": "54324"},
        "handlers": {"keys": "logfile"},
        "logger_root": {"handlers": "logfile", "level": "INFO"},
    }


@pytest.fixture
def make_proxy(tmp_path, pki, proxy_pki):
    """
    Start in-process proxies configured by engine-setup's 50-engine.conf
    (engine_conf(): TLS with proxy_pki, [backend_http] ca_file = the
    daemons' CA from pki), with a 99-test.conf on top moving the ports to
    random ones and the run dir and log under tmp; keyword overrides go in
    99-test.conf too. Each proxy has `api`, a TCPControl on its control
    port, and `url(ticket_id)`, its /images URL.
    """
    import tempfile

    started = []

    def make(**overrides):
        tmp = str(tmp_path / f"proxy{len(started)}")
        os.makedirs(tmp)
        testutil.write_conf(tmp, engine_conf(proxy_pki, pki["ca_file"]),
                            name="50-engine.conf")
        run_dir = tempfile.mkdtemp(prefix="oi-proxy-", dir="/tmp")
        local = {
            "daemon": {"run_dir": run_dir, "drop_privileges": "false",
                       "systemd_enable": "false"},
            "remote": {"host": "127.0.0.1", "port": "0"},
            "control": {"port": "0"},
            "handler_logfile": {
                "args": repr((os.path.join(tmp, "proxy.log"),))},
        }
        for section, values in overrides.items():
            local.setdefault(section, {}).update(values)
        testutil.write_conf(tmp, local, name="99-test.conf")
        cfg = config.load(tmp, vendor_dir=os.path.join(tmp, "vendor"))
        p = server.Daemon(cfg, clock=clock.FakeClock())
        p.clock = p.store.clock
        p.tmp = tmp
        started.append(p)
        p.start()
        host, port = p.control.server.address()[:2]
        p.api = TCPControl(host, port)
        remote_port = p.remote.server.address()[1]
        p.url = lambda ticket_id: (
            f"https://localhost:{remote_port}/images/{ticket_id}")
        return p

    yield make
    for p in started:
        p.stop()
        shutil.rmtree(p.cfg.daemon.run_dir, ignore_errors=True)
