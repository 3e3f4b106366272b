"""Run storage: a run's directory kept on a shared path or an object store (``run.storage``).

A run still writes its directory locally (on the node of the process writing each file); with
``run.storage`` set, every file is also copied to ``<storage>/<run name>/`` as the run goes, by
a background thread, so training never waits on an upload. ``storage`` is a path every node
mounts or a URI ``pyarrow.fs`` opens: ``s3://bucket/prefix`` (credentials from the usual
``AWS_*`` variables or files; an S3-compatible server by ``?endpoint_override=host:port&
scheme=http``), ``gs://bucket/prefix``, ``hdfs://...``, ``file:///path``.

Checkpoints are uploaded complete or not at all: every file of a checkpoint goes up before its
``meta.json``, and a reader takes only checkpoints that have one. A checkpoint being replaced
(``best``) loses its ``meta.json`` first. Pruned checkpoints are deleted there too. The
world-model actor's ``checkpoints/world_model/`` holds single files each replaced whole (by
rename); it is mirrored file by file by the process that writes it (:data:`WHOLE_FILE_DIRS`).

Commands that read a run (``shoal eval|plot|render|dream``, ``shoal run --resume``) accept its
URI: the run's files and complete checkpoints are fetched into a local cache first
(:func:`local_copy`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

META = "meta.json"
CHECKPOINTS = "checkpoints"
STEP = "step-"
WHOLE_FILE_DIRS = frozenset({"world_model"})
"""Checkpoint directories without ``meta.json`` whose files are each written whole."""
_CHUNK = 8 << 20


class StorageError(ValueError):
    """``run.storage`` (or a run URI) cannot be used; one line naming it and what to do."""


def is_uri(target: str | os.PathLike[str] | None) -> bool:
    """Whether ``target`` names storage by URI (``s3://``, ``gs://``, ``file://``, ...)."""
    return target is not None and "://" in str(target)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _uri_without_query(uri: str) -> str:
    return uri.split("?", 1)[0]


def join_uri(base: str, name: str) -> str:
    """``s3://b/p?q`` and ``RUN`` -> ``s3://b/p/RUN?q`` (a path: ``base/RUN``)."""
    path, _, query = base.partition("?")
    return f"{path.rstrip('/')}/{name}" + (f"?{query}" if query else "")


@dataclass(frozen=True)
class Location:
    """A directory in some filesystem: ``fs`` (a ``pyarrow.fs.FileSystem``) and ``path`` in it."""

    fs: Any
    path: str
    uri: str

    def join(self, *parts: str) -> str:
        """The path of ``parts`` under this directory."""
        return "/".join([self.path.rstrip("/"), *parts])

    def child(self, name: str) -> Location:
        """The directory ``name`` under this one."""
        return Location(self.fs, self.join(name), join_uri(self.uri, name))

    @property
    def local(self) -> bool:
        """Whether writes can be made atomic by renaming (a mounted path)."""
        from pyarrow import fs as pafs

        return isinstance(self.fs, pafs.LocalFileSystem)


def open_location(target: str, key: str = "run.storage") -> Location:
    """Open ``target`` (a path or URI) without touching it yet.

    Raises:
        StorageError: the URI names no filesystem ``pyarrow.fs`` knows, or cannot be parsed.
    """
    from pyarrow import fs as pafs

    if not is_uri(target):
        return Location(pafs.LocalFileSystem(), str(Path(target).expanduser().resolve()), target)
    try:
        fs, path = pafs.FileSystem.from_uri(target)
    except Exception as e:  # ArrowInvalid, ArrowNotImplementedError, OSError
        raise StorageError(
            f"{key}: cannot open '{_uri_without_query(target)}' ({_first_line(e)}); use a path "
            "every node mounts or s3://bucket/prefix, gs://bucket/prefix"
        ) from None
    return Location(fs, path.rstrip("/"), target)


def check_storage(target: str, key: str = "run.storage") -> Location:
    """Open ``target`` and prove it writable: a bucket that exists, credentials that work.

    Writes and deletes one small object under it (creating a local directory if needed).

    Raises:
        StorageError: one line naming ``key``, the location and what to do.
    """
    from pyarrow import fs as pafs

    loc = open_location(target, key)
    shown = _uri_without_query(target)
    if not loc.local:
        bucket = loc.path.split("/", 1)[0]
        try:
            found = loc.fs.get_file_info(bucket)
        except Exception as e:  # credentials refused, endpoint unreachable
            raise StorageError(
                f"{key}: cannot reach '{shown}' ({_first_line(e)}); check the endpoint and "
                "the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://)"
            ) from None
        if found.type == pafs.FileType.NotFound:
            raise StorageError(
                f"{key}: bucket '{bucket}' does not exist at '{shown}'; create it or name another"
            )
    probe = loc.join(f".shoal-probe-{uuid.uuid4().hex[:8]}")
    try:
        if loc.local:
            loc.fs.create_dir(loc.path, recursive=True)
        with loc.fs.open_output_stream(probe) as out:
            out.write(b"shoal")
        loc.fs.delete_file(probe)
    except Exception as e:
        raise StorageError(
            f"{key}: cannot write under '{shown}' ({_first_line(e)}); use a location these "
            "credentials may write"
        ) from None
    return loc


def upload(loc: Location, src: Path, dest: str) -> None:
    """Copy one local file to ``dest``; on a mounted path through a temporary name."""
    target = f"{dest}.{uuid.uuid4().hex[:8]}.part" if loc.local else dest
    if loc.local:
        loc.fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
    with open(src, "rb") as fh, loc.fs.open_output_stream(target) as out:
        while chunk := fh.read(_CHUNK):
            out.write(chunk)
    if loc.local:
        os.replace(target, dest)


def _listing(loc: Location) -> dict[str, int]:
    """Every file under ``loc``: its path relative to ``loc`` and its size."""
    from pyarrow import fs as pafs

    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    base = loc.path.rstrip("/") + "/"
    return {
        info.path[len(base) :]: info.size
        for info in loc.fs.get_file_info(sel)
        if info.type == pafs.FileType.File and info.path.startswith(base)
    }


def _in_complete_checkpoint(rel: str, files: dict[str, int]) -> bool:
    """Whether ``rel`` is outside every checkpoint or in a complete one, at any depth.

    Complete: the checkpoint's ``meta.json`` is listed, or it is one of
    :data:`WHOLE_FILE_DIRS`. A sweep keeps its trials' runs under ``trials/<trial>/``.
    """
    parts = rel.split("/")
    for i in range(len(parts) - 2):
        if parts[i] == CHECKPOINTS:
            name = parts[i + 1]
            meta = "/".join([*parts[: i + 2], META])
            return name in WHOLE_FILE_DIRS or meta in files
    return True


def complete_checkpoints(files: dict[str, int]) -> set[str]:
    """Names of the run's checkpoints in a listing that are complete (see above)."""
    out = set()
    for rel in files:
        parts = rel.split("/")
        if len(parts) == 3 and parts[0] == CHECKPOINTS and _in_complete_checkpoint(rel, files):
            out.add(parts[1])
    return out


class Mirror:
    """Copies a run directory's new and changed files to storage, in a background thread.

    :meth:`push` asks for a sync and returns at once; the thread also syncs every
    ``every_s`` seconds, and :meth:`close` syncs a last time and waits for it.

    Args:
        run_dir: the local run directory.
        loc: where the run lives in storage (``<storage>/<run name>``).
        checkpoints: mirror ``checkpoints/`` (the process that writes them: rank 0).
        files: mirror everything else (the driver: metrics, TensorBoard, videos, summary).
        whole: mirror ``checkpoints/world_model/`` (the world-model actor), file by file.
        every_s: seconds between syncs nobody asked for.
        background: start the thread; ``False``: the caller runs :meth:`sync` itself.
    """

    def __init__(
        self,
        run_dir: Path,
        loc: Location,
        checkpoints: bool,
        files: bool,
        whole: bool = False,
        every_s: float = 30.0,
        background: bool = True,
    ) -> None:
        self.run_dir, self.loc = Path(run_dir), loc
        self.checkpoints, self.files, self.whole = checkpoints, files, whole
        self.every_s = every_s
        self._sent: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime_ns) uploaded
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.error: str | None = None
        self.uploads = 0
        self.checkpoint_uploads: list[tuple[str, int, float]] = []
        """Each checkpoint sent: its name, bytes and upload seconds (``benchmarks.storage``)."""
        self._thread = threading.Thread(target=self._run, name="shoal-storage", daemon=True)
        if background:
            self._thread.start()

    def push(self) -> None:
        """Sync soon (after a checkpoint); never waits."""
        self._wake.set()

    def close(self, timeout_s: float = 600.0) -> None:
        """Sync what is left and wait for it (at the end of the run)."""
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("still uploading to %s after %.0f s; left behind", self.loc.uri, timeout_s)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.every_s)
            self._wake.clear()
            stopping = self._stop.is_set()
            try:
                self.sync()
                self.error = None
            except Exception as e:  # storage down for a while: the next sync retries
                self.error = _first_line(e)
                log.warning("uploading to %s failed (%s); retrying", self.loc.uri, self.error)
            if stopping:
                return

    def sync(self) -> None:
        """Upload what changed since the last sync (in this thread or the caller's)."""
        if self.files:
            self._sync_files()
        if self.checkpoints:
            self._sync_checkpoints()
        if self.whole:
            for name in sorted(WHOLE_FILE_DIRS):
                root = self.run_dir / CHECKPOINTS / name
                for path in sorted(root.iterdir()) if root.is_dir() else []:
                    if path.is_file() and not path.name.startswith("."):
                        with contextlib.suppress(FileNotFoundError):
                            self._send(path, f"{CHECKPOINTS}/{name}/{path.name}")

    def _changed(self, path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        sig = (st.st_size, st.st_mtime_ns)
        return None if self._sent.get(str(path)) == sig else sig

    def _send(self, path: Path, rel: str) -> None:
        sig = self._changed(path)
        if sig is None:
            return
        upload(self.loc, path, self.loc.join(rel))
        self._sent[str(path)] = sig
        self.uploads += 1

    def _sync_files(self) -> None:
        for path in sorted(self.run_dir.rglob("*")):
            rel = path.relative_to(self.run_dir).as_posix()
            top = rel.split("/", 1)[0]
            if top == CHECKPOINTS or top.startswith(".") or not path.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):  # a file replaced while listed
                self._send(path, rel)

    def _sync_checkpoints(self) -> None:
        root = self.run_dir / CHECKPOINTS
        local = {
            p.name: p
            for p in (root.iterdir() if root.is_dir() else [])
            if p.is_dir() and not p.name.startswith(".") and (p / META).is_file()
        }
        remote = _listing(self.loc.child(CHECKPOINTS))
        for name, path in sorted(local.items()):
            files = sorted(f for f in path.iterdir() if f.is_file())
            if not any(self._changed(f) for f in files):
                continue
            meta = path / META
            there = [remote.get(f"{name}/{f.name}") for f in files]
            same = all(size == f.stat().st_size for size, f in zip(there, files, strict=True))
            if name.startswith(STEP) and same:  # a step's name says what it holds
                for f in files:  # already there whole (a resumed run's own checkpoints)
                    self._sent[str(f)] = (f.stat().st_size, f.stat().st_mtime_ns)
                continue
            dest = f"{CHECKPOINTS}/{name}"
            t0 = time.perf_counter()
            if f"{name}/{META}" in remote:  # replaced (best): incomplete until its meta is back
                self.loc.fs.delete_file(self.loc.join(dest, META))
            for f in files:
                if f != meta:
                    self._send(f, f"{dest}/{f.name}")
            self._sent.pop(str(meta), None)
            self._send(meta, f"{dest}/{META}")
            size = sum(f.stat().st_size for f in files)
            self.checkpoint_uploads.append((name, size, time.perf_counter() - t0))
        # Pruned here: pruned there, meta.json first so that no reader takes half of one.
        gone = {rel.split("/", 1)[0] for rel in remote} - set(local) - WHOLE_FILE_DIRS
        for name in sorted(gone):
            doomed = sorted((r for r in remote if r.split("/", 1)[0] == name),
                            key=lambda r: not r.endswith(META))  # fmt: skip
            for rel in doomed:
                with contextlib.suppress(FileNotFoundError):
                    self.loc.fs.delete_file(self.loc.join(CHECKPOINTS, rel))


