"""`engine report|demo`: a shareable report of a run, an instant demo workspace."""
from __future__ import annotations

import os

from engine.cli.common import emit


def cmd_report(args) -> int:
    from engine import report  # deferred: off the CLI's start-up
    from engine.vision.inference import resolve_run  # deferred: imports torch

    out = report.write_report(resolve_run(args.run), args.out)
    emit(args, {"report": str(out), "bytes": out.stat().st_size}, f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB, self-contained)")
    return 0


def cmd_demo(args) -> int:
    from engine import demo  # deferred: off the CLI's start-up

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


def add_commands(sub) -> None:
    """report, demo."""
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
