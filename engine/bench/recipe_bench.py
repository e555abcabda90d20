"""`python -m engine bench recipes`: do the recipe book's defaults do justice to pretraining?

For each strategy x dataset, the accuracy (mean and spread over seeds) and seconds of

    old    the settings every caller used before the recipe book (the CLI's: SGD lr 1e-3, cosine,
           batch 32, 10 epochs, no augmentation, no weight decay or label smoothing)
    new    the recipe book's defaults (nothing set by hand)
    grid   (linear, full: the probe and the default strategy) the best point of a small grid around the
           recipe: learning rate /3 and x3, twice the step budget, the other batch size (linear: the L2
           strength), one seed each with the recipe itself as a point, the best then re-run on every seed
    AdaBN  (linear, partial) the new defaults with the frozen BatchNorm statistics re-estimated on
           the user's images (Li et al. 2016)

Datasets: the bundled fruit sample (4 x 40); generated coloured shapes (5 x 40); the Lab's clothing
task (Fashion-MNIST test images, grey, 4 x 40); and scikit-learn's handwritten digits (UCI, 8x8 scans
of real handwriting, not part of any pretraining data here; 10 x 20, upscaled to 64 px). Every run uses the bundled (or
cached ImageNet) backbone through `auto`, in a throw-away workspace. Results are appended to a JSON
file as they come, so an interrupted benchmark resumes where it stopped (`--resume`).
"""
from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from pathlib import Path

from engine.bench import speed
from engine.core import workspace
from engine.data.transfer_tasks import DATASETS, make_dataset  # noqa: F401  (DATASETS: the CLI's choices)
from engine.train import recipes
from engine.vision.config import FinetuneConfig

log = logging.getLogger(__name__)

STRATEGIES = ("linear", "partial", "full", "two-phase", "scratch")
OLD = dict(epochs=10, batch_size=32, lr=1e-3, optimizer="sgd", schedule="cosine", augment=[],
           weight_decay=0.0, label_smoothing=0.0, bn_adapt=False)
BN_STRATEGIES = ("linear", "partial")
# the linear probe's runs take 1-2 s, so it gets more seeds: with 3, one seed's 40 validation images
# decided its grid point (shapes: -5.0 points on 3 seeds, -0.3 on 8, for the same two settings)
PROBE_SEEDS = 8
DEFAULT_SEEDS = 5  # the default strategy: the goals are judged on it, so two more seeds than the other strategies
GRID_STRATEGIES = ("linear", "full")  # the probe (seconds) and the default strategy: the grid costs ~8 runs a cell


def _run(data: str, strategy: str, seed: int, settings: dict, out: Path) -> dict:
    """One run; its folder is deleted afterwards (a benchmark keeps numbers, not the ~90 MB of
    weights and optimizer state each run writes: a whole benchmark would need ~15 GB)."""

    from engine.vision import finetune  # deferred: imports torch

    cfg = FinetuneConfig(data=data, strategy=strategy, seed=seed, **settings)
    t0 = time.time()
    try:
        s = finetune.finetune(cfg, out)
        seconds = round(time.time() - t0, 2)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"acc": s["best_val_acc"], "final": s["final_val_acc"], "seconds": seconds, "settings": s["settings"]}