def download(loc: Location, rel: str, out: Path) -> None:
    """Copy ``loc/rel`` to the local file ``out`` through a temporary name (whole or not at all)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.part")
    try:
        with loc.fs.open_input_stream(loc.join(rel)) as src, open(part, "wb") as fh:
            while chunk := src.read(_CHUNK):
                fh.write(chunk)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, out)


def fetch_run(target: str, dest: Path) -> Path:
    """Copy the run at ``target`` (URI) into ``dest``: its files and complete checkpoints.

    Files already there with the same size are kept; incomplete checkpoints are skipped.

    Raises:
        StorageError: ``target`` cannot be opened or read.
        FileNotFoundError: nothing is there.
    """
    loc = open_location(target, "RUN")
    shown = _uri_without_query(target)
    try:
        files = _listing(loc)
    except Exception as e:
        raise StorageError(f"cannot read '{shown}' ({_first_line(e)})") from None
    if not files:
        raise FileNotFoundError(f"no run at '{shown}': nothing is stored there")
    complete = complete_checkpoints(files)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, size in sorted(files.items()):
        if not _in_complete_checkpoint(rel, files):
            continue
        out = dest / rel
        if out.is_file() and out.stat().st_size == size:
            continue
        try:
            download(loc, rel, out)
        except Exception as e:
            raise StorageError(f"cannot read '{shown}/{rel}' ({_first_line(e)})") from None
    # A checkpoint pruned there since the last fetch is pruned here too.
    here = dest / CHECKPOINTS
    for stale in here.iterdir() if here.is_dir() else []:
        if stale.is_dir() and stale.name not in complete and not stale.name.startswith("."):
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    return dest


def cache_root() -> Path:
    """Where fetched runs are kept: ``$SHOAL_CACHE_DIR`` or ``~/.cache/shoal/runs``."""
    return Path(os.environ.get("SHOAL_CACHE_DIR") or Path.home() / ".cache" / "shoal" / "runs")


def local_copy(target: str) -> Path:
    """A local copy of the run at ``target`` (URI), fetched or refreshed now."""
    base = _uri_without_query(target).rstrip("/")
    name = base.rsplit("/", 1)[-1] or "run"
    digest = hashlib.sha1(base.encode()).hexdigest()[:10]
    return fetch_run(target, cache_root() / digest / name)
