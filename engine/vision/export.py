"""Export a run as a ZIP that works elsewhere, import one back, and check untrusted safetensors.

    model.zip
        model.safetensors    state dict of the whole network, fp32 or fp16 (labels etc. also in its metadata)
        labels.json          ["class0", "class1", ...] (index = output)
        preprocessing.json   {"arch", "image_size", "resize", "mean", "std", "interpolation", "steps"}
        model_card.md        data, strategy, weights, metrics, a 10-line onnxruntime example
        model.onnx           input `image`: uint8 RGB (N, S, S, 3) as the crop comes; the scaling to
                             [0, 1] and the normalisation are inside the graph; outputs `logits` and
                             `probabilities` (softmax). With fp16, weights are stored in half precision
                             and cast back to fp32 at load: half the size, fp32 arithmetic.

A parity check (parity()) runs validation images through the app and through onnxruntime on the
exported file after every export; the page and the CLI show its largest probability difference.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from pathlib import Path

from engine.core import runs, workspace
from engine.core.errors import UserError
from engine.core.safetensors import MAX_JSON_BYTES, MAX_MODEL_BYTES, check_safetensors_header, safetensors_metadata
from engine.models import backbones

log = logging.getLogger(__name__)

# ============================================================================= export
def _model_card(info: dict, metrics: list[dict], ev: dict | None, onnx_diff: float | None, half: bool = False) -> str:
    s = info.get("summary", {})
    cfg = info.get("config", {})
    w = info.get("weights", {})
    pp = info["preprocessing"]
    lines = [
        f"# {info.get('arch', 'resnet')} fine-tuned with Transfer Studio",
        "",
        f"- Classes ({len(info['classes'])}): {', '.join(info['classes'])}",
        f"- Data: {cfg.get('data', '?')} ({info.get('data', {}).get('train_images', '?')} train / {info.get('data', {}).get('val_images', '?')} validation images)",
        f"- Backbone: torchvision {info.get('arch')}; starting weights: {w.get('name', '?')} ({w.get('reason', '')})",
        f"- Strategy: {cfg.get('strategy', info.get('kind'))} — {info.get('strategy', {}).get('description', '')}",
        f"- Training: {s.get('epochs_done', '?')} epochs, batch {cfg.get('batch_size')}, lr {cfg.get('lr')}, "
        f"{cfg.get('optimizer')} / {cfg.get('schedule')}, augmentation {', '.join(cfg.get('augment') or []) or 'none'}, seed {cfg.get('seed')}",
        f"- Best validation accuracy: {s.get('best_val_acc', '?')} (epoch {s.get('best_epoch', '?')})",
        "",
        "## Preprocessing",
        f"Resize the shorter side to {pp['resize']} px ({pp.get('interpolation', 'bilinear')}), centre-crop "
        f"{pp['image_size']}x{pp['image_size']}, RGB scaled to [0, 1], normalised with mean {pp['mean']} and std {pp['std']}.",
        "",
        "## Files",
        "- `model.safetensors`: PyTorch state dict for `torchvision.models." + str(info.get("arch")) + "` with `" + backbones.get(info["arch"]).head + "` replaced by "
        f"`Linear(in_features, {len(info['classes'])})`" + (", weights stored in fp16 (load them into an fp32 model as usual)." if half else "."),
        "- `labels.json`: class names in output order; `preprocessing.json`: the preprocessing above.",
    ]
    if onnx_diff is not None:
        lines.append(f"- `model.onnx`: input `image`, uint8 RGB (N, {pp['image_size']}, {pp['image_size']}, 3) — the crop as it comes, "
                     f"the scaling and normalisation are inside the model; outputs `logits` and `probabilities`; "
                     f"max |ONNX - PyTorch| probability on a test batch: {onnx_diff:.2e}.")
        lines += ["", "## Use it with onnxruntime", "", "Needs `pip install onnxruntime pillow numpy` and nothing else:", "",
                  "```python", *ONNX_EXAMPLE.strip().splitlines(), "```"]
    if metrics:
        lines += ["", "## Per-epoch metrics", "", "| epoch | train loss | val loss | val acc |", "|---|---|---|---|"]
        lines += [f"| {m['epoch']} | {m['train_loss']} | {m['val_loss']} | {m['val_acc']} |" for m in metrics]
    if ev:
        lines += ["", "## Validation per class", "", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
        lines += [f"| {c['class']} | {c['precision']} | {c['recall']} | {c['f1']} | {c['support']} |" for c in ev.get("per_class", [])]
    return "\n".join(lines) + "\n"


# The model card's example, run as written by tests/test_export.py: it must predict what the app predicts.
ONNX_EXAMPLE = """
import json, numpy as np, onnxruntime as ort
from PIL import Image
pp, labels = json.load(open("preprocessing.json")), json.load(open("labels.json"))
img, r, s = Image.open("photo.jpg").convert("RGB"), pp["resize"], pp["image_size"]
scale = r / min(img.size)  # shorter side to r, then the centre s x s crop
img = img.resize((max(r, round(img.width * scale)), max(r, round(img.height * scale))), Image.BILINEAR)
left, top = (img.width - r) // 2 + (r - s) // 2, (img.height - r) // 2 + (r - s) // 2
x = np.asarray(img.crop((left, top, left + s, top + s)))[None]  # uint8 (1, s, s, 3): no scaling needed
logits, probs = ort.InferenceSession("model.onnx").run(None, {"image": x})
print(labels[int(probs[0].argmax())], float(probs[0].max()))
"""


def image_model(model, pp):
    """`model` behind its own preprocessing: uint8 NHWC crops in, (logits, probabilities) out."""
    import torch  # deferred: this module is read without torch (header checks)

    class ImageModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model
            self.register_buffer("mean", torch.tensor(pp.mean).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(pp.std).view(1, 3, 1, 1))

        def forward(self, image):
            x = image.permute(0, 3, 1, 2).float() / 255.0  # as vision.normalize: (x/255 - mean) / std
            logits = self.net((x - self.mean) / self.std)
            return logits, logits.softmax(1)

    return ImageModel().eval()


def _fp16_storage(path: Path) -> None:
    """Store every fp32 weight of an ONNX file as fp16, cast back to fp32 by a Cast node (folded by
    onnxruntime at load): half the file, the arithmetic unchanged."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    m = onnx.load(str(path))
    g = m.graph
    casts = []
    for init in list(g.initializer):
        if init.data_type != TensorProto.FLOAT or np.prod(init.dims) < 16:  # scalars and tiny vectors stay fp32
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name + "_fp16")
        g.initializer.remove(init)
        g.initializer.append(half)
        casts.append(helper.make_node("Cast", [half.name], [init.name], to=TensorProto.FLOAT))
    for node in reversed(casts):
        g.node.insert(0, node)
    onnx.save(m, str(path))


