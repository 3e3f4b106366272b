"""What ``run.storage`` costs: checkpoint uploads to a local S3 server, and training beside them.

``python -m benchmarks.storage`` starts a private S3-compatible server (SeaweedFS) on loopback
and, for ``spread-gnn`` with a ~1M- and a ~10M-parameter model (``model.hidden`` 332 and 1048):

- a checkpoint's size, the seconds writing it locally (what every run does today, on the
  training thread) and uploading it (on the mirror's thread), medians of 3;
- the seconds the training thread spends asking for an upload (``Mirror.push``);
- a ``--seconds`` run of each, with and without ``run.storage`` (the arms interleaved, in one
  process, a checkpoint every 5 s): env-steps/s, checkpoints written, and the upload seconds as
  a share of the run's wall time.

One JSON line per figure, as the other benchmarks print them.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from agents.ppo import Learner
from agents.rollout import RolloutWorker
from benchmarks.spread import emit
from orchestrator.config import config_to_yaml, load_config
from orchestrator.runtime.checkpoint import save_checkpoint
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.storage import Mirror, open_location
from tests.s3_server import s3_server

SIZES = {"1M": 332, "10M": 1048}  # model.hidden of spread-gnn for ~1M and ~10M parameters


def checkpoint_costs(label: str, hidden: int, uri: str, root: Path) -> None:
    """Local write, upload and push seconds of one size's checkpoints."""
    cfg = load_config("spread-gnn", [f"model.hidden={hidden}", "env.num_envs=8"])
    env = cfg.env.make(8, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    learner = Learner(model, cfg.train)
    learner.update(RolloutWorker(env, model, rollout_len=5, seed=0).collect())  # Adam's state
    params = sum(p.numel() for p in model.parameters())
    run_dir = root / f"ckpt-{label}"
    mirror = Mirror(run_dir, open_location(uri).child(run_dir.name), True, False, background=False)
    writes, pushes = [], []
    for i in range(3):
        t0 = time.perf_counter()
        save_checkpoint(run_dir / "checkpoints", model=model, learner_state=learner.state_dict(),
                        counters={"env_steps": i + 1}, config_yaml=config_to_yaml(cfg),
                        keep=10)  # fmt: skip
        writes.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mirror.push()  # what the training thread does with storage on
        pushes.append(time.perf_counter() - t0)
        mirror.sync()
    uploads = [s for _, _, s in mirror.checkpoint_uploads]
    size = mirror.checkpoint_uploads[-1][1]
    ctx = {"model_params": params, "checkpoint_mb": round(size / 2**20, 2)}
    emit(f"checkpoint_local_write_s_{label}", statistics.median(writes), "s", **ctx)
    emit(f"checkpoint_upload_s_{label}", statistics.median(uploads), "s",
         mb_per_s=round(size / 2**20 / statistics.median(uploads), 1), **ctx)  # fmt: skip
    emit(f"checkpoint_push_s_{label}", statistics.median(pushes), "s", **ctx)
    env.close()


def run_cost(label: str, hidden: int, uri: str, root: Path, seconds: float) -> None:
    """Throughput of a ``seconds`` run with and without storage, interleaved."""
    for arm in ("without_storage", "with_storage"):
        run_dir = root / f"run-{label}-{arm}"
        run_dir.mkdir()
        overrides = [
            f"model.hidden={hidden}", f"train.time_limit_s={seconds}", "redis.enabled=false",
            "run.progress=false", "run.checkpoint_every_s=5", "run.eval_every_s=null",
            "train.total_env_steps=1000000000", "run.keep_checkpoints=100",
            *([f"run.storage={uri}"] if arm == "with_storage" else []),
        ]  # fmt: skip
        t0 = time.perf_counter()
        summary = run_training(load_config("spread-gnn", overrides), run_dir)
        wall = time.perf_counter() - t0
        n = len(summary["checkpoints"])
        emit(f"run_env_steps_per_s_{label}_{arm}",
             summary["steps_this_session"] / summary["train_seconds"], "env_steps/s",
             checkpoints=n, wall_s=round(wall, 1))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Every size: checkpoint costs, then the two runs."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=40.0, help="wall seconds of each run")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-storage-") as tmp:
        root = Path(tmp)
        (root / "weed").mkdir()
        with s3_server(root / "weed", "shoal-bench") as server:
            for label, hidden in SIZES.items():
                checkpoint_costs(label, hidden, server["uri"], root)
            for label, hidden in SIZES.items():
                run_cost(label, hidden, server["uri"], root, args.seconds)


if __name__ == "__main__":
    main()
