"""Command line: `python -m engine <command> ...` does headlessly what the app does.

Contract: bad input prints one line `error: <what and how to fix>` to stderr and exits 2
(no traceback); `--json` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from engine import demo, report
from engine.bench import browser_load, recipe_bench, speed, suite
from engine.cli import info, options
from engine.core import runs, workspace
from engine.core.errors import UserError
from engine.data import demo_tasks, imagedata, sample
from engine.jobs import JobContext, ctrl_c_cancels
from engine.models import sources, store
from engine.pretrain import mini_resnet
from engine.vision import export, label_issues
from engine.vision.config import FinetuneConfig


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one `error: ...` line and exit 2 like every other error."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see --help)")


def emit(args, obj, text: str | None = None) -> None:
    """Print `obj` as JSON with --json, else `text` (or a readable dump of obj)."""
    if getattr(args, "json", False):
        print(json.dumps(obj))
    elif text is not None:
        print(text)
    else:
        print(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    data = info.collect()
    emit(args, data, info.format_text(data))
    return 0


# --------------------------------------------------------------------------- models
class ProgressLine:
    """A download's progress on stderr: one line, redrawn in place on a terminal, else every 10%."""

    def __init__(self, stream=None):
        self._stream, self.step = stream, -1

    @property
    def stream(self):
        return self._stream or sys.stderr  # (looked up when used: tests swap sys.stderr)

    def __call__(self, **p) -> None:
        if p.get("bytes") is None:
            return
        tty = self.stream.isatty()
        step = int((p.get("progress") or 0) * 10)
        if tty or step != self.step:
            self.step = step
            line = f"downloading {p.get('model', '')}: {store.progress_line(p)}"
            print(("\r" + line.ljust(72)) if tty else line, end="" if tty else "\n", file=self.stream, flush=True)
            if tty and p.get("progress") == 1.0:
                print(file=self.stream)


def cmd_models_list(args) -> int:
    found = store.catalog()
    net = "online" if sources.online() else f"offline: {sources.offline_reason()}"
    emit(args, {"models": [m.to_dict() for m in found], "online": sources.online()}, store.format_table(found) + f"\n({net})")
    return 0


def cmd_models_download(args) -> int:
    ctx = JobContext(run_id="download", config={"name": args.name}, run_dir=None)
    with ctrl_c_cancels(ctx):  # Ctrl-C stops the download cleanly
        path = store.download(args.name, report=ProgressLine(), cancelled=ctx.cancelled)
    m = store.get(args.name)
    emit(args, m.to_dict(), f"{m.name}: {m.status}, {m.size_mb:.0f} MB at {path}")
    return 0


def cmd_models_delete(args) -> int:
    m = store.delete(args.name)
    emit(args, m.to_dict(), f"deleted {args.name} (now {m.status})")
    return 0


def cmd_models_import(args) -> int:
    m = store.import_file(args.file, name=args.name)
    emit(args, m.to_dict(), f"imported {m.name}: {m.status}, {m.size_mb:.0f} MB at {m.path}")
    return 0


# --------------------------------------------------------------------------- data
def cmd_data_check(args) -> int:
    report = imagedata.check_path(args.path)
    obj = {"classes": report.classes, "rejected": report.rejected, "usable": report.usable}
    if args.json:
        print(json.dumps(obj))
    else:
        for name, n in report.classes.items():
            print(f"{name}: {n} valid images")
        for r in report.rejected:
            print(f"rejected {r['file']}: {r['reason']}")
    if not report.usable:
        raise UserError(report.why_unusable)
    return 0


def cmd_data_issues(args) -> int:
    found = label_issues.find(args.name, weights=args.weights, arch=args.model)
    lines = [f"{len(found['issues'])} of {found['images']} labels look wrong (out-of-fold accuracy "
             f"{found['out_of_fold_accuracy']:.1%} with {found['weights']} features):"]
    lines += [f"  {i['name']}: labelled {i['given']} ({i['p_given']:.0%}), looks like {i['suggested']} ({i['p_suggested']:.0%})"
              for i in found["issues"]]
    emit(args, found, "\n".join(lines))
    return 0


def cmd_data_map(args) -> int:
    from engine.vision import datamap  # deferred: imports torch

    m = datamap.compute(args.name, weights=args.weights, arch=args.model)
    obj = {"classes": m.classes, "method": m.method, "knn": m.knn, "weights": m.weights, "points": m.rows()}
    emit(args, obj, f"{m.method} map of {len(m.files)} images; 5-NN accuracy in feature space: "
                    f"pretrained ({m.weights}) {m.knn['pretrained']:.1%}, random init {m.knn['random']:.1%}")
    return 0


