"""The inter-token histogram takes a whole output's tokens in one observation and renders as Prometheus expects."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from tokenmill.serve.metrics import _BatchHistogram as BatchHistogram


def rendered(registry: CollectorRegistry) -> dict[str, float]:
    lines = generate_latest(registry).decode().splitlines()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in lines if not line.startswith("#")}


def test_batch_observations_render_like_prometheus_histograms():
    buckets = (0.01, 0.1, 1.0)
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    batch = BatchHistogram("gap_seconds", "Gaps.", buckets, ours)
    reference = Histogram("gap_seconds", "Gaps.", buckets=buckets, registry=theirs)
    for value, count in ((0.005, 3), (0.01, 1), (0.5, 2), (7.0, 4), (0.1, 1)):
        batch.observe(value, count)
        for _ in range(count):
            reference.observe(value)
    expected = {k: v for k, v in rendered(theirs).items() if "_created" not in k}
    assert rendered(ours) == expected
    assert expected['gap_seconds_bucket{le="0.01"}'] == 4 and expected["gap_seconds_count"] == 11
