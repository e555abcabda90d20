"""Shared app-layer helpers: cached engine objects and error display. Not a page.

Engine objects that are expensive and read-only (job manager, loaded models) are cached
once per process with st.cache_resource. Nothing per-user goes in a shared cache.
"""
from __future__ import annotations

from contextlib import contextmanager

import streamlit as st

from engine import access, jobs, workspace
from engine.errors import UserError


@st.cache_resource
def manager() -> jobs.JobManager:
    """The process-wide job manager (one worker per device)."""
    return jobs.get_manager()


def presenting() -> bool:
    """Presentation mode (?present=1, remembered for the session by app.py): pages hide expert controls."""
    return st.session_state.get("_present", False) or st.query_params.get("present") == "1"


# ----------------------------------------------------------------------------- roles (engine/access.py)
LOCKED_HELP = "Presenter only: unlock with the presenter password in the sidebar."


def role() -> str:
    """'owner' (no presenter password set: one user, no login), 'presenter' (this browser session
    gave the password) or 'audience'."""
    if not access.password_set():
        return "owner"
    return "presenter" if st.session_state.get("_presenter") else "audience"


def audience() -> bool:
    return role() == "audience"


def locked(disabled: bool = False, **kw) -> dict:
    """Widget arguments for a destructive or costly control: disabled for the audience, saying why."""
    if audience():
        return {**kw, "disabled": True, "help": LOCKED_HELP}
    return {**kw, "disabled": disabled}


def allowed() -> bool:
    """Checked again when a costly action runs: a disabled button is only a hint to the browser."""
    if audience():
        st.error("Only the presenter can do this. " + LOCKED_HELP.split(": ", 1)[1].capitalize())
        return False
    return True


def audience_wait(limit: str, per_minute: int) -> bool:
    """True if an audience member may do `limit` now (presenters always may); else says how long to wait."""
    if not audience():
        return True
    limits = st.session_state.setdefault("_limits", {})
    wait = limits.setdefault(limit, access.RateLimit(per_minute)).wait_s()
    if wait:
        st.warning(f"Busy: at most {per_minute} {limit} a minute per visitor. Try again in {max(1, round(wait))} s.", icon=":material/hourglass:")
    return not wait


@contextmanager
def generation_slot():
    """One of the process-wide generation slots for an audience member (presenters need none):
    yields False, after saying how long to wait, when every slot is taken."""
    import time

    if not audience():
        yield True
        return
    if not access.GENERATION_SLOTS.try_acquire():
        st.warning(f"Busy: {access.GENERATIONS_AT_ONCE} visitors are generating right now. "
                   f"Try again in {access.GENERATION_SLOTS.wait_hint_s()} s.", icon=":material/hourglass:")
        yield False
        return
    t = time.monotonic()
    try:
        yield True
    finally:
        access.GENERATION_SLOTS.release(time.monotonic() - t)


def upload_fits(upload) -> bool:
    """Audience uploads are capped (access.AUDIENCE_UPLOAD_BYTES); says so when one is larger."""
    if upload is None or not audience() or upload.size <= access.AUDIENCE_UPLOAD_BYTES:
        return True
    st.warning(f"{upload.name} is larger than {access.AUDIENCE_UPLOAD_BYTES // 2**20} MB, the limit for visitors.")
    return False


def role_box() -> None:
    """The sidebar's role line, and the presenter unlock (only when a presenter password is set)."""
    r = role()
    if r == "owner":
        return
    if r == "presenter":
        st.caption("**Role** · presenter (everything unlocked in this browser session)")
        if st.button("Lock again", key="_role_lock", icon=":material/lock:"):
            st.session_state["_presenter"] = False
            st.rerun()
        return
    st.caption("**Role** · audience: browse results, predict, generate text, follow the tour")
    with st.form("_role_unlock", clear_on_submit=True, border=False):  # the typed password is not kept
        given = st.text_input("Presenter password", type="password", key="_role_password")
        if st.form_submit_button("Unlock", icon=":material/lock_open:"):
            if access.check_password(given):
                st.session_state["_presenter"] = True
                st.rerun()
            else:
                st.error("Wrong password.")


@contextmanager
def friendly_errors(context: str):
    """Show expected failures as a short message; log unexpected ones with a reference."""
    try:
        yield
    except UserError as err:
        st.error(str(err))
    except Exception as err:  # noqa: BLE001 - the user must never see a raw traceback
        ref = workspace.log_unexpected(err, context)
        st.error(f"Something went wrong ({type(err).__name__}). It was logged with reference {ref}.")


