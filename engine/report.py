"""A shareable report of one fine-tuning run: one self-contained HTML file.

Plotly's JavaScript is embedded once and every image is inlined as a data URI, so the file
opens anywhere, offline, without the app. All user-supplied text (dataset and class names,
prompts, generated text) is HTML-escaped.
"""
from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import plotly.graph_objects as go
from PIL import Image

from engine.core import runs, workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.text import history

MAX_MISTAKES = 24
THUMBS_PER_CLASS = 6


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return default


def _thumb_uri(path: str | Path, size: int = 112) -> str | None:
    """A small JPEG of an image file as a data URI (None when the file is gone)."""
    try:
        im = Image.open(path).convert("RGB")
    except (OSError, ValueError):
        return None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fig_html(fig: go.Figure) -> str:
    fig.update_layout(template="plotly_white", margin=dict(l=50, r=20, t=50, b=40), height=360)
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def curves_figure(metrics: list[dict]) -> go.Figure:
    epochs = [m["epoch"] for m in metrics]
    fig = go.Figure()
    fig.add_scatter(x=epochs, y=[m["train_loss"] for m in metrics], name="train loss", mode="lines+markers")
    fig.add_scatter(x=epochs, y=[m["val_loss"] for m in metrics], name="validation loss", mode="lines+markers")
    fig.add_scatter(x=epochs, y=[m["val_acc"] for m in metrics], name="validation accuracy", mode="lines+markers", yaxis="y2")
    fig.update_layout(title="Learning curves", xaxis_title="epoch", yaxis_title="loss",
                      yaxis2=dict(title="accuracy", overlaying="y", side="right", range=[0, 1.02], tickformat=".0%",
                                  dtick=0.2, showgrid=False), xaxis_dtick=1)
    return fig


def confusion_figure(ev: dict) -> go.Figure:
    classes = ev["classes"]
    fig = go.Figure(go.Heatmap(z=ev["confusion"], x=classes, y=classes, colorscale="Blues", text=ev["confusion"],
                               texttemplate="%{text}", hovertemplate="true %{y}, predicted %{x}: %{z}<extra></extra>"))
    fig.update_layout(title="Confusion matrix (validation)", xaxis_title="predicted", yaxis_title="true", yaxis_autorange="reversed")
    return fig


def comparison_figure(curves: dict[str, dict], title: str) -> go.Figure:
    """The Lab's mean curves ({name: {"epoch": [...], "mean": [...]}}, as engine.lab.experiments.mean_curve gives
    them), on the Lab's own epoch axis: epoch 0 is the untrained network."""
    fig = go.Figure()
    for label, curve in curves.items():
        fig.add_scatter(x=curve["epoch"], y=curve["mean"], name=label, mode="lines+markers")
    fig.update_layout(title=title, xaxis_title="epoch", yaxis_title="validation accuracy", yaxis_range=[0, 1.02])
    return fig


