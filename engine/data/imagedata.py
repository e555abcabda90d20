"""Safe image ingestion and the dataset store.

Every image that enters the workspace goes through `decode_image`: format allow-list,
pixel-count guard (before decoding), full decode inside the try (Pillow is lazy), EXIF
orientation, conversion of every mode to RGB. Stored files are content-addressed
(sha256 of the normalised encoding), so the same image twice is stored once.

ZIPs are never extracted: members are read one by one with byte caps, names are checked
(absolute paths, `..`, drive letters -> the whole ZIP is refused), and the layout
`root/<class>/*` or `<class>/*` gives the class of each image.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import time
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from engine.core import workspace
from engine.core.errors import UserError

log = logging.getLogger(__name__)

ALLOWED_FORMATS = {"JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF"}
ARCHIVE_SUFFIXES = (".zip", ".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar")
MIN_IMAGES_PER_CLASS = 2


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass
class Limits:
    """Caps on what users can send. Each can be set with an environment variable."""

    max_pixels: int = field(default_factory=lambda: _env_int("TRANSFER_STUDIO_MAX_PIXELS", 40_000_000))
    min_side: int = 16
    max_file_bytes: int = field(default_factory=lambda: _env_int("TRANSFER_STUDIO_MAX_FILE_MB", 25) * 2**20)
    zip_max_members: int = field(default_factory=lambda: _env_int("TRANSFER_STUDIO_ZIP_MAX_MEMBERS", 10_000))
    zip_max_bytes: int = field(default_factory=lambda: _env_int("TRANSFER_STUDIO_ZIP_MAX_MB", 1024) * 2**20)
    zip_max_ratio: int = 100  # uncompressed / compressed, per member
    store_max_side: int = 1024  # stored images are downscaled to this (training uses <= 224 px)


# ----------------------------------------------------------------------------- one image
def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:512].lstrip()
    if head[:5] == b"%PDF-":
        return "PDF"
    if head[:4] == b"%!PS" or data[:4] == b"\xc5\xd0\xd3\xc6":
        return "EPS/PostScript"
    if head[:5] == b"<?xml" or head[:4].lower() == b"<svg" or b"<svg" in head.lower():
        return "SVG"
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"hevc", b"mif1", b"msf1", b"avif", b"heim", b"heis"):
        return "HEIC/AVIF"
    return None


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every Pillow mode to 8-bit RGB; transparency composited on white."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # high bit depth greyscale: stretch the actual range to 0..255
        import numpy as np

        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0
        im = Image.fromarray(a.round().astype("uint8"), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def decode_image(data: bytes, name: str = "", limits: Limits | None = None) -> Image.Image:
    """Decode untrusted bytes into a validated RGB image, or raise UserError(reason)."""
    limits = limits or Limits()
    if not data:
        raise UserError("empty file (0 bytes)")
    if len(data) > limits.max_file_bytes:
        raise UserError(f"file too large ({len(data) / 2**20:.1f} MB; limit {limits.max_file_bytes // 2**20} MB)")
    kind = _sniff_unsupported(data)
    if kind:
        raise UserError(f"{kind} is not supported; convert it to PNG or JPEG")
    Image.MAX_IMAGE_PIXELS = limits.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            if im.format not in ALLOWED_FORMATS:
                raise UserError(f"{im.format} images are not supported; use JPEG, PNG, GIF, BMP, WEBP or TIFF")
            w, h = im.size
            if w * h > limits.max_pixels:
                raise UserError(f"image too large: {w}x{h} pixels (limit {limits.max_pixels:,} pixels)")
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)  # animated GIF/WEBP: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
            im = _to_rgb(im)
    except UserError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise UserError(f"image too large (decompression bomb guard): {err}") from None
    except Image.UnidentifiedImageError:
        raise UserError("not an image (or an unsupported format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError, ZeroDivisionError, MemoryError) as err:
        raise UserError(f"corrupt or truncated image ({type(err).__name__}: {str(err)[:80]})") from None
    if min(im.size) < limits.min_side:
        raise UserError(f"image too small: {im.size[0]}x{im.size[1]} (each side must be at least {limits.min_side} px)")
    return im


def _encode_for_store(im: Image.Image, source_format: str | None, limits: Limits) -> tuple[bytes, str]:
    """Normalised bytes for the store: downscaled to store_max_side, JPEG for photos, PNG otherwise."""
    if max(im.size) > limits.store_max_side:
        im = im.copy()
        im.thumbnail((limits.store_max_side, limits.store_max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if source_format == "JPEG":
        im.save(buf, "JPEG", quality=95)
        return buf.getvalue(), "jpg"
    im.save(buf, "PNG", optimize=False)
    return buf.getvalue(), "png"


@dataclass
class StoredImage:
    sha256: str
    ext: str
    width: int
    height: int


def store_bytes(data: bytes, name: str = "", limits: Limits | None = None) -> StoredImage:
    """Validate, normalise and write an image into the content-addressed store (idempotent)."""
    limits = limits or Limits()
    im = decode_image(data, name, limits)
    try:
        source_format = Image.open(io.BytesIO(data)).format
    except Exception:  # noqa: BLE001 - decode_image already proved it opens
        source_format = None
    encoded, ext = _encode_for_store(im, source_format, limits)
    sha = hashlib.sha256(encoded).hexdigest()
    path = image_path(sha, ext)
    if not path.exists():
        workspace.ensure_space(len(encoded))
        workspace.atomic_write_bytes(path, encoded)
    w, h = Image.open(io.BytesIO(encoded)).size
    return StoredImage(sha, ext, w, h)


def image_path(sha: str, ext: str) -> Path:
    return workspace.home() / "images" / sha[:2] / f"{sha}.{ext}"


def thumbnail_path(sha: str, ext: str, size: int = 160) -> Path:
    """A small JPEG of a stored image for browsing (made on first use, safe to delete)."""
    path = workspace.home() / "cache" / "thumbs" / f"{sha}-{size}.jpg"
    if not path.exists():
        im = Image.open(image_path(sha, ext)).convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=85)
        workspace.atomic_write_bytes(path, buf.getvalue())
    return path


# ----------------------------------------------------------------------------- reading ZIPs and folders
@dataclass
class Member:
    cls: str
    name: str
    data: bytes


@dataclass
class Collected:
    members: list[Member] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)


_DRIVE = re.compile(r"^[A-Za-z]:")


def _ignored(parts: list[str]) -> bool:
    """macOS resource forks, dotfiles (.DS_Store, ._x) and top-level README/LICENSE files are skipped."""
    if len(parts) == 1 and parts[0].lower().startswith(("readme", "license", "licence")):
        return True
    return any(p == "__MACOSX" or p.startswith(".") for p in parts)


def _class_layout(paths: list[list[str]]) -> int:
    """How many leading folders to strip: 1 for `root/<class>/*`, 0 for `<class>/*`."""
    files = [p for p in paths if len(p) >= 2]
    if files and all(len(p) >= 3 for p in files) and len({p[0] for p in files}) == 1:
        return 1
    return 0


def _open_zip(data: bytes | Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BytesIO(data) if isinstance(data, bytes) else data)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, zlib.error) as err:
        raise UserError(f"not a valid ZIP file ({err})") from None


def _zip_entries(zf: zipfile.ZipFile, limits: Limits) -> list[tuple[zipfile.ZipInfo, list[str]]]:
    """The files of an untrusted ZIP worth reading, as (info, path parts). An unsafe ZIP raises UserError
    before anything is read: too many members, too big when expanded, absolute or '..' paths, a zip bomb."""
    infos = zf.infolist()
    if len(infos) > limits.zip_max_members:
        raise UserError(f"ZIP has {len(infos):,} entries; the limit is {limits.zip_max_members:,}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.zip_max_bytes:
        raise UserError(f"ZIP would expand to {declared / 2**20:.0f} MB; the limit is {limits.zip_max_bytes // 2**20} MB")
    entries = []
    for info in infos:
        raw = info.filename.replace("\\", "/")
        if raw.startswith("/") or _DRIVE.match(raw) or ".." in raw.split("/"):
            raise UserError(f"unsafe path in ZIP: {info.filename!r} (absolute or '..'); nothing was imported")
        if info.compress_size and info.file_size / info.compress_size > limits.zip_max_ratio and info.file_size > 2**20:
            raise UserError(f"ZIP member {info.filename!r} expands {info.file_size // info.compress_size}x (zip bomb guard); nothing was imported")
        parts = [p for p in raw.split("/") if p]
        if info.is_dir() or not parts or _ignored(parts):
            continue
        entries.append((info, parts))
    return entries


def _zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, display: str, limits: Limits) -> tuple[bytes | None, str]:
    """One member's bytes, or (None, why): links, nested archives, files over the limit, unreadable members."""
    if stat.S_ISLNK(info.external_attr >> 16):
        return None, "symbolic link ignored"
    if display.lower().endswith(ARCHIVE_SUFFIXES):
        return None, "nested archive not supported; unpack it first"
    if info.file_size > limits.max_file_bytes:
        return None, f"file too large ({info.file_size / 2**20:.1f} MB)"
    try:
        with zf.open(info) as f:
            blob = f.read(limits.max_file_bytes + 1)  # sizes in the directory can lie: cap the read
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, ValueError, zlib.error) as err:
        return None, f"unreadable ZIP member ({err})"
    if len(blob) > limits.max_file_bytes:
        return None, "file larger than its declared size or the limit"
    if blob[:4] == b"PK\x03\x04":
        return None, "nested archive not supported; unpack it first"
    return blob, ""


