"""The learner ranks' ``torch.distributed`` group (K > 1): rendezvous, backend, collectives.

Runs inside each learner rank. Rank 0 opens a ``TCPStore`` on a free port (on 127.0.0.1 when
every rank shares a node, and gloo is kept on loopback then); the others connect to it and all
join one process group, gloo on CPU and NCCL on CUDA.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

RENDEZVOUS_TIMEOUT = timedelta(seconds=120)


def open_store(host: str, port: int, world_size: int, loopback: bool) -> Any:
    """The rendezvous store: served by rank 0 (``port=0`` picks a free one), else joined."""
    if loopback:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    if port == 0:
        return dist.TCPStore(
            host, 0, world_size, is_master=True, wait_for_workers=False,
            timeout=RENDEZVOUS_TIMEOUT,
        )  # fmt: skip
    return dist.TCPStore(host, port, world_size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)


def init_group(
    store: Any, rank: int, world_size: int, backend: str, device: torch.device, timeout_s: float
) -> None:
    """Join the process group (blocks until all ranks have joined); ``auto`` picks the backend."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip


def all_reduce_mean(t: Tensor) -> Tensor:
    """The mean of ``t`` over every rank (a new tensor)."""
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def timed_all_reduce_hook(spent: list[float]) -> Any:
    """A DDP communication hook that averages gradients and adds its seconds to ``spent[0]``.

    Timed synchronously, without DDP's overlap with the backward pass (benchmarks).
    """

    # No annotations: DDP compares them to its classes, and postponed evaluation turns them
    # into strings.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        tensor = bucket.buffer().div_(dist.get_world_size())
        dist.all_reduce(tensor)
        spent[0] += time.perf_counter() - t0
        fut = torch.futures.Future()  # type: ignore[var-annotated]
        fut.set_result(tensor)
        return fut

    return hook
