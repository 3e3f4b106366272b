"""Typed, validated run configuration: presets shipped in the package, dotted overrides.

``load_config("spread-gnn", ["train.lr=1e-3", "env.n_agents=4"])`` returns a ``Config`` or
raises ``ConfigError`` whose message is one line naming the key and what it accepts.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit, urlunsplit

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import envs
from agents.ppo import PPOConfig
from envs import EnvSettings, VecMultiAgentEnv
from policies import EDGE_MODES, POLICY_KINDS, ActorCritic, PolicySpec


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(_Section):
    """Which environment, and how many copies per rollout worker."""

    name: str = "spread"
    """Registered env name (``spread``, ``mpe2-spread``), ``pettingzoo:<module>[:factory]`` or
    ``rllib:<module>:<Class>`` (an RLlib ``MultiAgentEnv``; ``env.kwargs`` is its config)."""
    n_agents: int = Field(3, ge=1, le=1024)
    num_envs: int = Field(512, ge=1)
    """Sub-envs stepped per call, per rollout worker (or in-process)."""
    max_cycles: int = Field(25, ge=1)
    local_ratio: float = Field(0.5, ge=0.0, le=1.0)
    continuous_actions: bool = False
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra arguments passed to the env unchanged."""

    def make(self, num_envs: int, seed: int, device: torch.device) -> VecMultiAgentEnv:
        """The configured env with ``num_envs`` sub-envs; each kind takes the settings it has.

        Raises:
            envs.EnvError: one line naming the env, when it cannot be found or built.
        """
        settings = EnvSettings(
            n_agents=self.n_agents,
            max_cycles=self.max_cycles,
            local_ratio=self.local_ratio,
            continuous_actions=self.continuous_actions,
        )
        return envs.make(
            self.name, num_envs=num_envs, settings=settings, seed=seed, device=device, **self.kwargs
        )


