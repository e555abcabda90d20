"""The model manager: every model the app knows, where it lives, and bringing real weights in.

The catalog holds each vision backbone's ImageNet weights (torchvision's checkpoint files, kept
where torchvision looks: torch.hub.get_dir()/checkpoints), the GPT-2 family (Hugging Face hub ids,
kept in the hub cache) and the bundled mini models. Each has a status:

    bundled       shipped in assets/, always there
    cached        on this machine (downloaded earlier, or imported)
    downloadable  not here, and the network answers
    unavailable   not here, and no network (import a file instead)

Downloads use the libraries' own downloaders -- torch.hub.download_url_to_file, which checks the
sha256 prefix in torchvision's file names and writes to a temporary file that is removed on any
failure, and huggingface_hub.hf_hub_download, which checks sizes and resumes an interrupted file --
with a progress class that reports bytes to a job and stops the download when the job is cancelled.

TRANSFER_STUDIO_MODELS_URL points both at another host (a mirror, or the tests' local server):
torchvision files at {url}/torchvision/{file}, hub files at {url}/{repo}/resolve/main/{file}.

Offline, `import_file` brings weights in from a file: a torchvision ImageNet `.pth` (read only with
weights_only=True and checked against the architecture) or a zipped Hugging Face model folder
(config, safetensors weights, tokenizer; no pickle weights, no custom code), stored where the
libraries look, so `auto` finds them next time.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import re
import shutil
import threading
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

from engine.core import workspace
from engine.core.errors import Cancelled, UserError
from engine.models import backbones, sources

# what a hub download fetches: the model's config, its safetensors weights and its tokenizer
HUB_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt")
HUB_REQUIRED = ("config.json", "model.safetensors")
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# download sizes of the hub models (their safetensors weights and tokenizer), for the catalog
HUB_INFO = {
    "gpt2": (548, "GPT-2 small (124M parameters): the standard model for the Generate and Fine-tune text pages."),
    "distilgpt2": (353, "DistilGPT-2 (82M): a distilled GPT-2, about twice as fast on a CPU."),
    "gpt2-medium": (1520, "GPT-2 medium (355M): better text, about 3x slower; wants a GPU or patience."),
}
FREE_MARGIN = 200 * 2**20  # a download leaves at least this much of the disk free
REFUSED_IN_ZIP = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".py", ".so", ".h5", ".msgpack")


@dataclass
class Model:
    name: str           # what the CLI and the page call it: "resnet18", "gpt2", "mini-resnet18", ...
    kind: str           # "vision" | "text"
    source: str         # "imagenet" | "hub" | "bundled"
    status: str         # "bundled" | "cached" | "downloadable" | "unavailable"
    size_mb: float      # on disk when here, else to download
    path: str | None    # where it lives (or will)
    good_for: str

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- where things live
def vision_url(arch: str) -> str:
    """torchvision's URL for `arch`'s ImageNet weights (or the same file under TRANSFER_STUDIO_MODELS_URL)."""
    from torchvision.models import get_model_weights

    base = sources.models_url()  # the file keeps torchvision's name (its sha256 prefix is the check)
    return f"{base}/torchvision/{sources.imagenet_file(arch).name}" if base else get_model_weights(arch).DEFAULT.url


def hub_endpoint() -> str | None:
    """The hub's address for huggingface_hub (None: the library's own, or HF_ENDPOINT)."""
    return sources.models_url()


# where the hub library keeps models (engine/models/sources.py owns the layout)
hub_cache, hub_folder, hub_snapshot = sources.hf_cache, sources.hf_folder, sources.hf_snapshot
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?")


def _size_mb(path: Path) -> float:
    if path.is_file():
        return round(path.stat().st_size / 2**20, 1)
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 1) if path.is_dir() else 0.0


def imported_hub_ids() -> list[str]:
    """Hub ids in the cache beyond the GPT-2 family (imported ZIPs, or downloaded elsewhere)."""
    root = hub_cache()
    if not root.is_dir():
        return []
    ids = [d.name[len("models--"):].replace("--", "/") for d in sorted(root.glob("models--*"))]
    return [i for i in ids if i not in HUB_INFO and hub_snapshot(i)]


# ----------------------------------------------------------------------------- the catalog
def catalog() -> list[Model]:
    """Every model the app knows, with its status now."""
    from torchvision.models import get_model_weights

    net = sources.online()
    out = []
    for arch in backbones.NAMES:
        path = sources.imagenet_file(arch)
        here = path.is_file()
        size = _size_mb(path) if here else round(get_model_weights(arch).DEFAULT.meta.get("_file_size", 0), 1)
        status = "cached" if here else ("downloadable" if net else "unavailable")
        out.append(Model(arch, "vision", "imagenet", status, size, str(path), f"ImageNet weights · {backbones.get(arch).good_for}"))
    out.append(Model("mini-resnet18", "vision", "bundled", "bundled" if sources.mini_vision_available() else "unavailable",
                     _size_mb(sources.MINI_VISION), str(sources.MINI_VISION),
                     "The bundled resnet18, pretrained here on generated images: works with no network."))
    for model_id, (mb, good) in HUB_INFO.items():
        snap = hub_snapshot(model_id)
        status = "cached" if snap else ("downloadable" if net else "unavailable")
        out.append(Model(model_id, "text", "hub", status, _size_mb(snap) if snap else mb, str(snap or hub_folder(model_id)), good))
    for model_id in imported_hub_ids():
        snap = hub_snapshot(model_id)
        out.append(Model(model_id, "text", "hub", "cached", _size_mb(snap), str(snap), "Imported language model."))
    out.append(Model("mini-gpt2", "text", "bundled", "bundled" if sources.mini_text_available() else "unavailable",
                     _size_mb(sources.MINI_TEXT), str(sources.MINI_TEXT), "The bundled mini GPT-2: works with no network."))
    return out


def get(name: str) -> Model:
    """The catalog's entry for `name`; another hub id ("org/model") is a text model to download."""
    models = catalog()
    for m in models:
        if m.name == name:
            return m
    if isinstance(name, str) and "/" in name and HUB_ID.fullmatch(name):
        status = "downloadable" if sources.online() else "unavailable"
        return Model(name, "text", "hub", status, 0.0, str(hub_folder(name)), "A Hugging Face model.")
    raise UserError(f"unknown model {name!r}; known: {', '.join(m.name for m in models)} (or a hub id such as org/model)")


