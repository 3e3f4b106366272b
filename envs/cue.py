"""``cue``: a task only memory can solve, native in torch.

Each agent is shown a cue at the first step of an episode (one of ``choices`` options, its
own, one-hot) and nothing about it afterwards; at the last of ``max_cycles`` steps it must
pick the option it was shown: reward 1 for the right one, 0 otherwise, and the episode ends
(terminated). Observations after the first step are the same in every episode (the cue's
slots are zero, plus a last-step flag and the step's fraction of the episode), so a
feed-forward policy's last action cannot depend on the cue: its expected team return is
exactly ``n_agents / choices``. A policy with memory can reach ``n_agents``.

The global state (a centralised critic's input) holds every agent's cue, so a feed-forward
critic can value the last step; only the actor needs memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from envs.base import AgentInfo, Observation, StepResult, VecMultiAgentEnv, check_at_least


class CueEnv(VecMultiAgentEnv):
    """``B`` episodes of the cue task, stepped together (all episodes share one clock).

    Args:
        num_envs: ``B``.
        n_agents: ``N``, each with its own cue.
        choices: ``K``, options per cue (and actions).
        max_cycles: steps per episode (the cue at the first, the choice at the last); >= 2.
        device: torch device.
        seed: seeds the cues.
    """

    def __init__(
        self,
        num_envs: int = 1,
        n_agents: int = 2,
        choices: int = 4,
        max_cycles: int = 4,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> None:
        check_at_least(
            num_envs=(num_envs, 1), n_agents=(n_agents, 1), choices=(choices, 2),
            max_cycles=(max_cycles, 2),
        )  # fmt: skip
        self.num_envs, self.n_agents, self.choices = num_envs, n_agents, choices
        self.max_cycles = self.max_episode_steps = max_cycles
        self.device = torch.device(device)
        self.obs_dim = self.node_dim = choices + 2
        self.state_dim = n_agents * choices + 1
        self.n_nodes = n_agents
        self.action_kind = "discrete"
        self.action_dim = choices
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(0 if seed is None else seed)
        self._t = 0
        self._cue = torch.zeros(num_envs, n_agents, dtype=torch.long, device=self.device)

    def agent_info(self) -> list[AgentInfo]:
        """Every agent sees and acts alike."""
        n = self.n_agents
        return [AgentInfo(f"agent_{i}", self.obs_dim, self.action_dim) for i in range(n)]

    def _observe(self) -> Observation:
        b, n, k = self.num_envs, self.n_agents, self.choices
        shown = torch.nn.functional.one_hot(self._cue, k).float() * float(self._t == 0)
        last = torch.full((b, n, 1), float(self._t == self.max_cycles - 1), device=self.device)
        phase = torch.full((b, n, 1), self._t / self.max_cycles, device=self.device)
        obs = torch.cat([shown, last, phase], -1)
        cues = torch.nn.functional.one_hot(self._cue, k).float().flatten(1)
        state = torch.cat([cues, phase[:, 0]], -1)
        return Observation(
            obs=obs,
            state=state,
            alive=torch.ones(b, n, dtype=torch.bool, device=self.device),
            nodes=obs,
            node_pos=torch.zeros(b, n, 2, device=self.device),
            node_type=torch.zeros(b, n, dtype=torch.long, device=self.device),
            node_mask=torch.ones(b, n, dtype=torch.bool, device=self.device),
        )

    def reset(self, seed: int | None = None) -> Observation:
        """New cues for every episode; step 0 shows them."""
        if seed is not None:
            self._gen.manual_seed(seed)
        self._t = 0
        self._cue = torch.randint(
            self.choices, self._cue.shape, generator=self._gen, device=self.device
        )
        return self._observe()

    def step(self, actions: Tensor) -> StepResult:
        """Reward the last step's choices; every episode ends and restarts together."""
        b, n = self.num_envs, self.n_agents
        if self._t < self.max_cycles - 1:
            self._t += 1
            none = torch.zeros(b, n, device=self.device)
            obs = self._observe()
            return StepResult(
                obs,
                none,
                torch.zeros(b, n, dtype=torch.bool, device=self.device),
                torch.zeros(b, dtype=torch.bool, device=self.device),
                obs,
            )
        reward = (actions.view(b, n).long() == self._cue).float()
        final = self._observe()
        return StepResult(
            self.reset(),
            reward,
            torch.ones(b, n, dtype=torch.bool, device=self.device),
            torch.zeros(b, dtype=torch.bool, device=self.device),
            final,
        )
