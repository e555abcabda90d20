"""Transfer Lab for text: the language model pretrained vs from scratch on a new corpus, and with less of it.

    text-compare    the same GPT-2 shape and tokenizer twice, trained the same steps on the same text:
                    once from the pretrained weights (the bundled mini GPT-2, or GPT-2 where cached),
                    once from random weights. Validation perplexity on the held-out end of the text is
                    measured every `eval_every` steps, and the three benefits of transfer are read off
                    the curves as the vision experiment reads them off accuracy curves.
    text-data-size  the same, trained on 10%, 30% and 100% of the training text (the same steps each:
                    a smaller text is seen more often), best perplexity per fraction and side.

Perplexity is "lower is better", so each benefit is read the other way up:
    start      perplexity after the first `eval_every` steps
    slope      how fast perplexity falls early: the mean drop in log-perplexity (nats per token) per
               interval over the first EARLY intervals, counted from the first interval, not from step 0.
               (At step 0 a random model is at chance: perplexity ~ the vocabulary size, 4,096 for the
               mini model. Its first few steps only learn which tokens are common, a fall any model
               makes once; the vision experiment avoids this because both sides start with a random head.)
    asymptote  the best (lowest) perplexity reached

The scratch side keeps the pretrained tokenizer: only the weights differ. Training is
engine.text.lm_finetune's own step (AdamW, warm-up then linear decay, clipping at norm 1) on its
blocks of the text, so the Lab measures what the Fine-tune text page does.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch

from engine.core.errors import UserError
from engine.lab import experiments
from engine.text import causal_lm, lm_finetune, text_files
from engine.train import loop, optimizers

log = logging.getLogger(__name__)

EARLY = 3            # the slope is measured over the first EARLY intervals after the first
EXAMPLE_NAMES = {"example", "genesis", text_files.EXAMPLE_TITLE.lower()}


def text_path(data: str) -> Path:
    """The corpus file: the bundled example (Genesis) or a UTF-8 .txt file."""
    if data.strip().lower() in EXAMPLE_NAMES:
        return text_files.EXAMPLE_TEXT
    path = Path(data).expanduser()
    if not path.is_file():
        raise UserError(f"no text file {data!r}: give 'example' (Genesis, King James Version) or a .txt file")
    return path


def text_title(data: str) -> str:
    return text_files.EXAMPLE_TITLE if text_path(data) == text_files.EXAMPLE_TEXT else Path(data).name


def scratch_model(pretrained: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The pretrained model's architecture (its config) with fresh random weights."""
    torch.manual_seed(seed)
    return type(pretrained)(copy.deepcopy(pretrained.config))


def keep_fraction(n_blocks: int, fraction: float, seed: int) -> torch.Tensor:
    """Indices of a seeded random `fraction` of the training blocks (at least 2)."""
    if fraction >= 1:
        return torch.arange(n_blocks)
    g = torch.Generator().manual_seed(seed * 7919 + int(fraction * 1000))
    keep = max(2, round(n_blocks * fraction))
    return torch.randperm(n_blocks, generator=g)[:keep].sort().values


def train_lm_arm(model, xs: torch.Tensor, ys: torch.Tensor, val: torch.Tensor, block: int, steps: int, eval_every: int,
                 batch_size: int, lr: float, seed: int, dev: torch.device, should_stop=lambda: False,
                 on_eval=lambda row: None) -> dict:
    """Train one model on blocks (xs, ys) for `steps` steps; evaluate at step 0 and every `eval_every` steps.

    Returns {"metrics": rows (interval 0 = before training), "seconds", "stopped"}."""
    t0 = time.time()
    model = model.float().to(dev)
    model.requires_grad_(True)
    optimizer = optimizers.make(model.parameters(), "adamw", 0.01, lr=lr)

    def evaluate(interval: int, step: int, train_loss: float | None) -> dict:
        ppl = causal_lm.perplexity(model, val, block, device=dev)
        row = {"epoch": interval, "step": step, "train_loss": train_loss, "val_loss": round(math.log(ppl), 5),
               "val_ppl": round(ppl, 3), "seconds": round(time.time() - t0, 2)}
        on_eval(row)
        return row

    metrics = [evaluate(0, 0, None)]
    g = torch.Generator().manual_seed(seed * 1009 + 17)
    stream = loop.endless_batches(len(xs), batch_size, g)
    model.train()
    losses: list[float] = []
    stopped = False
    for step in range(steps):
        if should_stop():
            stopped = True
            break
        torch.manual_seed(seed * 100_003 + step)  # dropout masks, per step
        idx = next(stream)
        losses.append(lm_finetune.train_step(model, optimizer, xs[idx].to(dev), ys[idx].to(dev), lm_finetune.lr_at(step, steps, lr)))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            metrics.append(evaluate(len(metrics), step + 1, round(sum(losses) / len(losses), 4)))
            losses = []
            model.train()
    model.requires_grad_(False)
    return {"metrics": metrics, "seconds": round(time.time() - t0, 2), "stopped": stopped}


