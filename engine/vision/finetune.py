"""Fine-tuning a pretrained ConvNet: strategies, training loop, evaluation, prediction.

The flow (torchvision references/classification/train.py, flattened):

    data   = imagedata.training_data(...)          # stored image paths, stratified split, version hash
    source = sources.resolve_vision(arch, weights)  # which weights and why
    model  = build_model(arch, n_classes, source)   # torchvision model, weights loaded safely, new head
    for epoch: loop.train_one_epoch(...); evaluate  # FinetuneRun: phases, best weights, checkpoints

Every backbone is five *stages* (stem, layer1 ... layer4), a pool and a head (engine/models/backbones.py
says which layers those are for each family). Strategies differ in how many stages stay frozen:

    linear    k=5  only the new head trains
    partial   k    the first k stages are frozen (1..4)
    full      k=0  everything trains; pretrained layers at lr/10
    two-phase k=5 for one epoch, then k=0 with discriminative learning rates (fastai fine_tune)
    scratch   k=0  random init

Frozen stages are a pure function of the input, so when nothing random happens to the images
(no augmentation) their output is computed once and cached (engine/vision/feature_cache.py), and the
trainable rest trains on the cached tensors. That is the fast path; it gives the same result
as running the whole network every step, because frozen BatchNorm stays in eval mode either way.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine import jobs
from engine.core import device as devices
from engine.core import workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.models import backbones, sources, store
from engine.train import checkpoints, distributed, loop, recipes, schedules
from engine.vision.config import STRATEGIES, FinetuneConfig
from engine.vision.inference import evaluation_report, predict_logits
from engine.vision.network import (STAGES, adapt_batchnorm, build_model, count_params, forward_from, param_groups,
                                   safe_load_state, save_weights, set_trainable, train_mode, trainable_state)
from engine.vision.preprocess import ImageLoading, augment_batch, center_crop, normalize, run_preprocessing
from engine.vision.strategies import Phase, cache_plan, make_optimizer, phase_at, phases

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 10.0  # at most this often (and always after the last epoch): a save of a trained ResNet and its AdamW state costs ~0.4 s on a CPU, a fifth of a short epoch




def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict, k: int,
                    best_state: dict[str, torch.Tensor]) -> None:
    """last.safetensors (trainable model part, best weights so far, optimizer tensors) and
    last.json (everything else). Frozen stages are not saved: a resume rebuilds them from the
    starting weights and checks their hash. Never pickle."""
    tensors = {f"model.{n}": v.detach().cpu().contiguous() for n, v in trainable_state(model, k).items()}
    tensors.update({f"best.{n}": v.detach().cpu().contiguous() for n, v in best_state.items()})
    checkpoints.save(run_dir / "last", tensors, opt, meta)


def finetune(cfg: FinetuneConfig, out_dir: Path, ctx=None) -> dict:
    """Train according to `cfg`, writing run.json, metrics.json, model.safetensors, last.*, eval.json.

    Returns the summary (best_val_acc, epochs_done, img_s, seconds, weights, ...). With
    ctx.resume it continues from out_dir/last.*; when ctx.cancelled() it stops within one step,
    saves what was learned (checkpoint + evaluation) and returns.
    """
    threads = torch.get_num_threads()
    try:
        run = FinetuneRun(cfg, Path(out_dir), ctx or jobs.Quiet(), threads)
        run.prepare()
        run.restore()
        for epoch in range(run.start_epoch, run.cfg.epochs):
            if not run.train_epoch(epoch):
                break
        return run.finish()
    finally:
        torch.set_num_threads(threads)


def _head_threads(dev: torch.device, head_only: bool, threads: int) -> None:
    """One CPU thread while only the head trains on cached features: its ops are tiny, and waking a
    second thread for each of them cost 100x (4 s vs 0.04 s for 80 steps, measured on a busy 2-core box)."""
    if dev.type == "cpu":
        torch.set_num_threads(1 if head_only else threads)


class FinetuneRun:
    """One fine-tuning run, in the order finetune() calls its steps:

        prepare()          device, data, recipe, model, run.json
        restore()          the last checkpoint when resuming (else a fresh start)
        train_epoch(e)     for each epoch: enter its phase, train (loop.train_one_epoch or the probe's
                           L-BFGS chunk), evaluate, keep the best weights, checkpoint, early stopping
        finish()           best weights -> model.safetensors, evaluation, summary

    The state between the steps lives on the object, as in minGPT's Trainer.
    """

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, ctx, threads: int):
        self.cfg, self.out_dir, self.ctx, self.threads = cfg, out_dir, ctx, threads

    # ------------------------------------------------------------------ set-up
    def prepare(self) -> None:
        from engine.vision import feature_cache  # deferred: imports torch

        cfg, ctx = self.cfg.validate(), self.ctx
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        dev = torch.device(getattr(ctx, "device", None) or devices.best_device())
        distributed.setup(dev)  # under torchrun: join the process group (no-op otherwise)
        self.dev = dev = distributed.local_device(dev)
        # AMP: bf16 (or fp16 with loss scaling) autocast on CUDA for training; on CPU training stays fp32
        # (see engine/core/device.py). cuDNN picks the fastest convolution algorithms for our fixed input shape.
        self.amp = devices.amp_dtype(dev) if dev.type == "cuda" else None
        self.scaler = devices.grad_scaler(dev, self.amp)
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True

        weights = "none" if cfg.strategy == "scratch" else cfg.weights
        source = sources.resolve_vision(cfg.model, weights)  # bad weights fail before any image is read
        ctx.report(phase="loading", message="reading images")
        self.data = data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
        self.pp = pp = run_preprocessing(cfg, source)
        self.n_classes = len(data.classes)
        # every setting left open comes from the recipe book, for this strategy and this many images
        grey = imagedata.looks_grey([p for p, _ in data.train])
        cfg, self.recipe_info = cfg.filled(len(data.train), self.n_classes, source.kind, grey)
        self.cfg = cfg = cfg.validate()
        self.phases = phases(cfg)
        # the settings are valid: decoding starts now, in the background; the model is built meanwhile,
        # and a feature extraction starts on the first batch while the rest decode (ImageLoading)
        self.loading = (ImageLoading([p for p, _ in data.train], pp.resize), ImageLoading([p for p, _ in data.val], pp.resize))
        if source.download:  # auto or imagenet with nothing cached and the network up: fetch, with progress

            store.ensure_vision(cfg.model, report=lambda **p: ctx.report(
                **{**p, "message": f"downloading {cfg.model} ImageNet weights: {store.progress_line(p)}"}), cancelled=ctx.cancelled)
        model = build_model(cfg.model, self.n_classes, source, seed=cfg.seed)
        self.start_hash = feature_cache.weights_hash(model, 5)  # of the starting weights (a resume must start from the same)
        self.model = model = model.to(dev, memory_format=torch.channels_last)

        self.train_y = torch.tensor([y for _, y in data.train], dtype=torch.long)
        self.val_y = torch.tensor([y for _, y in data.val], dtype=torch.long)
        self.val_files = [str(p) for p, _ in data.val]
        most_frozen = max(p.frozen for p in self.phases)
        self.features_id = self.start_hash
        if cfg.bn_adapt and most_frozen > 0:
            # deterministic in the images, so a resume (which rebuilds the frozen stages) repeats it exactly
            ctx.report(phase="loading", message="re-estimating BatchNorm statistics on your images")
            adapt_batchnorm(model, most_frozen, self.train_x, pp, dev)
            self.features_id = f"{self.start_hash}-adabn"

        self.use_cache, cache_reason = cache_plan(cfg)
        counts = {}
        for phase_k in sorted({p.frozen for p in self.phases}, reverse=True):
            set_trainable(model, phase_k)
            counts[f"frozen_{phase_k}"] = count_params(model) | {"frozen_stages": list(STAGES[:phase_k])}
        self.run_info = {
            "kind": "finetune",
            "config": asdict(cfg),
            "classes": data.classes,
            "data": {"version": data.version, "train_images": len(data.train), "val_images": len(data.val),
                     # validation images spread over the classes, for the export's parity check
                     "parity_files": self.val_files[::max(1, len(self.val_files) // 20)][:20]},
            "arch": cfg.model,
            "weights": {"kind": source.kind, "name": source.name, "reason": source.reason},
            "preprocessing": pp.to_dict(),
            "strategy": {"name": cfg.strategy, "description": STRATEGIES[cfg.strategy], "params": counts},
            "feature_cache": {"used": self.use_cache, "reason": cache_reason},
            "recipe": self.recipe_info,
            "device": str(dev),
        }
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "run.json", self.run_info)

    @property
    def train_x(self) -> torch.Tensor:
        return self.loading[0].tensor()  # every training image decoded

    @property
    def val_x(self) -> torch.Tensor:
        return self.loading[1].tensor()

    def restore(self) -> None:
        """Fresh state, or the state of the last checkpoint (ctx.resume)."""
        out_dir = self.out_dir
        self.metrics: list[dict] = []
        self.start_epoch, self.best = 0, {"val_acc": -1.0, "val_loss": float("inf"), "epoch": 0}
        self.best_state: dict[str, torch.Tensor] = {}  # best weights so far: the part that was trainable then
        resume_state = None
        self.seconds_before = self.train_seconds_before = 0.0  # of earlier sessions of this run (a resume)
        if getattr(self.ctx, "resume", False) and (out_dir / "last.json").is_file():
            meta = json.loads((out_dir / "last.json").read_text())
            if meta.get("start_hash") != self.start_hash:
                raise UserError("the starting weights differ from the ones this run began with (e.g. 'auto' now finds other weights); "
                                "resume with the same --weights, or start a new run")
            tensors = safe_load_state(out_dir / "last.safetensors")
            self.model.load_state_dict({n[6:]: v for n, v in tensors.items() if n.startswith("model.")}, strict=False)
            self.best_state = {n[5:]: v for n, v in tensors.items() if n.startswith("best.")}
            self.metrics, self.start_epoch, self.best = meta["metrics"], meta["epoch"], meta["best"]
            resume_state = (tensors, meta["optimizer"], meta.get("opt_phase_k"))
            self.seconds_before, self.train_seconds_before = meta.get("seconds", 0.0), meta.get("train_seconds", 0.0)
            log.info("resuming at epoch %d", self.start_epoch)
        elif getattr(self.ctx, "resume", False):
            raise UserError(f"nothing to resume in {out_dir} (no checkpoint yet); start the run again")

        self.resume_state = resume_state
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # k -> (train features, val features)
        self.opt, self.opt_k, self.net = None, (resume_state[2] if resume_state else None), None
        self.probe = None  # the linear probe's L-BFGS fit (optimizer lbfgs)
        self.step_times: list[float] = []
        self.last_saved, self.unsaved = time.time(), False
        self.images_trained, self.train_seconds = 0, 0.0
        self.epochs_done, self.cancelled, self.early_stopped = self.start_epoch, False, False
        self.k = phase_at(self.phases, self.start_epoch).frozen

    # ------------------------------------------------------------------ one epoch
    def enter_phase(self, phase: "Phase", cached: bool) -> None:
        """Freeze what this phase freezes; a new optimizer (and DDP wrapper) when the phase changes."""
        model, k = self.model, phase.frozen
        set_trainable(model, k)
        if self.opt_k is not None and self.opt_k != k and self.best_state:
            # entering a phase that trains more layers: the best weights so far are the current
            # model's frozen part (still untouched) plus the saved trainable part
            self.best_state = {**{n: v.detach().clone() for n, v in model.state_dict().items()}, **self.best_state}
        if self.net is None or self.opt_k != k:
            self.opt = make_optimizer(param_groups(model, self.cfg.lr, k, phase.rates), self.cfg)
            if self.opt is not None and self.resume_state is not None and self.resume_state[2] == k:
                checkpoints.load_optimizer(self.opt, self.resume_state[0], self.resume_state[1])
            self.resume_state, self.opt_k = None, k
            # what trains this phase; DistributedDataParallel under torchrun (averages the gradients)
            self.net = distributed.wrap(model, (lambda m, x, k=k: forward_from(m, x, k)) if cached else (lambda m, x: m(x)), self.dev)

    def train_epoch(self, epoch: int) -> bool:
        """Train and evaluate one epoch; False when the run stops here (cancelled or early-stopped)."""
        from engine.vision import feature_cache  # deferred: imports torch

        cfg, ctx, model, dev = self.cfg, self.ctx, self.model, self.dev
        phase = phase_at(self.phases, epoch)
        self.k = k = phase.frozen
        cached = self.use_cache and k > 0
        if cached and k not in self.cache:
            with distributed.main_first():  # rank 0 fills the disk cache, the others then read it
                feats = feature_cache.cached_features(model, k, *self.loading, self.pp, self.features_id,
                                                 self.data.version, cfg.model, dev, ctx)
            if feats is None:  # the user cancelled during extraction
                self.cancelled = True
                return False
            self.cache[k] = feats
        self.enter_phase(phase, cached)
        _head_threads(dev, cached and k == 5, self.threads)
        train_mode(model, k)
        stats = self.probe_epoch(k) if cfg.optimizer == "lbfgs" else self.minibatch_epoch(epoch, phase, cached)
        distributed.sync_buffers(model)  # rank 0's BatchNorm statistics everywhere: every rank evaluates the same model
        self.train_seconds += stats.seconds
        self.images_trained += stats.seen
        self.cancelled = self.cancelled or stats.cancelled
        if self.cancelled and stats.seen == 0:
            return False

        ctx.report(phase="evaluating", epoch=epoch + 1, epochs=cfg.epochs)
        val_in = self.cache[k][1] if cached else self.val_x
        val_loss, val_acc = loop.metrics(predict_logits(model, val_in, k if cached else 0, dev, self.amp, pp=self.pp), self.val_y)
        if self.cancelled:
            return False  # a partial epoch: keep its weights (finish), but do not count it as an epoch
        row = stats.row(epoch + 1, val_loss, val_acc) | {"img_s": round(stats.seen / max(stats.seconds, 1e-9), 1),
                                                          "frozen_stages": k, "cached": cached}
        self.metrics.append(row)
        self.epochs_done = epoch + 1
        if val_acc > self.best["val_acc"] or (val_acc == self.best["val_acc"] and val_loss < self.best["val_loss"]):
            self.best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch + 1}
            self.best_state = {n: v.detach().clone() for n, v in trainable_state(model, k).items()}
        # checkpoint first: metrics.json never lists an epoch that a resume would not start after.
        # Epochs on cached features take milliseconds: then save at most every CHECKPOINT_EVERY_S
        # (and after the loop), or the disk syncs would cost more than the training.
        self.unsaved = True
        if time.time() - self.last_saved >= CHECKPOINT_EVERY_S or epoch + 1 == cfg.epochs:
            self.checkpoint(epoch + 1, k)
            self.last_saved, self.unsaved = time.time(), False
        distributed.barrier()
        ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, epoch_done=epoch + 1, train_loss=row["train_loss"],
                   val_loss=row["val_loss"], val_acc=row["val_acc"],
                   message=f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, val acc {row['val_acc']:.3f}")
        stale = _stale_epochs(self.metrics)
        if cfg.early_stopping and stale >= cfg.early_stopping:
            self.early_stopped = True
            log.info("early stopping after epoch %d (val loss not better for %d epochs)", epoch + 1, stale)
            return False
        return True

    def minibatch_epoch(self, epoch: int, phase: "Phase", cached: bool) -> loop.EpochStats:
        """One pass of minibatch steps (this rank's share of each batch), summed over all ranks."""
        cfg, dev, pp = self.cfg, self.dev, self.pp
        inputs = self.cache[phase.frozen][0] if cached else self.train_x
        gen = loop.epoch_gen(cfg.seed, epoch)
        batches = distributed.shard_batches(loop.epoch_batches(len(inputs), cfg.batch_size, gen))  # this rank's part of each batch
        # the schedule runs over the epochs of the current phase (two-phase restarts it for phase 2)
        done, total = (epoch - phase.first_epoch) * len(batches), phase.epochs * len(batches)

        def get_batch(idx):
            y = devices.to_device(self.train_y[idx], dev)
            if cached:
                x = inputs[idx]
            elif cfg.augment:
                x = normalize(augment_batch(self.train_x[idx], pp, cfg.augment, gen), pp)
            else:
                x = normalize(center_crop(self.train_x[idx], pp.image_size), pp)
            return devices.to_device(x, dev), y

        def progress(step, steps, n, seconds, stats):
            self.step_times.append(seconds)
            avg = sum(self.step_times[-20:]) / len(self.step_times[-20:])
            self.ctx.report(phase="training", epoch=epoch + 1, epochs=cfg.epochs, step=step + 1, steps=steps,
                            loss=stats.loss, acc=stats.acc, img_s=n / max(seconds, 1e-9),
                            eta_s=((cfg.epochs - epoch) * steps - step - 1) * avg)

        stats = loop.train_one_epoch(self.net, self.opt, batches, get_batch,
                                     lambda step: schedules.lr_factor(done + step, total, cfg.schedule),
                                     label_smoothing=cfg.label_smoothing, scaler=self.scaler, dev=dev, amp=self.amp,
                                     cancelled=self.ctx.cancelled, on_step=progress, epoch=epoch)
        stats.loss_sum, stats.correct, stats.seen = distributed.all_reduce_sums(stats.loss_sum, stats.correct, stats.seen, device=dev)
        stats.correct, stats.seen = int(stats.correct), int(stats.seen)
        return stats

    def probe_epoch(self, k: int) -> loop.EpochStats:
        """The linear probe: one chunk of L-BFGS iterations on all cached features is one "epoch".
        (Every rank fits the same probe on all features: nothing to sum.)"""
        t0 = time.time()
        feats = self.cache[k][0]
        if self.probe is None:
            # the cross-validation's batched matmuls are worth every core (on 2: 1.2 s -> 0.6 s), the chunks after it are not
            _head_threads(self.dev, False, self.threads)
            self.probe = _start_probe(self.model, feats, self.train_y, self.n_classes, self.cfg, self.ctx)
            self.recipe_info["weight_decay_chosen"] = self.probe.wd
            _head_threads(self.dev, True, self.threads)
        self.probe.step(LBFGS_ITERS_PER_EPOCH)
        w, b = self.probe.folded()
        with torch.no_grad():
            backbones.head(self.model).weight.copy_(w)
            backbones.head(self.model).bias.copy_(b)
        logits = self.probe.logits(feats).float()
        y = devices.to_device(self.train_y, self.dev)
        return loop.EpochStats(loss_sum=F.cross_entropy(logits, y).item() * len(y), correct=int((logits.argmax(1) == y).sum()),
                               seen=len(y), seconds=time.time() - t0)

    def checkpoint(self, epoch: int, k: int, **extra) -> None:
        if distributed.is_main():
            save_checkpoint(self.out_dir, self.model, self.opt, {"epoch": epoch, "metrics": self.metrics, "best": self.best,
                                                                 "opt_phase_k": k, "start_hash": self.start_hash,
                                                                 "seconds": self.seconds(), "train_seconds": self.train_seconds_before + self.train_seconds,
                                                                 **extra},
                            k, self.best_state)
            workspace.atomic_write_json(self.out_dir / "metrics.json", self.metrics)

    def seconds(self) -> float:
        """Wall-clock seconds of this run over all its sessions (time between a crash and the resume not counted)."""
        return self.seconds_before + time.time() - self.t_start

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """What was learned is kept, also when cancelled mid-epoch: checkpoint, best weights, evaluation, summary."""
        cfg, model, dev, k = self.cfg, self.model, self.dev, self.k
        self.ctx.report(phase="saving", message="saving and evaluating")
        if (self.cancelled or self.unsaved) and self.net is not None:  # (net: a phase was entered)
            # keep what was learned in the unfinished epoch too: resume continues from these weights
            self.checkpoint(self.epochs_done, self.opt_k, cancelled_mid_epoch=self.cancelled)
        # model.safetensors: the best epoch's weights (or the current ones when no epoch finished)
        if self.best_state:
            model.load_state_dict(self.best_state, strict=False)
        if distributed.is_main():
            save_weights(self.out_dir / "model.safetensors", model, {"classes": self.data.classes, "arch": cfg.model,
                                                                     "preprocessing": self.pp.to_dict()})
        # final evaluation of those weights: from the cached features when the last phase used them
        # (the frozen part is the same function), else through the whole network as predict does
        if self.use_cache and k > 0 and k in self.cache:
            logits = predict_logits(model, self.cache[k][1], k, dev, self.amp)
        else:
            _head_threads(dev, False, self.threads)
            logits = predict_logits(model, self.val_x, 0, dev, self.amp, pp=self.pp)
        report = evaluation_report(logits, self.val_y, self.data.classes, self.val_files)
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "eval.json", report)

        best = self.best
        summary = {
            "best_val_acc": round(best["val_acc"], 4) if best["val_acc"] >= 0 else report["accuracy"],
            "best_epoch": best["epoch"],
            "final_val_acc": report["accuracy"],
            "epochs_done": self.epochs_done,
            "epochs": cfg.epochs,
            "img_s": round(self.images_trained / self.train_seconds, 1) if self.train_seconds else None,
            "seconds": round(self.seconds(), 2),  # all sessions of the run (a resumed run counts its earlier ones)
            "train_seconds": round(self.train_seconds_before + self.train_seconds, 3),
            "weights": self.run_info["weights"],
            "strategy": cfg.strategy,
            "arch": cfg.model,
            "data": cfg.data,
            "classes": self.data.classes,
            "feature_cache": self.use_cache,
            "cancelled": self.cancelled,
            "early_stopped": self.early_stopped,
            "device": str(dev),
            "settings": {k: getattr(cfg, k) for k in recipes.RECIPE_FIELDS},
            "from_recipe": self.recipe_info["from_recipe"],
        }
        self.run_info["summary"] = summary
        if distributed.is_main():
            workspace.atomic_write_json(self.out_dir / "run.json", self.run_info)
        distributed.barrier()
        self.ctx.report(phase="finished" if not self.cancelled else "cancelled",
                        message="cancelled: progress saved" if self.cancelled else "done")
        return summary


