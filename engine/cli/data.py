"""`engine data check|import|list|sample|map|issues`: image datasets in and looked at."""
from __future__ import annotations

import json

from engine.cli.common import Parser, command, emit
from engine.core.errors import UserError


def cmd_data_check(args) -> int:
    from engine.data import imagedata  # deferred: off the CLI's start-up

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
    from engine.vision import label_issues  # deferred: off the CLI's start-up

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
    from engine.data import imagedata  # deferred: off the CLI's start-up

    summary = imagedata.import_path(args.path, args.name)
    emit(args, summary, imagedata.format_import(summary))
    return 0


def cmd_data_list(args) -> int:
    from engine.data import imagedata  # deferred: off the CLI's start-up

    rows = imagedata.list_datasets()
    emit(args, {"datasets": rows}, "\n".join(f"{r['name']}: {r['images']} images in {r['classes']} classes" for r in rows) or "no datasets")
    return 0


def cmd_data_sample(args) -> int:
    from engine.data import sample  # deferred: off the CLI's start-up

    summary = sample.load_sample(args.name)
    note = "already in the workspace" if summary["existed"] else "imported"
    emit(args, summary, f"{summary['dataset']!r} {note}: " + ", ".join(f"{c} {n}" for c, n in summary["classes"].items()))
    return 0


def cmd_data_make_sample(args) -> int:
    from engine.data import sample  # deferred: off the CLI's start-up

    sample.make_sample()
    print(f"wrote {sample.SAMPLE_DIR}")
    return 0


def add_commands(sub) -> None:
    data = sub.add_parser("data", help="check or import image datasets").add_subparsers(dest="data_command", required=True, parser_class=Parser)
    command(data, "check", cmd_data_check, "validate a folder of class subfolders or a .zip", "path")
    command(data, "import", cmd_data_import, "import a folder/zip into the workspace as a dataset", "path").add_argument("--name", required=True)
    for name, func, what in (("issues", cmd_data_issues, "images whose labels look wrong (cleanlab on out-of-fold predictions)"),
                             ("map", cmd_data_map, "a 2-D map of the images by pretrained and by random features")):
        s = command(data, name, func, what, ("name", "a workspace dataset or a folder of class folders"))
        s.add_argument("--model", default="resnet18")
        s.add_argument("--weights", default="auto")
    command(data, "list", cmd_data_list, "datasets in the workspace")
    s = command(data, "sample", cmd_data_sample, "import the bundled sample dataset into the workspace")
    s.add_argument("--name", default="Fruit (sample)")
    s = data.add_parser("make-sample", help="regenerate assets/sample (maintainers; needs fonts-noto-color-emoji)")
    s.set_defaults(func=cmd_data_make_sample)
