"""Learning-rate schedules: the multiplier of a parameter group's base rate at a given step.

Every loop in the engine (fine-tuning, the Lab, the autoencoder, both pretraining scripts) takes its
schedule from here. Each is a pure function of (step, total), so a resumed run continues exactly
where an uninterrupted one would be.
"""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "onecycle", "constant")


def cosine(t: float, floor: float = 0.0) -> float:
    """Half a cosine from 1 at t=0 down to `floor` at t=1."""
    t = min(max(t, 0.0), 1.0)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))


def onecycle(t: float) -> float:
    """One-cycle (Smith 2018; fastai / torch OneCycleLR): a cosine warm-up over the first 25% from
    1/25 to 1, then a cosine down to ~0. The warm-up lets pretrained weights take a large rate."""
    t = min(max(t, 0.0), 1.0)
    if t < 0.25:
        return 1 / 25 + (1 - 1 / 25) * 0.5 * (1 - math.cos(math.pi * t / 0.25))
    return cosine((t - 0.25) / 0.75, floor=1e-4)


def lr_factor(step: int, total: int, schedule: str) -> float:
    """The named schedule at `step` of `total` steps (per-step, resume-safe)."""
    t = min(step / max(1, total), 1.0)
    if schedule == "cosine":
        return cosine(t)
    if schedule == "onecycle":
        return onecycle(t)
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then a cosine down to `floor` at `total` (nanoGPT's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine((step - warmup) / max(1, total - warmup), floor)


def warmup_linear(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then a straight line down to 0 at `total` (the usual for
    fine-tuning a language model, as in Hugging Face's get_linear_schedule_with_warmup)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))
