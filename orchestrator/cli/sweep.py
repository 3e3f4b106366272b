"""``shoal sweep``: hyper-parameter search on Ray Tune, every trial an ordinary shoal run.

``shoal sweep spread-gnn train.total_env_steps=200000 train.lr=loguniform(1e-4,3e-3)
model.hidden=choice(32,64,128) --samples 8`` samples 8 configs. Search spaces are written as
``key=loguniform(a,b)``, ``uniform(a,b)``, ``randint(a,b)``, ``choice(v, ...)`` or
``grid(v, ...)`` (every value, times ``--samples``) on the command line, or under a ``sweep:``
section of a YAML config (``sweep: {train.lr: "loguniform(1e-4,3e-3)"}``); every other
``key=value`` is a plain override.

Each trial is an in-process shoal run in ``SWEEP_DIR/trials/<trial>`` (config, metrics,
TensorBoard, checkpoints), so ``shoal eval`` and ``shoal plot`` work on it; its metric rows
are reported to Tune, and ASHA (``--asha``) stops trials whose team return falls behind. At
the end ``results.csv`` and a table list every trial, and ``best.yaml`` is the best trial's
config, a preset ``shoal run`` accepts. ``shoal sweep --resume SWEEP_DIR`` continues a sweep
that was killed, without redoing finished trials.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml

from orchestrator.config import ConfigError, config_to_yaml, load_config
from orchestrator.config.loading import apply_override

SPACE = re.compile(r"^(loguniform|uniform|randint|choice|grid)\((.*)\)$")
LOOKS_LIKE_SPACE = re.compile(r"^[A-Za-z_]\w*\(.*\)$")
SPACES = "loguniform(a,b), uniform(a,b), randint(a,b), choice(v,...) or grid(v,...)"
SWEEP_FILE = "sweep.json"
TUNE_DIR = "tune"
#: Trial runs are in-process and keep to one thread each.
#: A trial's run ended by its budget (not by a stop or a crash).
FINISHED = ("total_env_steps reached", "time limit reached")
TRIAL_OVERRIDES = ["run.progress=false", "redis.enabled=false", "train.threads=1"]


def parse_space(key: str, text: str) -> tuple[str, list[Any]]:
    """``(kind, args)`` of a search space written ``kind(args)``.

    Raises:
        ConfigError: naming ``key``, for a space that is not one of :data:`SPACES` or whose
            arguments do not fit it.
    """
    m = SPACE.match(text.strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not a search space; use {SPACES}")
    kind, inner = m.groups()
    try:
        args = [_number(a) for a in yaml.safe_load(f"[{inner}]")]
    except yaml.YAMLError:
        raise ConfigError(f"{key}: cannot read the arguments of {text!r}") from None
    if not args:
        raise ConfigError(f"{key}: {kind}() needs arguments, e.g. {kind}(1, 2)")
    if kind in ("loguniform", "uniform", "randint"):
        if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
            raise ConfigError(f"{key}: {kind} takes two numbers, low and high, got {text!r}")
        low, high = args
        if not low < high:
            raise ConfigError(f"{key}: {kind}({low}, {high}) needs low < high")
        if kind == "loguniform" and low <= 0:
            raise ConfigError(f"{key}: loguniform needs low > 0, got {low}")
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{key}: randint takes two integers, got {text!r}")
    return kind, args


def _number(value: Any) -> Any:
    """YAML reads ``1e-4`` as a string; a sweep means the number."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
    return value


