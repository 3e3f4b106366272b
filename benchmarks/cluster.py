"""Cluster-job benchmarks on a private loopback Ray head.

``python -m benchmarks.cluster`` starts a head (token auth on), submits ``spread-gnn`` with
``shoal submit``'s client, and prints JSON lines: submit-to-RUNNING latency, the job's
env-steps/s, and the same preset under ``shoal run`` on this machine in the same session.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from pathlib import Path

from benchmarks.spread import emit
from orchestrator.cli.jobs_client import ShoalJobs
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training
from tests.ray_head import ray_head

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    """Run the cluster benchmarks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=40.0, help="training time per run")
    p.add_argument("--repeats", type=int, default=3, help="submissions timed for latency")
    args = p.parse_args(argv)
    preset, base = "spread-gnn", ["run.progress=false"]
    with tempfile.TemporaryDirectory() as tmp, ray_head(auth=True, num_cpus=2) as head:
        os.environ["RAY_AUTH_TOKEN"] = head.token or ""
        jobs = ShoalJobs(head.address)
        jobs.connect()
        latencies = []
        for i in range(args.repeats):
            t0 = time.perf_counter()
            job = jobs.submit(
                [preset, *base, "train.total_env_steps=1", f"run.dir={tmp}", f"run.name=lat{i}",
                 "--address", "auto"],
                working_dir=str(ROOT),
            )  # fmt: skip
            jobs.wait(job, timeout=300, poll=0.05, until={"RUNNING", "SUCCEEDED", "FAILED"})
            latencies.append(time.perf_counter() - t0)
            jobs.wait(job, timeout=300)
        latencies.sort()
        emit(
            "cluster_submit_to_running_s",
            latencies[len(latencies) // 2],
            "s",
            all_s=[round(x, 2) for x in latencies],
            note="median; includes uploading the working dir on the first submission",
        )
        job = jobs.submit(
            [preset, *base, f"train.time_limit_s={args.seconds}", f"run.dir={tmp}",
             "run.name=tput", "--json", "--address", "auto"],
            working_dir=str(ROOT),
        )  # fmt: skip
        status = jobs.wait(job, timeout=args.seconds + 300)
        logs = jobs.logs(job)
        line = next((m for m in re.findall(r"^\{.*\}$", logs, re.M)), None)
        if status != "SUCCEEDED" or line is None:
            raise SystemExit(f"job {job} ended {status}:\n{logs[-3000:]}")
        summary = json.loads(line)
        job_sps = summary["steps_this_session"] / summary["train_seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(preset, [*base, f"train.time_limit_s={args.seconds}", f"run.dir={tmp}"])
        run_dir = Path(tmp) / "local"
        run_dir.mkdir()
        local = run_training(cfg, run_dir)
        local_sps = local["steps_this_session"] / local["train_seconds"]
    emit("cluster_job_env_steps_per_s", job_sps, "env_steps/s", preset=preset,
         path="job on loopback head (learner actor, envs in the rank)")  # fmt: skip
    emit("shoal_run_env_steps_per_s", local_sps, "env_steps/s", preset=preset,
         path="shoal run in-process", job_vs_local=round(job_sps / local_sps, 3))  # fmt: skip


if __name__ == "__main__":
    main()
