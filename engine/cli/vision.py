"""`engine finetune|lr-find|predict|export|import-model`: options made from FinetuneConfig's fields."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli import options
from engine.cli.common import ProgressLine, emit
from engine.core.errors import UserError
from engine.vision.config import FinetuneConfig

# FinetuneConfig's fields on the command line: what picks the model a run starts from (also lr-find's), then training
RUN_FIELDS = ["data", "model", "weights", "strategy", "freeze", "batch_size", "optimizer", "image_size", "seed"]
TRAIN_FIELDS = ["epochs", "lr", "schedule", "weight_decay", "label_smoothing", "bn_adapt", "augment", "early_stopping",
                "val_fraction", "cache"]


def cmd_finetune(args) -> int:
    from engine.jobs import JobContext, ctrl_c_cancels  # deferred: off the CLI's start-up
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
    from engine.data import imagedata  # deferred: off the CLI's start-up
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
    from engine.vision import export  # deferred: off the CLI's start-up

    path = export.export_run(args.run, args.out, onnx=args.onnx, half=args.fp16)
    check = export.parity(args.run, path) if args.onnx else None
    text = f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB)"
    if check:
        text += f"\nparity on {check['what']}: largest probability difference app vs model.onnx {check['max_prob_diff']:.1e}, top class agrees on {check['top1_agree']}/{check['images']}"
    emit(args, {"zip": str(path), "bytes": path.stat().st_size, "parity": check}, text)
    return 0


def cmd_import_model(args) -> int:
    from engine.vision import export  # deferred: off the CLI's start-up

    run_id = export.import_model(args.file, labels=options.csv(args.labels) or None)
    emit(args, {"run_id": run_id}, f"imported as run {run_id}")
    return 0


def add_commands(sub) -> None:
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
