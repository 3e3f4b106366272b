"""The training loop every learner rank runs: collect, learn, log, checkpoint, repeat.

:func:`run_loop` runs inside the learner process: the ``shoal run`` process itself for an
in-process run, each ``shoal-learner-<r>`` Ray actor otherwise. What differs between paths is
passed in (where batches come from, who applies the update, how ranks agree to stop), never
the bookkeeping.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import Config
from orchestrator.runtime.metrics import Fall, Metrics


class FatalRunError(RuntimeError):
    """A failure that restarting the learner group cannot fix (Redis gone, a worker lost)."""


def redis_outage(uses_redis: bool) -> tuple[type[BaseException], ...]:
    """What to catch as "Redis stayed unreachable": nothing for a process without Redis.

    Imported only when used, so a run without Redis needs no Redis client installed.
    """
    if not uses_redis:
        return ()
    from agents.memory import RedisUnavailable

    return (RedisUnavailable,)


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


def _lr_frac(cfg: Config, env_steps: int, elapsed: float, time_limit_s: float | None) -> float:
    """The learning rate's share left: 1, or with ``train.lr_decay`` linear to 0 at the budget.

    The budget is whichever ends the run first, ``train.total_env_steps`` or the time limit,
    so a run cut by time anneals fully instead of stopping at a high learning rate.
    """
    if not cfg.train.lr_decay:
        return 1.0
    done = env_steps / cfg.train.total_env_steps
    if time_limit_s is not None:
        done = max(done, elapsed / time_limit_s)
    return max(1.0 - done, 0.0)


def _same(reason: str | None) -> str | None:
    return reason


def crossed(every: int | None, env_steps: int, steps: int) -> bool:
    """Whether the last ``steps`` took the counter past a multiple of ``every``."""
    return every is not None and env_steps // every > (env_steps - steps) // every


def _fall(counters: dict[str, Any], key: str) -> Fall:
    best, largest = counters.get(key, (None, 0.0))
    return Fall((best, float(largest)))


def run_loop(
    cfg: Config,
    counters: dict[str, Any],
    step: Step,
    metrics: Metrics,
    checkpoint: Callable[[], Path] | None,
    should_stop: Callable[[], str | None] = lambda: None,
    agree: Callable[[str | None], str | None] = _same,
    time_limit_s: float | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    film: Callable[[], float] | None = None,
    fatal: tuple[type[BaseException], ...] = (FatalRunError,),
) -> LoopResult:
    """Collect, learn, log, checkpoint, repeat, until a stop condition holds.

    Args:
        cfg: the run config (``train.total_env_steps``, ``run.log_every_s``, ...).
        counters: ``env_steps``, ``iteration``, ``wall_time`` and any extra counters; updated
            in place and saved with every checkpoint.
        step: one iteration (see :data:`Step`).
        metrics: where rows go, at most every ``run.log_every_s``; its owner closes it.
        checkpoint: writes a checkpoint; ``None`` on ranks that do not write.
        should_stop: polled every iteration; a reason string ends the run cleanly.
        agree: turns this process's stop reason into the one every rank acts on (identity
            on one rank; a broadcast from rank 0 in a learner group).
        time_limit_s: stop after this many seconds of this loop.
        evaluate: called each time the env-step counter passes a multiple of
            ``run.eval_every_steps`` (rank 0); without it every ``run.eval_every_s``, or less
            often when its ``eval_s`` is more than a tenth of that. Its statistics join that
            iteration's row, which is logged whatever ``run.log_every_s`` says.
        film: writes a video of the current policy and returns the seconds it took; called
            every ``run.render_every_s`` (rank 0), spaced like ``evaluate``, and once more when
            the run ends other than by an interrupt or a failure.
        fatal: failures that end the run between whole iterations (a service lost for good):
            the state is whole, so it is checkpointed before the error goes on, as a
            :class:`FatalRunError` that says where. Any other failure keeps the last good
            checkpoint instead.

    Returns:
        Why it stopped, the last checkpoint written, the loop's duration and start counter.
    """
    total = cfg.train.total_env_steps
    t_start = time.monotonic()
    wall0 = float(counters["wall_time"])
    start_steps = int(counters["env_steps"])
    start_iteration = int(counters["iteration"])
    last_ckpt = last_log = last_eval = t_start
    eval_every = cfg.run.eval_every_s or 0.0
    last_film, film_every = t_start, cfg.run.render_every_s or 0.0
    window_steps, window_t = 0, t_start
    reason = "total_env_steps reached"
    ckpt_path: Path | None = None
    pending: dict[str, float] | None = None
    failed = False
    # Stability as it happens: every iteration's training return, not only logged rows.
    train_fall, eval_fall = _fall(counters, "return_fall"), _fall(counters, "eval_return_fall")
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
                steps, stats = step(_lr_frac(cfg, counters["env_steps"], elapsed, time_limit_s))
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
                row["return_fall"] = train_fall.add(row.get("episode_return", math.nan))
                counters["return_fall"] = train_fall.state
                by_steps = cfg.run.eval_every_steps
                due = (
                    crossed(by_steps, counters["env_steps"], steps)
                    if by_steps is not None
                    else now - last_eval >= eval_every
                )
                evaluated = evaluate is not None and due
                if evaluate is not None and evaluated:
                    row.update(evaluate())
                    row["eval_return_fall"] = eval_fall.add(row["eval_return"])
                    counters["eval_return_fall"] = eval_fall.state
                    last_eval = time.monotonic()
                    # On an env stepped in a Python loop an evaluation can cost seconds: space
                    # them so they never take more than a tenth of the run.
                    eval_every = max(cfg.run.eval_every_s or 0.0, 10 * row.get("eval_s", 0.0))
                if film is not None and now - last_film >= film_every:
                    film_every = max(cfg.run.render_every_s or 0.0, 10 * film())
                    last_film = time.monotonic()
                pending = row
                if evaluated or now - last_log >= cfg.run.log_every_s:
                    metrics.log(row)
                    pending = None
                    last_log, window_steps, window_t = now, 0, now
                ckpt_due = crossed(cfg.run.checkpoint_every_steps, counters["env_steps"], steps)
                if checkpoint is not None and (
                    ckpt_due or now - last_ckpt >= cfg.run.checkpoint_every_s
                ):
                    ckpt_path = checkpoint()
                    last_ckpt = now
    except KeyboardInterrupt:
        reason = "interrupted"
    except fatal as err:
        failed = True
        if checkpoint is None or counters["iteration"] == start_iteration:
            raise
        ckpt_path = checkpoint()
        raise FatalRunError(
            f"{err}; what the run learned up to env step {int(counters['env_steps']):,} is "
            f"saved in {ckpt_path} (shoal run --resume continues from it)"
        ) from None
    except BaseException:
        failed = True  # the state may be half-updated: keep the last good checkpoint
        raise
    finally:
        if pending is not None:
            metrics.log(pending)
        if metrics.latest and checkpoint is not None and not failed:
            ckpt_path = checkpoint()
        if film is not None and not failed and reason != "interrupted" and metrics.latest:
            film()  # the policy the run ends with
    return LoopResult(reason, ckpt_path, time.monotonic() - t_start, start_steps, metrics.latest)
