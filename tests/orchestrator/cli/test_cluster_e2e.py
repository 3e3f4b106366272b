"""End to end on a real loopback Ray head: submit, follow, read logs, scrape metrics, stop.

This is what a user does with a cluster, with every piece real: `ray start --head` (token
auth on), `shoal submit` through Ray's Jobs API, the run joining the cluster with named
learner actors, Ray's metrics endpoint, and teardown by PID (never `ray stop`).
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import pytest
import requests

from orchestrator.cli.jobs import _run_placement
from orchestrator.cli.jobs_client import ShoalJobs
from orchestrator.cli.main import main as shoal
from tests.ray_head import ray_head
from tests.s3_server import s3_server

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "env.num_envs=16",
    "model.hidden=16",
    "train.rollout_len=10",
    "train.minibatches=2",
    "run.progress=false",
    "run.log_every_s=0.2",
]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc"),
]


def _scrape(port: int, metric: str, run_id: str, timeout: float) -> list[str]:
    """Lines of ``metric`` tagged with ``run_id`` on the node's metrics endpoint."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        except requests.RequestException:
            text = ""
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(metric) and f'run_id="{run_id}"' in line
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(1.0)


@pytest.mark.storage
def test_submit_follow_fetch_scrape_and_stop(tmp_path, monkeypatch, capsys) -> None:
    # A private S3 server: its keys are in this process's environment, so in the head's too
    # (the head's jobs write there) and in `shoal jobs fetch`'s here.
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "s3").mkdir()
    # Workers report metrics every second instead of every 10 s, so the scrape is quick.
    with (
        s3_server(tmp_path / "s3", "shoal-e2e") as s3,
        ray_head(
            auth=True, num_cpus=2, extra_env={"RAY_metrics_report_interval_ms": "1000"}
        ) as head,
    ):
        monkeypatch.setenv("RAY_AUTH_TOKEN", head.token or "")
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        jobs = ShoalJobs(head.address)

        # 1. A short spread-gnn job, followed to its end through the CLI.
        run1 = f"e2e-{uuid.uuid4().hex[:8]}"
        t0 = time.monotonic()
        code = shoal(
            [
                "submit", "spread-gnn", *TINY, "train.total_env_steps=1600",
                f"run.dir={tmp_path}", f"run.name={run1}", f"run.storage={s3['uri']}",
                "--address", head.address, "--working-dir", str(ROOT), "--follow",
            ]
        )  # fmt: skip
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        job1 = re.search(r"submitted (shoal-spread-gnn-\S+)", out)
        assert job1, out[-2000:]
        assert jobs.status(job1.group(1)) == "SUCCEEDED"
        logs = jobs.logs(job1.group(1))
        assert "total_env_steps reached" in logs and "1,600" in logs
        ckpts = sorted((tmp_path / run1 / "checkpoints").glob("step-*"))
        assert ckpts and ckpts[-1].name == "step-000000001600"
        assert time.monotonic() - t0 < 240
        # Its results, from run.storage (S3), here: evaluated as any local run.
        assert shoal(["jobs", "status", job1.group(1), "--address", head.address]) == 0
        stored = s3["uri"].replace("/runs?", f"/runs/{run1}?")
        assert f"results: {stored}" in capsys.readouterr().out
        fetched = tmp_path / "fetched"
        assert shoal(["jobs", "fetch", job1.group(1), str(fetched), "--address", head.address]) == 0
        assert (fetched / "metrics.csv").is_file()
        assert shoal(["eval", str(fetched), "--episodes", "4"]) == 0
        assert "step-000000001600" in capsys.readouterr().out

        # 2. A long job: its metrics reach the head's endpoint tagged with its run, then stop.
        run2 = f"e2e-{uuid.uuid4().hex[:8]}"
        # No run.storage, and the default run.dir: the run lives in Ray's copy of the
        # working dir on the driver's node (the metadata is what `shoal submit` records).
        args2 = [*TINY, "train.total_env_steps=1000000000", f"run.name={run2}",
                 "rollout.num_workers=1"]  # fmt: skip
        args2, meta2 = _run_placement("spread-gnn", args2, f"shoal-{run2}")
        job2 = jobs.submit(
            ["spread-gnn", *args2, "--address", "auto"], working_dir=str(ROOT),
            submission_id=f"shoal-{run2}", metadata=meta2,
        )  # fmt: skip
        assert jobs.wait(job2, timeout=120, until={"RUNNING", "FAILED"}) == "RUNNING"
        steps = _scrape(head.metrics_port, "ray_shoal_env_steps_total", run2, timeout=150)
        assert steps, jobs.logs(job2)[-3000:]
        # Learner rank 0 (relayed by the driver) and the rollout actor report separately.
        deadline = time.monotonic() + 90
        while not all(any(f'role="{r}"' in line for line in steps) for r in ("learner", "rollout")):
            assert time.monotonic() < deadline, steps
            steps = _scrape(head.metrics_port, "ray_shoal_env_steps_total", run2, timeout=5)
        assert float(steps[0].rsplit(" ", 1)[1]) > 0
        # Without run.storage, `shoal jobs fetch` copies the run from the driver's node.
        fetched2 = tmp_path / "fetched2"
        assert shoal(["jobs", "fetch", job2, str(fetched2), "--address", head.address]) == 0
        assert "driver node" in capsys.readouterr().out
        assert {"config.yaml", "metrics.csv"} <= {p.name for p in fetched2.iterdir()}
        assert not any(p.name.startswith("shoal-fetch") for p in fetched2.iterdir())
        assert not [j for j in jobs.list() if (j.submission_id or "").startswith(f"{job2}-fetch")]
        for metric in (
            "ray_shoal_episode_team_return",
            "ray_shoal_policy_loss",
            "ray_shoal_weights_staleness",
            "ray_shoal_redis_rtt_ms",
        ):
            assert _scrape(head.metrics_port, metric, run2, timeout=30), metric
        assert jobs.stop(job2)
        assert jobs.wait(job2, timeout=60) == "STOPPED"