def cmd_data_import(args) -> int:
    summary = imagedata.import_path(args.path, args.name)
    emit(args, summary, imagedata.format_import(summary))
    return 0


def cmd_data_list(args) -> int:
    rows = imagedata.list_datasets()
    emit(args, {"datasets": rows}, "\n".join(f"{r['name']}: {r['images']} images in {r['classes']} classes" for r in rows) or "no datasets")
    return 0


def cmd_data_sample(args) -> int:
    summary = sample.load_sample(args.name)
    note = "already in the workspace" if summary["existed"] else "imported"
    emit(args, summary, f"{summary['dataset']!r} {note}: " + ", ".join(f"{c} {n}" for c, n in summary["classes"].items()))
    return 0


def cmd_data_make_sample(args) -> int:
    sample.make_sample()
    print(f"wrote {sample.SAMPLE_DIR}")
    return 0


# --------------------------------------------------------------------------- vision (finetune, predict, export, bench finetune)
# FinetuneConfig's fields on the command line: what picks the model a run starts from (also lr-find's), then training
RUN_FIELDS = ["data", "model", "weights", "strategy", "freeze", "batch_size", "optimizer", "image_size", "seed"]
TRAIN_FIELDS = ["epochs", "lr", "schedule", "weight_decay", "label_smoothing", "bn_adapt", "augment", "early_stopping",
                "val_fraction", "cache"]


def cmd_finetune(args) -> int:
    from engine.vision import finetune  # deferred: imports torch

    cfg = FinetuneConfig(**options.values(args, RUN_FIELDS + TRAIN_FIELDS)).validate()
    out = Path(args.out)
    if args.resume and not (out / "last.json").is_file():
        raise UserError(f"nothing to resume in {out} (no last.json checkpoint)")
    # progress goes to stdout, or to stderr with --json so stdout holds only the final object
    stream = sys.stderr if args.json else sys.stdout
    from engine.train import distributed  # deferred: imports torch

    quiet = not distributed.env_info().is_main  # under torchrun only rank 0 prints
    seen = {"epoch": None, "msg": None}
    download_line = ProgressLine(stream)

    def on_report(p: dict) -> None:
        if quiet:
            return
        if p.get("phase") == "downloading":
            download_line(**p)
        elif p.get("epoch_done") != seen["epoch"] and p.get("epoch_done"):
            seen["epoch"] = p["epoch_done"]
            print(p.get("message", ""), file=stream, flush=True)
        elif p.get("phase") == "extracting" and p.get("message") != seen["msg"] and p.get("step") == p.get("steps"):
            seen["msg"] = p.get("message")
            print(p.get("message", ""), file=stream, flush=True)

    ctx = JobContext(run_id=out.name, config=cfg.__dict__, run_dir=out, resume=args.resume, on_report=on_report)
    with ctrl_c_cancels(ctx):  # Ctrl-C: stop and keep what was learned
        summary = finetune.finetune(cfg, out, ctx)
    text = (f"settings: {finetune.describe_settings(summary['settings'], summary['from_recipe'])}\n"
            f"best val acc {summary['best_val_acc']:.4f} (epoch {summary['best_epoch']}), {summary['epochs_done']} epochs, "
            f"{summary['seconds']:.1f}s, {summary['img_s']} img/s, weights: {summary['weights']['name']}"
            + (" [cancelled]" if summary["cancelled"] else "") + f"\nwrote {out}")
    if not quiet:
        emit(args, summary, text)
    return 130 if summary["cancelled"] else 0


def cmd_lr_find(args) -> int:
    from engine.vision import lrfind  # deferred: imports torch

    cfg = FinetuneConfig(**options.values(args, RUN_FIELDS))
    result = lrfind.find_lr(cfg, steps=args.steps)
    emit(args, result, f"suggested learning rate (head): {result['suggestion']:.2e}  (lowest loss at {result['minimum_lr']:.2e}; "
                       f"the recipe uses {result['recipe_lr']:g})\n{result['steps']} steps, {result['seconds']:.1f} s")
    return 0


