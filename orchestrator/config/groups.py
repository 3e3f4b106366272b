"""The run config's ``groups`` section: which agents share a policy, and how each group trains.

With no ``groups`` every agent shares one policy and one team return (today's fast path). A
section like::

    groups:
      adversary: {}                # the env's own group: agents named adversary_<i>
      prey:
        agents: ["agent_*"]        # fnmatch patterns over the env's agent names
        train: false               # frozen
        model: {hidden: 32}        # overrides of the run's model section

gives each group its own actor, critic, value normaliser, Adam parameter group and return;
``groups.<name>.pool`` adds self-play against the group's own past versions.
Agents are assigned against the env's own names (``VecMultiAgentEnv.agent_info``), so the
checks (an agent in no group, a pattern that matches nothing, an agent claimed twice, a group
whose agents see different widths) run in preflight, before anything starts.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from envs import AgentInfo, VecMultiAgentEnv, name_group
from policies import POLICY_KINDS
from policies.actor_critic import ActorCritic, Policy
from policies.groups import AgentGroup, GroupedActorCritic, with_widths

if TYPE_CHECKING:
    from orchestrator.config.sections import ModelConfig

#: The one group of a run without a ``groups`` section.
TEAM = "team"


class GroupError(ValueError):
    """A ``groups`` entry that does not fit the env; one line naming the key."""


class GroupModelConfig(BaseModel):
    """What a group changes of the run's ``model`` section (unset keys keep the run's)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: str | None = None
    critic_kind: str | None = None
    critic: Literal["centralised", "independent"] | None = None
    hidden: int | None = Field(None, ge=1)
    layers: int | None = Field(None, ge=1)
    heads: int | None = Field(None, ge=1)
    memory: Literal["none", "gru", "lstm"] | None = None
    critic_memory: Literal["none", "gru", "lstm"] | None = None
    memory_norm: bool | None = None
    memory_out_norm: bool | None = None

    @field_validator("kind", "critic_kind")
    @classmethod
    def _known_kind(cls, value: str | None) -> str | None:
        if value is not None and value not in POLICY_KINDS:
            raise ValueError(f"Input should be one of {', '.join(POLICY_KINDS)}")
        return value