LBFGS_ITERS_PER_EPOCH = 10


def _start_probe(model: nn.Module, feats: torch.Tensor, train_y: torch.Tensor, n_classes: int, cfg: FinetuneConfig, ctx):
    """The linear probe's fit on the cached features: L2 strength by cross-validation unless set, and
    continuing from the current output layer (a resumed run keeps what it had learned)."""
    from engine.vision import linear_probe  # deferred: imports torch

    x, y = feats.float(), devices.to_device(train_y, feats.device)
    wd = cfg.weight_decay
    if wd is None:
        ctx.report(phase="training", message="choosing the regularisation by cross-validation")
        wd, _ = linear_probe.choose_weight_decay(x, y, n_classes, seed=cfg.seed)
    probe = linear_probe.LogReg(x, y, n_classes, wd)
    probe.start_from(backbones.head(model).weight.detach(), backbones.head(model).bias.detach())
    return probe


def show_setting(name: str, value) -> str:
    """A training setting as a person reads it."""
    if isinstance(value, (list, tuple)):
        return ",".join(value) or "none"
    if value is None:
        return "cross-validated" if name == "weight_decay" else "from the recipe"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe_settings(settings: dict, from_recipe: list[str]) -> str:
    """One line: the training settings, with those that came from the recipe book marked *."""
    parts = [f"{k.replace('_', ' ')} {show_setting(k, settings[k])}" + ("*" if k in from_recipe else "")
             for k in recipes.RECIPE_FIELDS if k in settings]
    return ", ".join(parts) + ("  (* from the recipe)" if from_recipe else "")