def _count_expanded(total: int, blob: bytes | None, limits: Limits) -> int:
    total += len(blob or b"")
    if total > limits.zip_max_bytes:
        raise UserError("ZIP expands beyond the size limit (sizes in the ZIP directory are wrong); nothing was imported")
    return total


def read_zip(data: bytes | Path, limits: Limits | None = None) -> Collected:
    """Read an untrusted ZIP of class folders without extracting it. Unsafe ZIPs raise UserError."""
    limits = limits or Limits()
    with _open_zip(data) as zf:
        entries = _zip_entries(zf, limits)
        strip = _class_layout([p for _, p in entries])
        out, total = Collected(), 0
        classes_seen: dict[str, int] = {}
        for info, parts in entries:
            parts = parts[strip:]
            display = "/".join(parts)
            if len(parts) < 2:
                out.rejected.append({"file": display, "reason": "not inside a class folder (use <class>/<image>)"})
                continue
            cls = parts[0]
            classes_seen.setdefault(cls, 0)
            blob, why = _zip_member(zf, info, display, limits)
            total = _count_expanded(total, blob, limits)
            if blob is None:
                out.rejected.append({"file": display, "reason": why})
                continue
            out.members.append(Member(cls, display, blob))
            classes_seen[cls] += 1
    out.empty_classes = [c for c, n in classes_seen.items() if n == 0]
    return out