# ============================================================================= reading the curves
def three_numbers(ppl: list[float], early: int = EARLY) -> dict:
    """start (perplexity after the first interval), slope (log-perplexity drop per interval over the
    next `early` intervals) and asymptote (the lowest perplexity), from a curve that starts at step 0."""
    if len(ppl) < 2:
        raise ValueError("a curve needs step 0 and at least one evaluation after training")
    m = min(early, len(ppl) - 2)
    slope = (math.log(ppl[1]) - math.log(ppl[1 + m])) / m if m > 0 else 0.0
    return {"start": ppl[1], "slope": slope, "asymptote": min(ppl[1:])}


def benefits(runs: list[dict], early: int = EARLY) -> dict:
    """The three numbers per side (mean and spread over seeds), the differences and a one-line reading each."""
    per_group: dict[str, dict] = {}
    full = {g: [r for r in runs if r["group"] == g and r.get("x") in (None, 1.0) and len(r["metrics"]) >= 2] for g in ("pretrained", "scratch")}
    for group, rs in full.items():
        nums = [three_numbers([m["val_ppl"] for m in r["metrics"]], early) for r in rs]
        per_group[group] = {k: experiments.mean_std([n[k] for n in nums]) for k in ("start", "slope", "asymptote")}
    out = {"groups": per_group, "early_intervals": early, "readings": {}}
    p, s = per_group["pretrained"], per_group["scratch"]
    if all(p[k]["n"] and s[k]["n"] for k in ("start", "slope", "asymptote")):
        # "learns faster" in the plainest terms: the step at which the pretrained model is already as good
        # as the random one ends up (mean curves over seeds)
        curve = experiments.mean_curve(full["pretrained"], "val_ppl")
        steps = [m["step"] for m in full["pretrained"][0]["metrics"]]
        out["steps_to_scratch_best"] = next((steps[i] for i, v in enumerate(curve["mean"]) if v <= s["asymptote"]["mean"]), None)
        out["steps"] = steps[-1]
        ps, ss = p["start"]["mean"], s["start"]["mean"]
        pa, sa = p["asymptote"]["mean"], s["asymptote"]["mean"]
        fall = lambda v: 1 - math.exp(-v)  # noqa: E731  (log-perplexity drop -> share of perplexity lost)
        reach = out["steps_to_scratch_best"]
        reached = (f" It is as good as the random model's best ({sa:.0f}) at step {reach} of {out['steps']}." if reach is not None
                   else "")
        out["difference"] = {"start": round(ps - ss, 3), "slope": round(p["slope"]["mean"] - s["slope"]["mean"], 4),
                             "asymptote": round(pa - sa, 3)}
        out["readings"] = {
            "start": (f"After the first interval the pretrained model is at perplexity {ps:.0f}, the random one at {ss:.0f}: "
                      + ("it starts from a model of English." if ps < 0.9 * ss else "no head start here.")),
            "slope": (f"Early on its perplexity falls {fall(p['slope']['mean']):.0%} per interval vs {fall(s['slope']['mean']):.0%}: "
                      + ("it learns the new text faster." if p["slope"]["mean"] > s["slope"]["mean"] + 0.01
                         else "from scratch falls faster here (it has further to fall)." if p["slope"]["mean"] < s["slope"]["mean"] - 0.01
                         else "about as fast.")) + reached,
            "asymptote": (f"Best perplexity {pa:.0f} vs {sa:.0f}: "
                          + ("it also ends lower." if pa < 0.95 * sa else "they end about level." if pa < 1.05 * sa
                             else "from scratch ends lower here.")),
        }
    return out


def sweep(runs: list[dict]) -> dict:
    """text-data-size: per side and fraction, the best perplexity (mean, std over seeds) and time."""
    out = {}
    for group in ("pretrained", "scratch"):
        pts: dict[float, list[dict]] = {}
        for r in runs:
            if r["group"] == group and len(r["metrics"]) >= 2 and r.get("done"):
                pts.setdefault(r["x"], []).append(r)
        out[group] = [{"x": x, "best_val_ppl": experiments.mean_std([min(m["val_ppl"] for m in r["metrics"][1:]) for r in rs]),
                       "seconds": experiments.mean_std([r["seconds"] for r in rs]), "train_tokens": rs[0].get("train_tokens")}
                      for x, rs in sorted(pts.items())]
    return out


