"""A learner rank's world model, built from the ``world_model`` section (in-process runs).

The rank keeps a replay of its real transitions, fits the model after every real batch and
learns from imagined branches as well (``agents/world_model.py``); with
``world_model.oracle`` the branches are stepped by a second copy of the true env instead,
the upper bound of what a model could give.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from agents.fitting import BehindFit, Fitting, InlineFit, NoFit
from agents.imagination import (
    EntityWorld,
    EnvDynamics,
    LearnedDynamics,
    ObservationWorld,
    World,
    kept_for,
)
from agents.world_model import Practice, TransitionBuffer, branches
from envs import EnvError, VecMultiAgentEnv
from orchestrator.config import Config
from orchestrator.runtime.fit_process import FitProcess
from policies.actor_critic import Policy
from policies.memory import MEMORY
from policies.observation_model import ObservationWorldModel
from policies.world_model import EntityWorldModel

if TYPE_CHECKING:
    from agents.algorithm import Algorithm
    from agents.memory import WeightStore
    from agents.rollout import RolloutBatch

# On Ray: the actor that trains the model, and the weight store it publishes to.
WORLD_MODEL_ACTOR = "shoal-world-model"
WORLD_MODEL_WEIGHTS = "world_model"


def sees_entities(env: VecMultiAgentEnv) -> bool:
    """Whether ``env`` can turn entity graphs into observations (what the entity model needs)."""
    try:
        env.observe_entities(env.reset(seed=0).nodes)
    except NotImplementedError:
        return False
    return True


def architecture(cfg: Config, env: VecMultiAgentEnv) -> str:
    """``entity`` or ``observation``: what ``world_model.architecture`` means for ``env``.

    ``auto`` is the entity model where the env can show imagined entity graphs to the policy
    (it was measured there first), the observation model elsewhere.
    """
    arch = cfg.world_model.architecture
    if arch == "auto":
        return "entity" if cfg.world_model.oracle or sees_entities(env) else "observation"
    return arch


def group_index(policy: Policy) -> list[int] | None:
    """Each agent's group index under agent groups, else ``None``."""
    groups = getattr(policy, "groups", None)
    if not groups:
        return None
    index = [0] * sum(len(g.agents) for g in groups)
    for gi, g in enumerate(groups):
        for i in g.agents:
            index[i] = gi
    return index


def check_env(cfg: Config, env: VecMultiAgentEnv) -> None:
    """Check that imagination can use ``env`` with the configured world model.

    Raises:
        EnvError: naming what the env lacks.
    """
    name, wm = type(env).__name__, cfg.world_model
    # auto falls back to the observation model, except for the oracle, which needs entities.
    entity = wm.architecture == "entity" or (wm.architecture == "auto" and wm.oracle)
    if entity and not sees_entities(env):
        raise EnvError(
            f"world_model.architecture=entity: {name} cannot turn imagined entity graphs into "
            "observations (it has no observe_entities); world_model.architecture=observation "
            "(or auto) learns from observations and runs on any env"
        )
    if wm.oracle and not hasattr(env, "set_entities"):
        raise EnvError(f"world_model.oracle: {name} cannot be put in a given state")
    if wm.reward_from != "transition" and architecture(cfg, env) == "entity":
        raise EnvError(
            f"world_model.reward_from={wm.reward_from}: only the observation model has it, and "
            f"{name} gets the entity model; add world_model.architecture=observation"
        )


def build_model(
    cfg: Config, env: VecMultiAgentEnv, policy: Policy
) -> EntityWorldModel | ObservationWorldModel:
    """The world model ``world_model`` describes for ``env`` and the ``policy`` that practises.

    Every process that holds the model builds it here (the learner rank, the world-model
    actor), and so does a rollout worker to learn what its batches must carry.
    """
    wm = cfg.world_model
    if architecture(cfg, env) == "observation":
        return wm.build_observation(env, policy.input_keys, group_index(policy))
    return wm.build(env)


def world_keys(cfg: Config, env: VecMultiAgentEnv, policy: Policy) -> tuple[str, ...]:
    """The observation fields the world model is made of (what batches and the stream carry)."""
    return kept_for(build_model(cfg, env, policy)).keys


