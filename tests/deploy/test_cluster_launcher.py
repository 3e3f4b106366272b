"""The Ray cluster-launcher YAML passes Ray's own validation and has the expected layout."""

from __future__ import annotations

import copy
import importlib.metadata
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest

from tests.deploy.manifests import (
    LAUNCHER,
    _load_yaml,
)

# --- Ray cluster launcher ---------------------------------------------------------------------


def _ray_validate(config: dict[str, Any]) -> dict[str, Any]:
    """What `ray up` does before touching the cloud: fill defaults, then validate."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_launcher_passes_rays_validation() -> None:
    prepared = _ray_validate(_load_yaml(LAUNCHER))
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c.update(head_nodes={}),
        lambda c: c["available_node_types"]["head"]["resources"].update(CPU="0"),
        lambda c: c["available_node_types"]["rollout"].pop("resources"),
        lambda c: c["docker"].update(imag="rayproject/ray"),
    ],
    ids=["unknown-key", "cpu-as-string", "missing-resources", "docker-typo"],
)
def test_cluster_launcher_validation_rejects_broken_config(
    mutate: Callable[[dict[str, Any]], None],
) -> None:
    config = _load_yaml(LAUNCHER)
    mutate(config)
    with pytest.raises(jsonschema.ValidationError):
        _ray_validate(config)


def test_cluster_launcher_layout() -> None:
    config = _load_yaml(LAUNCHER)
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert types[head]["resources"] == {"CPU": 0}
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0" in head_start and "--dashboard-host=0.0.0.0" in head_start
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["min_workers"] == 0 and "gpu" in t["docker"]["worker_image"] for t in gpu)
    # The source directory is mounted on every node and installed from there.
    src = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    torch = importlib.metadata.version("torch").split("+")[0]
    for name, node in types.items():
        setup = node.get("worker_setup_commands", config["setup_commands"])
        assert any(f"torch=={torch}" in cmd for cmd in setup), name
        assert any(cmd.endswith(f"pip install --no-cache-dir {src}") for cmd in setup), name
    for cmds in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        (start,) = [c for c in cmds if "ray start" in c]
        assert "SHOAL_REDIS_URL=" in start and "SHOAL_REDIS_PASSWORD=" in start
