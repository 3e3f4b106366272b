"""The ``shoal`` command line: the parser, and the commands that start or inspect local work.

``shoal run spread-gnn train.lr=1e-3``   train locally (or on Ray with workers/ranks set)
``shoal sweep PRESET key=SPACE ...``     hyper-parameter search on Ray Tune
``shoal eval`` / ``plot`` / ``render`` / ``dream``   a run's results (``orchestrator.cli.results``)
``shoal presets``                        list shipped presets
``shoal envs``                           list env names (registered, adapters, VMAS scenarios)
``shoal status`` / ``shoal stop RUN``    run state from Redis (``orchestrator.cli.status``)
``shoal submit`` / ``shoal jobs ...``    Ray Jobs on a cluster (``orchestrator.cli.jobs``)

A user's mistake (a bad key, an env that cannot be built, a missing run) is one ``error:``
line and exit code 2, before any process starts or any directory is created.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.logging import RichHandler

from envs import EnvError
from orchestrator.cli.jobs import register_cli as register_jobs
from orchestrator.cli.output import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    console,
    err_console,
)
from orchestrator.cli.output import fail as _fail
from orchestrator.cli.output import message as _message
from orchestrator.cli.results import register_cli as register_results
from orchestrator.cli.status import register_cli as register_status
from orchestrator.config import Config, ConfigError, load_config, preset_names
from orchestrator.runtime.checkpoint import CheckpointError
from orchestrator.runtime.rundir import find_run
from orchestrator.runtime.storage import StorageError


def _split_source(source: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    if source is not None and "=" in source:
        return None, [source, *overrides]
    return source, overrides


def _load_run_config(args: argparse.Namespace) -> tuple[Config, Path | None]:
    """Config for ``shoal run``: a preset/file, or the resumed run's own config."""
    source, overrides = _split_source(args.source, args.overrides)
    resume_dir: Path | None = None
    if args.resume:
        from orchestrator.runtime.checkpoint import load_checkpoint, resolve_checkpoint

        args.resume = find_run(args.resume)
        ckpt = resolve_checkpoint(args.resume)
        load_checkpoint(ckpt)  # a damaged checkpoint is refused before anything starts
        resume_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        if source is None:
            source = str(resume_dir / "config.yaml")
            if not Path(source).is_file():
                source = str(ckpt / "config.yaml")
    if source is None:
        raise ConfigError("name a preset or config file (shoal presets lists them)")
    cfg = load_config(source, overrides)
    if args.address:
        cfg.ray.address = args.address
    if args.ray:
        cfg.ray.force = True
    return cfg, resume_dir


def cmd_run(args: argparse.Namespace) -> int:
    """Train: in-process by default, on Ray when workers, ranks or an address are set."""
    from orchestrator.runtime.driver import preflight, run_training
    from orchestrator.runtime.rundir import new_run_dir

    try:
        cfg, resume_dir = _load_run_config(args)
        groups = preflight(cfg)
        run_dir = resume_dir or new_run_dir(cfg)
    except (ConfigError, EnvError, CheckpointError, FileNotFoundError, StorageError) as e:
        return _fail(_message(e), EXIT_USAGE)
    n = sum(len(agents) for agents in groups.values())
    teams = ""
    if cfg.groups:
        teams = " (" + ", ".join(f"{g} x{len(a)}" for g, a in groups.items()) + ")"
    console.print(
        f"[bold]shoal[/] run [cyan]{cfg.preset}[/]: {cfg.env.name} N={n}{teams} "
        f"B={cfg.env.num_envs} model={cfg.model.kind} -> {run_dir}",
        highlight=False,
    )
    try:
        summary = run_training(cfg, run_dir, resume=args.resume, console=err_console)
    except (ValueError, RuntimeError) as e:
        return _fail(str(e))
    _print_summary(summary)
    if cfg.run.plot and (run_dir / "metrics.csv").is_file():
        from orchestrator.cli.evaluate import plot_run

        console.print(f" learning curve       {plot_run(run_dir)}", markup=False, highlight=False)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "checkpoints"}))  # noqa: T201
    return EXIT_INTERRUPTED if summary["reason"] == "interrupted" else EXIT_OK


