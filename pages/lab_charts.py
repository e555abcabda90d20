"""Plotly figures for the Transfer Lab page, from a lab.json state (engine/lab/experiments.py). Not a page."""
from __future__ import annotations

import math

import plotly.graph_objects as go

PRE, SCR, RULE = "#1f77b4", "#ff7f0e", "#2ca02c"
COLORS = {"pretrained": PRE, "scratch": SCR, "one-lr": PRE, "rule": RULE}
LAYOUT = dict(height=380, margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2), hovermode="x unified")


def _rgba(hex_color: str, alpha: float) -> str:
    h = hex_color.lstrip("#")
    return f"rgba({int(h[0:2], 16)}, {int(h[2:4], 16)}, {int(h[4:6], 16)}, {alpha})"


def _band(fig: go.Figure, curve: dict, name: str, color: str, dash: str | None = None) -> None:
    """Mean line with a min-max band over seeds (the band appears with 2+ seeds)."""
    x = curve["epoch"]
    if max(curve.get("n") or [1]) > 1:
        fig.add_scatter(x=x + x[::-1], y=curve["max"] + curve["min"][::-1], fill="toself", fillcolor=_rgba(color, 0.15), mode="lines",
                        line=dict(width=0), hoverinfo="skip", showlegend=False)
    fig.add_scatter(x=x, y=curve["mean"], name=name, mode="lines+markers", line=dict(color=color, width=3, dash=dash))


def curves_figure(state: dict, title: str, names: dict[str, str]) -> go.Figure:
    """Validation accuracy per epoch, pretrained vs scratch (mean over seeds, band = spread)."""
    fig = go.Figure()
    curves = (state.get("result") or {}).get("curves") or {}
    for group, name in names.items():
        c = curves.get(group)
        if c and c["epoch"]:
            _band(fig, c, name, COLORS[group])
    chance = 1 / max(1, len((state.get("data") or {}).get("classes") or [1, 1]))
    fig.add_hline(y=chance, line=dict(color="grey", dash="dot"), annotation_text="guessing", annotation_position="bottom right")
    fig.update_layout(title=title, xaxis_title="epochs of training", yaxis_title="accuracy on held-out images", **LAYOUT)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    epochs = (state.get("config") or {}).get("epochs") or max((len(c["epoch"]) for c in curves.values()), default=1)
    fig.update_xaxes(range=[-0.2, epochs + 0.2], tickmode="linear", dtick=1 if epochs <= 16 else 5)  # the frame is fixed from the start
    _annotate_benefits(fig, state)
    return fig


def _annotate_benefits(fig: go.Figure, state: dict) -> None:
    """Arrows on the curves where the three benefits are read off."""
    res = state.get("result") or {}
    c = res.get("curves") or {}
    p, s = c.get("pretrained"), c.get("scratch")
    if not (p and s and len(p["mean"]) > 1 and len(s["mean"]) > 1):
        return
    fig.add_annotation(x=1, y=p["mean"][1], text="start", showarrow=True, arrowhead=2, ax=-40, ay=-30, font=dict(color=PRE))
    if state.get("status") == "done":
        best = max(range(1, len(p["mean"])), key=lambda i: p["mean"][i])
        fig.add_annotation(x=p["epoch"][best], y=p["mean"][best], text="asymptote", showarrow=True, arrowhead=2, ax=-40, ay=-30,
                           font=dict(color=PRE))


def freeze_figure(state: dict) -> go.Figure:
    """Best accuracy (bars, with spread) and seconds per run (line) for each number of frozen stages."""
    pts = ((state.get("result") or {}).get("sweep") or {}).get("one-lr") or []
    labels = {5: "k=5<br>linear probe", 0: "k=0<br>all layers"}
    x = [labels.get(int(p["x"]), f"k={int(p['x'])}") for p in pts][::-1]
    pts = pts[::-1]
    fig = go.Figure()
    fig.add_bar(x=x, y=[p["best_val_acc"]["mean"] for p in pts], name="best accuracy", marker_color=PRE,
                error_y=dict(type="data", array=[p["best_val_acc"]["std"] for p in pts]),
                customdata=[p["trainable_params"] for p in pts], hovertemplate="%{y:.1%} · %{customdata:,} trainable weights",
                text=[f"{p['best_val_acc']['mean']:.0%}" for p in pts], textposition="inside")
    fig.add_scatter(x=x, y=[p["seconds"]["mean"] for p in pts], name="seconds per run", yaxis="y2", mode="lines+markers",
                    line=dict(color=SCR, width=3))
    fig.update_layout(title="Accuracy (bars) and training time (line) per k frozen stages",
                      yaxis=dict(title="best accuracy", range=[0, 1.02], tickformat=".0%"),
                      yaxis2=dict(title="seconds", overlaying="y", side="right", rangemode="tozero", showgrid=False), **LAYOUT)
    return fig


