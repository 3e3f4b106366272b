"""The world-model process on Ray: the actor ``shoal-world-model``.

It tails the Redis replay stream the rollout workers write, keeps the newest real transitions,
fits the ensemble to them, and publishes versioned weights through a weight store of their own
(``shoal:{run}:world_model:*``) that the learner fetches before it imagines. It checkpoints
itself into ``RUN/checkpoints/world_model/`` (model, optimiser, counters, where it was in the
stream); Ray restarts it when its process dies, it resumes from that checkpoint, and the
driver's call to :meth:`WorldModelActor.run` is retried on the new process.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from agents.imagination import kept_for
from agents.memory import ReplayStream, RunState, WeightStore, connect
from agents.world_model import TransitionBuffer
from orchestrator.config import Config
from orchestrator.runtime import storage
from orchestrator.runtime.ray_metrics import RayMetricsSink
from orchestrator.runtime.world import WORLD_MODEL_ACTOR, WORLD_MODEL_WEIGHTS, build_model

log = logging.getLogger(__name__)

PUBLISH_EVERY_S = 1.0
CHECKPOINT_EVERY_S = 10.0
CHECKPOINT_FILE = "world_model.pt"


def checkpoint_dir(run_dir: str | Path) -> Path:
    """Where the actor checkpoints itself."""
    return Path(run_dir) / "checkpoints" / "world_model"


class WorldModelActor:
    """Trains the run's world model from the replay stream; ``ray.remote`` makes it an actor.

    Args:
        cfg_data: the run config as a JSON-able dict.
        run_dir: the run directory (its checkpoint lives in ``checkpoints/world_model``).
        redis_url: the run's Redis.
        run_id: namespaces the Redis keys.
    """

    def __init__(self, cfg_data: dict[str, Any], run_dir: str, redis_url: str, run_id: str):
        self.cfg = cfg = Config.model_validate(cfg_data)
        torch.set_num_threads(cfg.train.threads or 1)
        wm = cfg.world_model
        probe = cfg.env.make(1, cfg.train.seed, torch.device("cpu"))
        self.model = build_model(cfg, probe, cfg.build_policy(probe))
        probe.close()
        self.trainer = wm.trainer(self.model)
        self.kept = kept_for(self.model)
        self.buffer = TransitionBuffer(wm.replay_capacity, kept=self.kept)
        self.generator = torch.Generator().manual_seed(cfg.train.seed + 31_337)
        self.run_dir = Path(run_dir)
        # With run.storage, the checkpoint is also kept there: a restart on another node (or
        # a resumed run) takes it back from storage when this node has none.
        self.mirror: storage.Mirror | None = None
        if cfg.run.storage is not None:
            loc = storage.open_location(cfg.run.storage).child(self.run_dir.name)
            self.mirror = storage.Mirror(self.run_dir, loc, checkpoints=False, files=False,
                                         whole=True)  # fmt: skip
        client = connect(redis_url, outage_timeout=cfg.redis.outage_timeout_s)
        self.stream = ReplayStream(client, run_id, maxlen=cfg.redis.replay_maxlen)
        self.weights = WeightStore(client, run_id, name=WORLD_MODEL_WEIGHTS)
        self.state = RunState(client, run_id)
        self.metrics = RayMetricsSink(run_id, "world_model")
        self.version, self.last_id, self.transitions = 0, "0-0", 0
        self.restored = self._restore()
        # Weights published after the last checkpoint outrank it: keep counting after them.
        self.version = max(self.version, self.weights.latest_version() or 0)
        self.losses: dict[str, float] = {}
        self._stop = threading.Event()

    def info(self) -> dict[str, Any]:
        """``pid``, the model's ``updates`` and weights ``version``, and ``restored``."""
        return {
            "pid": os.getpid(),
            "updates": self.trainer.updates,
            "version": self.version,
            "transitions": self.transitions,
            "restored": self.restored,
            **self.losses,
        }

    def stop(self) -> None:
        """End :meth:`run` after its current step, with a checkpoint."""
        self._stop.set()

    def run(self) -> dict[str, Any]:
        """Read, fit, publish and checkpoint until :meth:`stop`; returns :meth:`info`."""
        wm = self.cfg.world_model
        last_publish = last_ckpt = time.monotonic()
        while not self._stop.is_set():
            entries = self.stream.tail(self.last_id, count=64, block_ms=200)
            for entry_id, chunk, _meta in entries:
                self.last_id = entry_id
                if all(k in chunk for k in self.kept.keys):
                    obs = {k: chunk[k] for k in (*self.kept.keys, "alive")}
                    self.transitions += self.buffer.add_steps(
                        obs, chunk["actions"], chunk["rewards"], chunk["terminated"],
                        chunk["truncated"],
                    )  # fmt: skip
            if len(self.buffer) >= wm.batch_size and (entries or wm.updates_per_iter == 0):
                stats = self.trainer.update(
                    self.buffer, max(wm.updates_per_iter, 1), self.generator
                )
                self.losses = {f"wm_{k}": v for k, v in stats.items()}
            now = time.monotonic()
            if self.trainer.updates and now - last_publish >= PUBLISH_EVERY_S:
                self.version += 1
                self.weights.publish(self.model.state_dict(), self.version)
                self.state.heartbeat(WORLD_MODEL_ACTOR)
                self.metrics.log({"weights_version": float(self.version), **self.losses})
                last_publish = now
            if now - last_ckpt >= CHECKPOINT_EVERY_S:
                self.checkpoint()
                last_ckpt = now
        self.checkpoint()
        if self.mirror is not None:
            self.mirror.close()
        return self.info()

    def checkpoint(self) -> Path:
        """Write the model, its optimiser and the counters, atomically."""
        final = checkpoint_dir(self.run_dir)
        final.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(),
            "trainer": self.trainer.state_dict(),
            "counters": {"version": self.version, "transitions": self.transitions},
            "last_id": self.last_id,
        }
        fd, tmp = tempfile.mkstemp(prefix=".world_model.", suffix=".tmp", dir=final)
        os.close(fd)
        try:
            torch.save(state, tmp)
            # One rename over the old file: a kill at any moment leaves one whole checkpoint.
            os.replace(tmp, final / CHECKPOINT_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if self.mirror is not None:
            self.mirror.push()
        return final

    def _restore(self) -> bool:
        path = checkpoint_dir(self.run_dir) / CHECKPOINT_FILE
        if not path.is_file() and self.mirror is not None:
            rel = path.relative_to(self.run_dir).as_posix()
            try:
                storage.download(self.mirror.loc, rel, path)
            except FileNotFoundError:
                pass  # none stored yet: a fresh model
            except Exception as e:  # storage down: start fresh rather than not at all
                log.warning("cannot fetch %s from %s (%s)", rel, self.mirror.loc.uri, e)
        if not path.is_file():
            return False
        state = torch.load(path, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.trainer.load_state_dict(state["trainer"])
        self.version = int(state["counters"]["version"])
        self.transitions = int(state["counters"]["transitions"])
        # The replay is not saved: start again from the stream's oldest entry still kept.
        log.warning("%s resumed at version %d from %s", WORLD_MODEL_ACTOR, self.version, path)
        return True