def _examples(kind: str, args: list[Any]) -> list[Any]:
    """Values a space can take that the config must accept (its bounds, or every choice)."""
    if kind == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def split_args(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Plain ``key=value`` overrides, and ``key=space(...)`` search spaces."""
    overrides, spaces = [], {}
    for a in args:
        key, sep, value = a.partition("=")
        if sep and SPACE.match(value.strip()):
            spaces[key.strip()] = value.strip()
        elif sep and LOOKS_LIKE_SPACE.match(value.strip()):
            parse_space(key.strip(), value)  # a misspelt space: one line naming the key
        else:
            overrides.append(a)
    return overrides, spaces


def read_sweep_section(source: str) -> tuple[str, dict[str, str]]:
    """A YAML source without its ``sweep:`` section (written next to it), and that section."""
    path = Path(source)
    if not (path.is_file() and source.endswith((".yaml", ".yml"))):
        return source, {}
    data = yaml.safe_load(path.read_text()) or {}
    section = data.pop("sweep", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"sweep: in {source} must map keys to spaces, e.g. train.lr: ...")
    return source, {str(k): str(v) for k, v in section.items()}


def check(source: str, overrides: list[str], spaces: dict[str, str]) -> dict[str, Any]:
    """Validate a sweep before anything starts; returns its spec (what ``--resume`` reads).

    Every space is parsed, and the config is loaded with each of its extreme or listed
    values, so a bad key or a value out of range is one line naming the key.
    """
    if not spaces:
        raise ConfigError(
            f"name at least one search space, e.g. train.lr=loguniform(1e-4,3e-3) ({SPACES})"
        )
    parsed = {k: parse_space(k, v) for k, v in spaces.items()}
    base = [*overrides, *TRIAL_OVERRIDES]
    cfg = _load(source, base)
    if cfg.rollout.num_workers or cfg.learner.num_ranks > 1 or cfg.ray.address or cfg.ray.force:
        raise ConfigError(
            "shoal sweep runs each trial in-process: leave rollout.num_workers, "
            "learner.num_ranks, ray.address and --ray at their defaults (trials on Ray "
            "actors are planned)"
        )
    for key, (kind, args) in parsed.items():
        for value in _examples(kind, args):
            _load(source, [*base, f"{key}={json.dumps(value)}"])
    if cfg.run.storage is not None:
        from orchestrator.runtime.storage import StorageError, check_storage

        try:
            check_storage(cfg.run.storage)
        except StorageError as e:
            raise ConfigError(str(e)) from None
    return {"source": str(Path(source).resolve()) if Path(source).is_file() else source,
            "overrides": overrides, "spaces": spaces, "run_dir": cfg.run.dir,
            "storage": cfg.run.storage}  # fmt: skip


def _load(source: str, overrides: list[str]):  # type: ignore[no-untyped-def]
    if source.endswith((".yaml", ".yml")) and Path(source).is_file():
        data = yaml.safe_load(Path(source).read_text()) or {}
        data.pop("sweep", None)
        for o in overrides:
            apply_override(data, o)
        from pydantic import ValidationError

        from orchestrator.config import Config
        from orchestrator.config.loading import _format_error

        data.setdefault("preset", Path(source).stem)
        try:
            return Config.model_validate(data)
        except ValidationError as e:
            raise ConfigError(_format_error(e, Config)) from None
    return load_config(source, overrides)


def _tune_space(spaces: dict[str, str]) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for key, text in spaces.items():
        kind, args = parse_space(key, text)
        out[key] = {
            "loguniform": lambda a: tune.loguniform(*a),
            "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a),
            "choice": lambda a: tune.choice(a),
            "grid": lambda a: tune.grid_search(a),
        }[kind](args)
    return out


class _TuneReport:
    """A metrics sink that reports each row to Tune (with the last finite return)."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.last = -math.inf

    def log(self, row: dict[str, float]) -> None:
        from ray import tune

        value = row.get(self.metric, math.nan)
        if isinstance(value, float) and math.isfinite(value):
            self.last = value
        if not math.isfinite(self.last):
            return
        tune.report({self.metric: self.last, "env_steps": row["env_steps"]})

    def close(self) -> None:
        pass


def _trainable(config: dict[str, Any]) -> None:
    """One trial: an ordinary in-process shoal run in the sweep's ``trials`` directory."""
    from ray import tune

    from orchestrator.runtime.checkpoint import list_checkpoints
    from orchestrator.runtime.driver import run_training
    from orchestrator.runtime.rundir import SUMMARY_FILE

    spec = config["__spec"]
    params = {k: v for k, v in config.items() if k != "__spec"}
    trial = tune.get_context().get_trial_id()
    run_dir = Path(spec["dir"]) / "trials" / trial
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = [*spec["overrides"], *TRIAL_OVERRIDES, f"run.name={json.dumps(trial)}"]
    overrides += [f"{k}={json.dumps(v)}" for k, v in params.items()]
    trials = trials_storage(spec)
    if trials is not None:  # each trial's run kept at <storage>/<sweep>/trials/<trial>
        overrides.append(f"run.storage={json.dumps(trials)}")
    cfg = _load(spec["source"], overrides)
    (run_dir / "params.json").write_text(json.dumps(params))
    report = _TuneReport(spec["metric"])
    summary = run_dir / SUMMARY_FILE
    if summary.is_file():  # the trial finished before the sweep was stopped: not redone
        done = json.loads(summary.read_text())
        if done.get("reason") in FINISHED:
            report.log({**(done.get("metrics") or {}), "env_steps": done["counters"]["env_steps"]})
            return
    # A trial cut short continues from its own latest checkpoint (from storage when it
    # restarts on a node that has none).
    found = list_checkpoints(run_dir / "checkpoints")
    if not found and trials is not None:
        from orchestrator.runtime.storage import fetch_run, join_uri

        with contextlib.suppress(FileNotFoundError):
            fetch_run(join_uri(trials, trial), run_dir)
        found = list_checkpoints(run_dir / "checkpoints")
    resume = str(found[-1]) if found else None
    run_training(cfg, run_dir, resume=resume, extra_sinks=[report])


def trials_storage(spec: dict[str, Any]) -> str | None:
    """Where the trials' runs are kept: ``<run.storage>/<sweep name>/trials`` (or ``None``)."""
    if not spec.get("storage"):
        return None
    from orchestrator.runtime.storage import join_uri

    return join_uri(spec["storage"], f"{Path(spec['dir']).name}/trials")


def _keep_sweep_files(spec: dict[str, Any], sweep_dir: Path) -> str | None:
    """Copy ``sweep.json``, ``results.csv`` and ``best.yaml`` beside the trials in storage."""
    if not spec.get("storage"):
        return None
    from orchestrator.runtime.storage import join_uri, open_location, upload

    uri = join_uri(spec["storage"], sweep_dir.name)
    loc = open_location(uri)
    for path in sorted(sweep_dir.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            upload(loc, path, loc.join(path.name))
    return uri


def run_sweep(
    spec: dict[str, Any],
    sweep_dir: Path,
    samples: int,
    max_concurrent: int | None,
    metric: str,
    asha: bool,
    resume: bool = False,
    address: str | None = None,
    console: Any = None,
) -> dict[str, Any]:
    """Run (or continue) the sweep; returns ``trials`` (rows), ``best`` and ``best_yaml``.

    Args:
        spec: What :func:`check` returned (source, overrides, spaces).
        sweep_dir: The sweep's directory (``sweep.json``, ``tune/``, ``trials/``).
        samples: Configs sampled from the spaces (each ``grid`` value that many times).
        max_concurrent: Trials at once; ``None`` lets Tune fill the free CPUs.
        metric: The row key trials are ranked by (and ASHA stops them by).
        asha: Stop trials whose ``metric`` falls behind (ASHA, on env steps).
        resume: Continue the sweep saved in ``sweep_dir/tune`` instead of starting one.
        address: A Ray cluster to run the trials on (``"auto"`` inside a Ray job); by
            default a local Ray with one trial slot per CPU. On several nodes ``sweep_dir``
            must be on storage every node mounts, since each trial writes its run there.
        console: A rich console to keep the live results table on while trials run.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = {**spec, "dir": str(sweep_dir.resolve()), "metric": metric}
    if address:  # a cluster's Ray (inside `shoal submit --sweep`: "auto"); trials go to its nodes
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(
            num_cpus=max(1, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    keys = list(spec["spaces"])
    live = _live_table(metric, keys, console) if console is not None else None
    callbacks = [live] if live is not None else []  # Tune appends its own to this list
    try:
        trainable = tune.with_resources(_trainable, {"cpu": 1})
        path = str((sweep_dir / TUNE_DIR).resolve())
        if resume:
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True)
            local = getattr(tuner, "_local_tuner", None)  # Tuner.restore takes no callbacks
            if local is not None:
                local.get_run_config().callbacks = callbacks
        else:
            base = _load(spec["source"], [*spec["overrides"], *TRIAL_OVERRIDES])
            scheduler = None
            if asha:
                budget = base.train.total_env_steps
                scheduler = ASHAScheduler(
                    time_attr="env_steps", max_t=budget, grace_period=max(1, budget // 8)
                )
            tuner = tune.Tuner(
                trainable,
                param_space={**_tune_space(spec["spaces"]), "__spec": spec},
                tune_config=tune.TuneConfig(
                    metric=metric,
                    mode="max",
                    num_samples=samples,
                    max_concurrent_trials=max_concurrent,
                    scheduler=scheduler,
                ),
                run_config=tune.RunConfig(
                    name=TUNE_DIR,
                    storage_path=str(sweep_dir.resolve()),
                    verbose=0,
                    callbacks=callbacks,
                ),
            )
        try:
            results = tuner.fit()
        finally:
            if live is not None:
                live.stop()
    finally:
        ray.shutdown()
    rows = []
    for r in (results[i] for i in range(len(results))):
        params = {k: v for k, v in (r.config or {}).items() if k != "__spec"}
        value = (r.metrics or {}).get(metric)
        rows.append({
            "trial": (r.metrics or {}).get("trial_id"),
            **params,
            metric: value,
            "env_steps": (r.metrics or {}).get("env_steps"),
            "status": "error" if r.error else "done",
        })  # fmt: skip
    with open(sweep_dir / "results.csv", "w", newline="") as fh:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    scored = [r for r in rows if isinstance(r.get(metric), (int, float))]
    best = max(scored, key=lambda r: r[metric]) if scored else None
    best_yaml = None
    if best is not None:
        params = {
            k: v for k, v in best.items() if k not in ("trial", metric, "env_steps", "status")
        }
        cfg = _load(
            spec["source"],
            [*spec["overrides"], *[f"{k}={json.dumps(v)}" for k, v in params.items()]],
        )
        cfg.preset = f"{sweep_dir.name}-best"
        best_yaml = sweep_dir / "best.yaml"
        best_yaml.write_text(config_to_yaml(cfg))
    stored = _keep_sweep_files(spec, sweep_dir)
    return {"trials": rows, "best": best, "best_yaml": best_yaml, "metric": metric,
            "storage": stored}  # fmt: skip


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "-"
    return "-" if value is None else str(value)


def results_table(rows: list[dict[str, Any]], metric: str, title: str | None = None) -> Any:
    """A rich table of trial rows, best ``metric`` first."""
    from rich.table import Table

    keys = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(title=title, title_justify="left")
    for k in keys:
        table.add_column(k, justify="left" if k in ("trial", "status") else "right")

    def score(r: dict[str, Any]) -> float:
        v = r.get(metric)
        return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf

    for r in sorted(rows, key=score, reverse=True):
        table.add_row(*(_cell(r.get(k)) for k in keys))
    return table


def _live_table(metric: str, keys: list[str], console: Any) -> Any:  # noqa: C901
    """A Tune callback keeping :func:`results_table` of the trials on screen as they report."""
    import time

    from ray.tune import Callback
    from rich.live import Live

    class LiveTable(Callback):  # type: ignore[misc]
        def __init__(self, console: Any) -> None:
            self.rows: dict[str, dict[str, Any]] = {}
            self.last = 0.0
            self.live: Any = Live(console=console, auto_refresh=False, transient=True)
            self.live.start()

        # Tune pickles its run config, callbacks included; the screen stays here.
        def __getstate__(self) -> dict[str, Any]:
            return {"rows": self.rows, "last": self.last, "live": None}

        def stop(self) -> None:
            if self.live is not None:
                self.live.stop()

        def update(self, trial: Any, status: str, result: dict[str, Any] | None = None) -> None:
            result = result or trial.last_result or {}
            self.rows[trial.trial_id] = {
                "trial": trial.trial_id,
                **{k: (trial.config or {}).get(k) for k in keys},
                metric: result.get(metric),
                "env_steps": result.get("env_steps"),
                "status": status,
            }
            now = time.monotonic()
            if self.live is None:
                return
            if status != "running" or now - self.last > 1.0:  # redraws throttled to 1/s
                self.last = now
                done = sum(r["status"] != "running" for r in self.rows.values())
                title = f"sweep: {done}/{len(self.rows)} trials done"
                self.live.update(results_table(list(self.rows.values()), metric, title))
                self.live.refresh()

        def on_trial_start(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            self.update(trial, "running")

        def on_trial_result(
            self, iteration: int, trials: Any, trial: Any, result: dict, **info: Any
        ) -> None:
            self.update(trial, "running", result)

        def on_trial_complete(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            self.update(trial, "done")

        def on_trial_error(self, iteration: int, trials: Any, trial: Any, **info: Any) -> None:
            self.update(trial, "error")

    return LiveTable(console)