def grid_points(strategy: str, rec) -> list[dict]:
    """The grid around the recipe `rec` (its filled settings)."""
    if rec.optimizer == "lbfgs":
        return [{"weight_decay": wd} for wd in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
    return [{"lr": rec.lr / 3}, {"lr": rec.lr * 3}, {"epochs": rec.epochs * 2},
            {"batch_size": 32 if rec.batch_size != 32 else 16}]


def summarise(rows: list[dict]) -> dict:
    accs = [r["acc"] for r in rows]
    return {"mean": round(statistics.mean(accs), 4), "spread": round(statistics.pstdev(accs), 4) if len(accs) > 1 else 0.0,
            "seconds": round(statistics.mean(r["seconds"] for r in rows), 1), "n": len(accs)}


def run(datasets=DATASETS, strategies=STRATEGIES, seeds=(0, 1, 2), grid: bool = True, results: Path | None = None,
        on_cell=lambda key, cell: None) -> dict:
    """Every cell of the table; `results` (JSON) keeps finished cells, so a second call resumes."""
    from engine.vision import finetune  # deferred: imports torch

    results = Path(results) if results else None
    done = json.loads(results.read_text()) if results and results.is_file() else {}

    def save():
        if results:
            results.write_text(json.dumps(done, indent=1))

    with workspace.temporary_workspace() as tmp:
        for ds in datasets:
            data = make_dataset(ds, tmp)
            for strategy in strategies:
                key = f"{ds}|{strategy}"
                more = {"linear": PROBE_SEEDS, recipes.DEFAULT_STRATEGY: DEFAULT_SEEDS}.get(strategy, 0)
                seeds_here = tuple(range(max(len(seeds), more)))
                cell = done.get(key, {})
                if cell.get("complete") and ("bn" in cell or strategy not in BN_STRATEGIES):
                    continue
                n = 0

                def go(tag, seed, settings):
                    nonlocal n
                    n += 1
                    return _run(data, strategy, seed, settings, tmp / "runs" / f"{ds}-{strategy}-{tag}-{seed}-{n}")

                if "old" not in cell or "new" not in cell:
                    # old and new in turns, seed by seed: a slower minute of the machine weighs on both alike
                    pairs = [(go("old", s, OLD), go("new", s, {})) for s in seeds_here]
                    news = [n for _, n in pairs]
                    cell["old"] = summarise([o for o, _ in pairs])
                    cell["new"] = summarise(news) | {"settings": news[0]["settings"], "first": news[0]["acc"]}
                if grid and strategy in GRID_STRATEGIES and "grid" not in cell:
                    rec, _ = finetune.plan_settings(FinetuneConfig(data=data, strategy=strategy, seed=seeds_here[0]))
                    # the recipe itself is a point of the grid: its seed-0 run is already done
                    tried = [{"point": {}, "acc": cell["new"]["first"], "seconds": cell["new"]["seconds"]}]
                    for pt in grid_points(strategy, rec):
                        r = go("grid", seeds_here[0], pt)
                        tried.append({"point": pt, "acc": r["acc"], "seconds": r["seconds"]})
                    best = max(tried, key=lambda t: (t["acc"], -t["seconds"]))
                    rows = [go("best", s, best["point"]) for s in seeds_here] if best["point"] else None
                    cell["grid"] = (summarise(rows) if rows else {k: cell["new"][k] for k in ("mean", "spread", "seconds", "n")}) | {
                        "point": best["point"], "tried": tried}
                if strategy in BN_STRATEGIES and "bn" not in cell:
                    # AdaBN: the new defaults with the frozen BatchNorm statistics re-estimated on the images
                    cell["bn"] = summarise([go("bn", s, {"bn_adapt": True}) for s in seeds_here])
                cell["complete"] = True
                done[key] = cell
                save()
                on_cell(key, cell)
                log.info("%s: old %.3f new %.3f grid %s", key, cell["old"]["mean"], cell["new"]["mean"],
                         cell.get("grid", {}).get("mean"))
    return done


def goals(done: dict) -> list[tuple[str, str, str]]:
    """(goal, measured, met) for the recipe issue's goals, from the finished cells."""

    out = []
    d = recipes.DEFAULT_STRATEGY
    sample = done.get(f"sample|{d}")
    if sample:
        out.append((f"the sample at >= 85% with the default strategy ({d}) and the bundled backbone",
                    f"{sample['new']['mean']:.1%} ± {sample['new']['spread']:.1%}", "yes" if sample["new"]["mean"] >= 0.85 else "**no**"))
        out.append((f"the default result in no more time than the old {d} default",
                    f"{sample['new']['seconds']} s vs {sample['old']['seconds']} s (old: {sample['old']['mean']:.1%})",
                    "yes" if sample["new"]["seconds"] <= sample["old"]["seconds"] else "**no**"))
    for key, cell in done.items():
        if cell.get("grid"):
            gap = (cell["new"]["mean"] - cell["grid"]["mean"]) * 100
            out.append((f"{key.replace('|', ', ')}: new defaults within 2 points of the grid's best",
                        f"{gap:+.1f} points", "yes" if gap >= -2 else "**no**"))
    return out


def format_markdown(done: dict) -> str:
    def acc(c):
        return f"{c['mean']:.1%} ± {c['spread']:.1%}" if c else "–"

    lines = ["| dataset | strategy | old defaults | s | new defaults | s | grid's best | s | best point | new − best | new + AdaBN |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda key: tuple(v.index(k) if k in v else len(v) for k, v in zip(key.split("|"), (DATASETS, STRATEGIES)))  # noqa: E731
    for key, cell in sorted(done.items(), key=lambda kv: order(kv[0])):
        ds, strategy = key.split("|")
        old, new, grid = cell.get("old"), cell.get("new"), cell.get("grid")
        gap = f"{(new['mean'] - grid['mean']) * 100:+.1f} pt" if new and grid else "–"
        point = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in (grid or {}).get("point", {}).items()) or ("recipe" if grid else "–")
        lines.append(f"| {ds} | {strategy} | {acc(old)} | {old['seconds'] if old else '–'} | {acc(new)} | {new['seconds'] if new else '–'} | "
                     f"{acc(grid)} | {grid['seconds'] if grid else '–'} | {point} | {gap} | {acc(cell.get('bn'))} |")
    return "\n".join(lines)


HEAD = "## Recipes: old defaults, the recipe book, and the best of a small grid"


def section_of(text: str) -> str:
    """The recipe section of a BENCHMARKS.md text ("" when there is none)."""

    return speed.section(text, HEAD)


def write_markdown(done: dict, path: Path) -> Path:
    """Replace (or add) the recipe section of BENCHMARKS.md."""
    head = HEAD
    body = (f"{head}\n\n`python -m engine bench recipes`: validation accuracy, mean ± spread (population std) over seeds, "
            "and seconds per run (whole `finetune` call: images, features, training, evaluation) on this machine. "
            "Each validation split holds 32-40 images, so one image is 2.5-3 points; 3 seeds (the linear probe, whose runs "
            f"take 1-2 s: {PROBE_SEEDS}; the default strategy: {DEFAULT_SEEDS}), the old and the new defaults run in turns; the grid's point is picked on one seed and then re-run on all of them. Datasets: the bundled sample (4 x 40), generated coloured shapes (5 x 40), "
            "the Lab's clothing task (Fashion-MNIST test images, 4 x 40), and scikit-learn's handwritten digits "
            "(real scans, in no pretraining data here, 10 x 20). A dash: not measured (the grid runs for the probe and "
            "the default strategy; AdaBN for the frozen paths).\n\n"
            + format_markdown(done) + "\n\n| goal | measured | met |\n|---|---|---|\n"
            + "\n".join(f"| {g} | {m} | {ok} |" for g, m, ok in goals(done)) + "\n")

    speed.replace_section(path, head, body)
    return path

