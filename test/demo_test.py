"""make demo's script, end to end, so the README's first command keeps
working: the daemon and the engine simulator, ovirt-img uploading and
downloading, the checks, and a clean stop."""

import os
import re
import subprocess
import sys

import testutil


def test_demo(tmp_path, processes_with):
    r = subprocess.run([sys.executable,
                        os.path.join(testutil.ROOT, "dev", "demo"),
                        str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    out = r.stdout
    assert r.returncode == 0, out + r.stderr

    # The steps, in order, with the real command lines.
    steps = [line for line in out.splitlines() if line.startswith("==> ")]
    assert steps[0].startswith("==> Starting the daemon")
    assert steps[1].startswith("==> Starting the engine simulator")
    assert steps[-1].startswith("==> OK: the image went up and came back")
    assert "enginesim.py --store" in out
    upload = re.search(r"\$ XDG_CONFIG_HOME=\S+ \S*ovirt-img upload-disk "
                       r"-c demo -s nfs --disk-id (\S+) ", out)
    assert upload, out
    disk_id = upload.group(1)
    assert re.search(rf"\S*ovirt-img download-disk -c demo -f qcow2 "
                     rf"{disk_id} \S+downloaded.qcow2", out), out

    # ovirt-img's text progress reached the user.
    assert "| upload completed" in out
    assert "| download completed" in out
    # qemu-img compare: the disk's volume and the download.
    assert out.count("Images are identical.") == 2

    # --verify is on by default: the daemon served one checksum per
    # transfer.
    with open(tmp_path / "demo" / "daemon.log") as f:
        checksums = [line for line in f if "GET checksum" in line
                     and "status=200" in line]
    assert len(checksums) == 2

    # The config file the commands read, with the demo's section.
    with open(tmp_path / "demo" / "config" / "ovirt-img.conf") as f:
        assert f.readline().strip() == "[demo]"

    assert "Engine simulator stopped (exit 0)" in out
    assert "Daemon stopped (exit 0)" in out
    # No daemon, simulator or qemu-nbd of the demo is left.
    assert processes_with(str(tmp_path)) == []
