"""Fine-tune a causal LM on the user's own text, as a background job (kind "lm-finetune").

Like nanoGPT's train.py, cut down: the text becomes one token stream; the last `val_fraction`
of it is held out to measure perplexity before and after; the rest is cut into blocks that are
shuffled every epoch (seeded) and fed to AdamW with warmup and linear decay. Progress goes to
ctx.report, Cancel is checked every step, and a checkpoint (safetensors + JSON, no pickle) is
written at every epoch end, every minute and on cancel, so `ctx.resume` continues exactly.

The result is an HF folder (run_dir/model) that engine.text.causal_lm.load can open, so the Generate page
can select it, plus base-vs-fine-tuned samples for the same prompt and seed.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from engine.core import workspace
from engine.core.errors import UserError, number_in
from engine.jobs import JobContext
from engine.models import sources, store
from engine.text import causal_lm, text_files
from engine.train import checkpoints, loop, optimizers, schedules

log = logging.getLogger(__name__)

CHECKPOINT_EVERY_S = 60.0
MIN_TOKENS = 32
# The step budget when epochs are left to the text's size: measured on Genesis (KJV, 56k tokens) with the
# 5.9M mini GPT-2, held-out perplexity 203 before, 24.3 after 330 steps (134 s here; the same shape annealed on
# the clean files instead of the grammatical ones 149 -> 23.7); the earlier 2.6M model went 270 -> 84 after 54
# steps, 53 after 162, 44 after 324.
# Larger models learn more per step and cost ~50x more per step on a CPU: a third of the steps.
TARGET_STEPS = {"small": 300, "large": 100}
MAX_AUTO_EPOCHS = 20  # a short paste gets many passes, not hundreds (it would learn the text by heart)


@dataclass
class LMFinetuneConfig:
    texts: list[str] = field(default_factory=list)  # .txt files (validated UTF-8), joined with blank lines
    model: str = "auto"
    epochs: int | None = None     # None: from the text's size (plan_epochs)
    lr: float = 5e-4
    block_size: int = 128
    batch_size: int = 8
    val_fraction: float = 0.1
    seed: int = 0
    sample_prompt: str = ""       # for base vs fine-tuned samples; default: the start of the held-out text
    sample_tokens: int = 40
    title: str = ""

    def validate(self) -> "LMFinetuneConfig":
        if not self.texts:
            raise UserError("no text to fine-tune on; upload or paste some text (or pass --text FILE)")
        if not (isinstance(self.texts, (list, tuple)) and all(isinstance(t, str) for t in self.texts)):
            raise UserError("texts must be a list of text file paths")
        if self.epochs is not None and not number_in(self.epochs, 1, 50, integer=True):
            raise UserError(f"epochs must be 1..50 (got {self.epochs})")
        if not number_in(self.lr, 1e-6, 1e-2):
            raise UserError(f"learning rate must be between 1e-6 and 1e-2 (got {self.lr})")
        if not number_in(self.block_size, 8, 1024, integer=True):
            raise UserError(f"block size must be 8..1024 tokens (got {self.block_size})")
        if not number_in(self.batch_size, 1, 64, integer=True):
            raise UserError(f"batch size must be 1..64 (got {self.batch_size})")
        if not number_in(self.val_fraction, 0.02, 0.5):
            raise UserError(f"held-out fraction must be 0.02..0.5 (got {self.val_fraction})")
        if not number_in(self.seed, 0, 2**32 - 1, integer=True):
            raise UserError(f"seed must be a non-negative integer (got {self.seed})")
        if not number_in(self.sample_tokens, 1, 512, integer=True) or not isinstance(self.sample_prompt, str):
            raise UserError("the sample comparison needs a text prompt and 1..512 tokens")
        return self

    @classmethod
    def from_dict(cls, d: dict) -> "LMFinetuneConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def save_corpus(data: bytes, name: str = "text") -> Path:
    """Validate uploaded / pasted bytes as UTF-8 text and store them content-addressed in workspace/text/."""
    return workspace.save_upload(text_files.decode_text(data, name).encode(), "text", suffix=".txt")


def plan_epochs(n_blocks: int, batch_size: int, n_params: int) -> int:
    """Passes over the text that give about TARGET_STEPS optimizer steps (at most MAX_AUTO_EPOCHS): the
    same budget for a page of text and a book, where a fixed epoch count gave a paste 2 steps."""
    steps_per_epoch = max(1, math.ceil(n_blocks / batch_size))
    target = TARGET_STEPS["small" if n_params < causal_lm.SMALL_MODEL_PARAMS else "large"]
    return max(1, min(MAX_AUTO_EPOCHS, math.ceil(target / steps_per_epoch)))


# ----------------------------------------------------------------------------- data
def split_tokens(ids: list[int], val_fraction: float, block_size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Train / held-out token streams (the held-out slice is the end of the text) and the usable block size."""
    if len(ids) < MIN_TOKENS:
        raise UserError(f"the text is only {len(ids)} tokens long; give at least {MIN_TOKENS} tokens (a few sentences)")
    n_val = max(2, int(len(ids) * val_fraction))
    train, val = torch.tensor(ids[:-n_val]), torch.tensor(ids[-n_val:])
    block = min(block_size, len(train) - 1)  # a short text still gives at least one block
    return train, val, block