def lr_rule_figure(state: dict) -> go.Figure:
    fig = go.Figure()
    curves = (state.get("result") or {}).get("curves") or {}
    for group, name in (("rule", "pretrained layers at lr/10"), ("one-lr", "one lr for all layers")):
        c = curves.get(group)
        if c and c["epoch"]:
            _band(fig, c, name, COLORS[group])
    fig.update_layout(title="All layers train (k=0): the 10x-smaller learning-rate rule", xaxis_title="epochs",
                      yaxis_title="accuracy", **LAYOUT)
    epochs = (state.get("config") or {}).get("epochs") or 1
    fig.update_xaxes(range=[-0.2, epochs + 0.2], tickmode="linear", dtick=1 if epochs <= 16 else 5)
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    return fig


def data_size_figure(state: dict) -> go.Figure:
    """Accuracy vs labelled images per class (log axis), pretrained vs scratch; the gap shaded."""
    sweep = (state.get("result") or {}).get("sweep") or {}
    fig = go.Figure()
    for group, name in (("pretrained", "pretrained"), ("scratch", "from scratch")):
        pts = sweep.get(group) or []
        if pts:
            fig.add_scatter(x=[p["x"] for p in pts], y=[p["best_val_acc"]["mean"] for p in pts], name=name, mode="lines+markers",
                            line=dict(color=COLORS[group], width=3), fill="tonexty" if group == "scratch" else None,
                            fillcolor=_rgba(PRE, 0.12), error_y=dict(type="data", array=[p["best_val_acc"]["std"] for p in pts]))
    fig.update_layout(title="Labelled images per class → accuracy (the shaded gap is what pretraining buys)",
                      xaxis_title="labelled training images per class", yaxis_title="best accuracy", **LAYOUT)
    xs = sorted({p["x"] for pts in sweep.values() for p in pts})
    fig.update_xaxes(type="log", tickvals=xs, ticktext=[f"{x:.0f}" for x in xs])
    fig.update_yaxes(range=[0, 1.02], tickformat=".0%")
    fig.update_layout(legend=dict(orientation="h", y=-0.2, traceorder="normal"))
    return fig


def ae_loss_figure(state: dict) -> go.Figure:
    loss = (state.get("ae") or {}).get("loss") or []
    fig = go.Figure(go.Scatter(x=list(range(1, len(loss) + 1)), y=loss, mode="lines", line=dict(color=RULE, width=3)))
    fig.update_layout(title="Step 1: learn to redraw, no labels", xaxis_title="autoencoder epochs",
                      yaxis_title="error (MSE)", height=300, margin=dict(l=10, r=10, t=50, b=10))
    return fig


def advisor_figure(result: dict) -> go.Figure:
    """The four scenarios as quadrants; the dataset is the dot."""
    th = result["thresholds"]
    n, sim = max(1.0, float(result["images_per_class"])), result["similarity"]
    small, simmin = th["small_below_images_per_class"], th["similar_at_or_above"]
    lo, hi = 1, max(2000, n * 2)
    fig = go.Figure()
    quads = [((lo, small), (simmin, 1.05), "small + similar", "linear probe"),
             ((small, hi), (simmin, 1.05), "large + similar", "fine-tune, small lr"),
             ((lo, small), (-0.05, simmin), "small + different", "freeze early layers, augment"),
             ((small, hi), (-0.05, simmin), "large + different", "fine-tune all / scratch")]
    mine = result["advice"]["scenario"]
    for (x0, x1), (y0, y1), name, what in quads:
        fig.add_shape(type="rect", x0=x0, x1=x1, y0=y0, y1=y1, line=dict(width=1, color="grey"),
                      fillcolor=_rgba(RULE if name == mine else "#999999", 0.25 if name == mine else 0.06), layer="below")
        # on a log axis annotations are placed in log10 units (shapes take data values)
        fig.add_annotation(x=math.log10((x0 * x1) ** 0.5), y=(y0 + y1) / 2 + (0.12 if y0 > 0 else -0.12),
                           text=f"<b>{name}</b><br>{what}", showarrow=False, font=dict(size=13))
    fig.add_scatter(x=[n], y=[sim], mode="markers+text", text=[result.get("data", "")], textposition="top center",
                    marker=dict(size=18, color=PRE, line=dict(width=2, color="white")), showlegend=False)
    fig.update_layout(title="Where your dataset sits", height=420, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis=dict(title="labelled images per class", type="log", range=[0, math.log10(hi)],
                                 tickvals=[v for v in (1, 10, 100, 1000, 10000) if v <= hi]),
                      yaxis=dict(title="similarity to the pretraining data", range=[-0.05, 1.05]))
    return fig


