"""Agent groups: heterogeneous teams and predator-prey, each group with its own policy.

Run ``python -m benchmarks.groups`` (all, about 12 minutes on 2 cores) or ``--only
speaker_listener|tag|speed``. One JSON line per result, references measured in the same run:

- ``speaker_listener``: mpe2 ``simple_speaker_listener_v4`` (a speaker that sees the goal and
  a listener that moves, with different observation and action spaces) trained for
  ``--seconds`` with one padded shared policy (no ``groups``: the adapter pads observations
  and masks the actions an agent does not have) and with a group per agent, same settings and
  budget; each evaluated on the real env over 100 episodes, next to uniformly random actions.
- ``tag``: native ``simple_tag`` (3 predators, 1 prey, 2 obstacles). Predators trained for
  ``--seconds`` against frozen untrained prey (their action heads start near uniform): tags
  per episode against those prey, next to untrained predators'. Then prey trained for
  ``--seconds`` against those predators, frozen: the prey's return, next to untrained prey's.
- ``speed``: env-steps/s of the native port and of the PettingZoo adapter on mpe2's
  ``simple_tag_v3``, random actions, in turns.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

import envs
from agents.rollout import agent_returns
from benchmarks.spread import emit, steps_per_s
from envs.base import VecMultiAgentEnv
from orchestrator.cli.evaluate import evaluate
from orchestrator.config import load_config
from orchestrator.runtime.driver import run_training

SPEAKER_LISTENER = "pettingzoo:mpe2.simple_speaker_listener_v4"
TAG_REWARD = 10.0
EPISODES = 100
SEED = 12345


def _train(preset: str, overrides: list[str], seconds: float, root: Path, name: str) -> Path:
    run_dir = root / name
    run_dir.mkdir()
    cfg = load_config(
        preset,
        [*overrides, f"train.time_limit_s={seconds}", "run.progress=false", "redis.enabled=false",
         "run.eval_every_s=null", f"run.dir={root}", f"run.name={name}"],
    )  # fmt: skip
    run_training(cfg, run_dir)
    return run_dir


def _uniform_returns(env: VecMultiAgentEnv, episodes: int, seed: int) -> torch.Tensor:
    """Team returns of uniformly random actions, each agent over its own actions."""
    widths = torch.tensor([a.action_dim for a in env.agent_info()])
    gen = torch.Generator().manual_seed(seed)
    env.reset(seed=seed)
    running = torch.zeros(env.num_envs)
    out: list[float] = []
    while len(out) < episodes:
        u = torch.rand((env.num_envs, env.n_agents), generator=gen)
        res = env.step((u * widths).long())
        running += res.reward.sum(-1)
        for i in res.done.nonzero().flatten().tolist():
            out.append(float(running[i]))
            running[i] = 0.0
    return torch.tensor(out[:episodes])


def speaker_listener(seconds: float, num_envs: int, root: Path, ctx: dict[str, Any]) -> None:
    """One padded shared policy against a policy per agent, same budget."""
    base = [f"env.name={SPEAKER_LISTENER}", f"env.num_envs={num_envs}"]
    variants = {
        "shared_padded": base,
        "groups": [*base, "groups.speaker.share=true", "groups.listener.share=true"],
    }
    for label, overrides in variants.items():
        run_dir = _train("spread-mlp", overrides, seconds, root, f"sl-{label}")
        res = evaluate(run_dir, episodes=EPISODES, seed=SEED, which="latest")
        emit(
            f"speaker_listener_{label}_eval_team_return",
            res["mean"],
            "team_return",
            stderr=round(res["stderr"], 3),
            episodes=res["episodes"],
            env_steps=res["env_steps"],
            train_seconds=seconds,
            num_envs=num_envs,
            **ctx,
        )
    env = envs.make(SPEAKER_LISTENER, num_envs=min(EPISODES, 50), seed=SEED)
    random = _uniform_returns(env, EPISODES, SEED)
    env.close()
    emit(
        "speaker_listener_random_team_return",
        float(random.mean()),
        "team_return",
        stderr=round(float(random.std() / len(random) ** 0.5), 3),
        episodes=len(random),
        **ctx,
    )


def _tag_returns(run_dir: Path | None, overrides: list[str]) -> tuple[float, float, float]:
    """(predator tags per episode, prey return, its stderr) over ``EPISODES`` episodes, for a
    run's latest checkpoint or, without one, for untrained policies of ``overrides``."""
    cfg = load_config("tag-mlp", overrides)
    env = cfg.env.make(EPISODES, SEED, torch.device("cpu"))
    if run_dir is None:
        torch.manual_seed(cfg.train.seed)
        model = cfg.build_policy(env)
    else:
        from orchestrator.runtime.checkpoint import load_checkpoint, policy_from_checkpoint

        model = policy_from_checkpoint(load_checkpoint(run_dir))
    model.eval()
    per_agent = agent_returns(model, env, EPISODES, seed=SEED)
    env.close()
    a = env.num_adversaries  # type: ignore[attr-defined]
    tags = per_agent[:, 0] / TAG_REWARD  # every predator is paid for every tag
    prey = per_agent[:, a:].sum(-1)
    return float(tags.mean()), float(prey.mean()), float(prey.std() / len(prey) ** 0.5)


