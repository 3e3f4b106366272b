"""Damaged checkpoints and paths that cannot be written: one `error:` line, exit 2, no traceback.

Every command that reads a checkpoint (`run --resume`, `eval`, `render`, `dream`) refuses a
damaged one naming the file, and every command that creates a directory or file (`run`,
`sweep`, `render --out`) refuses an unwritable path naming it, before anything starts.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from orchestrator.cli.main import main as shoal

TINY = ["env.num_envs=8", "train.total_env_steps=400", "redis.enabled=false", "run.progress=false",
        "run.tensorboard=false", "run.eval_every_s=null"]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    assert shoal(["run", "spread-mlp", *TINY, f"run.dir={root}", "run.name=ok"]) == 0
    return root / "ok"


def _damaged(trained: Path, tmp_path: Path, how: str) -> Path:
    run = tmp_path / how
    shutil.copytree(trained, run)
    (ckpt,) = sorted((run / "checkpoints").glob("step-*"))
    if how == "missing":
        (ckpt / "learner.pt").unlink()
    elif how == "garbage":
        (ckpt / "model.pt").write_bytes(b"\x00not a checkpoint")
    elif how == "truncated":
        data = (ckpt / "model.pt").read_bytes()
        (ckpt / "model.pt").write_bytes(data[: len(data) // 2])
    else:
        (ckpt / "meta.json").write_text("{")
    return run


def _one_line(capsys, expected: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(expected, err), err


FILES = {"missing": "learner.pt is missing", "garbage": "model.pt cannot be read",
         "truncated": "model.pt cannot be read", "meta": "meta.json cannot be read"}  # fmt: skip
COMMANDS = {
    "resume": lambda run: ["run", "--resume", str(run), "train.total_env_steps=800"],
    "eval": lambda run: ["eval", str(run), "--which", "latest", "--episodes", "4"],
    "render": lambda run: ["render", str(run), "--which", "latest", "--out", f"{run}/x.gif"],
    "dream": lambda run: ["dream", str(run), "--which", "latest"],
}


@pytest.mark.parametrize("how", FILES)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_damaged_checkpoint_is_named_and_nothing_starts(
    trained, tmp_path, capsys, how, command
) -> None:
    run = _damaged(trained, tmp_path, how)
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    assert shoal(COMMANDS[command](run)) == 2
    _one_line(capsys, rf"checkpoint '.*step-\d+' is damaged: {FILES[how]}.*earlier step-\*")
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("where", ["file-in-the-way", "read-only-system"])
def test_a_run_dir_that_cannot_be_created_names_the_key(tmp_path, capsys, where) -> None:
    target = tmp_path / "afile" if where == "file-in-the-way" else Path("/proc/shoal-runs")
    if where == "file-in-the-way":
        target.write_text("")
    assert shoal(["run", "spread-mlp", *TINY, f"run.dir={target}"]) == 2
    _one_line(
        capsys, rf"run.dir: cannot create '{re.escape(str(target))}/.*' \(.*\); choose a directory"
    )
    assert not Path("/proc/shoal-runs").exists()


def test_a_sweep_dir_that_cannot_be_created_names_the_flag(tmp_path, capsys) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("")
    assert shoal(["sweep", "spread-mlp", "train.lr=choice(1e-3,3e-3)", "--dir", str(blocker)]) == 2
    _one_line(capsys, r"--dir: cannot create '.*afile/sweep-spread-mlp-.*'")


def test_an_output_path_that_cannot_be_written_is_named(trained, tmp_path, capsys) -> None:
    out = tmp_path / "afile" / "episode.gif"
    (tmp_path / "afile").write_text("")
    assert shoal(["render", str(trained), "--which", "latest", "--out", str(out)]) == 2
    _one_line(capsys, r"'.*afile': a file stands where a directory is needed; give a path you")