# ----------------------------------------------------------------------------- vision runs
def read_json(path, default=None):
    """A run file (run.json, metrics.json, eval.json), or `default` when it is missing or half-written."""
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return default


@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(run_dir: str, stamp: float = 0.0):
    """A trained model for read-only inference, shared by every session.

    Keyed by the run folder and `stamp` (the weights file's mtime) so a resumed run is reloaded.
    """
    from pathlib import Path

    from engine import vision

    return vision.load_model(Path(run_dir))


def curves(series: dict[str, list[dict]]):
    """Loss and accuracy figures per epoch for one or more runs ({label: metrics.json rows})."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative

    loss, acc = go.Figure(), go.Figure()
    for i, (label, rows) in enumerate(series.items()):
        color = qualitative.Plotly[i % len(qualitative.Plotly)]
        # one run: train and val in two colours; several: one colour per run, train dotted
        train_color = "#EF553B" if len(series) == 1 else color
        name = f"{label} · " if len(series) > 1 else ""
        x = [r.get("epoch") for r in rows]
        mode = "lines+markers" if len(rows) <= 15 else "lines"
        for fig, key, part, dash in ((loss, "train_loss", "train", "dot"), (loss, "val_loss", "val", None),
                                     (acc, "train_acc", "train", "dot"), (acc, "val_acc", "val", None)):
            y = [r.get(key) for r in rows]
            if any(v is not None for v in y):
                fig.add_scatter(x=x, y=y, name=name + part, mode=mode,
                                line=dict(color=train_color if part == "train" else color, dash=dash))
    for fig, title in ((loss, "Loss"), (acc, "Accuracy")):
        fig.update_layout(title=title, xaxis_title="epoch", height=320, margin=dict(l=10, r=10, t=40, b=10),
                          legend=dict(orientation="h", y=-0.25))
    acc.update_yaxes(range=[0, 1.02], tickformat=".0%")
    if max((len(rows) for rows in series.values()), default=0) <= 15:
        for fig in (loss, acc):
            fig.update_xaxes(tickmode="linear", dtick=1)  # whole epochs, no 1.5
    return loss, acc


# ----------------------------------------------------------------------------- text
@st.cache_resource(max_entries=3, show_spinner="Loading the language model…")
def language_model(spec: str):
    """A loaded language model shared by every session: read-only, generation serialised by its lock."""
    from engine import text

    return text.load(spec)


def md_escape(s: str) -> str:
    """User or model text for st.markdown, shown literally: ASCII punctuation escaped, line breaks kept."""
    import re

    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:=^&\"'%@,;?/])", r"\\\1", s).replace("\n", "  \n")


def plural(n: int, word: str) -> str:
    """'1 dataset', '2 datasets'."""
    return f"{n} {word}" + ("" if n == 1 else "s")


def bold_prompt(prompt: str) -> str:
    """The prompt in bold, shown literally: each line's text bolded with its spaces outside the
    asterisks (Markdown does not close a bold on a space: "**the cat **" shows its asterisks)."""
    import re

    out = []
    for line in prompt.split("\n"):
        lead, core, trail = re.match(r"(\s*)(.*?)(\s*)$", line, re.S).groups()
        out.append(lead + (f"**{md_escape(core)}**" if core else "") + trail)
    return "  \n".join(out)


# ----------------------------------------------------------------------------- downloads
def download_jobs() -> list[dict]:
    """Weight downloads queued or running in this process (every session sees them)."""
    return [j for j in manager().active() if j.get("kind") == "download"]


def start_download(name: str) -> None:
    """A background download of `name` (its own worker: it never waits behind a training job)."""
    st.session_state["downloading"] = manager().submit("download", {"name": name}, f"download {name}", device="network")


@st.fragment(run_every=1)
def download_progress() -> None:
    """Live progress bars of the downloads, with Cancel; when the one this session started ends,
    the page is redrawn (what is on the machine has changed) and the outcome shown once."""
    from engine import models, runs

    active = download_jobs()
    for job in active:
        label = f"{job.get('model') or job['run_id']}: " + (models.progress_line(job) if job.get("bytes") is not None
                                                               else job.get("message") or job.get("phase", "queued"))
        st.progress(min(1.0, job.get("progress") or 0.0), text=label)
        if st.button("Cancel download", key=f"cancel-{job['run_id']}", **locked()):
            manager().cancel(job["run_id"])
    watching = st.session_state.get("downloading")
    if watching and not any(j["run_id"] == watching for j in active):
        st.session_state.pop("downloading")
        run = runs.get(watching)
        st.session_state["download_result"] = (run["status"], run.get("error"), run["config"].get("name"))
        st.rerun()


def download_outcome() -> None:
    """The outcome of this session's last download, shown once."""
    result = st.session_state.pop("download_result", None)
    if not result:
        return
    status, error, name = result
    if status == "done":
        st.success(f"{name} is on this machine: `auto` uses it from now on.")
    elif status == "cancelled":
        st.info(f"Download of {name} cancelled; nothing half-written was kept.")
    else:
        st.error(f"Download of {name} failed: {error}")


