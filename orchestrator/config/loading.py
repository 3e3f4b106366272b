"""Loading a run config: presets shipped in the package, YAML files, dotted overrides.

``load_config("spread-gnn", ["train.lr=1e-3", "env.n_agents=4"])`` returns a ``Config`` or
raises ``ConfigError`` whose message is one line naming the key and what it accepts.
"""

from __future__ import annotations

import os
import typing
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.config.sections import Config, ConfigError


def preset_names() -> list[str]:
    """Presets shipped inside the package."""
    files = resources.files("orchestrator").joinpath("presets")
    return sorted(p.name[:-5] for p in files.iterdir() if p.name.endswith(".yaml"))


def _read_source(source: str) -> tuple[dict[str, Any], str]:
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.is_file():
        if not path.is_file():
            raise ConfigError(f"config file '{source}' does not exist")
        text, name = path.read_text(), path.stem
    else:
        files = resources.files("orchestrator") / "presets" / f"{source}.yaml"
        if not files.is_file():
            raise ConfigError(
                f"unknown preset '{source}'; available: {', '.join(preset_names())} "
                "(or give a path to a .yaml file)"
            )
        text, name = files.read_text(), source
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"cannot parse '{source}': {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise ConfigError(f"'{source}' must hold a mapping of sections, not {type(data).__name__}")
    return data, name


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (``3e-4``, ``true``)."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{override}' must look like section.key=value")
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{p}' is a value, not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node[parts[-1]] = value


def _format_error(e: ValidationError, model: type[BaseModel]) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        section: Any = model
        for p in err["loc"][:-1]:
            if typing.get_origin(section) is dict:  # a named entry (groups.<name>)
                section = typing.get_args(section)[1]
                continue
            section = section.model_fields[str(p)].annotation
        valid = ", ".join(section.model_fields)
        where = ".".join(str(p) for p in err["loc"][:-1]) or "the top level"
        return f"{loc}: unknown key; valid keys in {where}: {valid}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["loc"]:
        return f"{loc}: {msg} (got {err['input']!r})"
    return msg


def load_config(source: str, overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML path, apply ``key=value`` overrides, validate.

    Environment variable ``SHOAL_REDIS_URL`` fills ``redis.url`` when the config leaves it
    empty, so cluster deployments point every run at their Redis without editing presets.

    Raises:
        ConfigError: one line naming the offending key and what it accepts.
    """
    data, name = _read_source(source)
    data.setdefault("preset", name)
    for o in overrides or []:
        apply_override(data, o)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, Config)) from None
    if cfg.redis.url is None and os.environ.get("SHOAL_REDIS_URL"):
        cfg.redis.url = os.environ["SHOAL_REDIS_URL"]
    password = os.environ.get("SHOAL_REDIS_PASSWORD")
    if cfg.redis.url and password and urlsplit(cfg.redis.url).password == "***":
        # A resumed run's config.yaml holds a redacted URL; actors need the real one.
        cfg.redis.url = _with_password(cfg.redis.url, password)
    return cfg


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:{quote(password, safe='')}@{parts.hostname}"
    return urlunsplit(parts._replace(netloc=netloc + (f":{parts.port}" if parts.port else "")))


def redact_url(url: str) -> str:
    """``url`` without its password (``redis://user:***@host``): run files never hold secrets."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def config_to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (written into every run directory), secrets redacted.

    A redacted ``redis.url`` is read back on ``--resume`` without its password; the password
    then comes from ``SHOAL_REDIS_PASSWORD``.
    """
    data = cfg.model_dump(mode="json")
    if data["redis"]["url"]:
        data["redis"]["url"] = redact_url(data["redis"]["url"])
    return yaml.safe_dump(data, sort_keys=False)
