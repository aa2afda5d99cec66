"""
ovirt-img's journal of an upload or download that may be resumed
(`--resume TRANSFER_ID`): the ranges already transferred, so a resumed
transfer sends only what is missing.

One file per transfer, $XDG_STATE_HOME/ovirt-img/<transfer-id>.json
(default ~/.local/state), mode 0600 in a folder of mode 0700. It holds
the command, the disk id, the local file's identity (absolute path,
size, mtime: a changed source refuses to resume) and the completed
ranges; never the transfer URL, whose path is the ticket id, a
credential: a resumed transfer asks the engine for it again.

The ranges are written as the workers complete them, by an atomic
rewrite (a temporary file renamed over the old one), at most every
SAVE_INTERVAL seconds (a timer writes the last ones) and at close(). A range is recorded
only after the server answered for it, so what a killed ovirt-img lost
is at most the last interval's ranges, which are sent again.
"""

import json
import os
import threading
import time
import uuid

VERSION = 1

# Seconds between rewrites of the journal while ranges complete.
SAVE_INTERVAL = 1.0


class Error(Exception):
    """A journal that cannot be used: missing, unreadable, or of another
    transfer or source."""


def directory(environ=os.environ):
    state = environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "ovirt-img")


def path(transfer_id, environ=os.environ):
    """The journal of a transfer. The id comes from the engine or the
    command line and names a file: only a UUID is taken."""
    try:
        valid = str(uuid.UUID(transfer_id)) == transfer_id
    except (TypeError, ValueError, AttributeError):
        valid = False
    if not valid:
        raise Error(f"Invalid transfer id {str(transfer_id)[:64]!r}: "
                    f"expected a UUID")
    return os.path.join(directory(environ), f"{transfer_id}.json")


def identity(filename):
    """What must not change between a transfer and its resume."""
    st = os.stat(filename)
    return {"path": os.path.abspath(filename), "size": st.st_size,
            "mtime_ns": st.st_mtime_ns}


class Journal:
    """
    The journal of one transfer. ranges: the (start, length) pairs done;
    add(start, length) is called from the transfer's worker threads.
    """

    def __init__(self, filename, info, ranges=(), interval=SAVE_INTERVAL,
                 clock=time.monotonic):
        self.filename = filename
        self.info = dict(info)
        self._ranges = _merged(ranges)
        self._lock = threading.Lock()
        self._interval = interval
        self._clock = clock
        self._saved = None
        self._dirty = False
        self._timer = None
        self._removed = False

    @classmethod
    def create(cls, transfer_id, info, environ=os.environ):
        """A new journal for transfer_id (info: command, disk_id,
        source...), written at once."""
        folder = directory(environ)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        info = dict(info, version=VERSION, transfer_id=transfer_id)
        journal = cls(path(transfer_id, environ), info)
        journal.save()
        return journal

    @classmethod
    def load(cls, transfer_id, environ=os.environ):
        filename = path(transfer_id, environ)
        try:
            with open(filename) as f:
                data = json.load(f)
        except FileNotFoundError:
            raise Error(f"No journal of transfer {transfer_id} in "
                        f"{directory(environ)}: cannot resume it") from None
        except (OSError, ValueError) as e:
            raise Error(f"Cannot read the journal {filename}: {e}") from e
        if (not isinstance(data, dict) or data.get("version") != VERSION
                or data.get("transfer_id") != transfer_id):
            raise Error(f"Invalid journal {filename}")
        try:
            ranges = [(int(s), int(n)) for s, n in data.pop("ranges", [])]
        except (TypeError, ValueError):
            raise Error(f"Invalid journal {filename}") from None
        return cls(filename, data, ranges)

    @property
    def ranges(self):
        with self._lock:
            return list(self._ranges)

    @property
    def done(self):
        """Bytes recorded as transferred."""
        with self._lock:
            return sum(n for _, n in self._ranges)

    def check_source(self, filename):
        """Raise Error unless filename is the file the transfer started
        with, unchanged."""
        expected = self.info.get("source")
        try:
            found = identity(filename)
        except OSError as e:
            raise Error(f"Cannot resume: {e}") from e
        if found != expected:
            what = [k for k in ("path", "size", "mtime_ns")
                    if found.get(k) != (expected or {}).get(k)]
            raise Error(
                f"Cannot resume transfer {self.info['transfer_id']}: "
                f"{filename} is not the file it started with, or changed "
                f"since ({', '.join(what)} differ)")

    def add(self, start, length):
        """Record a range done; written now if the last write is
        SAVE_INTERVAL old, else by a timer when it is."""
        with self._lock:
            self._ranges = _merged(self._ranges + [(start, length)])
            self._dirty = True
            left = (0 if self._saved is None
                    else self._interval - (self._clock() - self._saved))
            if left > 0:
                if self._timer is None:
                    self._timer = threading.Timer(left, self._flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.save()

    def _flush(self):
        with self._lock:
            self._timer = None
            dirty = self._dirty
        if dirty:
            self.save()

    def save(self):
        with self._lock:
            if self._removed:
                return
            data = dict(self.info, ranges=[list(r) for r in self._ranges])
            self._dirty = False
            self._saved = self._clock()
            tmp = f"{self.filename}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)
                with os.fdopen(fd, "w") as f:
                    fd = None
                    json.dump(data, f)
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                if fd is not None:
                    os.close(fd)
            os.rename(tmp, self.filename)

    def close(self):
        """Write what is not written yet."""
        with self._lock:
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        if self._dirty:
            self.save()

    def remove(self):
        """The transfer ended: no journal any more."""
        with self._lock:
            self._removed = True
            timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        for name in (self.filename, f"{self.filename}.tmp"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


def _merged(ranges):
    result = []
    for start, length in sorted(ranges):
        if length <= 0:
            continue
        end = start + length
        if result and start <= result[-1][1]:
            result[-1][1] = max(result[-1][1], end)
        else:
            result.append([start, end])
    return [(s, e - s) for s, e in result]
