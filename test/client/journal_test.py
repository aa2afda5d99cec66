"""
ovirt-img's journal of resumable transfers (ovirt_imageio/client/
_journal.py): where it lives, its mode, its ranges, the source check.
"""

import json
import os
import stat

import pytest

from ovirt_imageio.client import _journal

TID = "5e3a1b9c-8f6d-4c1e-9a2b-7d4e6f8a0b1c"


@pytest.fixture
def environ(tmp_path):
    return {"XDG_STATE_HOME": str(tmp_path / "state")}


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "src.raw"
    path.write_bytes(b"x" * 4096)
    return str(path)


def read(environ):
    with open(_journal.path(TID, environ)) as f:
        return json.load(f)


def test_path_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _journal.path(TID, {}) == str(
        tmp_path / ".local" / "state" / "ovirt-img" / f"{TID}.json")


def test_create_load_modes(environ, source):
    j = _journal.Journal.create(
        TID, {"command": "upload-disk", "disk_id": "d",
              "source": _journal.identity(source)}, environ=environ)
    filename = _journal.path(TID, environ)
    assert stat.S_IMODE(os.stat(filename).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(filename)).st_mode) == 0o700
    # Written at once, ranges merged.
    assert read(environ)["ranges"] == []
    j.add(0, 10)
    j.add(20, 10)
    j.add(10, 10)
    j.close()
    assert read(environ)["ranges"] == [[0, 30]]
    loaded = _journal.Journal.load(TID, environ=environ)
    assert loaded.ranges == [(0, 30)]
    assert loaded.done == 30
    assert loaded.info["disk_id"] == "d"
    loaded.check_source(source)
    loaded.remove()
    assert not os.path.exists(filename)


def test_add_bounded_frequency(environ):
    now = [0.0]
    j = _journal.Journal(_journal.path(TID, environ), {}, interval=1.0,
                         clock=lambda: now[0])
    os.makedirs(_journal.directory(environ))
    j.add(0, 10)                # the first write is at once
    assert read(environ)["ranges"] == [[0, 10]]
    j.add(10, 10)               # too soon: a timer writes it later
    assert read(environ)["ranges"] == [[0, 10]]
    now[0] = 1.0
    j.add(30, 5)                # due
    assert read(environ)["ranges"] == [[0, 20], [30, 5]]
    j.remove()
    j.add(40, 5)                # removed: never written again
    j.close()
    assert not os.path.exists(_journal.path(TID, environ))


def test_changed_source_refused(environ, source):
    j = _journal.Journal.create(
        TID, {"command": "upload-disk",
              "source": _journal.identity(source)}, environ=environ)
    with open(source, "ab") as f:
        f.write(b"more")
    with pytest.raises(_journal.Error) as e:
        j.check_source(source)
    assert "size" in str(e.value)


def test_load_missing(environ):
    with pytest.raises(_journal.Error) as e:
        _journal.Journal.load(TID, environ=environ)
    assert "No journal" in str(e.value)


def test_load_other_transfer(environ):
    os.makedirs(_journal.directory(environ))
    with open(_journal.path(TID, environ), "w") as f:
        json.dump({"version": 1, "transfer_id": "other", "ranges": []}, f)
    with pytest.raises(_journal.Error):
        _journal.Journal.load(TID, environ=environ)


@pytest.mark.parametrize("bad", [
    "../../etc/passwd", "a/b", "", "5E3A1B9C-8F6D-4C1E-9A2B-7D4E6F8A0B1C",
    "{5e3a1b9c-8f6d-4c1e-9a2b-7d4e6f8a0b1c}", None])
def test_path_only_uuid(environ, bad):
    # The id comes from the engine: never a path of its choosing.
    with pytest.raises(_journal.Error, match="expected a UUID"):
        _journal.path(bad, environ)
