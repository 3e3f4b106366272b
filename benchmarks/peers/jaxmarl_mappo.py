"""JaxMARL's own recurrent MAPPO on SMAX, run on this machine as the suite's peer.

``python -m benchmarks.peers.jaxmarl_mappo --repo JAXMARL_CHECKOUT --map 3m --seconds 300``
loads ``baselines/MAPPO/mappo_rnn_smax.py`` and its config
(``config/mappo_homogenous_rnn_smax.yaml``: 128 envs, 128-step rollouts, GRU 128, lr 0.002
annealed over ``TOTAL_TIMESTEPS``) from a JaxMARL checkout and trains it unchanged but for
three stand-ins that do not touch the algorithm: ``wandb`` (its per-update ``log`` becomes a
JSON line with the wall time), ``hydra``/``omegaconf`` (only its ``main`` uses them), and
``distrax`` where it does not import (its ``Categorical``: the same sampling, log-probability
and entropy). JaxMARL jit-compiles the whole run as one ``lax.scan``; ``--seconds`` ends it
from the per-update callback once that much wall time has passed since the start (compile
included), so the peer gets the same wall clock as the shoal arm it is compared with.

Its figures are its own training episodes (the stochastic policy, the episodes that ended in
each update), as JaxMARL reports them: ``returns`` is one ally's return (SMAX gives every ally
the team reward), ``win_rate`` the fraction of those episodes won. Env steps count worlds
(``NUM_ENVS`` × ``NUM_STEPS`` per update), as shoal counts them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
import types
from pathlib import Path
from typing import Any

BASELINE = Path("baselines/MAPPO/mappo_rnn_smax.py")
CONFIG = Path("baselines/MAPPO/config/mappo_homogenous_rnn_smax.yaml")


class _Stop(Exception):
    """Raised from the per-update callback once the wall-clock budget is spent."""


def _categorical() -> type:
    import jax
    import jax.numpy as jnp

    class Categorical:
        """``distrax.Categorical(logits=...)`` as the baseline uses it."""

        def __init__(self, logits: Any) -> None:
            self.logits = jax.nn.log_softmax(logits, axis=-1)

        def sample(self, seed: Any) -> Any:
            return jax.random.categorical(seed, self.logits, axis=-1)

        def log_prob(self, value: Any) -> Any:
            idx = jnp.expand_dims(value.astype(jnp.int32), -1)
            return jnp.take_along_axis(self.logits, idx, axis=-1).squeeze(-1)

        def entropy(self) -> Any:
            p = jnp.exp(self.logits)
            return -jnp.sum(jnp.where(p > 0, p * self.logits, 0.0), axis=-1)

    return Categorical


def _stand_ins(records: list[dict[str, Any]], start: list[float], seconds: float) -> None:
    def log(values: dict[str, Any], *_: Any, **__: Any) -> None:
        now = time.perf_counter() - start[0]
        records.append(
            {
                "env_steps": int(values["env_step"]),
                "wall_s": round(now, 2),
                "returns": float(values["returns"]),
                "win_rate": float(values["win_rate"]),
            }
        )
        if now >= seconds:
            raise _Stop

    wandb = types.ModuleType("wandb")
    wandb.log = log  # type: ignore[attr-defined]
    wandb.init = lambda *a, **k: None  # type: ignore[attr-defined]
    hydra = types.ModuleType("hydra")
    hydra.main = lambda *a, **k: lambda f: f  # type: ignore[attr-defined]
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = types.SimpleNamespace(to_container=lambda c: c)  # type: ignore[attr-defined]
    sys.modules.update(wandb=wandb, hydra=hydra, omegaconf=omegaconf)
    try:
        import distrax  # type: ignore[import-not-found]  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure: the stand-in does its one job
        sys.modules["distrax"] = types.SimpleNamespace(Categorical=_categorical())  # type: ignore[assignment]


def _config(repo: Path) -> dict[str, Any]:
    import yaml

    with open(repo / CONFIG) as fh:
        return dict(yaml.safe_load(fh))


def run(repo: Path, map_name: str, seed: int, seconds: float, total: int) -> dict[str, Any]:
    """One seed of the baseline for ``seconds`` of wall clock (or ``total`` env steps)."""
    import jax

    records: list[dict[str, Any]] = []
    start = [time.perf_counter()]
    _stand_ins(records, start, seconds)
    spec = importlib.util.spec_from_file_location("jaxmarl_mappo_rnn_smax", repo / BASELINE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = _config(repo)
    config.update(MAP_NAME=map_name, SEED=seed, TOTAL_TIMESTEPS=total, WANDB_MODE="disabled")
    start[0] = time.perf_counter()
    try:
        out = jax.jit(module.make_train(config))(jax.random.PRNGKey(seed))
        jax.block_until_ready(out)
        stopped = "budget"
    except Exception as exc:  # noqa: BLE001 - the callback's _Stop arrives wrapped by XLA
        if "_Stop" not in repr(exc) and not isinstance(exc, _Stop):
            raise
        stopped = "seconds"
    wall = time.perf_counter() - start[0]
    for r in records:  # its callback labels an update with the steps before it
        r["env_steps"] += config["NUM_ENVS"] * config["NUM_STEPS"]
    first, last = records[0], records[-1]
    span = last["wall_s"] - first["wall_s"]
    sps = (last["env_steps"] - first["env_steps"]) / span if span > 0 else math.nan
    return {"records": records, "wall_s": wall, "env_steps_per_s": sps,
            "first_update_s": first["wall_s"], "stopped": stopped}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Seeds of JaxMARL's recurrent MAPPO on one SMAX map, a JSON line per seed."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repo", type=Path, required=True, help="a JaxMARL checkout (0.2)")
    p.add_argument("--map", default="3m")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=600.0, help="wall clock per seed")
    p.add_argument("--total-env-steps", type=int, default=10_000_000,
                   help="TOTAL_TIMESTEPS (its learning-rate schedule's horizon)")  # fmt: skip
    args = p.parse_args(argv)
    if not (args.repo / BASELINE).is_file():
        p.error(f"--repo: no {BASELINE} under '{args.repo}'; clone JaxMARL there")
    for seed in range(args.seeds):
        res = run(args.repo, args.map, seed, args.seconds, args.total_env_steps)
        recs = res.pop("records")
        tail = recs[-max(1, len(recs) // 10) :]  # the last tenth of its updates
        print(json.dumps({
            "metric": f"jaxmarl_mappo_rnn_smax_{args.map}_seed_run", "seed": seed,
            "env_steps": recs[-1]["env_steps"],
            "win_rate_last_tenth": round(sum(r["win_rate"] for r in tail) / len(tail), 3),
            "ally_return_last_tenth": round(sum(r["returns"] for r in tail) / len(tail), 3),
            **{k: round(v, 2) if isinstance(v, float) else v for k, v in res.items()},
            "curve": [[r["env_steps"], round(r["returns"], 3), round(r["win_rate"], 3)]
                      for r in recs[:: max(1, len(recs) // 40)]],
        }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
