"""The native Multi-Robot Warehouse port must step as rware 2.0 does, step for step.

Each world starts from a state of the package's own (its reset, then robots given shelves to
carry and placed beside the goals with requested ones, so loads, blocked loaded robots,
collisions, deliveries and drops all happen); both then take the same actions, and every
observation and reward must agree. A delivery draws the next request from each side's own
generator: the port's draw is checked to be a shelf not requested, then the package's is copied
over. New episodes are the port's own draws; their invariants are checked separately.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import envs
from envs.rware import WarehouseEnv, warehouse_kwargs

rware = pytest.importorskip("rware")
warehouse = pytest.importorskip("rware.warehouse")


def _package(env_id: str, **over) -> tuple[object, dict]:
    kwargs = {**warehouse_kwargs(env_id), **over}
    reward = kwargs["reward_type"]
    ref = warehouse.Warehouse(**{**kwargs, "reward_type": warehouse.RewardType[reward.upper()]})
    return ref, kwargs


def _state(ref) -> dict[str, torch.Tensor]:
    shelf_index = {id(s): k for k, s in enumerate(ref.shelfs)}
    queued = {id(s) for s in ref.request_queue}
    return {
        "pos": torch.tensor([[[a.y, a.x] for a in ref.agents]]),
        "direction": torch.tensor([[a.dir.value for a in ref.agents]]),
        "carry": torch.tensor(
            [[shelf_index[id(a.carrying_shelf)] if a.carrying_shelf else -1 for a in ref.agents]]
        ),
        "shelf_pos": torch.tensor([[[s.y, s.x] for s in ref.shelfs]]),
        "requested": torch.tensor([[id(s) in queued for s in ref.shelfs]]),
        "delivered": torch.tensor([[a.has_delivered for a in ref.agents]]),
    }


def _stir(ref, rng: np.random.Generator) -> None:
    """Give robots standing under shelves those shelves, and put robot 0 above a goal facing
    it with a requested shelf (when that cell is free)."""
    grid = ref.grid
    for a in ref.agents:
        sid = grid[warehouse._LAYER_SHELFS, a.y, a.x]
        if sid and rng.random() < 0.7:
            a.carrying_shelf = ref.shelfs[sid - 1]
    gx, gy = ref.goals[int(rng.integers(len(ref.goals)))]
    above = (gx, gy - 1)
    a0 = ref.agents[0]
    taken = any((a.x, a.y) == above for a in ref.agents[1:])
    if not taken and rng.random() < 0.8:
        shelf = next(
            s for s in ref.request_queue if not any(a.carrying_shelf is s for a in ref.agents)
        )
        a0.x, a0.y = above
        a0.dir = warehouse.Direction.DOWN
        a0.carrying_shelf = shelf
    for a in ref.agents:
        if a.carrying_shelf is not None:
            a.carrying_shelf.x, a.carrying_shelf.y = a.x, a.y
    ref._recalc_grid()


def _run(env_id: str, seed: int, steps: int, **over) -> dict[str, int]:
    ref, kwargs = _package(env_id, **over)
    ref.reset(seed=seed)
    rng = np.random.default_rng(seed)
    _stir(ref, rng)
    port = WarehouseEnv(num_envs=1, **kwargs, seed=seed)
    obs = port.reset_to(**_state(ref))
    expected = np.stack([ref._make_obs(a) for a in ref.agents])
    np.testing.assert_array_equal(obs.obs[0].numpy(), expected)
    seen = {"deliveries": 0, "moves": 0, "loads": 0, "reward": 0}
    for _ in range(steps):
        # Mostly forward (collisions), turns, and loads/drops.
        acts = rng.choice(5, size=ref.n_agents, p=[0.1, 0.5, 0.12, 0.12, 0.16]).tolist()
        before = _state(ref)
        ref_obs, ref_rew, *_ = ref.step(acts)
        res = port.step(torch.tensor([acts]))
        after = _state(ref)
        np.testing.assert_array_equal(res.reward[0].numpy(), np.array(ref_rew, np.float32))
        left = before["requested"] & ~after["requested"]
        if left.any():  # a delivery: the same shelf left the queue, the port drew a free one
            seen["deliveries"] += int(left.sum())
            mine = port.requested.clone()
            assert not (mine & left).any()
            assert int(mine.sum()) == port.queue
            assert (mine & ~before["requested"]).sum() == left.sum()
            port.requested = after["requested"].clone()
            got = port._observe().obs[0].numpy()
        else:
            got = res.final.obs[0].numpy()
        np.testing.assert_array_equal(got, np.stack(ref_obs))
        for k in ("pos", "direction", "carry", "shelf_pos", "delivered"):
            torch.testing.assert_close(getattr(port, {"direction": "dir"}.get(k, k)), after[k],
                                       check_dtype=False, msg=k)  # fmt: skip
        seen["moves"] += int((after["pos"] != before["pos"]).any(-1).sum())
        seen["loads"] += int((after["carry"] != before["carry"]).sum())
        seen["reward"] += int(np.sum(ref_rew) > 0)
    return seen


@pytest.mark.parametrize(
    "env_id, over",
    [
        ("rware-tiny-2ag-v2", {}),
        ("rware-tiny-4ag-v2", {}),
        ("rware-small-4ag-hard-v2", {}),
        ("rware-tiny-4ag-easy-v2", {"reward_type": "global"}),
        ("rware-tiny-4ag-v2", {"reward_type": "two_stage", "sensor_range": 2}),
        ("rware-tiny-4ag-v2", {"normalised_coordinates": True}),
    ],
    ids=["tiny-2ag", "tiny-4ag", "small-4ag-hard", "global", "two-stage-r2", "normalised"],
)
def test_the_port_steps_as_the_package_does(env_id: str, over: dict) -> None:
    total = {"deliveries": 0, "moves": 0, "loads": 0, "reward": 0}
    for seed in range(12):
        for k, v in _run(env_id, seed, 60, **over).items():
            total[k] += v
    # The runs covered what the rules are about.
    assert total["deliveries"] >= 3 and total["moves"] > 100 and total["loads"] > 10, total


def test_crowded_robots_settle_as_the_package_does() -> None:
    # Sixteen robots on the tiny map: chains, cycles, swaps and merging chains every step.
    total = 0
    for seed in range(6):
        total += _run("rware-tiny-16ag-v2", seed, 40, max_steps=None)["moves"]
    assert total > 100


def test_new_episodes_follow_the_package_rules_and_the_limit_cuts() -> None:
    env = WarehouseEnv(num_envs=64, **{**warehouse_kwargs("rware-tiny-4ag-v2"), "max_steps": 5},
                       seed=3)  # fmt: skip
    obs = env.reset()
    flat = env.pos[..., 0] * env.cols + env.pos[..., 1]
    assert all(len(set(row.tolist())) == 4 for row in flat)  # distinct cells
    assert (env.requested.sum(1) == 4).all() and (env.carry == -1).all()
    assert set(env.dir.flatten().tolist()) == {0, 1, 2, 3}
    assert obs.obs.shape == (64, 4, 71) and obs.state.shape == (64, 284)
    gen = torch.Generator().manual_seed(0)
    for t in range(5):
        res = env.step(torch.randint(0, 5, (64, 4), generator=gen))
        assert not res.terminated.any()
        assert bool(res.truncated.all()) == (t == 4)
    assert (env.steps == 0).all()  # every world started afresh
    img = env.frame()
    assert img.shape == (11 * 24 + 1, 10 * 24 + 1, 3) and img.dtype == np.uint8


def test_registered_as_rware_and_bad_names_say_how_to_fix() -> None:
    env = envs.make("rware:rware-tiny-2ag-v2", num_envs=2, max_steps=50)
    assert isinstance(env, WarehouseEnv) and env.limit == 50
    with pytest.raises(envs.EnvError, match="rware-<tiny"):
        envs.make("rware:rware-huge-2ag-v2", num_envs=1)
    with pytest.raises(envs.EnvError, match="observation_type"):
        envs.make("rware:rware-tiny-2ag-v2", num_envs=1, observation_type="image")
    with pytest.raises(envs.EnvError, match="reward_type"):
        envs.make("rware:rware-tiny-2ag-v2", num_envs=1, reward_type="team")


def test_vectorised_settling_agrees_with_the_package_procedure() -> None:
    # Random crowds on a small grid: robots stay or head for a neighbouring cell, so chains,
    # swaps, rotating cycles and merges all occur; the tensor path (merge-free worlds) and
    # networkx (the package's own procedure) must pick the same movers in every world.
    env = WarehouseEnv(num_envs=512, n_agents=7, layout="x...\n....\n....\n..g.",
                       request_queue_size=1, seed=0)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    cells = env.rows * env.cols
    start = torch.rand(512, cells, generator=gen).topk(7, 1).indices
    step = torch.tensor([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]])[
        torch.randint(0, 5, (512, 7), generator=gen)
    ]
    r = (start // env.cols + step[..., 0]).clamp(0, env.rows - 1)
    c = (start % env.cols + step[..., 1]).clamp(0, env.cols - 1)
    target = r * env.cols + c
    moves = env._settle(start, target)
    for w in range(512):
        assert moves[w].tolist() == env._settle_like_the_package(start[w], target[w]).tolist()
    swaps = (target.unsqueeze(2) == start.unsqueeze(1)) & (
        start.unsqueeze(2) == target.unsqueeze(1)
    )
    assert swaps.any()  # the impossible swap was among the cases
