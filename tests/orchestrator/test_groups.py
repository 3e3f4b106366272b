"""Agent groups through whole runs: metrics per group, checkpoints, resume, eval, init."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from orchestrator.cli.evaluate import cross_play, evaluate
from orchestrator.cli.main import main as shoal
from orchestrator.config import load_config
from orchestrator.runtime.checkpoint import list_checkpoints, load_checkpoint
from orchestrator.runtime.driver import run_training

TINY = [
    "env.num_envs=16",
    "train.rollout_len=10",
    "model.hidden=16",
    "run.progress=false",
    "redis.enabled=false",
    "run.eval_every_s=0.5",
    "run.eval_episodes=16",
    "run.checkpoint_every_steps=800",
    "run.keep_checkpoints=10",
]


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _units(path: Path, unit: int) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)["model"]
    return {k: v for k, v in state.items() if k.startswith(f"units.{unit}.")}


def test_predators_train_against_frozen_prey_then_prey_against_them(tmp_path, capsys) -> None:
    first = tmp_path / "predators"
    first.mkdir()
    cfg = load_config("tag-mlp", [*TINY, "train.total_env_steps=2400", "groups.agent.train=false"])
    summary = run_training(cfg, first)
    assert summary["counters"]["env_steps"] >= 2400

    rows = _rows(first)
    assert {"return/adversary", "return/agent", "eval_return/adversary"} <= set(rows[0])
    ended = [r for r in rows if r["return/adversary"] not in ("", "nan")]
    assert ended
    for r in ended:  # the run's return is the trained group's
        assert math.isclose(float(r["episode_return"]), float(r["return/adversary"]), rel_tol=1e-6)
    meta = json.loads((list_checkpoints(first / "checkpoints")[-1] / "meta.json").read_text())
    assert [g["name"] for g in meta["policy_groups"]] == ["adversary", "agent"]

    # Frozen prey end as they started: their weights equal those of every checkpoint.
    found = list_checkpoints(first / "checkpoints")
    assert len(found) >= 2
    prey = [_units(c, 1) for c in found]
    for k, v in prey[0].items():
        assert all(torch.equal(v, p[k]) for p in prey[1:]), k

    res = evaluate(first, episodes=16, parallel=16)
    assert set(res["groups"]) == {"adversary", "agent"}
    assert math.isclose(res["mean"], res["groups"]["adversary"]["mean"], rel_tol=1e-6)

    table = cross_play(first, episodes=8, parallel=8)
    n = len(found)
    assert table["groups"] == ["adversary", "agent"] and len(table["checkpoints"]) == n
    assert all(len(row) == n and all(math.isfinite(v) for v in row)
               for row in table["table"]["agent"])  # fmt: skip

    # Then the prey learn against those predators, frozen.
    second = tmp_path / "prey"
    second.mkdir()
    cfg2 = load_config(
        "tag-mlp",
        [*TINY, "train.total_env_steps=800", "groups.adversary.train=false",
         f"groups.adversary.init={first}"],
    )  # fmt: skip
    run_training(cfg2, second)
    best = first / "checkpoints" / "best"
    src = {k.removeprefix("units.0."): v for k, v in _units(best, 0).items()}
    got = _units(list_checkpoints(second / "checkpoints")[-1], 0)
    assert got
    for k, v in got.items():
        assert torch.equal(v, src[k.removeprefix("units.0.")]), k

    # The command line shows both groups.
    assert shoal(["eval", str(second), "--episodes", "8", "--json"]) == 0
    out = capsys.readouterr().out
    assert "group adversary: return" in out and "group agent: return" in out


def test_a_grouped_run_resumes_with_every_group(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("tag-mlp", [*TINY, "train.total_env_steps=800"])
    run_training(cfg, run_dir)
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    cfg2 = load_config("tag-mlp", [*TINY, "train.total_env_steps=1600"])
    summary = run_training(cfg2, run_dir, resume=str(last))
    assert summary["counters"]["env_steps"] >= 1600
    steps = [float(r["env_steps"]) for r in _rows(run_dir)]
    assert steps == sorted(steps)
    state = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])["model"]
    assert any(k.startswith("units.1.") for k in state)


def test_self_play_pool_lives_in_redis_and_checkpoints(tmp_path, redis_server) -> None:
    from agents.memory import WeightStore, connect
    from orchestrator.runtime.pool import POOL_PREFIX

    run_dir = tmp_path / "selfplay"
    run_dir.mkdir()
    overrides = [o for o in TINY if o != "redis.enabled=false"]
    cfg = load_config(
        "tag-mlp",
        [*overrides, f"redis.url={redis_server.url}", "train.total_env_steps=1600",
         "groups.agent.pool.size=3", "groups.agent.pool.every=2", "run.name=selfplay"],
    )  # fmt: skip
    run_training(cfg, run_dir)
    rows = _rows(run_dir)
    assert float(rows[-1]["pool_size/agent"]) == 3.0  # 10 updates, a snapshot every 2, kept 3
    ckpt = load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])
    pool = ckpt["extra"]["pool"]["agent"]
    assert len(pool) == 3
    # The run's own Redis keys are namespaced by its directory's name.
    store = WeightStore(connect(redis_server.url), run_dir.name, name=POOL_PREFIX + "agent")
    assert sorted(store.versions()) == sorted(int(v) for v in pool)
    newest = max(pool, key=int)
    _, fetched = store.fetch(int(newest))
    for k, v in pool[newest].items():
        assert torch.equal(fetched[k], v), k
