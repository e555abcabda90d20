"""Fine-tune a pretrained ResNet: choose data, backbone and strategy, train in the background, inspect."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from engine import report
from engine.core import runs, safetensors, workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.models import backbones, sources
from engine.train import distributed
from engine.vision import config, finetune, heatmaps, preprocess, strategies
from engine.vision.config import FinetuneConfig
from pages.common import KEEP, allowed, curves, friendly_errors, loaded_model, locked, manager
from pages.downloads import offer_download
from pages.finetune_options import training_options

D = FinetuneConfig(data="")  # the engine's defaults; training settings left None come from the recipe book
WEIGHTS = {"auto": "auto (best available)", "imagenet": "ImageNet", "mini": "bundled mini backbone",
           "none": "none (random init)", "upload": "upload a .safetensors file"}
st.title("Fine-tune")


def saved_upload(up) -> str | None:
    """Check uploaded weights, keep them in the workspace under their content hash (never the upload's own name)."""
    data = up.getvalue()
    try:
        safetensors.check_safetensors_header(data)  # a bad or lying header is refused before anything is stored
    except UserError as err:
        st.error(f"{up.name}: {err}")
        return None
    return str(workspace.save_upload(data, "weights", suffix=".safetensors"))


def start_form(datasets: list[dict]) -> None:
    by_name = {d["name"]: d for d in datasets}
    left, right = st.columns(2, gap="large")
    with right:
        strategy = st.radio("Strategy", list(config.STRATEGIES), list(config.STRATEGIES).index(D.strategy),
                            captions=list(config.STRATEGIES.values()), key="ft_strategy", persist_state=KEEP)
        freeze = D.freeze
        if strategy == "partial":
            freeze = st.slider("Frozen stages k (stem, layer1 … layer4)", 1, 4, D.freeze, key="ft_freeze", persist_state=KEEP,
                               help="The first k stages keep their pretrained weights; the rest is trained.")
    with left:
        names = list(by_name)  # default: the dataset open on the Images page, else the newest
        current = st.session_state.get("dataset")
        data = st.selectbox("Dataset", names, key="ft_data", index=names.index(current) if current in names else len(names) - 1,
                            format_func=lambda n: f"{n} · {by_name[n]['classes']} classes · {by_name[n]['images']} images")
        model = st.selectbox("Backbone", sources.VISION_ARCHS, key="ft_model", persist_state=KEEP,
                             help="\n".join(f"- **{b.name}**: {b.good_for}" for b in backbones.REGISTRY.values()))
        scratch = strategy == "scratch"
        choice = st.selectbox("Weights", list(WEIGHTS), format_func=WEIGHTS.get, key="ft_weights", persist_state=KEEP, disabled=scratch,
                              help="Training from scratch always starts from random weights.")
        weights = "none" if scratch else choice
        if choice == "upload" and not scratch:
            up = st.file_uploader(f"Backbone weights (a torchvision {model} state dict)", type=["safetensors"], key="ft_upload")
            weights = saved_upload(up) if up else None
    if weights is None:
        st.info(f"Upload a .safetensors state dict of a torchvision {model} to use your own backbone weights.")
        return
    base = FinetuneConfig(data=data, model=model, weights=weights, strategy=strategy, freeze=int(freeze),
                                 image_size=st.session_state.get("ft_size"), seed=int(st.session_state.get("ft_seed", D.seed)))
    try:
        rec, info = finetune.plan_settings(base)  # the recipe for this strategy and this dataset
    except UserError as err:
        st.warning(str(err))
        return
    st.session_state["ft_lrfind_cfg"] = base
    chosen = training_options(rec, info, f"{strategy}|{data}|{model}")
    cfg = dataclasses.replace(base, **chosen, early_stopping=int(st.session_state.get("ft_early", 0)))
    try:
        src = sources.resolve_vision(model, weights)
        size = preprocess.run_preprocessing(cfg, src).image_size
        st.info(f"**Weights:** {src.name} — {src.reason} Images are used at {size} px.", icon=":material/info:")
        if src.download:
            offer_download(src, "Download it now, or the run downloads it first (its progress shows here).")
    except UserError as err:
        st.warning(str(err))
        return
    st.caption(strategies.cache_plan(dataclasses.replace(rec, **chosen))[1])  # whether the fast frozen-feature path applies, and why
    with st.expander("Run this at scale (several GPUs or machines)"):
        st.code(distributed.torchrun_command(cfg, nproc=2), language="bash")  # these settings, data-parallel
        st.caption("Set --nproc-per-node to the GPUs of each machine; the README's *Multi-GPU and multi-node* "
                   "section has the flags for several machines.")
    if st.button("Start fine-tuning", type="primary", icon=":material/play_arrow:", key="ft_start", **locked()) and allowed():
        with friendly_errors("finetune: start"):
            cfg.validate()
            title = f"{data} · {model} · {strategy}" + (f" k={freeze}" if strategy == "partial" else "")
            run_id = manager().submit("finetune", dataclasses.asdict(cfg), title)
            show(run_id)
            st.rerun()


def show(run_id: str | None) -> None:
    """Remember the run in the session and the URL, so a refresh finds it again."""
    st.session_state["ft_run"] = run_id
    if run_id:
        st.query_params["run"] = run_id
    else:
        st.query_params.pop("run", None)


def live(run_id: str, drawn_active: bool) -> None:
    """Progress, cancel and curves; redrawn every second while the run is queued or running."""
    with friendly_errors("finetune: live view"):  # a fragment rerun is outside the page's own error handler
        live_view(run_id, drawn_active)


def live_view(run_id: str, drawn_active: bool) -> None:
    run = runs.get(run_id)
    if drawn_active and run["status"] not in runs.ACTIVE:
        st.rerun()  # it just finished: redraw the whole page once, with results and without polling
    # the status line lives here, in the part that refreshes itself (queued -> running while the page stays)
    src = runs.read(run, "run.json", {}).get("weights")
    src = src if isinstance(src, dict) else {}
    st.caption(f"Run `{run_id}` · {run['status']}" + (f" · weights: {src.get('name')}" if src.get("name") else "")
               + (f" · {run['device']}" if run.get("device") else ""))
    prog = manager().progress(run_id) or {}
    if run["status"] in runs.ACTIVE:
        pos = manager().queue_position(run_id)
        if pos is not None:
            st.info(f"Queued — {pos} run(s) ahead of this one." if pos else "Queued — starts next.", icon=":material/schedule:")
        epoch, epochs = prog.get("epoch") or 0, prog.get("epochs") or run["config"].get("epochs") or 1
        step, steps = prog.get("step") or 0, prog.get("steps") or 0
        if prog.get("phase") in ("training", "evaluating"):
            frac = (max(epoch - 1, 0) + (step / steps if steps else 0)) / epochs
            text = f"{prog['phase']} · epoch {epoch}/{epochs}" + (f" · step {step}/{steps}" if steps else "")
        else:  # queued, loading, extracting (the frozen features, once), saving
            frac = step / steps if prog.get("phase") == "extracting" and steps else 0.0
            text = prog.get("message") or prog.get("phase") or run["status"]
        st.progress(min(frac, 1.0), text=text)
        m = st.columns(5)
        m[0].metric("Loss", f"{prog['loss']:.3f}" if prog.get("loss") is not None else "–")
        m[1].metric("Accuracy", f"{prog['acc']:.1%}" if prog.get("acc") is not None else "–")
        m[2].metric("Images/s", f"{prog['img_s']:.0f}" if prog.get("img_s") else "–")
        m[3].metric("ETA", f"{prog['eta_s']:.0f} s" if prog.get("eta_s") is not None else "–")
        if m[4].button("Cancel", icon=":material/stop:", key="ft_cancel", **locked(help="Stops within one step and keeps what was learned.")) and allowed():
            manager().cancel(run_id)
    metrics = runs.read(run, "metrics.json", [])
    if metrics:
        loss, acc = curves({run["title"]: metrics})
        a, b = st.columns(2)
        a.plotly_chart(loss, key="ft_loss")
        b.plotly_chart(acc, key="ft_acc")
    elif run["status"] in runs.ACTIVE:
        st.caption("Curves appear after the first epoch.")


def results(run: dict) -> None:
    """After the run: confusion matrix, per-class scores and the misclassified validation images."""
    ev = runs.read(run, "eval.json")
    if not ev:
        return
    classes = ev.get("classes") or runs.read(run, "run.json", {}).get("classes", [])
    a, b = st.columns(2, gap="large")
    cm = ev.get("confusion") or ev.get("confusion_matrix")
    if cm:
        fig = px.imshow(cm, x=classes, y=classes, text_auto=True, color_continuous_scale="Blues",
                        labels={"x": "predicted", "y": "true", "color": "images"}, title="Confusion matrix (validation)")
        fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10), coloraxis_showscale=False)
        a.plotly_chart(fig, key="ft_cm")
    per = ev.get("per_class")
    if per:
        df = pd.DataFrame.from_dict(per, orient="index") if isinstance(per, dict) else pd.DataFrame(per).set_index("class")
        b.markdown("**Per class (validation)**")
        b.dataframe(df, column_config={c: st.column_config.NumberColumn(format="%.2f") for c in ("precision", "recall", "f1")})
    mistakes = ev.get("mistakes") or []
    st.subheader(f"Misclassified validation images ({ev.get('n_mistakes', len(mistakes))})")
    if not mistakes:
        st.caption("None — every validation image was classified correctly.")
    shown = [m for m in mistakes if image_path(m["file"])][:12]
    heats = [None] * len(shown)
    if shown and st.toggle("Show where it looked", key="ft_mistake_heat",
                           help="Grad-CAM: the parts of each image that made the model say the wrong class."):
        weights = Path(run["dir"]) / "model.safetensors"
        if weights.is_file():
            with friendly_errors("finetune: heatmaps"):
                loaded = loaded_model(run["dir"], weights.stat().st_mtime)
                heats = heatmaps.explain_files(loaded, [image_path(m["file"]) for m in shown], [m["pred"] for m in shown])
    for i in range(0, len(shown), 6):
        for col, m, heat in zip(st.columns(6), shown[i:i + 6], heats[i:i + 6]):
            col.image(str(image_path(m["file"])), caption=f"true {m['true']} · predicted {m['pred']} ({m['conf']:.0%})")
            if heat is not None:
                col.image(heat.overlay, caption=f"where it looked for {m['pred']}")
    if ev.get("n_mistakes", len(mistakes)) > len(shown):
        st.caption(f"Showing the {len(shown)} most confident mistakes of {ev.get('n_mistakes', len(mistakes))}.")
    st.download_button("Download report", data=lambda: report.build_report(run["dir"]).encode(), file_name=f"report-{run['id']}.html",
                       mime="text/html", icon=":material/summarize:", on_click="ignore",
                       help="One self-contained HTML file: curves, confusion matrix, mistakes, model card. Opens offline.")


