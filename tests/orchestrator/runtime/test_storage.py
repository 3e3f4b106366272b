"""Run storage against a real S3-compatible server (SeaweedFS) on loopback, and a shared path.

The server is started once for the module with its own credentials, on free loopback ports,
and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli.main import main as shoal
from orchestrator.runtime.checkpoint import load_checkpoint
from orchestrator.runtime.storage import (
    Mirror,
    _listing,
    complete_checkpoints,
    fetch_run,
    open_location,
)
from tests.s3_server import s3_server

pytestmark = [pytest.mark.slow, pytest.mark.storage]

BUCKET = "shoal-test"
TINY = [
    "env.num_envs=8",
    "train.rollout_len=10",
    "train.total_env_steps=320",
    "train.minibatches=2",
    "model.hidden=16",
    "redis.enabled=false",
    "run.progress=false",
    "run.eval_every_s=null",
    "run.checkpoint_every_steps=160",
    "run.log_every_s=0.000001",
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A private SeaweedFS with S3 on loopback; ``uri`` (of ``BUCKET/runs``), port and keys."""
    with s3_server(tmp_path_factory.mktemp("weed"), BUCKET) as server:
        yield server


def _run_uri(base: str, name: str) -> str:
    path, _, query = base.partition("?")
    return f"{path}/{name}?{query}"


def test_a_run_lives_in_s3_and_resumes_and_evaluates_from_there(
    s3, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    args = ["run", "spread-mlp", *TINY, f"run.storage={s3['uri']}", f"run.dir={runs}"]
    assert shoal([*args, "run.name=r1"]) == 0
    out = capsys.readouterr().out
    uri = _run_uri(s3["uri"], "r1")
    assert f"shoal eval '{uri}'" in out  # the next step names the run where it is kept

    stored = _listing(open_location(uri))
    assert {"config.yaml", "metrics.csv", "summary.json"} <= set(stored)
    assert any(rel.startswith("tensorboard/") for rel in stored)
    assert complete_checkpoints(stored) == {"step-000000000160", "step-000000000320"}

    shutil.rmtree(runs)  # the local copy is gone: storage alone must do
    assert shoal(["eval", uri, "--episodes", "4"]) == 0
    assert "step-000000000320" in capsys.readouterr().out

    assert shoal(["run", "--resume", uri, "train.total_env_steps=480"]) == 0
    stored = _listing(open_location(uri))
    assert "step-000000000480" in complete_checkpoints(stored)
    again = fetch_run(uri, tmp_path / "again")
    assert load_checkpoint(again)["meta"]["counters"]["env_steps"] == 480  # counters went on
    rows = (again / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and rows[-1].split(",")[1] == "480.0"  # one row an iteration


# What the child does: upload a run's checkpoints once (killed while it does).
_UPLOAD = """
import sys
from pathlib import Path
from orchestrator.runtime.storage import Mirror, open_location
Mirror(Path(sys.argv[1]), open_location(sys.argv[2]), True, False, background=False).sync()
"""


def test_a_checkpoint_killed_mid_upload_is_never_taken(s3, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SHOAL_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    assert shoal(["run", "spread-mlp", *TINY, f"run.dir={runs}", "run.name=k"]) == 0
    run_dir = runs / "k"
    uri = _run_uri(s3["uri"], "k")
    Mirror(run_dir, open_location(uri), True, True, background=False).sync()  # all of it, once
    # A third checkpoint, big enough to be caught mid-upload: its files go up before meta.json.
    done = run_dir / "checkpoints" / "step-000000000320"
    big = run_dir / "checkpoints" / "step-000000000480"
    shutil.copytree(done, big)
    meta = json.loads((big / "meta.json").read_text())
    meta["counters"]["env_steps"] = 480
    (big / "meta.json").write_text(json.dumps(meta))
    with open(big / "padding.bin", "wb") as fh:  # not a *.pt: loading ignores it
        fh.write(os.urandom(64 << 20))
    child = subprocess.Popen([sys.executable, "-c", _UPLOAD, str(run_dir), uri],
                             cwd=Path(__file__).resolve().parents[3])  # fmt: skip
    loc = open_location(uri)
    deadline = time.monotonic() + 60
    while "checkpoints/step-000000000480/model.pt" not in _listing(loc):
        assert child.poll() is None, "the upload ended before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait(10)

    stored = _listing(loc)
    assert "checkpoints/step-000000000480/meta.json" not in stored  # half there, not complete
    assert "step-000000000480" not in complete_checkpoints(stored)
    ckpt = load_checkpoint(fetch_run(uri, tmp_path / "fetched"))
    assert ckpt["meta"]["counters"]["env_steps"] == 320  # the last complete one
    assert shoal(["eval", uri, "--episodes", "4"]) == 0


@pytest.mark.parametrize(
    "storage, message",
    [
        ("s3://no-such-bucket/x?endpoint_override=127.0.0.1:{port}&scheme=http",
         "bucket 'no-such-bucket' does not exist"),
        ("nosuchscheme://bucket/x", "run.storage: cannot open 'nosuchscheme://bucket/x'"),
    ],
    ids=["missing-bucket", "unknown-scheme"],
)  # fmt: skip
def test_unusable_storage_is_one_line_before_anything_starts(
    s3, tmp_path, capsys, storage, message
) -> None:
    runs = tmp_path / "runs"
    storage = storage.format(port=s3["port"])
    assert shoal(["run", "spread-mlp", *TINY, f"run.storage={storage}", f"run.dir={runs}"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not runs.exists()  # nothing started, no directory made


def test_wrong_credentials_are_one_line(s3, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong" + s3["secret"])
    runs = tmp_path / "runs"
    assert shoal(["run", "spread-mlp", *TINY, f"run.storage={s3['uri']}", f"run.dir={runs}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "run.storage: cannot" in err and len(err.splitlines()) == 1, err
    assert not runs.exists()


def test_a_shared_path_keeps_the_run_too(tmp_path, capsys) -> None:
    shared = tmp_path / "mounted"
    runs = tmp_path / "runs"
    args = ["run", "spread-mlp", *TINY, f"run.storage={shared}", f"run.dir={runs}", "run.name=p"]
    assert shoal(args) == 0
    kept = shared / "p"
    assert (kept / "metrics.csv").is_file() and (kept / "summary.json").is_file()
    assert not list(kept.rglob("*.part"))  # written through temporary names, renamed whole
    assert load_checkpoint(kept)["meta"]["counters"]["env_steps"] == 320
    assert f"shoal eval {kept}" in capsys.readouterr().out
