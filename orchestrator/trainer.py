"""The training loop: collect, learn, log, checkpoint, repeat.

:func:`run_loop` is the one loop every path runs. This module also holds the in-process path
(``rollout.num_workers=0``, one learner rank, no Ray); each rank of a distributed run calls
the same loop with a ``step`` that gathers batches from rollout actors and updates through
DDP, so the Ray path swaps where batches come from and who applies the update, not the
algorithm or the bookkeeping.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import envs
from agents.ppo import Learner
from agents.rollout import RolloutBatch, RolloutWorker
from envs.base import VecMultiAgentEnv
from orchestrator.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    set_rng_state,
)
from orchestrator.config import Config, config_to_yaml
from orchestrator.metrics import CSVSink, Metrics, MetricsSink, ProgressSink
from policies.actor_critic import ActorCritic, PolicySpec

log = logging.getLogger(__name__)


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={spec} but CUDA is not available; use train.device=cpu")
    return device


def build_env(cfg: Config, num_envs: int, seed: int, device: torch.device) -> VecMultiAgentEnv:
    """The configured env with ``num_envs`` sub-envs."""
    e = cfg.env
    if e.name.startswith(("pettingzoo:", "rllib:")):  # adapters: kwargs go to the env as given
        return envs.make(e.name, num_envs=num_envs, seed=seed, device=device, **e.kwargs)
    settings: dict[str, Any] = {"continuous_actions": e.continuous_actions}
    if e.name.startswith("vmas:"):
        # VMAS calls the time limit max_steps; team sizes are scenario arguments with their
        # own names (n_agents, n_blue_agents, ...), so they stay in env.kwargs.
        settings["max_steps"] = e.max_cycles
    else:
        settings.update(n_agents=e.n_agents, max_cycles=e.max_cycles, local_ratio=e.local_ratio)
    return envs.make(e.name, num_envs=num_envs, seed=seed, device=device, **settings, **e.kwargs)


def policy_spec(cfg: Config, env: VecMultiAgentEnv) -> PolicySpec:
    """Policy dimensions from the env, architecture from the config."""
    m = cfg.model
    return PolicySpec(
        kind=m.kind,
        obs_dim=env.obs_dim,
        state_dim=env.state_dim,
        node_dim=env.node_dim,
        action_kind=env.action_kind,
        action_dim=env.action_dim,
        centralised=m.critic == "centralised",
        critic_kind=m.critic_kind,
        hidden=m.hidden,
        layers=m.layers,
        heads=m.heads,
        edges=m.edges,
        radius=m.radius,
        k=m.k,
    )


def new_run_dir(cfg: Config) -> Path:
    """``<run.dir>/<run.name or preset-timestamp>``, created."""
    name = cfg.run.name or f"{cfg.preset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path = Path(cfg.run.dir) / name
    suffix = 1
    while path.exists() and cfg.run.name is None:
        path = Path(cfg.run.dir) / f"{name}-{suffix}"
        suffix += 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def batch_metrics(batch: RolloutBatch) -> dict[str, float]:
    """Episode statistics of a batch (NaN when no episode finished in it)."""
    r = batch.episode_returns
    return {
        "episode_return": float(r.mean()) if r.numel() else math.nan,
        "episode_length": float(batch.episode_lengths.float().mean()) if r.numel() else math.nan,
        "episodes": float(r.numel()),
    }


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C so the loop saves a checkpoint before exiting."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


Step = Callable[[float], tuple[int, dict[str, float]]]
"""One iteration: collect and learn with the learning rate scaled by the given fraction;
returns the env steps it trained on (summed over learner ranks) and its statistics."""


@dataclass
class LoopResult:
    """How a training loop ended."""

    reason: str
    checkpoint: Path | None
    seconds: float
    start_steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def _same(reason: str | None) -> str | None:
    return reason


def run_loop(
    cfg: Config,
    counters: dict[str, Any],
    step: Step,
    metrics: Metrics,
    checkpoint: Callable[[], Path] | None,
    should_stop: Callable[[], str | None] = lambda: None,
    agree: Callable[[str | None], str | None] = _same,
    time_limit_s: float | None = None,
) -> LoopResult:
    """Collect, learn, log, checkpoint, repeat: the loop every execution path runs.

    In-process training calls it once; each learner rank of a distributed run calls it with
    its own ``step``, so all ranks take the same decisions from the same counters.

    Args:
        cfg: the run config (``train.total_env_steps``, ``run.log_every_s``, ...).
        counters: ``env_steps``, ``iteration``, ``wall_time`` and any extra counters; updated
            in place and saved with every checkpoint.
        step: one iteration (see :data:`Step`).
        metrics: where rows go, at most every ``run.log_every_s``; closed at the end.
        checkpoint: writes a checkpoint; ``None`` on ranks that do not write.
        should_stop: polled every iteration; a reason string ends the run cleanly.
        agree: turns this process's stop reason into the one every rank acts on (identity
            in-process; a broadcast from rank 0 in a learner group).
        time_limit_s: stop after this many seconds of this loop.

    Returns:
        Why it stopped, the last checkpoint written, the loop's duration and start counter.
    """
    total = cfg.train.total_env_steps
    t_start = time.monotonic()
    wall0 = float(counters["wall_time"])
    start_steps = int(counters["env_steps"])
    last_ckpt = last_log = t_start
    window_steps, window_t = 0, t_start
    reason = "total_env_steps reached"
    ckpt_path: Path | None = None
    pending: dict[str, float] | None = None
    failed = False
    try:
        with sigterm_as_interrupt():
            while counters["env_steps"] < total:
                elapsed = time.monotonic() - t_start
                local: str | None = None
                if time_limit_s is not None and elapsed >= time_limit_s:
                    local = "time limit reached"
                else:
                    local = should_stop()
                stop = agree(local)
                if stop is not None:
                    reason = stop
                    break
                frac = 1.0 - counters["env_steps"] / total if cfg.train.lr_decay else 1.0
                steps, stats = step(max(frac, 0.0))
                counters["env_steps"] += steps
                counters["iteration"] += 1
                now = time.monotonic()
                counters["wall_time"] = wall0 + now - t_start
                window_steps += steps
                row = {
                    "iteration": float(counters["iteration"]),
                    "env_steps": float(counters["env_steps"]),
                    "wall_time": counters["wall_time"],
                    "env_steps_per_s": window_steps / max(now - window_t, 1e-9),
                    **stats,
                }
                pending = row
                if now - last_log >= cfg.run.log_every_s:
                    metrics.log(row)
                    pending = None
                    last_log, window_steps, window_t = now, 0, now
                if checkpoint is not None and now - last_ckpt >= cfg.run.checkpoint_every_s:
                    ckpt_path = checkpoint()
                    last_ckpt = now
    except KeyboardInterrupt:
        reason = "interrupted"
    except BaseException:
        failed = True  # the state may be half-updated: keep the last good checkpoint
        raise
    finally:
        if pending is not None:
            metrics.log(pending)
        if metrics.latest and checkpoint is not None and not failed:
            ckpt_path = checkpoint()
        metrics.close()
    return LoopResult(reason, ckpt_path, time.monotonic() - t_start, start_steps, metrics.latest)


class LocalTrainer:
    """In-process training: one ``RolloutWorker`` and one ``Learner`` sharing one model.

    Args:
        cfg: the run config.
        run_dir: where config, metrics and checkpoints go.
        resume: a checkpoint (or run directory) to continue from.
        console: rich console for the progress bar.
        extra_sinks: more metric destinations (e.g. Ray metrics, Redis run state).
        should_stop: polled each iteration; true ends the run cleanly with a checkpoint.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        resume: str | Path | None = None,
        console: Console | None = None,
        extra_sinks: list[MetricsSink] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.console = console or Console(stderr=True)
        self.device = resolve_device(cfg.train.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        self.env = build_env(cfg, cfg.env.num_envs, cfg.train.seed, self.device)
        self.model = ActorCritic(policy_spec(cfg, self.env)).to(self.device)
        self.learner = Learner(self.model, cfg.train.ppo())
        self.counters: dict[str, Any] = {"env_steps": 0, "iteration": 0, "wall_time": 0.0}
        self.resumed = resume is not None
        if resume is not None:
            self._restore(resume)
        self.worker = RolloutWorker(
            self.env,
            self.model,
            cfg.train.rollout_len,
            seed=cfg.train.seed + self.counters["iteration"],
        )
        self.config_yaml = config_to_yaml(cfg)
        (run_dir / "config.yaml").write_text(self.config_yaml)
        self.extra_sinks = extra_sinks or []
        self.should_stop = should_stop or (lambda: False)

    def _restore(self, resume: str | Path) -> None:
        ckpt = load_checkpoint(resume, self.device)
        self.model.load_state_dict(ckpt["model"])
        self.learner.load_state_dict(ckpt["learner"])
        set_rng_state(ckpt["rng"])
        self.counters.update(ckpt["meta"]["counters"])
        log.info("resumed from %s at %s env steps", ckpt["path"], self.counters["env_steps"])

    def checkpoint(self) -> Path:
        """Write a checkpoint of the current state."""
        return save_checkpoint(
            self.run_dir / "checkpoints",
            model=self.model,
            learner_state=self.learner.state_dict(),
            counters=dict(self.counters),
            config_yaml=self.config_yaml,
            keep=self.cfg.run.keep_checkpoints,
        )

    def step(self, lr_frac: float) -> tuple[int, dict[str, float]]:
        """Collect one batch and learn from it; ``collect_s``/``update_s`` say where time went."""
        t0 = time.perf_counter()
        batch = self.worker.collect()
        t1 = time.perf_counter()
        stats = self.learner.update(batch, lr_frac=lr_frac)
        timing = {"collect_s": t1 - t0, "update_s": time.perf_counter() - t1}
        return batch.env_steps, {**batch_metrics(batch), **stats, **timing}

    def train(self) -> dict[str, Any]:
        """Run until ``train.total_env_steps``, ``train.time_limit_s``, a stop request or Ctrl-C.

        Returns:
            A summary: final counters, last metrics, checkpoint path, why it stopped.
        """
        cfg = self.cfg
        csv_sink = CSVSink(self.run_dir / "metrics.csv")
        if self.resumed:
            csv_sink.truncate(self.counters["env_steps"])
        sinks: list[MetricsSink] = [csv_sink, *self.extra_sinks]
        if cfg.run.progress:
            sinks.append(
                ProgressSink(cfg.train.total_env_steps, self.counters["env_steps"], self.console)
            )
        res = run_loop(
            cfg,
            self.counters,
            self.step,
            Metrics(sinks),
            self.checkpoint,
            should_stop=lambda: "stop requested" if self.should_stop() else None,
            time_limit_s=cfg.train.time_limit_s,
        )
        return {
            "reason": res.reason,
            "counters": dict(self.counters),
            "metrics": res.metrics,
            "checkpoint": str(res.checkpoint) if res.checkpoint else None,
            "run_dir": str(self.run_dir),
            "train_seconds": res.seconds,
            "steps_this_session": int(self.counters["env_steps"]) - res.start_steps,
            "checkpoints": [str(p) for p in list_checkpoints(self.run_dir / "checkpoints")],
        }
