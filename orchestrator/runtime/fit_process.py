"""Fitting the world model in a child process while the run steps its envs (in-process runs).

With ``world_model.fit_process`` an in-process learner hands each iteration's model fitting
to a child process and goes on collecting the next real batch; where the env is stepped in a
Python loop (the PettingZoo path) that loop holds one core while the fit uses the other. The
child keeps a mirror of the rank's replay (every new batch's transitions are sent to it once)
and its own model and optimiser; when the rank next needs the model (scoring the next real
batch, then imagining) it waits for the fit and loads the child's weights and optimiser state,
so the rank's own :class:`~agents.world_model.Practice` always holds a complete, checkpointable
copy. The model a rank imagines with is therefore fitted up to the previous real batch, one
batch behind the in-line fit, as on Ray where ``shoal-world-model`` fits beside the learner.

Everything crosses the pipe as ``torch.save`` bytes, so no shared memory is needed (containers
often have a small ``/dev/shm``). If the child dies, the rank keeps the weights of the last fit
it received and starts a new child, synchronised from its replay, at the next fit.
"""

from __future__ import annotations

import io
import multiprocessing as mp
import signal
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch import Tensor

from agents.imagination import Kept
from agents.world_model import ModelTrainer, TransitionBuffer, describe, rebuild, trainer_for


def _dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _cpu(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().cpu() if isinstance(v, Tensor) else v for k, v in state.items()}