# ----------------------------------------------------------------------------- progress
_here = threading.local()  # the running download's report/cancel callbacks (one download per thread)


def _progress_class():
    """A tqdm stand-in the libraries' downloaders draw their bar with: it counts bytes, reports
    them (with speed and ETA) at most 5 times a second, and raises Cancelled when asked to stop."""
    from tqdm.std import tqdm

    class Bar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # nothing on the console: the numbers go to the job instead
            self.done = kwargs.get("initial", 0) or 0
            self.size = kwargs.get("total")
            self.t0, self.shown = time.time(), 0.0
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            self.done += n or 0
            now = time.time()
            if now - self.shown > 0.2 or (self.size and self.done >= self.size):
                self.shown = now
                speed = self.done / max(now - self.t0, 1e-6)
                eta = (self.size - self.done) / speed if self.size and speed > 0 else None
                report = getattr(_here, "report", None)
                if report:
                    report(bytes=self.done, total=self.size, speed=round(speed), eta_s=None if eta is None else round(eta, 1),
                           progress=min(1.0, self.done / self.size) if self.size else None)
            cancelled = getattr(_here, "cancelled", None)
            if cancelled and cancelled():
                raise Cancelled()

        def __exit__(self, *exc):
            super().__exit__(*exc)
            if exc[0] is None and self.size and self.done < self.size:  # the server stopped mid-file
                raise UserError(f"the download stopped at {self.done / 2**20:.1f} of {self.size / 2**20:.1f} MB "
                                "(the network dropped?); nothing was kept, try again")
            return False

    return Bar


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _torch_hub_bar():
    """torch.hub draws its download bar with its module-level `tqdm`: lend it ours for one download."""
    import torch.hub

    with _patch_lock:
        previous = torch.hub.tqdm
        torch.hub.tqdm = _progress_class()
        try:
            yield
        finally:
            torch.hub.tqdm = previous


