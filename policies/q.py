"""Value-decomposition policies: per-agent utilities, a mixer, ε-greedy acting (QMIX, VDN).

Each agent's utility ``Q_i(o_i, ·)`` is an actor kind's encoder (MLP, GNN or transformer from
``policies.actor_critic.ARCHITECTURES``, weights shared by every agent) followed by a linear
head with one output per action. A mixer turns the chosen utilities into the team's value:
:class:`VDNMixer` sums them (Sunehag et al., 2018); :class:`QMixer` mixes them with weights a
hypernetwork reads from the global state, kept non-negative so ``Q_tot`` is monotonic in every
agent's utility (Rashid et al., 2018) and each agent's greedy action is the team's.

With ``model.memory`` (``gru`` | ``lstm``) a recurrent core (``policies.memory.MemoryCore``,
shared by every agent) sits between the encoder and the utility head, as in PyMARL's RNN agent:
acting carries each agent's state through the episode (``batch["memory"]``), and training
unrolls it over chunks of replayed steps from the state stored at each chunk's first step
(``agents/value_decomposition.py``).

Acting is ε-greedy over the legal actions (``action_mask``); ``epsilon`` is a buffer, so it
travels to rollout workers with the weights, and the learner moves it along its schedule.
Evaluation (:meth:`QPolicy.evaluating`) acts greedily.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from policies.actor_critic import ARCHITECTURES, POLICY_KINDS, Policy, PolicySpec
from policies.distributions import Categorical
from policies.memory import KEEP, MEMORY, MemoryCore

#: The batch key a training pass reads the actions taken from (``QPolicy.forward``).
TAKEN = "taken_actions"
#: The smallest probability written as a logit (a legal action ε-greedy may still take).
_TINY = 1e-30


class Identity(nn.Module):
    """A value normaliser that changes nothing (utilities are learnt in reward units)."""

    def normalize(self, x: Tensor) -> Tensor:
        """``x``."""
        return x

    def denormalize(self, x: Tensor) -> Tensor:
        """``x``."""
        return x

    def update_from_moments(self, mean: Tensor, mean_sq: Tensor) -> None:
        """Nothing to fold in."""


class VDNMixer(nn.Module):
    """``Q_tot = Σ_i Q_i`` over the living agents."""

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        """``q [..., N]``, ``state [..., S]`` (unused) -> ``[...]``."""
        return q.sum(-1)


class QMixer(nn.Module):
    """QMIX's monotonic mixing network (``Q_tot`` never falls when a ``Q_i`` rises).

    A hypernetwork reads the global state and writes the mixing weights, taken in absolute
    value, and biases: ``Q_tot = w2ᵀ elu(W1ᵀ q + b1) + V(s)``. It is tied to the team size
    ``N`` it was built for.

    Every layer starts at PyTorch's default initialisation scaled by ``init_scale``, with zero
    bias (as JaxMARL's ``MIXER_INIT_SCALE``, which scales orthogonal weights; QR's rounding
    depends on the thread count, and ranks must start bit-identical). Unscaled, a state of raw
    features (LBF's grid coordinates reach 7) gives mixing weights near 1 over 32 units, so a
    fresh ``Q_tot`` is ~10 where returns are ~0.1 and every agent's utility noise reaches it
    amplified ~16×; the max in the targets then inflated ``Q_tot`` without bound.

    Args:
        n_agents: ``N``.
        state_dim: ``S``.
        embed: the mixing layer's width (PyMARL's ``mixing_embed_dim``).
        hyper_hidden: the hypernetworks' hidden width (PyMARL's ``hypernet_embed``).
        init_scale: the factor on every layer's initial weights.
    """

    def __init__(
        self,
        n_agents: int,
        state_dim: int,
        embed: int = 32,
        hyper_hidden: int = 64,
        init_scale: float = 0.1,
    ):
        super().__init__()
        self.n_agents, self.embed = n_agents, embed

        def hyper(out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Linear(state_dim, hyper_hidden), nn.ReLU(), nn.Linear(hyper_hidden, out)
            )

        self.w1 = hyper(n_agents * embed)
        self.b1 = nn.Linear(state_dim, embed)
        self.w2 = hyper(embed)
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                with torch.no_grad():
                    layer.weight.mul_(init_scale)
                    layer.bias.zero_()

    def forward(self, q: Tensor, state: Tensor) -> Tensor:
        """``q [..., N]``, ``state [..., S]`` -> ``Q_tot [...]``."""
        lead = q.shape[:-1]
        s = state.reshape(-1, state.shape[-1])
        w1 = self.w1(s).abs().view(-1, self.n_agents, self.embed)
        hidden = F.elu(torch.bmm(q.reshape(-1, 1, self.n_agents), w1) + self.b1(s).unsqueeze(1))
        w2 = self.w2(s).abs().view(-1, self.embed, 1)
        out = torch.bmm(hidden, w2).view(-1) + self.v(s).view(-1)
        return out.view(lead)


MIXERS = ("qmix", "vdn")


class QPolicy(Policy):
    """Shared per-agent utilities with a mixer; acts ε-greedily, evaluates greedily.

    Args:
        spec: the encoder (``spec.kind``), its widths and the env's dimensions (discrete
            actions only) and ``spec.memory``.
        mixer: ``qmix`` or ``vdn``.
        n_agents: the team size QMIX's mixer is built for.
        mixer_embed: QMIX's mixing width.
        mixer_init_scale: the factor on QMIX's initial mixer weights (:class:`QMixer`).

    Shapes:
        - input: a batch dict (``Observation.as_dict()``, ``[B, N, ...]``); with memory, the
          state each agent enters the step with, ``memory [B, N, S]`` (zeros when absent).
        - :meth:`utilities`: ``[B, N, A]``, illegal actions at ``-inf``.
        - sequence (with memory): ``L`` steps of ``b`` chunks flattened time-major
          (``[L * b, ...]``), the chunks' first states ``memory [b, N, S]`` and
          ``memory_keep [L, b, N]`` (``policies.memory.chunk_keep``) -> ``[L * b, N, A]``.
    """

    epsilon: Tensor
    """The ε of ε-greedy acting (a buffer: it travels with the weights)."""

    def __init__(
        self,
        spec: PolicySpec,
        mixer: str,
        n_agents: int,
        mixer_embed: int = 32,
        mixer_init_scale: float = 0.1,
    ):
        super().__init__()
        if spec.kind not in ARCHITECTURES:
            raise ValueError(f"policy kind {spec.kind!r} is not one of {POLICY_KINDS}")
        if spec.action_kind != "discrete" or mixer not in MIXERS:
            raise ValueError(
                f"a {mixer} policy has discrete actions (got {spec.action_kind}); mixers: {MIXERS}"
            )
        self.spec, self.mixer_kind = spec, mixer
        self.n_agents, self.mixer_embed = n_agents, mixer_embed
        arch = ARCHITECTURES[spec.kind]
        encoder = arch.actor(spec)
        del encoder.head  # its features feed the utility head instead
        self.encoder = encoder
        self.core = (
            MemoryCore(spec.memory, spec.hidden, spec.memory_norm, spec.memory_out_norm)
            if spec.memory != "none"
            else None
        )
        self.memory_size = self.core.size if self.core is not None else 0
        self.q_head = nn.Linear(spec.hidden, spec.action_dim)
        self.mixer: nn.Module = (
            QMixer(n_agents, spec.state_dim, mixer_embed, init_scale=mixer_init_scale)
            if mixer == "qmix"
            else VDNMixer()
        )
        self.value_norm = Identity()
        self.register_buffer("epsilon", torch.ones(()))
        self.input_keys = frozenset(
            {"alive", "action_mask", "state"}
            | arch.inputs(spec)
            | ({MEMORY} if self.memory_size else set())
        )

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild this policy."""
        return {
            "policy_spec": asdict(self.spec),
            "q_policy": {"mixer": self.mixer_kind, "n_agents": self.n_agents,
                         "mixer_embed": self.mixer_embed},
        }  # fmt: skip

    def _masked(self, h: Tensor, batch: dict[str, Tensor]) -> Tensor:
        q = self.q_head(h)
        mask = batch.get("action_mask")
        return q if mask is None else q.masked_fill(~mask.bool(), float("-inf"))

    def step_utilities(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """One step's utilities ``[B, N, A]`` and, with memory, the state after it."""
        h = self.encoder.features(batch)  # type: ignore[operator]
        if self.core is None:
            return self._masked(h, batch), None
        h, state = self.core.step(h, batch)
        return self._masked(h, batch), state

    def utilities(self, batch: dict[str, Tensor]) -> Tensor:
        """Every agent's utility of every action ``[B, N, A]``; illegal ones ``-inf``.

        Given ``memory_keep`` (a policy with memory), of whole chunks: the encoder runs once
        over every step, the core step by step from each chunk's stored state, reset where
        ``memory_keep`` is false, exactly as acting reset it.
        """
        if self.core is None or KEEP not in batch:
            return self.step_utilities(batch)[0]
        return self._masked(self._unroll(batch)[0], batch)

    @torch.no_grad()
    def state_after(self, batch: dict[str, Tensor]) -> Tensor:
        """The state each of a sequence batch's chunks ends with ``[b, N, S]`` (burn-in)."""
        return self._unroll(batch)[1]

    def _unroll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The core's outputs over whole chunks ``[L * b, N, H]`` and the state after them."""
        assert self.core is not None
        return self.core.unroll(self.encoder.features(batch), batch)  # type: ignore[operator]

    def mix(self, chosen: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """``Q_tot [B]`` from the agents' chosen utilities ``[B, N]`` (dead agents add 0)."""
        chosen = chosen * batch["alive"].to(chosen.dtype)
        return self.mixer(chosen, batch["state"])  # type: ignore[no-any-return]

    def _explore(self, q: Tensor) -> Categorical:
        legal = q > float("-inf")
        greedy = F.one_hot(q.argmax(-1), q.shape[-1]).to(q.dtype)
        uniform = legal.to(q.dtype) / legal.sum(-1, keepdim=True).clamp_min(1)
        eps = self.epsilon.to(q.dtype)
        probs = (1 - eps) * greedy + eps * uniform
        return Categorical(probs.clamp_min(_TINY).log(), probs > 0)

    def dist(self, batch: dict[str, Tensor]) -> Categorical:
        """ε-greedy over the legal actions ``[B, N]``."""
        return self._explore(self.utilities(batch))

    def step(self, batch: dict[str, Tensor]) -> tuple[Categorical, Tensor | None]:
        """ε-greedy over the legal actions and, with memory, the state after this step."""
        q, state = self.step_utilities(batch)
        return self._explore(q), state

    def value(self, batch: dict[str, Tensor]) -> Tensor:
        """Each agent's greedy utility ``[B, N]`` (what rollouts record as its value)."""
        return _greedy(self.utilities(batch))

    def forward(self, batch: dict[str, Tensor]) -> tuple[Categorical, Tensor]:
        """``(ε-greedy distribution, greedy utilities [B, N])``.

        In training, with the actions taken in ``batch[TAKEN]`` (``[B, N]``), the second is
        ``Q_tot [B]`` of those actions instead (over whole chunks given ``memory_keep``).
        """
        q = self.utilities(batch)
        if TAKEN in batch:
            chosen = q.gather(-1, batch[TAKEN].long().unsqueeze(-1)).squeeze(-1)
            chosen = torch.where(torch.isfinite(chosen), chosen, torch.zeros_like(chosen))
            return self._explore(q.detach()), self.mix(chosen, batch)
        return self._explore(q), _greedy(q)

    @torch.no_grad()
    def act(
        self, batch: dict[str, Tensor], deterministic: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """One forward for the action, its probability, the greedy utility and the state."""
        q, state = self.step_utilities(batch)
        d = self._explore(q)
        action = d.mode() if deterministic else d.sample()
        return action, d.log_prob(action), _greedy(q), state

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Act greedily inside (ε = 0); the schedule's ε is restored after."""
        kept = self.epsilon.clone()
        self.epsilon.zero_()
        try:
            yield
        finally:
            self.epsilon.copy_(kept)


def _greedy(q: Tensor) -> Tensor:
    """The best legal utility ``[..., N]`` of ``q [..., N, A]`` (finite for an agent with none)."""
    return q.amax(-1).clamp_min(-1e9)