def zip_files(data: bytes | Path, limits: Limits | None = None) -> Iterator[tuple[str, bytes | None, str]]:
    """(name, bytes, "") or (name, None, why) for every file of an untrusted ZIP in any layout (a batch to
    predict), in ZIP order, read in memory with read_zip's rules and never extracted."""
    limits = limits or Limits()
    with _open_zip(data) as zf:
        total = 0
        for info, parts in _zip_entries(zf, limits):
            display = "/".join(parts)
            blob, why = _zip_member(zf, info, display, limits)
            total = _count_expanded(total, blob, limits)
            yield display, blob, why


def read_folder(root: Path, limits: Limits | None = None) -> Collected:
    """Read a folder of class subfolders (`<class>/*`, or one wrapping `root/<class>/*`). Links are not followed."""
    limits = limits or Limits()
    root = Path(root)
    subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and not d.is_symlink()]
    files = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    if len(subdirs) == 1 and not files and any(d.is_dir() for d in subdirs[0].iterdir()):
        root = subdirs[0]
        subdirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and not d.is_symlink()]
        files = [f for f in root.iterdir() if f.is_file() and not f.name.startswith(".")]
    out = Collected()
    for f in files:
        if _ignored([f.name]):
            continue
        out.rejected.append({"file": f.name, "reason": "not inside a class folder (use <class>/<image>)"})
    for d in sorted(subdirs):
        n = 0
        for f in sorted(d.rglob("*")):
            rel = f.relative_to(root).as_posix()
            if _ignored(list(f.relative_to(root).parts)):
                continue
            if f.is_symlink():
                out.rejected.append({"file": rel, "reason": "symbolic link ignored"})
                continue
            if not f.is_file():
                continue
            if f.name.lower().endswith(ARCHIVE_SUFFIXES):
                out.rejected.append({"file": rel, "reason": "nested archive not supported; unpack it first"})
                continue
            if f.stat().st_size > limits.max_file_bytes:
                out.rejected.append({"file": rel, "reason": f"file too large ({f.stat().st_size / 2**20:.1f} MB)"})
                continue
            out.members.append(Member(d.name, rel, f.read_bytes()))
            n += 1
        if n == 0:
            out.empty_classes.append(d.name)
    return out


