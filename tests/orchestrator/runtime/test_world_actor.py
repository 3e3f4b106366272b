"""On Ray the world model trains in `shoal-world-model` from the replay stream, survives SIGKILL."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import ray
import torch

from agents.memory import RunState, WeightStore, connect
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.storage import _listing, complete_checkpoints, open_location
from orchestrator.runtime.world import WORLD_MODEL_ACTOR, WORLD_MODEL_WEIGHTS
from orchestrator.runtime.world_actor import CHECKPOINT_FILE, checkpoint_dir
from tests.orchestrator.runtime.test_distributed import (  # noqa: F401 - fixtures
    Background,
    new_run_dir,
    ray_instance,
    rows,
    stop_background_runs,
    tiny,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.redis]

WORLD = [
    "rollout.num_workers=1",
    "train.total_env_steps=100000000",
    "train.minibatches=2",
    "world_model.enabled=true",
    "world_model.hidden=16",
    "world_model.horizon=4",
    "world_model.batch_size=64",
    "world_model.updates_per_iter=2",
    "world_model.warmup_steps=0",
    "world_model.max_error=null",
    "world_model.actor_cpus=0.5",
    "world_model.stream_envs=8",
    "run.eval_every_s=null",
]


def _info(actor) -> dict:
    try:
        return ray.get(actor.info.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return {}


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize(
    "extra, stored",
    [
        ([], False),
        (["env.name=tag", "model.kind=mlp", "world_model.architecture=observation"], True),
    ],
    ids=["spread-entity-model", "tag-observation-model-stored"],
)
def test_the_world_model_actor_learns_from_the_stream_and_survives_sigkill(
    tmp_path, extra, stored
) -> None:
    run_dir = new_run_dir(tmp_path, "world")
    store = tmp_path / "store"
    if stored:  # run.storage: the restarted actor must find its checkpoint there
        extra = [*extra, f"run.storage={store}"]
    run = Background(tiny(*WORLD, *extra), run_dir)
    namespace = f"shoal-{run_dir.name}"
    actor = wait_for(lambda: _actor(namespace), 120, f"{WORLD_MODEL_ACTOR} to start")
    before = wait_for(lambda: (i := _info(actor)).get("version", 0) >= 2 and i, 120, "weights")
    assert before["transitions"] > 0 and before["updates"] > 0  # it read the stream and fit
    # The learner imagines with what the actor publishes.
    wait_for(lambda: any(r.get("imagined_share", 0) > 0 for r in rows(run_dir)), 60, "imagining")
    assert any(r.get("wm_weights_version", 0) >= 1 for r in rows(run_dir))  # the actor's

    def lags() -> list[float]:
        # Rows before the first published version leave the column empty (NaN once read).
        found = (r.get("wm_weights_staleness", math.nan) for r in rows(run_dir))
        return [lag for lag in found if not math.isnan(lag)]

    wait_for(lambda: bool(lags()), 60, "a row with the world-model weights' staleness")
    assert all(lag >= 0 and lag == int(lag) for lag in lags())  # whole versions behind

    # It checkpoints itself every few seconds; kill it once it has.
    saved_at = checkpoint_dir(run_dir) / CHECKPOINT_FILE
    wait_for(saved_at.is_file, 60, "the world-model actor's first checkpoint")
    if stored:
        kept = store / run_dir.name / saved_at.relative_to(run_dir)
        wait_for(kept.is_file, 60, "the world-model checkpoint in run.storage")
        saved_at.unlink()  # as if Ray restarts it on a node without the file
    os.kill(before["pid"], signal.SIGKILL)
    after = wait_for(
        lambda: (i := _info(actor)).get("pid", before["pid"]) != before["pid"] and i,
        120,
        "Ray to restart the world-model actor",
    )
    assert after["restored"]  # from its own checkpoint (from storage when stored)
    later = wait_for(
        lambda: (i := _info(actor)).get("version", 0) > before["version"] and i, 60, "new weights"
    )
    assert later["updates"] > 0

    url = json.loads((run_dir / ".redis.json").read_text())["url"]
    client = connect(url)
    try:
        assert WeightStore(client, run_dir.name, name=WORLD_MODEL_WEIGHTS).latest_version()
        RunState(client, run_dir.name).request_stop()
    finally:
        client.close()
    summary = run.result()
    assert summary["reason"] == "stop requested"
    saved = torch.load(checkpoint_dir(run_dir) / CHECKPOINT_FILE, weights_only=True)
    assert saved["counters"]["version"] >= later["version"]
    assert saved["trainer"]["updates"] >= later["updates"]
    if stored:  # the last checkpoint is in storage too, beside rank 0's
        kept_last = torch.load(kept, weights_only=True)
        assert kept_last["counters"]["version"] == saved["counters"]["version"]
        assert complete_checkpoints(_listing(open_location(str(store / run_dir.name)))) >= {
            "world_model"
        }


def _actor(namespace: str):
    try:
        return ray.get_actor(WORLD_MODEL_ACTOR, namespace=namespace)
    except ValueError:
        return None


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize(
    "layout",
    [
        ["rollout.num_workers=2"],  # the actor fits one model for both ranks
        ["rollout.num_workers=0", "env.name=tag", "model.kind=mlp"],  # each rank fits, averaged
    ],
    ids=["actor-fits", "ranks-fit"],
)
def test_two_learner_ranks_practise_in_one_world_model(tmp_path, layout) -> None:
    cfg = tiny(
        *WORLD, "learner.num_ranks=2", "train.total_env_steps=1600", *layout,
        "run.checkpoint_every_s=1000000",
    )  # fmt: skip
    run_dir = new_run_dir(tmp_path, "world-ranks")
    summary = run_training(cfg, run_dir)
    assert summary["reason"] == "total_env_steps reached"
    table = rows(run_dir)
    # Every rank imagines or none does: all-reduced imagined updates never wait on a rank
    # that skipped one (that would hang the run, not pass it).
    assert any(r["imagined_share"] > 0 for r in table)
    saved = load_checkpoint(run_dir)["extra"]["world_model"]
    assert saved["trainer"]["updates"] > 0 or cfg.rollout.num_workers > 0
