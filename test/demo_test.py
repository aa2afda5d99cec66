"""make demo's script, end to end, so the README's first command keeps
working."""

import os
import subprocess
import sys

import testutil


def test_demo(tmp_path):
    r = subprocess.run([sys.executable,
                        os.path.join(testutil.ROOT, "dev", "demo"),
                        str(tmp_path)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: uploaded and downloaded images match" in r.stdout
    assert "Daemon stopped (exit 0)" in r.stdout