def read_path(path: str | Path, limits: Limits | None = None) -> Collected:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a folder of class subfolders or a .zip")
    if path.is_dir():
        return read_folder(path, limits)
    if zipfile.is_zipfile(path):
        return read_zip(path, limits)
    raise UserError(f"{path} is neither a folder nor a ZIP file")


# ----------------------------------------------------------------------------- check (CLI `data check`)
@dataclass
class CheckReport:
    classes: dict[str, int]
    rejected: list[dict]
    usable: bool
    why_unusable: str = ""


def usability(counts: dict[str, int]) -> str:
    """Empty string when the class counts can train a classifier, else why not."""
    good = [c for c, n in counts.items() if n >= MIN_IMAGES_PER_CLASS]
    if len(counts) == 0:
        return "no images found; expected class folders with images (<class>/<image>)"
    thin = [c for c, n in counts.items() if n < MIN_IMAGES_PER_CLASS]
    if len(counts) == 1:
        return f"only one class ({next(iter(counts))!r}); a classifier needs at least 2 classes"
    if thin:
        return f"class(es) {', '.join(repr(c) for c in thin)} have fewer than {MIN_IMAGES_PER_CLASS} valid images; add images or remove the class"
    if len(good) < 2:
        return "need at least 2 classes with 2 valid images each"
    return ""


def validate_collected(col: Collected, limits: Limits | None = None) -> tuple[dict[str, list[tuple[Member, Image.Image]]], list[dict]]:
    limits = limits or Limits()
    valid: dict[str, list] = {c: [] for c in col.empty_classes}
    rejected = list(col.rejected)
    for m in col.members:
        valid.setdefault(m.cls, [])
        try:
            valid[m.cls].append((m, decode_image(m.data, m.name, limits)))
        except UserError as err:
            rejected.append({"file": m.name, "reason": str(err)})
    return valid, rejected


def check_path(path: str | Path, limits: Limits | None = None) -> CheckReport:
    """Validate a folder/ZIP without writing anything (CLI `data check`)."""
    col = read_path(path, limits)
    valid, rejected = validate_collected(col, limits)
    counts = {c: len(v) for c, v in sorted(valid.items())}
    why = usability(counts)
    return CheckReport(counts, rejected, usable=not why, why_unusable=why)