def summarise(experiment: str, runs: list[dict]) -> dict:
    curves = {g: experiments.mean_curve([r for r in runs if r["group"] == g and r.get("x") in (None, 1.0)], "val_ppl") for g in ("pretrained", "scratch")}
    if experiment == "text-compare":
        return {"benefits": benefits(runs), "curves": curves}
    res = {"sweep": sweep(runs), "curves": curves}
    pre = {p["x"]: p["best_val_ppl"]["mean"] for p in res["sweep"]["pretrained"]}
    scr = {p["x"]: p["best_val_ppl"]["mean"] for p in res["sweep"]["scratch"]}
    res["ratio"] = [{"x": x, "ratio": round(scr[x] / pre[x], 3)} for x in sorted(set(pre) & set(scr))]
    if len(res["ratio"]) >= 2:
        few, many = res["ratio"][0], res["ratio"][-1]
        res["reading"] = (f"With {few['x']:.0%} of the text, from scratch ends at {few['ratio']:.1f}x the pretrained model's perplexity; "
                          f"with {many['x']:.0%}, {many['ratio']:.1f}x. "
                          + ("The less text, the more pretraining is worth." if few["ratio"] > many["ratio"] * 1.05
                             else "Here the gap does not shrink with more text."))
        if pre[few["x"]] < scr[many["x"]]:
            res["reading"] += (f" Pretrained on {few['x']:.0%} of the text ({pre[few['x']]:.0f}) beats from scratch on "
                               f"{many['x']:.0%} of it ({scr[many['x']]:.0f}).")
    return res


# ============================================================================= the experiment
def run_experiment(cfg, out_dir: Path, ctx, state: dict, dev: torch.device) -> dict:
    """Run text-compare or text-data-size (cfg: a resolved experiments.LabConfig); write lab.json as it goes."""
    t0 = time.time()
    ctx.report(phase="loading", message=f"loading the language model ({cfg.weights})")
    base = causal_lm.load(cfg.weights)
    if base.source.kind == "none":
        raise UserError(f"no pretrained language model available ({base.source.reason})")
    path = text_path(cfg.data)
    ids = base.tokenizer(text_files.read_text_files([str(path)]))["input_ids"]
    train, val, block = lm_finetune.split_tokens(ids, cfg.val_fraction, min(cfg.block_size, base.context))
    val = val[: cfg.val_tokens]
    xs, ys = lm_finetune.blocks(train, block)
    fractions = [1.0] if cfg.experiment == "text-compare" else sorted(set(cfg.fractions))
    state["data"] = {"name": text_title(cfg.data), "file": path.name, "train_tokens": len(train), "val_tokens": len(val),
                     "block_size": block, "train_blocks": len(xs)}
    state["weights"] = {"kind": base.source.kind, "name": base.name, "reason": base.source.reason,
                        "parameters": sum(p.numel() for p in base.model.parameters())}
    state["steps"] = cfg.steps
    plan = [(f, seed, group) for seed in range(cfg.seeds) for f in fractions for group in ("pretrained", "scratch")]
    state["runs"] = [{"label": (f"pretrained: {base.name}" if group == "pretrained" else "from scratch (random init)")
                      + ("" if cfg.experiment == "text-compare" else f", {f:.0%} of the text"),
                      "group": group, "seed": seed, "x": f, "metrics": [], "done": False} for f, seed, group in plan]
    for i, (f, seed, group) in enumerate(plan):
        if ctx.cancelled():
            break
        rec = state["runs"][i]
        keep = keep_fraction(len(xs), f, seed)
        model = copy.deepcopy(base.model) if group == "pretrained" else scratch_model(base.model, seed)

        def on_eval(row, rec=rec, i=i):
            rec["metrics"].append(row)
            state["result"] = summarise(cfg.experiment, state["runs"])
            experiments.write_result(out_dir, state)
            ctx.report(phase="training", run=i + 1, runs=len(plan), label=rec["label"], epoch=row["epoch"],
                       epochs=math.ceil(cfg.steps / cfg.eval_every), step=0, val_ppl=row["val_ppl"],
                       message=f"run {i + 1}/{len(plan)} · {rec['label']} · step {row['step']}/{cfg.steps} · perplexity {row['val_ppl']:.0f}")

        out = train_lm_arm(model, xs[keep], ys[keep], val, block, cfg.steps, cfg.eval_every, cfg.batch_size, cfg.lr, seed, dev,
                           should_stop=ctx.cancelled, on_eval=on_eval)
        rec.update(seconds=out["seconds"], train_tokens=int(len(keep) * block), done=not out["stopped"])
        log.info("%s seed %d: best val ppl %.1f in %.1fs", rec["label"], seed, min(m["val_ppl"] for m in rec["metrics"]), out["seconds"])
    state["result"] = summarise(cfg.experiment, state["runs"])
    state["status"] = "cancelled" if ctx.cancelled() else "done"
    state["seconds"] = round(time.time() - t0, 2)
    experiments.write_result(out_dir, state)
    ctx.report(phase=state["status"], message="done" if state["status"] == "done" else "cancelled: finished runs kept")
    return experiments.headline(state)
