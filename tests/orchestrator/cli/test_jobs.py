"""shoal's Ray Jobs client against a real loopback Ray head running in token-auth mode.

The head is private to this module: its own temp dir, free ports, one CPU. Every process it
starts inherits a marker environment variable, which is how teardown finds (and then proves
gone) exactly those processes, including job drivers that Ray moves to their own session.
"""

from __future__ import annotations

import re
import shlex
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import jobs as jobs_cli
from orchestrator.cli import jobs_client as jobs_module
from orchestrator.cli.cluster import resolve_auth_headers
from orchestrator.cli.jobs_client import JobsError, ShoalJobs, build_entrypoint
from orchestrator.cli.main import main as shoal_main
from tests.ray_head import AUTH_ENV, Head, free_port, ray_head

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


def on_cluster(test):
    """Marks a test that needs the loopback Ray head."""
    return pytest.mark.ray(pytest.mark.slow(needs_proc(test)))


def _python_c(code: str) -> str:
    return shlex.join(["python", "-c", code])


JOB_TIMEOUT = 60.0
ID_PATTERN = re.compile(r"^shoal-[a-z0-9-]+-\d{8}-\d{6}-[0-9a-f]{4}$")


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    with ray_head(auth=True) as running:
        yield running


@pytest.fixture
def client(head: Head) -> ShoalJobs:
    return ShoalJobs(head.address, token=head.token)


