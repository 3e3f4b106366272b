"""The Ray dashboard of a live shoal run, loaded in a real (headless) browser.

A job is submitted to a loopback head with one rollout worker; Chromium renders the
dashboard's Jobs and Actors pages, and the shoal job and its actors are found by name in what
a user would see. Skipped, with the reason, where no Chromium is installed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from orchestrator.cli.jobs_client import ShoalJobs
from tests.browser import dom_until, find_chromium
from tests.ray_head import ray_head

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "env.num_envs=16",
    "model.hidden=16",
    "train.rollout_len=10",
    "train.minibatches=2",
    "run.progress=false",
]

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc"),
    pytest.mark.skipif(
        find_chromium() is None, reason="no headless Chromium (apt install chromium)"
    ),
]


def test_dashboard_shows_the_job_and_its_actors_by_name(tmp_path, monkeypatch) -> None:
    # Token auth off: with it on, the dashboard first asks the browser for the token.
    with ray_head(auth=False, num_cpus=2) as head:
        monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        jobs = ShoalJobs(head.address)
        run = f"dash-{uuid.uuid4().hex[:8]}"
        job = jobs.submit(
            ["spread-gnn", *TINY, "train.total_env_steps=1000000000", f"run.dir={tmp_path}",
             f"run.name={run}", "rollout.num_workers=1", "--address", "auto"],
            working_dir=str(ROOT),
        )  # fmt: skip
        try:
            assert jobs.wait(job, timeout=120, until={"RUNNING", "FAILED"}) == "RUNNING"
            actors = dom_until(
                f"{head.address}/#/actors", ["shoal-learner-0", "shoal-rollout-0"], 150
            )
            assert "shoal-learner-0" in actors and "shoal-rollout-0" in actors, (
                actors[-3000:] + jobs.logs(job)[-2000:]
            )
            listing = dom_until(f"{head.address}/#/jobs", [job], 60)
            assert job in listing, listing[-3000:]
        finally:
            jobs.stop(job)
            jobs.wait(job, timeout=60)
