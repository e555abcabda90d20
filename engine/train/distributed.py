"""Data-parallel training on PyTorch's own engine: torchrun + DistributedDataParallel.

    torchrun --nproc-per-node 2 -m engine finetune --data ... --out RUN_DIR

torchrun starts one process per GPU (or per CPU worker) and sets RANK, WORLD_SIZE, LOCAL_RANK
and MASTER_ADDR/PORT. setup() reads them and joins the process group (NCCL on CUDA, gloo on
CPU); without them every helper here is a no-op, so the one-process path is unchanged.

How a run is split (vision.finetune):
- every rank builds the same model and the same shuffled batches (seeded per epoch), then keeps
  its slice of each *global* batch (shard_batches): the global batch stays cfg.batch_size and
  the number of steps is the same as with one process;
- DDP averages the gradients, so every rank takes the same optimizer step;
- epoch metrics (loss sum, correct count, image count) are summed over ranks (all_reduce_sums),
  so every rank reports the same numbers;
- BatchNorm computes batch statistics on each rank's slice (not SyncBatchNorm) and DDP copies
  rank 0's running statistics to the others (sync_buffers before evaluation);
- only rank 0 writes run.json, metrics.json, checkpoints, model.safetensors and eval.json; the
  others wait at a barrier after each checkpoint, so a resume sees a complete epoch.
- the frozen-feature cache: rank 0 computes (or loads) it and stores it on disk, the other ranks
  wait (main_first) and then load the same file.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shlex
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_INFO: DistInfo | None = None


def env_info() -> DistInfo:
    """What torchrun's environment variables say (one process when they are absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def setup(device: torch.device | None = None) -> DistInfo:
    """Join torchrun's process group once per process (idempotent); a no-op without torchrun.

    Backend: NCCL when `device` is CUDA, else gloo. The group is torn down at exit.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    info = env_info()
    if info.enabled and not dist.is_initialized():
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        atexit.register(teardown)
        log.info("rank %d of %d joined (%s)", info.rank, info.world_size, dist.get_backend())
    _INFO = info
    return info


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def info() -> DistInfo:
    return _INFO if _INFO is not None else DistInfo()


def is_main() -> bool:
    return info().is_main


def local_device(dev: torch.device) -> torch.device:
    """Under torchrun each process drives its own GPU: cuda -> cuda:LOCAL_RANK."""
    if dev.type == "cuda" and info().enabled:
        return torch.device("cuda", info().local_rank)
    return dev


def barrier() -> None:
    if info().enabled:
        dist.barrier()


@contextmanager
def main_first():
    """Rank 0 runs the block first (e.g. fills a disk cache); the others run it after it finished."""
    if info().enabled and not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if info().enabled and is_main():
            dist.barrier()


def shard_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's slice of every global batch (rank::world_size), same number of steps on every rank.

    A last global batch too small to give every rank 2 samples joins the previous one
    (BatchNorm in training mode cannot normalise a single sample).
    """
    world = info().world_size
    if world <= 1:
        return batches
    batches = list(batches)
    if len(batches) > 1 and len(batches[-1]) < 2 * world:
        last = batches.pop()
        batches[-1] = torch.cat([batches[-1], last])
    return [b[info().rank::world] for b in batches]


def all_reduce_sums(*values: float, device: torch.device | None = None) -> list[float]:
    """Sum numbers over all ranks (float64); returns them unchanged with one process."""
    if not info().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device if device is not None and device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sync_buffers(model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank, so evaluation agrees."""
    if not info().enabled:
        return
    for b in model.buffers():
        if b.is_floating_point() or b.dtype in (torch.int64, torch.int32):
            tmp = b.contiguous()
            dist.broadcast(tmp, src=0)
            if tmp.data_ptr() != b.data_ptr():
                b.copy_(tmp)


class _Forward(nn.Module):
    """Calls `fn(model, x)`; lets DDP wrap the trainable rest of a partly frozen model."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, x):
        return self.fn(self.model, x)


def wrap(model: nn.Module, fn, device: torch.device) -> nn.Module:
    """A module computing `fn(model, x)`: wrapped in DistributedDataParallel under torchrun.

    Only parameters with requires_grad take part, so call it after freezing (and again when the
    frozen part changes). One process: the plain module, no overhead.
    """
    net = _Forward(model, fn)
    if not info().enabled:
        return net
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(net, device_ids=ids)  # buffers (BatchNorm statistics) follow rank 0 at every forward


# ----------------------------------------------------------------------------- launching
def torchrun_command(cfg, nproc: int = 2, out: str = "RUN_DIR", nnodes: int = 1) -> str:
    """The shell command that runs `cfg` (a vision.FinetuneConfig) data-parallel with torchrun.

    One node: `torchrun --nproc-per-node N -m engine finetune ...`; several nodes add
    --nnodes, --node-rank and a rendezvous endpoint (run the same command on each node with its
    own --node-rank). Options equal to the CLI defaults are left out.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError("nproc must be a positive integer")
    if not isinstance(nnodes, int) or nnodes < 1:
        raise ValueError("nnodes must be a positive integer")

    parts = ["torchrun", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        parts += ["--nnodes", str(nnodes), "--node-rank", "NODE_RANK", "--rdzv-backend", "c10d",
                  "--rdzv-endpoint", "HOST:29500", "--rdzv-id", "finetune"]
    parts += ["-m", "engine", "finetune", "--data", cfg.data]
    for f in dataclasses.fields(cfg):  # the config's own defaults (None: the recipe's) are left out
        value = getattr(cfg, f.name)
        if f.name in ("data", "cache", "augment", "bn_adapt") or (f.name == "freeze" and cfg.strategy != "partial"):
            continue
        if value is not None and value != f.default:
            parts += [f"--{f.name.replace('_', '-')}", str(value)]
    if cfg.augment is not None:
        parts += ["--augment", ",".join(cfg.augment) or "none"]
    if cfg.bn_adapt is not None:
        parts.append("--bn-adapt" if cfg.bn_adapt else "--no-bn-adapt")
    if not cfg.cache:
        parts.append("--no-cache")
    parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)
