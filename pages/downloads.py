"""Weight downloads in the pages: start one, watch its progress bar, offer one where `auto` would download.
Widgets only; the downloading is engine.models'."""
from __future__ import annotations

import streamlit as st

from pages.common import allowed, friendly_errors, locked, manager


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
    from engine.core import runs
    from engine.models import store

    active = download_jobs()
    for job in active:
        st.progress(min(1.0, job.get("progress") or 0.0), text=store.job_line(job))
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
    from engine.models import store

    download_outcome()
    if download_jobs() or st.session_state.get("downloading"):
        download_progress()
        return
    m = store.get(source.download)
    text, button = st.columns([5, 1], vertical_alignment="center")
    text.info(f"**{m.name}** ({m.size_mb:.0f} MB) is not on this machine yet. {meanwhile}", icon=":material/download:")
    if button.button(f"Download {m.size_mb:.0f} MB", key=f"offer-{m.name}", **locked()) and allowed():
        with friendly_errors("download"):
            start_download(m.name)
            st.rerun()


