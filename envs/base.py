"""The batch-first multi-agent environment contract every shoal env implements."""

from __future__ import annotations

import abc
import re
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    import numpy as np

ActionKind = Literal["discrete", "continuous"]


class EnvError(ValueError):
    """An env could not be found or built; the message is one line that says what to fix."""


@dataclass
class Observation:
    """What agents see after a reset or a step, batched over ``B`` sub-envs.

    Shapes:
        - obs: ``[B, N, D]`` per-agent observation vectors.
        - state: ``[B, S]`` global state for centralised critics.
        - alive: ``[B, N]`` bool; absent agents are padding and never reach a loss.
        - action_mask: ``[B, N, A]`` bool (``True`` = legal) or ``None`` when every action is.
        - nodes: ``[B, E, F]`` entity features (agents first, then other entities).
        - node_pos: ``[B, E, 2]`` entity positions, used by policies to build edges.
        - node_type: ``[B, E]`` int entity type (0 = agent).
        - node_mask: ``[B, E]`` bool, ``False`` for padded entities.
    """

    obs: Tensor
    state: Tensor
    alive: Tensor
    nodes: Tensor
    node_pos: Tensor
    node_type: Tensor
    node_mask: Tensor
    action_mask: Tensor | None = None

    def as_dict(self) -> dict[str, Tensor]:
        """Tensors by name, skipping absent optional ones (the form policies consume)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out

    def where(self, cond: Tensor, other: Observation) -> Observation:
        """Per sub-env select: ``self`` where ``cond[B]`` is true, else ``other``."""
        kw = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a is None or b is None:
                kw[f.name] = a if b is None else b
                continue
            c = cond.view(-1, *([1] * (a.dim() - 1)))
            kw[f.name] = torch.where(c, a, b)
        return replace(self, **kw)


def check_at_least(**bounds: tuple[float, float]) -> None:
    """A native env's argument checks: ``name=(value, lowest)``, in order.

    Raises:
        ValueError: the first argument below its bound, named.
    """
    for name, (value, low) in bounds.items():
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class AgentInfo:
    """One agent slot: its name and its own observation and action widths.

    The batch tensors are as wide as the widest agent (``obs_dim``, ``action_dim``); an agent's
    own ``obs_dim`` are the leading features of its row, its ``action_dim`` the leading actions
    (the rest is padding). Agent groups (``policies.groups``) give each group its own widths.
    """

    name: str
    obs_dim: int
    action_dim: int


def name_group(name: str) -> str:
    """The env's own group of an agent: its name without a trailing index.

    ``adversary_0`` -> ``adversary``, ``agent_12`` -> ``agent``, ``speaker_0`` -> ``speaker``:
    the convention of PettingZoo's MPE and of VMAS.
    """
    return re.sub(r"[_-]?\d+$", "", name) or name


@dataclass
class StepResult:
    """One vectorised step.

    ``observation`` is already auto-reset for finished sub-envs; ``final`` holds what those
    sub-envs saw at the end of their episode, so truncated episodes can be bootstrapped.

    Shapes:
        - reward: ``[B, N]``.
        - terminated: ``[B, N]`` bool, the agent's episode ended for good (no bootstrap).
        - truncated: ``[B]`` bool, the episode was cut by a time limit (bootstrap from final).
    """

    observation: Observation
    reward: Tensor
    terminated: Tensor
    truncated: Tensor
    final: Observation

    @property
    def done(self) -> Tensor:
        """``[B]`` bool: the sub-env was reset after this step."""
        return self.truncated | self.terminated.all(dim=-1)


class VecMultiAgentEnv(abc.ABC):
    """``B`` copies of an ``N``-agent environment stepped in one call.

    Subclasses set the attributes below in ``__init__``. Every tensor is batch-first and lives
    on ``device``; finished sub-envs reset themselves inside ``step``.
    """

    num_envs: int
    n_agents: int
    obs_dim: int
    state_dim: int
    node_dim: int
    n_nodes: int
    action_kind: ActionKind
    #: Number of discrete actions, or the width of a continuous action vector.
    action_dim: int
    #: Bounds of continuous actions (ignored for discrete ones).
    action_low: float = -1.0
    action_high: float = 1.0
    max_episode_steps: int | None = None
    device: torch.device = torch.device("cpu")

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> Observation:
        """Reset every sub-env and return the first observation."""

    @abc.abstractmethod
    def step(self, actions: Tensor) -> StepResult:
        """Advance every sub-env by one step.

        Args:
            actions: ``[B, N]`` long for discrete actions, ``[B, N, action_dim]`` float for
                continuous ones.
        """

    def agent_info(self) -> list[AgentInfo]:
        """Every agent slot in order: by default ``agent_<i>``, all of the env's full widths."""
        return [
            AgentInfo(f"agent_{i}", self.obs_dim, self.action_dim) for i in range(self.n_agents)
        ]

    def close(self) -> None:  # noqa: B027 - optional hook, most envs hold nothing
        """Release resources held by the env."""

    def restrict_observation(self, keys: frozenset[str]) -> None:  # noqa: B027 - optional
        """Observation fields no reader needs may be skipped from now on.

        Rollout workers pass the keys their policy (and world model) read. An env may then
        return zero-width ``obs``/``state`` when neither is among ``keys``; most ignore it.
        """

    def observe_entities(self, nodes: Tensor) -> Observation:
        """What the agents would see in worlds given as entity graphs ``[B, E, F]``.

        Imagination needs it: a world model predicts entity graphs, the policy acts on
        observations. Optional; envs that cannot say raise ``NotImplementedError``.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot observe given entity graphs")

    def frame(self) -> np.ndarray | None:
        """World 0 as the env draws it, ``[H, W, 3]`` uint8, after the last reset or step.

        After a step that ended world 0's episode it shows the episode's end (the ``final``
        view), not the next episode's start. ``None`` (the default): this env does not draw
        itself; ``shoal render`` then draws its entity positions.
        """
        return None

    def random_actions(self, generator: torch.Generator | None = None) -> Tensor:
        """Uniformly random legal actions, ``[B, N]`` or ``[B, N, action_dim]``."""
        b, n = self.num_envs, self.n_agents
        if self.action_kind == "discrete":
            return torch.randint(self.action_dim, (b, n), generator=generator, device=self.device)
        u = torch.rand((b, n, self.action_dim), generator=generator, device=self.device)
        return self.action_low + u * (self.action_high - self.action_low)


class WorldBatchEnv(VecMultiAgentEnv):
    """A ported env of ``B`` worlds in tensors that draws its own episodes.

    The LBF and rware ports (``lbf:``, ``rware:``) are such envs. This class owns the episode
    generator (``_gen``), resetting and the end of a step: the final observation is kept,
    world 0's view is kept for :meth:`frame`, and finished worlds start afresh. A subclass
    gives :meth:`_reset_worlds`, :meth:`_observe` and :meth:`_keep_view`.
    """

    _gen: torch.Generator

    def _seed_generator(self, seed: int | None) -> None:
        """The episode generator on the env's device, seeded by ``seed`` (``None``: fresh)."""
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(seed if seed is not None else torch.seed() % 2**63)

    @abc.abstractmethod
    def _reset_worlds(self, idx: Tensor) -> None:
        """Draw new episodes in worlds ``idx``."""

    @abc.abstractmethod
    def _observe(self) -> Observation:
        """Every world's observation now."""

    @abc.abstractmethod
    def _keep_view(self) -> None:
        """Keep world 0 as it is now, for :meth:`frame`."""

    def reset(self, seed: int | None = None) -> Observation:
        """Draw new episodes in every world."""
        if seed is not None:
            self._gen.manual_seed(seed)
        self._reset_worlds(torch.arange(self.num_envs, device=self.device))
        self._keep_view()
        return self._observe()

    def _end_step(
        self,
        reward: Tensor,
        terminated: Tensor,
        truncated: Tensor,
        final: Observation | None = None,
    ) -> StepResult:
        """The step's result, after which worlds whose episode ended start afresh.

        An episode ended where ``truncated`` or every agent is ``terminated``. ``final``: the
        observation now, if already made.
        """
        final = self._observe() if final is None else final
        self._keep_view()
        obs = final
        done = truncated | terminated.all(-1)
        if bool(done.any()):
            self._reset_worlds(done.nonzero().squeeze(1))
            obs = self._observe()
        return StepResult(obs, reward, terminated, truncated, final)
