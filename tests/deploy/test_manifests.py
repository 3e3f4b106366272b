"""The deploy/ folder checked the way a cluster would check it, without a cluster.

KubeRay manifests are validated against the RayCluster/RayJob CRD schemas (what the API server
enforces, including strict rejection of unknown fields); the cluster-launcher YAML goes through
Ray's own `prepare_config` + `validate_config`. On top of the schemas, the tests pin what a user
relies on: the head runs no tasks, the Ray version in every image equals the installed one, the
Redis password only ever comes from a Secret, and every shoal metric has a Grafana panel.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import json
import re
import shlex
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
MANIFEST_FILES = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "redis/redis.yaml"]
LAUNCHER = DEPLOY / "cluster-launcher" / "aws.yaml"
SHOAL_METRICS = [
    "ray_shoal_env_steps_total",
    "ray_shoal_env_steps_per_second",
    "ray_shoal_episode_team_return",
    "ray_shoal_policy_loss",
    "ray_shoal_value_loss",
    "ray_shoal_entropy",
    "ray_shoal_weights_version",
    "ray_shoal_weights_staleness",
    "ray_shoal_rollout_restarts_total",
    "ray_shoal_redis_rtt_ms",
]
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Loader)


def _docs() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for rel in MANIFEST_FILES:
        for doc in yaml.safe_load_all((DEPLOY / rel).read_text()):
            if doc:
                out.append((rel, doc))
    return out


def _doc(kind: str) -> dict[str, Any]:
    (found,) = [d for _, d in _docs() if d["kind"] == kind]
    return found


def _cluster_specs() -> list[tuple[str, dict[str, Any]]]:
    """Every RayCluster spec: the standalone one and the one a RayJob embeds."""
    return [
        ("RayCluster", _doc("RayCluster")["spec"]),
        ("RayJob", _doc("RayJob")["spec"]["rayClusterSpec"]),
    ]


def _groups(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group


def _containers() -> Iterator[tuple[str, dict[str, Any]]]:
    for where, spec in _cluster_specs():
        for name, group in _groups(spec):
            for c in group["template"]["spec"]["containers"]:
                yield f"{where}/{name}/{c['name']}", c
    for c in _doc("Deployment")["spec"]["template"]["spec"]["containers"]:
        yield f"Deployment/{c['name']}", c


# --- Kubernetes structural schema -> JSON Schema -------------------------------------------


def _to_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """Translate a CRD's OpenAPI v3 structural schema into Draft 7 with the API server's rules."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "description":
            continue
        if key == "properties":
            out[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _to_json_schema(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    # kubectl's default --validate=strict rejects fields a structural schema does not declare.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_type(
    validator: Any, list_type: str, instance: list[Any], schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    if list_type == "set" and len({json.dumps(i, sort_keys=True) for i in instance}) < len(
        instance
    ):
        yield jsonschema.ValidationError("duplicate items in a list-type=set list")
    if list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        # The API server applies defaults (a port's protocol: TCP) before it compares map keys.
        props = schema.get("items", {}).get("properties", {})
        seen = set()
        for item in instance:
            entry = {k: item.get(k, props.get(k, {}).get("default")) for k in keys}
            key = json.dumps(entry, sort_keys=True)
            if key in seen:
                yield jsonschema.ValidationError(
                    f"duplicate entry {entry} in a list keyed by {keys}"
                )
            seen.add(key)


def _cel(
    validator: Any, rules: list[dict[str, str]], instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    yield jsonschema.ValidationError(
        f"field is governed by CEL rules {[r['rule'] for r in rules]} that this offline check "
        "cannot evaluate; verify with `kubectl apply --dry-run=server` before relying on it"
    )


_FORMATS = jsonschema.FormatChecker()


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_type, "x-kubernetes-validations": _cel},
)


@functools.cache
def _crd_schema(kind: str) -> dict[str, Any]:
    crd = _load_yaml(CRDS / f"ray.io_{kind.lower()}s.yaml")
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _to_json_schema(v1["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    validator = _K8sValidator(schema, format_checker=_FORMATS)
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator.iter_errors(instance)
    ]


def _pod_template_schema() -> dict[str, Any]:
    """core/v1 PodTemplateSpec, as embedded in the RayCluster CRD."""
    return _crd_schema("RayCluster")["properties"]["spec"]["properties"]["headGroupSpec"][
        "properties"
    ]["template"]


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


# --- Secrets and Redis wiring ---------------------------------------------------------------

_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN", re.IGNORECASE)
# `password: hunter2`, `requirepass hunter2`; references ($VAR, "$(...)", %s) do not match.
_LITERAL = re.compile(r"(?i)(requirepass[ \t]+|password[ \t]*[:=][ \t]*)[^\s\"'$%({]")


def test_no_literal_password_anywhere_in_deploy() -> None:
    for path in [*DEPLOY.rglob("*"), ROOT / ".dockerignore"]:
        if path.is_file():
            for n, line in enumerate(path.read_text().splitlines(), 1):
                assert not _LITERAL.search(line), f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
                assert not re.search(r"redis://[^/\s@]*:[^/\s@]+@", line), "password in a URL"


def _secret_refs() -> set[tuple[str, str]]:
    refs = set()
    for where, c in _containers():
        for env in c.get("env", []):
            if _SECRETISH.search(env["name"]):
                assert "value" not in env, f"{where}: {env['name']} must come from a Secret"
                ref = env["valueFrom"]["secretKeyRef"]
                refs.add((ref["name"], ref["key"]))
    return refs


def test_password_only_from_one_secret_the_readme_creates() -> None:
    assert all(d["kind"] != "Secret" for _, d in _docs()), "no committed Secret may hold a value"
    ((name, key),) = _secret_refs()
    readme = (DEPLOY / "README.md").read_text()
    assert f"kubectl create secret generic {name} --from-literal={key}=" in readme


def test_redis_requires_the_secret_password_and_probes_it() -> None:
    (redis,) = _doc("Deployment")["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    var = re.fullmatch(r"\$\((\w+)\)", args[args.index("--requirepass") + 1]).group(1)
    (env,) = [e for e in redis["env"] if e["name"] == var]
    assert "secretKeyRef" in env["valueFrom"]
    probe = " ".join(redis["readinessProbe"]["exec"]["command"])
    assert "redis-cli ping" in probe and f"${var}" in probe


def test_ray_pods_reach_redis_through_its_service() -> None:
    deployment, service = _doc("Deployment"), _doc("Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    (redis,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in redis["ports"]}
    expected_url = f"redis://{service['metadata']['name']}:{port['port']}/0"
    for where, c in _containers():
        if where.startswith("Ray"):
            env = {e["name"]: e for e in c["env"]}
            assert env["SHOAL_REDIS_URL"]["value"] == expected_url, where
            assert "SHOAL_REDIS_PASSWORD" in env, where


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


# --- Monitoring -----------------------------------------------------------------------------


def test_prometheus_scrapes_rays_service_discovery_file() -> None:
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    config = _load_yaml(DEPLOY / "monitoring" / "prometheus.yml")
    jobs = config["scrape_configs"]
    assert len({j["job_name"] for j in jobs}) == len(jobs)
    files = [f for j in jobs for sd in j.get("file_sd_configs", []) for f in sd["files"]]
    assert f"/tmp/ray/{PROMETHEUS_SERVICE_DISCOVERY_FILE}" in files
    # The static example points at the KubeRay head Service's metrics port.
    cluster = _doc("RayCluster")
    (head_c,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    metrics_port = next(p["containerPort"] for p in head_c["ports"] if p["name"] == "metrics")
    targets = [t for j in jobs for sc in j.get("static_configs", []) for t in sc["targets"]]
    assert f"{cluster['metadata']['name']}-head-svc:{metrics_port}" in targets


def _dashboard() -> dict[str, Any]:
    return json.loads((DEPLOY / "monitoring" / "grafana" / "shoal-dashboard.json").read_text())


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_plots_every_shoal_metric_per_run() -> None:
    dashboard = _dashboard()
    exprs = _exprs(dashboard)
    for metric in SHOAL_METRICS:
        assert any(re.search(rf"\b{metric}\b", e) for e in exprs), metric
    assert all('run_id=~"$run_id"' in e for e in exprs)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "run_id" in variables["run_id"]["query"]["query"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for p in panels:
        for ds in [p["datasource"], *(t["datasource"] for t in p["targets"])]:
            assert ds["uid"] == "${datasource}", p["title"]


def test_grafana_dashboard_covers_metrics_declared_in_code() -> None:
    declared = set()
    for path in (ROOT / "orchestrator").rglob("*.py"):
        declared |= set(
            re.findall(r"(?:Counter|Gauge|Histogram)\(\s*[\"'](shoal_\w+)[\"']", path.read_text())
        )
    if not declared:
        pytest.skip("orchestrator/ declares no ray.util.metrics yet")
    exprs = " ".join(_exprs(_dashboard()))
    for name in declared:
        assert re.search(rf"\bray_{name}\w*", exprs), f"no panel for {name}"