def _serve(conn: Connection) -> None:
    """The child: build the model, mirror the replay, fit on request until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        cfg = _loads(conn.recv_bytes())
        torch.set_num_threads(cfg["threads"])
        device = torch.device(cfg["device"])
        model = rebuild(cfg["model_args"]).to(device)
        model.load_state_dict(cfg["model"])
        trainer = trainer_for(model, lr=cfg["lr"], batch_size=cfg["batch_size"])
        if cfg["trainer"] is not None:
            trainer.load_state_dict(cfg["trainer"])
        buffer = TransitionBuffer(cfg["capacity"], device, Kept(*cfg["kept"]))
        buffer.restore(cfg["replay"])
        generator = torch.Generator(device=device).manual_seed(cfg["seed"])
        if cfg["generator"] is not None:
            generator.set_state(cfg["generator"])
    except BaseException:
        conn.send_bytes(_dumps({"error": traceback.format_exc()}))
        return
    conn.send_bytes(_dumps({"ready": True}))
    while True:
        try:
            msg = _loads(conn.recv_bytes())
        except EOFError:
            return
        if msg.get("stop"):
            return
        try:
            for rows in msg["rows"]:
                buffer.append(rows)
            stats = trainer.update(buffer, msg["steps"], generator)
            reply = {
                "stats": stats,
                "model": _cpu(model.state_dict()),
                "trainer": trainer.state_dict(),
                "generator": generator.get_state(),
            }
        except BaseException:
            reply = {"error": traceback.format_exc()}
        try:
            conn.send_bytes(_dumps(reply))
        except OSError:  # the rank closed the pipe (it stopped): nothing is waiting
            return


class FitProcess:
    """A child process fitting ``trainer``'s model on a mirror of ``buffer``.

    Args:
        trainer: the rank's trainer; its model and optimiser receive every finished fit.
        buffer: the rank's replay; the child starts from a copy and is sent new rows.
        generator: the rank's sampling generator, whose state seeds the child's (the child
            then draws its own samples, so a run with a fit process is reproducible).
        device: where the child fits.
        threads: torch threads of the child.
    """

    def __init__(
        self,
        trainer: ModelTrainer,
        buffer: TransitionBuffer,
        generator: torch.Generator | None,
        device: torch.device,
        threads: int = 1,
    ) -> None:
        self.trainer, self.buffer, self.device, self.threads = trainer, buffer, device, threads
        self.seed = int(generator.initial_seed()) if generator is not None else 0
        self.generator_state: Tensor | None = None
        self.proc: Any = None
        self.conn: Connection | None = None
        self.pending = False
        self.restarts = 0

    def _spawn(self) -> None:
        """Start a child that mirrors the replay as it is now."""
        model = self.trainer.model
        kept = self.buffer.kept
        setup = {
            "threads": self.threads,
            "device": str(self.device),
            "model_args": describe(model),
            "kept": [list(kept.keys), list(kept.next_keys), kept.agent_cont],
            "model": _cpu(model.state_dict()),
            "trainer": self.trainer.state_dict() if self.trainer.updates else None,
            "lr": self.trainer.optimizer.param_groups[0]["lr"],
            "batch_size": self.trainer.batch_size,
            "capacity": self.buffer.capacity,
            "replay": self.buffer.newest(len(self.buffer)) if len(self.buffer) else {},
            "seed": self.seed,
            "generator": self.generator_state,
        }
        ctx = mp.get_context("spawn")  # no fork of a process holding torch threads
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child,), name="shoal-wm-fit", daemon=True)
        self.proc.start()
        child.close()
        self.conn = parent
        # The replay goes over the pipe, not with the process's arguments: spawn writes those
        # to the child while holding the pipe's other end, so a child that dies while it
        # starts (a script without `if __name__ == "__main__":` re-runs itself there) would
        # leave that write waiting forever; over the pipe its death is an error here.
        try:
            parent.send_bytes(_dumps(setup))
        except OSError:
            self._forget()
            reply = None
        else:
            reply = self._receive()
        if reply is None:
            raise RuntimeError(
                "the world-model fit process exited while starting (a script that runs "
                'shoal must guard its entry point with `if __name__ == "__main__":`)'
            )

    def _receive(self) -> dict[str, Any] | None:
        """The child's next reply; ``None`` if it died (then it is forgotten)."""
        assert self.conn is not None and self.proc is not None
        while not self.conn.poll(0.05):
            if not self.proc.is_alive():
                self._forget()
                return None
        try:
            reply = _loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self._forget()
            return None
        if "error" in reply:
            self.close()
            raise RuntimeError(f"the world-model fit process failed:\n{reply['error']}")
        return reply

    def _forget(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.proc is not None:
            self.proc.join(timeout=1)
        self.proc = self.conn = None
        self.pending = False
        self.restarts += 1

    def start(self, rows: list[dict[str, Tensor]], steps: int) -> None:
        """Send the transitions the replay gained since the last call; fit ``steps`` times.

        A new child (the first, or after one died) starts from the whole replay instead.
        """
        if self.pending:
            raise RuntimeError("a world-model fit is already running: call collect() first")
        if self.proc is None:
            self._spawn()
            rows = []
        assert self.conn is not None
        msg = {"rows": [_cpu(r) for r in rows], "steps": steps}
        try:
            self.conn.send_bytes(_dumps(msg))
        except (BrokenPipeError, OSError):
            self._forget()
            return
        self.pending = True

    def collect(self) -> dict[str, float]:
        """Wait for the running fit and load its weights and optimiser state into the rank.

        Returns its loss terms (empty when no fit was running, or the child died).
        """
        if not self.pending:
            return {}
        self.pending = False
        reply = self._receive()
        if reply is None:
            return {}
        self.trainer.model.load_state_dict(reply["model"])
        self.trainer.load_state_dict(reply["trainer"])
        self.generator_state = reply["generator"]
        return dict(reply["stats"])

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (it is a daemon, so it also ends with the rank).

        A fit still running is nobody's any more: its child is killed rather than waited for.
        """
        proc, conn, pending = self.proc, self.conn, self.pending
        self.proc = self.conn = None
        self.pending = False
        if pending and proc is not None:
            proc.kill()
        if conn is not None:
            try:
                conn.send_bytes(_dumps({"stop": True}))
            except (BrokenPipeError, OSError):
                pass
            conn.close()
        if proc is not None:
            deadline = time.monotonic() + timeout
            proc.join(timeout=max(deadline - time.monotonic(), 0))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)