def build_practice(
    cfg: Config,
    real_samples: int,
    device: torch.device,
    policy: Policy,
    all_reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
    world_size: int = 1,
) -> Practice:
    """The rank's world model, trainer, replay and imagination, ready for its first batch.

    Args:
        cfg: the run config (``world_model``, ``env``, ``train.seed``).
        real_samples: env steps in one real batch of this rank (``T * B``).
        device: where the model and replay live.
        policy: the policy that will practise: an observation model predicts the fields it
            reads, and gives each agent its group's identity.
        all_reduce_mean: on ``world_size`` > 1 ranks that fit the model themselves (no
            ``shoal-world-model`` actor), averages the fit's gradients over the ranks; each
            rank samples ``world_model.batch_size / K`` transitions of its own shard a step.
        world_size: ``K``.
    """
    wm, seed = cfg.world_model, cfg.train.seed
    observer = cfg.env.make(1, seed, device)
    check_env(cfg, observer)
    generator = torch.Generator(device=device).manual_seed(seed + 7_777)
    model = build_model(cfg, observer, policy).to(device)
    imagined: World
    if isinstance(model, ObservationWorldModel):
        imagined = ObservationWorld(model, generator)
    else:
        imagined = EntityWorld(LearnedDynamics(model, generator), observer.observe_entities)
    trainer = wm.trainer(model, world_size)
    if world_size > 1:
        trainer.all_reduce_mean = all_reduce_mean
    buffer = TransitionBuffer(wm.replay_capacity, device, imagined.kept)
    fitting: Fitting = InlineFit(trainer)
    if wm.oracle:
        worlds = max(branches(wm.ratio, wm.horizon, real_samples), 1)
        true_env = EnvDynamics(cfg.env.make(worlds, seed + 1, device))
        imagined, fitting = EntityWorld(true_env, observer.observe_entities), NoFit()
    elif wm.fit_process:  # started at the first fit; never on Ray, where the actor fits
        fitting = BehindFit(FitProcess(trainer, buffer, generator, device))
    return Practice(
        model,
        trainer,
        buffer,
        imagined,
        horizon=wm.horizon,
        ratio=wm.ratio,
        warmup_steps=wm.warmup_steps,
        updates_per_iter=wm.updates_per_iter,
        max_disagreement=wm.max_disagreement,
        generator=generator,
        max_error=wm.max_error,
        fitting=fitting,
    )


class ActorFit(Fitting):
    """On Ray the model is fitted in ``shoal-world-model``: imagine with the weights it publishes.

    The rank keeps its replay only for start states and no longer fits the model itself.
    """

    def __init__(self, store: WeightStore, model: torch.nn.Module) -> None:
        self.store, self.model = store, model
        self.version: int | None = None

    def ready(self) -> bool:
        """Fetch weights newer than the ones in use; whether there are any yet."""
        got = self.store.fetch_if_newer(self.version)
        if got is not None:
            self.version, state = got
            self.model.load_state_dict(state)
        return self.version is not None

    def latest_version(self) -> int | None:
        """The newest version the actor published."""
        return self.store.latest_version()


