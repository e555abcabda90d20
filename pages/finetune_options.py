"""The Fine-tune form's training options: widgets that start at the recipe's values, the table of
where each value came from, and the learning-rate finder. Not a page."""
from __future__ import annotations

import dataclasses
import hashlib
import math

import pandas as pd
import plotly.express as px
import streamlit as st

from engine.core import runs
from engine.vision import config, finetune, lrfind
from engine.vision.config import FinetuneConfig
from pages.common import KEEP, allowed, friendly_errors, locked, manager

D = FinetuneConfig(data="")
LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
WEIGHT_DECAYS = [None, 0.0, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.3, 1.0]
SMOOTHINGS = [0.0, 0.05, 0.1, 0.2, 0.3]
LABELS = {"epochs": "Epochs", "batch_size": "Batch size", "lr": "Learning rate (head)", "optimizer": "Optimiser",
          "schedule": "Schedule", "weight_decay": "Weight decay", "label_smoothing": "Label smoothing",
          "augment": "Augmentation", "bn_adapt": "Re-estimate BatchNorm"}

def training_options(rec: FinetuneConfig, info: dict, group: str) -> dict:
    """The training settings, starting at the recipe's values. Returns only those the user changed:
    the rest stay None and come from the recipe when the run starts, exactly as on the CLI."""
    why = info["recipe"]["why"]
    tag = hashlib.sha1(group.encode()).hexdigest()[:8]  # another strategy or dataset: another recipe, new widgets
    key = lambda name: f"ft_{name}_{tag}"  # noqa: E731
    v = {}
    with st.expander("Training options — from the recipe book unless you change them"):
        a, b, c = st.columns(3)
        opts = ["adamw", "sgd"] + (["lbfgs"] if rec.strategy == "linear" else [])
        v["optimizer"] = b.radio(LABELS["optimizer"], opts, opts.index(rec.optimizer), horizontal=True, key=key("optimizer"),
                                 persist_state=KEEP,
                                 format_func={"sgd": "SGD + momentum", "adamw": "AdamW", "lbfgs": "L-BFGS probe"}.get)
        lbfgs = v["optimizer"] == "lbfgs"
        v["epochs"] = a.number_input("Curve points (L-BFGS chunks)" if lbfgs else LABELS["epochs"], 1, 500, rec.epochs, key=key("epochs"),
                                     persist_state=KEEP)
        if not lbfgs:
            v["batch_size"] = a.select_slider(LABELS["batch_size"], sorted({8, 16, 32, 48, 64, 128, 256, rec.batch_size}), rec.batch_size,
                                              key=key("batch"), persist_state=KEEP)
            lrs = sorted(set(LRS) | {rec.lr})
            v["lr"] = b.select_slider(LABELS["lr"], lrs, rec.lr, format_func=lambda x: f"{x:g}", key=key("lr"), persist_state=KEEP)
            suggest_lr(key("lr"), lrs)
            v["schedule"] = b.radio(LABELS["schedule"], list(config.SCHEDULES), list(config.SCHEDULES).index(rec.schedule),
                                    horizontal=True, key=key("schedule"), persist_state=KEEP)
            v["label_smoothing"] = c.select_slider(LABELS["label_smoothing"], SMOOTHINGS, rec.label_smoothing, key=key("ls"),
                                                   persist_state=KEEP)
        wd = rec.weight_decay if rec.weight_decay in WEIGHT_DECAYS else None
        v["weight_decay"] = c.select_slider(LABELS["weight_decay"], WEIGHT_DECAYS, wd, key=key("wd"), persist_state=KEEP,
                                            format_func=lambda x: "cross-validated" if x is None else f"{x:g}")
        v["augment"] = c.multiselect(LABELS["augment"], config.AUGMENTATIONS, rec.augment, key=key("augment"), persist_state=KEEP,
                                     help="Augmented images change every epoch, so they turn off the fast cached-feature path.")
        if rec.strategy in ("linear", "partial", "two-phase"):
            v["bn_adapt"] = c.checkbox(LABELS["bn_adapt"], rec.bn_adapt, key=key("bn"), persist_state=KEEP,
                                       help="AdaBN: recompute the frozen layers' BatchNorm statistics on your images.")
        a.number_input("Early stopping patience (epochs, 0 = off)", 0, 100, D.early_stopping, key="ft_early", persist_state=KEEP)
        c.selectbox("Image size", [None, 32, 64, 96, 128, 160, 224], key="ft_size", persist_state=KEEP,
                    format_func=lambda s: "from the weights" if s is None else f"{s} px")
        a.number_input("Seed", 0, 2**31 - 1, D.seed, key="ft_seed", persist_state=KEEP)
        mine = {k: x for k, x in v.items() if list(x if k == "augment" else [x]) != list(getattr(rec, k) if k == "augment" else [getattr(rec, k)])}
        rows = [{"setting": LABELS[k], "value": finetune.show_setting(k, x), "from": "you" if k in mine else "recipe",
                 "why": "" if k in mine else why.get(k, "")} for k, x in v.items()]
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption(f"The recipe for **{rec.strategy}** on {info['n_train']} training images in {info['n_classes']} classes "
                   "(`python -m engine bench recipes` measures it).")
    return {k: (list(x) if k == "augment" else x) for k, x in mine.items()}


def suggest_lr(lr_key: str, lrs: list[float]) -> None:
    """The learning-rate finder as a short background job: its plot, and a button to use the suggestion."""
    if st.button("Suggest", icon=":material/auto_graph:", key="ft_lrfind_start",
                 **locked(help="A short learning-rate sweep (fastai's lr_find) on a copy of the model: it changes no data and no run.")) and allowed():
        with friendly_errors("finetune: lr-find"):
            cfg = st.session_state["ft_lrfind_cfg"]
            config = {k: v for k, v in dataclasses.asdict(cfg).items() if v is not None}
            st.session_state["ft_lrfind"] = (manager().submit("lr-find", config, f"lr-find · {cfg.data} · {cfg.strategy}"), lr_key)
    job, key = st.session_state.get("ft_lrfind") or (None, None)
    if job and key == lr_key:
        active = runs.get(job)["status"] in runs.ACTIVE
        st.fragment(run_every=1 if active else None)(lrfind_view)(job, lr_key, lrs, active)


def lrfind_view(job: str, lr_key: str, lrs: list[float], drawn_active: bool) -> None:
    run = runs.get(job)
    if drawn_active and run["status"] not in runs.ACTIVE:
        st.rerun()  # finished: redraw once with the plot, and stop polling
    if run["status"] in runs.ACTIVE:
        p = manager().progress(job) or {}
        st.progress(min(1.0, (p.get("step") or 0) / (p.get("steps") or 1)), text=p.get("message") or "sweeping the learning rate")
        return
    if run["status"] != "done":
        st.error(run.get("error") or f"the sweep was {run['status']}")
        return
    res = lrfind.read_result(run["dir"])
    if not res:
        return
    fig = px.line(x=res["lrs"], y=res["losses"], log_x=True, labels={"x": "learning rate (head)", "y": "loss (smoothed)"}, height=220)
    fig.add_vline(x=res["suggestion"], line_dash="dash", annotation_text=f"suggested {res['suggestion']:.1e}")
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10))
    st.plotly_chart(fig, key=f"lrf_{job}")
    nearest = min(lrs, key=lambda x: abs(math.log(x / res["suggestion"])))
    st.button(f"Use {nearest:g}", key="ft_lrfind_use", on_click=lambda: st.session_state.update({lr_key: nearest}))
