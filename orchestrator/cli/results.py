"""Commands that read a run's results: ``shoal eval``, ``plot``, ``render`` and ``dream``.

Each takes a run (its id or directory) or a checkpoint; a missing run or a damaged checkpoint is
one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from orchestrator.cli.output import EXIT_OK, EXIT_USAGE, console
from orchestrator.cli.output import fail as _fail
from orchestrator.cli.output import message as _message
from orchestrator.runtime.rundir import find_run

__all__ = ["register_cli"]


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a checkpoint and print mean team return ± standard error."""
    from orchestrator.cli.evaluate import evaluate

    if args.cross_play:
        return _cross_play(args)
    try:
        res = evaluate(
            find_run(args.checkpoint),
            env_name=args.env,
            n_agents=args.n_agents,
            episodes=args.episodes,
            greedy=args.greedy,
            seed=args.seed,
            which=args.which,
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail(_message(e), EXIT_USAGE)
    which = {"best": "the best checkpoint", "latest": "the latest checkpoint"}
    console.print(
        f"team return {res['mean']:.2f} ± {res['stderr']:.2f} (stderr) over {res['episodes']} "
        f"episodes, N={res['n_agents']}, env={res['env']}, "
        f"{which.get(res['which'], 'checkpoint')} at {res['env_steps']:,} env steps "
        f"({res['checkpoint']})",
        highlight=False,
        soft_wrap=True,
    )
    for name, g in res.get("groups", {}).items():
        console.print(
            f"  group {name}: return {g['mean']:.2f} ± {g['stderr']:.2f}", highlight=False
        )
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if k != "returns"}))  # noqa: T201
    return EXIT_OK


