"""Retake the README's dashboard screenshots: a live shoal job on a loopback Ray head.

    .venv/bin/python docs/capture_dashboard.py            # writes docs/images/dashboard-*.png

Starts a private head (token auth off, so the browser needs no token), submits `spread-gnn`
with one rollout worker, waits until its actors are up, and has headless Chromium
(`apt install chromium`) photograph the Jobs page, the job's own page and the Actors page.
The head is stopped by PID at the end, never with `ray stop`.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.cli.jobs_client import ShoalJobs  # noqa: E402
from tests.browser import dom_until, screenshot  # noqa: E402
from tests.ray_head import ray_head  # noqa: E402

OUT = ROOT / "docs" / "images"


def main() -> None:
    """Start the head, submit the job, take the three screenshots, stop everything."""
    with (
        tempfile.TemporaryDirectory(prefix="shoal-dash-") as runs,
        ray_head(auth=False, num_cpus=2) as head,
    ):
        jobs = ShoalJobs(head.address)
        job = jobs.submit(
            ["spread-gnn", "train.total_env_steps=1000000000", f"run.dir={runs}",
             f"run.name=dashboard-{uuid.uuid4().hex[:6]}", "rollout.num_workers=1",
             "--address", "auto"],
            working_dir=str(ROOT),
        )  # fmt: skip
        try:
            if jobs.wait(job, timeout=120, until={"RUNNING", "FAILED"}) != "RUNNING":
                raise SystemExit(f"job {job} did not start:\n{jobs.logs(job)[-3000:]}")
            if "shoal-rollout-0" not in dom_until(
                f"{head.address}/#/actors", ["shoal-rollout-0"], 180
            ):
                raise SystemExit("the shoal actors did not show within 180 s")
            time.sleep(20)  # a few iterations, so the job's log and the actor table fill in
            pages = {
                "dashboard-jobs.png": ("/#/jobs", (1400, 620)),
                "dashboard-job.png": (f"/#/jobs/{job}", (1400, 1300)),
                "dashboard-actors.png": ("/#/actors", (1800, 760)),
            }
            for name, (page, size) in pages.items():
                print(screenshot(f"{head.address}{page}", OUT / name, size=size))  # noqa: T201
        finally:
            jobs.stop(job)
            jobs.wait(job, timeout=60)


if __name__ == "__main__":
    main()