def blocks(train: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping (x, y) blocks; y is x shifted by one token."""
    n = (len(train) - 1) // block
    x = train[: n * block].view(n, block)
    y = train[1 : n * block + 1].view(n, block)
    return x, y


def lr_at(step: int, total: int, base: float) -> float:
    """The fine-tuning schedule: 10% linear warm-up, then linear decay to 0."""
    return base * schedules.warmup_linear(step, total, warmup=max(1, total // 10))


def train_step(model, optimizer, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """One optimizer step of next-token prediction at learning rate `lr`, gradients clipped at norm 1:
    the step of every language-model loop that trains on blocks (fine-tuning, the Transfer Lab)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    # y is x shifted by one token; the loss is computed here (HF's `labels=` would shift again)
    loss, _ = loop.step(lambda ids: model(input_ids=ids).logits.flatten(0, 1), optimizer, x, y.flatten(), clip_norm=1.0)
    return loss.item()


# ----------------------------------------------------------------------------- checkpoints (no pickle)
def _save_checkpoint(folder: Path, model, optimizer, state: dict) -> None:
    checkpoints.save_training_state(folder / "checkpoint", model, optimizer, state)


def _load_checkpoint(folder: Path, model, optimizer) -> dict:
    return checkpoints.load_training_state(folder / "checkpoint", model, optimizer)


# ----------------------------------------------------------------------------- the job
def run_job(ctx) -> dict:
    """The lm-finetune runner (engine.jobs.RUNNERS): train, report, honour cancel, resume, write the model.

    Long because it is a run's whole life in order, like minGPT's Trainer.run: load, resume, the loop
    with its checkpoints, evaluation, the model written, the before/after samples.
    """
    from engine.core.device import seed_everything  # deferred: imports torch

    cfg = LMFinetuneConfig.from_dict(ctx.config).validate()
    run_dir = Path(ctx.run_dir)
    ckpt_dir = run_dir / "checkpoint"
    source = sources.resolve_text(cfg.model)
    if source.download:  # auto or a hub id not on this machine yet: fetched first, its progress in the job's
        store.download(source.download, cancelled=ctx.cancelled, report=lambda **p: ctx.report(
            **{**p, "message": f"downloading {source.download}: {store.progress_line(p)}"}))
    ctx.report(phase="loading", message=f"loading {cfg.model}")
    base = causal_lm.load(cfg.model)
    corpus = text_files.read_text_files(cfg.texts)
    ids = base.tokenizer(corpus)["input_ids"]
    train, val, block = split_tokens(ids, cfg.val_fraction, min(cfg.block_size, base.context))
    xs, ys = blocks(train, block)
    steps_per_epoch = math.ceil(len(xs) / cfg.batch_size)
    epochs = cfg.epochs or plan_epochs(len(xs), cfg.batch_size, sum(p.numel() for p in base.model.parameters()))
    total_steps = steps_per_epoch * epochs

    # Train a private fp32 copy: the loaded model is shared (and maybe bf16) for generation.
    device = base.device
    model = copy.deepcopy(base.model).float().to(device)
    model.requires_grad_(True)
    optimizer = optimizers.make(model.parameters(), "adamw", 0.01, lr=cfg.lr)
    state = {"step": 0, "losses": [], "seconds": 0.0}
    if ctx.resume and (ckpt_dir / "checkpoint.json").is_file():
        state = _load_checkpoint(ckpt_dir, model, optimizer)
        ctx.report(phase="resuming", message=f"resuming at step {state['step']} of {total_steps}")
    if "ppl_before" not in state:
        ctx.report(phase="evaluating", message="perplexity of the base model on the held-out text")
        state["ppl_before"] = causal_lm.perplexity(model, val, block, device=device)
    model.train()
    t0, last_ckpt = time.time(), time.time()
    seconds_before = state["seconds"]
    tokens_done = 0
    step = start = state["step"]
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        # The epoch's order depends only on (seed, epoch): a resumed run sees the same batches.
        order = torch.randperm(len(xs), generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        if ctx.cancelled():
            break
        seed_everything(cfg.seed + step)  # dropout masks, per step
        x, y = xs[idx].to(device), ys[idx].to(device)
        loss = train_step(model, optimizer, x, y, lr_at(step, total_steps, cfg.lr))
        step += 1
        tokens_done += x.numel()
        state["losses"].append(round(loss, 4))
        elapsed = time.time() - t0
        tok_s = tokens_done / elapsed if elapsed > 0 else 0.0
        ctx.report(phase="training", epoch=epoch + 1, epochs=epochs, step=step, steps=total_steps, loss=loss,
                   tokens_s=tok_s, eta_s=(total_steps - step) * elapsed / (step - start))
        if step % steps_per_epoch == 0 or time.time() - last_ckpt > CHECKPOINT_EVERY_S:
            _save_checkpoint(ckpt_dir, model, optimizer, {**state, "step": step, "seconds": seconds_before + elapsed})
            last_ckpt = time.time()
    seconds = seconds_before + time.time() - t0
    if step < total_steps:  # cancelled: keep what was learned, resumable
        _save_checkpoint(ckpt_dir, model, optimizer, {**state, "step": step, "seconds": seconds})
        ctx.report(phase="cancelled", message=f"stopped at step {step} of {total_steps}; resume to continue")
        return {"step": step, "steps": total_steps, "ppl_before": state["ppl_before"], "resumable": True}

    ctx.report(phase="evaluating", message="perplexity of the fine-tuned model on the held-out text")
    model.eval()
    ppl_after = causal_lm.perplexity(model, val, block, device=device)
    model.requires_grad_(False)
    out_dir = run_dir / "model"
    name = cfg.title or f"{base.name} fine-tuned ({run_dir.name})"
    card = {"name": name, "base_model": base.name, "base_spec": cfg.model, "texts": [Path(t).name for t in cfg.texts],
            "train_tokens": len(train), "val_tokens": len(val), "block_size": block, "epochs": epochs,
            "epochs_from": "you" if cfg.epochs else "the text's size", "steps": total_steps,
            "lr": cfg.lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "seconds": round(seconds, 1),
            "ppl_before": round(state["ppl_before"], 3), "ppl_after": round(ppl_after, 3)}
    _write_model(model, base.tokenizer, out_dir, card)

    ctx.report(phase="sampling", message="base and fine-tuned samples for the same prompt and seed")
    prompt = cfg.sample_prompt.strip() or base.tokenizer.decode(val[:8].tolist()).strip() or "The"
    samples = compare_samples(base, model, out_dir, prompt, cfg.seed, cfg.sample_tokens)
    summary = {**card, "model_dir": str(out_dir), "sample_prompt": prompt, **samples, "losses": state["losses"][-200:]}
    workspace.atomic_write_json(run_dir / "result.json", summary)
    return summary


def _write_model(model, tokenizer, out_dir: Path, card: dict) -> None:
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.pad_token_id = None
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "model_card.json").write_text(json.dumps(card, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def compare_samples(base: causal_lm.LM, tuned_model, tuned_dir: Path, prompt: str, seed: int, max_new_tokens: int = 40) -> dict:
    """Generate from the base and the fine-tuned model with the same prompt, settings and seed."""
    from engine.text import generation  # deferred: imports torch

    tuned = causal_lm.LM(tuned_model.eval(), base.tokenizer, "fine-tuned", str(tuned_dir), sources.Source("folder", "fine-tuned", "", tuned_dir),
                    base.device, torch.float32, "fp32", base.context)
    cfg = generation.GenerationConfig(max_new_tokens=max_new_tokens, seed=seed, **generation.PRESETS["Balanced"])
    a = generation.generate(base, prompt, cfg)
    b = generation.generate(tuned, prompt, generation.GenerationConfig(**{**asdict(cfg)}))
    return {"sample_seed": seed, "sample_base": a.samples[0].text, "sample_finetuned": b.samples[0].text}


def finetune(cfg: LMFinetuneConfig, out: Path, on_report=None) -> dict:
    """Run the job in the foreground (CLI): the run folder is `out`, the model lands in out/model."""

    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = JobContext(run_id=out.name, config=asdict(cfg), run_dir=out, on_report=on_report)
    return run_job(ctx)


def export_zip(model_dir: Path) -> Path:
    """Zip an HF model folder (for download); written atomically next to it, returns the zip path."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"no fine-tuned model in {model_dir}; the run has not finished")
    target = model_dir.parent / f"{model_dir.parent.name}-model.zip"
    tmp = workspace.atomic_path(target)
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(model_dir.iterdir()):
            if f.is_file():
                zf.write(f, arcname=f"{model_dir.parent.name}/{f.name}")
    os.replace(tmp, target)
    return target
