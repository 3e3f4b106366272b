"""Loading and schema-checking the deploy/ folder: what the deploy tests share.

KubeRay manifests are validated against the RayCluster/RayJob CRD schemas (what the API server
enforces, including strict rejection of unknown fields); the cluster-launcher YAML goes through
Ray's own `prepare_config` + `validate_config`. On top of the schemas, the tests pin what a user
relies on: the head runs no tasks, the Ray version in every image equals the installed one, the
Redis password only ever comes from a Secret, and every shoal metric has a Grafana panel.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
MANIFEST_FILES = ["kuberay/raycluster.yaml", "kuberay/rayjob.yaml", "redis/redis.yaml"]
LAUNCHER = DEPLOY / "cluster-launcher" / "aws.yaml"
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
