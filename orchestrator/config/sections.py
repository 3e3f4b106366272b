"""The run config's sections: what each key means, its bounds, and what a section builds.

Each section is a pydantic model that rejects unknown keys; :class:`Config` checks the
combinations across sections. ``env``, ``model`` and ``train`` build what they describe
(``cfg.env.make(...)``, ``cfg.build_policy(env)``, ``cfg.train.torch_device()``).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import envs
from agents.algorithm import algorithm_spec
from agents.ppo import PPOConfig, chunk_length
from agents.soft_actor_critic import SACConfig
from agents.value_decomposition import QConfig, sequence_length
from agents.world_model import ModelTrainer, trainer_for
from envs import EnvSettings, VecMultiAgentEnv
from orchestrator.config.groups import GroupConfig, GroupError, build_groups, build_policy
from policies import EDGE_MODES, ActorCritic, PolicySpec
from policies.actor_critic import ARCHITECTURES, Policy
from policies.observation_model import ObservationWorldModel, layout
from policies.world_model import EntityWorldModel


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who typed it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EnvConfig(_Section):
    """Which environment, and how many copies per rollout worker."""

    name: str = "spread"
    """Registered env name (``spread``, ``mpe2-spread``), ``pettingzoo:<module>[:factory]`` or
    ``rllib:<module>:<Class>`` (an RLlib ``MultiAgentEnv``; ``env.kwargs`` is its config),
    ``vmas:<scenario>`` or ``gym:<module>:<env id>`` (a Gymnasium env with per-agent tuple
    spaces: ``gym:lbforaging:Foraging-8x8-2p-2f-coop-v3``, ``gym:rware:rware-tiny-2ag-v2``),
    ``jaxmarl:<env>[:<map>]`` (``jaxmarl:smax:3m``), ``lbf:<env id>`` (Level-Based Foraging
    ported to torch: ``lbf:Foraging-8x8-2p-2f-coop-v3``) or ``rware:<env id>`` (the
    Multi-Robot Warehouse ported to torch: ``rware:rware-tiny-2ag-v2``)."""
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
    """Which entities exchange messages, one of ``policies.EDGE_MODES``: ``complete``,
    ``radius`` or ``knn``. GNN edges, and the transformer's attention (``complete`` is full
    attention; the others attend to each entity's neighbours)."""
    radius: float = Field(1.0, gt=0)
    k: int = Field(4, ge=1)
    """Neighbours per entity for ``edges=knn``."""
    max_neighbours: int = Field(32, ge=1)
    """At most this many (the nearest) neighbours per entity for ``edges=radius``."""
    critic: Literal["centralised", "independent"] = "centralised"
    """``centralised`` is MAPPO, ``independent`` is IPPO."""
    critic_kind: str | None = None
    """Critic architecture (default: same as ``kind``). ``mlp`` is cheapest but tied to N."""
    memory: Literal["none", "gru", "lstm"] = "none"
    """A recurrent core (``hidden`` wide) between the actor's encoder and its action head,
    shared by every agent (``policies/memory.py``); trained on sequence chunks of
    ``train.chunk_len`` steps. ``none``: a feed-forward actor."""
    critic_memory: Literal["none", "gru", "lstm"] = "none"
    """A recurrent core (``hidden`` wide) between the critic's encoder and its value head,
    trained on the same chunks as the actor's (``policies/memory.py``). For critics that see
    only part of the world (``critic=independent``, or an env whose ``state`` is built from
    partial observations); a critic reading the full global state has nothing to remember.
    ``none``: a feed-forward critic. Actor-critic algorithms only (``ppo``)."""
    memory_norm: bool = False
    """Layer-normalise the encoder's features before each recurrent core."""
    memory_out_norm: bool = False
    """Layer-normalise each recurrent core's output before its head (MAPPO's ``RNNLayer``);
    the carried state stays the core's own."""

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
            max_neighbours=self.max_neighbours,
            memory=self.memory,
            critic_memory=self.critic_memory,
            memory_norm=self.memory_norm,
            memory_out_norm=self.memory_out_norm,
            action_low=float(env.action_low),
            action_high=float(env.action_high),
        )

    def build(self, env: VecMultiAgentEnv) -> ActorCritic:
        """The one shared policy this section describes, sized for ``env``.

        Ignores agent groups: a run builds its policy with :meth:`Config.build_policy`.
        """
        return ActorCritic(self.spec(env))

    @field_validator("kind", "critic_kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        # Read at validation time: an architecture added to the registry is a kind at once.
        return value if value is None else _one_of(value, tuple(ARCHITECTURES))

    @field_validator("edges")
    @classmethod
    def _known_edges(cls, value: str) -> str:
        return _one_of(value, EDGE_MODES)


class TrainConfig(PPOConfig, QConfig, SACConfig):
    """The algorithm, its settings and the length of the run.

    The settings are PPO's (every :class:`agents.ppo.PPOConfig` field), which on-policy
    actor-critic algorithms share, the replay's (:class:`agents.value_decomposition.
    QConfig`), which QMIX, VDN, MASAC and ISAC read with ``lr``, ``gamma`` and
    ``max_grad_norm``, and soft actor-critic's (:class:`agents.soft_actor_critic.SACConfig`).
    """

    algorithm: str = "ppo"
    """One of ``agents.algorithm.ALGORITHMS`` (``ppo``: MAPPO or IPPO, by ``model.critic``),
    or ``module:SPEC`` for an algorithm defined outside shoal."""

    total_env_steps: int = Field(5_000_000, ge=1)
    time_limit_s: float | None = Field(None, gt=0)
    """Stop after this much wall time even if ``total_env_steps`` is not reached."""
    rollout_len: int = Field(25, ge=1)
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    threads: int | None = Field(None, ge=1)
    """torch intra-op threads of a learner rank (default: 1 where ranks or rollout workers
    share the node; a lone rank takes every core it may run on, less one for
    ``world_model.fit_process``)."""

    @field_validator("algorithm")
    @classmethod
    def _known_algorithm(cls, value: str) -> str:
        algorithm_spec(value)
        return value

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
    """Rollout workers append one trajectory chunk per batch to the replay stream. For an
    algorithm that replays transitions the chunk is the whole batch and the stream is the
    run's replay: learner ranks read their batches from it and refill from it on a restart."""
    replay_envs: int = Field(1, ge=1)
    """Sub-envs of each batch copied into its replay chunk (keeps chunks small); a replay
    learner's chunks hold every sub-env."""

    @field_validator("url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                "must start with redis://, rediss:// (TLS) or unix://, e.g. "
                "redis://:PASSWORD@HOST:6379/0"
            )
        return value


class WorldModelConfig(_Section):
    """A learned world model the policy also practises in (``agents/world_model.py``).

    Each iteration the real batch joins a replay of recent transitions, the model trains on
    it, and PPO then learns from ``ratio`` times as many imagined samples as real ones:
    branches of ``horizon`` steps rolled by the current policy from real states. With rollout
    workers the model trains in its own actor, ``shoal-world-model``, from the Redis replay
    stream, and the learner imagines with the weights it publishes.
    """

    enabled: bool = False
    architecture: Literal["auto", "entity", "observation"] = "auto"
    """``entity``: an ensemble of transformers over the env's entity graph
    (``policies/world_model.py``); the env must turn imagined graphs into observations (native
    ``spread``, mpe2 ``simple_spread``). ``observation``: over each agent's observation
    (``policies/observation_model.py``), any env. ``auto``: entity where the env can,
    observation elsewhere."""

    @field_validator("architecture", mode="before")
    @classmethod
    def _old_name(cls, value: object) -> object:
        return "entity" if value == "entity_transformer" else value  # the name before 'auto'

    reward_from: Literal["transition", "next"] = "transition"
    """What the observation model's reward head reads: ``transition``, each agent's token
    after the transformer (its observation and action, mixed with the others'); ``next``,
    that and the agent's predicted next observation, as Dreamer reads reward off the next
    state (most rewards are functions of where a step ends: distances, collisions). The
    observation model's alone: with the entity model it is refused."""
    oracle: bool = False
    """Imagine with the true env instead of a model: the upper bound a model can reach
    (envs that can be put in a given state, e.g. native ``spread``)."""
    hidden: int = Field(64, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(2, ge=1)
    members: int = Field(3, ge=1)
    """Ensemble size; their disagreement is the model's uncertainty."""
    horizon: int = Field(5, ge=1)
    """Imagined steps per branch; each ends bootstrapped from the critic."""
    ratio: float = Field(1.0, ge=0)
    """Imagined samples per real sample learned from each iteration."""
    updates_per_iter: int = Field(20, ge=0)
    """World-model gradient steps per iteration."""
    batch_size: int = Field(1024, ge=1)
    """Transitions per ensemble member per gradient step."""
    lr: float = Field(1e-3, gt=0)
    replay_capacity: int = Field(200_000, ge=1)
    """Real transitions kept for training (bounds the replay's memory)."""
    warmup_steps: int = Field(50_000, ge=0)
    """Real env steps before imagination starts (the model trains from the first batch)."""
    actor_cpus: float = Field(1.0, gt=0)
    """On Ray: CPUs reserved by the world-model actor."""
    stream_envs: int = Field(8, ge=1)
    """On Ray: sub-envs of each rollout worker's batch copied to the replay stream, which the
    world-model actor learns from. The stream holds ``redis.replay_maxlen`` chunks of
    ``stream_envs x train.rollout_len`` steps (about 170 bytes a step on spread)."""
    max_error: float | None = Field(math.inf, gt=0)
    """The gate. Imagine only while the model, scored on each new real batch before it trains
    on it, has an open-loop error at ``horizon`` steps below that of "repeat" (nothing
    changes); a number also bounds its 1-step errors for feature deltas and for rewards (mean
    squared error in units of the targets' scale: 1 is no better than "the mean delta" or
    "the mean reward"). ``inf`` (the default) keeps the horizon test alone: measured with the
    observation model on speaker-listener, real mpe2 spread, VMAS navigation, native tag and
    native spread, it gains as much as any bound or more (tag 1.4x against 1.17x with 1.0,
    continuous navigation 2.4x against 1.5x: their 1-step errors sit near 1 while the model
    beats "repeat"; native spread 1.83x against 1.1x with 0.2); ``null`` imagines from the
    end of warm-up whatever the model's error."""
    fit_process: bool = False
    """In-process runs: fit the model in a child process while the rank imagines and
    collects the next real batch, so the model imagines with weights fitted up to the
    previous batch. Pays where
    real steps are slow (a Python-loop env such as the PettingZoo path leaves a core to the
    fit); on Ray the ``shoal-world-model`` actor fits anyway."""
    max_disagreement: float | None = Field(None, gt=0)
    """Cut a branch where the members disagree more than this (in units of the targets'
    scale); ``null`` never cuts."""

    def build(self, env: VecMultiAgentEnv) -> EntityWorldModel:
        """The entity model this section describes, sized for ``env``'s entity graph."""
        return EntityWorldModel(
            env.node_dim, env.action_kind, env.action_dim,
            self.hidden, self.layers, self.heads, self.members,
        )  # fmt: skip

    def build_observation(
        self, env: VecMultiAgentEnv, keys: frozenset[str], groups: list[int] | None = None
    ) -> ObservationWorldModel:
        """The observation model this section describes, over the fields ``keys`` it names.

        Args:
            env: the env it models.
            keys: the fields of ``env``'s observations the policy reads.
            groups: each agent's group index (agent groups); ``None``: one group.
        """
        example = {k: v for k, v in env.reset(seed=0).as_dict().items() if k in keys}
        return ObservationWorldModel(
            layout(example, env.n_agents), env.n_agents, env.action_kind, env.action_dim,
            groups=groups, hidden=self.hidden, layers=self.layers, heads=self.heads,
            members=self.members, reward_from=self.reward_from,
        )  # fmt: skip

    def trainer(
        self, model: EntityWorldModel | ObservationWorldModel, ranks: int = 1
    ) -> ModelTrainer:
        """What fits ``model`` with this section's learning rate and batch size.

        ``ranks`` that each fit the model on their own shard split the batch between them.
        """
        return trainer_for(model, self.lr, max(self.batch_size // ranks, 1))

    @model_validator(mode="after")
    def _heads_divide(self) -> WorldModelConfig:
        if self.hidden % self.heads:
            raise ValueError(
                f"world_model.hidden ({self.hidden}) must be divisible by world_model.heads "
                f"({self.heads})"
            )
        return self


class RunConfig(_Section):
    """Where results go and how often."""

    dir: str = "runs"
    name: str | None = None
    """Run directory name; default ``<preset>-<timestamp>``."""
    storage: str | None = None
    """Also keep the run at ``<storage>/<run name>``, copied as it goes: a path every node
    mounts, or ``s3://bucket/prefix`` (``?endpoint_override=host:port&scheme=http`` for an
    S3-compatible server), ``gs://bucket/prefix``. Checkpoints arrive whole or not at all;
    ``shoal eval|plot|render|dream`` and ``--resume`` take ``<storage>/<run name>``.
    ``null``: the run lives in ``run.dir`` only."""
    checkpoint_every_s: float = Field(30.0, gt=0)
    checkpoint_every_steps: int | None = Field(None, ge=1)
    """Also checkpoint each time the env-step counter passes a multiple of this (a learning
    curve over real env steps, as the world-model benchmark draws it)."""
    keep_checkpoints: int = Field(3, ge=1)
    eval_every_s: float | None = Field(10.0, gt=0)
    """Evaluate the policy this often on the run's own env and keep the best one as
    ``checkpoints/best`` (``shoal eval`` uses it); ``null`` turns it off."""
    eval_every_steps: int | None = Field(None, ge=1)
    """Evaluate each time the env-step counter passes a multiple of this instead, so that
    evaluations (and so ``checkpoints/best``) fall at the same env steps on every machine;
    ``null``: by ``eval_every_s``."""
    eval_episodes: int = Field(200, ge=1)
    """Episodes per evaluation, all stepped together (one batched rollout on native envs)."""
    log_every_s: float = Field(2.0, gt=0)
    update_log: bool = False
    """Write one JSON line per update to ``RUN_DIR/updates.jsonl``: the batch's return,
    advantage and value-target scale, the value normaliser before and after, and each
    minibatch's KL, clip fraction, entropy and gradient norm before clipping (diagnosis)."""
    render_every_s: float | None = Field(None, gt=0)
    """Film an episode of the current policy this often, and once at the end, into
    ``RUN_DIR/videos/step-<env steps>.<render_format>`` (as ``shoal render`` draws it);
    ``null`` (the default): never."""
    render_format: Literal["gif", "mp4"] = "gif"
    """``mp4`` needs imageio-ffmpeg (the ``video`` extra)."""
    plot: bool = False
    """Write ``learning_curve.png`` at the end of the run."""
    tensorboard: bool = True
    """TensorBoard event files in ``RUN_DIR/tensorboard`` (every ``metrics.csv`` column)."""
    loggers: list[Literal["wandb", "mlflow"]] = []
    """Experiment trackers fed the same rows as ``metrics.csv``: ``wandb`` and ``mlflow``
    (``orchestrator/runtime/trackers.py``)."""
    experiment: str = Field("shoal", min_length=1)
    """The W&B project and the MLflow experiment a tracked run goes to."""
    wandb_mode: Literal["offline", "online"] = "offline"
    """``offline`` needs no account or network (``wandb sync`` uploads later)."""
    mlflow_uri: str | None = None
    """MLflow tracking URI; default ``$MLFLOW_TRACKING_URI``, else ``mlruns/`` beside the run."""
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
    world_model: WorldModelConfig = Field(default_factory=WorldModelConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    """Agent groups (``orchestrator/config/groups.py``); empty: every agent shares one policy."""

    def build_policy(self, env: VecMultiAgentEnv) -> Policy:
        """The run's policy sized for ``env``: shared, or one per agent group.

        Raises:
            ConfigError: a ``groups`` entry that does not fit the env, naming the key.
        """
        spec = algorithm_spec(self.train.algorithm)
        if spec.policy is not None:
            try:  # what it cannot learn (groups among them) is refused as in preflight
                spec.check(env.action_kind, self.uses_memory(), bool(self.groups),
                           self.world_model.enabled)  # fmt: skip
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if not self.groups:
                return spec.policy(self.model.spec(env), env.n_agents, self.train)
        try:
            if spec.policy is None:
                return build_policy(self.model, self.groups, env)
            groups = build_groups(self.model, self.groups, env)
        except GroupError as e:
            raise ConfigError(str(e)) from None
        assert spec.grouped_policy is not None  # spec.check refused groups otherwise
        try:  # what the algorithm's groups cannot be (frozen, self-play), naming the key
            return spec.grouped_policy(groups, env.action_dim, self.train)
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def reserved_cpus(self) -> float:
        """Ray CPUs the run's actors reserve (rollout workers, learner ranks, world model)."""
        wm = (
            self.world_model.actor_cpus
            if self.world_model.enabled and self.rollout.num_workers
            else 0
        )
        return (
            self.rollout.num_workers * self.rollout.cpus_per_worker
            + self.learner.num_ranks * self.learner.cpus_per_rank
            + wm
        )

    def streams_batches(self) -> bool:
        """Rollout workers hand batches to the learner through the Redis replay stream.

        They do for an algorithm that learns from replayed transitions when ``redis.replay``
        is on: the stream is then the run's replay, which outlives a learner restart.
        """
        return self.redis.replay and algorithm_spec(self.train.algorithm).layout == "transitions"

    def replay_stream_entries(self) -> int:
        """Entries the rollout workers keep in the replay stream.

        ``redis.replay_maxlen``; a replay learner's entries are whole batches, so the stream
        keeps no more of them than its replay holds (``train.replay_size`` transitions) plus
        two rounds of every worker in flight.
        """
        if not self.streams_batches():
            return self.redis.replay_maxlen
        per_entry = self.train.rollout_len * self.env.num_envs
        need = -(-self.train.replay_size // per_entry) + 2 * max(1, self.rollout.num_workers)
        return min(self.redis.replay_maxlen, need)

    def uses_memory(self, keys: tuple[str, ...] = ("memory", "critic_memory")) -> bool:
        """Some policy of the run has memory: ``model.<key>`` or a group's, for ``keys``."""
        if self.groups:  # each group's own setting, else the run's
            return any(
                (getattr(g.model, key) or getattr(self.model, key)) != "none"
                for g in self.groups.values()
                for key in keys
            )
        return any(getattr(self.model, key) != "none" for key in keys)

    def _check_memory(self) -> None:
        spec = algorithm_spec(self.train.algorithm)
        if spec.policy is not None and self.uses_memory(("critic_memory",)):
            raise ValueError(
                f"model.critic_memory: train.algorithm={spec.name} has no actor-critic critic "
                "to give memory; use model.critic_memory=none (model.memory gives its "
                "policy memory)"
            )
        if spec.layout == "transitions":
            sequence_length(self.train.rollout_len, self.train.chunk_len, self.train.burn_in)
            return
        lengths = [("train.rollout_len", self.train.rollout_len)]
        if self.world_model.enabled:
            lengths.append(("world_model.horizon", self.world_model.horizon))
        for key, t_len in lengths:
            chunk_length(t_len, self.train.minibatches, self.train.chunk_len, key)

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
        wm = self.world_model
        if wm.enabled and wm.fit_process and k > 1 and m == 0:
            raise ValueError(
                "world_model.fit_process needs learner.num_ranks=1 or rollout.num_workers > 0: "
                f"{k} ranks fitting one model average each step's gradients, which a child "
                "process cannot join (with workers the shoal-world-model actor fits it)"
            )
        if wm.enabled and self.train.minibatches > wm.horizon:
            raise ValueError(
                f"train.minibatches ({self.train.minibatches}) cannot exceed world_model.horizon "
                f"({wm.horizon}): an imagined batch is split into minibatches of time steps"
            )
        if self.uses_memory():
            self._check_memory()
        if self.train.minibatches > self.train.rollout_len:
            raise ValueError(
                f"train.minibatches ({self.train.minibatches}) cannot exceed train.rollout_len "
                f"({self.train.rollout_len}): minibatches are sets of time steps"
            )
        return self
