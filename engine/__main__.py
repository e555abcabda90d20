"""Command line: `python -m engine <command> ...` does headlessly what the app does.

Contract: bad input prints one line `error: <what and how to fix>` to stderr and exits 2
(no traceback); `--json` prints one JSON object on stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.errors import UserError


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
    from engine import info

    data = info.collect()
    emit(args, data, info.format_text(data))
    return 0


# --------------------------------------------------------------------------- data
def cmd_data_check(args) -> int:
    from engine import imagedata

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


def cmd_data_import(args) -> int:
    from engine import imagedata

    summary = imagedata.import_path(args.path, args.name)
    emit(args, summary, imagedata.format_import(summary))
    return 0


def cmd_data_list(args) -> int:
    from engine import imagedata

    rows = imagedata.list_datasets()
    emit(args, {"datasets": rows}, "\n".join(f"{r['name']}: {r['images']} images in {r['classes']} classes" for r in rows) or "no datasets")
    return 0


def cmd_data_sample(args) -> int:
    from engine import sample

    summary = sample.load_sample(args.name)
    note = "already in the workspace" if summary["existed"] else "imported"
    emit(args, summary, f"{summary['dataset']!r} {note}: " + ", ".join(f"{c} {n}" for c, n in summary["classes"].items()))
    return 0


def cmd_data_make_sample(args) -> int:
    from engine import sample

    sample.make_sample()
    print(f"wrote {sample.SAMPLE_DIR}")
    return 0


# --------------------------------------------------------------------------- vision (finetune, predict, export, bench finetune)
# --------------------------------------------------------------------------- text (generate, lm-finetune, bench generate)
# --------------------------------------------------------------------------- pretrain
def cmd_pretrain_vision(args) -> int:
    from engine import pretrain

    logging.getLogger("engine").setLevel(logging.INFO)  # pretraining is long: always show progress
    if args.probe_only:
        card = pretrain.probe_vision(args.out or None, seed=args.seed)
    else:
        cfg = pretrain.VisionPretrainConfig(minutes=args.minutes, steps=args.steps, seed=args.seed,
                                            threads=args.threads, out=args.out or "", probe=not args.no_probe)
        if cfg.steps is None and (cfg.minutes is None or cfg.minutes <= 0):
            raise UserError("--minutes must be > 0 (or give --steps)")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserError("--steps must be >= 1")
        card = pretrain.pretrain_vision(cfg)
    emit(args, card)
    return 0



def build_parser() -> Parser:
    p = Parser(prog="python -m engine", description="Transfer Studio engine")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    s = sub.add_parser("info", help="versions, device, available weights, workspace")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    data = sub.add_parser("data", help="check or import image datasets").add_subparsers(dest="data_command", required=True, parser_class=Parser)
    s = data.add_parser("check", help="validate a folder of class subfolders or a .zip")
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_check)
    s = data.add_parser("import", help="import a folder/zip into the workspace as a dataset")
    s.add_argument("path")
    s.add_argument("--name", required=True)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_import)
    s = data.add_parser("list", help="datasets in the workspace")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_list)

    s = data.add_parser("sample", help="import the bundled sample dataset into the workspace")
    s.add_argument("--name", default="Fruit (sample)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_data_sample)
    s = data.add_parser("make-sample", help="regenerate assets/sample (maintainers; needs fonts-noto-color-emoji)")
    s.set_defaults(func=cmd_data_make_sample)

    # (vision parsers)
    # (text parsers)
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
    return p


def main(argv: list[str] | None = None) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