def offer_download(source, meanwhile: str) -> None:
    """`auto`'s real weights are not on this machine yet but the network answers: say so in one line,
    with a one-click download (or its live progress)."""
    from engine import models

    download_outcome()
    if download_jobs() or st.session_state.get("downloading"):
        download_progress()
        return
    m = models.get(source.download)
    text, button = st.columns([5, 1], vertical_alignment="center")
    text.info(f"**{m.name}** ({m.size_mb:.0f} MB) is not on this machine yet. {meanwhile}", icon=":material/download:")
    if button.button(f"Download {m.size_mb:.0f} MB", key=f"offer-{m.name}", **locked()) and allowed():
        with friendly_errors("download"):
            start_download(m.name)
            st.rerun()


# ----------------------------------------------------------------------------- the dataset map
@st.cache_data(show_spinner=False, max_entries=8)
def dataset_map(dataset: str, version: str):
    """The map of a dataset, once per version of its images and labels (an edit draws a new one)."""
    from engine import datamap

    return datamap.compute(dataset)


def dataset_map_view(dataset: str, key: str) -> None:
    """Pretrained vs random features of a dataset's images in 2-D, with the images of selected dots."""
    import pandas as pd
    import plotly.express as px

    from engine import imagedata

    st.caption("Each dot is one of your images, placed by the features of the backbone before any training: "
               "with pretrained features the classes already gather in groups, with the same network's random "
               "weights they do not. That head start is what fine-tuning builds on.")
    shown = st.session_state.setdefault("_maps", set())
    if not st.button("Draw the map", icon=":material/scatter_plot:", key=f"map_go_{key}") and (key, dataset) not in shown:
        return
    with friendly_errors("dataset map"), st.spinner("Computing the features and the map…"):
        m = dataset_map(dataset, imagedata.training_data(dataset).version)
        shown.add((key, dataset))
        left, right = st.columns(2)
        left.metric(f"Pretrained ({m.weights})", f"{m.knn['pretrained']:.0%}", help="5-nearest-neighbour accuracy in feature space")
        right.metric("Random weights", f"{m.knn['random']:.0%}", help="the same vote with the untrained network's features")
        fig = px.scatter(pd.DataFrame(m.rows()), x="x", y="y", color="class", facet_col="side", hover_data=["file"],
                         category_orders={"side": ["pretrained", "random"]}, color_discrete_sequence=px.colors.qualitative.D3)
        fig.for_each_annotation(lambda a: a.update(text={"side=pretrained": "pretrained features",
                                                         "side=random": "random features"}.get(a.text, a.text)))
        fig.update_xaxes(matches=None, showticklabels=False, title=None)
        fig.update_yaxes(matches=None, showticklabels=False, title=None)
        fig.update_layout(height=420, margin=dict(l=10, r=10, t=30, b=10))
        picked = st.plotly_chart(fig, on_select="rerun", selection_mode=("points", "box", "lasso"), key=f"map_plot_{key}")
        st.caption(f"{m.method} of the frozen features; the share is how often an image's 5 nearest neighbours "
                   "vote for its own class. Select dots (click, box or lasso) to see their images.")
        points = (picked or {}).get("selection", {}).get("points", []) if picked else []
        files = [p["customdata"][0] for p in points if p.get("customdata")][:12]
        if files:
            cols = st.columns(6)
            for i, f in enumerate(files):
                cols[i % 6].image(f, width=96)
