"""KubeRay RayCluster/RayJob and Redis manifests, validated against the CRD and core schemas."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pytest
import ray

from tests.deploy.manifests import (
    ROOT,
    _cluster_specs,
    _containers,
    _crd_schema,
    _doc,
    _docs,
    _errors,
    _groups,
    _pod_template_schema,
)

# --- KubeRay and Redis manifests -----------------------------------------------------------


def test_every_manifest_kind_is_checked() -> None:
    kinds = sorted(d["kind"] for _, d in _docs())
    assert kinds == ["Deployment", "RayCluster", "RayJob", "Service"], (
        "a new manifest kind needs a schema check in this file"
    )


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifest_matches_crd(kind: str) -> None:
    doc = _doc(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
    assert _errors(_crd_schema(kind), doc) == []


def test_redis_pod_template_matches_core_schema() -> None:
    assert _errors(_pod_template_schema(), _doc("Deployment")["spec"]["template"]) == []


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = doc
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


_DELETE = object()
_HEAD_C = "spec/headGroupSpec/template/spec/containers/0"


@pytest.mark.parametrize(
    ("mutate", "bad_path"),
    [
        (_set("spec/workerGroupSpecs/0/replicas", "2"), "spec/workerGroupSpecs/0/replicas"),
        (_set("spec/workerGroupSpecs/0/replicas", 2**31), "spec/workerGroupSpecs/0/replicas"),
        (_set("spec/headGroupSpec/rayStartParam", {}), "spec/headGroupSpec"),
        (
            _set("spec/headGroupSpec/rayStartParams/num-cpus", 0),
            "spec/headGroupSpec/rayStartParams/num-cpus",
        ),
        (_set("spec/workerGroupSpecs/0/maxReplicas", _DELETE), "spec/workerGroupSpecs/0"),
        (_set(f"{_HEAD_C}/env/1/name", "SHOAL_REDIS_URL"), f"{_HEAD_C}/env"),
        (
            _set(f"{_HEAD_C}/resources/limits/memory", "8 gigs"),
            f"{_HEAD_C}/resources/limits/memory",
        ),
        (_set("spec/managedBy", "someone-else"), "spec/managedBy"),
    ],
    ids=[
        "replicas-string",
        "replicas-over-int32",
        "unknown-field",
        "num-cpus-int",
        "missing-maxReplicas",
        "duplicate-env",
        "bad-quantity",
        "unchecked-cel",
    ],
)
def test_validator_rejects_broken_raycluster(
    mutate: Callable[[dict[str, Any]], None], bad_path: str
) -> None:
    doc = copy.deepcopy(_doc("RayCluster"))
    mutate(doc)
    errors = _errors(_crd_schema("RayCluster"), doc)
    assert any(e.startswith(bad_path + ": ") for e in errors), errors


def test_head_runs_no_tasks_and_serves_dashboard() -> None:
    for where, spec in _cluster_specs():
        params = spec["headGroupSpec"]["rayStartParams"]
        assert params["num-cpus"] == "0", where
        assert params["dashboard-host"] == "0.0.0.0", where


def test_rayjob_brings_up_the_same_cluster_as_raycluster() -> None:
    assert _doc("RayJob")["spec"]["rayClusterSpec"] == _doc("RayCluster")["spec"]


def test_worker_groups() -> None:
    for where, spec in _cluster_specs():
        groups = dict(_groups(spec))
        for name, group in groups.items():
            if name != "head":
                assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        (rollout_c,) = groups["rollout"]["template"]["spec"]["containers"]
        assert "nvidia.com/gpu" not in rollout_c["resources"]["limits"], where
        learner = groups["learner"]
        assert learner["replicas"] == learner["minReplicas"] == 0, "GPU group must be opt-in"
        (learner_c,) = learner["template"]["spec"]["containers"]
        assert int(learner_c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def _shoal_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)


def test_images_carry_installed_ray_version() -> None:
    tag = rf"shoal:{re.escape(_shoal_version())}-ray{re.escape(ray.__version__)}(-gpu)?"
    for where, spec in _cluster_specs():
        assert spec["rayVersion"] == ray.__version__, where
        for name, group in _groups(spec):
            (c,) = group["template"]["spec"]["containers"]
            match = re.fullmatch(tag, c["image"])
            assert match, f"{where}/{name}: {c['image']} does not match {tag}"
            wants_gpu = "nvidia.com/gpu" in c["resources"]["limits"]
            assert bool(match.group(1)) == wants_gpu, f"{where}/{name}: GPU image mismatch"


_QUANTITY = re.compile(r"(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?")
_SUFFIX = {None: 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SUFFIX.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def _quantity(value: str | int) -> Fraction:
    number, suffix = _QUANTITY.fullmatch(str(value)).groups()
    return Fraction(number) * _SUFFIX[suffix]


def test_every_container_has_sane_requests_and_limits() -> None:
    for where, c in _containers():
        requests, limits = c["resources"]["requests"], c["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert _quantity(requests[resource]) <= _quantity(limits[resource]), where
        # The API server rejects extended resources (GPUs) whose request differs from the limit.
        for resource in set(requests) | set(limits):
            if "/" in resource:
                assert requests.get(resource, limits[resource]) == limits[resource], where
