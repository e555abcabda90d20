"""Run records: one row in SQLite per training run + a folder of files under runs/<id>/.

A run's folder holds whatever its runner writes (run.json, metrics.json, checkpoints,
exports). The row holds what lists and tables need: kind, title, status, config, summary.

Statuses: queued -> running -> done | failed | cancelled; a run that was queued or running
when the process died becomes `interrupted` (resumable) at the next start.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from engine.core import workspace
from engine.core.errors import UserError

ACTIVE = ("queued", "running")
RESUMABLE = ("interrupted", "failed", "cancelled")


def run_dir(run_id: str) -> Path:
    return workspace.subdir("runs") / run_id


def create(kind: str, title: str, config: dict) -> str:
    run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir(run_id).mkdir(parents=True, exist_ok=True)
    conn = workspace.db()
    with conn:
        conn.execute(
            "INSERT INTO runs (id, kind, title, status, config, created) VALUES (?, ?, ?, 'queued', ?, ?)",
            (run_id, kind, title, json.dumps(config), time.time()),
        )
    return run_id


def _row(r) -> dict:
    d = dict(r)
    d["config"] = json.loads(d["config"])
    d["summary"] = json.loads(d["summary"] or "{}")
    d["dir"] = str(run_dir(d["id"]))
    return d


def get(run_id: str) -> dict:
    r = workspace.db().execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    if r is None:
        raise UserError(f"no run {run_id!r} in this workspace")
    return _row(r)


def list_runs(kind: str | None = None) -> list[dict]:
    sql, params = "SELECT * FROM runs", ()
    if kind:
        sql, params = sql + " WHERE kind = ?", (kind,)
    return [_row(r) for r in workspace.db().execute(sql + " ORDER BY created DESC", params)]


def set_status(run_id: str, status: str, *, error: str | None = None, summary: dict | None = None, device: str | None = None) -> None:
    now = time.time()
    conn = workspace.db()
    with conn:
        conn.execute("UPDATE runs SET status = ?, error = ? WHERE id = ?", (status, error, run_id))
        if status == "running":
            conn.execute("UPDATE runs SET started = COALESCE(started, ?), finished = NULL WHERE id = ?", (now, run_id))
        if status in ("done", "failed", "cancelled"):
            conn.execute("UPDATE runs SET finished = ? WHERE id = ?", (now, run_id))
        if summary is not None:
            conn.execute("UPDATE runs SET summary = ? WHERE id = ?", (json.dumps(summary), run_id))
        if device is not None:
            conn.execute("UPDATE runs SET device = ? WHERE id = ?", (device, run_id))


def mark_interrupted() -> list[str]:
    """At process start: runs left queued/running by a dead process become `interrupted`."""
    conn = workspace.db()
    ids = [r["id"] for r in conn.execute("SELECT id FROM runs WHERE status IN ('queued', 'running')")]
    with conn:
        conn.executemany("UPDATE runs SET status = 'interrupted' WHERE id = ?", [(i,) for i in ids])
    return ids


def delete(run_id: str) -> None:
    run = get(run_id)
    if run["status"] in ACTIVE:
        raise UserError("this run is still queued or running; cancel it first")
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))
    shutil.rmtree(run_dir(run_id), ignore_errors=True)


def read(run: dict | str | Path, name: str, default=None):
    """One of a run's JSON files (run.json, metrics.json, eval.json, lab.json, checkpoint/checkpoint.json)
    from the run's row or its folder, or `default` when it is missing or half-written (a run still training)."""
    folder = Path(run["dir"] if isinstance(run, dict) else run)
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return default