def _print_summary(summary: dict[str, Any]) -> None:
    m, c = summary.get("metrics") or {}, summary["counters"]
    rows = [
        ("stopped", summary["reason"]),
        ("env steps", f"{c['env_steps']:,}"),
        ("train time", f"{summary['train_seconds']:.1f} s"),
    ]
    if summary["train_seconds"] > 0 and c["env_steps"]:
        rate = summary.get("steps_this_session", 0) / summary["train_seconds"]
        rows.append(("throughput", f"{rate:,.0f} env-steps/s"))
    if m.get("episode_return") is not None:
        rows.append(("team return (train)", f"{m['episode_return']:.2f}"))
    for key, value in m.items():
        if key.startswith("return/") and value is not None:
            rows.append((f"{key.removeprefix('return/')} return (train)", f"{value:.2f}"))
    best = Path(summary["run_dir"]) / "checkpoints" / "best" / "meta.json"
    if best.is_file():
        value = json.loads(best.read_text())["eval_return"]
        rows.append(("best eval return", f"{value:.2f} (own env; checkpoints/best)"))
    rows.append(("run dir", summary["run_dir"]))
    videos = sorted((Path(summary["run_dir"]) / "videos").glob("step-*"))
    if videos:
        rows.append(("videos", f"{len(videos)}, the last {videos[-1]}"))
    if summary.get("storage"):
        rows.append(("storage", summary["storage"]))
    if summary.get("checkpoint"):
        rows.append(("checkpoint", summary["checkpoint"]))
        where = summary.get("storage") or summary["run_dir"]
        rows.append(("next", f"shoal eval '{where}'" if "?" in where else f"shoal eval {where}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        console.print(f" {label:<{width}}  {value}", markup=False, highlight=False)


def cmd_sweep(args: argparse.Namespace) -> int:
    """Search hyper-parameters on Ray Tune; every trial is a shoal run."""
    import time

    from orchestrator.cli import sweep
    from orchestrator.runtime.rundir import make_dir

    try:
        if args.resume:
            sweep_dir = Path(args.resume)
            spec_file = sweep_dir / sweep.SWEEP_FILE
            if not spec_file.is_file():
                raise FileNotFoundError(f"no {sweep.SWEEP_FILE} in '{sweep_dir}': not a sweep")
            saved = json.loads(spec_file.read_text())
            spec, options = saved["spec"], saved["options"]
        else:
            if not args.source:
                raise ConfigError("name a preset or config file, then key=SPACE arguments")
            source, yaml_spaces = sweep.read_sweep_section(args.source)
            overrides, spaces = sweep.split_args(args.overrides)
            spec = sweep.check(source, overrides, {**yaml_spaces, **spaces})
            options = {"samples": args.samples, "max_concurrent": args.max_concurrent,
                       "metric": args.metric, "asha": args.asha}  # fmt: skip
            name = Path(source).stem if source.endswith((".yaml", ".yml")) else source
            stamp = time.strftime("%Y%m%d-%H%M%S")
            sweep_dir = Path(args.dir or spec["run_dir"]) / (args.name or f"sweep-{name}-{stamp}")
            make_dir(sweep_dir, "--dir" if args.dir else "run.dir")
            (sweep_dir / sweep.SWEEP_FILE).write_text(
                json.dumps({"spec": spec, "options": options}, indent=2)
            )
    except (ConfigError, FileNotFoundError) as e:
        return _fail(_message(e), EXIT_USAGE)
    console.print(f"[bold]shoal[/] sweep -> {sweep_dir}", highlight=False)
    if spec.get("storage"):
        console.print(f"trials kept in {sweep.trials_storage({**spec, 'dir': str(sweep_dir)})}",
                      highlight=False, markup=False)  # fmt: skip
    live = console if console.is_terminal else None
    res = sweep.run_sweep(
        spec, sweep_dir, resume=bool(args.resume), address=args.address, console=live, **options
    )
    title = f"{len(res['trials'])} trials, by {res['metric']}"
    console.print(sweep.results_table(res["trials"], res["metric"], title))
    console.print(f"results: {sweep_dir / 'results.csv'}", highlight=False)
    if res.get("storage"):
        console.print(f"storage: {res['storage']}", highlight=False, markup=False)
    if res["best_yaml"] is not None:
        console.print(f"best: {res['best_yaml']}  (shoal run {res['best_yaml']})", highlight=False)
    return EXIT_OK


def cmd_presets(args: argparse.Namespace) -> int:
    """List presets shipped with shoal."""
    import torch

    from envs import EnvError

    for name in preset_names():
        cfg = load_config(name)
        try:
            env = cfg.env.make(1, 0, torch.device("cpu"))
            agents = f"N={env.n_agents}"
            env.close()
        except EnvError as e:  # an optional package missing here (e.g. jaxmarl)
            agents = f"N=? ({e})"
        groups = f" groups={','.join(cfg.groups)}" if cfg.groups else ""
        algorithm = cfg.train.algorithm
        critic = f" critic={cfg.model.critic}" if algorithm == "ppo" else ""  # MAPPO or IPPO
        console.print(
            f"[cyan]{name}[/]  env={cfg.env.name} {agents} algorithm={algorithm} "
            f"model={cfg.model.kind}{critic}{groups}",
            highlight=False,
            markup=False if "?" in agents else None,
        )
    return EXIT_OK


def cmd_envs(args: argparse.Namespace) -> int:
    """List env names for ``env.name``: registered ones, adapters, installed VMAS scenarios."""
    import envs

    for name in envs.available():
        console.print(f"[cyan]{name}[/]", highlight=False)
    try:
        import vmas
    except ImportError:
        console.print("vmas:<scenario> needs `pip install vmas`", highlight=False)
    else:
        console.print(f"vmas scenarios: {', '.join(vmas.scenarios)}", highlight=False)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The full ``shoal`` argument parser."""
    p = argparse.ArgumentParser(
        prog="shoal",
        description="Multi-agent RL training: local runs, Ray clusters, Redis shared memory.",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="train a preset or config file",
        description="Train. Overrides are section.key=value, e.g. train.lr=1e-3 env.n_agents=4.",
    )
    run.add_argument("source", nargs="?", help=f"preset ({', '.join(preset_names())}) or .yaml")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    run.add_argument(
        "--resume", metavar="RUN", help="continue a run (id or directory) from its last checkpoint"
    )
    run.add_argument("--address", help="join a Ray cluster ('auto' or host:port)")
    run.add_argument(
        "--ray",
        action="store_true",
        help="train through a local Ray instance even in-process, to watch it in the Ray "
        "dashboard (ray.force=true)",
    )
    run.add_argument("--json", action="store_true", help="print a JSON summary line at the end")
    run.set_defaults(func=cmd_run)

    register_results(sub)

    sw = sub.add_parser(
        "sweep",
        help="search hyper-parameters on Ray Tune (each trial a shoal run)",
        description="Sample configs from search spaces (key=loguniform(a,b), uniform(a,b), "
        "randint(a,b), choice(v,...), grid(v,...)) and train each as an in-process shoal "
        "run; writes results.csv and best.yaml in the sweep directory.",
    )
    sw.add_argument("source", nargs="?", metavar="PRESET|FILE", help="preset or YAML config")
    sw.add_argument("overrides", nargs="*", metavar="KEY=VALUE|KEY=SPACE")
    sw.add_argument("--samples", type=int, default=4, help="configs sampled (default 4)")
    sw.add_argument("--max-concurrent", type=int, help="trials at once (default: one per CPU)")
    sw.add_argument(
        "--metric",
        choices=["episode_return", "eval_return"],
        default="episode_return",
        help="what the trials are ranked (and ASHA stops them) by",
    )
    sw.add_argument("--asha", action="store_true", help="stop trials that fall behind (ASHA)")
    sw.add_argument(
        "--dir", help="where the sweep directory goes (default: the config's run.dir, runs/)"
    )
    sw.add_argument(
        "--name", help="the sweep directory's name (default sweep-PRESET-YYYYmmdd-HHMMSS)"
    )
    sw.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep that was stopped")
    sw.add_argument(
        "--address",
        help="run the trials on this Ray cluster ('auto' inside a job; `shoal submit --sweep` "
        "sets it)",
    )
    sw.set_defaults(func=cmd_sweep)

    pr = sub.add_parser("presets", help="list shipped presets")
    pr.set_defaults(func=cmd_presets)
    en = sub.add_parser("envs", help="list env names for env.name (adapters, VMAS scenarios)")
    en.set_defaults(func=cmd_envs)

    register_status(sub)
    register_jobs(sub)
    return p


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """``parser.parse_args``, except that ``KEY=VALUE`` overrides may also follow options.

    argparse stops filling a ``nargs="*"`` positional at the first option, so
    ``shoal run spread-gnn --ray train.lr=1e-3`` would reject ``train.lr=1e-3``.
    """
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (stray or not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shoal`` script."""
    parser = build_parser()
    args = parse_with_overrides(parser, argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERRUPTED)
    except OSError as e:
        if e.filename is None:
            raise
        # A path the user gave that cannot be read or written (an --out in a read-only
        # directory, a file where a directory should be): one line, not a traceback.
        return _fail(_message(e), EXIT_USAGE)


if __name__ == "__main__":
    sys.exit(main())
