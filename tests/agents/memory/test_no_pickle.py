"""Nothing in the shared memory unpickles: not in its source, not on any read path."""

from __future__ import annotations

import inspect
import pickle
import random

import torch

from agents import memory
from agents.memory import ReplayStream, WeightStore
from tests.agents.memory.helpers import redis_test, run_id, state_dict


def test_no_unpickling_code_path_exists() -> None:
    for module in (
        memory,
        memory.codec,
        memory.client,
        memory.bulk,
        memory.keys,
        memory.weights,
        memory.replay,
        memory.runstate,
    ):
        source = inspect.getsource(module)
        assert "import pickle" not in source and "torch.load" not in source


@redis_test
def test_no_pickle_or_torch_load_on_the_read_paths(client, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling called")

    for module, name in [
        (pickle, "loads"),
        (pickle, "load"),
        (pickle, "Unpickler"),
        (torch, "load"),
    ]:
        monkeypatch.setattr(module, name, forbidden)
    run = run_id()
    weights = WeightStore(client, run)
    weights.publish(state_dict(1), version=1)
    version, fetched = weights.fetch()
    assert version == 1 and torch.equal(fetched["layer.weight"], state_dict(1)["layer.weight"])
    stream = ReplayStream(client, run)
    stream.append({"obs": torch.ones(2, 3)}, {"env": 0})
    [(_, chunk, meta)] = stream.tail()
    assert torch.equal(chunk["obs"], torch.ones(2, 3)) and meta == {"env": 0}
    assert torch.equal(stream.sample(1, random.Random(0))[0]["obs"], torch.ones(2, 3))
