"""Command-line options made from a config dataclass: its fields are the one source of names,
defaults, choices and help text (so `--help` can never disagree with what a run does).

    add_options(parser, FinetuneConfig, ["data", "model", ...])   # --data, --model, ...
    cfg = FinetuneConfig(**values(args, FinetuneConfig, [...]))

A field `batch_size: int | None = None` becomes `--batch-size N` (None: "from the recipe" when the
field is one the recipe book fills); `bool` fields become `--x/--no-x`; `list[str]` fields a comma
list ("none" for the empty list). Choices and help come from the field's metadata.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing

from engine.train import recipes


def _kind(tp) -> tuple[type, bool]:
    """(base type, is a list) of an annotation such as `int | None` or `list[str] | None`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    base = args[0]
    if typing.get_origin(base) is list:
        return typing.get_args(base)[0], True
    return base, False


def csv(text: str) -> list[str]:
    """A comma list as typed on a command line ("" is the empty list)."""
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


def csv_or_none(text: str) -> list[str]:
    """A list field's value: a comma list, or "none" for the empty list (e.g. --augment none)."""
    return [t for t in csv(text) if t != "none"]


def add_options(parser: argparse.ArgumentParser, cls, names: list[str], choices: dict | None = None, **extra_help: str) -> None:
    """One option per field of `cls` named in `names`, in that order; `choices` narrows a field's."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        base, is_list = _kind(hints[name])
        meta = dict(f.metadata)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else f.default
        text = " ".join(t for t in (meta.get("help", ""), extra_help.get(name, "")) if t)
        if default is None and name in recipes.RECIPE_FIELDS:
            text = f"{text} (default: from the recipe)".strip()
        kw: dict = {"help": text or None, "dest": name}
        flag = "--" + name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, **kw)
            continue
        if name in (choices or {}) or "choices" in meta:
            kw["choices"] = list((choices or {}).get(name, meta.get("choices")))
        if "metavar" in meta:
            kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, type=csv_or_none if is_list else base, default=default, required=required, **kw)


def values(args: argparse.Namespace, names: list[str]) -> dict:
    """The parsed values of `names`, ready for the dataclass."""
    return {name: getattr(args, name) for name in names}