class PoolConfig(BaseModel):
    """Self-play: the group also plays past versions of itself, kept in an opponent pool."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    size: int = Field(0, ge=0)
    """Past versions kept (in Redis like weights, and in checkpoints); 0: no self-play."""
    every: int = Field(10, ge=1)
    """Updates between snapshots of the group into its pool."""
    share: float = Field(0.5, gt=0, le=1)
    """Share of the sub-envs in which the group acts with a past version drawn from its pool
    (redrawn at every snapshot); its opponents learn against both."""


class GroupConfig(BaseModel):
    """One agent group."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    agents: list[str] | None = None
    """fnmatch patterns over the env's agent names (``adversary_*``); unset: the env's own
    group of this name (agents named ``<group>_<i>``, as PettingZoo's MPE and VMAS name them)."""
    share: bool = True
    """One policy for the whole group; ``false`` gives each of its agents its own."""
    train: bool = True
    """``false`` freezes the group: it acts with its initial (or ``init``) weights."""
    lr: float | None = Field(None, gt=0)
    """The group's learning rate (default ``train.lr``)."""
    init: str | None = None
    """A run directory or checkpoint whose group of the same name this group starts from
    (e.g. predators trained in an earlier run, frozen as the opponent)."""
    model: GroupModelConfig = Field(default_factory=GroupModelConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)

    @field_validator("agents", mode="before")
    @classmethod
    def _one_pattern(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value


def assign_agents(groups: dict[str, GroupConfig], agents: list[AgentInfo]) -> dict[str, list[int]]:
    """Each group's agent slots, by the rules in the module docstring.

    Raises:
        GroupError: naming the ``groups.<name>`` key and the agents concerned.
    """
    names = [a.name for a in agents]
    if not groups:
        return {TEAM: list(range(len(agents)))}
    own: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        own.setdefault(name_group(name), []).append(i)
    listed = ", ".join(names)
    claimed: dict[int, str] = {}
    out: dict[str, list[int]] = {}
    for gname, g in groups.items():
        if g.agents is None:
            if gname not in own:
                raise GroupError(
                    f"groups.{gname}: the env has no agents named {gname}_<i> (its groups: "
                    f"{', '.join(own)}); name them with groups.{gname}.agents=PATTERN"
                )
            slots = own[gname]
        else:
            slots = []
            for pattern in g.agents:
                hits = [i for i, n in enumerate(names) if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise GroupError(
                        f"groups.{gname}.agents: {pattern!r} matches no agent (the env's "
                        f"agents: {listed})"
                    )
                slots += hits
        for i in slots:
            if claimed.get(i, gname) != gname:
                raise GroupError(
                    f"agent {names[i]} is claimed by groups.{claimed[i]} and groups.{gname}: "
                    "give each agent one group"
                )
            claimed[i] = gname
        out[gname] = sorted(set(slots))
    missing = [names[i] for i in range(len(names)) if i not in claimed]
    if missing:
        raise GroupError(
            f"agent{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"{'are' if len(missing) > 1 else 'is'} in no group: add "
            f"groups.{name_group(missing[0])} or a pattern to a group's agents"
        )
    return out


def build_policy(
    model: ModelConfig, groups: dict[str, GroupConfig], env: VecMultiAgentEnv
) -> Policy:
    """The run's policy for ``env``, shared or one per agent group.

    Without ``groups`` one :class:`ActorCritic`; else a :class:`GroupedActorCritic` with each
    group at its own widths.

    Raises:
        GroupError: a group that does not fit the env.
    """
    if not groups:
        return ActorCritic(model.spec(env))
    return GroupedActorCritic(build_groups(model, groups, env), env.action_kind, env.action_dim)


def build_groups(
    model: ModelConfig, groups: dict[str, GroupConfig], env: VecMultiAgentEnv
) -> list[AgentGroup]:
    """Each group of ``groups`` with its agents and its policy spec at its own widths.

    Raises:
        GroupError: a group that does not fit the env.
    """
    base = model.spec(env)
    infos = env.agent_info()
    built = []
    for gname, slots in assign_agents(groups, infos).items():
        g = groups[gname]
        widths = {(infos[i].obs_dim, infos[i].action_dim) for i in slots}
        if len(widths) > 1:
            seen = ", ".join(
                f"{infos[i].name} {infos[i].obs_dim}/{infos[i].action_dim}" for i in slots
            )
            raise GroupError(
                f"groups.{gname}: its agents see different observation/action widths ({seen}); "
                "split them into groups of one width each"
            )
        obs_dim, action_dim = widths.pop()
        overrides = {k: v for k, v in g.model.model_dump().items() if v is not None}
        if "critic" in overrides:
            overrides["centralised"] = overrides.pop("critic") == "centralised"
        spec = with_widths(base, obs_dim, action_dim, **overrides)
        if spec.hidden % spec.heads:
            raise GroupError(
                f"groups.{gname}.model: hidden ({spec.hidden}) must be divisible by heads "
                f"({spec.heads})"
            )
        if g.pool.size and not g.train:
            raise GroupError(
                f"groups.{gname}.pool.size={g.pool.size} needs groups.{gname}.train=true: a "
                "frozen group has no past versions to play"
            )
        share = g.pool.share if g.pool.size else 0.0
        built.append(AgentGroup(gname, tuple(slots), spec, g.train, g.share, g.lr, share))
    return built


def check_inits(groups: dict[str, GroupConfig]) -> None:
    """Every ``groups.<name>.init`` names a checkpoint that exists (nothing is loaded)."""
    for gname, g in groups.items():
        if g.init is not None and not Path(g.init).exists():
            raise GroupError(f"groups.{gname}.init: no run directory or checkpoint at '{g.init}'")