def probe_figure(result: dict) -> go.Figure:
    """Few-shot nearest-class-mean accuracy with raw pixels, a random network and the pretrained one."""
    acc = result["nearest_mean_accuracy"]
    keys = ("pixels", "random", "pretrained")
    names = {"pixels": "raw pixels", "random": "random-init network", "pretrained": "pretrained network"}
    fig = go.Figure(go.Bar(x=[names[k] for k in keys], y=[acc[k] for k in keys], marker_color=["#999999", SCR, PRE],
                           text=[f"{acc[k]:.0%}" for k in keys], textposition="outside"))
    fig.add_hline(y=result["chance"], line=dict(color="grey", dash="dot"), annotation_text="guessing", annotation_position="top left")
    fig.update_layout(title=f"Telling classes apart from {result.get('shots', 5)} examples each, using…",
                      height=420, margin=dict(l=10, r=10, t=50, b=10), yaxis=dict(title="accuracy", range=[0, 1.1], tickformat=".0%"))
    return fig


PPL_TICKS = [v * 10 ** e for e in range(0, 6) for v in (1, 2, 5)]  # a log axis labelled 10, 20, 50, 100, ...


def text_curves_figure(state: dict, title: str = "Perplexity on the held-out end of the text (lower is better; band = spread over seeds)") -> go.Figure:
    """Validation perplexity per step (log axis, lower is better), pretrained vs scratch, with the start and
    the asymptote marked as on the image curves."""
    fig = go.Figure()
    res = state.get("result") or {}
    curves = res.get("curves") or {}
    names = {"pretrained": f"pretrained: {(state.get('weights') or {}).get('name', '')}", "scratch": "from scratch (random weights)"}
    steps = next((r["metrics"] for r in state.get("runs", []) if r.get("x") in (None, 1.0) and r["metrics"]), [])
    for group, name in names.items():
        c = curves.get(group)
        if c and c["epoch"]:
            # the curves' x is the evaluation interval; the axis shows the optimizer step it was measured at
            _band(fig, {**c, "epoch": [steps[i]["step"] if i < len(steps) else i for i in c["epoch"]]}, name, COLORS[group])
    fig.update_layout(title=title, xaxis_title="optimizer steps on the new text", yaxis_title="perplexity (log scale)", **LAYOUT)
    fig.update_yaxes(type="log", tickvals=PPL_TICKS)
    fig.update_xaxes(range=[-1, (state.get("steps") or (state.get("config") or {}).get("steps") or 1) + 1])
    p = curves.get("pretrained")
    if p and len(p["mean"]) > 1 and len(steps) > 1:
        fig.add_annotation(x=steps[1]["step"], y=math.log10(p["mean"][1]), text="start", showarrow=True, arrowhead=2, ax=40, ay=-30,
                           font=dict(color=PRE))
        if state.get("status") == "done":
            best = min(range(1, len(p["mean"])), key=lambda i: p["mean"][i])
            fig.add_annotation(x=steps[min(best, len(steps) - 1)]["step"], y=math.log10(p["mean"][best]), text="asymptote",
                               showarrow=True, arrowhead=2, ax=-40, ay=30, font=dict(color=PRE))
    return fig


def text_size_figure(state: dict) -> go.Figure:
    """Best perplexity vs share of the text used, pretrained vs scratch (lower is better)."""
    sweep = (state.get("result") or {}).get("sweep") or {}
    fig = go.Figure()
    for group, name in (("pretrained", "pretrained"), ("scratch", "from scratch")):
        pts = sweep.get(group) or []
        if pts:
            fig.add_bar(x=[f"{p['x']:.0%} of the text" for p in pts], y=[p["best_val_ppl"]["mean"] for p in pts], name=name,
                        marker_color=COLORS[group], text=[f"{p['best_val_ppl']['mean']:.0f}" for p in pts], textposition="outside",
                        error_y=dict(type="data", array=[p["best_val_ppl"]["std"] for p in pts]))
    fig.update_layout(title="Less text → best perplexity on the held-out end (lower is better)", barmode="group",
                      yaxis_title="best perplexity", **LAYOUT)
    return fig
