"""Generation history in the workspace database (table `generations`): save, list, get, delete.

Each row keeps what is needed to re-run a generation exactly: the model spec the user chose
(auto, mini, a hub id or a folder), the prompt, and the settings including the seed.
"""
from __future__ import annotations

import json
import time

from engine.core import workspace
from engine.core.errors import UserError

MAX_ROWS = 500  # oldest rows beyond this are dropped


def save(model_spec: str, prompt: str, settings: dict, outputs: list[str], stats: dict) -> int:
    conn = workspace.db()
    with conn:
        cur = conn.execute(
            "INSERT INTO generations (created, model, prompt, settings, outputs, stats) VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), model_spec, prompt, json.dumps(settings), json.dumps(outputs), json.dumps(stats)),
        )
        conn.execute("DELETE FROM generations WHERE id <= (SELECT id FROM generations ORDER BY id DESC LIMIT 1 OFFSET ?)", (MAX_ROWS,))
    return int(cur.lastrowid)


def save_generation(model_spec: str, gen) -> int:
    """Save an engine.text.generation.Generation."""
    return save(model_spec, gen.prompt, gen.settings, [s.completion for s in gen.samples], gen.stats())


def _row(r) -> dict:
    d = dict(r)
    for key in ("settings", "outputs", "stats"):
        d[key] = json.loads(d[key] or "{}")
    return d


def recent(limit: int = 20) -> list[dict]:
    rows = workspace.db().execute("SELECT * FROM generations ORDER BY id DESC LIMIT ?", (limit,))
    return [_row(r) for r in rows]


def get(gen_id: int) -> dict:
    r = workspace.db().execute("SELECT * FROM generations WHERE id = ?", (gen_id,)).fetchone()
    if r is None:
        raise UserError(f"no generation {gen_id} in the history")
    return _row(r)


def delete(gen_id: int) -> None:
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM generations WHERE id = ?", (gen_id,))


def clear() -> None:
    conn = workspace.db()
    with conn:
        conn.execute("DELETE FROM generations")
