"""Find envs by name: ``envs.make("spread", num_envs=1024, n_agents=3)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envs.base import VecMultiAgentEnv
from envs.pettingzoo import PettingZooVecEnv, load_parallel_env_factory
from envs.rllib import load_multi_agent_factory
from envs.spread import SpreadEnv, spread_entities
from envs.vmas import VmasVecEnv

_REGISTRY: dict[str, Callable[..., VecMultiAgentEnv]] = {}

# PettingZoo envs whose observations encode an entity graph shoal knows how to read.
_ENTITY_FNS = {"mpe2.simple_spread_v3": spread_entities}


# Adapter prefixes whose env classes step one world at a time: spec -> instance factory.
_LOADERS: dict[str, Callable[[str], Callable[..., Any]]] = {
    "pettingzoo": load_parallel_env_factory,
    "rllib": load_multi_agent_factory,
}


def register(name: str, builder: Callable[..., VecMultiAgentEnv]) -> None:
    """Make ``builder(num_envs=..., **kwargs)`` available as ``make(name, ...)``."""
    _REGISTRY[name] = builder


def available() -> list[str]:
    """Registered names, plus the adapter prefix forms."""
    adapters = ["pettingzoo:<module>[:factory]", "rllib:<module>:<Class>", "vmas:<scenario>"]
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
        device=device,
        N=n_agents,
        local_ratio=local_ratio,
        max_cycles=max_cycles,
        continuous_actions=continuous_actions,
        **kwargs,
    )


register("spread", SpreadEnv)
register("mpe2-spread", _make_mpe2_spread)


def make(name: str, num_envs: int = 1, **kwargs: Any) -> VecMultiAgentEnv:
    """Build ``num_envs`` vectorised copies of the env called ``name``.

    Args:
        name: a registered name (``spread``, ``mpe2-spread``); ``pettingzoo:<module>`` /
            ``pettingzoo:<module>:<factory>`` for any PettingZoo ``ParallelEnv``, e.g.
            ``pettingzoo:mpe2.simple_spread_v3`` (kwargs go to the factory unchanged); or
            ``rllib:<module>:<Class>`` for an RLlib ``MultiAgentEnv`` (kwargs become its
            ``config`` dict); or ``vmas:<scenario>`` for a VMAS scenario (vectorised in
            torch like ``spread``; kwargs go to the scenario).
        num_envs: ``B``.
        **kwargs: env arguments.

    Raises:
        ValueError: unknown name or an import that fails, listing what exists.
    """
    adapter, _, spec = name.partition(":")
    if spec and adapter == "vmas":
        return VmasVecEnv(spec, num_envs=num_envs, **kwargs)
    if spec and adapter in _LOADERS:  # instances stepped in a loop by the PettingZoo adapter
        seed = kwargs.pop("seed", None)
        device = kwargs.pop("device", "cpu")
        return PettingZooVecEnv(
            _LOADERS[adapter](spec),
            num_envs=num_envs,
            seed=seed,
            entity_fn=_ENTITY_FNS.get(spec.partition(":")[0]),
            device=device,
            **kwargs,
        )
    if name not in _REGISTRY:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](num_envs=num_envs, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for env '{name}': {e}") from e
