"""Command line: `python -m engine <command> ...` does headlessly what the app does.

Contract: bad input prints one line `error: <what and how to fix>` to stderr and exits 2
(no traceback); `--json` prints one JSON object on stdout.
"""
from __future__ import annotations

import logging
import os
import sys

from engine.cli import bench, data, info, lab, models, showcase, text, vision
from engine.cli.common import Parser, ProgressLine, emit
from engine.core.errors import UserError
from engine.models import store


def cmd_info(args) -> int:
    data = info.collect()
    emit(args, data, info.format_text(data))
    return 0


def build_parser() -> Parser:
    p = Parser(prog="python -m engine", description="Transfer Studio engine")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    p.add_argument("--offline", action="store_true", help="never download weights, as TRANSFER_STUDIO_OFFLINE=1 (anywhere on the line)")
    s = sub.add_parser("info", help="versions, device, available weights, workspace")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    for group in (models, data, vision, bench, text, showcase, lab):  # engine/cli/<group>.py: its commands
        group.add_commands(sub)
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