def _cross_play(args: argparse.Namespace) -> int:
    """``shoal eval RUN --cross-play``: a table per group of checkpoints against each other."""
    from rich.table import Table

    from orchestrator.cli.evaluate import cross_play

    try:
        res = cross_play(find_run(args.checkpoint), episodes=args.episodes, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        return _fail(_message(e), EXIT_USAGE)
    steps = [f"{s:,}" for s in res["checkpoints"]]
    row_group = res["groups"][0]
    for name in res["groups"]:
        table = Table(
            title=f"{name} return: rows = {row_group} at env step, columns = the other groups at",
            title_justify="left",
        )
        table.add_column(row_group)
        for label in steps:
            table.add_column(label, justify="right")
        for label, cells in zip(steps, res["table"][name], strict=True):
            table.add_row(label, *(f"{v:.2f}" for v in cells))
        console.print(table)
    if args.json:
        print(json.dumps(res))  # noqa: T201
    return EXIT_OK


def cmd_dream(args: argparse.Namespace) -> int:
    """Compare a run's world model with the real env; print k-step errors, write a picture."""
    from orchestrator.cli.dream import dream

    try:
        res = dream(
            find_run(args.run), steps=args.steps, worlds=args.worlds, which=args.which,
            out=args.out, start_step=args.start_step,
        )  # fmt: skip
    except (FileNotFoundError, ValueError) as e:
        return _fail(_message(e), EXIT_USAGE)
    errors = res["errors"]
    shown = [k for k in (1, 5, 15, args.steps) if k <= args.steps]
    console.print(
        f"{res['measure']} error after k dreamed steps ({args.worlds} real episodes, "
        f"{res['checkpoint']}):",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"  {'k':<18}" + "".join(f"{k:>9}" for k in dict.fromkeys(shown)), highlight=False
    )
    for name, values in errors.items():
        cells = "".join(f"{values[k - 1]:>9.4f}" for k in dict.fromkeys(shown))
        console.print(f"  {name.replace('_', ' '):<18}{cells}", highlight=False)
    console.print(f"wrote {res['picture']}", highlight=False, soft_wrap=True)
    return EXIT_OK


def cmd_plot(args: argparse.Namespace) -> int:
    """Write the learning curves of one or several runs, with random and no-op lines."""
    from orchestrator.cli.evaluate import plot_runs

    try:
        runs = [find_run(r) for r in args.runs]
        out = plot_runs(runs, args.out, references=not args.no_references)
    except (FileNotFoundError, ValueError) as e:
        return _fail(_message(e), EXIT_USAGE)
    console.print(f"wrote {out}")
    return EXIT_OK


def cmd_render(args: argparse.Namespace) -> int:
    """Draw an episode of a run's policy into a GIF or MP4."""
    from orchestrator.cli.render import render

    try:
        res = render(
            find_run(args.run),
            out=args.out,
            n_agents=args.n_agents,
            seed=args.seed,
            greedy=args.greedy,
            which=args.which,
            fps=args.fps,
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail(_message(e), EXIT_USAGE)
    console.print(
        f"wrote {res['out']}: {res['frames']} frames, team return {res['team_return']:.2f} "
        f"({res['checkpoint']})",
        highlight=False,
        soft_wrap=True,
    )
    return EXIT_OK


def register_cli(sub: Any) -> None:
    """Add ``eval``, ``plot``, ``render`` and ``dream`` to the ``shoal`` parser."""
    ev = sub.add_parser("eval", help="evaluate a checkpoint (default: on real mpe2)")
    ev.add_argument(
        "checkpoint", help="checkpoint directory, or a run's id or directory (newest checkpoint)"
    )
    ev.add_argument(
        "--env",
        help="env to evaluate on (default: the real mpe2 env for runs on spread, else the "
        "run's own env)",
    )
    ev.add_argument("--n-agents", type=int, help="team size (graph/transformer policies)")
    ev.add_argument("--episodes", type=int, default=100, help="episodes (default 100)")
    ev.add_argument("--greedy", action="store_true", help="most likely action, not sampled")
    ev.add_argument("--seed", type=int, default=12345)
    ev.add_argument(
        "--which",
        choices=["best", "latest"],
        help="for a run: its best evaluated checkpoint or its latest (default: best if the run "
        "kept one, else latest)",
    )
    ev.add_argument(
        "--cross-play",
        action="store_true",
        help="agent-group runs: play every kept checkpoint's first group against every "
        "checkpoint's other groups, a table per group",
    )
    ev.add_argument("--json", action="store_true", help="also print a JSON line")
    ev.set_defaults(func=cmd_eval)

    pl = sub.add_parser(
        "plot", help="write a PNG of one or several runs' learning curves (steps and wall time)"
    )
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run ids or directories")
    pl.add_argument(
        "--out",
        help="PNG path (default RUN/learning_curve.png for one run, comparison.png beside the "
        "first run for several)",
    )
    pl.add_argument(
        "--no-references",
        action="store_true",
        help="leave out the random-action and no-op lines (which play 100 episodes per env)",
    )
    pl.set_defaults(func=cmd_plot)

    rd = sub.add_parser(
        "render",
        help="draw an episode of a run's policy into a GIF or MP4",
        description="Play one episode of a run's policy on its own env (native spread and tag, "
        "mpe2-spread, VMAS) and write it as a GIF or MP4, the team return on every frame.",
    )
    rd.add_argument("run", metavar="RUN", help="run id or directory, or a checkpoint directory")
    rd.add_argument("--out", help=".gif or .mp4 path (default RUN/episode.gif)")
    rd.add_argument("--n-agents", type=int, help="team size (graph/transformer policies)")
    rd.add_argument("--seed", type=int, default=0, help="the episode's seed (default 0)")
    rd.add_argument("--greedy", action="store_true", help="most likely action, not sampled")
    rd.add_argument("--which", choices=["best", "latest"], help="default: best if kept")
    rd.add_argument("--fps", type=int, default=10, help="frames per second (default 10)")
    rd.set_defaults(func=cmd_render)

    dr = sub.add_parser(
        "dream",
        help="the run's world model beside the real env: k-step errors and a picture",
        description="Roll the run's policy in the real env and, from the same start with the "
        "same actions, in its world model; print how far imagined agents drift and write "
        "RUN/dream.png.",
    )
    dr.add_argument("run", metavar="RUN", help="run id or directory (trained with a world model)")
    dr.add_argument("--steps", type=int, default=15, help="steps to dream (default 15)")
    dr.add_argument("--worlds", type=int, default=100, help="real episodes (default 100)")
    dr.add_argument(
        "--start-step", type=int, default=5, help="real steps before dreaming (default 5)"
    )
    dr.add_argument("--which", choices=["best", "latest"], default="latest")
    dr.add_argument("--out", help="PNG path (default RUN/dream.png)")
    dr.set_defaults(func=cmd_dream)
