"""What the RayJob runs and the image it runs in: an existing preset, the installed versions."""

from __future__ import annotations

import importlib.metadata
import re
import shlex

import ray

from tests.deploy.manifests import (
    DEPLOY,
    LAUNCHER,
    ROOT,
    _doc,
)

# --- RayJob entrypoint and image build ------------------------------------------------------


def _presets() -> set[str]:
    found = {p.stem for p in (ROOT / "orchestrator" / "presets").glob("*.yaml")}
    return found or {"spread-gnn", "spread-mlp"}


def test_rayjob_runs_an_existing_preset_on_its_cluster() -> None:
    spec = _doc("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["shoal", "run"] and argv[2] in _presets(), argv
    # `--address auto` last: overrides after an option would be argparse's unrecognized args.
    assert argv[-2:] == ["--address", "auto"], argv
    assert all(re.fullmatch(r"[a-z_][\w.]*=\S+", a) for a in argv[3:-2]), argv
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0


def _dockerfile_base_image() -> str:
    text = (DEPLOY / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    (base,) = re.findall(r"^FROM (\S+)", text, re.MULTILINE)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)


def test_dockerfile_matches_installed_ray_and_torch() -> None:
    assert _dockerfile_base_image() == f"rayproject/ray:{ray.__version__}-py311-cpu"
    torch = importlib.metadata.version("torch").split("+")[0]
    assert f"ARG TORCH_VERSION={torch}\n" in (DEPLOY / "Dockerfile").read_text()
    for path in (DEPLOY / "Dockerfile", LAUNCHER):
        for tag in re.findall(r"rayproject/ray:(\S+)", path.read_text()):
            assert tag.startswith(ray.__version__ + "-"), f"{path.name}: {tag}"


def test_dockerignore_keeps_every_package_and_nothing_else() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().split("\n") if line]
    rules = [line for line in lines if not line.startswith("#")]
    assert rules[0] == "*", "the build context must be a whitelist: exclude *, then re-include"
    pyproject = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"^include = \[(.*)\]", pyproject, re.MULTILINE).group(1)
    for package in re.findall(r'"(\w+)\*"', include):
        assert f"!{package}" in lines, package
    assert "!pyproject.toml" in lines
    assert not any(line.startswith(("!.venv", "!runs", "!tests")) for line in lines)
