"""The training loop every image classifier shares: one epoch of minibatch steps, and an evaluation.

Fine-tuning (engine/vision/finetune.py), the Lab's arms and the autoencoder's classifier all train with
`train_one_epoch` and measure with `evaluate`, like torchvision's reference `train_one_epoch`.
What differs between them is passed in, not branched on inside:

    forward(x)        the part of the network that trains (e.g. everything after the frozen stages)
    get_batch(idx)    (inputs, labels) for a batch of indices, already on the device (cached features,
                      augmented images, ...)
    lr_at(step)       the schedule's multiplier of each group's `base_lr` at this step of the epoch
    cancelled()       polled before every step: the epoch stops within one step
    on_step(...)      progress after every step (the one callback protocol; minGPT's `add_callback`)

Learning rates are set per step from a pure schedule (engine/train/schedules.py), so a resumed run
continues exactly where an uninterrupted one would be.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from engine.core import device as devices
from engine.core.errors import UserError


@dataclass
class EpochStats:
    """Sums over the steps of one epoch (summed, so ranks or chunks can be added up)."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    seconds: float = 0.0
    cancelled: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else float("nan")

    @property
    def acc(self) -> float:
        return self.correct / self.seen if self.seen else float("nan")

    def row(self, epoch: int, val_loss: float, val_acc: float) -> dict:
        """One line of metrics.json."""
        return {"epoch": epoch, "train_loss": round(self.loss, 5), "train_acc": round(self.acc, 4),
                "val_loss": round(val_loss, 5), "val_acc": round(val_acc, 4), "seconds": round(self.seconds, 3)}


def epoch_batches(n: int, batch_size: int, gen: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches for one epoch (shuffled with `gen`); a last batch of 1 joins the previous one
    (BatchNorm in training mode cannot normalise a single sample)."""
    idx = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
    out = list(torch.split(idx, batch_size))
    if len(out) > 1 and len(out[-1]) == 1:
        last = out.pop()  # (not out[-2] = cat(.., out.pop()): the target index is taken after the pop)
        out[-1] = torch.cat([out[-1], last])
    return out


def epoch_gen(seed: int, epoch: int) -> torch.Generator:
    """Per-epoch generator: shuffling and augmentation depend only on (seed, epoch), so a resumed
    run sees exactly the batches an uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def endless_batches(n: int, batch_size: int, g: torch.Generator):
    """An endless stream of shuffled index batches over n examples, epoch after epoch (never a batch
    of 1). For loops that count steps, not passes."""
    while True:
        yield from epoch_batches(n, max(2, min(batch_size, n)), g)


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every parameter group at `factor` times its own base rate (discriminative rates keep their ratios)."""
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def no_progress(step: int, steps: int, n: int, seconds: float, stats: EpochStats) -> None:
    """The on_step protocol: step (0-based) of steps, n images in it, its seconds, the epoch's sums so far."""

def _clip(opt: torch.optim.Optimizer, max_norm: float) -> None:
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], max_norm)


def step(forward: Callable, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *, label_smoothing: float = 0.0,
         scaler=None, dev: torch.device | None = None, amp: torch.dtype | None = None,
         clip_norm: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on one batch: forward (under autocast when `amp`), cross-entropy in fp32,
    backward (scaled by `scaler` for fp16), gradients clipped to `clip_norm` (the language models:
    nanoGPT's 1.0), update. Returns (loss, logits), both detached. A language model's forward returns
    (batch * positions, vocab) logits and y its flattened next tokens.
    A loss that is not a number is returned without stepping: the caller decides what it means."""
    with devices.autocast(dev or x.device, amp):
        logits = forward(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing or 0.0)
    if not math.isfinite(loss.item()):
        return loss.detach(), logits.detach()
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if clip_norm is not None:
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            _clip(opt, clip_norm)
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        if clip_norm is not None:
            _clip(opt, clip_norm)
        opt.step()
    return loss.detach(), logits.detach()


def train_one_epoch(forward: Callable, opt: torch.optim.Optimizer, batches: list, get_batch: Callable,
                    lr_at: Callable[[int], float], *, label_smoothing: float = 0.0, scaler=None,
                    dev: torch.device | None = None, amp: torch.dtype | None = None,
                    cancelled: Callable[[], bool] = lambda: False, on_step: Callable = no_progress,
                    epoch: int = 0, steps: int | None = None) -> EpochStats:
    """One pass over `batches` (index tensors; an iterator needs `steps`): one `step` per batch.

    Under autocast (`amp`, CUDA) the loss is computed in fp32; `scaler` scales it for fp16. A loss
    that is not a number stops training with a clear message rather than writing NaN weights.
    """
    stats = EpochStats()
    t_epoch = time.time()
    n_steps = len(batches) if steps is None else steps
    for i, idx in enumerate(batches):
        if cancelled():
            stats.cancelled = True
            break
        t_step = time.time()
        set_lr(opt, lr_at(i))
        x, y = get_batch(idx)
        loss, logits = step(forward, opt, x, y, label_smoothing=label_smoothing, scaler=scaler, dev=dev, amp=amp)
        if not math.isfinite(loss.item()):
            raise UserError(f"training diverged in epoch {epoch + 1} (the loss is not a number); lower the learning rate")
        stats.loss_sum += loss.item() * len(y)
        stats.correct += int((logits.argmax(1) == y).sum())
        stats.seen += len(y)
        on_step(i, n_steps, len(y), time.time() - t_step, stats)
    stats.seconds = time.time() - t_epoch
    return stats


@torch.inference_mode()
def predict(forward: Callable, inputs: torch.Tensor, *, prepare: Callable = lambda x: x, bs: int = 256,
            dev: torch.device | None = None, amp: torch.dtype | None = None) -> torch.Tensor:
    """Logits (fp32, on the CPU) for a whole tensor of inputs, `bs` at a time. `prepare` turns a
    slice of `inputs` into what `forward` takes on the device (e.g. crop, normalise, copy)."""
    out = []
    for i in range(0, len(inputs), bs):
        x = prepare(inputs[i:i + bs])
        with devices.autocast(dev or x.device, amp):
            out.append(forward(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def metrics(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against labels; NaN for an empty split."""
    if len(labels) == 0:
        return float("nan"), float("nan")
    labels = labels.to(logits.device)
    return F.cross_entropy(logits, labels).item(), (logits.argmax(1) == labels).float().mean().item()


def evaluate(forward: Callable, inputs: torch.Tensor, labels: torch.Tensor, **kwargs) -> tuple[float, float]:
    """(validation loss, validation accuracy) of `forward` on a whole split (see predict)."""
    return metrics(predict(forward, inputs, **kwargs), labels)
