"""The frozen-feature cache: run the frozen stages once, reuse their output for every epoch.

    cache/features/<key>.safetensors   {"train": (N, ...), "val": (M, ...)}

The key is a hash of everything the features depend on: the data version (image contents,
labels, split), the architecture, the exact frozen weights (a hash of their tensors, so random
init with another seed or another weights file never collides), k, the preprocessing and the
extraction dtype. The file is safe to delete; it is rebuilt when needed.

Extraction runs through the fastest engine this machine has for that backbone and image size,
measured once and remembered (cache/extractor.json): PyTorch (inference mode, channels_last, BatchNorm
folded; bf16 autocast as a candidate where the CPU has native bf16) or ONNX Runtime on the same
folded prefix (fp32, equal to PyTorch within ~1e-5). On CUDA, PyTorch with its AMP dtype. Features
are stored as float32 either way.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import torch

from engine.core import device as devices
from engine.core import workspace
from engine.models import backbones
from engine.vision.export import to_onnx

log = logging.getLogger(__name__)

MAX_CACHE_BYTES = 2 * 2**30  # larger feature maps (early k, big images, many images) are not cached on disk


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions; elsewhere bf16 autocast is slower than fp32."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def extraction_dtype(dev: torch.device) -> torch.dtype | None:
    """bf16 where it is fast (features of a frozen net change by ~1e-2 relative, which does not move
    a linear probe's accuracy — measured in `engine bench finetune`), else fp32 (None)."""
    if dev.type == "cuda":
        return devices.amp_dtype(dev)
    if dev.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def weights_hash(model: torch.nn.Module, k: int) -> str:
    h = hashlib.sha256()
    for st in backbones.frozen_modules(model, k):
        for name, t in st.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy when contiguous
    return h.hexdigest()[:16]


def cache_key(weights_id: str, k: int, pp, data_version: str, arch: str, dtype) -> str:
    parts = {"data": data_version, "arch": arch, "k": k, "weights": weights_id,
             "preprocessing": pp.to_dict(), "dtype": str(dtype), "v": 1}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def frozen_prefix(model: torch.nn.Module, k: int, dev: torch.device) -> torch.nn.Module:
    """The first k stages (+ the pool for k=5) as one eval-mode copy with BatchNorm folded into the
    convolutions before it (torch.fx's conv/bn fusion: the same function up to ~1e-5; measured 1.2x
    faster on CPU for resnet18, mobilenet_v3_large and efficientnet_b0). The model is untouched."""

    from torch.fx.experimental.optimization import fuse

    seq = copy.deepcopy(torch.nn.Sequential(*backbones.frozen_modules(model, k))).eval()
    try:
        seq = fuse(seq, inplace=True)
    except Exception as err:  # a family fx cannot trace still works, unfolded
        log.info("conv/bn folding skipped for %s: %s", backbones.entry(model).name, err)
    return seq.to(dev, memory_format=torch.channels_last)


# ----------------------------------------------------------------------------- the extraction engine
@dataclass
class Extractor:
    name: str                                       # "torch fp32" | "torch bf16" | "onnxruntime fp32" | "torch <amp> (CUDA)"
    make: Callable[[], Callable[[torch.Tensor], torch.Tensor]]  # builds the runner: normalised batch -> features
    dtype: torch.dtype | None                       # autocast dtype around it (None: fp32)
    why: str = ""

    @cached_property
    def run(self) -> Callable[[torch.Tensor], torch.Tensor]:  # built on first use (a cache hit never builds it)
        return self.make()

    @property
    def precision(self) -> str:  # what the cached features depend on (onnxruntime and torch fp32 agree to ~1e-5)
        return str(self.dtype) if self.dtype is not None else "None"


def onnx_runner(prefix: Callable[[], torch.nn.Module], pp, threads: int, memo_id: str | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The folded prefix exported to ONNX and run by ONNX Runtime's CPU provider.

    With `memo_id` (arch, k and the frozen weights' hash) the exported graph is kept in cache/onnx/:
    exporting costs ~2 s and loads torch's exporter (torch._dynamo, ~1 s more) in every process, so
    a later run on other images of the same backbone skips both. A damaged file is exported again."""

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    path = sess = None
    if memo_id is not None:
        key = hashlib.sha256(f"{memo_id}|{pp.image_size}|{torch.__version__}|{ort.__version__}".encode()).hexdigest()[:24]
        path = workspace.subdir("cache/onnx") / f"{key}.onnx"
        if path.is_file():
            try:
                sess = ort.InferenceSession(path.read_bytes(), opts, providers=["CPUExecutionProvider"])
            except Exception as err:
                log.warning("ignoring bad ONNX cache %s: %s", path.name, err)
    if sess is None:
        buf = io.BytesIO()
        to_onnx(prefix(), torch.zeros(1, 3, pp.image_size, pp.image_size), buf, ["x"], ["features"])
        sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
        if path is not None:
            tmp = workspace.atomic_path(path)
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
    return lambda x: torch.from_numpy(sess.run(None, {"x": x.contiguous().numpy()})[0])


def _rate(run, dtype, x: torch.Tensor, dev: torch.device, slowest: float) -> float:
    """img/s of one candidate: a warm-up, then the best of two timed batches (one when it is clearly slow)."""
    with torch.inference_mode(), devices.autocast(dev, dtype):
        run(x)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            run(x)
            best = min(best, time.perf_counter() - t)
            if len(x) / best < slowest:
                break
    return len(x) / best


def extractor(model: torch.nn.Module, k: int, pp, dev: torch.device, arch: str, weights_id: str | None = None) -> Extractor:
    """The fastest way this machine runs the first k frozen stages, by measurement, remembered per
    machine, backbone, k and image size. TRANSFER_STUDIO_EXTRACTOR=torch|onnxruntime forces one.
    weights_id (weights_hash of the frozen stages): keeps the exported ONNX graph on disk as well."""
    prefix = lru_cache(maxsize=1)(lambda: frozen_prefix(model, k, dev))
    if dev.type != "cpu":
        dtype = extraction_dtype(dev)
        return Extractor(f"torch {str(dtype).replace('torch.', '')} ({dev.type})", prefix, dtype, "the accelerator's own path")
    threads = torch.get_num_threads()
    candidates: dict[str, tuple[Callable, torch.dtype | None]] = {"torch fp32": (prefix, None)}
    if extraction_dtype(dev) is not None:
        candidates["torch bf16"] = (prefix, torch.bfloat16)
    try:
        import onnxruntime
        memo_id = f"{arch}|k{k}|{weights_id}" if weights_id else None
        candidates["onnxruntime fp32"] = (lambda: onnx_runner(prefix, pp, threads, memo_id), None)
    except ImportError:
        onnxruntime = None
    forced = os.environ.get("TRANSFER_STUDIO_EXTRACTOR")
    if forced:
        name = next((n for n in candidates if n.startswith(forced)), None)
        if name is None:
            raise ValueError(f"TRANSFER_STUDIO_EXTRACTOR={forced}: choose torch or onnxruntime (installed: {', '.join(candidates)})")
        return Extractor(name, *candidates[name], "forced by TRANSFER_STUDIO_EXTRACTOR")
    memo_path = workspace.subdir("cache") / "extractor.json"
    key = "|".join([arch, f"k{k}", str(pp.image_size), f"{threads}t", torch.__version__,
                    getattr(onnxruntime, "__version__", "-"), platform.processor() or platform.machine(), ",".join(candidates)])
    memo = workspace.read_json(memo_path, {})
    built = {}
    if key not in memo:
        x = torch.randn(32, 3, pp.image_size, pp.image_size, generator=torch.Generator().manual_seed(0))
        x = x.contiguous(memory_format=torch.channels_last).to(dev)
        rates: dict[str, float] = {}
        for name, (make, dtype) in candidates.items():
            try:
                built[name] = make()
                rates[name] = _rate(built[name], dtype, x, dev, slowest=max(rates.values(), default=0) / 2)
            except Exception as err:  # an engine that cannot run this network is simply not chosen
                log.info("extractor %s unavailable: %s", name, err)
        memo[key] = {"img_s": {n: round(r, 1) for n, r in rates.items()}, "measured": time.time()}
        workspace.atomic_write_json(memo_path, memo)
    rates = memo[key]["img_s"]
    name = max(rates, key=rates.get)
    make, dtype = candidates[name]
    others = ", ".join(f"{n} {r:.0f}" for n, r in rates.items() if n != name)
    return Extractor(name, (lambda: built[name]) if name in built else make, dtype,
                     f"measured {rates[name]:.0f} img/s" + (f" vs {others}" if others else ""))


@torch.inference_mode()
def extract(prefix: Callable[[torch.Tensor], torch.Tensor], images_uint8: torch.Tensor, pp, dev: torch.device, dtype, ctx=None,
            batch_size: int | None = None, done: int = 0, total: int | None = None) -> torch.Tensor | None:
    """Output of `prefix` (frozen_prefix(), or an Extractor's run) for centre-cropped uint8 images
    (N,3,R,R; a tensor, or an ImageLoading still decoding: each batch waits only for its own images) -> float32 on CPU.

    Returns None when ctx says cancelled. Progress goes to ctx.report(phase="extracting", ...).
    """
    from engine.vision.preprocess import center_crop, normalize  # deferred: imports torch

    # CPU: batches of 32, the size the engines are measured at (600 images at 160 px in bf16 on 2 cores: 3.0 s vs 3.3 s at 128)
    bs = batch_size or (256 if dev.type == "cuda" else 32)
    total = total or len(images_uint8)
    out, t0 = [], time.time()
    for i in range(0, len(images_uint8), bs):
        if ctx is not None and ctx.cancelled():
            return None
        x = normalize(center_crop(images_uint8[i:i + bs], pp.image_size), pp).to(dev)
        with devices.autocast(dev, dtype):
            out.append(prefix(x).float().cpu())
        if ctx is not None:
            n = done + i + len(x)
            rate = n / max(time.time() - t0, 1e-9) if done == 0 else None
            ctx.report(phase="extracting", step=n, steps=total, img_s=rate,
                       message=f"computing frozen features once: {n}/{total} images")
    return torch.cat(out) if out else torch.empty(0)


def cached_features(model, k: int, train_x: torch.Tensor, val_x: torch.Tensor, pp, weights_id: str, data_version: str,
                    arch: str, dev: torch.device, ctx=None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(train features, val features) for frozen stages [0, k): from disk, or computed and stored.

    weights_id: weights_hash() of the starting weights (the frozen stages never change).
    """
    from safetensors.torch import load_file, save_file

    ex = extractor(model, k, pp, dev, arch, weights_id)
    key = cache_key(weights_id, k, pp, data_version, arch, ex.precision)
    path = workspace.subdir("cache/features") / f"{key}.safetensors"
    if path.is_file():
        try:
            t = load_file(str(path))
            if len(t["train"]) == len(train_x) and len(t["val"]) == len(val_x):
                log.info("feature cache hit %s", path.name)
                if ctx is not None:
                    ctx.report(phase="extracting", step=len(train_x) + len(val_x), steps=len(train_x) + len(val_x),
                               message="frozen features loaded from the cache")
                return t["train"].to(dev), t["val"].to(dev)
        except Exception as err:  # a damaged cache file is rebuilt
            log.warning("ignoring bad feature cache %s: %s", path.name, err)
    total = len(train_x) + len(val_x)
    t0 = time.time()
    if ctx is not None:
        ctx.report(phase="extracting", step=0, steps=total, message=f"computing frozen features once with {ex.name} ({ex.why})")
    tr = extract(ex.run, train_x, pp, dev, ex.dtype, ctx, total=total)
    if tr is None:
        return None
    va = extract(ex.run, val_x, pp, dev, ex.dtype, ctx, done=len(train_x), total=total)
    if va is None:
        return None
    tr, va = tr.clone(), va.clone()  # normal tensors (inference-mode tensors cannot take part in autograd)
    log.info("extracted %d feature maps %s in %.2fs with %s (%s)", total, tuple(tr.shape[1:]), time.time() - t0, ex.name, ex.why)
    nbytes = (tr.numel() + va.numel()) * 4
    if nbytes <= MAX_CACHE_BYTES:
        tmp = workspace.atomic_path(path)
        save_file({"train": tr.contiguous(), "val": va.contiguous()}, str(tmp),
                  metadata={"k": str(k), "arch": arch, "data": data_version, "weights": weights_id})
        os.replace(tmp, path)
    return tr.to(dev), va.to(dev)