def tag(seconds: float, root: Path, ctx: dict[str, Any]) -> None:
    """Predators against frozen untrained prey, then prey against those predators."""
    predators = _train("tag-mlp", ["groups.agent.train=false"], seconds, root, "tag-predators")
    trained_tags, _, _ = _tag_returns(predators, [])
    untrained_tags, _, _ = _tag_returns(None, [])
    emit(
        "tag_predators_tags_per_episode",
        trained_tags,
        "tags/episode",
        untrained_predators=round(untrained_tags, 3),
        vs_untrained=round(trained_tags / max(untrained_tags, 1e-9), 2),
        train_seconds=seconds,
        episodes=EPISODES,
        **ctx,
    )
    prey = _train(
        "tag-mlp",
        ["groups.adversary.train=false", f"groups.adversary.init={predators}"],
        seconds,
        root,
        "tag-prey",
    )
    tags_after, trained_prey, stderr = _tag_returns(prey, [])
    # Untrained prey against the same trained predators: the first checkpoint of neither run
    # holds that pair, so load the predators into a fresh policy.
    cfg = load_config("tag-mlp")
    env = cfg.env.make(EPISODES, SEED, torch.device("cpu"))
    torch.manual_seed(cfg.train.seed)
    model = cfg.build_policy(env)
    from orchestrator.runtime.checkpoint import init_groups

    init_groups(model, {"adversary": str(predators)}, "cpu")
    model.eval()
    per_agent = agent_returns(model, env, EPISODES, seed=SEED)
    env.close()
    untrained_prey = per_agent[:, 3:].sum(-1)
    emit(
        "tag_prey_return_against_trained_predators",
        trained_prey,
        "return",
        stderr=round(stderr, 3),
        untrained_prey=round(float(untrained_prey.mean()), 3),
        untrained_prey_stderr=round(float(untrained_prey.std() / EPISODES**0.5), 3),
        tags_per_episode=round(tags_after, 3),
        tags_per_episode_untrained_prey=round(float(per_agent[:, 0].mean()) / TAG_REWARD, 3),
        train_seconds=seconds,
        episodes=EPISODES,
        **ctx,
    )


def speed(seconds: float, ctx: dict[str, Any]) -> None:
    """Native tag and the PettingZoo adapter on the same env, random actions, in turns."""
    native = envs.make("tag", num_envs=512, seed=0)
    adapter = envs.make("pettingzoo:mpe2.simple_tag_v3", num_envs=64, seed=0)
    gen = torch.Generator().manual_seed(0)
    best = {"native": 0.0, "adapter": 0.0}
    for _ in range(3):
        for label, env in (("native", native), ("adapter", adapter)):
            env.reset(seed=0)

            def step(e: VecMultiAgentEnv = env) -> None:
                e.step(e.random_actions(gen))

            best[label] = max(best[label], steps_per_s(step, env.num_envs, seconds))
    adapter.close()
    emit(
        "tag_native_env_steps_per_s",
        best["native"],
        "env_steps/s",
        pettingzoo_adapter=round(best["adapter"], 1),
        vs_adapter=round(best["native"] / best["adapter"], 1),
        num_envs=512,
        adapter_num_envs=64,
        **ctx,
    )


def main(argv: list[str] | None = None) -> None:
    """Run the agent-group benchmarks."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--only", choices=["speaker_listener", "tag", "speed"], help="a subset")
    p.add_argument("--seconds", type=float, default=120.0, help="training budget per run")
    p.add_argument("--sl-envs", type=int, default=64, help="speaker-listener sub-envs")
    args = p.parse_args(argv)
    ctx = {"machine": platform.machine()}
    with tempfile.TemporaryDirectory(prefix="shoal-groups-") as tmp:
        root = Path(tmp)
        if args.only in (None, "speed"):
            speed(3.0, ctx)
        if args.only in (None, "tag"):
            tag(args.seconds, root, ctx)
        if args.only in (None, "speaker_listener"):
            speaker_listener(args.seconds, args.sl_envs, root, ctx)


if __name__ == "__main__":
    main()
