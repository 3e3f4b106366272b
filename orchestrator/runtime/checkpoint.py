"""Checkpoints: directories written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint is written to a temporary sibling directory, flushed, then renamed into place, so
a crash mid-write leaves the previous checkpoint intact and never a half-written one.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from policies.actor_critic import Policy
from policies.groups import GroupedActorCritic, GroupLayout, policy_from_meta, policy_meta

CKPT_PREFIX = "step-"
# Counted per run, not restored from a checkpoint older than them.
SESSION_COUNTERS = ("rollout_restarts", "batches_recollected", "learner_restarts")


def fresh_counters() -> dict[str, Any]:
    """The counters of a run that has not trained yet."""
    return {"env_steps": 0, "iteration": 0, "wall_time": 0.0, **dict.fromkeys(SESSION_COUNTERS, 0)}


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from, in a form ``weights_only`` loading accepts."""
    np_state: tuple[Any, ...] = tuple(np.random.get_state())
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            *[int(x) if isinstance(x, (int, np.integer)) else float(x) for x in np_state[2:]],
        ],
        "python": _py_state_to_lists(random.getstate()),
    }


def _py_state_to_lists(state: Any) -> Any:
    if isinstance(state, tuple):
        return [_py_state_to_lists(s) for s in state]
    return state


def _lists_to_tuple(state: Any) -> Any:
    if isinstance(state, list):
        return tuple(_lists_to_tuple(s) for s in state)
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(_lists_to_tuple(state["python"]))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    ckpt_root: Path,
    *,
    model: Policy,
    learner_state: dict[str, Any],
    counters: dict[str, Any],
    config_yaml: str,
    keep: int = 3,
    name: str | None = None,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``ckpt_root/step-<env_steps>`` atomically and prune all but the newest ``keep``.

    With ``name`` (``best``) the checkpoint goes to ``ckpt_root/<name>`` instead, replacing
    the one there; named checkpoints are neither pruned nor resumed from.

    Args:
        ckpt_root: the run's ``checkpoints`` directory.
        model: the policy (its spec is stored so the checkpoint rebuilds it alone).
        learner_state: optimiser state and learner counters.
        counters: ``env_steps``, ``iteration``, ``wall_time`` and similar plain numbers.
        config_yaml: the resolved run config.
        keep: how many checkpoints to keep.
        name: a fixed name instead of ``step-<env_steps>``.
        meta: more fields for ``meta.json`` (e.g. the evaluation that made it the best).
        extra: more state, each entry saved as ``<key>.pt`` (e.g. ``world_model``).

    Returns:
        The checkpoint directory.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    dirname = name or f"{CKPT_PREFIX}{int(counters['env_steps']):012d}"
    final = ckpt_root / dirname
    tmp = Path(tempfile.mkdtemp(prefix=f".{dirname}.", dir=ckpt_root))
    try:
        torch.save(model.state_dict(), tmp / "model.pt")
        torch.save(learner_state, tmp / "learner.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for key, state in (extra or {}).items():
            torch.save(state, tmp / f"{key}.pt")
        record = {"counters": counters, **policy_meta(model), "format": 1}
        (tmp / "meta.json").write_text(json.dumps({**record, **(meta or {})}, indent=2))
        (tmp / "config.yaml").write_text(config_yaml)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if final.exists():  # same step saved twice (on stop right after a save), or a new best
            old = Path(tempfile.mkdtemp(prefix=f".{dirname}.old.", dir=ckpt_root))
            os.rename(final, old / dirname)
        os.rename(tmp, final)
        _fsync_dir(ckpt_root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if name is None:  # a named checkpoint is not one of the step-* series: prune nothing
        for stale in list_checkpoints(ckpt_root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are ignored)."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX))


BEST = "best"
_CORE_FILES = frozenset({"model", "learner", "rng"})


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: a file missing, truncated or not a checkpoint's."""


# What reading a damaged file raises: json and yaml errors are ValueErrors, torch.load raises
# UnpicklingError, RuntimeError (a broken zip), KeyError or EOFError on garbage.
_UNREADABLE = (OSError, EOFError, RuntimeError, ValueError, KeyError, pickle.UnpicklingError)


def _read(ckpt: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    """``reader(ckpt / name)``, or a :class:`CheckpointError` naming the file and what to do."""
    try:
        return reader(ckpt / name)
    except _UNREADABLE as e:
        detail = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        what = (
            "is missing"
            if isinstance(e, FileNotFoundError)
            else f"cannot be read ({type(e).__name__}{': ' + detail if detail else ''})"
        )
        raise CheckpointError(
            f"checkpoint '{ckpt}' is damaged: {name} {what}; use another checkpoint (an earlier "
            f"step-* beside it) or start a new run"
        ) from None


def _meta(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text())
    if not isinstance(meta, dict) or "counters" not in meta:
        raise ValueError("no counters in it")
    return meta


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """Accept a checkpoint directory, a run directory or a file in a checkpoint.

    Args:
        path: the checkpoint or run directory.
        which: for a run directory, ``latest`` (its newest ``step-*``, what ``--resume``
            continues from) or ``best`` (``checkpoints/best``, the best evaluated policy).

    Raises:
        FileNotFoundError: with a message saying what was looked for.
    """
    p = Path(path)
    if p.is_file():
        p = p.parent
    if (p / "meta.json").is_file():
        return p
    if which == BEST:
        best = p / "checkpoints" / BEST
        if not (best / "meta.json").is_file():
            raise FileNotFoundError(
                f"no best checkpoint in '{path}': the run did not evaluate while training "
                "(run.eval_every_s=null) or has not yet; use --which latest"
            )
        return best
    found = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint at '{path}': expected a run directory with checkpoints/step-* "
            "or a checkpoint directory holding meta.json"
        )
    return found[-1]


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", which: str = "latest"
) -> dict[str, Any]:
    """Read a checkpoint: ``model``, ``learner``, ``rng``, ``meta``, ``config``, ``extra``.

    ``extra`` holds every other saved state by name (e.g. ``world_model``). Everything
    tensor-valued is loaded with ``weights_only=True``: no code from the file runs.
    ``which`` picks a run directory's ``latest`` or ``best`` checkpoint.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        CheckpointError: one of its files is missing or damaged; one line naming it.
    """
    ckpt = resolve_checkpoint(path, which)

    def tensors(f: Path) -> Any:
        return torch.load(f, map_location=device, weights_only=True)

    return {
        "path": ckpt,
        "meta": _read(ckpt, "meta.json", _meta),
        "model": _read(ckpt, "model.pt", tensors),
        "learner": _read(ckpt, "learner.pt", tensors),
        "rng": _read(ckpt, "rng.pt", tensors),
        "config": _read(ckpt, "config.yaml", Path.read_text),
        "extra": {
            f.stem: _read(ckpt, f.name, tensors)
            for f in sorted(ckpt.glob("*.pt"))
            if f.stem not in _CORE_FILES
        },
    }


def policy_from_checkpoint(
    ckpt: dict[str, Any], device: str | torch.device = "cpu", **spec_overrides: Any
) -> Policy:
    """Rebuild the policy a checkpoint holds (``spec_overrides`` e.g. for a new obs size).

    Agent-group checkpoints (``policy_groups`` in ``meta.json``) rebuild as they were trained.
    """
    grouped = "policy_groups" in ckpt["meta"]
    model = policy_from_meta(ckpt["meta"], **({} if grouped else spec_overrides)).to(device)
    state = ckpt["model"]
    if spec_overrides and not grouped:
        # A size-agnostic actor may run with another team size while an MLP critic, which is
        # tied to the training N, cannot: keep the actor, leave a mismatched critic untrained.
        own = model.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        if any(not k.startswith("critic.") for k in mismatched):
            raise ValueError(
                f"this checkpoint's policy cannot act with {spec_overrides}: parameters "
                f"{mismatched[:3]} depend on the team size"
            )
        state = {k: v for k, v in state.items() if k not in mismatched}
        model.load_state_dict(state, strict=not mismatched)
        return model
    model.load_state_dict(state)
    return model


def copy_group(model: Policy, source: Policy, group: str) -> None:
    """Give ``model``'s group ``group`` the weights of ``source``'s group of that name.

    Raises:
        ValueError: either has no such group, or the two policies differ in shape; one line.
    """
    if not isinstance(model, GroupLayout) or not isinstance(source, GroupLayout):
        raise ValueError("copying a group's weights needs agent groups on both sides")
    names = [g.name for g in source.groups]
    if group not in names:
        raise ValueError(f"it has no group '{group}' (its groups: {names})")
    src = [u for u, gi in zip(source.units, source.unit_group, strict=True)
           if source.groups[gi].name == group]  # fmt: skip
    gi = [g.name for g in model.groups].index(group)
    dst = [u for u, i in zip(model.units, model.unit_group, strict=True) if i == gi]
    try:
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} policies there, {len(dst)} here")
        for a, b in zip(dst, src, strict=True):
            a.load_state_dict(b.state_dict())
        past: dict[str, torch.nn.Module] = (
            dict(model.past.items()) if isinstance(model, GroupedActorCritic) else {}
        )
        for u in model.group_units(group):  # a self-play past version starts from it too
            if str(u) in past:
                past[str(u)].load_state_dict(model.units[u].state_dict())
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"its '{group}' policy does not fit this one: {first}") from None


