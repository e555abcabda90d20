"""The workspace: the one folder that holds everything a user makes.

    $TRANSFER_STUDIO_HOME (default ./workspace)
        studio.db        SQLite (WAL): datasets, classes, images, runs, generations
        images/ab/<sha256>.<ext>   content-addressed image files
        runs/<run_id>/   config, metrics, checkpoints, exports of one run
        cache/           feature caches (safe to delete)
        text/            uploaded text corpora
        studio.log       unexpected errors, with a reference id

Nothing is written outside it. Writes of files go through `atomic_write_*` (temp file in
the same folder + os.replace) so a crash never leaves half a file behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from engine.core.errors import UserError

log = logging.getLogger("engine")

PROJECT = Path(__file__).resolve().parents[2]  # the checkout: app.py, assets/, BENCHMARKS.md
ASSETS = PROJECT / "assets"                   # the bundled models, the sample dataset, the Lab's demo data

SCHEMA = """
CREATE TABLE IF NOT EXISTS datasets (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS classes (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    UNIQUE (dataset_id, name)
);
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    dataset_id INTEGER NOT NULL REFERENCES datasets(id) ON DELETE CASCADE,
    class_id INTEGER NOT NULL REFERENCES classes(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    ext TEXT NOT NULL,
    original_name TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    added REAL NOT NULL,
    UNIQUE (dataset_id, sha256)
);
CREATE INDEX IF NOT EXISTS images_by_class ON images (class_id, id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    title TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT NOT NULL,
    summary TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    device TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS generations (
    id INTEGER PRIMARY KEY,
    created REAL NOT NULL,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    settings TEXT NOT NULL,
    outputs TEXT NOT NULL,
    stats TEXT NOT NULL DEFAULT '{}'
);
"""

_local = threading.local()


def home() -> Path:
    """The workspace folder (created on first use)."""
    path = Path(os.environ.get("TRANSFER_STUDIO_HOME", "workspace")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def db() -> sqlite3.Connection:
    """A connection for this thread (sqlite3 connections must not cross threads).

    WAL lets the page read while a training worker writes; `with db():` is a transaction.
    The connection is re-opened when TRANSFER_STUDIO_HOME changes (tests use a tmp workspace).
    """
    path = home() / "studio.db"
    conn = getattr(_local, "conn", None)
    if conn is None or getattr(_local, "path", None) != path:
        conn = sqlite3.connect(path, timeout=30, isolation_level="DEFERRED")
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(SCHEMA)
        _local.conn, _local.path = conn, path
    return conn


_usage: dict = {}


def disk_usage(max_age: float = 30.0) -> int:
    """Bytes used by the workspace (walked at most every `max_age` seconds)."""

    root = home()
    cached = _usage.get(root)
    if cached and time.time() - cached[0] < max_age:
        return cached[1]
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())
    _usage[root] = (time.time(), total)
    return total


def ensure_space(extra_bytes: int = 0) -> None:
    """Refuse new data when the workspace would exceed TRANSFER_STUDIO_MAX_WORKSPACE_GB (default 20)."""
    limit_gb = float(os.environ.get("TRANSFER_STUDIO_MAX_WORKSPACE_GB", 20))
    used = disk_usage()
    if used + extra_bytes > limit_gb * 2**30:
        raise UserError(f"the workspace holds {used / 2**30:.1f} GB, over its {limit_gb:g} GB limit; delete runs or datasets "
                        "(or raise TRANSFER_STUDIO_MAX_WORKSPACE_GB)")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; workspace files are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise



def save_upload(data: bytes, folder: str, name: str = "", suffix: str = "") -> Path:
    """Keep uploaded bytes under their content hash: <folder>/<hash><suffix>, or with a name
    <folder>/<hash>/<name><suffix>, the name only a label (safe characters, never a path). The same
    bytes uploaded twice are stored once."""
    digest = hashlib.sha256(data).hexdigest()[:16]
    if name:
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(name).stem)[:60] or "upload"
        path = subdir(folder) / digest / f"{stem}{suffix}"
    else:
        path = subdir(folder) / f"{digest}{suffix}"
    if not path.exists():
        atomic_write_bytes(path, data)
    return path


def read_json(path: Path, default=None):
    """A JSON file written by atomic_write_json, or `default` when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=False).encode())


def atomic_path(path: Path) -> Path:
    """A temp path next to `path` for writers that need a filename (safetensors, onnx, zip).

    Write to it, then `os.replace(tmp, path)`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")


def log_unexpected(err: BaseException, context: str) -> str:
    """Log an unexpected error with context to studio.log; return a short reference id."""
    ref = uuid.uuid4().hex[:8]
    handler = logging.FileHandler(home() / "studio.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        log.error("ref=%s context=%s", ref, context, exc_info=err)
    finally:
        log.removeHandler(handler)
        handler.close()
    return ref


@contextmanager
def temporary_workspace():
    """A throw-away workspace for generated data, so benchmarks leave the user's workspace untouched.
    Yields the temp folder (the workspace is its `workspace/` subfolder)."""
    old_home = os.environ.get("TRANSFER_STUDIO_HOME")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["TRANSFER_STUDIO_HOME"] = str(Path(tmp) / "workspace")
        try:
            yield Path(tmp)
        finally:
            if old_home is None:
                os.environ.pop("TRANSFER_STUDIO_HOME", None)
            else:
                os.environ["TRANSFER_STUDIO_HOME"] = old_home