@pytest.fixture
def clean_auth_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No token anywhere: no auth variables and a HOME without ~/.ray/auth_token."""
    for name in (*AUTH_ENV, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


# -- without a cluster ----------------------------------------------------------------------


def test_token_sources_follow_rays_precedence(clean_auth_env: Path, monkeypatch) -> None:
    assert resolve_auth_headers() == {}
    default_file = clean_auth_env / ".ray" / "auth_token"
    default_file.parent.mkdir()
    default_file.write_text("from-default\n")
    assert resolve_auth_headers() == {"authorization": "Bearer from-default"}
    path_file = clean_auth_env / "token.txt"
    path_file.write_text("  from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path_file))
    assert resolve_auth_headers() == {"authorization": "Bearer from-path"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert resolve_auth_headers() == {"authorization": "Bearer from-env"}
    assert resolve_auth_headers("explicit") == {"authorization": "Bearer explicit"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert resolve_auth_headers() == {}


def test_a_broken_token_path_is_an_error_not_a_fallback(clean_auth_env: Path, monkeypatch) -> None:
    (clean_auth_env / ".ray").mkdir()
    (clean_auth_env / ".ray" / "auth_token").write_text("stale-default")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(clean_auth_env / "missing"))
    with pytest.raises(JobsError, match="RAY_AUTH_TOKEN_PATH"):
        resolve_auth_headers()


@pytest.mark.parametrize(
    "args",
    [["spread-gnn"], ["my run.yaml", "train.lr=3e-4", "name=it's", "x=$(rm -rf /);`id`"]],
)
def test_entrypoint_quotes_every_argument(args: list[str]) -> None:
    assert shlex.split(build_entrypoint(args)) == ["python", "-m", "orchestrator.cli", "run", *args]


def test_submission_ids_are_readable_and_unique() -> None:
    ids = {jobs_module.make_submission_id("configs/Spread GNN.yaml") for _ in range(50)}
    assert all(ID_PATTERN.match(job_id) and "-spread-gnn-" in job_id for job_id in ids)
    assert len(ids) > 40  # 4 random hex digits within one second


def test_unreachable_address_fails_fast_naming_it(clean_auth_env: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(JobsError) as error:
        ShoalJobs(address).list()
    assert time.monotonic() - started < 5.0
    message = str(error.value)
    assert address in message and "ray start --head" in message and "\n" not in message


def test_non_dashboard_address_is_a_usage_error(clean_auth_env: Path) -> None:
    with pytest.raises(JobsError, match="dashboard") as error:
        ShoalJobs("ray://127.0.0.1:10001")
    assert error.value.exit_code == 2


def test_config_file_must_be_inside_the_uploaded_dir(tmp_path: Path) -> None:
    project, outside = tmp_path / "project", tmp_path / "elsewhere.yaml"
    (project / "configs").mkdir(parents=True)
    (project / "runs").mkdir()
    outside.write_text("{}")
    (project / "configs" / "a.yaml").write_text("{}")
    (project / "runs" / "b.yaml").write_text("{}")
    target = jobs_cli._config_target
    assert target(str(project / "configs" / "a.yaml"), str(project)) == "configs/a.yaml"
    assert target("spread-gnn", str(project)) == "spread-gnn"
    for bad in (outside, project / "runs" / "b.yaml", project / "missing.yaml"):
        with pytest.raises(JobsError) as error:
            target(str(bad), str(project))
        assert error.value.exit_code == 2


# -- against the loopback head --------------------------------------------------------------


@on_cluster
def test_job_runs_in_the_packaged_working_dir(client: ShoalJobs, tmp_path: Path) -> None:
    (tmp_path / "data.txt").write_text("payload")
    for skipped in (".venv", "runs", "__pycache__"):
        (tmp_path / skipped).mkdir()
        (tmp_path / skipped / "junk").write_text("x")
    nonce = uuid.uuid4().hex
    code = f"import os; print('hello shoal {nonce}', sorted(os.listdir('.')))"
    job_id = client.submit(["hello"], entrypoint=_python_c(code), working_dir=tmp_path)
    assert ID_PATTERN.match(job_id) and job_id.startswith("shoal-hello-")
    assert client.wait(job_id, timeout=JOB_TIMEOUT, poll=0.2) == "SUCCEEDED"
    logs = client.logs(job_id)
    assert f"hello shoal {nonce} ['data.txt']" in logs
    listed = {job.submission_id: str(job.status.value) for job in client.list()}
    assert listed[job_id] == "SUCCEEDED"
    assert client.dashboard_url(job_id) == f"{client.address}/#/jobs/{job_id}"


@on_cluster
def test_stop_ends_a_running_job(client: ShoalJobs) -> None:
    job_id = client.submit(entrypoint=_python_c("import time; time.sleep(60)"))
    assert client.wait(job_id, timeout=JOB_TIMEOUT, poll=0.2, until={"RUNNING"}) == "RUNNING"
    assert client.stop(job_id) is True
    assert client.wait(job_id, timeout=30, poll=0.2) == "STOPPED"
    assert client.stop(job_id) is False


@on_cluster
def test_unknown_job_id_is_named_in_a_usage_error(client: ShoalJobs) -> None:
    calls = {
        "status": client.status,
        "logs": client.logs,
        "stop": client.stop,
        "tail": lambda job_id: next(iter(client.tail_logs(job_id))),
    }
    for name, call in calls.items():
        with pytest.raises(JobsError) as error:
            call("shoal-no-such-job")
        message = str(error.value)
        assert "'shoal-no-such-job'" in message and "shoal jobs list" in message, name
        assert error.value.exit_code == 2, name


@on_cluster
def test_wrong_or_missing_token_is_an_auth_error(head: Head, clean_auth_env: Path) -> None:
    with pytest.raises(JobsError, match="rejected the auth token") as wrong:
        ShoalJobs(head.address, token="not-the-token").list()
    assert "RAY_AUTH_TOKEN" in str(wrong.value) and "not-the-token" not in str(wrong.value)
    with pytest.raises(JobsError, match="requires an auth token"):
        ShoalJobs(head.address).list()


@on_cluster
def test_token_from_env_alone_is_sent(head: Head, clean_auth_env: Path, monkeypatch) -> None:
    # Ray's SDK would send nothing here: it attaches tokens only when RAY_AUTH_MODE=token.
    monkeypatch.setenv("RAY_AUTH_TOKEN", str(head.token))
    assert isinstance(ShoalJobs(head.address).list(), list)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = clean_auth_env / "token"
    token_file.write_text(f"{head.token}\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert isinstance(ShoalJobs(head.address).list(), list)


@on_cluster
def test_cli_follow_streams_logs_and_returns_the_jobs_outcome(
    head: Head, clean_auth_env: Path, monkeypatch, capsys, tmp_path: Path
) -> None:
    monkeypatch.setenv("RAY_AUTH_TOKEN", str(head.token))
    outcomes = {"ok": "print('cli says hi')", "bad": "import sys; print('cli fails'); sys.exit(3)"}
    for name, code in outcomes.items():
        monkeypatch.setattr(jobs_module, "build_entrypoint", lambda _args, c=code: _python_c(c))
        # A real preset (submit resolves the config before sending it), a stand-in entrypoint.
        argv = [
            "submit",
            "spread-mlp",
            "train.lr=0.001",
            "--follow",
            "--working-dir",
            str(tmp_path),
        ]
        code_returned = shoal_main([*argv, "--address", head.address])
        out = capsys.readouterr().out
        job_id = re.search(r"submitted (\S+)", out).group(1)
        assert code_returned == (0 if name == "ok" else 1)
        assert f"{head.address}/#/jobs/{job_id}" in out
        assert ("cli says hi" if name == "ok" else "cli fails") in out

    assert shoal_main(["jobs", "list", "--address", head.address]) == 0
    listing = capsys.readouterr().out
    assert job_id in listing and "FAILED" in listing
    assert shoal_main(["jobs", "status", job_id, "--address", head.address]) == 0
    assert "FAILED" in capsys.readouterr().out
    assert shoal_main(["jobs", "status", "nope-123", "--address", head.address]) == 2
    err = capsys.readouterr().err
    assert "'nope-123'" in err and err.count("\n") == 1


@on_cluster
def test_a_stray_token_is_harmless_when_auth_is_off(clean_auth_env: Path, monkeypatch) -> None:
    # shoal always sends a token it finds (e.g. left by a local ray.init); an auth-free
    # cluster must still accept the request.
    with ray_head(auth=False) as open_head:
        assert ShoalJobs(open_head.address).list() == []
        monkeypatch.setenv("RAY_AUTH_TOKEN", "left-over-token")
        job_id = ShoalJobs(open_head.address).submit(entrypoint=_python_c("print(1)"))
        assert ShoalJobs(open_head.address).wait(job_id, timeout=JOB_TIMEOUT) == "SUCCEEDED"


def test_submit_names_the_run_after_the_job_and_records_where_it_is_kept() -> None:
    overrides, meta = jobs_cli._run_placement("spread-mlp", ["train.lr=0.001"], "shoal-x-1")
    assert overrides == ["train.lr=0.001", "run.name=shoal-x-1"]
    assert meta == {
        "shoal_run": "shoal-x-1",
        "shoal_storage": "",
        "shoal_run_dir": "runs/shoal-x-1",
    }
    kept = {"shoal_run": "r", "shoal_storage": "s3://b/p?endpoint_override=h:1&scheme=http"}
    assert jobs_cli._stored_run(kept) == "s3://b/p/r?endpoint_override=h:1&scheme=http"
    assert jobs_cli._loopback("http://127.0.0.1:8265")
    assert not jobs_cli._loopback("http://head.cluster.example:8265")


def test_submit_refuses_unusable_storage_before_sending_anything() -> None:
    with pytest.raises(JobsError, match=r"run\.storage: cannot open 'nosuch://x'") as err:
        jobs_cli._run_placement("spread-mlp", ["run.storage=nosuch://x"], "shoal-x-1")
    assert err.value.exit_code == 2


def _pack(run_dir: Path) -> str:
    """What the helper job prints on the driver's node, run here."""
    import subprocess
    import sys

    from orchestrator.cli.jobs_fetch import PACK_SCRIPT

    cmd = [sys.executable, "-c", PACK_SCRIPT, str(run_dir)]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def test_a_run_packed_on_the_driver_node_unpacks_whole_with_only_the_newest_checkpoint(
    tmp_path: Path,
) -> None:
    from orchestrator.cli.jobs_fetch import _unpack

    run = tmp_path / "run"
    for name in ("step-000000000100", "step-000000000200", "best", "world_model"):
        (run / "checkpoints" / name).mkdir(parents=True)
        (run / "checkpoints" / name / "model.pt").write_bytes(name.encode() * 1000)
        if name != "world_model":
            (run / "checkpoints" / name / "meta.json").write_text("{}")
    (run / "checkpoints" / "step-000000000300").mkdir()  # being written: no meta.json
    (run / "checkpoints" / "step-000000000300" / "model.pt").write_bytes(b"half")
    (run / "metrics.csv").write_text("env_steps\n1\n")
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_bytes(bytes(range(256)) * 100)
    (run / ".redis.json").write_text("{}")
    logs = _pack(run)
    _unpack("job", "runs/run", "SUCCEEDED", "Running entrypoint ...\n" + logs, tmp_path / "out")
    got = {p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")}
    assert {p for p in got if p.endswith((".pt", ".csv", "events"))} == {
        "checkpoints/step-000000000200/model.pt", "checkpoints/best/model.pt",
        "checkpoints/world_model/model.pt", "metrics.csv", "tensorboard/events",
    }  # fmt: skip
    assert (tmp_path / "out" / "tensorboard" / "events").read_bytes() == bytes(range(256)) * 100
    assert ".redis.json" not in got

    # Damaged in transit: refused, nothing half-written.
    bad = logs.replace("SHOAL-PACK A", "SHOAL-PACK B", 1)
    if bad == logs:
        bad = logs.replace("SHOAL-PACK ", "SHOAL-PACK x", 1)
    with pytest.raises(JobsError, match="came back damaged|cannot copy"):
        _unpack("job", "runs/run", "SUCCEEDED", bad, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(JobsError, match=r"no longer on its driver's node"):
        _unpack("job", "runs/gone", "FAILED", _pack(tmp_path / "gone"), tmp_path / "gone-out")