def to_onnx(module, example, out, input_names: list[str], output_names: list[str]) -> None:
    """`module` as ONNX (opset 17, the batch dimension dynamic) into a path or a file object."""

    import torch  # deferred: this module is read without torch (header checks)

    # TorchScript-based exporter: the dynamo exporter needs onnxscript, which is not a dependency
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), out, input_names=input_names, output_names=output_names,
                          dynamic_axes={name: {0: "batch"} for name in input_names + output_names}, opset_version=17, dynamo=False)


def export_onnx(loaded, path: Path, half: bool = False, batch: int = 4) -> float:
    """Write model.onnx (uint8 images in) and return max |onnxruntime - PyTorch| probability on a test batch."""

    import numpy as np
    import torch

    net = copy.deepcopy(loaded.model).to("cpu").float().eval()  # the loaded model may be shared (app cache)
    wrapped = image_model(net, loaded.preprocessing)
    S = loaded.preprocessing.image_size
    x = torch.randint(0, 256, (batch, S, S, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    tmp = workspace.atomic_path(path)
    to_onnx(wrapped, x, str(tmp), ["image"], ["logits", "probabilities"])
    if half:
        _fp16_storage(tmp)
    os.replace(tmp, path)
    try:
        import onnxruntime as ort
    except ImportError:
        return float("nan")
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probabilities"], {"image": x.numpy()})[0]
    with torch.inference_mode():
        want = wrapped(x)[1].numpy()
    return float(np.abs(got - want).max())


def parity(run_dir: str | Path, zip_path: Path, n: int = 20) -> dict:
    """Up to n validation images of the run through the app (PyTorch, the run's own weights) and
    through onnxruntime on the exported ZIP's model.onnx: the largest probability difference and
    whether the top-1 class agrees on every image."""
    import numpy as np
    import onnxruntime as ort
    from PIL import Image

    from engine.vision import inference, preprocess  # deferred: imports torch

    run_dir = inference.resolve_run(run_dir)
    loaded = inference.load_model(run_dir)
    files = [f for f in loaded.info.get("data", {}).get("parity_files", []) if Path(f).is_file()][:n]
    if files:
        images = [Image.open(f).convert("RGB") for f in files]
        what = f"{len(images)} validation images"
    else:  # a run from before the list was kept, or imported: generated images
        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]
        what = f"{n} generated images (the run keeps no validation list)"
    app = inference.probabilities(loaded, images).numpy()
    with zipfile.ZipFile(zip_path) as z:
        if "model.onnx" not in z.namelist():
            raise UserError(f"{Path(zip_path).name} has no model.onnx to check")
        sess = ort.InferenceSession(z.read("model.onnx"), providers=["CPUExecutionProvider"])
    x = preprocess.crops(images, loaded.preprocessing).permute(0, 2, 3, 1).numpy()  # NHWC uint8, as the card's example makes
    onnx_probs = sess.run(["probabilities"], {"image": x})[0]
    return {"images": len(images), "what": what, "max_prob_diff": float(np.abs(onnx_probs - app).max()),
            "top1_agree": int((onnx_probs.argmax(1) == app.argmax(1)).sum())}


def export_run(run_dir: str | Path, out_zip: Path, onnx: bool = True, half: bool = False) -> Path:
    """Write the export ZIP for a run (folder or id); returns its path."""

    from engine.vision import inference, network  # deferred: imports torch

    run_dir = inference.resolve_run(run_dir)
    loaded = inference.load_model(run_dir)
    info = loaded.info
    metrics, ev = runs.read(run_dir, "metrics.json", []), runs.read(run_dir, "eval.json")
    pp = loaded.preprocessing.to_dict() | {
        "arch": loaded.arch,
        "steps": ["resize shorter side to `resize` (bilinear)", "centre-crop `image_size`", "RGB to [0,1]", "(x - mean) / std"],
    }
    out_zip = Path(out_zip)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        network.save_weights(tmp / "model.safetensors", loaded.model,
                            {"classes": loaded.classes, "arch": loaded.arch, "preprocessing": loaded.preprocessing.to_dict()},
                            dtype="float16" if half else None)
        onnx_diff = None
        if onnx:
            onnx_diff = export_onnx(loaded, tmp / "model.onnx", half=half)
            if not onnx_diff < (1e-2 if half else 1e-4):
                log.warning("ONNX output differs from PyTorch by %.2e", onnx_diff)
        files = {
            "model.safetensors": (tmp / "model.safetensors").read_bytes(),
            "labels.json": json.dumps(loaded.classes, indent=2).encode(),
            "preprocessing.json": json.dumps(pp, indent=2).encode(),
            "model_card.md": _model_card(info, metrics, ev, onnx_diff, half).encode(),
        }
        if onnx:
            files["model.onnx"] = (tmp / "model.onnx").read_bytes()
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            for name, data in files.items():
                # float weights barely compress: store them (fast); deflate the text files
                z.writestr(name, data, compress_type=zipfile.ZIP_STORED if name.startswith("model.") and name != "model_card.md" else zipfile.ZIP_DEFLATED)
        workspace.atomic_write_bytes(out_zip, buf.getvalue())
    return out_zip


# ============================================================================= import
def _read_member(z: zipfile.ZipFile, name: str, cap: int) -> bytes | None:
    """One member by exact name, reading at most cap bytes (sizes in the directory can lie)."""
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    with z.open(info) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"{name} in the ZIP is larger than {cap // 2**20} MB")
    return data


