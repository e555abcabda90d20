"""Home: what Transfer Studio is, and where to start."""
import streamlit as st

from engine import demo
from engine.core import runs
from engine.data import imagedata
from pages.common import allowed, friendly_errors, locked, manager, md_escape, plural

st.title("Transfer Studio")
st.subheader("Transfer learning you can touch", divider="blue")
st.write("Start from a network that has already learned to see or to write, then teach it your task with a "
         "handful of examples. Every step runs here, on this machine, and you watch it happen.")

n_datasets, n_runs = len(imagedata.list_datasets()), len(runs.list_runs("finetune")) + len(runs.list_runs("imported"))
a, b, c = st.columns(3)
with a.container(border=True):
    st.markdown("**1 · Bring images**")
    st.caption("Upload a few photos per class, a ZIP of class folders, use the camera, or load the bundled sample.")
    st.page_link("pages/images.py", label=f"Images ({plural(n_datasets, 'dataset')})", icon=":material/photo_library:")
with b.container(border=True):
    st.markdown("**2 · Fine-tune a pretrained ResNet**")
    st.caption("Train only a new head, the last layers, or everything; watch the curves; inspect the mistakes.")
    st.page_link("pages/finetune.py", label=f"Fine-tune ({plural(n_runs, 'run')})", icon=":material/model_training:")
with c.container(border=True):
    st.markdown("**3 · See why pretraining helps**")
    st.caption("Pretrained vs from scratch, how much to freeze, how few labels you need, and advice for your data.")
    st.page_link("pages/lab.py", label="Transfer Lab", icon=":material/science:")
d, e, f = st.columns(3)
with d.container(border=True):
    st.markdown("**Generate text**")
    st.caption("A GPT-2-style model continues your sentence; see every sampling knob's effect.")
    st.page_link("pages/generate.py", label="Generate text", icon=":material/edit_note:")
with e.container(border=True):
    st.markdown("**Fine-tune the language model**")
    st.caption("Teach it your own text and watch perplexity drop.")
    st.page_link("pages/text_finetune.py", label="Fine-tune text", icon=":material/tune:")
with f.container(border=True):
    st.markdown("**Presenting?**")
    st.caption("A seven-step guided tour with big type for a projector.")
    st.page_link("pages/tour.py", label="Guided tour", icon=":material/slideshow:", query_params={"present": "1"})


# ----------------------------------------------------------------------------- reset demo
def things(n: int) -> str:
    return f"**{n}** thing" + ("" if n == 1 else "s")


def close_dialog() -> None:
    st.session_state.pop("demo_confirm", None)


# open while session_state["demo_confirm"] is set, so a rerun (or a test) finds it where it was left
@st.dialog("Reset the demo?", on_dismiss=close_dialog)
def confirm_reset(remove: list[str], todo: list[str]) -> None:
    if remove:
        st.warning(f"This deletes {things(len(remove))} that {'is' if len(remove) == 1 else 'are'} not part of the demo. "
                   "This cannot be undone.")
        st.markdown("\n".join(f"- {md_escape(label)}" for label in remove[:8]) + (f"\n- … and {len(remove) - 8} more" if len(remove) > 8 else ""))
    st.write("Then it adds what the demo is missing: " + (", ".join(todo) or "nothing") + ". It runs in the background.")
    yes, no = st.columns(2)
    if yes.button("Yes, reset", type="primary", key="demo_yes", width="stretch", **locked()) and allowed():
        close_dialog()
        with friendly_errors("home: reset demo"):
            st.session_state["demo_job"] = manager().submit("demo", {}, demo.RESET_TITLE)
            st.rerun()
    if no.button("Cancel", key="demo_no", width="stretch"):
        close_dialog()
        st.rerun()


@st.fragment(run_every=1)
def reset_progress(run_id: str) -> None:
    live = manager().progress(run_id)
    if live is not None:
        st.info(live.get("message") or "Demo: waiting for the device…", icon=":material/hourglass_top:")
        return
    run = runs.get(run_id)  # finished: show the outcome once and refresh the whole page's counts
    st.session_state.pop("demo_job", None)
    st.session_state["demo_outcome"] = (run["status"], run.get("summary") or {}, run.get("error"))
    st.rerun(scope="app")


st.divider()
with st.expander("Reset demo", icon=":material/restart_alt:"):
    with friendly_errors("home: demo status"):
        remove, todo = demo.user_data(), demo.missing()
        st.caption("Puts this workspace back to the demo: the sample fruit dataset, one finished fine-tuning run, "
                   "a pretrained-vs-scratch comparison and a few generations. Anything else (datasets, runs, "
                   "generations added since) is deleted, after you confirm.")
        st.caption(f"Now: {things(len(remove))} not in the demo · missing from the demo: {', '.join(todo) or 'nothing'}.")
        job = st.session_state.get("demo_job")
        busy = job is not None or any(j["kind"] == "demo" for j in manager().active())
        if st.button("Reset demo…", key="demo_reset", **locked(disabled=busy, help="Asks before deleting anything.")) and allowed():
            st.session_state["demo_confirm"] = True
        if st.session_state.get("demo_confirm") and not busy:
            confirm_reset(remove, todo)
        if job:
            reset_progress(job)
        outcome = st.session_state.pop("demo_outcome", None)
        if outcome and outcome[0] == "done":
            st.success("The demo is ready. Added: " + (", ".join(outcome[1].get("added", [])) or "nothing (it was complete)")
                       + f" · removed {things(outcome[1].get('removed', 0))}.", icon=":material/check_circle:")
        elif outcome:
            st.error(f"The demo reset {outcome[0]}: {outcome[2] or 'no details'}")