def _table(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return str(v)


def _dataset_thumbs(run: dict) -> str:
    """A few images per class from the run's dataset, when it is a workspace dataset still there."""

    name = run.get("config", {}).get("data", "")
    try:
        counts = imagedata.dataset_counts(name)
    except UserError:
        return f"<p class='muted'>Dataset {html.escape(str(name))!s} is not in this workspace; no thumbnails.</p>"
    out = []
    for cls, n in counts.items():
        imgs = "".join(f"<img src='{uri}' alt=''>" for r in imagedata.list_images(name, cls, 0, THUMBS_PER_CLASS)
                       if (uri := _thumb_uri(r["path"], 80)))
        out.append(f"<div class='cls'><b>{html.escape(cls)}</b> <span class='muted'>{n} images</span><div class='strip'>{imgs}</div></div>")
    return "".join(out)


def _png_uri(array) -> str:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _mistake_heats(run_dir: Path | None, mistakes: list[dict]) -> list:
    """Where the model looked for the class it wrongly predicted, per mistake (Nones when the run has no model)."""
    from engine.vision import heatmaps, inference  # deferred: imports torch

    try:
        loaded = inference.load_model(run_dir)
    except (UserError, OSError, TypeError):
        return [None] * len(mistakes)
    return heatmaps.explain_files(loaded, [m["file"] for m in mistakes], [m["pred"] for m in mistakes])


def _mistakes(ev: dict, run_dir: Path | None = None) -> str:
    cards = []
    shown = ev.get("mistakes", [])[:MAX_MISTAKES]
    for m, heat in zip(shown, _mistake_heats(run_dir, shown) if run_dir else [None] * len(shown)):
        uri = _thumb_uri(m["file"])
        if uri:
            looked = f"<img src='{_png_uri(heat.overlay)}' alt='' title='where it looked for {html.escape(m['pred'])}'>" if heat else ""
            cards.append(f"<figure><img src='{uri}' alt=''>{looked}<figcaption>true <b>{html.escape(m['true'])}</b><br>"
                         f"predicted <b>{html.escape(m['pred'])}</b> ({m['conf']:.0%})"
                         + ("<br><span class='muted'>right: where it looked for that class</span>" if heat else "")
                         + "</figcaption></figure>")
    if not cards:
        return "<p>No misclassified validation images.</p>"
    return f"<div class='gallery'>{''.join(cards)}</div>"


def _comparisons(run: dict) -> str:
    """Pretrained-vs-scratch results from the Transfer Lab for the same dataset, if any."""
    from engine.lab import experiments  # deferred: imports torch

    data = run.get("config", {}).get("data")
    parts = []
    for r in runs.list_runs("lab"):
        state = experiments.read_result(r["dir"]) or {}
        res = state.get("result") or {}
        if r["status"] != "done" or state.get("experiment") != "compare" or r["config"].get("data") != data or not res.get("curves"):
            continue
        parts.append(_fig_html(comparison_figure(res["curves"], html.escape(r["title"]))))
        if isinstance(res.get("benefits"), dict):
            parts.append(_benefits_table(res["benefits"]))
    return "".join(parts)


def _benefits_table(b: dict) -> str:
    """Start, early slope and best accuracy: pretrained vs scratch (mean ± spread over seeds), and what it means."""
    groups, diff, readings = b.get("groups", {}), b.get("difference", {}), b.get("readings", {})

    def cell(group: str, key: str, scale: float, unit: str) -> str:
        m = groups.get(group, {}).get(key, {})
        if m.get("mean") is None:
            return "–"
        return f"{m['mean'] * scale:.0f}{unit}" + (f" ± {m['std'] * scale:.0f}" if m.get("n", 0) > 1 else "")

    rows = []
    for key, label, scale, unit in (("start", "accuracy after one epoch", 100, "%"),
                                    ("slope", f"points gained per epoch (first {b.get('early_epochs', '?')} epochs)", 100, ""),
                                    ("asymptote", "best accuracy", 100, "%")):
        d = diff.get(key)
        rows.append({"measure": label, "pretrained": cell("pretrained", key, scale, unit), "from scratch": cell("scratch", key, scale, unit),
                     "difference": f"{d * scale:+.0f}{' points' if unit == '%' else ''}" if d is not None else "–",
                     "reading": readings.get(key, "")})
    return _table(rows)


def _text_samples(limit: int = 5) -> str:
    rows = history.recent(limit)
    out = []
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["settings"].items() if v not in (None, [], ""))
        texts = "".join(f"<pre>{html.escape(o)}</pre>" for o in r["outputs"])
        out.append(f"<div class='gen'><p><b>Prompt:</b> {html.escape(r['prompt'])}<br><span class='muted'>model {html.escape(r['model'])}; "
                   f"{html.escape(settings)}</span></p>{texts}</div>")
    return "".join(out)


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#1f2937}
h1{margin-bottom:.2em} h2{margin-top:2em;border-bottom:1px solid #e5e7eb;padding-bottom:.3em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #e5e7eb;padding:4px 10px;text-align:left;font-size:14px}
th{background:#f3f4f6} .muted{color:#6b7280} .kpi{display:flex;gap:1em;flex-wrap:wrap}
.kpi div{background:#eff6ff;border-radius:8px;padding:.6em 1em} .kpi b{display:block;font-size:1.5em}
.gallery{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;min-width:120px;font-size:12px} figure img{width:112px;border-radius:6px;margin-right:4px}
.strip img{margin:2px;border-radius:4px} .cls{margin:.4em 0} pre{white-space:pre-wrap;background:#f9fafb;padding:.6em;border-radius:6px}
"""


def build_report(run_dir: str | Path) -> str:
    """The HTML text of the report for a finished (or cancelled) run folder."""
    import plotly.offline

    run_dir = Path(run_dir)
    run = _read_json(run_dir / "run.json")
    metrics = _read_json(run_dir / "metrics.json", [])
    if not run or not metrics:
        raise UserError(f"{run_dir} has no finished training run (run.json and metrics.json are needed)")
    ev = _read_json(run_dir / "eval.json", {}) or {}
    s = run.get("summary", {})
    cfg = run.get("config", {})
    strategy = run.get("strategy", {})
    title = f"{cfg.get('model', run.get('arch', ''))} on {Path(str(cfg.get('data', ''))).name}"
    kpis = [("best validation accuracy", f"{s.get('best_val_acc', 0):.1%}"), ("epochs", s.get("epochs_done", len(metrics))),
            ("training time", f"{s.get('seconds', 0):.0f} s"), ("images/s", s.get("img_s", "–"))]
    data = run.get("data", {})
    card = {
        "architecture": run.get("arch"), "weights": run.get("weights", {}).get("name"), "why these weights": run.get("weights", {}).get("reason"),
        "strategy": strategy.get("name") if isinstance(strategy, dict) else strategy,
        "strategy, in one sentence": strategy.get("description", "") if isinstance(strategy, dict) else "",
        "classes": ", ".join(run.get("classes", [])), "training images": data.get("train_images"), "validation images": data.get("val_images"),
        "preprocessing": run.get("preprocessing"), "device": run.get("device"),
    }
    sections = [
        f"<h1>{html.escape(title)}</h1><p class='muted'>Transfer Studio report · {time.strftime('%Y-%m-%d %H:%M')}</p>",
        "<div class='kpi'>" + "".join(f"<div>{html.escape(k)}<b>{html.escape(str(v))}</b></div>" for k, v in kpis) + "</div>",
        "<h2>Dataset</h2>" + _dataset_thumbs(run),
        "<h2>Model card</h2>" + _table([{"field": k, "value": v} for k, v in card.items() if v not in (None, "")]),
        "<h2>Settings</h2>" + _table([{"setting": k, "value": v} for k, v in cfg.items()]),
        "<h2>Learning curves</h2>" + _fig_html(curves_figure(metrics)),
    ]
    if ev:
        sections += ["<h2>Confusion matrix</h2>" + _fig_html(confusion_figure(ev)),
                     "<h2>Per-class metrics</h2>" + _table(ev.get("per_class", [])),
                     "<h2>Misclassified validation images</h2>" + _mistakes(ev, run_dir)]
    if comparison := _comparisons(run):
        sections.append("<h2>Pretrained vs from scratch</h2>" + comparison)
    if texts := _text_samples():
        sections.append("<h2>Text generation samples</h2>" + texts)
    return ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title>"
            f"<style>{CSS}</style><script>{plotly.offline.get_plotlyjs()}</script></head><body>"
            + "".join(sections) + "</body></html>")


def write_report(run_dir: str | Path, out: str | Path) -> Path:
    out = Path(out)
    workspace.atomic_write_bytes(out, build_report(run_dir).encode("utf-8"))
    return out