def cmd_predict(args) -> int:
    from engine.vision import inference  # deferred: imports torch

    if args.top_k < 1:
        raise UserError("--top-k must be >= 1")
    loaded = inference.load_model(args.run)
    results, failed = [], 0
    for f in args.images:
        try:
            with open(f, "rb") as fh:
                img = imagedata.decode_image(fh.read(), f)
            top = inference.predict(loaded, [img], top_k=args.top_k)[0]
            results.append({"file": f, "top": [{"label": lab, "prob": round(p, 6)} for lab, p in top]})
            if args.explain:  # where the model looked, for the predicted (or the --explain-class) class
                from engine.vision import heatmaps  # deferred: imports torch

                h = heatmaps.explain(loaded, [img], target=args.explain_class)[0]
                results[-1]["heatmap"] = {"file": str(heatmaps.save([h], [f], args.explain)[0]), "class": h.label,
                                          "prob": round(h.probability, 6)}
        except (UserError, OSError) as err:
            failed += 1
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            results.append({"file": f, "error": reason})
            if not args.json:
                print(f"error: {f}: {reason}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if "top" in r:
                print(f"{r['file']}: " + ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"])
                      + (f"  [heatmap for {r['heatmap']['class']}: {r['heatmap']['file']}]" if "heatmap" in r else ""))
    return 2 if failed else 0


def cmd_export(args) -> int:
    pass  # import removed

    path = export.export_run(args.run, args.out, onnx=args.onnx, half=args.fp16)
    check = export.parity(args.run, path) if args.onnx else None
    text = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
    if check:
        text += f"\nparity on {check['what']}: largest probability difference app vs model.onnx {check['max_prob_diff']:.1e}, top class agrees on {check['top1_agree']}/{check['images']}"
    emit(args, {"zip": str(path), "bytes": path.stat().st_size, "parity": check}, text)
    return 0


def cmd_import_model(args) -> int:
    run_id = export.import_model(args.file, labels=options.csv(args.labels) or None)
    emit(args, {"run_id": run_id}, f"imported as run {run_id}")
    return 0


def cmd_bench_finetune(args) -> int:
    result = speed.bench_finetune(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs, threads=args.threads)
    emit(args, result, speed.format_finetune(result))
    return 0


def cmd_bench_seed_loop(args) -> int:
    result = speed.seed_loop_process(args.list, args.image_size, args.epochs)
    emit(args, result, f"seed loop: best val acc {result['best_val_acc']:.3f} in {result['seconds']:.1f} s")
    return 0


def cmd_bench_process(args) -> int:
    r = speed.bench_process(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs)

    path = speed.write_process_markdown(r, Path(args.out) if args.out else workspace.PROJECT / "BENCHMARKS.md")
    emit(args, r, f"{r['images']} images at {r['image_size']} px, {r['epochs']} epochs, whole processes: seed loop {r['seed_seconds']} s "
                  f"(val acc {r['seed_val_acc']}), engine finetune --strategy linear {r['seconds']} s (val acc {r['val_acc']}): "
                  f"{r['ratio']}x; first run on this machine {r['first_seconds']} s ({r['first_ratio']}x); extractors {r['extractor_img_s']} img/s"
                  f"\nwrote {path}")
    return 0


def cmd_bench_load(args) -> int:
    r = browser_load.bench_load(sessions=args.sessions, seconds=args.seconds, rounds=args.rounds, train=not args.no_train)
    path = browser_load.write_markdown(r, Path(args.out) if args.out else None)
    emit(args, r, browser_load.format_load(r) + f"\nwrote {path}")
    return 0


def cmd_bench_all(args) -> int:
    result = suite.run_all(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs,
                              train_steps=args.train_steps, tokens=args.tokens, cold_start=not args.no_cold_start,
                              threads=args.threads, process_per_class=args.process_per_class,
                              process_image_size=args.process_image_size)
    path = suite.write_markdown(result, Path(args.out) if args.out else None)
    emit(args, result, suite.format_markdown(result) + f"\nwrote {path}")
    return 0


def cmd_bench_recipes(args) -> int:
    datasets, strategies = options.csv(args.datasets), options.csv(args.strategies)
    bad = [d for d in datasets if d not in recipe_bench.DATASETS] + [s for s in strategies if s not in recipe_bench.STRATEGIES]
    if bad or not datasets or not strategies:
        raise UserError(f"unknown dataset or strategy {', '.join(bad) or '(none given)'}; datasets: {', '.join(recipe_bench.DATASETS)}; "
                        f"strategies: {', '.join(recipe_bench.STRATEGIES)}")
    if not 1 <= args.seeds <= 10:
        raise UserError("--seeds must be from 1 to 10")
    logging.getLogger("engine").setLevel(logging.INFO)  # long: show each finished cell
    done = recipe_bench.run(datasets, strategies, seeds=tuple(range(args.seeds)), grid=not args.no_grid,
                             results=Path(args.results) if args.results else None)
    path = recipe_bench.write_markdown(done, Path(args.out) if args.out else workspace.PROJECT / "BENCHMARKS.md")
    emit(args, done, recipe_bench.format_markdown(done) + f"\nwrote {path}")
    return 0


# --------------------------------------------------------------------------- text (generate, lm-finetune, bench generate)
def cmd_generate(args) -> int:
    from engine.text import causal_lm, generation  # deferred: imports torch

    cfg = generation.GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_return_sequences=args.num_return_sequences, seed=args.seed, stop=args.stop or [],
    ).validate()
    causal_lm.check_prompt(args.prompt)
    lm = causal_lm.load(args.model)
    gen = generation.generate(lm, args.prompt, cfg)
    if gen.prompt_notice:
        print(f"note: {gen.prompt_notice}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": lm.name, "samples": [s.text for s in gen.samples], "tokens_per_s": round(gen.tokens_per_s, 1),
                          "seed": gen.seed, "completions": [s.completion for s in gen.samples], "finish": [s.finish for s in gen.samples],
                          "new_tokens": gen.new_tokens, "seconds": round(gen.seconds, 3), "dtype": gen.dtype}))
    else:
        print("\n\n---\n\n".join(s.text for s in gen.samples))
        # stdout holds only the texts (byte-identical for the same seed); the stats go to stderr
        print(f"[{lm.name} · {gen.new_tokens} tokens in {gen.seconds:.2f} s · {gen.tokens_per_s:.1f} tokens/s · seed {gen.seed}]", file=sys.stderr)
    return 0


