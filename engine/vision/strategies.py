"""Fine-tuning strategies as data: each is a list of phases, each phase how many stages stay frozen.

    linear    [Phase(k=5)]                      only the new head trains
    partial   [Phase(k)]                        the first k stages are frozen (1..4)
    full      [Phase(k=0)]                      everything; pretrained layers at lr/10
    two-phase [Phase(k=5, 1 epoch), Phase(k=0)] head first, then every layer on a lr ladder (fastai)
    scratch   [Phase(k=0)]                      random init, one rate for every layer

Whether the frozen stages' output can be cached follows from the plan (`cache_plan`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.train import optimizers
from engine.vision.config import FinetuneConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """A stretch of epochs trained with the same frozen stages and one optimizer; the learning-rate
    schedule runs over each phase (two-phase restarts it when everything unfreezes)."""

    first_epoch: int
    epochs: int
    frozen: int            # how many of the 5 stages stay frozen (5: only the new fc trains)
    rates: str = "one"     # one: every trainable parameter at lr | backbone/10 | ladder (see param_groups)

    @property
    def end(self) -> int:
        return self.first_epoch + self.epochs


def phases(cfg: FinetuneConfig) -> list[Phase]:
    """A strategy as data: the phases it trains in for cfg.epochs epochs (None: open-ended)."""
    e = cfg.epochs if cfg.epochs is not None else 10**9
    if cfg.strategy == "linear":
        return [Phase(0, e, 5)]
    if cfg.strategy == "partial":
        return [Phase(0, e, cfg.freeze)]
    if cfg.strategy == "full":
        return [Phase(0, e, 0, "backbone/10")]
    if cfg.strategy == "two-phase":  # fastai's fine_tune: one epoch of the head alone, then everything
        return [Phase(0, 1, 5), Phase(1, max(1, e - 1), 0, "ladder")]
    return [Phase(0, e, 0)]  # scratch


def phase_at(plan: list[Phase], epoch: int) -> Phase:
    """The phase that `epoch` (0-based) belongs to."""
    return next((p for p in plan if epoch < p.end), plan[-1])


def frozen_stages(cfg: FinetuneConfig, epoch: int) -> int:
    """How many of the 5 stages are frozen in `epoch` (0-based). 5 = everything but fc."""
    return phase_at(phases(cfg), epoch).frozen


def cache_plan(cfg: FinetuneConfig) -> tuple[bool, str]:
    """Whether the frozen-feature cache is used, and a sentence for the UI / run.json."""
    if cfg.strategy in ("full", "scratch"):
        return False, "No layers are frozen, so there is nothing to cache: every step runs the whole network."
    if cfg.augment:
        return False, "Augmentation is on: every epoch sees new random versions of the images, so frozen features are recomputed each step (cache off)."
    if not cfg.cache:
        return False, "Feature cache turned off: the frozen layers run on every step."
    if cfg.strategy == "two-phase":
        return True, "Phase 1 (head only) trains on cached features; phase 2 trains the whole network on images."
    return True, "Frozen layers run once; their outputs are cached on disk and the trainable rest trains on them for every epoch."


def make_optimizer(groups: list[dict], cfg: FinetuneConfig) -> torch.optim.Optimizer | None:
    """The minibatch optimizer; None for the linear probe, which fits with its own L-BFGS
    (engine/vision/linear_probe.py) and has no optimizer state beyond the output layer itself."""
    if cfg.optimizer == "lbfgs":
        return None
    return optimizers.make(groups, cfg.optimizer, cfg.weight_decay or 0.0)
