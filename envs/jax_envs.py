"""JaxMARL envs (SMAX, ...) behind the ``VecMultiAgentEnv`` contract: ``jaxmarl:<env>[:<map>]``.

``B`` worlds are one ``jax.vmap`` of the env's own ``reset`` and ``step_env``, jitted, and the
results reach torch through DLPack (no copy where the devices allow). JaxMARL's ``step``
auto-resets and loses the final observation, so the adapter calls ``step_env``, keeps the
final view, and resets finished worlds itself inside the same jitted call.

``jaxmarl:smax:3m`` is SMAX's ``3m`` map against JaxMARL's heuristic enemy
(``HeuristicEnemySMAX``, what JaxMARL's own SMAX baselines train against); any other
``jaxmarl:<env id>`` is ``jaxmarl.make(env_id, **env.kwargs)``. On SMAX the available actions
(``get_avail_actions``, after the step) become ``action_mask``, dead allies are not ``alive``,
and the global state is ``obs["world_state"]``. Reaching ``max_steps`` with both sides
standing is a truncation (bootstrapped), a side wiped out a real end; on other envs a ``done``
at the env's ``max_steps`` is a truncation.

Needs the ``jaxmarl`` extra (Python >= 3.11); nothing else in shoal imports jax.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from envs.base import EnvError, Observation, StepResult, VecMultiAgentEnv

SMAX_ALIASES = {"smax": "HeuristicEnemySMAX"}


def split_keys(key: Any, num_envs: int) -> tuple[Any, Any]:
    """The next key and ``num_envs`` keys for this call's worlds (the adapter's schedule)."""
    import jax

    key, sub = jax.random.split(key)
    return key, jax.random.split(sub, num_envs)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Standard output (the file descriptor: JaxMARL's imports bypass ``sys.stdout``) muted."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _to_torch(x: Any, device: torch.device) -> Tensor:
    t = torch.from_dlpack(x)
    return t if t.device == device else t.to(device)


class JaxMarlVecEnv(VecMultiAgentEnv):
    """``num_envs`` worlds of a JaxMARL env, vmapped and jitted.

    Args:
        spec: ``<env id>[:<map>]``: ``smax:3m``, ``HeuristicEnemySMAX:2s3z``, or any id
            ``jaxmarl.make`` knows.
        num_envs: ``B``.
        seed: the PRNG seed (worlds draw their own keys from it).
        device: where returned tensors live.
        **kwargs: the env's own arguments (``jaxmarl.make(id, **kwargs)``).
    """

    def __init__(
        self,
        spec: str,
        num_envs: int = 1,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> None:
        try:
            import jax
            import jax.numpy as jnp

            with _quiet_stdout():  # it prints what it imports
                import jaxmarl
                import jaxmarl.environments  # noqa: F401
        except ImportError as e:
            raise EnvError(
                f"jaxmarl:{spec} needs JaxMARL (Python >= 3.11): pip install 'shoal[jaxmarl]' ({e})"
            ) from None
        env_id, _, map_name = spec.partition(":")
        env_id = SMAX_ALIASES.get(env_id.lower(), env_id)
        if map_name:
            from jaxmarl.environments.smax import map_name_to_scenario
            from jaxmarl.environments.smax.smax_env import MAP_NAME_TO_SCENARIO

            if map_name not in MAP_NAME_TO_SCENARIO:
                maps = ", ".join(sorted(MAP_NAME_TO_SCENARIO))
                raise EnvError(f"unknown SMAX map '{map_name}'; maps: {maps}")
            kwargs["scenario"] = map_name_to_scenario(map_name)
        if env_id not in jaxmarl.registered_envs:
            raise EnvError(
                f"unknown JaxMARL env '{env_id}'; e.g. smax:3m, smax:2s3z, "
                f"{', '.join(jaxmarl.registered_envs[:6])}"
            )
        env: Any = jaxmarl.make(env_id, **kwargs)
        self.env = env
        self.agents: list[str] = list(env.agents)
        self.num_envs, self.n_agents = num_envs, len(self.agents)
        self.device = torch.device(device)
        obs_dims = [int(np.prod(env.observation_space(a).shape)) for a in self.agents]
        self.obs_dim = max(obs_dims)
        acts = [env.action_space(a) for a in self.agents]
        if all(hasattr(a, "n") for a in acts):
            self.action_kind = "discrete"
            self.action_dim = max(int(a.n) for a in acts)
        else:
            self.action_kind = "continuous"
            self.action_dim = max(int(np.prod(a.shape)) for a in acts)
            self.action_low = float(min(np.min(a.low) for a in acts))
            self.action_high = float(max(np.max(a.high) for a in acts))
        self.max_episode_steps = getattr(env, "max_steps", None)
        inner = getattr(env, "_env", env)  # EnemySMAX wraps an SMAX
        self._smax = type(inner).__name__ == "SMAX"
        n_allies = getattr(env, "num_allies", self.n_agents)
        agents, limit = self.agents, self.max_episode_steps
        has_masks = hasattr(env, "get_avail_actions")

        def pad(x: Any, width: int) -> Any:
            x = jnp.reshape(x, (-1,)).astype(jnp.float32)
            return jnp.pad(x, (0, width - x.shape[0]))

        def view(obs: dict[str, Any], st: Any) -> dict[str, Any]:
            o = jnp.stack([pad(obs[a], self.obs_dim) for a in agents])
            state = obs["world_state"] if "world_state" in obs else o
            out = {"obs": o, "state": jnp.reshape(state, (-1,)).astype(jnp.float32)}
            if self._smax:
                out["alive"] = st.state.unit_alive[:n_allies].astype(jnp.uint8)
            else:
                out["alive"] = jnp.ones(len(agents), jnp.uint8)
            if has_masks and self.action_kind == "discrete":
                avail = env.get_avail_actions(st)
                out["mask"] = jnp.stack(
                    [jnp.pad(avail[a], (0, self.action_dim - avail[a].shape[0])) for a in agents]
                ).astype(jnp.uint8)
            return out

        def reset_one(key: Any) -> tuple[Any, dict[str, Any]]:
            obs, st = env.reset(key)
            return (st, jnp.int32(0)), view(obs, st)

        def step_one(key: Any, carry: Any, action: Any) -> tuple[Any, ...]:
            st, t = carry
            k_step, k_reset = jax.random.split(key)
            acts = {a: action[i] for i, a in enumerate(agents)}
            stepped: Any = env.step_env(k_step, st, acts)
            obs, st2, rew, dones, _ = stepped
            t = t + 1
            final = view(obs, st2)
            done = dones["__all__"]
            if self._smax:
                alive = st2.state.unit_alive
                real = ~alive[:n_allies].any() | ~alive[n_allies:].any()
            elif limit is not None:
                real = t < limit
            else:
                real = jnp.bool_(True)
            truncated = done & ~real
            # A real end ends every agent (SMAX reports a surviving ally of a won battle as
            # not done); a dead agent's own done ends it alone.
            terminated = (jnp.stack([dones[a] for a in agents]) | (done & real)) & ~truncated
            reward = jnp.stack([jnp.asarray(rew[a], jnp.float32) for a in agents])
            (st_re, _), obs_re = reset_one(k_reset)
            pick = lambda x, y: jax.lax.select(done, x, y)  # noqa: E731
            carry2 = (jax.tree.map(pick, st_re, st2), jnp.where(done, 0, t))
            nxt = jax.tree.map(pick, obs_re, final)
            flags = {
                "terminated": terminated.astype(jnp.uint8),
                "truncated": truncated.astype(jnp.uint8),
            }
            return carry2, final, nxt, reward, flags

        self._reset = jax.jit(jax.vmap(reset_one))
        self._step = jax.jit(jax.vmap(step_one))
        self._jnp = jnp
        self._key = jax.random.PRNGKey(0 if seed is None else seed)
        # Shapes by tracing alone: compiling waits for the first reset (or step).
        _, shapes = jax.eval_shape(self._reset, split_keys(self._key, num_envs)[1])
        self.state_dim = int(shapes["state"].shape[1])
        self.node_dim, self.n_nodes = self.obs_dim, self.n_agents
        self._carry: Any = None

    def _observation(self, parts: dict[str, Any]) -> Observation:
        obs = _to_torch(parts["obs"], self.device)
        b, n = self.num_envs, self.n_agents
        alive = _to_torch(parts["alive"], self.device).bool()
        mask = _to_torch(parts["mask"], self.device).bool() if "mask" in parts else None
        return Observation(
            obs=obs,
            state=_to_torch(parts["state"], self.device),
            alive=alive,
            nodes=obs,
            node_pos=torch.zeros(b, n, 2, device=self.device),
            node_type=torch.zeros(b, n, dtype=torch.long, device=self.device),
            node_mask=alive.clone(),
            action_mask=mask,
        )

    def reset(self, seed: int | None = None) -> Observation:
        """Reset every world; a seed restarts the key schedule."""
        import jax

        if seed is not None:
            self._key = jax.random.PRNGKey(seed)
        self._key, keys = split_keys(self._key, self.num_envs)
        self._carry, parts = self._reset(keys)
        return self._observation(parts)

    def step(self, actions: Tensor) -> StepResult:
        """Step every world; finished ones are reset and their final view kept."""
        if self._carry is None:
            self.reset()
        acts = self._jnp.asarray(actions.detach().cpu().numpy())
        if self.action_kind == "continuous":
            acts = self._jnp.clip(acts, self.action_low, self.action_high)
        self._key, keys = split_keys(self._key, self.num_envs)
        self._carry, final, nxt, reward, flags = self._step(keys, self._carry, acts)
        return StepResult(
            observation=self._observation(nxt),
            reward=_to_torch(reward, self.device),
            terminated=_to_torch(flags["terminated"], self.device).bool(),
            truncated=_to_torch(flags["truncated"], self.device).bool(),
            final=self._observation(final),
        )