def cmd_lm_finetune(args) -> int:
    from engine.text import lm_finetune  # deferred: imports torch

    cfg = lm_finetune.LMFinetuneConfig(texts=args.text, model=args.model, epochs=args.epochs, lr=args.lr, block_size=args.block_size,
                                   batch_size=args.batch_size, seed=args.seed, sample_prompt=args.prompt or "").validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if args.json else sys.stdout
    seen = {"epoch": None}
    download_line = ProgressLine(stream)

    def on_report(p: dict) -> None:
        if p.get("phase") == "downloading":
            download_line(**p)
        elif p.get("phase") in ("loading", "evaluating", "sampling", "resuming"):
            print(p.get("message", ""), file=stream, flush=True)
        elif p.get("phase") == "training" and (p["step"] == p["steps"] or p["epoch"] != seen["epoch"]):
            seen["epoch"] = p["epoch"]
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} loss {p['loss']:.3f} ({p['tokens_s']:.0f} tokens/s)", file=stream, flush=True)

    ctx = JobContext(run_id=out.name, config=cfg.__dict__, run_dir=out, resume=args.resume, on_report=on_report)
    with ctrl_c_cancels(ctx):  # Ctrl-C: stop, keep a resumable checkpoint
        summary = lm_finetune.run_job(ctx)
    if ctx.cancelled():
        emit(args, summary, f"cancelled at step {summary['step']}/{summary['steps']}; continue with --resume")
        return 130
    text = (f"perplexity on the held-out text: before {summary['ppl_before']:.2f} -> after {summary['ppl_after']:.2f}\n"
            f"prompt: {summary['sample_prompt']!r} (seed {summary['sample_seed']})\n"
            f"base:       {summary['sample_base']!r}\nfine-tuned: {summary['sample_finetuned']!r}\nwrote {summary['model_dir']}")
    emit(args, {k: v for k, v in summary.items() if k != "losses"}, text)
    return 0


def cmd_bench_generate(args) -> int:
    result = speed.bench_generate(new_tokens=args.tokens, repeats=args.repeats, threads=args.threads,
                                  models=tuple(args.models) if args.models else ("gpt2-124m-random", "mini"))
    emit(args, result, speed.format_generate(result))
    return 0


def cmd_pretrain_text(args) -> int:
    from engine.pretrain import mini_gpt2  # deferred: imports torch

    logging.getLogger("engine").setLevel(logging.INFO)  # pretraining is long: always show progress
    if args.steps is None and args.minutes <= 0:
        raise UserError("--minutes must be > 0 (or give --steps)")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    cfg = mini_gpt2.TextPretrainConfig(minutes=args.minutes, steps=args.steps, seed=args.seed, threads=args.threads)
    if args.out:
        cfg.out = Path(args.out)
    card = mini_gpt2.pretrain_text(cfg, resume=args.resume)
    m = card["metrics"]
    emit(args, card, f"validation perplexity {m['val_perplexity']:.1f} ({m['bits_per_byte']:.3f} bits/byte) after "
                     f"{card['training']['steps']} steps\nsample: {card['sample']['text']!r}\nwrote {cfg.out}")
    return 0


# --------------------------------------------------------------------------- showcase (report, demo)
def cmd_report(args) -> int:
    from engine.vision.inference import resolve_run  # deferred: imports torch

    out = report.write_report(resolve_run(args.run), args.out)
    emit(args, {"report": str(out), "bytes": out.stat().st_size}, f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, self-contained)")
    return 0