def image_path(file: str) -> Path | None:
    """A mistake's image, only if it lies inside the workspace."""
    home = workspace.home()
    path = (home / file).resolve()
    return path if path.is_relative_to(home) and path.is_file() else None


def run_view(run_id: str) -> None:
    run = runs.get(run_id)
    top = st.columns([4, 1])
    top[0].subheader(run["title"])
    if top[1].button("New run", icon=":material/add:", key="ft_new"):
        show(None)
        st.rerun()
    active = run["status"] in runs.ACTIVE
    st.fragment(run_every=1 if active else None)(live)(run_id, active)
    if active:
        return
    if run["status"] == "failed":
        st.error(f"The run failed: {run.get('error') or 'no reason recorded'}")
    if run["status"] in ("interrupted", "cancelled"):
        st.warning(f"This run was {run['status']}; Resume continues from its last epoch checkpoint.")
        if st.button("Resume", type="primary", icon=":material/replay:", key="ft_resume", **locked()) and allowed():
            with friendly_errors("finetune: resume"):
                manager().resume(run_id)
                st.rerun()
    summary = run.get("summary") or {}
    if isinstance(summary.get("best_val_acc"), float) and math.isfinite(summary["best_val_acc"]):
        st.success(f"Best validation accuracy **{summary['best_val_acc']:.1%}**.", icon=":material/check_circle:")
        st.page_link("pages/predict.py", label="Try it on new images", icon=":material/arrow_forward:", query_params={"run": run_id})
    results(run)


