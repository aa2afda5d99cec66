import os
import shutil

import pytest

import testutil
from ovirt_imageio import clock
from ovirt_imageio import config
from ovirt_imageio import server


@pytest.fixture
def make_daemon(tmp_path, pki):
    """Start in-process daemons with a fake clock; stop them at teardown."""
    started = []

    def make(**overrides):
        tmp = str(tmp_path / f"daemon{len(started)}")
        os.makedirs(tmp)
        testutil.write_conf(tmp, testutil.daemon_conf(tmp, pki, **overrides))
        vendor = os.path.join(tmp, "vendor")
        cfg = config.load(tmp, vendor_dir=vendor)
        d = server.Daemon(cfg, clock=clock.FakeClock())
        d.clock = d.store.clock
        d.tmp = tmp
        started.append(d)
        d.start()
        if d.control:
            d.api = testutil.Control(d.control.server.address())
        return d

    yield make
    for d in started:
        d.stop()
        shutil.rmtree(d.cfg.daemon.run_dir, ignore_errors=True)


@pytest.fixture
def daemon(make_daemon):
    return make_daemon()
