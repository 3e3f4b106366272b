"""Where a world model is fitted: one interface (:class:`Fitting`), one class per placement.

A learner rank's :class:`~agents.world_model.Practice` asks its placement to fit after each real
batch and whether the model is ready to imagine with. In the learner (:class:`InlineFit`), in
a child process that fits while the rank imagines and collects the next batch
(:class:`BehindFit` over ``orchestrator.runtime.fit_process.FitProcess``), in the Ray actor
``shoal-world-model``
(``orchestrator.runtime.world.ActorFit``), or nowhere, for the oracle (:class:`NoFit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

if TYPE_CHECKING:
    from agents.world_model import ModelTrainer, TransitionBuffer


class Fitter(Protocol):
    """Fits the model in a child process while the rank steps its envs (``FitProcess``)."""

    def start(self, rows: list[dict[str, Tensor]], steps: int) -> None:
        """Hand over the replay's new transitions and fit ``steps`` times, without waiting."""
        ...

    def collect(self) -> dict[str, float]:
        """Wait for the fit, load its weights into the model; its loss terms."""
        ...

    def close(self) -> None:
        """Stop fitting elsewhere."""
        ...


class Fitting:
    """Where the world model is fitted: one interface for every placement.

    This base fits nothing and is always ready. :class:`InlineFit` fits in the learner after
    every real batch; :class:`BehindFit` has a child process fit while the next batch is
    collected (``world_model.fit_process``); on Ray the ``shoal-world-model`` actor fits and
    the rank imagines with the weights it publishes (``orchestrator.runtime.world.ActorFit``);
    the oracle needs no fit (:class:`NoFit`).
    """

    learns = False
    """Whether this process fits the model from its own batches."""
    version: int | None = None
    """The version of weights fetched from elsewhere now in use; ``None``: its own."""

    def collect(self) -> dict[str, float] | None:
        """Wait for a fit running elsewhere, load its weights; its loss terms (``None``: none)."""
        return None

    def fit(
        self, buffer: TransitionBuffer, rows: dict[str, Tensor], steps: int,
        generator: torch.Generator | None,
    ) -> dict[str, float] | None:  # fmt: skip
        """The replay gained ``rows``: fit ``steps`` times (its loss terms, or ``None``).

        A fit that runs elsewhere starts here and returns ``None``; its terms come with the
        next :meth:`collect`.
        """
        return None

    def sync(self) -> None:
        """Once per iteration, on every learner rank at the same point: agree on the weights."""

    def ready(self) -> bool:
        """Whether the model has weights to imagine with (fetching newer ones first)."""
        return True

    def latest_version(self) -> int | None:
        """The newest version published elsewhere; ``None`` where the model is fitted here."""
        return None

    def close(self) -> None:
        """Stop whatever fits elsewhere."""


class NoFit(Fitting):
    """Nothing to fit: the oracle imagines with the true env."""


class InlineFit(Fitting):
    """Fit in the learner, after every real batch, before imagining."""

    learns = True

    def __init__(self, trainer: ModelTrainer) -> None:
        self.trainer = trainer

    def fit(
        self, buffer: TransitionBuffer, rows: dict[str, Tensor], steps: int,
        generator: torch.Generator | None,
    ) -> dict[str, float] | None:  # fmt: skip
        """See :class:`Fitting`."""
        return self.trainer.update(buffer, steps, generator)


class BehindFit(Fitting):
    """A child process fits while the rank imagines and collects the next real batch.

    The model imagines with weights fitted up to the batch before.
    """

    learns = True

    def __init__(self, fitter: Fitter) -> None:
        self.fitter = fitter

    def collect(self) -> dict[str, float] | None:
        """See :class:`Fitting`."""
        return self.fitter.collect()

    def fit(
        self, buffer: TransitionBuffer, rows: dict[str, Tensor], steps: int,
        generator: torch.Generator | None,
    ) -> dict[str, float] | None:  # fmt: skip
        """See :class:`Fitting`.

        The child starts on ``rows`` at once and fits while the rank imagines (with the
        weights it already holds) and collects the next batch.
        """
        self.fitter.start([rows], steps)
        return None

    def close(self) -> None:
        """See :class:`Fitting`."""
        self.fitter.close()
