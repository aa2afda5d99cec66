"""
The Prometheus text exposition format (version 0.0.4), written by hand:
the daemon has no runtime dependencies, and the format is a few lines of
text per metric family:

    # HELP ovirt_imageio_connections Open client connections.
    # TYPE ovirt_imageio_connections gauge
    ovirt_imageio_connections{service="remote"} 3

Used by the daemon's /metrics (http/metrics.py) and by ovirt-img's
progress (client/progress.py). Histogram keeps request durations;
Counter is an event counter that needs no lock.
"""

import bisect
import itertools
import math
import threading

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Family:
    """One metric family: name, type, help and its samples."""

    def __init__(self, name, kind, help):
        self.name = name
        self.kind = kind
        self.help = help
        self.samples = []

    def add(self, value, labels=None, suffix=""):
        """Add a sample of this family (suffix: _bucket, _sum, _count of a
        histogram)."""
        self.samples.append((self.name + suffix, labels or {}, value))
        return self

    def add_histogram(self, snapshot, labels=None):
        """Add the samples of a histogram: snapshot is (buckets, counts,
        sum) as Histogram.snapshot() gives per label set."""
        labels = labels or {}
        bounds, counts, total = snapshot
        cumulative = 0
        for bound, n in zip(bounds + (math.inf,), counts):
            cumulative += n
            self.add(cumulative, {**labels, "le": bound}, "_bucket")
        self.add(total, labels, "_sum")
        self.add(cumulative, labels, "_count")
        return self


def render(families):
    """The exposition text of an iterable of Family."""
    lines = []
    for f in families:
        lines.append(f"# HELP {f.name} {_escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for name, labels, value in f.samples:
            lines.append(f"{name}{_labels(labels)} {_value(value)}")
    return "\n".join(lines) + "\n"


def _labels(labels):
    if not labels:
        return ""
    items = ",".join(f'{k}="{_escape_label(_label_value(v))}"'
                     for k, v in labels.items())
    return "{" + items + "}"


def _label_value(v):
    # Bucket bounds are floats: "0.5", "+Inf".
    return _value(v) if isinstance(v, float) else str(v)


def _escape_help(text):
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text):
    return (text.replace("\\", "\\\\").replace("\n", "\\n")
            .replace('"', '\\"'))


def _value(v):
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if math.isnan(v):
        return "NaN"
    return repr(float(v))


class Counter:
    """
    A count of events with no lock: next() on itertools.count is one C
    call, atomic under the GIL, so any thread may count.
    """

    def __init__(self):
        self._count = itertools.count()

    def inc(self):
        next(self._count)

    @property
    def value(self):
        # count's __reduce__ gives its next value without advancing it.
        return self._count.__reduce__()[1][0]


# Request durations, seconds: 4 KiB reads take a millisecond or less,
# whole-disk transfers minutes.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    """
    Observations by label set (a tuple of label values), in fixed
    buckets. One lock taken per observation: requests are observed once,
    when they end, never per piece.
    """

    def __init__(self, buckets=DURATION_BUCKETS):
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._series = {}

    def observe(self, key, value):
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [
                    [0] * (len(self.buckets) + 1), 0.0]
            series[0][i] += 1
            series[1] += value

    def snapshot(self):
        """{key: (buckets, counts per bucket (not cumulative), sum)}."""
        with self._lock:
            return {key: (self.buckets, list(counts), total)
                    for key, (counts, total) in self._series.items()}
