"""Devices: pick the best one, its AMP dtype, memory format, and seeding."""
from __future__ import annotations

import os
import random
from contextlib import nullcontext

import numpy as np
import torch


def best_device() -> torch.device:
    """cuda -> mps -> cpu. TRANSFER_STUDIO_DEVICE=cpu forces the CPU (tests, comparisons)."""
    forced = os.environ.get("TRANSFER_STUDIO_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype worth using on this device, or None for plain fp32.

    CUDA: bf16 where supported (no GradScaler needed), else fp16.
    CPU: bf16 autocast speeds up convolutions ~2.5x on CPUs with AVX512-BF16/AMX and is
    used for *inference* (feature extraction); training on CPU stays fp32 by default.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context when dtype is None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a CPU batch to `device`. On CUDA through pinned memory without blocking: the CPU goes on
    preparing the next batch while the copy and this step's kernels run."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (its small exponent range underflows gradients); a no-op otherwise
    (fp32, and bf16, which has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=device.type == "cuda" and dtype == torch.float16)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def describe(device: torch.device | None = None) -> dict:
    """A small dict for the sidebar and `engine info`."""
    device = device or best_device()
    info = {"device": device.type, "amp_dtype": str(amp_dtype(device)).replace("torch.", "")}
    if device.type == "cuda":
        idx = device.index or 0
        info["name"] = torch.cuda.get_device_name(idx)
        info["memory_gb"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
    else:
        info["name"] = "CPU"
        info["threads"] = torch.get_num_threads()
    return info


def label(device: torch.device | None = None) -> str:
    d = describe(device)
    if d["device"] == "cuda":
        return f"CUDA · {d['name']} ({d['memory_gb']} GB)"
    if d["device"] == "mps":
        return "Apple MPS"
    return f"CPU · {d['threads']} threads"
