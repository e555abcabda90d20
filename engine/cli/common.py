"""What every command shares: the parser that says `error: …` and exits 2, --json output, the subcommand shape."""
from __future__ import annotations

import argparse
import json
import sys

from engine.core.errors import UserError
from engine.models import store


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
