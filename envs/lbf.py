"""Torch-vectorised port of Level-Based Foraging (``lbforaging`` 2.0): ``B`` worlds per call.

Players on a grid load food together: a food of level ``L`` is loaded when the adjacent
players that choose LOAD in the same step have levels summing to at least ``L``; each of them
is paid ``level * L``, normalised by the group's level sum and the food spawned in the episode
(so a team's return is 1.0 when every food is loaded). Actions: NONE, NORTH, SOUTH, WEST, EAST,
LOAD; an illegal action is NONE (the package's rule) and the legal ones are ``action_mask``.
Two players moving onto one cell both stay. The episode ends for real (``terminated``) when no
food is left and is cut (``truncated``, bootstrapped) at ``max_episode_steps``: the package
reports both as ``done``.

Dynamics, observations and rewards follow ``lbforaging.foraging.ForagingEnv`` step for step
(tests compare whole episodes from the package's own starting states, including its quirks:
a player sees other players within ``2 * sight`` cells of the window's corner, food only
inside the window; the food search order N, S, W, E). New episodes are drawn from the
package's distribution (players uniform over free cells, avoiding where the last episode left
the others; food off the border, not next to or two cells in line with other food; levels as
the package sets them) by a torch generator, not the package's numpy one.

Registered as ``lbf:<env id>`` for the package's vector-observation ids
(``Foraging[-2s]-<S>x<S>-<P>p-<F>f[-coop]-v3``); ``env.kwargs`` take the package's own
argument names (``max_episode_steps``, ``sight``, ``penalty``, ...). The package itself is not
needed. Observations are the package's vectors (``3F + 3P`` wide: each visible food's row,
column, level, then self and each visible player); the global state is every agent's
observation, concatenated, as the ``gym:`` adapter builds it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from envs.base import EnvError, Observation, StepResult, WorldBatchEnv, check_at_least

if TYPE_CHECKING:
    import numpy as np

NONE, NORTH, SOUTH, WEST, EAST, LOAD = range(6)
_DELTA = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (0, 0))
_PLAYER_RGB = ((31, 119, 180), (214, 39, 40), (148, 103, 189), (255, 127, 14), (140, 86, 75))

_ID = re.compile(
    r"Foraging(?P<po>-2s)?-(?P<rows>\d+)x(?P<cols>\d+)-(?P<p>\d+)p-(?P<f>\d+)f"
    r"(?P<coop>-coop)?-v3"
)


def foraging_kwargs(env_id: str) -> dict[str, Any]:
    """The package's arguments for one of its registered vector-observation ids.

    Raises:
        EnvError: an id that is not ``Foraging[-2s]-<S>x<S>-<P>p-<F>f[-coop]-v3``.
    """
    m = _ID.fullmatch(env_id)
    if m is None or m["rows"] != m["cols"]:
        raise EnvError(
            f"lbf: unknown env id '{env_id}'; the native port takes lbforaging's vector-"
            "observation ids, Foraging[-2s]-<S>x<S>-<P>p-<F>f[-coop]-v3 (e.g. lbf:Foraging-"
            "8x8-2p-2f-coop-v3); grid-observation ids go through gym:lbforaging:<id>"
        )
    size = int(m["rows"])
    return {
        "players": int(m["p"]),
        "field_size": size,
        "max_num_food": int(m["f"]),
        "sight": 2 if m["po"] else size,
        "max_episode_steps": 50,
        "force_coop": bool(m["coop"]),
    }


def make_foraging(spec: str, num_envs: int = 1, **kwargs: Any) -> ForagingEnv:
    """``lbf:<env id>``: the id's arguments, then ``kwargs`` (the package's names) over them."""
    return ForagingEnv(num_envs=num_envs, **{**foraging_kwargs(spec), **kwargs})


class ForagingEnv(WorldBatchEnv):
    """``B`` Level-Based Foraging worlds stepped together.

    Args:
        num_envs: ``B``.
        players: ``P`` players.
        field_size: ``S`` (an ``S x S`` grid) or ``(rows, cols)``.
        max_num_food: ``F`` food items spawned per episode (fewer if they do not fit).
        sight: how many cells each way a player sees (the field size: everything).
        max_episode_steps: the time limit.
        force_coop: every food's level is the sum of the (up to) three lowest player levels.
        min_player_level, max_player_level: player levels, uniform in between.
        min_food_level, max_food_level: food levels, uniform in between; ``max_food_level``
            ``None``: the sum of the three lowest player levels.
        penalty: paid by each player of a group whose LOAD fails.
        normalize_reward: divide by the group's level sum and the food spawned.
        observe_agent_levels: players' levels in the observation.
        grid_observation: the package's grid observations (not ported: use ``gym:``).
        device: torch device.
        seed: seeds the episode generator.

    Shapes:
        - actions: ``[B, P]`` long in ``[0, 6)``.
        - obs: ``[B, P, 3F + 3P]`` (``3F + 2P`` without levels); action_mask ``[B, P, 6]``.
    """

    def __init__(
        self,
        num_envs: int = 1,
        players: int = 2,
        field_size: int | tuple[int, int] | list[int] = 8,
        max_num_food: int = 2,
        sight: int = 8,
        max_episode_steps: int = 50,
        force_coop: bool = False,
        min_player_level: int = 1,
        max_player_level: int = 2,
        min_food_level: int = 1,
        max_food_level: int | None = None,
        penalty: float = 0.0,
        normalize_reward: bool = True,
        observe_agent_levels: bool = True,
        grid_observation: bool = False,
        device: str | torch.device = "cpu",
        seed: int | None = None,
    ) -> None:
        if grid_observation:
            raise EnvError(
                "lbf: grid_observation is not ported (vector observations only); use "
                "gym:lbforaging:<id> for the package's grid observations"
            )
        rows, cols = (field_size, field_size) if isinstance(field_size, int) else field_size
        check_at_least(
            num_envs=(num_envs, 1), players=(players, 1), max_num_food=(max_num_food, 1),
            sight=(sight, 1), max_episode_steps=(max_episode_steps, 1), rows=(rows, 3),
            cols=(cols, 3), min_player_level=(min_player_level, 1),
            max_player_level=(max_player_level, min_player_level),
            min_food_level=(min_food_level, 1),
        )  # fmt: skip
        if max_food_level is not None:
            check_at_least(max_food_level=(max_food_level, min_food_level))
        if players > rows * cols:
            raise ValueError(f"players must fit on the {rows}x{cols} field, got {players}")
        self.num_envs, self.n_agents = num_envs, players
        self.rows, self.cols, self.sight = rows, cols, sight
        self.max_num_food = max_num_food
        self.max_episode_steps = self.limit = max_episode_steps
        self.force_coop, self.penalty, self.normalize = force_coop, penalty, normalize_reward
        self.player_levels = (min_player_level, max_player_level)
        self.food_levels = (min_food_level, max_food_level)
        self.observe_levels = observe_agent_levels
        self.device = torch.device(device)
        self._per_player = 3 if observe_agent_levels else 2
        self.obs_dim = self.node_dim = 3 * max_num_food + self._per_player * players
        self.state_dim = players * self.obs_dim
        self.n_nodes = players
        self.action_kind = "discrete"
        self.action_dim = 6
        dev = self.device
        self._delta = torch.tensor(_DELTA, device=dev)
        # Observation order of the players each one sees: itself, then the others in order.
        eye = torch.eye(players, dtype=torch.bool, device=dev)
        self._rank = torch.where(eye, 0, torch.arange(1, players + 1, device=dev).expand_as(eye))
        # Where food may spawn: off the border, nothing in the 3x3 square or the 5-cell plus.
        self._interior = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
        self._interior[1:-1, 1:-1] = True
        self._square = torch.ones(1, 1, 3, 3, device=dev)
        self._plus = torch.zeros(1, 1, 5, 5, device=dev)
        self._plus[0, 0, 2, :], self._plus[0, 0, :, 2] = 1.0, 1.0
        self._seed_generator(seed)
        b = num_envs
        self.pos = torch.zeros(b, players, 2, dtype=torch.long, device=dev)
        self.level = torch.ones(b, players, dtype=torch.long, device=dev)
        self.field = torch.zeros(b, rows, cols, dtype=torch.long, device=dev)
        self.food_pos = torch.zeros(b, max_num_food, 2, dtype=torch.long, device=dev)
        self.food_level = torch.zeros(b, max_num_food, dtype=torch.long, device=dev)
        self.spawned = torch.zeros(b, dtype=torch.float64, device=dev)
        self.steps = torch.zeros(b, dtype=torch.long, device=dev)
        self._placed = torch.zeros(b, dtype=torch.bool, device=dev)
        self._view: tuple[Tensor, Tensor, Tensor] | None = None  # world 0, as last seen
        self._mask: Tensor | None = None  # the legal actions of the last observation

    # -- episodes ----------------------------------------------------------------------------

    def reset_to(self, pos: Tensor, level: Tensor, field: Tensor) -> Observation:
        """Start every world from a given state.

        Args:
            pos: ``[B, P, 2]`` players' (row, column).
            level: ``[B, P]`` players' levels.
            field: ``[B, rows, cols]`` each food's level in its cell, 0 elsewhere.
        """
        self.pos = pos.to(self.device, torch.long).clone()
        self.level = level.to(self.device, torch.long).clone()
        self.field = field.to(self.device, torch.long).clone()
        self._placed[:] = True
        self._index_food(torch.arange(self.num_envs, device=self.device))
        self.steps.zero_()
        self._keep_view()
        return self._observe()

    def _choose(self, free: Tensor) -> tuple[Tensor, Tensor]:
        """A uniformly drawn free cell per row of ``free [K, rows, cols]``, and whether any was."""
        flat = free.flatten(1).float()
        some = flat.sum(1) > 0
        flat[~some] = 1.0
        cell = torch.multinomial(flat, 1, generator=self._gen).squeeze(1)
        return torch.stack([cell // self.cols, cell % self.cols], -1), some

    def _reset_worlds(self, idx: Tensor) -> None:
        k, p, dev = idx.numel(), self.n_agents, self.device
        rows, cols = self.rows, self.cols
        ar = torch.arange(k, device=dev)
        field = torch.zeros(k, rows, cols, dtype=torch.long, device=dev)
        pos, placed = self.pos[idx].clone(), self._placed[idx]
        lo, hi = self.player_levels
        level = torch.randint(lo, hi + 1, (k, p), generator=self._gen, device=dev)
        for j in range(p):  # a free cell: not under another player (where the last episode
            taken = torch.zeros(k, rows, cols, dtype=torch.bool, device=dev)  # left the rest)
            for o in range(p):
                if o != j:
                    mine = placed if o > j else torch.ones_like(placed)
                    taken[ar[mine], pos[mine, o, 0], pos[mine, o, 1]] = True
            pos[:, j], _ = self._choose(~taken)
        players = torch.zeros(k, rows, cols, dtype=torch.bool, device=dev)
        players[ar.unsqueeze(1), pos[..., 0], pos[..., 1]] = True
        three = level.sort(1).values[:, :3].sum(1)
        f_lo, f_hi = self.food_levels
        top = three if f_hi is None else torch.full_like(three, f_hi)
        bottom = top if self.force_coop else torch.full_like(top, f_lo)
        for _ in range(self.max_num_food):
            food = (field > 0).float().unsqueeze(1)
            near = F.conv2d(food, self._square, padding=1) + F.conv2d(food, self._plus, padding=2)
            cell, some = self._choose(self._interior & (near[:, 0] == 0) & ~players)
            u = torch.rand(k, generator=self._gen, device=dev)
            lv = bottom + (u * (top - bottom + 1).double()).long().clamp(max=top - bottom)
            field[ar[some], cell[some, 0], cell[some, 1]] = lv[some]
        self.pos[idx], self.level[idx], self.field[idx] = pos, level, field
        self._placed[idx] = True
        self._index_food(idx)
        self.steps[idx] = 0

    def _index_food(self, idx: Tensor) -> None:
        """The food list of worlds ``idx`` from their field, in row-major order (as observed)."""
        field = self.field[idx].flatten(1)
        cells = field.shape[1]
        order = torch.arange(cells, device=self.device).expand_as(field)
        key = torch.where(field > 0, order, order + cells)
        first = key.sort(1).indices[:, : self.max_num_food]
        self.food_pos[idx] = torch.stack([first // self.cols, first % self.cols], -1)
        self.food_level[idx] = field.gather(1, first)
        self.spawned[idx] = field.sum(1).double()

    # -- dynamics ----------------------------------------------------------------------------

    def _around(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Food levels north, south, west and east of each player ``[B, P]`` (0 off the grid)."""
        b = self.num_envs
        padded = F.pad(self.field, (1, 1, 1, 1)).flatten(1)
        r, c, w = self.pos[..., 0] + 1, self.pos[..., 1] + 1, self.cols + 2

        def at(dr: int, dc: int) -> Tensor:
            return padded.gather(1, ((r + dr) * w + c + dc).view(b, -1)).view_as(r)

        return at(-1, 0), at(1, 0), at(0, -1), at(0, 1)

    def _legal(self) -> Tensor:
        """``[B, P, 6]``: the package's valid actions."""
        north, south, west, east = self._around()
        r, c = self.pos[..., 0], self.pos[..., 1]
        return torch.stack(
            [
                torch.ones_like(r, dtype=torch.bool),
                (r > 0) & (north == 0),
                (r < self.rows - 1) & (south == 0),
                (c > 0) & (west == 0),
                (c < self.cols - 1) & (east == 0),
                (north + south + west + east) > 0,
            ],
            -1,
        )

    def step(self, actions: Tensor) -> StepResult:
        """Move, load, score; worlds whose episode ended start afresh."""
        if actions.dtype.is_floating_point:
            raise TypeError("lbf expects integer actions [B, P]")
        b, p, cols = self.num_envs, self.n_agents, self.cols
        cells = self.rows * cols
        act = actions.to(self.device).long().view(b, p)
        legal = self._mask if self._mask is not None else self._legal()  # the current state's
        act = torch.where(legal.gather(2, act.unsqueeze(-1)).squeeze(-1), act, NONE)
        # Movement: a player moves unless another one heads for the same cell (or stays there).
        target = self.pos + self._delta[act]
        flat = target[..., 0] * cols + target[..., 1]
        heading = torch.zeros(b, cells, dtype=torch.long, device=self.device)
        heading.scatter_add_(1, flat, torch.ones_like(flat))
        alone = heading.gather(1, flat) == 1
        self.pos = torch.where(alone.unsqueeze(-1), target, self.pos)
        # Loading: the package's search order for a loader's food, then one group per food.
        north, south, west, east = self._around()
        r, c = self.pos[..., 0], self.pos[..., 1]
        go_n = (r > 1) & (north > 0)
        go_s = ~go_n & (r < self.rows - 1) & (south > 0)
        go_w = ~go_n & ~go_s & (c > 1) & (west > 0)
        go_e = ~go_n & ~go_s & ~go_w & (c < cols - 1) & (east > 0)
        loader = (act == LOAD) & (go_n | go_s | go_w | go_e)
        fr = r - go_n.long() + go_s.long()
        fc = c - go_w.long() + go_e.long()
        cell = torch.where(loader, fr * cols + fc, cells)  # non-loaders: a spare slot
        group = torch.zeros(b, cells + 1, dtype=torch.long, device=self.device)
        group.scatter_add_(1, cell, torch.where(loader, self.level, 0))
        field = torch.cat([self.field.flatten(1), torch.zeros_like(group[:, :1])], 1)
        food = field.gather(1, cell)
        loaded = group >= field
        loaded[:, cells] = False
        ok = loader & loaded.gather(1, cell)
        pay = (self.level * food).double()
        if self.normalize:
            pay = pay / (group.gather(1, cell).double() * self.spawned.unsqueeze(1))
        zero = torch.zeros_like(pay)
        reward = torch.where(ok, pay, torch.where(loader, zero - self.penalty, zero)).float()
        self.field = torch.where(loaded & (field > 0), 0, field)[:, :cells].view_as(self.field)
        self.food_level = self.field.flatten(1).gather(
            1, self.food_pos[..., 0] * cols + self.food_pos[..., 1]
        )
        # Ends: no food left is real; the step limit is a cut.
        self.steps += 1
        cleared = self.food_level.sum(1) == 0
        truncated = ~cleared & (self.steps >= self.limit)
        return self._end_step(reward, cleared.unsqueeze(1).expand(b, p), truncated)

    # -- observation -------------------------------------------------------------------------

    def _keep_view(self) -> None:
        self._view = (self.pos[0].clone(), self.level[0].clone(), self.field[0].clone())

    def frame(self) -> np.ndarray:
        """World 0 as a grid, ``[H, W, 3]`` uint8.

        Food is green (darker for higher levels), each player a coloured square with one white
        bar per level. After a step that ended world 0's episode: that step, not the next start.
        """
        import numpy as np

        if self._view is None:
            self.reset()
        assert self._view is not None
        pos, level, field = (t.cpu().numpy() for t in self._view)
        c = 32
        img = np.full((self.rows * c + 1, self.cols * c + 1, 3), 240, np.uint8)
        img[::c, :], img[:, ::c] = 200, 200
        top = max(int(field.max()), 1)
        for r, col in zip(*np.nonzero(field), strict=True):
            g = 200 - int(120 * field[r, col] / top)
            img[r * c + 5 : (r + 1) * c - 4, col * c + 5 : (col + 1) * c - 4] = (40, g, 40)
        for i, ((r, col), lv) in enumerate(zip(pos, level, strict=True)):
            y, x = r * c, col * c
            img[y + 7 : y + c - 6, x + 7 : x + c - 6] = _PLAYER_RGB[i % len(_PLAYER_RGB)]
            for k in range(int(lv)):
                img[y + 11 + 4 * k : y + 13 + 4 * k, x + 11 : x + c - 10] = 255
        return img

    def _observe(self) -> Observation:
        b, p, s = self.num_envs, self.n_agents, self.sight
        pos, dev = self.pos, self.device
        corner = pos - pos.clamp(max=s)  # the window's top-left cell (clipped to the grid)
        # Players: self first, then the others in order, each where within 2*sight of the
        # window's corner (the package's test); the rest of the slots (-1, -1, 0).
        rel = pos.unsqueeze(1) - corner.unsqueeze(2)  # [B, P(observer), P, 2]
        seen = ((rel >= 0) & (rel <= 2 * s)).all(-1)
        rank = self._rank.expand(b, p, p)
        order = torch.where(seen, rank, rank + p + 1).sort(-1).indices
        feats = [rel, self.level.unsqueeze(1).expand(b, p, p).unsqueeze(-1)]
        them = torch.cat(feats[: 2 if self.observe_levels else 1], -1)
        them = them.gather(2, order.unsqueeze(-1).expand_as(them))
        blank3 = torch.tensor([-1, -1, 0], device=dev)
        blank = blank3[: self._per_player]
        them = torch.where(seen.gather(2, order).unsqueeze(-1), them, blank)
        # Food: each one inside the window, in row-major order; the rest (-1, -1, 0).
        f = self.max_num_food
        frel = self.food_pos.unsqueeze(1) - corner.unsqueeze(2)  # [B, P, F, 2]
        inside = (frel >= 0).all(-1) & (self.food_pos.unsqueeze(1) <= pos.unsqueeze(2) + s).all(-1)
        fseen = inside & (self.food_level > 0).unsqueeze(1)
        fidx = torch.arange(f, device=dev).expand(b, p, f)
        forder = torch.where(fseen, fidx, fidx + f).sort(-1).indices
        food = torch.cat([frel, self.food_level.unsqueeze(1).expand(b, p, f).unsqueeze(-1)], -1)
        food = food.gather(2, forder.unsqueeze(-1).expand_as(food))
        food = torch.where(fseen.gather(2, forder).unsqueeze(-1), food, blank3)
        obs = torch.cat([food.flatten(2), them.flatten(2)], -1).float()
        self._mask = self._legal()
        return Observation(
            obs=obs,
            state=obs.reshape(b, -1),
            alive=torch.ones(b, p, dtype=torch.bool, device=dev),
            nodes=obs,
            node_pos=torch.zeros(b, p, 2, device=dev),
            node_type=torch.zeros(b, p, dtype=torch.long, device=dev),
            node_mask=torch.ones(b, p, dtype=torch.bool, device=dev),
            action_mask=self._mask,
        )
