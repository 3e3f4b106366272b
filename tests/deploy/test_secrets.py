"""The Redis password only ever comes from one Secret, and Ray pods reach Redis through it."""

from __future__ import annotations

import re

from tests.deploy.manifests import (
    DEPLOY,
    ROOT,
    _containers,
    _doc,
    _docs,
)

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


def test_secrets_come_only_from_secrets_the_readme_creates() -> None:
    assert all(d["kind"] != "Secret" for _, d in _docs()), "no committed Secret may hold a value"
    refs = _secret_refs()
    # The Redis password, and the object store's key for run.storage.
    assert refs == {("shoal-redis", "password"), ("shoal-storage", "AWS_SECRET_ACCESS_KEY")}
    readme = " ".join((DEPLOY / "README.md").read_text().replace("\\\n", " ").split())
    for name, key in refs:
        assert f"kubectl create secret generic {name} " in readme, name
        assert f"--from-literal={key}=" in readme, key


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
