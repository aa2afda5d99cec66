"""The text exposition format (prometheus.py), read back by
prometheus-client's parser."""

import math
import threading

from prometheus_client.parser import text_string_to_metric_families

from ovirt_imageio import prometheus


def parse(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_gauge_and_counter():
    g = prometheus.Family("x_open", "gauge", "Open things.").add(3)
    c = prometheus.Family("x_bytes_total", "counter", "Bytes.")
    c.add(10, {"op": "read"}).add(2**63 - 1, {"op": "write"})
    text = prometheus.render([g, c])
    assert text.endswith("\n")
    families = parse(text)
    assert families["x_open"].type == "gauge"
    assert families["x_open"].documentation == "Open things."
    [s] = families["x_open"].samples
    assert s.value == 3
    # The parser names a counter family without _total.
    samples = {s.labels["op"]: s.value for s in families["x_bytes"].samples}
    assert samples == {"read": 10, "write": float(2**63 - 1)}
    # Integers are written exactly, not as floats.
    assert 'x_bytes_total{op="write"} 9223372036854775807\n' in text


def test_escaping():
    f = prometheus.Family("x", "gauge", 'Help with \\ and\nnewline "q".')
    f.add(1, {"id": 'a "b" \\ c\nd'})
    families = parse(prometheus.render([f]))
    assert families["x"].documentation == 'Help with \\ and\nnewline "q".'
    assert families["x"].samples[0].labels == {"id": 'a "b" \\ c\nd'}


def test_values():
    f = prometheus.Family("x", "gauge", "X.")
    f.add(1.5, {"v": "a"}).add(math.inf, {"v": "b"}).add(True, {"v": "c"})
    text = prometheus.render([f])
    values = {s.labels["v"]: s.value for s in parse(text)["x"].samples}
    assert values == {"a": 1.5, "b": math.inf, "c": 1}


def test_histogram():
    h = prometheus.Histogram(buckets=(0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 2.0, 3.0):
        h.observe(("read",), v)
    h.observe(("write",), 0.01)
    f = prometheus.Family("x_seconds", "histogram", "Durations.")
    for (op,), snap in sorted(h.snapshot().items()):
        f.add_histogram(snap, {"op": op})
    family = parse(prometheus.render([f]))["x_seconds"]
    assert family.type == "histogram"
    samples = {(s.name, s.labels.get("op"), s.labels.get("le")): s.value
               for s in family.samples}
    # Cumulative; a value on a bound is in its bucket (le).
    assert samples[("x_seconds_bucket", "read", "0.1")] == 2
    assert samples[("x_seconds_bucket", "read", "1.0")] == 3
    assert samples[("x_seconds_bucket", "read", "+Inf")] == 5
    assert samples[("x_seconds_count", "read", None)] == 5
    assert samples[("x_seconds_sum", "read", None)] == 5.65
    assert samples[("x_seconds_count", "write", None)] == 1


def test_counter_from_threads():
    c = prometheus.Counter()
    assert c.value == 0

    def count():
        for _ in range(10000):
            c.inc()

    threads = [threading.Thread(target=count) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert c.value == 80000
