"""Find envs by name: ``envs.make("spread", num_envs=1024, n_agents=3)``.

Three kinds of name: a registered one (``spread``, ``mpe2-spread``, ``tag``, ``cue``), an
adapter prefix (``pettingzoo:<module>[:factory]``, ``rllib:<module>:<Class>``,
``vmas:<scenario>``, ``gym:<module>:<env id>``, ``jaxmarl:<env>[:<map>]``, ``lbf:<env id>``,
``rware:<env id>``), and
nothing else. Each kind says which of shoal's common settings (:class:`EnvSettings`) it takes,
so callers pass the same settings whatever the env, and every failure to build an env is one
:class:`~envs.base.EnvError` line naming the env, never a library's traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from envs.base import EnvError, VecMultiAgentEnv
from envs.cue import CueEnv
from envs.gym_tuple import load_gym_tuple_factory
from envs.lbf import make_foraging
from envs.pettingzoo import PettingZooVecEnv, load_parallel_env_factory
from envs.rllib import load_multi_agent_factory
from envs.rware import make_warehouse
from envs.spread import SpreadEnv, observe_spread_entities, spread_entities
from envs.tag import TagEnv
from envs.vmas import VmasVecEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EnvSettings:
    """The env settings a shoal config names for every env (``env.n_agents``, ...).

    Not every env has all of them: each registered env and adapter says which it takes
    (``register(..., takes=...)``): ``spread`` and ``mpe2-spread`` all four, ``tag`` and VMAS
    the time limit and the action kind, ``pettingzoo:``, ``rllib:`` and ``gym:`` envs none.
    """

    n_agents: int = 3
    max_cycles: int = 25
    local_ratio: float = 0.5
    continuous_actions: bool = False


Takes = Callable[[EnvSettings], dict[str, Any]]


def _all(s: EnvSettings) -> dict[str, Any]:
    return asdict(s)


def _none(s: EnvSettings) -> dict[str, Any]:
    return {}


def _vmas(s: EnvSettings) -> dict[str, Any]:
    # VMAS calls the time limit max_steps; team sizes are scenario arguments with their own
    # names (n_agents, n_blue_agents, ...), so they stay in env.kwargs.
    return {"max_steps": s.max_cycles, "continuous_actions": s.continuous_actions}


_REGISTRY: dict[str, tuple[Callable[..., VecMultiAgentEnv], Takes]] = {}

# PettingZoo envs whose observations encode an entity graph shoal knows how to read (and how
# to turn back into observations, for imagination).
_ENTITY_FNS = {"mpe2.simple_spread_v3": (spread_entities, observe_spread_entities)}


def _stepped_in_a_loop(load: Callable[[str], Callable[..., Any]]) -> Callable[..., Any]:
    """An adapter whose env class steps one world at a time, behind the PettingZoo adapter."""

    def build(
        spec: str, num_envs: int, seed: int | None = None, device: Any = "cpu", **kwargs: Any
    ) -> VecMultiAgentEnv:
        entity_fn, observe_fn = _ENTITY_FNS.get(spec.partition(":")[0], (None, None))
        return PettingZooVecEnv(
            load(spec),
            num_envs=num_envs,
            seed=seed,
            entity_fn=entity_fn,
            observe_fn=observe_fn,
            device=device,
            **kwargs,
        )

    return build


def _jaxmarl(spec: str, **kwargs: Any) -> VecMultiAgentEnv:
    from envs.jax_envs import JaxMarlVecEnv  # jax is imported only for jaxmarl: envs

    return JaxMarlVecEnv(spec, **kwargs)


# Adapter prefix -> (builder taking the text after the prefix, settings it takes). Kwargs of
# pettingzoo:, rllib: and gym: envs go to their factories unchanged.
_ADAPTERS: dict[str, tuple[Callable[..., VecMultiAgentEnv], Takes]] = {
    "pettingzoo": (_stepped_in_a_loop(load_parallel_env_factory), _none),
    "rllib": (_stepped_in_a_loop(load_multi_agent_factory), _none),
    "gym": (_stepped_in_a_loop(load_gym_tuple_factory), _none),
    "jaxmarl": (_jaxmarl, _none),
    "lbf": (make_foraging, _none),
    "rware": (make_warehouse, _none),
    "vmas": (VmasVecEnv, _vmas),
}


def register(name: str, builder: Callable[..., VecMultiAgentEnv], takes: Takes = _all) -> None:
    """Make ``builder(num_envs=..., **kwargs)`` available as ``make(name, ...)``.

    Args:
        name: the env name.
        builder: builds the vectorised env.
        takes: which :class:`EnvSettings` the builder accepts, as keyword arguments
            (default: all of them).
    """
    _REGISTRY[name] = (builder, takes)


def available() -> list[str]:
    """Registered names, plus the adapter prefix forms."""
    adapters = ["pettingzoo:<module>[:factory]", "rllib:<module>:<Class>", "vmas:<scenario>",
                "gym:<module>:<env id>", "jaxmarl:<env>[:<map>]", "lbf:<env id>",
                "rware:<env id>"]  # fmt: skip
    return sorted(_REGISTRY) + adapters


def _make_mpe2_spread(
    num_envs: int = 1,
    n_agents: int = 3,
    local_ratio: float = 0.5,
    max_cycles: int = 25,
    continuous_actions: bool = False,
    seed: int | None = None,
    device: str = "cpu",
    **kwargs: Any,
) -> VecMultiAgentEnv:
    return PettingZooVecEnv(
        load_parallel_env_factory("mpe2.simple_spread_v3"),
        num_envs=num_envs,
        seed=seed,
        entity_fn=spread_entities,
        observe_fn=observe_spread_entities,
        device=device,
        N=n_agents,
        local_ratio=local_ratio,
        max_cycles=max_cycles,
        continuous_actions=continuous_actions,
        **kwargs,
    )


def _tag(s: EnvSettings) -> dict[str, Any]:
    # Team sizes are simple_tag's own arguments (num_adversaries, num_good, num_obstacles).
    return {"max_cycles": s.max_cycles, "continuous_actions": s.continuous_actions}


def _cue(s: EnvSettings) -> dict[str, Any]:
    # The number of options is the env's own argument (env.kwargs.choices).
    return {"n_agents": s.n_agents, "max_cycles": s.max_cycles}


register("spread", SpreadEnv)
register("mpe2-spread", _make_mpe2_spread)
register("tag", TagEnv, takes=_tag)
register("cue", CueEnv, takes=_cue)


def make(
    name: str, num_envs: int = 1, settings: EnvSettings | None = None, **kwargs: Any
) -> VecMultiAgentEnv:
    """Build ``num_envs`` vectorised copies of the env called ``name``.

    Args:
        name: a registered name (``spread``, ``mpe2-spread``); ``pettingzoo:<module>`` /
            ``pettingzoo:<module>:<factory>`` for any PettingZoo ``ParallelEnv``, e.g.
            ``pettingzoo:mpe2.simple_spread_v3`` (kwargs go to the factory unchanged); or
            ``rllib:<module>:<Class>`` for an RLlib ``MultiAgentEnv`` (kwargs become its
            ``config`` dict); or ``vmas:<scenario>`` for a VMAS scenario (vectorised in
            torch like ``spread``; kwargs go to the scenario); or ``gym:<module>:<env id>``
            for a Gymnasium env with per-agent tuple spaces (LBF, rware; kwargs go to
            ``gymnasium.make``); or ``lbf:<env id>`` for Level-Based Foraging natively in torch
            (kwargs: the package's argument names); or ``rware:<env id>`` for the Multi-Robot
            Warehouse natively in torch (kwargs: the package's argument names).
        num_envs: ``B``.
        settings: shoal's common env settings; each kind of env takes those it has.
        **kwargs: env arguments (``seed``, ``device`` and the env's own); they win over
            ``settings``.

    Raises:
        EnvError: unknown name, a module that does not import, or an env that fails to build
            with these arguments; one line naming the env.
    """
    prefix, _, spec = name.partition(":")
    builder: Callable[..., VecMultiAgentEnv]
    if spec and prefix in _ADAPTERS:
        adapter, takes = _ADAPTERS[prefix]
        builder = lambda **kw: adapter(spec, **kw)  # noqa: E731
    elif name in _REGISTRY:
        builder, takes = _REGISTRY[name]
    else:
        raise EnvError(f"unknown env '{name}'; available: {', '.join(available())}")
    args = {**(takes(settings) if settings is not None else {}), **kwargs}
    try:
        return builder(num_envs=num_envs, **args)
    except EnvError:
        raise
    except Exception as e:  # the env library's own failure: shown as one line, at the boundary
        log.debug("building env %r failed", name, exc_info=True)
        raise EnvError(f"cannot build env '{name}': {describe(e)}") from e


def describe(error: BaseException) -> str:
    """``Type: first line of the message``: a library's error as one line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