class GroupFit(Fitting):
    """On ``K`` Ray ranks: rank 0 fetches the actor's weights, every rank gets them from it.

    Only rank 0 talks to Redis. Once per iteration (:meth:`sync`, on every rank at the same
    point) rank 0 fetches newer weights and broadcasts their version, and the weights when
    the version changed, so every rank imagines with the same model all iteration.

    Args:
        model: this rank's copy of the world model.
        source: rank 0's :class:`ActorFit`; ``None`` on the other ranks.
        broadcast: sends rank 0's tensor to every rank, in place.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        source: ActorFit | None,
        broadcast: Callable[[torch.Tensor], None],
    ) -> None:
        self.model, self.source, self.broadcast = model, source, broadcast

    def sync(self) -> None:
        """Rank 0 fetches; every rank takes its version (and its weights when they changed)."""
        known = -1
        if self.source is not None:
            self.source.ready()
            known = -1 if self.source.version is None else self.source.version
        version = torch.tensor([known], dtype=torch.long)
        self.broadcast(version)
        got = int(version.item())
        if got < 0 or got == self.version:
            return
        state = self.model.state_dict()
        for value in state.values():
            self.broadcast(value)
        self.model.load_state_dict(state)
        self.version = got

    def ready(self) -> bool:
        """Whether weights have arrived (they change only at :meth:`sync`)."""
        return self.version is not None

    def latest_version(self) -> int | None:
        """The newest version the actor published (known on rank 0)."""
        return self.source.latest_version() if self.source is not None else None


def practise(
    practice: Practice,
    policy: Policy,
    algorithm: Algorithm,
    version: int,
    batch: RolloutBatch,
    env_steps: int,
    lr_frac: float,
    agree: Callable[[bool], bool] = bool,
) -> dict[str, float]:
    """After the real update: score and fit the model on the batch, then learn in imagination.

    ``practice.rounds()`` imagined updates of ``algorithm`` follow, each rolled by the
    ``policy`` the previous one left (its weights ``version``), once warm-up is over and the
    model's held-out error allows it. On ``K`` learner ranks ``agree`` is true only where
    every rank may imagine: then each imagines from its own shard's replay and the imagined
    updates are all-reduced like real ones; else none does.

    With ``world_model.fit_process`` the fit on this batch starts in a child process as soon
    as the batch has joined the replay and runs until the next call needs it: while this
    iteration imagines (with the weights fitted up to the batch before) and the next real
    batch is collected and learned from.

    Returns:
        Statistics for the row: the model's held-out errors and losses (``wm_*``), the
        seconds fitting (with a fit process: waiting for it) and imagining (with its PPO
        updates) took, the share of this
        iteration's samples that were imagined, and the mean team reward per step, real and
        imagined.
    """
    t0 = time.perf_counter()
    practice.fitting.sync()
    stats = practice.remember_and_fit(batch)  # a fit behind starts on the batch here
    t1 = time.perf_counter()
    real = batch.env_steps
    imagined, teams = 0, []
    rounds = practice.rounds() if agree(practice.can_imagine(real, env_steps)) else 0
    for _ in range(rounds):
        img = practice.imagine(policy, real, version)
        live = img.obs["alive"].any(-1)  # [H, B]: worlds still imagined at each step
        teams.append(float((img.rewards.sum(-1) * live).sum() / live.sum().clamp(min=1)))
        algorithm.update(img, lr_frac=lr_frac)
        imagined += int(live.sum())
    t2 = time.perf_counter()
    fit_s = t1 - t0
    if teams:
        stats["imagined_team_reward"] = sum(teams) / len(teams)
    wm_version = practice.fitting.version
    if wm_version is not None:  # on Ray: the actor's weights in use
        stats["wm_weights_version"] = float(wm_version)
        # Versions the actor published beyond the ones this iteration imagined with.
        latest = practice.fitting.latest_version()
        if latest is not None:
            stats["wm_weights_staleness"] = float(max(latest - wm_version, 0))
    stats.update(
        imagined_share=imagined / (imagined + real),
        wm_fit_s=fit_s,
        wm_imagine_s=t2 - t1,
        real_team_reward=float(batch.rewards.sum(-1).mean()),
    )
    return stats


# The newest transitions a checkpoint keeps, so a resumed run fits and imagines at once:
# ~6 MB on spread, where the whole replay would be ten times that every checkpoint.
REPLAY_KEPT = 20_000


def state_dict(practice: Practice) -> dict[str, Any]:
    """The model, its optimiser and the newest replay, for a checkpoint's ``world_model.pt``.

    Without the policy's recurrent states: a resumed run's memory restarts at zero, and so
    do imagined branches from the restored transitions.
    """
    replay = practice.buffer.newest(REPLAY_KEPT)
    return {
        "model": practice.model.state_dict(),
        "trainer": practice.trainer.state_dict(),
        "replay": {k: v for k, v in replay.items() if k != MEMORY},
    }


def load_state_dict(practice: Practice, state: dict[str, Any]) -> None:
    """Restore what :func:`state_dict` saved."""
    practice.model.load_state_dict(state["model"])
    practice.trainer.load_state_dict(state["trainer"])
    practice.buffer.restore(state.get("replay", {}))


def model_from_checkpoint(
    ckpt: dict[str, Any], cfg: Config, env: VecMultiAgentEnv, policy: Policy
) -> EntityWorldModel | ObservationWorldModel:
    """The world model a checkpoint holds, sized for ``env`` and the run's ``policy``.

    Raises:
        ValueError: the run trained without a world model.
    """
    state = ckpt["extra"].get("world_model")
    if state is None:
        raise ValueError(
            f"checkpoint {ckpt['path']} holds no world model: the run trained without "
            "world_model.enabled (e.g. `shoal run spread-gnn-wm`)"
        )
    model = build_model(cfg, env, policy)
    model.load_state_dict(state["model"])
    return model.eval()