def plan_settings(cfg: FinetuneConfig) -> tuple[FinetuneConfig, dict]:
    """The settings a run of `cfg` will train with, before it starts: the recipe for its strategy
    and dataset fills what is None (what the form shows and the CLI prints). Decodes a few
    thumbnails at most (is the data grey?)."""

    cfg.validate()
    source = sources.resolve_vision(cfg.model, "none" if cfg.strategy == "scratch" else cfg.weights)
    data = imagedata.training_data(cfg.data, val_fraction=cfg.val_fraction, seed=cfg.seed)
    filled, info = cfg.filled(len(data.train), len(data.classes), source.kind, imagedata.looks_grey([p for p, _ in data.train]))
    return filled, {**info, "n_train": len(data.train), "n_classes": len(data.classes)}


def _stale_epochs(metrics: list[dict]) -> int:
    """Epochs since the best validation loss (0 when the last epoch is the best)."""
    losses = [m["val_loss"] for m in metrics]
    best_i = min(range(len(losses)), key=lambda i: (losses[i], i)) if losses else 0
    return len(losses) - 1 - best_i if losses else 0


def run_job(ctx) -> dict:
    """The `finetune` job runner (engine.jobs.RUNNERS)."""
    known = set(FinetuneConfig.__dataclass_fields__)
    unknown = sorted(set(ctx.config) - known)
    if unknown:
        raise UserError(f"unknown fine-tune option(s): {', '.join(unknown)}")
    cfg = FinetuneConfig(**ctx.config)
    return finetune(cfg, Path(ctx.run_dir), ctx)
