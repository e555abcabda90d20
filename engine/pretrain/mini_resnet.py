"""Reproducible pretraining of the bundled mini ResNet-18 (`python -m engine pretrain vision` -> assets/mini-resnet18/).

Supervised on formula-generated colour fractals, procedural textures and Debian's Fashion-MNIST
(no download), resumable (`--resume`), then
measured by the app's own linear probe on generated shapes and the bundled sample; the numbers go
in the model card.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from engine.core import workspace
from engine.core.errors import UserError
from engine.core.workspace import temporary_workspace
from engine.data import fractals, textures, transfer_tasks
from engine.data.fashion_mnist import FMNIST_CLASSES, load_fashion_mnist
from engine.models import sources
from engine.train import schedules
from engine.vision.config import FinetuneConfig

log = logging.getLogger(__name__)

N_FRACTAL_CLASSES = 256  # FractalDB's finding: more classes (distinct shapes) transfer better
N_TEXTURES = len(textures.FAMILIES)
HUE_BINS = 8


@dataclass
class VisionPretrainConfig:
    minutes: float | None = 20.0   # time budget; turned into a fixed step count after timing a few steps
    steps: int | None = None       # exact step count (reproducible); overrides minutes
    seed: int = 0
    image_size: int = 64
    batch_size: int = 64           # a third each: Fashion-MNIST scenes, fractals, textures
    lr: float = 0.05               # SGD nesterov, warmup then cosine to 0
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    threads: int = 1
    out: str = ""                  # default: assets/mini-resnet18
    probe: bool = True             # run the linear-probe transfer measurement afterwards
    fmnist_dir: str = ""           # default FMNIST_DIR
    eval_fractals: int = 1024      # fresh fractal renders for the fractal accuracy
    stats_sample: int = 512        # images of each source used for the normalisation mean/std
    checkpoint_every: int = 200    # steps between resumable training states
    state_dir: str = ""            # default: workspace/cache/pretrain-vision


def _fmnist_batch(images: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator, train: bool = True):
    """n Fashion-MNIST images as uint8 (n, 28, 28) with a random pad-2 crop and horizontal flip."""
    idx = rng.integers(0, len(images), size=n)
    x = images[idx]
    if train:
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2)))
        dy, dx = rng.integers(0, 5, size=2)
        x = padded[:, dy:dy + 28, dx:dx + 28]
        flip = rng.random(n) < 0.5
        x = np.where(flip[:, None, None], x[:, :, ::-1], x)
    return x, labels[idx]


def _to_tensor(gray28: np.ndarray | None, rgb: np.ndarray | None, size: int, mean, std):
    """Gray 28 px and/or RGB uint8 batches -> one normalised float tensor (B, 3, size, size)."""
    import torch
    import torch.nn.functional as F

    parts = []
    if gray28 is not None and len(gray28):
        g = torch.from_numpy(np.array(gray28, dtype=np.uint8)).float().div_(255).unsqueeze(1)
        g = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        parts.append(g.expand(-1, 3, -1, -1))
    if rgb is not None and len(rgb):
        c = torch.from_numpy(np.ascontiguousarray(rgb)).permute(0, 3, 1, 2).float().div_(255)
        if c.shape[-1] != size:
            c = F.interpolate(c, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        parts.append(c)
    x = torch.cat(parts)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def _fmnist_scenes(gray28: np.ndarray, size: int, rng: np.random.Generator, plain_fraction: float = 0.25):
    """Fashion-MNIST garments as scenes: uint8 RGB (n, size, size, 3) and hue-bin labels (-100 = plain grey).

    A scene is the garment, resized to 50-100% of the frame at a random position, used as the
    opacity of a colour near a random hue over a cluttered background.
    """
    import torch
    import torch.nn.functional as F

    n = len(gray28)
    g = torch.from_numpy(np.array(gray28, dtype=np.uint8)).float().div_(255).unsqueeze(1)
    full = F.interpolate(g, size=(size, size), mode="bilinear", align_corners=False).squeeze(1).numpy()
    out = np.repeat(full[..., None], 3, axis=-1)  # plain: grey, full frame
    hue_label = np.full(n, -100, dtype=np.int64)
    scene = rng.random(n) >= plain_fraction
    idx = np.flatnonzero(scene)
    if len(idx):
        bg = fractals.clutter(len(idx), size, rng)
        hue = rng.uniform(0, 1, size=len(idx))
        colour = fractals.hsv_to_rgb(hue, rng.uniform(0.4, 1.0, size=len(idx)), rng.uniform(0.7, 1.0, size=len(idx)))
        for j, i in enumerate(idx):
            s = int(rng.integers(size // 2, size + 1))
            alpha = F.interpolate(g[i:i + 1], size=(s, s), mode="bilinear", align_corners=False)[0, 0].numpy()
            top, left = rng.integers(0, size - s + 1, size=2)
            a = np.zeros((size, size), np.float32)
            a[top:top + s, left:left + s] = alpha
            out[i] = bg[j] * (1 - a[..., None]) + colour[j] * a[..., None]
        hue_label[idx] = np.floor(hue * HUE_BINS).astype(np.int64)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8), hue_label


def pretrain_vision(cfg: VisionPretrainConfig, resume: bool = False) -> dict:
    """Train, evaluate and write assets/mini-resnet18/{model.safetensors, model_card.json}. Returns the card.

    One flat script on purpose, like nanoGPT's train.py (data, model, optimizer, loop, evaluation,
    card read top to bottom): it runs once per release, and its steps share one set of locals.
    `resume` continues from the last training state in cfg.state_dir; every batch is generated from
    (seed, step), so a resumed run sees exactly the batches an uninterrupted one would.
    """
    import torch
    import torch.nn.functional as F
    import torchvision
    from safetensors.torch import save_file

    from engine.train import checkpoints  # deferred: imports torch

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out) if cfg.out else sources.MINI_VISION
    tr_x, tr_y = load_fashion_mnist("train", cfg.fmnist_dir or None)
    te_x, te_y = load_fashion_mnist("test", cfg.fmnist_dir or None)
    systems = fractals.make_systems(N_FRACTAL_CLASSES, cfg.seed)
    torch.manual_seed(cfg.seed)
    size = cfg.image_size
    n_fm = n_fr = cfg.batch_size // 3
    n_tx = cfg.batch_size - n_fm - n_fr

    # normalisation statistics of the training mix, from a fixed sample
    srng = np.random.default_rng([cfg.seed, 5])
    g, _ = _fmnist_batch(tr_x, tr_y, cfg.stats_sample, srng, train=False)
    g, _ = _fmnist_scenes(g, size, srng)
    f, _, _ = fractals.pretrain_fractals(systems, cfg.stats_sample, size, srng, HUE_BINS)
    t, _, _ = textures.texture_batch(cfg.stats_sample, size, srng, HUE_BINS)
    sample = _to_tensor(None, np.concatenate([g, f, t]), size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    mean = [round(v, 3) for v in sample.mean(dim=(0, 2, 3)).tolist()]
    std = [round(v, 3) for v in sample.std(dim=(0, 2, 3)).tolist()]

    n_main = 10 + N_FRACTAL_CLASSES + N_TEXTURES  # one softmax over every class of the three sources
    model = torchvision.models.resnet18(num_classes=n_main + HUE_BINS)  # fc: class logits, then hue logits
    model = model.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on this CPU
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # BN and biases: no weight decay
    opt = torch.optim.SGD([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=cfg.lr, momentum=0.9, nesterov=True)

    def batch(step: int):
        rng = np.random.default_rng([cfg.seed, 2024, step])
        gx, gy = _fmnist_batch(tr_x, tr_y, n_fm, rng)
        gx, gh = _fmnist_scenes(gx, size, rng)
        fx, fy, fh = fractals.pretrain_fractals(systems, n_fr, size, rng, HUE_BINS)
        tx, ty, th = textures.texture_batch(n_tx, size, rng, HUE_BINS)
        x = _to_tensor(None, np.concatenate([gx, fx, tx]), size, mean, std)
        y = torch.from_numpy(np.concatenate([gy, fy + 10, ty + 10 + N_FRACTAL_CLASSES]))
        hue = torch.from_numpy(np.concatenate([gh, fh, th]))
        return x, y, hue

    def lr_at(step: int, total: int) -> float:
        return cfg.lr * schedules.warmup_cosine(step, total, warmup=max(1, int(0.03 * total)))

    # batches are generated in order by one background thread (numpy and torch release the GIL),
    # so rendering overlaps with training on a second core and the sequence stays deterministic

    batches: queue.Queue = queue.Queue(maxsize=3)
    stop = threading.Event()

    def producer(first: int):
        step = first
        while not stop.is_set():
            item = batch(step)
            step += 1
            while not stop.is_set():
                try:
                    batches.put(item, timeout=0.5)
                    break
                except queue.Full:
                    pass

    def train_step(step: int, total: int) -> float:
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, total)
        x, y, hue = batches.get()
        logits = model(x)
        loss = F.cross_entropy(logits[:, :n_main], y, label_smoothing=cfg.label_smoothing)
        loss = loss + 0.5 * F.cross_entropy(logits[:, n_main:], hue, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    state_dir = Path(cfg.state_dir) if cfg.state_dir else workspace.subdir("cache") / "pretrain-vision"
    start, total, seconds_before, losses = 0, cfg.steps, 0.0, []
    if resume:
        if not (state_dir / "state.json").is_file():
            raise UserError(f"nothing to resume in {state_dir}; start without --resume")
        meta = checkpoints.load_training_state(state_dir / "state", model, opt)
        if meta["mean"] != mean or meta["std"] != std or meta["seed"] != cfg.seed:
            raise UserError(f"the training state in {state_dir} is from another configuration; start without --resume")
        start, total, seconds_before, losses = meta["step"], meta["total"], meta["seconds"], meta["losses"]
        log.info("resuming at step %d of %d", start, total)
    threading.Thread(target=producer, args=(start,), daemon=True, name="pretrain-data").start()

    model.train()
    t0 = time.time()
    if total is None:
        # time a few steps at a nominal schedule length, then fix the step count for the budget.
        # The reproducible command recorded in the card is `--steps <total>`.
        probe_steps = 8
        timing_total = 10**6
        for s in range(probe_steps):
            train_step(s, timing_total)
            if s == 1:
                t1 = time.time()
        per_step = (time.time() - t1) / (probe_steps - 2)
        budget = (cfg.minutes or 20) * 60 * 0.9 - 60  # leave time for evaluation
        total = max(50, int(budget / per_step))
        log.info("%.2f s/step -> %d steps for %.1f minutes", per_step, total, cfg.minutes)
        stop.set()
        # restart from scratch so the run equals `--steps total` exactly
        return pretrain_vision(VisionPretrainConfig(**{**asdict(cfg), "steps": total, "minutes": None}))

    for step in range(start, total):
        losses = (losses + [train_step(step, total)])[-50:]
        if step % 50 == 0 or step == total - 1:
            log.info("step %d/%d loss %.3f lr %.4f %.0fs", step, total, float(np.mean(losses)), lr_at(step, total), time.time() - t0)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < total:
            checkpoints.save_training_state(state_dir / "state", model, opt, {
                "step": step + 1, "total": total, "seconds": seconds_before + time.time() - t0, "losses": losses,
                "mean": mean, "std": std, "seed": cfg.seed})
    stop.set()
    train_seconds = seconds_before + time.time() - t0

    # ---- evaluation: Fashion-MNIST test split (10-way, first 10 logits) and fresh fractal renders
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(te_x), 500):
            x = _to_tensor(te_x[i:i + 500], None, size, mean, std)
            correct += int((model(x)[:, :10].argmax(1).numpy() == te_y[i:i + 500]).sum())
        erng = np.random.default_rng([cfg.seed, 99])
        fc = 0
        hc = 0
        for i in range(0, cfg.eval_fractals, 256):
            fx, fy, fh = fractals.pretrain_fractals(systems, min(256, cfg.eval_fractals - i), size, erng, HUE_BINS)
            out_f = model(_to_tensor(None, fx, size, mean, std))
            fc += int((out_f[:, 10:10 + N_FRACTAL_CLASSES].argmax(1).numpy() == fy).sum())
            hc += int((out_f[:, n_main:].argmax(1).numpy() == fh).sum())
        tx, ty, _ = textures.texture_batch(512, size, erng, HUE_BINS)
        tc = int((model(_to_tensor(None, tx, size, mean, std))[:, 10 + N_FRACTAL_CLASSES:n_main].argmax(1).numpy() == ty).sum())
    fmnist_acc = correct / len(te_x)
    fractal_acc = fc / max(1, cfg.eval_fractals)
    hue_acc = hc / max(1, cfg.eval_fractals)
    texture_acc = tc / 512

    # ---- write fp16 weights + card (atomically)
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    tmp = workspace.atomic_path(out / "model.safetensors")
    save_file(state, str(tmp), metadata={"format": "pt", "arch": "resnet18"})
    os.replace(tmp, out / "model.safetensors")
    card = {
        "name": "mini-resnet18",
        "arch": "torchvision resnet18",
        "data": {
            "fashion_mnist": "Debian dataset-fashion-mnist, train split (60k), pad-2 crop + flip; 75% as scenes (garment at 50-100% "
                             "of the frame, random position, tinted near a random hue on a cluttered background), 25% plain grey full frame",
            "fractals": f"{N_FRACTAL_CLASSES} colour IFS fractal classes generated from the seed (engine/data/fractals.py), rendered on the fly "
                        "at 35-95% of the frame, random position, coloured near a random hue on a cluttered background",
            "textures": f"{N_TEXTURES} procedural texture families (engine/data/textures.py: {', '.join(textures.FAMILIES)}), "
                        "random parameters, two colours near a random hue",
            "mix": f"every batch of {cfg.batch_size}: {n_fm} Fashion-MNIST, {n_fr} fractals, {n_tx} textures, generated from (seed, step)",
        },
        "classes": (FMNIST_CLASSES + [f"fractal_{i:03d}" for i in range(N_FRACTAL_CLASSES)] + [f"texture: {f}" for f in textures.FAMILIES]
                    + [f"hue_{i}" for i in range(HUE_BINS)]),
        "head": f"fc: {n_main + HUE_BINS} outputs: one softmax over 10 Fashion-MNIST + {N_FRACTAL_CLASSES} fractal + {N_TEXTURES} texture classes, "
                f"one over {HUE_BINS} hue bins (auxiliary, weight 0.5); replaced by a new head when fine-tuning",
        "steps": total,
        "batch_size": cfg.batch_size,
        "images_seen": total * cfg.batch_size,
        "optimizer": f"SGD nesterov momentum 0.9, lr {cfg.lr} (3% warmup, cosine), weight decay {cfg.weight_decay}, label smoothing {cfg.label_smoothing}",
        "seed": cfg.seed,
        "threads": cfg.threads,
        "train_seconds": round(train_seconds, 1),
        "final_train_loss": round(float(np.mean(losses)), 4),
        "preprocessing": {"image_size": size, "resize": size, "mean": mean, "std": std},
        "test_accuracy": {"fashion_mnist_test": round(fmnist_acc, 4), "fractals_fresh_renders": round(fractal_acc, 4),
                          "fractal_hue_bin": round(hue_acc, 4), "texture_family": round(texture_acc, 4)},
        "dtype": "float16",
        "command": f"python -m engine pretrain vision --steps {total} --seed {cfg.seed} --threads {cfg.threads}",
        "torch": torch.__version__,
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    log.info("Fashion-MNIST test accuracy %.4f, fractal accuracy %.4f, hue %.4f", fmnist_acc, fractal_acc, hue_acc)
    if cfg.probe:
        card = probe_vision(out)
    return card


def probe_vision(out: Path | None = None, seeds: tuple[int, ...] = (0, 1, 2), baseline: Path | None = None) -> dict:
    """Transfer check written into the card: linear probe from `mini` vs from `none` on held-out tasks.

    Uses the app's own `linear` strategy (engine.vision.finetune.finetune) with the recipe book's
    settings on every dataset of the recipe benchmark (engine/data/transfer_tasks.py: the bundled
    sample, coloured shapes, clothing, handwritten digits). `none` is a random-init resnet18 saved
    with the mini backbone's preprocessing, so only the weights differ; `baseline` (a folder with an
    earlier model.safetensors and card) is probed the same way as `previous`. Validation sets are
    small (32-40 images), so it is repeated over seeds (each seed: another split, head init and
    batch order) and averaged.
    """
    from engine.vision import finetune, network  # deferred: imports torch

    out = Path(out or sources.MINI_VISION).resolve()
    weights_file = out / "model.safetensors"
    card = json.loads((out / "model_card.json").read_text())
    per_seed: dict[str, dict[str, list[float]]] = {}
    with temporary_workspace() as tmp:  # the generated images never enter the user's workspace
        tasks = {name: transfer_tasks.make_dataset(name, tmp / "tasks") for name in transfer_tasks.DATASETS}
        for seed in seeds:
            random_init = network.build_model("resnet18", 2, sources.Source("none", "random init", ""), seed=seed)
            none_file = tmp / f"random-init-{seed}.safetensors"
            network.save_weights(none_file, random_init, {"preprocessing": card["preprocessing"]})
            arms = [("mini", weights_file), ("none", none_file)] + ([("previous", Path(baseline) / "model.safetensors")] if baseline else [])
            for task, data in tasks.items():
                for name, weights in arms:
                    # the linear probe with the recipe book's settings (the L-BFGS protocol), as a user gets it
                    cfg = FinetuneConfig(data=data, weights=str(weights), strategy="linear", seed=seed)
                    summary = finetune.finetune(cfg, tmp / f"run-{seed}-{task}-{name}")
                    per_seed.setdefault(task, {}).setdefault(name, []).append(round(summary["best_val_acc"], 4))
                    log.info("probe %s from %s, seed %d: %.4f", task, name, seed, summary["best_val_acc"])
    results = {task: {name: round(float(np.mean(v)), 4) for name, v in row.items()} | {"per_seed": row} for task, row in per_seed.items()}
    card = json.loads((out / "model_card.json").read_text())  # re-read: only the transfer section changes
    card["transfer"] = {
        "method": "linear probe with the app's linear strategy and the recipe book's settings (frozen backbone, a logistic regression on the features fitted with L-BFGS, L2 by cross-validation), "
                  f"best validation accuracy, mean over seeds {list(seeds)}; `none` is a random-init resnet18 with the same preprocessing"
                  + ("; `previous` is the backbone this one replaced, probed the same way" if baseline else ""),
        "datasets": {"sample": "the bundled fruit sample (4 classes x 40)", "shapes": "generated coloured shapes (5 x 40)",
                     "clothing": "the Lab's clothing task (Fashion-MNIST test images, 4 x 40)",
                     "digits": "scikit-learn's handwritten digits (10 x 20, 64 px)"},
        "results": results,
        "command": "python -m engine pretrain vision --probe-only" + (" --probe-baseline PREVIOUS_FOLDER" if baseline else ""),
    }
    workspace.atomic_write_json(out / "model_card.json", card)
    return card