run_id = st.query_params.get("run") or st.session_state.get("ft_run")  # a link or a refresh wins
if run_id and not any(r["id"] == run_id for r in runs.list_runs("finetune")):
    run_id = None  # deleted, a link from another workspace, or not a fine-tuning run
    show(None)
if run_id:
    with friendly_errors("finetune: run view"):
        run_view(run_id)
    st.divider()
else:  # e.g. a second browser tab: point at what the worker is doing
    for job in (j for j in manager().active() if j["kind"] == "finetune"):
        note = st.container(horizontal=True, vertical_alignment="center")
        note.caption(f"A fine-tuning run is {job.get('phase', 'queued')}: `{job['run_id']}`")
        if note.button("Watch it", key=f"ft_watch_{job['run_id']}"):
            show(job["run_id"])
            st.rerun()
with friendly_errors("finetune: datasets"):
    datasets = imagedata.list_datasets()
    if not datasets:
        st.info("No dataset yet. Add images on the **Images** page — or load the sample dataset there with one click.",
                icon=":material/photo_library:")
        st.page_link("pages/images.py", label="Go to Images", icon=":material/arrow_forward:")
    else:
        with st.container(border=True) if run_id else st.container():
            if run_id:
                st.markdown("**Start another run**")
            start_form(datasets)