def _free_bytes(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    return shutil.disk_usage(folder).free


def _check_space(folder: Path, size_mb: float) -> None:
    need = int(size_mb * 2**20) + FREE_MARGIN
    free = _free_bytes(folder)
    if free < need:
        raise UserError(f"not enough disk space for {size_mb:.0f} MB in {folder} ({free / 2**20:.0f} MB free, "
                        f"{need / 2**20:.0f} MB needed); free some space and try again")


# ----------------------------------------------------------------------------- downloads
default_report = None  # the CLI sets a progress line here for downloads that name no report of their own


def download(name: str, report=None, cancelled=lambda: False) -> Path:
    """Bring `name` onto this machine; returns where it now lives. Already here: returns at once."""
    report = report or default_report or (lambda **_: None)
    model = get(name)
    if model.status in ("bundled", "cached"):
        return Path(model.path)
    if model.status == "unavailable":
        raise UserError(f"{name} cannot be downloaded: no network (TRANSFER_STUDIO_OFFLINE=1, or no answer from the "
                        "weight hosts); bring it in with `python -m engine models import FILE`")
    _here.report = lambda **f: report(phase="downloading", model=name, message=f"{name}: {progress_line(f)}", **f)
    _here.cancelled = cancelled
    try:
        return _download_vision(name, model) if model.kind == "vision" else _download_hub(name, model, report)
    finally:
        _here.report = _here.cancelled = None


def _download_vision(arch: str, model: Model) -> Path:
    import torch.hub

    dst = Path(model.path)
    _check_space(dst.parent, model.size_mb)
    for stale in dst.parent.glob(dst.name + ".*.partial"):  # left by a process that was killed mid-file
        stale.unlink(missing_ok=True)
    prefix = torch.hub.HASH_REGEX.search(dst.name)
    try:
        with _torch_hub_bar():
            torch.hub.download_url_to_file(vision_url(arch), str(dst), hash_prefix=prefix.group(1) if prefix else None,
                                           progress=True)
    except (Cancelled, UserError):
        raise
    except RuntimeError as err:
        if "invalid hash" in str(err):
            raise UserError(f"the {arch} weights that arrived do not match their checksum (a damaged or wrong file); "
                            "nothing was kept, try again") from None
        raise
    except (OSError, http.client.HTTPException) as err:  # no route, refused, 404, a connection cut mid-file
        raise UserError(f"could not download {arch} weights ({type(err).__name__}: {str(err)[:160]}); nothing was kept, "
                        "try again") from None
    try:
        check_vision_state(arch, _read_checkpoint(dst))
    except UserError:
        dst.unlink(missing_ok=True)
        raise
    return dst


def _download_hub(model_id: str, model: Model, report) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    _check_space(hub_cache(), model.size_mb)
    got = []
    for i, filename in enumerate(HUB_FILES):
        report(phase="downloading", model=model_id, message=f"{filename} ({i + 1}/{len(HUB_FILES)})", file=filename)
        try:
            hf_hub_download(model_id, filename, cache_dir=hub_cache(), endpoint=hub_endpoint(), tqdm_class=_progress_class())
            got.append(filename)
        except (EntryNotFoundError, RemoteEntryNotFoundError):
            continue  # an optional file this model does not have
        except (Cancelled, UserError):
            raise
        except LocalEntryNotFoundError:
            raise UserError(f"could not reach the hub to download {model_id}; check the network") from None
        except Exception as err:  # noqa: BLE001 - the hub library's HTTP and repository errors
            raise UserError(f"could not download {model_id} ({type(err).__name__}: {str(err)[:160]}); what arrived is kept "
                            "and the next try resumes") from None
    missing = [f for f in HUB_REQUIRED if f not in got]
    if missing or not any(all(f in got for f in s) for s in TOKENIZER_SETS):
        raise UserError(f"{model_id} on the hub lacks {', '.join(missing) or 'a tokenizer'}: only models with safetensors "
                        "weights and a tokenizer can be used")
    return hub_snapshot(model_id)


def run_job(ctx) -> dict:
    """The `download` job runner (engine.jobs.RUNNERS): ctx.config = {"name": ...}."""
    name = ctx.config.get("name")
    path = download(name, report=ctx.report, cancelled=ctx.cancelled)
    return {"model": name, "path": str(path), "size_mb": _size_mb(path)}


def ensure_vision(arch: str, report=None, cancelled=lambda: False) -> Path:
    """The ImageNet weights of `arch` on this machine, downloaded first if need be (with progress)."""
    path = sources.imagenet_file(arch)
    return path if path.is_file() else download(arch, report, cancelled)


# ----------------------------------------------------------------------------- delete
def delete(name: str) -> Model:
    model = get(name)
    if model.status == "bundled":
        raise UserError(f"{name} is bundled with the app and cannot be deleted")
    if model.status != "cached":
        raise UserError(f"{name} is not on this machine")
    if model.kind == "vision":
        Path(model.path).unlink(missing_ok=True)
    else:
        shutil.rmtree(hub_folder(name), ignore_errors=True)
    return get(name)


# ----------------------------------------------------------------------------- offline import
def _read_checkpoint(data) -> dict:
    """A torchvision checkpoint (a path or bytes) read with weights_only=True: tensors only, never code."""
    import torch

    try:
        source = io.BytesIO(data) if isinstance(data, bytes) else data
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a hostile or damaged file makes torch.load raise
        raise UserError(f"not a readable weights-only PyTorch checkpoint ({type(err).__name__}: {str(err)[:120]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise UserError("the checkpoint holds no state dict of tensors")
    return state


def check_vision_state(arch: str, state: dict) -> None:
    """`state` must be a full `arch` ImageNet model: the same tensor names and shapes, 1000 classes."""
    import torch

    want = backbones.empty(arch).state_dict()
    mismatched = [k for k, v in want.items() if k not in state or not isinstance(state[k], torch.Tensor)
                  or tuple(state[k].shape) != tuple(v.shape)]
    if mismatched:
        raise UserError(f"not {arch} ImageNet weights: {len(mismatched)} of {len(want)} tensors missing or of another shape "
                        f"(e.g. {mismatched[0]})")


def import_file(path: str | Path, data: bytes | None = None, name: str | None = None) -> Model:
    """Bring in a torchvision `.pth` or a zipped Hugging Face folder (`data`: its bytes, from an upload)."""
    path = Path(path)
    if data is None:
        if not path.is_file():
            raise UserError(f"file not found: {path}")
        data = path.read_bytes()
    if path.suffix.lower() in (".pth", ".pt"):
        return _import_vision(data, name)
    if path.suffix.lower() == ".zip":
        return _import_hub(data, name or path.stem)
    raise UserError(f"{path.name}: import a torchvision ImageNet checkpoint (.pth) or a zipped Hugging Face model folder (.zip)")


def _import_vision(data: bytes, arch: str | None) -> Model:
    state = _read_checkpoint(data)
    archs = [arch] if arch else list(backbones.NAMES)
    for a in archs:
        try:
            check_vision_state(a, state)
        except UserError as err:
            if arch:
                raise
            last = err
            continue
        dst = sources.imagenet_file(a)
        _check_space(dst.parent, len(data) / 2**20)

        workspace.atomic_write_bytes(dst, data)  # the earlier file stays whole until the new one is complete
        return get(a)
    raise UserError(f"the checkpoint fits none of {', '.join(archs)} ({last})")


def _zip_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """{file name: member} of a model folder's ZIP: files at the root or under one top folder."""
    files = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/")]
    for i in files:
        parts = i.filename.replace("\\", "/").split("/")
        if i.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", i.filename):
            raise UserError(f"the ZIP holds an unsafe path ({i.filename}); nothing was imported")
    tops = {i.filename.split("/")[0] for i in files if "/" in i.filename}
    strip = tops.pop() + "/" if len(tops) == 1 and all("/" in i.filename for i in files) else ""
    out = {}
    for i in files:
        rel = i.filename[len(strip):]
        if "/" in rel:
            continue  # nested folders: not part of a model folder
        out[rel] = i
    return out


def _import_hub(data: bytes, name: str) -> Model:
    if not HUB_ID.fullmatch(name or ""):
        raise UserError(f"model name {name!r}: use letters, digits, '.', '_', '-' (and one '/')")
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise UserError("not a readable ZIP file") from None
    members = _zip_members(zf)
    refused = sorted(f for f in members if f.lower().endswith(REFUSED_IN_ZIP))
    if refused:
        raise UserError(f"the ZIP holds {', '.join(refused[:3])}: pickle weights and code are refused; "
                        "save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    if "config.json" not in members:
        raise UserError("the ZIP has no config.json: zip the folder that save_pretrained wrote")
    if not any(f.endswith(".safetensors") for f in members):
        raise UserError("the ZIP has no .safetensors weights")
    if not any(all(f in members for f in s) for s in TOKENIZER_SETS):
        raise UserError("the ZIP has no tokenizer (tokenizer.json, or vocab.json and merges.txt): "
                        "save the tokenizer into the same folder")
    try:
        config = json.loads(zf.read(members["config.json"]))
    except ValueError:
        raise UserError("config.json is not valid JSON") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError("config.json names no model_type: not a Hugging Face model folder")
    if "auto_map" in config:
        raise UserError("the model needs its own code (auto_map in config.json); custom code is never run here")
    size = sum(i.file_size for i in members.values())
    _check_space(hub_cache(), size / 2**20)
    # the hub cache's layout: snapshots/<revision>/<files>, refs/main naming the revision
    revision = hashlib.sha1(data).hexdigest()
    folder = hub_folder(name)
    tmp = folder / "snapshots" / f".{revision}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for fname, info in members.items():
            with zf.open(info) as src, open(tmp / fname, "wb") as dst:
                shutil.copyfileobj(src, dst)
        _check_safetensors(tmp)
    except (zipfile.BadZipFile, zlib.error, OSError) as err:  # a damaged member (CRC), a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not unpack the ZIP ({type(err).__name__}: {str(err)[:120]}); nothing was imported") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        final = folder / "snapshots" / revision
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    ref = folder / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(revision)  # only now does the cache point at the new files
    return get(name)


def _check_safetensors(folder: Path) -> None:
    from safetensors import safe_open

    for f in folder.glob("*.safetensors"):
        try:
            with safe_open(str(f), framework="pt") as st:
                list(st.keys())
        except Exception as err:  # noqa: BLE001 - a damaged file's error, whatever the library calls it
            raise UserError(f"{f.name} is not a valid safetensors file ({str(err)[:100]})") from None


def job_line(job: dict) -> str:
    """A download job's one line: the model and its bytes, or what it is doing before the first byte."""
    what = progress_line(job) if job.get("bytes") is not None else job.get("message") or job.get("phase", "queued")
    return f"{job.get('model') or job.get('run_id', '')}: {what}"


def _amount(n: float) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def progress_line(p: dict) -> str:
    """'12.0 MB of 44.7 MB · 3.1 MB/s · 10 s left' from a download's progress fields."""
    done, total = p.get("bytes") or 0, p.get("total")
    parts = [f"{_amount(done)} of {_amount(total)}" if total else _amount(done)]
    if p.get("speed"):
        parts.append(f"{_amount(p['speed'])}/s")
    if p.get("eta_s") is not None:
        parts.append(f"{p['eta_s']:.0f} s left")
    return " · ".join(parts)


def format_table(models: list[Model]) -> str:
    rows = [f"{'name':20} {'kind':7} {'status':13} {'size':>9}  good for"]
    rows += [f"{m.name:20} {m.kind:7} {m.status:13} {m.size_mb:>6.0f} MB  {m.good_for[:70]}" for m in models]
    return "\n".join(rows)
