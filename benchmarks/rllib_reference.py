"""RLlib's PPO on the same task, next to shoal in the same run: the gap shoal exists to close.

Run ``python -m benchmarks.rllib_reference`` (needs ``pip install -e '.[rllib]'``). RLlib's
PPO (new API stack, one shared policy for the 3 agents, as shoal shares its actor) trains on
real mpe2 ``simple_spread_v3`` through RLlib's ``ParallelPettingZooEnv`` for ``--seconds``,
with shoal's PPO settings where RLlib has them (gamma 0.95, 4 epochs, lr 3e-3, 64-wide MLP)
and large minibatches; RLlib's defaults (30 epochs of 128-sample minibatches) are several times
slower still. Then ``spread-mlp`` trains for the same wall time. Both final policies are
evaluated on the same 100 seeded episodes of real mpe2, sampling their actions.

Every result is one JSON line. env-steps are steps of one world (all agents), as everywhere in
shoal; RLlib counts them as ``num_env_steps_sampled_lifetime``.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import torch

from benchmarks.spread import TARGET_RETURN, emit, team_returns, train_and_evaluate

EPISODES = 100


def _rllib() -> tuple[Any, Any, Any, Any]:
    try:
        import ray
        from ray.rllib.algorithms.ppo import PPOConfig
        from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
        from ray.rllib.env.wrappers.pettingzoo_env import ParallelPettingZooEnv
    except ImportError as err:  # ray[rllib] is an optional extra
        raise SystemExit(
            f"RLlib is not installed ({err}); install it with: pip install -e '.[rllib]'"
        ) from None
    return ray, PPOConfig, DefaultModelConfig, ParallelPettingZooEnv


def rllib_ppo(seconds: float, env_runners: int, envs_per_runner: int) -> dict[str, Any]:
    """Train RLlib's PPO for ``seconds`` and evaluate it on real mpe2."""
    ray, ppo_config, model_config, parallel_env = _rllib()
    from mpe2 import simple_spread_v3
    from ray.tune.registry import register_env

    register_env(
        "mpe2-simple-spread",
        lambda _: parallel_env(simple_spread_v3.parallel_env(N=3, max_cycles=25)),
    )
    config = (
        ppo_config()
        .environment("mpe2-simple-spread")
        .env_runners(num_env_runners=env_runners, num_envs_per_env_runner=envs_per_runner)
        .multi_agent(policies={"shared"}, policy_mapping_fn=lambda *_, **__: "shared")
        .rl_module(model_config=model_config(fcnet_hiddens=[64, 64], fcnet_activation="tanh"))
        .training(
            gamma=0.95,
            lr=3e-3,
            train_batch_size_per_learner=4000,
            minibatch_size=1000,
            num_epochs=4,
        )
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        algo = config.build_algo()
        setup_s = time.perf_counter() - t0
        curve: list[dict[str, float]] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            runners = algo.train()["env_runners"]
            curve.append(
                {
                    "wall_time": time.perf_counter() - t0,
                    "env_steps": float(runners["num_env_steps_sampled_lifetime"]),
                    "train_return": float(runners.get("episode_return_mean", math.nan)),
                }
            )
        module = algo.get_module("shared")

        @torch.no_grad()
        def act(obs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            b, n, d = obs.shape
            out = module.forward_inference({"obs": obs.reshape(b * n, d).float()})
            probs = torch.softmax(out["action_dist_inputs"], dim=-1)
            return torch.multinomial(probs, 1, generator=gen).reshape(b, n)

        returns = team_returns(act, EPISODES)
        algo.stop()
    finally:
        ray.shutdown()
    return {"setup_s": setup_s, "curve": curve, "returns": returns}


def main(argv: list[str] | None = None) -> None:
    """Run RLlib's PPO, then shoal's spread-mlp, for the same wall time."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=120.0, help="training time of each")
    p.add_argument("--env-runners", type=int, default=1)
    p.add_argument("--envs-per-runner", type=int, default=8)
    args = p.parse_args(argv)

    rl = rllib_ppo(args.seconds, args.env_runners, args.envs_per_runner)
    last = rl["curve"][-1]
    reached = next((c for c in rl["curve"] if c["train_return"] >= TARGET_RETURN), None)
    emit(
        "rllib_ppo_env_steps_per_s",
        last["env_steps"] / last["wall_time"],
        "env_steps/s",
        env_runners=args.env_runners,
        envs_per_runner=args.envs_per_runner,
        train_seconds=round(last["wall_time"], 1),
        setup_seconds=round(rl["setup_s"], 1),
    )
    emit(
        "rllib_ppo_eval_team_return",
        float(rl["returns"].mean()),
        "team_return",
        stderr=float(rl["returns"].std() / math.sqrt(EPISODES)),
        episodes=EPISODES,
        env_steps=last["env_steps"],
        train_return=last["train_return"],
    )
    emit(
        "rllib_ppo_seconds_to_train_return_-45",
        reached["wall_time"] if reached else math.nan,
        "s",
        reached=reached is not None,
        what="mean team return of the training episodes (RLlib's own metric)",
    )

    shoal = train_and_evaluate("spread-mlp", args.seconds, [], eval_episodes=EPISODES)
    final = shoal["evals"][-1]
    emit(
        "shoal_spread_mlp_env_steps_per_s",
        shoal["sps"],
        "env_steps/s",
        vs_rllib=round(shoal["sps"] / (last["env_steps"] / last["wall_time"]), 1),
        train_seconds=round(shoal["summary"]["train_seconds"], 1),
        setup_seconds=round(shoal["setup_s"], 1),
    )
    emit(
        "shoal_spread_mlp_eval_team_return",
        final["mean"],
        "team_return",
        stderr=final["stderr"],
        episodes=EPISODES,
        env_steps=final["env_steps"],
    )
    emit(
        "shoal_spread_mlp_seconds_to_eval_return_-45",
        shoal["reached"]["wall_time"] if shoal["reached"] else math.nan,
        "s",
        reached=shoal["reached"] is not None,
        what="first checkpoint (every 10 s) whose evaluated team return is >= -45",
    )


if __name__ == "__main__":
    main()
