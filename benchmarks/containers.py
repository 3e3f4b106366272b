"""The batch container: shoal's ``RolloutBatch`` against ``tensordict.TensorDict``, same data.

Run ``python -m benchmarks.containers`` (``tensordict`` installed beside shoal; it is not one
of shoal's dependencies). A real batch of each preset is collected once; then, on the same
tensors, each container does what shoal's batches go through every update: stack ``T``
per-step records into ``[T, B, ...]`` (acting), split along the env axis (one shard per
learner rank), gather PPO's minibatches (random time steps, flattened) and move to a device.
Each result is one JSON line with both containers' microseconds, measured alternately in the
same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from agents.rollout import RolloutBatch, RolloutWorker
from orchestrator.config import load_config


def _batch(preset: str) -> RolloutBatch:
    cfg = load_config(preset)
    env = cfg.env.make(cfg.env.num_envs, 0, torch.device("cpu"))
    model = cfg.build_policy(env)
    return RolloutWorker(env, model, cfg.train.rollout_len, 0).collect()


def _columns(b: RolloutBatch) -> dict[str, Any]:
    """The per-step ``[T, B, ...]`` fields, obs nested (what both containers hold)."""
    return {
        "obs": dict(b.obs),
        "actions": b.actions,
        "logp": b.logp,
        "values": b.values,
        "rewards": b.rewards,
        "terminated": b.terminated,
        "truncated": b.truncated,
        "next_values": b.next_values,
    }


def _time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t0) / repeat * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["spread-gnn", "spread-mlp"])
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--rounds", type=int, default=3, help="alternations of the two containers")
    args = p.parse_args()
    torch.set_num_threads(1)
    for preset in args.presets:
        _measure(preset, args.repeat, args.rounds)


def _measure(preset: str, repeat: int, rounds: int) -> None:
    from tensordict import TensorDict  # type: ignore[import-not-found, unused-ignore]

    batch = _batch(preset)
    cols = _columns(batch)
    t_len, b = batch.rewards.shape[:2]
    steps = [{k: _index(v, t) for k, v in cols.items()} for t in range(t_len)]
    td_steps = [TensorDict(s, batch_size=[b]) for s in steps]
    td = TensorDict(cols, batch_size=[t_len, b])
    idx = torch.randperm(t_len)[: t_len // 2]

    ours: dict[str, Callable[[], object]] = {
        "stack": lambda: _stack(steps),
        "split_envs_2": lambda: batch.split_envs(2),
        "minibatch": lambda: {k: _gather(v, idx) for k, v in cols.items()},
        "to_device": lambda: batch.to("cpu"),
    }
    theirs: dict[str, Callable[[], object]] = {
        "stack": lambda: torch.stack(td_steps),
        "split_envs_2": lambda: td.split(b // 2, dim=1),
        "minibatch": lambda: td[idx].flatten(0, 1),
        "to_device": lambda: td.to("cpu"),
    }
    for op in ours:
        a, t = [], []
        for _ in range(rounds):
            a.append(_time(ours[op], repeat))
            t.append(_time(theirs[op], repeat))
        print(
            json.dumps(
                {
                    "name": f"container_{op}",
                    "preset": preset,
                    "shape": [t_len, b],
                    "rolloutbatch_us": round(min(a), 1),
                    "tensordict_us": round(min(t), 1),
                    "ratio": round(min(t) / min(a), 2),
                    "unit": "us per call (best of rounds)",
                    "torch": torch.__version__,
                    "machine": platform.machine(),
                }
            ),
            flush=True,
        )


def _index(v: Any, t: int) -> Any:
    return {k: x[t] for k, x in v.items()} if isinstance(v, dict) else v[t]


def _stack(steps: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in steps[0].items():
        if isinstance(v, dict):
            out[k] = {kk: torch.stack([s[k][kk] for s in steps]) for kk in v}
        else:
            out[k] = torch.stack([s[k] for s in steps])
    return out


def _gather(v: Any, idx: torch.Tensor) -> Any:
    if isinstance(v, dict):
        return {k: x[idx].flatten(0, 1) for k, x in v.items()}
    return v[idx].flatten(0, 1)


if __name__ == "__main__":
    main()
