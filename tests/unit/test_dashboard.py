"""deploy/grafana/embedding-trident.json: a Grafana dashboard over the series the code exports.

Every series a query names must be exported: the workers' come from their real registries
(worker/metrics.py: the ingest workers' and the rebuild workers' ``trident_reembed_*``),
Triton's are checked against a running Triton in tests/integration/test_dashboard_metrics.py,
and the query API's are the names agreed for its /metrics (QUERY_API_SERIES).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from tests.unit.deployment_support import REPO
from worker.metrics import RebuildMetrics, WorkerMetrics

DASHBOARD = REPO / "deploy" / "grafana" / "embedding-trident.json"
# The query API's /metrics: requests by route, method and status, a latency histogram by route,
# requests in flight.
QUERY_API_SERIES = {
    "trident_api_requests_total": {"route", "method", "status"},
    "trident_api_request_seconds_bucket": {"route", "le"},
    "trident_api_in_flight_requests": set(),
}
TRITON_PREFIX = "nv_"


def worker_series() -> dict[str, set[str]]:
    """Series name -> label names, for every metric a worker's registry holds (a rebuild
    worker's too).

    prometheus_client has no public accessor for a metric's label names, and ``collect()``
    shows no series for labelled metrics before they are used: read the collectors.
    """
    series: dict[str, set[str]] = {}
    collectors = {
        **vars(WorkerMetrics(CollectorRegistry())),
        **{f"rebuild_{k}": v for k, v in vars(RebuildMetrics(CollectorRegistry())).items()},
    }
    for collector in collectors.values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        name, labels = collector._name, set(collector._labelnames)
        if collector._type == "counter":
            series[f"{name}_total"] = labels
        elif collector._type == "histogram":
            series |= {f"{name}_bucket": labels | {"le"}, f"{name}_sum": labels}
            series[f"{name}_count"] = labels
        else:
            series[name] = labels
    assert series, "no metrics found on WorkerMetrics"
    return series


def exported_series() -> dict[str, set[str]]:
    return {**worker_series(), **QUERY_API_SERIES}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded = json.loads(DASHBOARD.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _expressions(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p["targets"]]


def series_in(expression: str) -> set[str]:
    """Series names a PromQL expression selects: its identifiers that are not functions,
    grouping labels, label matchers or ranges."""
    bare = re.sub(r'"[^"]*"', "", expression)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without)\s*\([^)]*\)", "", bare)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", bare))


def test_the_dashboard_covers_what_operators_watch(dashboard: dict[str, Any]) -> None:
    titles = " | ".join(p["title"] for p in _panels(dashboard))
    for topic in (
        "Throughput",
        "lag per partition",
        "Dead letters by reason",
        "Stage latency",
        "Search latency",
        "Re-embedding progress",
        "Re-embedding lag",
        "Re-embedding rate",
        "Re-embedding ETA",
    ):
        assert topic in titles
    assert dashboard["uid"] and dashboard["title"] == "Embedding Trident"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_every_queried_series_is_exported(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    queried: set[str] = set()
    for expression in _expressions(dashboard):
        queried |= series_in(expression)
    trident = {name for name in queried if not name.startswith(TRITON_PREFIX)}
    assert trident <= set(exported), sorted(trident - set(exported))
    # Each worker metric family is on the dashboard (lag and dead letters included).
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in worker_series()}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in trident}
    assert families <= shown, sorted(families - shown)


def test_grouping_labels_exist_on_their_series(dashboard: dict[str, Any]) -> None:
    exported = exported_series()
    for expression in _expressions(dashboard):
        grouped = {
            label.strip()
            for labels in re.findall(r"\bby \(([^)]*)\)", expression)
            for label in labels.split(",")
        }
        names = {n for n in series_in(expression) if not n.startswith(TRITON_PREFIX)}
        for label in grouped:
            assert any(label in exported[n] for n in names), f"{label} in {expression}"


def test_the_series_check_catches_unknown_names() -> None:
    assert series_in('sum(rate(trident_api_requests_total{route="/search"}[5m]))') == {
        "trident_api_requests_total"
    }
    assert series_in("max by (topic, partition) (trident_consumer_lag) / 1e6") == {
        "trident_consumer_lag"
    }
    assert "trident_events_consumed" not in exported_series()  # the counter's name ends _total
    assert "trident_consumer_lag" in exported_series()