# ----------------------------------------------------------------------------- the dataset store
def _clean_name(name: str, what: str) -> str:
    name = (name or "").encode("utf-8", "replace").decode("utf-8").strip()
    if not name:
        raise UserError(f"{what} name is empty")
    if len(name) > 80:
        raise UserError(f"{what} name is longer than 80 characters")
    if any(ord(ch) < 32 for ch in name):
        raise UserError(f"{what} name contains control characters")
    return name


def _dataset_id(name: str) -> int:
    row = workspace.db().execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise UserError(f"no dataset named {name!r}")
    return row["id"]


def _class_id(dataset_id: int, name: str, create: bool = False) -> int:
    conn = workspace.db()
    row = conn.execute("SELECT id FROM classes WHERE dataset_id = ? AND name = ?", (dataset_id, name)).fetchone()
    if row:
        return row["id"]
    if not create:
        raise UserError(f"no class named {name!r}")
    return conn.execute("INSERT INTO classes (dataset_id, name) VALUES (?, ?)", (dataset_id, name)).lastrowid


def create_dataset(name: str) -> str:
    name = _clean_name(name, "dataset")
    conn = workspace.db()
    if conn.execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
        raise UserError(f"a dataset named {name!r} already exists")
    with conn:
        conn.execute("INSERT INTO datasets (name, created) VALUES (?, ?)", (name, time.time()))
    return name


def rename_dataset(old: str, new: str) -> str:
    new = _clean_name(new, "dataset")
    ds = _dataset_id(old)
    conn = workspace.db()
    if new != old and conn.execute("SELECT 1 FROM datasets WHERE name = ?", (new,)).fetchone():
        raise UserError(f"a dataset named {new!r} already exists")
    with conn:
        conn.execute("UPDATE datasets SET name = ? WHERE id = ?", (new, ds))
    return new


def delete_dataset(name: str) -> None:
    ds = _dataset_id(name)
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM images WHERE dataset_id = ?", (ds,))
        conn.execute("DELETE FROM classes WHERE dataset_id = ?", (ds,))
        conn.execute("DELETE FROM datasets WHERE id = ?", (ds,))
    _collect_garbage()


def add_class(dataset: str, name: str) -> str:
    name = _clean_name(name, "class")
    ds = _dataset_id(dataset)
    conn = workspace.db()
    if conn.execute("SELECT 1 FROM classes WHERE dataset_id = ? AND name = ?", (ds, name)).fetchone():
        raise UserError(f"class {name!r} already exists in {dataset!r}")
    with conn:
        _class_id(ds, name, create=True)
    return name


def rename_class(dataset: str, old: str, new: str) -> str:
    new = _clean_name(new, "class")
    ds = _dataset_id(dataset)
    cid = _class_id(ds, old)
    conn = workspace.db()
    if new != old and conn.execute("SELECT 1 FROM classes WHERE dataset_id = ? AND name = ?", (ds, new)).fetchone():
        raise UserError(f"class {new!r} already exists in {dataset!r}")
    with conn:
        conn.execute("UPDATE classes SET name = ? WHERE id = ?", (new, cid))
    return new


def delete_class(dataset: str, name: str) -> None:
    ds = _dataset_id(dataset)
    cid = _class_id(ds, name)
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM images WHERE class_id = ?", (cid,))
        conn.execute("DELETE FROM classes WHERE id = ?", (cid,))
    _collect_garbage()


def delete_image(image_id: int) -> None:
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM images WHERE id = ?", (image_id,))
    _collect_garbage()


def move_image(image_id: int, cls: str) -> str:
    """Give an image another class of its own dataset (a relabel, undone by moving it back).
    Returns the class it had."""
    conn = workspace.db()
    row = conn.execute("SELECT i.dataset_id, c.name FROM images i JOIN classes c ON c.id = i.class_id WHERE i.id = ?",
                       (image_id,)).fetchone()
    if row is None:
        raise UserError(f"no image {image_id} in this workspace")
    target = conn.execute("SELECT id FROM classes WHERE dataset_id = ? AND name = ?", (row["dataset_id"], cls)).fetchone()
    if target is None:
        raise UserError(f"the dataset has no class {cls!r}")
    with conn:
        conn.execute("UPDATE images SET class_id = ? WHERE id = ?", (target["id"], image_id))
    return row["name"]