def cmd_demo(args) -> int:
    if args.workspace:
        os.environ["TRANSFER_STUDIO_HOME"] = args.workspace

    if args.reset:
        done = demo.reset(epochs=args.epochs, lab=not args.no_lab)
    else:
        done = demo.prepare(force=args.force, epochs=args.epochs, lab=not args.no_lab)
    added = ", ".join(done["added"]) or "nothing (already complete)"
    removed = f"; removed {len(done['removed'])} items not in the demo" if done.get("removed") else ""
    emit(args, done, f"demo workspace {done['workspace']}: added {added}{removed}")
    return 0


# --------------------------------------------------------------------------- lab
def _ints(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be a comma list of integers, e.g. 1,5,10 (got {value!r})") from None


def cmd_lab(args) -> int:
    from engine.lab import experiments  # deferred: imports torch

    cfg = experiments.LabConfig(
        experiment=args.lab_command, data=args.data, preset=args.preset, weights=args.weights,
        epochs=getattr(args, "epochs", None), seeds=getattr(args, "seeds", None), image_size=getattr(args, "image_size", None),
        batch_size=getattr(args, "batch_size", None), lr=getattr(args, "lr", None), ks=_ints(getattr(args, "ks", None), "--ks"),
        sizes=_ints(getattr(args, "sizes", None), "--sizes"), labels_per_class=getattr(args, "labels_per_class", None),
        ae_epochs=getattr(args, "ae_epochs", None), max_per_class=getattr(args, "max_per_class", None))
    resolved = cfg.resolved()  # bad options fail here, before a run is recorded
    cfg.data = resolved.data = experiments.check_data(cfg.data)  # "sample" or a demo key -> the dataset's name
    run_id = runs.create("lab", f"Lab · {experiments.EXPERIMENTS[cfg.experiment]} · {cfg.data} · {cfg.preset}",
                         {k: v for k, v in vars(cfg).items() if v is not None})
    stream = sys.stderr if args.json else sys.stdout
    seen = set()

    def on_report(p: dict) -> None:  # one line per finished epoch (or phase message)
        msg = p.get("message")
        if msg and msg not in seen and p.get("phase") in ("training", "pretraining", "measuring", "loading"):
            seen.add(msg)
            print(msg, file=stream, flush=True)

    ctx = JobContext(run_id=run_id, config=vars(resolved), run_dir=runs.run_dir(run_id), on_report=on_report)
    runs.set_status(run_id, "running")
    try:
        with ctrl_c_cancels(ctx):  # Ctrl-C: stop, keep finished runs
            summary = experiments.run_lab(cfg, ctx.run_dir, ctx)
    except BaseException as err:
        runs.set_status(run_id, "failed", error=str(err)[:300])
        raise
    runs.set_status(run_id, "cancelled" if ctx.cancelled() else "done", summary=summary)
    state = experiments.read_result(ctx.run_dir) or {}
    emit(args, experiments.cli_object(run_id, state), experiments.format_text(run_id, state))
    return 130 if ctx.cancelled() else 0


def cmd_lab_demo_data(args) -> int:
    keys = args.keys or list(demo_tasks.DEMOS)
    done = [demo_tasks.import_demo(k) for k in keys]
    emit(args, {"datasets": done}, "\n".join(f"{d['dataset']!r}: " + ", ".join(f"{c} {n}" for c, n in d["classes"].items())
                                             + (" (already there)" if d["existed"] else "") for d in done))
    return 0


# --------------------------------------------------------------------------- pretrain
def cmd_pretrain_vision(args) -> int:
    logging.getLogger("engine").setLevel(logging.INFO)  # pretraining is long: always show progress
    if args.probe_only:
        card = mini_resnet.probe_vision(args.out or None)
    else:
        cfg = mini_resnet.VisionPretrainConfig(minutes=args.minutes, steps=args.steps, seed=args.seed,
                                            threads=args.threads, out=args.out or "", probe=not args.no_probe)
        if cfg.steps is None and (cfg.minutes is None or cfg.minutes <= 0):
            raise UserError("--minutes must be > 0 (or give --steps)")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserError("--steps must be >= 1")
        card = mini_resnet.pretrain_vision(cfg)
    emit(args, card)
    return 0



def command(group, name: str, func, help: str, *positionals, json_flag: bool = True) -> argparse.ArgumentParser:
    """One subcommand: its positional arguments (a name, or (name, help)), --json, and the function that runs it."""
    s = group.add_parser(name, help=help)
    for arg in positionals:
        arg_name, arg_help = arg if isinstance(arg, tuple) else (arg, None)
        s.add_argument(arg_name, help=arg_help)
    if json_flag:
        s.add_argument("--json", action="store_true")
    s.set_defaults(func=func)
    return s


def add_models_commands(sub) -> None:
    models = sub.add_parser("models", help="list, download, delete or import pretrained weights").add_subparsers(
        dest="models_command", required=True, parser_class=Parser)
    command(models, "list", cmd_models_list, "every model the app knows, with its status, size and place")
    command(models, "download", cmd_models_download, "download a model's weights (with progress; Ctrl-C stops cleanly)",
            ("name", "a name from `models list` (e.g. resnet18, gpt2) or a hub id org/model"))
    command(models, "delete", cmd_models_delete, "delete a downloaded or imported model", "name")
    s = command(models, "import", cmd_models_import, "bring in a torchvision ImageNet .pth or a zipped Hugging Face model folder", "file")
    s.add_argument("--name", default=None, help=".pth: the architecture (default: found from the tensors); .zip: the model id (default: the file name)")


def add_data_commands(sub):
    data = sub.add_parser("data", help="check or import image datasets").add_subparsers(dest="data_command", required=True, parser_class=Parser)
    command(data, "check", cmd_data_check, "validate a folder of class subfolders or a .zip", "path")
    command(data, "import", cmd_data_import, "import a folder/zip into the workspace as a dataset", "path").add_argument("--name", required=True)
    for name, func, what in (("issues", cmd_data_issues, "images whose labels look wrong (cleanlab on out-of-fold predictions)"),
                             ("map", cmd_data_map, "a 2-D map of the images by pretrained and by random features")):
        s = command(data, name, func, what, ("name", "a workspace dataset or a folder of class folders"))
        s.add_argument("--model", default="resnet18")
        s.add_argument("--weights", default="auto")
    command(data, "list", cmd_data_list, "datasets in the workspace")
    return data


def add_vision_commands(sub) -> None:
    """finetune, lr-find, predict, export, import-model: options made from FinetuneConfig's fields."""
    # (vision parsers) options made from FinetuneConfig's fields: names, defaults, choices and help in one place

    s = sub.add_parser("finetune", help="fine-tune a ResNet on an image dataset")
    options.add_options(s, FinetuneConfig, RUN_FIELDS + TRAIN_FIELDS)
    s.add_argument("--out", required=True, metavar="RUN_DIR")
    s.add_argument("--resume", action="store_true", help="continue from RUN_DIR's last checkpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_finetune)

    s = sub.add_parser("lr-find", help="suggest a learning rate: a short sweep on a copy of the model (changes nothing)")
    options.add_options(s, FinetuneConfig, RUN_FIELDS, choices={"optimizer": ("sgd", "adamw")})
    s.add_argument("--steps", type=int, default=60, help="learning rates tried, one step each (10..1000)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lr_find)

    s = sub.add_parser("predict", help="top-k classes for images with a trained run")
    s.add_argument("--run", required=True, help="run folder or run id")
    s.add_argument("images", nargs="+", metavar="IMAGE")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--explain", metavar="OUT_DIR", default=None,
                   help="also write a Grad-CAM heatmap per image (where the model looked) into OUT_DIR")
    s.add_argument("--explain-class", default=None, metavar="CLASS", help="the class the heatmap is for (default: the predicted one)")
    s.add_argument("--json", action="store_true", help='a list of {"file", "top": [{"label", "prob"}]} (or {"file", "error"})')
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("export", help="ZIP with safetensors, labels, preprocessing, model card (+ ONNX)")
    s.add_argument("--run", required=True, help="run folder or run id")
    s.add_argument("--out", required=True, metavar="FILE.zip")
    s.add_argument("--onnx", action="store_true", help="include model.onnx (checked against PyTorch)")
    s.add_argument("--fp16", action="store_true", help="store the weights in fp16 (about half the size)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("import-model", help="import an exported ZIP or .safetensors as a run usable by predict")
    s.add_argument("file")
    s.add_argument("--labels", default="", help="comma list of class names (when the file has none)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_import_model)


def add_bench_commands(sub) -> None:
    """the benchmarks behind BENCHMARKS.md (not tests)."""
    bench = sub.add_parser("bench", help="benchmarks (not tests)").add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    s = bench.add_parser("finetune", help="naive frozen-backbone loop vs the cached linear path")
    s.add_argument("--per-class", type=int, default=150, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=64, help="the mini backbone's own size")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_finetune)
    s = bench.add_parser("seed-loop", help="the seed's frozen-backbone loop as its own process (used by bench process)")
    s.add_argument("--list", required=True, help="JSON split written by bench process")
    s.add_argument("--image-size", type=int, default=160)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_seed_loop)
    s = bench.add_parser("process", help="whole processes from start to exit: the seed loop vs engine finetune --strategy linear")
    s.add_argument("--per-class", type=int, default=150, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=160)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_process)
    s = bench.add_parser("load", help="N real browser sessions generating and predicting at once against one server")
    s.add_argument("--sessions", type=int, default=10)
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--rounds", type=int, default=2, help="the load again on the same server (memory growth)")
    s.add_argument("--no-train", action="store_true", help="no fine-tuning job meanwhile")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_load)
    s = bench.add_parser("all", help="every benchmark side by side; writes BENCHMARKS.md")
    s.add_argument("--per-class", type=int, default=40, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--train-steps", type=int, default=3, help="timed full fine-tuning steps per variant")
    s.add_argument("--tokens", type=int, default=32, help="new tokens per generation run")
    s.add_argument("--process-per-class", type=int, default=150, help="whole-process row: generated images per class")
    s.add_argument("--process-image-size", type=int, default=160, help="whole-process row: image size")
    s.add_argument("--no-cold-start", action="store_true", help="skip the app cold-start measurement (needs Chromium)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_all)
    s = bench.add_parser("recipes", help="old defaults vs the recipe book vs a small grid, per strategy and dataset")
    s.add_argument("--datasets", default="sample,shapes,clothing,digits", help="comma list of sample,shapes,clothing,digits")
    s.add_argument("--strategies", default="linear,partial,full,two-phase,scratch")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--no-grid", action="store_true", help="only the old and the new defaults")
    s.add_argument("--results", default=None, help="JSON file of finished cells (resumes from it)")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_recipes)
    # (bench generate parser: bench.add_parser("generate", ...))
    s = bench.add_parser("generate", help="tokens/s: plain HF generate (fp32) vs the project's generation path")
    s.add_argument("--tokens", type=int, default=64, help="new tokens per run on the 124M-shaped model (the mini makes twice as many)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--models", nargs="+", choices=("gpt2-124m-random", "mini"), default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_generate)


def add_text_commands(sub) -> None:
    """generate, lm-finetune, report, demo."""
    # (text parsers)
    s = sub.add_parser("generate", help="generate text with GPT-2 or the bundled mini model")
    s.add_argument("--model", default="auto", help="auto | mini | gpt2 | distilgpt2 | hub id | PATH to a Hugging Face model folder")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=60)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=40, help="0 = off")
    s.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off")
    s.add_argument("--num-return-sequences", type=int, default=1, help="1..5")
    s.add_argument("--seed", type=int, default=None, help="same seed + options -> the same text (default: a fresh seed, printed)")
    s.add_argument("--stop", nargs="+", default=None, metavar="STR", help="end a sample when it produces one of these strings")
    s.add_argument("--json", action="store_true", help='{"model", "samples", "tokens_per_s", "seed", ...}')
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("lm-finetune", help="fine-tune the language model on your own .txt files")
    s.add_argument("--text", nargs="+", required=True, metavar="FILE", help="UTF-8 .txt files")
    s.add_argument("--model", default="auto", help="auto | mini | gpt2 | hub id | PATH")
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--block-size", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompt", default="", help="prompt for the base vs fine-tuned samples (default: start of the held-out text)")
    s.add_argument("--out", required=True, metavar="DIR", help="run folder; the model goes to DIR/model")
    s.add_argument("--resume", action="store_true", help="continue from DIR's last checkpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lm_finetune)
    s = sub.add_parser("report", help="one self-contained HTML report of a run (opens offline)")
    s.add_argument("--run", required=True, help="run folder or run id")
    s.add_argument("--out", required=True, help="the .html file to write")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_report)
    s = sub.add_parser("demo", help="prepare a demo workspace: sample data, a finished run, a comparison, generations")
    s.add_argument("--workspace", help="folder to use (default: TRANSFER_STUDIO_HOME or ./workspace)")
    s.add_argument("--force", action="store_true", help="add the demo even if the workspace holds your own data")
    s.add_argument("--reset", action="store_true", help="delete every dataset, run and generation that is not the demo's, then complete the demo")
    s.add_argument("--epochs", type=int, default=None, help="the demo run's epochs (default: from the recipe)")
    s.add_argument("--no-lab", action="store_true", help="skip the pretrained-vs-scratch comparison (1-2 minutes on a small CPU)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_demo)


def add_lab_and_pretrain_commands(sub) -> None:
    """the Transfer Lab's experiments and the bundled models' pretraining."""
    # (showcase parsers)

    # (lab parsers)
    lab_p = sub.add_parser("lab", help="Transfer Lab experiments: compare, freeze, data-size, unsupervised, advise").add_subparsers(
        dest="lab_command", required=True, parser_class=Parser)
    for name, what in (("compare", "pretrained vs from scratch: both curves and start / slope / asymptote"),
                       ("freeze", "sweep k frozen stages (5 = linear probe ... 0 = all train) + the lr/10 rule"),
                       ("data-size", "accuracy vs labelled images per class, pretrained vs scratch"),
                       ("unsupervised", "autoencoder pretrained without labels, fine-tuned with few labels, vs scratch"),
                       ("advise", "size x similarity -> scenario and recommended strategy")):
        s = lab_p.add_parser(name, help=what)
        s.add_argument("--data", default="Fruit (sample)", help="workspace dataset, folder/ZIP, 'sample' or a demo key (lab demo-data)")
        s.add_argument("--preset", default="quick", choices=["quick", "thorough"])
        s.add_argument("--weights", default="auto", help="the pretrained side: auto | imagenet | mini | FILE.safetensors")
        s.add_argument("--image-size", type=int, default=None, help="pixels (default: the preset's)")
        if name == "advise":
            s.add_argument("--max-per-class", type=int, default=None, help="images per class used to measure similarity")
        else:
            s.add_argument("--epochs", type=int, default=None)
            s.add_argument("--seeds", type=int, default=None, help="runs per setting, averaged (spread shown)")
            s.add_argument("--batch-size", type=int, default=None)
            s.add_argument("--lr", type=float, default=None, help="learning rate of the new output layer")
        if name == "freeze":
            s.add_argument("--ks", default=None, help="frozen stages to try, e.g. 5,4,3,2,1,0")
        if name == "data-size":
            s.add_argument("--sizes", default=None, help="labelled images per class, e.g. 1,5,10,0 (0 = all)")
        if name == "unsupervised":
            s.add_argument("--labels-per-class", type=int, default=None)
            s.add_argument("--ae-epochs", type=int, default=None, help="autoencoder pretraining epochs")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_lab)
    s = lab_p.add_parser("demo-data", help="import the built-in similar/different demo datasets into the workspace")
    s.add_argument("keys", nargs="*", help="similar-small, similar-large, different-small, different-large, clothing (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lab_demo_data)

    # (pretrain parsers)
    pre = sub.add_parser("pretrain", help="reproducibly pretrain the bundled mini models").add_subparsers(dest="pretrain_command", required=True, parser_class=Parser)
    s = pre.add_parser("vision", help="pretrain the mini resnet18 (Fashion-MNIST + fractals) into assets/mini-resnet18")
    s.add_argument("--minutes", type=float, default=20.0, help="time budget, turned into a fixed step count (default 20)")
    s.add_argument("--steps", type=int, default=None, help="exact number of steps (reproducible; overrides --minutes)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    s.add_argument("--out", default="", help="output folder (default assets/mini-resnet18)")
    s.add_argument("--no-probe", action="store_true", help="skip the linear-probe transfer measurement")
    s.add_argument("--probe-only", action="store_true", help="only re-measure the transfer numbers of an existing backbone")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pretrain_vision)
    # (pretrain text parser: pre.add_parser("text", ...))
    s = pre.add_parser("text", help="pretrain the mini GPT-2 (own BPE, Debian fortunes) into assets/mini-gpt2")
    s.add_argument("--minutes", type=float, default=30.0, help="time budget, turned into a fixed step count (default 30)")
    s.add_argument("--steps", type=int, default=None, help="exact number of steps (reproducible; overrides --minutes)")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    s.add_argument("--out", default="", help="output folder (default assets/mini-gpt2)")
    s.add_argument("--resume", action="store_true", help="continue the last run from its saved optimizer state")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pretrain_text)


def build_parser() -> Parser:
    p = Parser(prog="python -m engine", description="Transfer Studio engine")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    p.add_argument("--offline", action="store_true", help="never download weights, as TRANSFER_STUDIO_OFFLINE=1 (anywhere on the line)")
    s = sub.add_parser("info", help="versions, device, available weights, workspace")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    add_models_commands(sub)
    data = add_data_commands(sub)

    s = data.add_parser("sample", help="import the bundled sample dataset into the workspace")
    s.add_argument("--name", default="Fruit (sample)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_sample)
    s = data.add_parser("make-sample", help="regenerate assets/sample (maintainers; needs fonts-noto-color-emoji)")
    s.set_defaults(func=cmd_data_make_sample)
    add_vision_commands(sub)
    add_bench_commands(sub)
    add_text_commands(sub)
    add_lab_and_pretrain_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--offline" in argv:  # accepted anywhere, not only before the command
        argv.remove("--offline")
        os.environ["TRANSFER_STUDIO_OFFLINE"] = "1"

    store.default_report = ProgressLine()  # downloads a command needs first show a progress line
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return args.func(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        store.default_report = None


if __name__ == "__main__":
    sys.exit(main())