def init_groups(model: Policy, inits: dict[str, str], device: str | torch.device) -> None:
    """Start groups from other runs' weights.

    ``inits`` maps a group to a run directory or checkpoint (the run's best checkpoint when it
    has one) holding a group of the same name and shape.

    Raises:
        ValueError: the checkpoint has no such group, or it has another shape; one line.
    """
    for gname, path in inits.items():
        which = BEST if (Path(path) / "checkpoints" / BEST).is_dir() else "latest"
        ckpt = load_checkpoint(path, device, which=which)
        source = policy_from_meta(ckpt["meta"])
        source.load_state_dict(ckpt["model"])
        try:
            copy_group(model, source, gname)
        except ValueError as e:
            raise ValueError(f"groups.{gname}.init ({ckpt['path']}): {e}") from None


def checkpoint_counters(path: str | Path | None) -> dict[str, Any]:
    """The counters a run continues from: those of the checkpoint ``path``, else fresh ones."""
    counters = fresh_counters()
    if path is not None:
        meta = _read(resolve_checkpoint(path), "meta.json", _meta)
        counters.update(meta["counters"])
    return counters


def latest_checkpoint(run_dir: Path, resume: str | Path | None) -> str | None:
    """Where a (re)started run continues from: the run's newest checkpoint, else ``resume``."""
    found = list_checkpoints(run_dir / "checkpoints")
    if found:
        return str(found[-1])
    return None if resume is None else str(resume)