def image_ids(dataset: str) -> dict[str, dict]:
    """sha256 -> {"id", "class", "name"} for every image of a dataset."""
    rows = workspace.db().execute(
        "SELECT i.id, i.sha256, i.original_name, c.name AS cls FROM images i JOIN classes c ON c.id = i.class_id "
        "WHERE i.dataset_id = ?", (_dataset_id(dataset),))
    return {r["sha256"]: {"id": r["id"], "class": r["cls"], "name": r["original_name"]} for r in rows}


def _collect_garbage() -> None:
    """Remove stored files no dataset refers to any more."""
    used = {r[0] for r in workspace.db().execute("SELECT DISTINCT sha256 FROM images")}
    for f in (workspace.home() / "images").glob("*/*"):
        if f.stem not in used:
            f.unlink(missing_ok=True)


def display_name(name: str) -> str:
    """A user-supplied file name made safe to show and store: last path part only, valid
    UTF-8 (undecodable bytes replaced), no control characters, at most 120 characters.
    It is never used as a path: stored files are named by their content hash."""
    name = name.encode("utf-8", "replace").decode("utf-8")
    name = "".join(ch for ch in name if ord(ch) >= 32).replace("\\", "/").rsplit("/", 1)[-1]
    return name[:120] or "image"


def _insert(ds: int, cls: str, m_name: str, data: bytes, seen: set, limits: Limits) -> dict:
    """Store one image into class `cls` of dataset `ds`; the caller holds the transaction."""
    name = display_name(m_name)
    try:
        st = store_bytes(data, name, limits)
    except UserError as err:
        return {"file": name, "class": cls, "status": "rejected", "reason": str(err)}
    conn = workspace.db()
    dup = conn.execute("SELECT c.name FROM images i JOIN classes c ON c.id = i.class_id WHERE i.dataset_id = ? AND i.sha256 = ?", (ds, st.sha256)).fetchone()
    if dup or st.sha256 in seen:
        where = dup["name"] if dup else cls
        return {"file": name, "class": cls, "status": "duplicate", "reason": f"same image already in class {where!r}; stored once"}
    seen.add(st.sha256)
    cid = _class_id(ds, cls, create=True)
    conn.execute(
        "INSERT INTO images (dataset_id, class_id, sha256, ext, original_name, width, height, added) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (ds, cid, st.sha256, st.ext, name, st.width, st.height, time.time()),
    )
    return {"file": name, "class": cls, "status": "accepted", "reason": ""}


def add_images(dataset: str, cls: str, files: list[tuple[str, bytes]], limits: Limits | None = None) -> list[dict]:
    """Add uploaded files to a class. Returns one row per file: file, class, status, reason."""
    limits = limits or Limits()
    ds = _dataset_id(dataset)
    cls = _clean_name(cls, "class")
    conn, seen = workspace.db(), set()
    with conn:
        return [_insert(ds, cls, name, data, seen, limits) for name, data in files]


def import_collected(dataset: str, col: Collected, limits: Limits | None = None) -> list[dict]:
    limits = limits or Limits()
    ds = _dataset_id(dataset)
    results = [{"file": r["file"], "class": "", "status": "rejected", "reason": r["reason"]} for r in col.rejected]
    conn, seen = workspace.db(), set()
    with conn:
        for cls in col.empty_classes:
            _class_id(ds, _clean_name(cls, "class"), create=True)
        for m in col.members:
            results.append(_insert(ds, _clean_name(m.cls, "class"), m.name, m.data, seen, limits))
    return results


def import_zip(dataset: str, data: bytes, limits: Limits | None = None) -> list[dict]:
    """Import a ZIP of class folders into an existing dataset (unsafe ZIPs change nothing)."""
    return import_collected(dataset, read_zip(data, limits), limits)


