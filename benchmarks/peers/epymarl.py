"""EPyMARL's own MAPPO on a Gymnasium tuple-space env (LBF, rware), run on this machine as a peer.

``python -m benchmarks.peers.epymarl --repo EPYMARL_CHECKOUT --python PEER_PYTHON
--key lbforaging:Foraging-8x8-2p-2f-coop-v3 --time-limit 50 --seconds 300`` runs
``src/main.py --config=mappo --env-config=gymma`` unchanged (its MAPPO: GRU agents, 10
parallel envs, lr 3e-4) in its own Python environment (EPyMARL pins its own torch; keep it out
of shoal's), stops it after ``--seconds`` of wall clock, and prints a JSON line per seed with
its env steps, wall time and every ``test_return_mean`` it logged (greedy test episodes, its
own evaluation), each stamped with the wall time it was printed at. ``test_interval`` and
``log_interval`` are set to ``--log-every`` env steps so a short run still reports, and its
test runs to ``test_nepisode=10`` (its default, 100 episodes every 10k steps, would step more
test episodes than training ones on RWARE's 500-step episodes; its env-steps/s count training
steps only, so test episodes lower it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

STATS = re.compile(r"Recent Stats \| t_env:\s+(\d+)")
TEST = re.compile(r"test_return_mean:\s+(-?[\d.]+)")


def run(
    repo: Path, python: str, key: str, time_limit: int, seed: int, seconds: float,
    log_every: int = 10_000, test_episodes: int = 10,
) -> dict[str, Any]:  # fmt: skip
    """One seed for ``seconds`` of wall clock: ``records`` of (env steps, wall s, test return)."""
    cmd = [
        python, "src/main.py", "--config=mappo", "--env-config=gymma", "with",
        f"env_args.key={key}", f"env_args.time_limit={time_limit}", f"seed={seed}",
        "t_max=100000000", f"test_interval={log_every}", f"log_interval={log_every}",
        f"runner_log_interval={log_every}", f"learner_log_interval={log_every}",
        "save_model=False", "use_tensorboard=False", f"test_nepisode={test_episodes}",
    ]  # fmt: skip
    start = time.perf_counter()
    # Its own process group: EPyMARL's parallel runner forks an env process per env, and
    # they must end with it.
    proc = subprocess.Popen(
        cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    records: list[dict[str, Any]] = []
    t_env: int | None = None
    tail: list[str] = []
    try:
        for line in proc.stdout:
            now = time.perf_counter() - start
            tail = (tail + [line.rstrip()])[-20:]
            if m := STATS.search(line):
                t_env = int(m.group(1))
            if (m := TEST.search(line)) and t_env is not None:
                records.append({"env_steps": t_env, "wall_s": round(now, 1),
                                "test_return": float(m.group(1))})  # fmt: skip
            if now >= seconds:
                break
    finally:
        _end(proc)
    if not records:
        raise RuntimeError("EPyMARL logged no test return; its output ended:\n" + "\n".join(tail))
    wall = time.perf_counter() - start
    first, last = records[0], records[-1]
    span = last["wall_s"] - first["wall_s"]
    sps = (last["env_steps"] - first["env_steps"]) / span if span > 0 else float("nan")
    return {"records": records, "wall_s": wall, "env_steps_per_s": sps}


def _end(proc: subprocess.Popen[str]) -> None:
    """Stop the run and every process it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> None:
    """Seeds of EPyMARL's MAPPO on one env, a JSON line per seed."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repo", type=Path, required=True, help="an EPyMARL checkout")
    p.add_argument("--python", required=True, help="the Python with EPyMARL's requirements")
    p.add_argument("--key", required=True, help="gymnasium id, e.g. lbforaging:Foraging-...")
    p.add_argument("--time-limit", type=int, default=50)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=600.0)
    args = p.parse_args(argv)
    if not (args.repo / "src" / "main.py").is_file():
        p.error(f"--repo: no src/main.py under '{args.repo}'; clone EPyMARL there")
    for seed in range(args.seeds):
        res = run(args.repo, args.python, args.key, args.time_limit, seed, args.seconds)
        print(json.dumps({"metric": "epymarl_mappo_seed_run", "seed": seed, "key": args.key,
                          **res}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
