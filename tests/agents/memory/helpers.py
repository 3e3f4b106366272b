"""Helpers the shared-memory tests have in common: sample weights, bit-exact checks, run ids."""

from __future__ import annotations

import uuid

import pytest
import torch

redis_test = pytest.mark.redis

# Same-width integer views make float comparison bit-exact: NaN payloads, -0.0, subnormals.
BIT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(BIT_VIEW[t.dtype]) if t.dtype in BIT_VIEW else t


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a.contiguous()), bits(b.contiguous()))


def state_dict(seed: int = 0, n: int = 64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(n, n, generator=gen),
        "layer.bias": torch.randn(n, generator=gen),
        "steps": torch.tensor(seed, dtype=torch.int64),
    }


def run_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"