def import_path(path: str | Path, name: str, limits: Limits | None = None) -> dict:
    """CLI `data import`: a folder/ZIP -> a new dataset. Nothing is created if the data is unusable."""
    col = read_path(path, limits)
    name = _clean_name(name, "dataset")
    if workspace.db().execute("SELECT 1 FROM datasets WHERE name = ?", (name,)).fetchone():
        raise UserError(f"a dataset named {name!r} already exists; choose another --name")
    create_dataset(name)
    try:
        results = import_collected(name, col, limits)
        counts = dataset_counts(name)
        why = usability(counts)
        if why:
            raise UserError(why)
    except BaseException:
        delete_dataset(name)
        raise
    return {"dataset": name, "classes": counts, "results": results}


def format_import(summary: dict) -> str:
    lines = [f"imported dataset {summary['dataset']!r}:"]
    lines += [f"  {c}: {n} images" for c, n in summary["classes"].items()]
    lines += [f"  {r['status']} {r['file']}: {r['reason']}" for r in summary["results"] if r["status"] != "accepted"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- browsing
def list_datasets() -> list[dict]:
    rows = workspace.db().execute(
        """SELECT d.name, d.created,
                  (SELECT COUNT(*) FROM classes c WHERE c.dataset_id = d.id) AS classes,
                  (SELECT COUNT(*) FROM images i WHERE i.dataset_id = d.id) AS images
           FROM datasets d ORDER BY d.created"""
    )
    return [dict(r) for r in rows]


def dataset_counts(dataset: str) -> dict[str, int]:
    ds = _dataset_id(dataset)
    rows = workspace.db().execute(
        "SELECT c.name, COUNT(i.id) AS n FROM classes c LEFT JOIN images i ON i.class_id = c.id WHERE c.dataset_id = ? GROUP BY c.id ORDER BY c.name",
        (ds,),
    )
    return {r["name"]: r["n"] for r in rows}


def list_images(dataset: str, cls: str, offset: int = 0, limit: int = 24) -> list[dict]:
    ds = _dataset_id(dataset)
    cid = _class_id(ds, cls)
    rows = workspace.db().execute(
        "SELECT id, sha256, ext, original_name, width, height FROM images WHERE class_id = ? ORDER BY id LIMIT ? OFFSET ?",
        (cid, limit, offset),
    )
    return [dict(r) | {"path": str(image_path(r["sha256"], r["ext"]))} for r in rows]


# ----------------------------------------------------------------------------- split and training data
def _rank(seed: int, sha: str) -> str:
    return hashlib.sha256(f"{seed}:{sha}".encode()).hexdigest()


def split(items: dict[str, list[str]], val_fraction: float = 0.2, seed: int = 0) -> dict[str, set[str]]:
    """Stratified, seeded, stable split: per class, order images by a hash of (seed, sha) and
    put the first round(n * val_fraction) in validation (at least one when the class has 2+).
    Depends only on content, so it is the same after a restart. Returns class -> val shas."""
    out = {}
    for cls, shas in items.items():
        ordered = sorted(shas, key=lambda s: _rank(seed, s))
        n_val = round(len(ordered) * val_fraction)
        if len(ordered) >= 2:
            n_val = min(max(n_val, 1), len(ordered) - 1)
        else:
            n_val = 0
        out[cls] = set(ordered[:n_val])
    return out


@dataclass
class TrainingData:
    classes: list[str]
    train: list[tuple[Path, int]]
    val: list[tuple[Path, int]]
    version: str


def _training_items(data: str, limits: Limits) -> dict[str, list[tuple[str, str]]]:
    """class -> [(sha, ext)] from a workspace dataset name, or a folder/ZIP path (stored, not registered)."""
    exists = workspace.db().execute("SELECT id FROM datasets WHERE name = ?", (data,)).fetchone()
    if exists:
        rows = workspace.db().execute(
            "SELECT c.name AS cls, i.sha256, i.ext FROM classes c LEFT JOIN images i ON i.class_id = c.id WHERE c.dataset_id = ?",
            (exists["id"],),
        )
        items: dict[str, list] = {}
        for r in rows:
            items.setdefault(r["cls"], [])
            if r["sha256"]:
                items[r["cls"]].append((r["sha256"], r["ext"]))
        return items
    if not Path(data).exists():
        raise UserError(f"{data!r} is neither a dataset in the workspace nor a folder/ZIP path")
    col = read_path(data, limits)
    items = {c: [] for c in col.empty_classes}

    def store(m):
        try:
            return store_bytes(m.data, m.name, limits)
        except UserError as err:
            log.warning("skipping %s: %s", m.name, err)
            return None

    # decoding and re-encoding run in C with the GIL released: one thread per core (measured 1.7x on 2 cores)
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        for m, st in zip(col.members, pool.map(store, col.members)):
            items.setdefault(m.cls, [])
            if st is not None:
                items[m.cls].append((st.sha256, st.ext))
    return {c: sorted(set(v)) for c, v in items.items()}


def training_data(data: str, val_fraction: float = 0.2, seed: int = 0, limits: Limits | None = None) -> TrainingData:
    """Train/val lists of stored image paths for a dataset name or a folder/ZIP path."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError("validation fraction must be between 0 and 1")
    items = _training_items(data, limits or Limits())
    why = usability({c: len(v) for c, v in items.items()})
    if why:
        raise UserError(why)
    classes = sorted(items)
    val_sets = split({c: [s for s, _ in items[c]] for c in classes}, val_fraction, seed)
    train, val, lines = [], [], []
    for label, cls in enumerate(classes):
        for sha, ext in sorted(items[cls]):
            in_val = sha in val_sets[cls]
            (val if in_val else train).append((image_path(sha, ext), label))
            lines.append(f"{cls}\t{sha}\t{int(in_val)}")
    version = hashlib.sha256("\n".join(sorted(lines)).encode()).hexdigest()[:16]
    return TrainingData(classes, train, val, version)


GREY_SAMPLE = 32      # images looked at to tell a grey dataset from a colour one
GREY_LEVELS = 3.0     # mean |R-G| + |G-B| below this (of 255) counts as grey (JPEG noise stays below 1)


def looks_grey(paths: list[Path], n: int = GREY_SAMPLE) -> bool:
    """Whether a dataset's images carry no colour (scans, X-rays, sketches, digits), from up to `n`
    evenly spaced images decoded at thumbnail size. Stored images are all RGB, so the channels
    are compared rather than the file's mode. The recipe book gives grey data a longer budget."""
    import numpy as np

    if not paths:
        return False
    step = max(1, len(paths) // n)
    spreads = []
    for p in list(paths)[::step][:n]:
        with Image.open(p) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced size
            a = np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)
        spreads.append(np.abs(a[..., 0] - a[..., 1]).mean() + np.abs(a[..., 1] - a[..., 2]).mean())
    return float(np.median(spreads)) < GREY_LEVELS


def split_counts(dataset: str, val_fraction: float = 0.2, seed: int = 0) -> dict[str, dict[str, int]]:
    """class -> {"train": n, "val": n} for the Images page."""
    ds = _dataset_id(dataset)
    rows = workspace.db().execute(
        "SELECT c.name AS cls, i.sha256 FROM classes c LEFT JOIN images i ON i.class_id = c.id WHERE c.dataset_id = ?", (ds,)
    )
    items: dict[str, list[str]] = {}
    for r in rows:
        items.setdefault(r["cls"], [])
        if r["sha256"]:
            items[r["cls"]].append(r["sha256"])
    val = split(items, val_fraction, seed)
    return {c: {"train": len(v) - len(val[c]), "val": len(val[c])} for c, v in sorted(items.items())}
