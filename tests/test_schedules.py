"""The learning-rate schedules every loop shares."""
import math

import pytest

from engine.train import schedules


def test_shapes():
    assert schedules.lr_factor(0, 100, "cosine") == 1.0 and schedules.lr_factor(100, 100, "cosine") == 0.0
    assert schedules.lr_factor(50, 100, "cosine") == pytest.approx(0.5)
    one = [schedules.lr_factor(s, 100, "onecycle") for s in range(101)]
    assert one[0] == pytest.approx(1 / 25) and max(one) == pytest.approx(1.0) and one.index(max(one)) == 25
    assert one[-1] == pytest.approx(1e-4) and all(a <= b for a, b in zip(one[:25], one[1:26]))
    assert schedules.lr_factor(7, 10, "constant") == 1.0
    with pytest.raises(ValueError):
        schedules.lr_factor(1, 10, "sawtooth")


def test_warmup_cosine_is_nanogpts():
    lr, min_lr, warm, total = 2e-3, 1e-4, 10, 100
    for step in range(0, 120, 7):
        if step < warm:
            want = lr * (step + 1) / warm
        else:
            ratio = min(1.0, (step - warm) / (total - warm))
            want = min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)
        assert lr * schedules.warmup_cosine(step, total, warm, floor=min_lr / lr) == pytest.approx(want)
