"""Fitting the world model in a child process: the same fit, a mirrored replay, survival."""

from __future__ import annotations

import copy
import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from agents.world_model import TransitionBuffer, WorldModelTrainer
from orchestrator.config import load_config
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.driver import run_training
from orchestrator.runtime.fit_process import FitProcess
from policies.world_model import EntityWorldModel
from tests.orchestrator.runtime.test_world import TINY

pytestmark = pytest.mark.slow  # end-to-end: trains, or fits in a child process


def _rows(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    nodes = torch.randn(n, 6, 5, generator=g)
    return {
        "nodes": nodes,
        "node_mask": torch.ones(n, 6, dtype=torch.bool),
        "alive": torch.ones(n, 3, dtype=torch.bool),
        "actions": torch.randint(0, 5, (n, 3), generator=g),
        "rewards": torch.randn(n, 3, generator=g),
        "cont": torch.ones(n),
        "next_nodes": nodes + 0.1 * torch.randn(n, 6, 5, generator=g),
    }


def _fit_pair() -> tuple[WorldModelTrainer, TransitionBuffer, torch.Generator]:
    torch.manual_seed(0)
    model = EntityWorldModel(5, "discrete", 5, hidden=16, members=2)
    buffer = TransitionBuffer(1_000)
    buffer.append(_rows(300, seed=1))
    return WorldModelTrainer(model, lr=3e-3, batch_size=32), buffer, torch.Generator()


def test_the_child_fits_what_the_rank_would_have_fitted_on_the_same_replay() -> None:
    torch.set_num_threads(1)  # the child's threads: the same arithmetic
    trainer, buffer, generator = _fit_pair()
    generator.manual_seed(5)
    inline = copy.deepcopy(trainer)
    proc = FitProcess(trainer, buffer, generator, torch.device("cpu"))
    try:
        proc.start([], steps=4)  # the first child copies the whole replay
        stats = proc.collect()
        new = _rows(200, seed=2)
        buffer.append(new)
        proc.start([new], steps=3)  # later ones are sent only what is new
        proc.collect()
    finally:
        proc.close()
    gen = torch.Generator().manual_seed(5)
    mirror = TransitionBuffer(1_000)
    mirror.append(_rows(300, seed=1))
    inline.update(mirror, 4, gen)
    mirror.append(new)
    inline.update(mirror, 3, gen)
    assert stats["delta_mse"] > 0 and trainer.updates == 7
    for key, value in inline.model.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_a_killed_child_is_replaced_and_fitting_goes_on() -> None:
    trainer, buffer, generator = _fit_pair()
    proc = FitProcess(trainer, buffer, generator, torch.device("cpu"))
    try:
        proc.start([], steps=2)
        proc.collect()
        before = copy.deepcopy(trainer.model.state_dict())
        proc.start([], steps=100_000)  # still fitting when it is killed
        proc.proc.kill()
        assert proc.collect() == {}  # that fit is lost; the rank keeps the last weights
        assert proc.restarts == 1 and trainer.updates == 2
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        proc.start([], steps=2)  # a new child, from the rank's replay
        assert proc.collect()["delta_mse"] > 0 and trainer.updates == 4
    finally:
        proc.close()
    assert proc.proc is None


def test_a_run_fits_behind_its_collection_and_resumes(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = load_config("spread-gnn", [*TINY, "world_model.fit_process=true"])
    run_training(cfg, run_dir)
    with open(run_dir / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["imagined_share"]) for r in rows][-1] == pytest.approx(0.5)
    # Each iteration's fit runs until the next one needs the model: the last one's is not
    # in the checkpoint, which holds what the rank had (3 fits of 3 steps, 4 batches).
    saved = load_checkpoint(run_dir)["extra"]["world_model"]
    assert saved["trainer"]["updates"] == 3 * 3
    assert saved["replay"]["nodes"].shape[0] == 16 * (9 + 9 + 8 + 9)
    assert all(float(r["wm_delta_mse"]) > 0 for r in rows[1:])

    more = load_config(str(run_dir / "config.yaml"), ["train.total_env_steps=960"])
    run_training(more, run_dir, resume=run_dir)
    resumed = load_checkpoint(run_dir)["extra"]["world_model"]
    assert resumed["trainer"]["updates"] == 4 * 3  # a new child went on from the checkpoint
    assert any(not torch.equal(saved["model"][k], v) for k, v in resumed["model"].items())


def test_closing_does_not_wait_for_a_fit_nobody_will_collect() -> None:
    trainer, buffer, generator = _fit_pair()
    proc = FitProcess(trainer, buffer, generator, torch.device("cpu"))
    proc.start([], steps=100_000)
    child = proc.proc
    proc.close(timeout=600)  # waiting would let the fit finish and the child exit 0
    assert not child.is_alive() and child.exitcode == -signal.SIGKILL


def test_a_child_that_dies_while_starting_is_an_error_not_a_hang(tmp_path) -> None:
    # A script without a __main__ guard: the spawned child re-runs it, and the run it starts
    # there dies at its own first fit. The replay the parent sends then (256 worlds: far
    # more than a pipe holds) once went with the child's start-up data and waited forever.
    script = tmp_path / "unguarded.py"
    script.write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from orchestrator.config import load_config
            from orchestrator.runtime.driver import run_training
            from tests.orchestrator.runtime.test_world import TINY
            run = Path({str(tmp_path / "run")!r})
            run.mkdir(exist_ok=True)
            overrides = [*TINY, "world_model.fit_process=true", "env.num_envs=256"]
            run_training(load_config("spread-gnn", overrides), run)
            """
        )
    )
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "the world-model fit process exited while starting" in proc.stderr
    assert 'if __name__ == "__main__":' in proc.stderr  # says what to do