def _one_of(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        listed = ", ".join(repr(a) for a in allowed[:-1]) + f" or {allowed[-1]!r}"
        raise ValueError(f"Input should be {listed}")
    return value


class ModelConfig(_Section):
    """Policy architecture."""

    kind: str = "gnn"
    """One of ``policies.POLICY_KINDS``: ``mlp``, ``gnn`` or ``transformer``."""
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    edges: str = "complete"
    """GNN edges, one of ``policies.EDGE_MODES``: ``complete``, ``radius`` or ``knn``."""
    radius: float = Field(1.0, gt=0)
    k: int = Field(4, ge=1)
    critic: Literal["centralised", "independent"] = "centralised"
    """``centralised`` is MAPPO, ``independent`` is IPPO."""
    critic_kind: str | None = None
    """Critic architecture (default: same as ``kind``). ``mlp`` is cheapest but tied to N."""

    def spec(self, env: VecMultiAgentEnv) -> PolicySpec:
        """Policy dimensions from ``env``, architecture from this section."""
        return PolicySpec(
            kind=self.kind,
            obs_dim=env.obs_dim,
            state_dim=env.state_dim,
            node_dim=env.node_dim,
            action_kind=env.action_kind,
            action_dim=env.action_dim,
            centralised=self.critic == "centralised",
            critic_kind=self.critic_kind,
            hidden=self.hidden,
            layers=self.layers,
            heads=self.heads,
            edges=self.edges,
            radius=self.radius,
            k=self.k,
        )

    def build(self, env: VecMultiAgentEnv) -> ActorCritic:
        """The policy this section describes, sized for ``env``."""
        return ActorCritic(self.spec(env))

    @field_validator("kind", "critic_kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        return value if value is None else _one_of(value, POLICY_KINDS)

    @field_validator("edges")
    @classmethod
    def _known_edges(cls, value: str) -> str:
        return _one_of(value, EDGE_MODES)


class TrainConfig(PPOConfig):
    """PPO (every :class:`agents.ppo.PPOConfig` field) and the length of the run."""

    total_env_steps: int = Field(5_000_000, ge=1)
    time_limit_s: float | None = Field(None, gt=0)
    """Stop after this much wall time even if ``total_env_steps`` is not reached."""
    rollout_len: int = Field(25, ge=1)
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads (default: what torch picks)."""

    @field_validator("device")
    @classmethod
    def _torch_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError:
                raise ValueError("not a torch device; use auto, cpu, cuda or cuda:N") from None
        return value

    def torch_device(self) -> torch.device:
        """``auto`` -> CUDA when available, else CPU; anything else as given.

        Raises:
            ConfigError: a CUDA device on a machine without CUDA.
        """
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"train.device={self.device} but CUDA is not available; use train.device=cpu"
            )
        return device


class RolloutConfig(_Section):
    """Rollout workers (Ray actors). ``num_workers=0`` steps envs inside the learner."""

    num_workers: int = Field(0, ge=0)
    max_staleness: int = Field(1, ge=0)
    """Workers act with weights at most this many versions old; 0 alternates collecting and
    learning, 1 lets workers collect the next batch while the learner updates."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """Ray CPUs reserved by each rollout actor."""
    max_restarts: int = Field(10, ge=-1)
    """Ray restarts a dead rollout actor this many times (-1: without limit)."""
    collect_timeout_s: float = Field(300.0, gt=0)
    """A batch not back within this time counts as a dead worker: restarted and re-collected."""


class LearnerConfig(_Section):
    """The learner group: ``num_ranks`` Ray actors (``shoal-learner-<rank>``) running DDP."""

    num_ranks: int = Field(1, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``auto``: NCCL when CUDA is used, gloo otherwise."""
    max_failures: int = Field(2, ge=0)
    """Restarts of the whole group from the last checkpoint before the run fails."""
    cpus_per_rank: float = Field(1.0, gt=0)
    """Ray CPUs reserved by each learner rank."""
    placement: Literal["pack", "spread"] = "pack"
    """``pack`` keeps ranks on as few nodes as possible, ``spread`` puts them on different ones."""


class RedisConfig(_Section):
    """The run's shared memory. With no URL a private server is started for the run."""

    url: str | None = None
    """``redis://[user:password@]host:port/db``, ``rediss://`` for TLS, or ``unix://``."""
    outage_timeout_s: float = Field(30.0, gt=0)
    enabled: bool = True
    """Local in-process runs may skip Redis entirely (``redis.enabled=false``)."""
    replay_maxlen: int = Field(2000, ge=1)
    replay: bool = True
    """Rollout workers append one trajectory chunk per batch to the replay stream."""
    replay_envs: int = Field(1, ge=1)
    """Sub-envs of each batch copied into its replay chunk (keeps chunks small)."""

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss:// (TLS) or unix://, e.g. "
                "redis://:PASSWORD@HOST:6379/0"
            )
        return value


class RunConfig(_Section):
    """Where results go and how often."""

    dir: str = "runs"
    name: str | None = None
    """Run directory name; default ``<preset>-<timestamp>``."""
    checkpoint_every_s: float = Field(30.0, gt=0)
    keep_checkpoints: int = Field(3, ge=1)
    eval_every_s: float | None = Field(10.0, gt=0)
    """Evaluate the policy this often on the run's own env and keep the best one as
    ``checkpoints/best`` (``shoal eval`` uses it); ``null`` turns it off."""
    eval_episodes: int = Field(200, ge=1)
    """Episodes per evaluation, all stepped together (one batched rollout on native envs)."""
    log_every_s: float = Field(2.0, gt=0)
    plot: bool = False
    """Write ``learning_curve.png`` at the end of the run."""
    progress: bool = True


class RayConfig(_Section):
    """How to start or join Ray."""

    address: str | None = None
    """``auto`` or ``host:port`` to join a cluster; none starts a local instance."""
    force: bool = False
    """Train through Ray even with no rollout workers and one learner rank, so the run shows in
    the Ray dashboard (``shoal run --ray``). Workers, several ranks or an address imply Ray."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local instance (default: what the run's actors reserve)."""
    dashboard_port: int = Field(8265, ge=0)
    include_dashboard: bool = True
    log_to_driver: bool = True
    """Show actor logs in the driver's terminal."""
    object_store_mb: int = Field(512, ge=100)
    """Object store size of a local instance."""


class Config(_Section):
    """A whole shoal run."""

    preset: str = "custom"
    env: EnvConfig = Field(default_factory=EnvConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def reserved_cpus(self) -> float:
        """Ray CPUs the run's actors reserve (rollout workers and learner ranks)."""
        return (
            self.rollout.num_workers * self.rollout.cpus_per_worker
            + self.learner.num_ranks * self.learner.cpus_per_rank
        )

    @model_validator(mode="after")
    def _check_combinations(self) -> Config:
        k, m = self.learner.num_ranks, self.rollout.num_workers
        if m == 0 and self.env.num_envs % k:
            raise ValueError(
                f"env.num_envs ({self.env.num_envs}) must be divisible by learner.num_ranks "
                f"({k}): each rank steps an equal share"
            )
        if m > 0 and m % k:
            raise ValueError(
                f"rollout.num_workers ({m}) must be a multiple of learner.num_ranks ({k}): "
                "each rank drives an equal share of the workers"
            )
        if self.model.hidden % self.model.heads:
            raise ValueError(
                f"model.hidden ({self.model.hidden}) must be divisible by model.heads "
                f"({self.model.heads})"
            )
        if self.train.minibatches > self.train.rollout_len:
            raise ValueError(
                f"train.minibatches ({self.train.minibatches}) cannot exceed train.rollout_len "
                f"({self.train.rollout_len}): minibatches are sets of time steps"
            )
        return self


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
