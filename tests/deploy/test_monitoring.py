"""Prometheus scrapes Ray's metrics, and Grafana plots every metric shoal declares, per run."""

from __future__ import annotations

import json
import re
from typing import Any

from orchestrator.runtime.ray_metrics import exported_names
from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    _doc,
    _load_yaml,
)

# --- Monitoring -----------------------------------------------------------------------------


def test_prometheus_scrapes_rays_service_discovery_file() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = _load_yaml(DEPLOY / "monitoring" / "prometheus.yml")
    jobs = config["scrape_configs"]
    assert len({j["job_name"] for j in jobs}) == len(jobs)
    files = [f for j in jobs for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files
    # The static example points at the KubeRay head Service's metrics port.
    cluster = _doc("RayCluster")
    (head_c,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    metrics_port = next(p["containerPort"] for p in head_c["ports"] if p["name"] == "metrics")
    targets = [t for j in jobs for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert f"{cluster['metadata']['name']}-head-svc:{metrics_port}" in targets


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "monitoring" / "grafana" / "shoal-dashboard.json").read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_plots_every_shoal_metric_per_run() -> None:
    dashboard = _dashboard()
    exprs = _exprs(dashboard)
    # The names come from the code that declares the metrics, gauges and counters alike.
    for metric in exported_names():
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs), f"no panel for {metric}"
    assert all('run_id=~"$run_id"' in e for e in exprs)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "run_id" in variables["run_id"]["query"]["query"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        for ds in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            assert ds["uid"] == "${datasource}", p["title"]


def test_every_declared_metric_is_documented_in_the_cluster_guide() -> None:
    readme = (ROOT / "docs" / "cluster.md").read_text()
    for metric in exported_names():
        assert f"`{metric}`" in readme, metric
