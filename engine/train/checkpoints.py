"""Training checkpoints: one format for every loop, safetensors + JSON, never pickle.

    <stem>.safetensors   model tensors ("model.<name>"), any extra tensors, optimizer tensors ("optim.<i>.<name>")
    <stem>.json          the caller's metadata, the optimizer's scalars and param groups, tied-tensor aliases

Both files are written atomically (temp file + rename). Tensors that share storage with another
(GPT-2's lm_head.weight is its token embedding) are stored once and recorded as an alias, so a
model whose head is *not* tied keeps its own head across a resume.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from engine.core import workspace
from engine.core.safetensors import check_safetensors_header


def model_tensors(model: torch.nn.Module, prefix: str = "model.") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, aliases): the state dict with every tensor that shares storage with an earlier one
    left out and recorded in aliases {left-out name: name it is the same tensor as}."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[prefix + name] = t.detach().cpu().contiguous()
    return tensors, aliases


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str],
                       prefix: str = "model.", strict: bool = True) -> None:
    """Load what model_tensors() saved; an alias takes the tensor it stood for."""
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for name, source in aliases.items():
        if source in state:
            state[name] = state[source]
    result = model.load_state_dict(state, strict=False)
    if strict and (result.missing_keys or result.unexpected_keys):
        raise ValueError(f"checkpoint does not fit the model: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Any torch optimizer's state as tensors ("optim.<param index>.<name>") and JSON (scalars, groups)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": [dict(g) for g in sd["param_groups"]], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    for idx, scalars in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(scalars)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save(stem: Path, model_part: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None, meta: dict,
         aliases: dict[str, str] | None = None) -> None:
    """Write <stem>.safetensors and <stem>.json atomically. `model_part`: tensors already named."""
    from safetensors.torch import save_file

    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tensors = dict(model_part)
    opt_meta = None
    if opt is not None:
        opt_tensors, opt_meta = optimizer_tensors(opt)
        tensors.update(opt_tensors)
    tmp = workspace.atomic_path(stem.with_suffix(".safetensors"))
    save_file(tensors, str(tmp))
    os.replace(tmp, stem.with_suffix(".safetensors"))
    workspace.atomic_write_json(stem.with_suffix(".json"), {**meta, "optimizer": opt_meta, "aliases": aliases or {}})


def load(stem: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a checkpoint written by save(); the header is checked before reading."""
    from safetensors.torch import load_file

    stem = Path(stem)
    check_safetensors_header(stem.with_suffix(".safetensors"))
    return load_file(str(stem.with_suffix(".safetensors"))), json.loads(stem.with_suffix(".json").read_text())


def save_training_state(stem: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict) -> None:
    """A whole model and its optimizer (the language-model loops)."""
    tensors, aliases = model_tensors(model)
    save(stem, tensors, opt, meta, aliases)


def load_training_state(stem: Path, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Restore what save_training_state() wrote into `model` and `opt`; returns the metadata."""
    tensors, meta = load(stem)
    load_model_tensors(model, tensors, meta.get("aliases", {}))
    if meta.get("optimizer"):
        load_optimizer(opt, tensors, meta["optimizer"])
    return meta
