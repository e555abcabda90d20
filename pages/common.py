"""Shared app-layer helpers: cached engine objects and error display. Not a page.

Engine objects that are expensive and read-only (job manager, loaded models) are cached
once per process with st.cache_resource. Nothing per-user goes in a shared cache.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import streamlit as st

from engine import jobs
from engine.core import access, workspace
from engine.core.errors import UserError


@st.cache_resource
def manager() -> jobs.JobManager:
    """The process-wide job manager (one worker per device)."""
    return jobs.get_manager()


def presenting() -> bool:
    """Presentation mode (?present=1, remembered for the session by app.py): pages hide expert controls."""
    return st.session_state.get("_present", False) or st.query_params.get("present") == "1"


# Settings stay for the session while the user visits other pages: Streamlit drops a widget's value once
# a run does not draw it, unless the widget is made with persist_state=KEEP.
KEEP = "session"


# ----------------------------------------------------------------------------- roles (engine/core/access.py)
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
@st.cache_resource(max_entries=4, show_spinner="Loading the model…")
def loaded_model(run_dir: str, stamp: float = 0.0):
    """A trained model for read-only inference, shared by every session.

    Keyed by the run folder and `stamp` (the weights file's mtime) so a resumed run is reloaded.
    """
    from engine.vision import inference  # deferred: imports torch

    return inference.load_model(Path(run_dir))


def model_for(run: dict):
    """A run's trained model, loaded again only when its weights file changes."""
    return loaded_model(run["dir"], (Path(run["dir"]) / "model.safetensors").stat().st_mtime)


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
    from engine.text import causal_lm

    return causal_lm.load(spec)


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
