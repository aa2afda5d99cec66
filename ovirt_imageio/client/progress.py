"""
Progress reporting, compatible with upstream's client.ProgressBar, and
as Prometheus text for programs (Exporter: ovirt-img --progress-file,
--progress-listen).

The pipeline sets `progress.size` once the total is known and calls
`progress.update(n)` (from worker threads) for every n bytes done,
including ranges it had nothing to do for, so done reaches size. Any
object with a settable `size` and an `update(n)` method works (tqdm
does); a plain callable is wrapped by Callback.
"""

import http.server
import json
import os
import socket
import sys
import tempfile
import threading
import time

from .. import prometheus

FORMAT_TEXT = "text"
FORMAT_JSON = "json"

DEFAULT_WIDTH = 79


class Callback:
    """Adapt an update(n) callable (older API) to the progress object."""

    def __init__(self, update):
        self.update = update
        self.size = None


def wrap(progress):
    """Return a progress object for what a caller passed (or None)."""
    if progress is None or hasattr(progress, "update"):
        return progress
    if callable(progress):
        return Callback(progress)
    raise TypeError(
        f"progress must have an update(n) method or be callable, got "
        f"{type(progress).__name__}")


def humansize(n):
    """1536 -> '1.50 KiB'."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            break
        n /= 1024
    if unit == "bytes":
        return f"{n:.0f} bytes"
    return f"{n:.2f} {unit}"


class ProgressBar:
    """
    A progress line on a terminal ("text": redrawn in place) or a JSON
    object per line ("json"), drawn when the percentage changes.
    """

    def __init__(self, phase=None, error_phase="command failed", size=None,
                 output=sys.stdout, format=FORMAT_TEXT, step=None,
                 width=DEFAULT_WIDTH, now=time.monotonic):
        """
        phase: what is going on; error_phase: the phase shown when the
        code in the `with` block fails; size: total bytes (may be set
        later); output: a text file; format: "text" or "json"; step:
        unused, for compatibility; width: of a text line; now: clock.
        """
        if format not in (FORMAT_TEXT, FORMAT_JSON):
            raise ValueError(f"Unsupported progress format {format!r}")
        self._phase = phase
        self._error_phase = error_phase
        self._size = size
        self._output = output
        self._format = format
        self._width = width
        self._now = now
        self._lock = threading.Lock()
        self._start = now()
        self._done = 0
        # Percent drawn last; -1 so that the first update draws 0%.
        self._value = -1
        self._closed = False
        self._drawn = self._start
        self._state = None
        self._draw()

    @property
    def phase(self):
        return self._phase

    @phase.setter
    def phase(self, value):
        with self._lock:
            if not self._closed and value != self._phase:
                self._phase = value
                self._draw()

    @property
    def size(self):
        return self._size

    @size.setter
    def size(self, value):
        with self._lock:
            if not self._closed and value != self._size:
                self._size = value
                self._draw()

    @property
    def done(self):
        return self._done

    def snapshot(self):
        """(phase, done, size, elapsed seconds, closed), read together."""
        with self._lock:
            return (self._phase, self._done, self._size,
                    self._now() - self._start, self._closed)

    def update(self, n):
        """Add n bytes done; redraw when the percentage changes."""
        with self._lock:
            if self._closed:
                return
            self._done += n
            if self._size:
                value = int(self._done / self._size * 100)
                if value > self._value:
                    self._value = value
                    self._draw()

    def refresh(self, max_age=1.0):
        """Redraw if nothing was drawn for max_age seconds, so that a
        long phase (a wait, a slow transfer) shows it is alive."""
        with self._lock:
            if not self._closed and self._now() - self._drawn >= max_age:
                self._draw()

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self._draw(last=True)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.phase = self._error_phase
        self.close()

    def _draw(self, last=False):
        self._drawn = self._now()
        elapsed = self._drawn - self._start
        # The last JSON record repeats nothing: one record per state. A
        # text line is drawn again with its "\n", as upstream does.
        state = (self._phase, self._done, self._size)
        repeat = last and state == self._state
        self._state = state
        if self._format == FORMAT_JSON:
            if repeat:
                return
            record = {"transferred": self._done, "elapsed": elapsed,
                      "description": self._phase or ""}
            if self._size is not None:
                record["size"] = self._size
            self._write(json.dumps(record), "\n")
            return
        percent = f"{max(0, self._value):3d}%" if self._size else "----"
        rate = self._done / elapsed if elapsed else 0
        line = (f"[ {percent} ] {humansize(self._done)}, {elapsed:.2f} s, "
                f"{humansize(rate)}/s")
        if self._phase:
            line += f" | {self._phase}"
        # "\r" redraws the same line; the last one ends it.
        self._write(line.ljust(self._width), "\n" if last else "\r")

    def _write(self, line, end):
        self._output.write(line + end)
        self._output.flush()


class Ticker:
    """
    Refresh a ProgressBar from a thread while the block runs: never
    silent for more than interval seconds.

        with ProgressBar() as bar, Ticker(bar):
            ...
    """

    def __init__(self, bar, interval=1.0):
        self._bar = bar
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="progress",
                                        daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self._interval / 4):
            self._bar.refresh(self._interval)


class Exporter:
    """
    A ProgressBar's state as Prometheus text, for a Kubernetes populator
    or Forklift that should not parse the progress line: rewritten every
    interval seconds in a file (atomically: a reader sees the last
    complete text, never a partial one; kept after exit), and served at
    http://ADDRESS:PORT/metrics while the command runs.

        bar = ProgressBar()
        with Exporter(bar, path="progress.prom"), bar:
            ...

    The bar is closed before the exporter exits, so the last text says
    how the command ended (its phase, running 0, failed).
    """

    def __init__(self, bar, path=None, listen=None, command=None,
                 interval=1.0):
        """
        path: the file to write; listen: (host, port) to serve on;
        command: the ovirt-img command, a label.
        """
        self._bar = bar
        self.path = path
        self._command = command
        self._interval = interval
        self._stop = threading.Event()
        self.failed = False
        self._thread = None
        self._server = None
        if listen is not None:
            self._server = _Server(listen, self)

    @property
    def address(self):
        """The address served, (host, port), or None."""
        return self._server.server_address[:2] if self._server else None

    def __enter__(self):
        self.write()
        if self._server is not None:
            threading.Thread(target=self._server.serve_forever,
                             name="progress-server", daemon=True).start()
        if self.path is not None:
            self._thread = threading.Thread(
                target=self._run, name="progress-file", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, value, tb):
        if kind is not None:
            self.failed = True
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        # The last value, after the bar closed.
        self.write()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _run(self):
        while not self._stop.wait(self._interval):
            self.write()

    def write(self):
        """Replace the file with the current text."""
        if self.path is None:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=".progress-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.text())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def text(self):
        phase, done, size, elapsed, closed = self._bar.snapshot()
        families = []

        def family(name, kind, help):
            f = prometheus.Family("ovirt_img_" + name, kind, help)
            families.append(f)
            return f

        labels = {"phase": phase or ""}
        if self._command:
            labels["command"] = self._command
        family("info", "gauge", "The command and what it is doing.").add(
            1, labels)
        family("transferred_bytes", "gauge",
               "Bytes of the image done so far.").add(done)
        if size is not None:
            family("size_bytes", "gauge",
                   "Bytes of the image to transfer.").add(size)
            family("progress_ratio", "gauge",
                   "Done, from 0 to 1.").add(
                min(1.0, done / size) if size else 1.0)
        family("elapsed_seconds", "gauge",
               "Seconds since the command started.").add(elapsed)
        family("running", "gauge",
               "1 while the command runs, 0 once it ended.").add(
            0 if closed else 1)
        family("failed", "gauge", "1 if the command failed.").add(
            1 if self.failed else 0)
        return prometheus.render(families)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, exporter):
        self.exporter = exporter
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):

    def do_GET(self):
        if self.path.split("?")[0] not in ("/metrics", "/"):
            self.send_error(404)
            return
        body = self.server.exporter.text().encode("utf-8")
        self.send_response(200)
        self.send_header("content-type", prometheus.CONTENT_TYPE)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass
