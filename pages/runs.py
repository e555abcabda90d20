"""Run history: every fine-tuning run in a table, curves overlaid for comparison, resume and delete."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import streamlit as st

from engine.core import runs
from pages.common import allowed, curves, friendly_errors, locked, manager

st.title("Runs")
NAN = float("nan")


def row(run: dict) -> dict:
    cfg, summary = run["config"], run.get("summary") or {}
    info = runs.read(run, "run.json", {})
    metrics = runs.read(run, "metrics.json", [])
    src = info.get("weights") if isinstance(info.get("weights"), dict) else {}
    accs = [m["val_acc"] for m in metrics if m.get("val_acc") is not None]
    # images per second only where epochs trained on images: on cached features a head trains at
    # tens of thousands of "images"/s, a number that cannot be compared with a full run's
    speeds = [m["img_s"] for m in metrics if m.get("img_s") and not m.get("cached")]
    end = run.get("finished") or (time.time() if run["status"] == "running" else None)
    strategy = cfg.get("strategy", "")
    return {
        "started": pd.to_datetime(run["created"], unit="s", utc=True),
        "dataset": cfg.get("data", ""),
        "backbone": cfg.get("model", ""),
        # an uploaded weights file is stored under a hash: show its name, never a path
        "weights": src.get("name") or Path(str(cfg.get("weights", ""))).name,
        "strategy": strategy + (f" k={cfg.get('freeze')}" if strategy == "partial" else ""),
        "epochs": f"{len(metrics)}/{cfg['epochs']}" if "epochs" in cfg else "",
        # numbers a run does not have are NaN, not None: a column of None is shown as the word "None"
        "best val acc": summary.get("best_val_acc", max(accs) if accs else NAN),
        "status": run["status"],
        # a finished run: the time it trained, summed over its sessions (a resume does not count the gap)
        "duration": (summary.get("seconds") if run["status"] != "running" else None)
                    or ((end - run["started"]) if end and run.get("started") else NAN),
        "img/s": (sum(speeds) / len(speeds)) if speeds else NAN,
        "id": run["id"],
    }


def table(all_runs: list[dict]) -> None:
    df = pd.DataFrame([row(r) for r in all_runs])
    st.dataframe(df, hide_index=True, column_config={
        "id": st.column_config.TextColumn("run"),
        "best val acc": st.column_config.ProgressColumn("best val acc", format="percent", min_value=0, max_value=1),
        "duration": st.column_config.NumberColumn("duration", format="%.0f s"),
        "img/s": st.column_config.NumberColumn("img/s", format="%.0f"),
        "started": st.column_config.DatetimeColumn("started", format="distance"),
    })


def compare(all_runs: list[dict]) -> None:
    with_curves = {r["id"]: r for r in all_runs if (Path(r["dir"]) / "metrics.json").is_file()}
    if not with_curves:
        return
    st.subheader("Compare")
    picked = st.multiselect("Runs to overlay", list(with_curves), default=list(with_curves)[:3], key="rn_compare",
                            format_func=lambda i: f"{with_curves[i]['title']} · {i}")
    if picked:
        series = {f"{with_curves[i]['title']} ({i[-6:]})": runs.read(with_curves[i], "metrics.json", []) for i in picked}
        loss, acc = curves(series)
        a, b = st.columns(2)
        a.plotly_chart(loss, key="rn_loss")
        b.plotly_chart(acc, key="rn_acc")


def manage(all_runs: list[dict]) -> None:
    st.subheader("Open, resume or delete")
    by_id = {r["id"]: r for r in all_runs}
    run_id = st.selectbox("Run", list(by_id), key="rn_target", format_func=lambda i: f"{by_id[i]['title']} · {by_id[i]['status']} · {i}")
    run = by_id[run_id]
    row = st.container(horizontal=True, vertical_alignment="center")
    if run["kind"] == "imported":
        row.page_link("pages/predict.py", label="Predict with it", icon=":material/center_focus_strong:", query_params={"run": run_id})
    else:
        row.page_link("pages/finetune.py", label="Open results", icon=":material/insights:", query_params={"run": run_id})
    if run["status"] in ("interrupted", "cancelled"):
        if row.button("Resume", icon=":material/replay:", key="rn_resume", **locked(help="Continue from the last epoch checkpoint.")) and allowed():
            with friendly_errors("runs: resume"):
                manager().resume(run_id)
                st.switch_page("pages/finetune.py", query_params={"run": run_id})
    active = run["status"] in runs.ACTIVE
    if row.button("Delete…", icon=":material/delete:", key="rn_delete",
                  **locked(disabled=active, help="Cancel it on the Fine-tune page first." if active else "Deletes the run and all its files.")) and allowed():
        st.session_state["rn_confirm"] = run_id
    if st.session_state.get("rn_confirm") == run_id:
        st.warning(f"Delete **{run['title']}** (`{run_id}`) with its model and metrics? This cannot be undone.")
        confirm = st.container(horizontal=True)
        if confirm.button("Yes, delete", type="primary", key="rn_yes", **locked()) and allowed():
            with friendly_errors("runs: delete"):
                runs.delete(run_id)
                st.session_state.pop("rn_confirm")
                st.toast(f"Deleted {run_id}.")
                st.rerun()
        if confirm.button("Keep it", key="rn_no"):
            st.session_state.pop("rn_confirm")
            st.rerun()


with friendly_errors("runs"):
    all_runs = sorted(runs.list_runs("finetune") + runs.list_runs("imported"), key=lambda r: r["created"], reverse=True)
    if not all_runs:
        st.info("No runs yet. Start one on the **Fine-tune** page; every run is kept here to compare.", icon=":material/history:")
        st.page_link("pages/finetune.py", label="Go to Fine-tune", icon=":material/arrow_forward:")
    else:
        table(all_runs)
        compare(all_runs)
        manage(all_runs)
