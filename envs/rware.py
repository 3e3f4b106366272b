"""Torch-vectorised port of the Multi-Robot Warehouse (``rware`` 2.0): ``B`` worlds per call.

Robots on a grid fetch requested shelves to the goal cells: a robot under a shelf picks it up
(TOGGLE_LOAD), carries it along the corridors (a loaded robot cannot pass under other
shelves), and a requested shelf carried onto a goal pays its robot 1.0 (``reward_type``
``individual``; ``global`` pays every robot, ``two_stage`` half on delivery and half for
putting the shelf back on a free shelf cell). The delivered shelf stops being requested and a
shelf not requested takes its place in the queue. Actions: NOOP, FORWARD, LEFT, RIGHT (turn),
TOGGLE_LOAD. Episodes never end for real: ``max_steps`` (and ``max_inactivity_steps``) cut
them (``truncated``, bootstrapped), where the package reports ``done``.

Dynamics, observations and rewards follow ``rware.warehouse.Warehouse`` step for step (tests
compare whole episodes from the package's own states), including how it settles robots that
head for the same cell: the moves form a graph of cells; in a part with a cycle only the
robots on the cycle move (none for two robots swapping cells, which is impossible), in a part
without one only the robots on its longest chain, ties broken as ``networkx`` breaks them.
New episodes are drawn from the package's distribution (robots on distinct cells, uniform,
facing a uniform direction; ``request_queue_size`` distinct requested shelves) by a torch
generator, not the package's numpy one; so is each new request.

Registered as ``rware:<env id>`` for the package's vector-observation ids
(``rware-<tiny|small|medium|large>-<N>ag[-easy|-hard]-v2``); ``env.kwargs`` take the package's
own argument names (``max_steps``, ``sensor_range``, ``request_queue_size``,
``reward_type``, ``layout``, ...). The package itself is not needed. Observations are its
flattened vectors: the robot's column, row, whether it carries a shelf, its direction
(one-hot) and whether it is on a corridor, then for each cell of its ``(2r+1)^2`` window (row
by row): a robot there and its direction (one-hot; ``1, 0, 0, 0`` when none), a shelf there
and whether it is requested. The global state is every robot's observation, concatenated.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from envs.base import EnvError, Observation, StepResult, WorldBatchEnv, check_at_least

if TYPE_CHECKING:
    import numpy as np

NOOP, FORWARD, LEFT, RIGHT, TOGGLE_LOAD = range(5)
UP, DOWN, WEST, EAST = range(4)  # the package's Direction: UP, DOWN, LEFT, RIGHT
# (row, column) step of each direction, and the package's turns (UP -> RIGHT -> DOWN -> LEFT).
_STEP = ((-1, 0), (1, 0), (0, -1), (0, 1))
_TURN_RIGHT = (EAST, WEST, UP, DOWN)
_TURN_LEFT = (WEST, EAST, DOWN, UP)
_SIZES = {"tiny": (1, 3), "small": (2, 3), "medium": (2, 5), "large": (3, 5)}
_DIFFICULTY = {"-easy": 2.0, "": 1.0, "-hard": 0.5}
_REWARDS = ("global", "individual", "two_stage")
_ID = re.compile(r"rware-(?P<size>tiny|small|medium|large)-(?P<n>\d+)ag(?P<diff>-easy|-hard)?-v2")
_ROBOT_RGB = ((31, 119, 180), (214, 39, 40), (148, 103, 189), (255, 127, 14), (140, 86, 75))


def warehouse_kwargs(env_id: str) -> dict[str, Any]:
    """The package's arguments for one of its registered vector-observation ids.

    Raises:
        EnvError: an id that is not ``rware-<size>-<N>ag[-easy|-hard]-v2``.
    """
    m = _ID.fullmatch(env_id)
    if m is None:
        raise EnvError(
            f"rware: unknown env id '{env_id}'; the native port takes rware's vector-"
            "observation ids, rware-<tiny|small|medium|large>-<N>ag[-easy|-hard]-v2 (e.g. "
            "rware:rware-tiny-2ag-v2); image-observation ids go through gym:rware:<id>"
        )
    rows, cols = _SIZES[m["size"]]
    n = int(m["n"])
    return {
        "shelf_columns": cols,
        "column_height": 8,
        "shelf_rows": rows,
        "n_agents": n,
        "msg_bits": 0,
        "sensor_range": 1,
        "request_queue_size": int(n * _DIFFICULTY[m["diff"] or ""]),
        "max_inactivity_steps": None,
        "max_steps": 500,
        "reward_type": "individual",
    }


def make_warehouse(spec: str, num_envs: int = 1, **kwargs: Any) -> WarehouseEnv:
    """``rware:<env id>``: the id's arguments, then ``kwargs`` (the package's names) over them."""
    return WarehouseEnv(num_envs=num_envs, **{**warehouse_kwargs(spec), **kwargs})


def _layout(
    shelf_columns: int, column_height: int, shelf_rows: int, layout: str | None
) -> tuple[list[list[bool]], list[tuple[int, int]]]:
    """The corridor map and the goals' (row, column), as the package builds them.

    In the map ``True`` is a corridor cell, ``False`` a shelf's place.
    """
    if layout:
        lines = layout.strip().replace(" ", "").split("\n")
        if any(len(line) != len(lines[0]) for line in lines):
            raise EnvError("rware: layout must be rectangular (every line as long as the first)")
        bad = {ch for line in lines for ch in line if ch.lower() not in "gx."}
        if bad:
            raise EnvError(
                f"rware: layout has {sorted(bad)}; use x (shelf), . (corridor), g (goal)"
            )
        highway = [[ch.lower() in "g." for ch in line] for line in lines]
        goals = [
            (y, x) for y, line in enumerate(lines) for x, ch in enumerate(line) if ch.lower() == "g"
        ]
        if not goals:
            raise EnvError("rware: layout needs at least one goal (g)")
        return highway, goals
    if shelf_columns % 2 != 1:
        raise EnvError(
            f"rware: shelf_columns must be odd (the package's rule), got {shelf_columns}"
        )
    h, w = (column_height + 1) * shelf_rows + 2, 3 * shelf_columns + 1

    def corridor(x: int, y: int) -> bool:
        queue = y > h - (column_height + 3) and x in (w // 2 - 1, w // 2)
        return x % 3 == 0 or y % (column_height + 1) == 0 or y == h - 1 or queue

    return [[corridor(x, y) for x in range(w)] for y in range(h)], [
        (h - 1, w // 2 - 1),
        (h - 1, w // 2),
    ]


class WarehouseEnv(WorldBatchEnv):
    """``B`` Multi-Robot Warehouse worlds stepped together.

    Args:
        num_envs: ``B``.
        shelf_columns, column_height, shelf_rows: the package's generated layout.
        n_agents: ``N`` robots.
        msg_bits: communication bits (not ported: 0).
        sensor_range: ``r``: each robot sees a ``(2r+1) x (2r+1)`` window.
        request_queue_size: how many shelves are requested at once.
        max_inactivity_steps: cut an episode after this many steps without a delivery
            (``None``: never).
        max_steps: the time limit.
        reward_type: ``individual``, ``global`` or ``two_stage`` (or the package's enum).
        layout: the package's layout string (``x`` shelf, ``.`` corridor, ``g`` goal); it
            replaces the three layout numbers.
        observation_type: the package's flattened vectors only.
        normalised_coordinates: the robot's own column and row divided by the grid's.
        device: torch device.
        seed: seeds the episode generator.

    Shapes:
        - actions: ``[B, N]`` long in ``[0, 5)``.
        - obs: ``[B, N, 8 + 7 (2r+1)^2]``.
    """

    def __init__(
        self,
        num_envs: int = 1,
        shelf_columns: int = 3,
        column_height: int = 8,
        shelf_rows: int = 1,
        n_agents: int = 2,
        msg_bits: int = 0,
        sensor_range: int = 1,
        request_queue_size: int = 2,
        max_inactivity_steps: int | None = None,
        max_steps: int | None = 500,
        reward_type: Any = "individual",
        layout: str | None = None,
        observation_type: Any = "flattened",
        normalised_coordinates: bool = False,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> None:
        reward = str(getattr(reward_type, "name", reward_type)).lower()
        if reward not in _REWARDS:
            raise EnvError(
                f"rware: reward_type must be one of {', '.join(_REWARDS)}, not {reward_type!r}"
            )
        kind = str(getattr(observation_type, "name", observation_type)).lower()
        if kind != "flattened":
            raise EnvError(
                f"rware: observation_type {kind} is not ported (flattened vectors only); use "
                "gym:rware:<id> for the package's other observations"
            )
        if msg_bits:
            raise EnvError("rware: msg_bits is not ported (0 only); use gym:rware:<id>")
        check_at_least(
            num_envs=(num_envs, 1), n_agents=(n_agents, 1), sensor_range=(sensor_range, 1),
            request_queue_size=(request_queue_size, 1), shelf_columns=(shelf_columns, 1),
            column_height=(column_height, 1), shelf_rows=(shelf_rows, 1),
        )  # fmt: skip
        for key, value in (
            ("max_steps", max_steps),
            ("max_inactivity_steps", max_inactivity_steps),
        ):
            if value is not None:
                check_at_least(**{key: (value, 1)})
        highway, goals = _layout(shelf_columns, column_height, shelf_rows, layout)
        dev = self.device = torch.device(device)
        self.highway = torch.tensor(highway, dtype=torch.bool, device=dev)
        self.rows, self.cols = self.highway.shape
        cells = self.rows * self.cols
        if n_agents > cells:
            raise EnvError(f"rware: {n_agents} robots do not fit on {self.rows}x{self.cols} cells")
        shelf_cells = (~self.highway).flatten().nonzero().squeeze(1)  # row-major, as the ids
        self.n_shelves = shelf_cells.numel()
        if not 1 <= request_queue_size <= self.n_shelves:
            raise EnvError(
                f"rware: request_queue_size must be in [1, {self.n_shelves}] (the shelves), "
                f"got {request_queue_size}"
            )
        self.num_envs, self.n_agents = num_envs, n_agents
        self.sensor_range, self.queue = sensor_range, request_queue_size
        self.max_steps, self.max_idle = max_steps, max_inactivity_steps
        self.limit = max_steps
        self.reward_type, self.normalised = reward, normalised_coordinates
        self.goals = torch.tensor(goals, device=dev)  # [G, 2] (row, column), the package's order
        self._home = torch.stack([shelf_cells // self.cols, shelf_cells % self.cols], -1)
        window = (2 * sensor_range + 1) ** 2
        self.obs_dim = self.node_dim = 8 + 7 * window
        self.state_dim = n_agents * self.obs_dim
        self.n_nodes = n_agents
        self.action_kind = "discrete"
        self.action_dim = 5
        self._step = torch.tensor(_STEP, device=dev)
        self._right = torch.tensor(_TURN_RIGHT, device=dev)
        self._left = torch.tensor(_TURN_LEFT, device=dev)
        r = sensor_range
        dy, dx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
        self._window = (dy.flatten() * (self.cols + 2 * r) + dx.flatten()).to(dev)
        self._seed_generator(seed)
        b, n = num_envs, n_agents
        self.pos = torch.zeros(b, n, 2, dtype=torch.long, device=dev)  # (row, column)
        self.dir = torch.zeros(b, n, dtype=torch.long, device=dev)
        self.carry = torch.full((b, n), -1, dtype=torch.long, device=dev)  # shelf index or -1
        self.delivered = torch.zeros(b, n, dtype=torch.bool, device=dev)  # two_stage's flag
        self.shelf_pos = self._home.expand(b, -1, -1).clone()
        self.requested = torch.zeros(b, self.n_shelves, dtype=torch.bool, device=dev)
        self.steps = torch.zeros(b, dtype=torch.long, device=dev)
        self.idle = torch.zeros(b, dtype=torch.long, device=dev)
        self._view: tuple[Tensor, ...] | None = None  # world 0, as last seen

    # -- episodes ----------------------------------------------------------------------------

    def reset_to(
        self,
        pos: Tensor,
        direction: Tensor,
        carry: Tensor,
        shelf_pos: Tensor,
        requested: Tensor,
        delivered: Tensor | None = None,
    ) -> Observation:
        """Start every world from a given state.

        Args:
            pos: ``[B, N, 2]`` robots' (row, column).
            direction: ``[B, N]`` in UP, DOWN, LEFT, RIGHT order.
            carry: ``[B, N]`` the index of the shelf each robot carries (``-1``: none).
            shelf_pos: ``[B, S]`` shelves' (row, column), shelves in the package's id order.
            requested: ``[B, S]`` which shelves are requested.
            delivered: ``[B, N]`` two_stage's delivered flag (default none).
        """
        dev = self.device
        self.pos = pos.to(dev, torch.long).clone()
        self.dir = direction.to(dev, torch.long).clone()
        self.carry = carry.to(dev, torch.long).clone()
        self.shelf_pos = shelf_pos.to(dev, torch.long).clone()
        self.requested = requested.to(dev, torch.bool).clone()
        self.delivered = (
            torch.zeros_like(self.carry, dtype=torch.bool)
            if delivered is None
            else delivered.to(dev, torch.bool).clone()
        )
        self.steps.zero_()
        self.idle.zero_()
        self._keep_view()
        return self._observe()

    def _sample(self, k: int, n: int, m: int) -> Tensor:
        """``[k, m]`` distinct indices in ``[0, n)``, uniformly drawn and ordered."""
        keys = torch.rand(k, n, generator=self._gen, device=self.device)
        return keys.topk(m, dim=1).indices

    def _reset_worlds(self, idx: Tensor) -> None:
        k, n = idx.numel(), self.n_agents
        cell = self._sample(k, self.rows * self.cols, n)
        self.pos[idx] = torch.stack([cell // self.cols, cell % self.cols], -1)
        self.dir[idx] = torch.randint(0, 4, (k, n), generator=self._gen, device=self.device)
        self.carry[idx] = -1
        self.delivered[idx] = False
        self.shelf_pos[idx] = self._home
        requested = torch.zeros(k, self.n_shelves, dtype=torch.bool, device=self.device)
        requested.scatter_(1, self._sample(k, self.n_shelves, self.queue), True)
        self.requested[idx] = requested
        self.steps[idx] = 0
        self.idle[idx] = 0

    # -- dynamics ----------------------------------------------------------------------------

    def _grids(self) -> tuple[Tensor, Tensor]:
        """``[B, rows * cols]``: which robot (index + 1) and which shelf (index + 1) is where."""
        b, cells, dev = self.num_envs, self.rows * self.cols, self.device
        robots = torch.zeros(b, cells, dtype=torch.long, device=dev)
        flat = self.pos[..., 0] * self.cols + self.pos[..., 1]
        robots.scatter_(1, flat, torch.arange(1, self.n_agents + 1, device=dev).expand_as(flat))
        shelves = torch.zeros(b, cells, dtype=torch.long, device=dev)
        sflat = self.shelf_pos[..., 0] * self.cols + self.shelf_pos[..., 1]
        ids = torch.arange(1, self.n_shelves + 1, device=dev).expand_as(sflat)
        # Later ids win a shared cell, as the package's grid is written.
        shelves.scatter_reduce_(1, sflat, ids, reduce="amax")
        return robots, shelves

    def _settle(self, start: Tensor, target: Tensor) -> Tensor:
        """``[B, N]``: the robots whose move stands, the package's graph rule (module doc).

        ``start``, ``target``: ``[B, N]`` flat cells; a robot not moving targets its own.
        Worlds where two robots' chains merge (where ``networkx``'s order of equal chains
        decides) are settled by the package's own procedure; the rest in tensors.
        """
        b, n, dev = self.num_envs, self.n_agents, self.device
        agents = torch.arange(n, device=dev)
        # The robot standing on each target cell (itself for a robot staying), or -1.
        on = target.unsqueeze(2) == start.unsqueeze(1)  # [B, i, j]: i heads for j's cell
        nxt = torch.where(on.any(2), on.float().argmax(2), -1)
        cur, length = nxt, torch.zeros(b, n, dtype=torch.long, device=dev)
        for k in range(1, n + 1):
            length = torch.where((length == 0) & (cur == agents), k, length)
            cur = torch.where(cur >= 0, nxt.gather(1, cur.clamp(min=0)), -1)
        in_tree = cur < 0  # the chain ends at a free cell, not in a cycle
        moves = torch.where(in_tree, True, (length > 0) & (length != 2))
        # Chains merging: two robots of a tree heading into one robot's cell or one free cell.
        node = torch.where(nxt >= 0, nxt, n + target)
        heads = torch.zeros(b, n + self.rows * self.cols, dtype=torch.long, device=dev)
        heads.scatter_add_(1, node, in_tree.long())
        merged = (heads > 1).any(1)
        if bool(merged.any()):
            for w in merged.nonzero().squeeze(1).tolist():
                moves[w] = self._settle_like_the_package(start[w], target[w])
        return moves

    def _settle_like_the_package(self, start: Tensor, target: Tensor) -> Tensor:
        """One world's moves by ``rware``'s own procedure (``networkx``, cells as (x, y))."""
        import networkx as nx  # type: ignore[import-untyped]

        cols = self.cols
        cells = [(s % cols, s // cols) for s in start.tolist()]
        goals = [(t % cols, t // cols) for t in target.tolist()]
        robot_at = {c: i for i, c in enumerate(cells)}
        graph = nx.DiGraph()
        for a, t in zip(cells, goals, strict=True):
            graph.add_edge(a, t)
        moves = torch.zeros(len(cells), dtype=torch.bool)
        for comp in [graph.subgraph(c).copy() for c in nx.weakly_connected_components(graph)]:
            try:
                cycle = nx.algorithms.find_cycle(comp)
                if len(cycle) == 2:
                    continue
                path = [edge[0] for edge in cycle]
            except nx.NetworkXNoCycle:
                path = nx.algorithms.dag_longest_path(comp)
            for c in path:
                if c in robot_at:
                    moves[robot_at[c]] = True
        return moves.to(self.device)

    def step(self, actions: Tensor) -> StepResult:
        """Move, turn, load, deliver; worlds whose episode ended start afresh."""
        if actions.dtype.is_floating_point:
            raise TypeError("rware expects integer actions [B, N]")
        b, n, cols, dev = self.num_envs, self.n_agents, self.cols, self.device
        act = actions.to(dev).long().view(b, n)
        robots, shelves = self._grids()
        start = self.pos[..., 0] * cols + self.pos[..., 1]
        ahead = self.pos + self._step[self.dir]
        ahead[..., 0].clamp_(0, self.rows - 1)
        ahead[..., 1].clamp_(0, cols - 1)
        forward = act == FORWARD
        target = torch.where(forward, ahead[..., 0] * cols + ahead[..., 1], start)
        # A loaded robot cannot enter a cell with a standing shelf (one no robot carries).
        loaded = self.carry >= 0
        there = robots.gather(1, target) - 1
        carried_there = (there >= 0) & loaded.gather(1, there.clamp(min=0))
        blocked = loaded & (target != start) & (shelves.gather(1, target) > 0) & ~carried_there
        forward = forward & ~blocked
        target = torch.where(blocked, start, target)
        moves = forward & self._settle(start, target)
        new_pos = torch.stack([target // cols, target % cols], -1)
        self.pos = torch.where(moves.unsqueeze(-1), new_pos, self.pos)
        carrier = moves & loaded
        if bool(carrier.any()):
            w, a = carrier.nonzero(as_tuple=True)
            self.shelf_pos[w, self.carry[w, a]] = self.pos[w, a]
        self.dir = torch.where(act == RIGHT, self._right[self.dir], self.dir)
        self.dir = torch.where(act == LEFT, self._left[self.dir], self.dir)
        reward = torch.zeros(b, n, device=dev)
        toggle = act == TOGGLE_LOAD
        under = shelves.gather(1, start) - 1  # the robot did not move: its cell at the start
        pick = toggle & ~loaded & (under >= 0)
        cell = self.pos[..., 0] * cols + self.pos[..., 1]
        drop = toggle & loaded & ~self.highway.flatten()[cell]
        if self.reward_type == "two_stage":
            reward += (drop & self.delivered).float() * 0.5
        self.delivered &= ~drop
        self.carry = torch.where(pick, under, torch.where(drop, -1, self.carry))
        # Deliveries: a requested shelf on a goal pays and leaves the queue for another.
        robots, shelves = self._grids()
        delivered_any = torch.zeros(b, dtype=torch.bool, device=dev)
        for g in range(self.goals.shape[0]):
            gcell = int(self.goals[g, 0]) * cols + int(self.goals[g, 1])
            shelf = shelves[:, gcell] - 1
            wanted = self.requested.gather(1, shelf.clamp(min=0).unsqueeze(1)).squeeze(1)
            hit = (shelf >= 0) & wanted
            if not bool(hit.any()):
                continue
            w = hit.nonzero().squeeze(1)
            free = (~self.requested[w]).float()
            new = torch.multinomial(free, 1, generator=self._gen).squeeze(1)
            self.requested[w, shelf[w]] = False
            self.requested[w, new] = True
            robot = robots[w, gcell] - 1
            if self.reward_type == "global":
                reward[w] += 1.0
            elif self.reward_type == "individual":
                reward[w, robot] += 1.0
            else:
                reward[w, robot] += 0.5
                self.delivered[w, robot] = True
            delivered_any |= hit
        self.idle = torch.where(delivered_any, 0, self.idle + 1)
        self.steps += 1
        cut = torch.zeros(b, dtype=torch.bool, device=dev)
        if self.max_steps:
            cut |= self.steps >= self.max_steps
        if self.max_idle:
            cut |= self.idle >= self.max_idle
        terminated = torch.zeros(b, n, dtype=torch.bool, device=dev)
        # Deliveries moved nothing: the grids after the moves are the final view's.
        final = self._observe(robots, shelves)
        return self._end_step(reward, terminated, cut, final)

    # -- observation -------------------------------------------------------------------------

    def _keep_view(self) -> None:
        self._view = tuple(
            t[0].clone() for t in (self.pos, self.dir, self.carry, self.shelf_pos, self.requested)
        )

    def frame(self) -> np.ndarray:
        """World 0 as a grid, ``[H, W, 3]`` uint8.

        Corridors light, shelves grey (requested ones orange), goals dark; each robot a
        coloured square with a white bar on the side it faces, a black core when it carries a
        shelf. After a step that ended world 0's episode: that step, not the next start.
        """
        import numpy as np

        if self._view is None:
            self.reset()
        assert self._view is not None
        pos, direction, carry, shelf_pos, requested = (t.cpu().numpy() for t in self._view)
        c = 24
        img = np.full((self.rows * c + 1, self.cols * c + 1, 3), 240, np.uint8)
        img[::c, :], img[:, ::c] = 200, 200
        for r, col in self.goals.cpu().numpy():
            img[r * c + 1 : (r + 1) * c, col * c + 1 : (col + 1) * c] = (60, 60, 60)
        for s, (r, col) in enumerate(shelf_pos):
            rgb = (255, 165, 0) if requested[s] else (150, 150, 150)
            img[r * c + 3 : (r + 1) * c - 2, col * c + 3 : (col + 1) * c - 2] = rgb
        for i, ((r, col), d) in enumerate(zip(pos, direction, strict=True)):
            y, x = r * c, col * c
            img[y + 6 : y + c - 5, x + 6 : x + c - 5] = _ROBOT_RGB[i % len(_ROBOT_RGB)]
            if carry[i] >= 0:
                img[y + 10 : y + c - 9, x + 10 : x + c - 9] = 0
            dy, dx = _STEP[int(d)]
            cy, cx = y + c // 2 + dy * 7, x + c // 2 + dx * 7
            img[cy - 2 : cy + 2, cx - 2 : cx + 2] = 255
        return img

    def _observe(self, robots: Tensor | None = None, shelves: Tensor | None = None) -> Observation:
        """Every robot's flattened view.

        ``robots``, ``shelves``: :meth:`_grids` of the current positions, if already made.
        """
        b, n, r, dev = self.num_envs, self.n_agents, self.sensor_range, self.device
        rows, cols = self.rows, self.cols
        if robots is None or shelves is None:
            robots, shelves = self._grids()
        # Per cell: [robot, its direction one-hot] and [shelf, requested], padded off the map.
        facing = torch.nn.functional.one_hot(self.dir, 4).float()  # [B, N, 4]
        none = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], device=dev)
        robot_feat = torch.cat([torch.ones(b, n, 1, device=dev), facing], -1)
        rid = robots - 1
        cell_robot = torch.where(
            (rid >= 0).unsqueeze(-1),
            robot_feat.gather(1, rid.clamp(min=0).unsqueeze(-1).expand(-1, -1, 5)),
            none,
        )  # [B, cells, 5]
        sid = shelves - 1
        req = self.requested.gather(1, sid.clamp(min=0)).float()
        cell_shelf = torch.stack([(sid >= 0).float(), req * (sid >= 0).float()], -1)
        grid = torch.cat([cell_robot, cell_shelf], -1).view(b, rows, cols, 7)
        padded = grid.new_zeros(b, rows + 2 * r, cols + 2 * r, 7)
        padded[..., 1] = 1.0  # off the map: no robot, facing UP, no shelf
        padded[:, r : r + rows, r : r + cols] = grid
        centre = (self.pos[..., 0] + r) * (cols + 2 * r) + self.pos[..., 1] + r  # [B, N]
        idx = centre.unsqueeze(-1) + self._window  # [B, N, W]
        window = (
            padded.view(b, -1, 7).gather(1, idx.view(b, -1, 1).expand(-1, -1, 7)).view(b, n, -1)
        )
        y, x = self.pos[..., 0].float(), self.pos[..., 1].float()
        if self.normalised:
            x, y = x / (cols - 1), y / (rows - 1)
        on_highway = self.highway.flatten()[self.pos[..., 0] * cols + self.pos[..., 1]]
        own = torch.cat(
            [
                torch.stack([x, y, (self.carry >= 0).float()], -1),
                facing,
                on_highway.float().unsqueeze(-1),
            ],
            -1,
        )
        obs = torch.cat([own, window], -1)
        return Observation(
            obs=obs,
            state=obs.reshape(b, -1),
            alive=torch.ones(b, n, dtype=torch.bool, device=dev),
            nodes=obs,
            node_pos=self.pos.float(),
            node_type=torch.zeros(b, n, dtype=torch.long, device=dev),
            node_mask=torch.ones(b, n, dtype=torch.bool, device=dev),
            action_mask=None,
        )