def _infer_arch(shapes: dict, name: str) -> str:
    """The registry family whose tensor names a state dict has (its metadata did not say)."""

    arch = backbones.infer(set(shapes))
    if arch is None:
        raise UserError(f"{name}: the tensors fit none of the known models ({', '.join(backbones.NAMES)})")
    return arch


def import_model(file: str | Path, labels: list[str] | None = None, title: str | None = None) -> str:
    """An exported ZIP, or a bare .safetensors (labels from its metadata or `labels`) -> a new run id.

    The run (kind "imported") has run.json + model.safetensors, so load_model/predict/export work on it.
    Long because every check of an untrusted file is here, in order, before anything is written.
    """
    from engine.vision import inference, preprocess  # deferred: imports torch

    file = Path(file)
    if not file.is_file():
        raise UserError(f"file not found: {file}")
    suffix = file.suffix.lower()
    pp_dict = None
    if suffix == ".zip":
        try:
            with zipfile.ZipFile(file) as z:
                weights = _read_member(z, "model.safetensors", MAX_MODEL_BYTES)
                lab = _read_member(z, "labels.json", MAX_JSON_BYTES)
                ppb = _read_member(z, "preprocessing.json", MAX_JSON_BYTES)
        except zipfile.BadZipFile:
            raise UserError(f"{file.name} is not a valid ZIP") from None
        if weights is None:
            raise UserError(f"{file.name} has no model.safetensors; export a run from Transfer Studio to get one")
        try:
            labels = labels or (json.loads(lab) if lab else None)
            pp_dict = json.loads(ppb) if ppb else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{file.name}: labels.json or preprocessing.json is not valid JSON") from None
    elif suffix == ".safetensors":
        if file.stat().st_size > MAX_MODEL_BYTES:
            raise UserError(f"{file.name} is larger than {MAX_MODEL_BYTES // 2**20} MB")
        weights = file.read_bytes()
    else:
        raise UserError(f"{file.name}: upload an exported .zip or a .safetensors file (pickle checkpoints such as .pt/.pth are refused)")

    shapes = {k: s for k, (_, s) in check_safetensors_header(weights).items()}
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "model.safetensors"
        wpath.write_bytes(weights)
        meta = safetensors_metadata(wpath)
        try:
            labels = labels or (json.loads(meta["classes"]) if "classes" in meta else None)
            pp_dict = pp_dict or (json.loads(meta["preprocessing"]) if "preprocessing" in meta else None)
            arch = json.loads(meta["arch"]) if "arch" in meta else _infer_arch(shapes, file.name)
        except (json.JSONDecodeError, TypeError):
            raise UserError(f"{file.name}: unreadable metadata in the safetensors header") from None
        if arch not in backbones.NAMES:
            raise UserError(f"{file.name}: unsupported architecture {arch!r}")
        head = backbones.get(arch).head + ".weight"
        if head not in shapes or len(shapes[head]) != 2:
            raise UserError(f"{file.name}: no classifier layer ({head}) found; is this a torchvision {arch} state dict?")
        n_classes = shapes[head][0]
        if labels is None:
            labels = [f"class_{i}" for i in range(n_classes)]
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != n_classes:
            raise UserError(f"{file.name}: {len(labels) if isinstance(labels, list) else '?'} labels for a model with {n_classes} outputs")
        if pp_dict is None:
            pp = preprocess.Preprocessing(224, 256, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
        else:
            try:
                pp = preprocess.Preprocessing(int(pp_dict["image_size"]), int(pp_dict["resize"]), [float(v) for v in pp_dict["mean"]],
                                          [float(v) for v in pp_dict["std"]], str(pp_dict.get("interpolation", "bilinear")))
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{file.name}: preprocessing.json is incomplete (image_size, resize, mean, std)") from None
            if not (16 <= pp.image_size <= 1024 and pp.image_size <= pp.resize <= 2048 and len(pp.mean) == 3 and len(pp.std) == 3 and min(pp.std) > 0):
                raise UserError(f"{file.name}: preprocessing.json has impossible values")
        info = {
            "kind": "imported",
            "arch": arch,
            "classes": labels,
            "preprocessing": pp.to_dict(),
            "weights": {"kind": "file", "name": file.name, "reason": "Imported model."},
            "config": {"data": f"imported from {file.name}", "model": arch, "strategy": "imported"},
        }
        run_id = runs.create("imported", f"imported {file.name}", info["config"])
        run_dir = runs.run_dir(run_id)
        try:
            workspace.atomic_write_bytes(run_dir / "model.safetensors", weights)
            workspace.atomic_write_json(run_dir / "run.json", info)
            inference.load_model(run_dir)  # the shapes must fit the architecture: fail now, not at predict time
        except UserError as err:
            runs.set_status(run_id, "failed", error=str(err))
            runs.delete(run_id)
            raise
    runs.set_status(run_id, "done", summary={"imported_from": file.name, "classes": labels, "arch": arch})
    return run_id
