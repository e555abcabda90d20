"""Transfer Studio: navigation and the sidebar status. Pages live in pages/."""
import threading
from pathlib import Path

import streamlit as st

from engine.core import workspace
from pages.common import manager, role_box

st.set_page_config(page_title="Transfer Studio", page_icon="🧪", layout="wide")

# Projector type: everything people read from the back of a room gets bigger (text, metrics, inputs,
# selectors, tables), and the page keeps less empty space at the top, so a tour step fits 1280x720.
PROJECTOR_CSS = """<style>
.stMainBlockContainer { padding-top: 2.5rem !important; padding-bottom: 1rem !important; }
.stMainBlockContainer p, .stMainBlockContainer li, .stMainBlockContainer label { font-size: 1.3rem !important; }
.stMainBlockContainer h1 { font-size: 2.8rem !important; padding: 0.2rem 0 !important; }
.stMainBlockContainer h3 { font-size: 1.7rem !important; padding: 0.2rem 0 !important; }
.stMainBlockContainer button p { font-size: 1.2rem !important; }
.stMainBlockContainer [data-testid="stMetricValue"] { font-size: 3.2rem !important; }
.stMainBlockContainer [data-testid="stMetricLabel"] p { font-size: 1.3rem !important; }
.stMainBlockContainer input, .stMainBlockContainer textarea, .stMainBlockContainer [data-baseweb="select"] div {
  font-size: 1.3rem !important; }
.stMainBlockContainer [data-testid="stDataFrame"], .stMainBlockContainer [data-testid="stTable"] { zoom: 1.3; }
.stMainBlockContainer [data-testid="stCaptionContainer"] p { font-size: 1.1rem !important; }
</style>"""

# (file, title, icon, section); a page whose file does not exist yet is simply absent.
PAGES = [
    ("pages/home.py", "Home", ":material/home:", "Start"),
    ("pages/models.py", "Models", ":material/deployed_code:", "Start"),
    ("pages/images.py", "Images", ":material/photo_library:", "Vision"),
    ("pages/finetune.py", "Fine-tune", ":material/model_training:", "Vision"),
    ("pages/predict.py", "Predict", ":material/center_focus_strong:", "Vision"),
    ("pages/runs.py", "Runs", ":material/history:", "Vision"),
    ("pages/generate.py", "Generate text", ":material/edit_note:", "Text"),
    ("pages/text_finetune.py", "Fine-tune text", ":material/tune:", "Text"),
    ("pages/lab.py", "Transfer Lab", ":material/science:", "Learn"),
    ("pages/tour.py", "Guided tour", ":material/slideshow:", "Learn"),
]
# Presentation mode (?present=1, bookmarkable): bigger type, expert controls hidden, the tour first.
# The sidebar's page links carry no query parameters, so the session remembers the mode and every
# page puts ?present=1 back into its address (a reload or a copied link stays in the mode).
if st.query_params.get("present") == "1":
    st.session_state["_present"] = True
presenting = st.session_state.get("_present", False)
if presenting and st.query_params.get("present") != "1":
    st.query_params["present"] = "1"
root = Path(__file__).parent
sections: dict[str, list] = {}
for file, title, icon, section in PAGES:
    if (root / file).is_file():
        sections.setdefault(section, []).append(st.Page(file, title=title, icon=icon))
st.set_option("client.showSidebarNavigation", True)  # off only for the legacy first run (.streamlit/config.toml)
nav = st.navigation(sections)
if presenting and nav.url_path == "" and not st.session_state.get("_toured"):
    st.session_state["_toured"] = True  # a presenter landing on the app starts with the tour, once
    st.switch_page("pages/tour.py", query_params=st.query_params.to_dict())
if presenting:
    st.html(PROJECTOR_CSS)

# A bookmark opened as the server's very first request (see pages/__init__.py).
deep_link = st.session_state.pop("_deep_link", None)
if deep_link:
    url, params = deep_link
    wanted = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1]
    for page in (p for group in sections.values() for p in group):
        if page.url_path == wanted and page.url_path != nav.url_path:
            st.switch_page(page, query_params=params)


@st.cache_resource(show_spinner=False)
def environment() -> dict:
    """Device and weight sources, filled in by a background probe (start_probe) once the first page has
    been drawn: torch takes seconds to import on a cold start and the first page should not wait for it
    (nor share the CPU with it)."""
    return {"_lock": threading.Lock()}


def start_probe(found: dict) -> None:
    """Start the probe once per process (every later call returns at once)."""
    def probe() -> None:
        from engine.core import device
        from engine.models import sources  # imports torch

        found["weights"] = sources.available()
        found["device"] = device.label()

    with found["_lock"]:
        if not found.get("_started"):
            found["_started"] = True
            threading.Thread(target=probe, name="environment-probe", daemon=True).start()


def environment_lines() -> None:
    env = environment()
    if "device" not in env:
        st.caption("**Device** · detecting…")
        return
    from engine.models import sources  # (imported by the probe already: reading what is cached now costs a few file checks)

    avail = sources.available()  # fresh on every rerun: a download or an import shows at once
    st.caption(f"**Device** · {env['device']}")
    st.caption(f"**Weights** (auto) · vision: {avail['auto']['vision']} · text: {avail['auto']['text']} · "
               f"{'online' if avail['online'] else 'offline'}")


@st.fragment(run_every=2)
def job_lines() -> None:
    """Queued and running jobs of every session, kept current without rerunning the page."""
    for job in manager().active():
        phase = job.get("phase", "queued")
        msg = job.get("message") or ""
        detail = f" · epoch {job['epoch']}/{job['epochs']}" if job.get("epoch") else (f" · {msg[:48]}" if msg else "")
        st.caption(f"**Job** · {job['kind']} {phase}{detail}")


with st.sidebar:
    if st.toggle("Presentation mode", value=presenting, help="Bigger text for a projector, expert controls hidden, the guided tour first. Bookmark it: ?present=1"):
        if not presenting:
            st.session_state["_present"] = True
            st.query_params["present"] = "1"
            st.rerun()
    elif presenting:
        st.session_state["_present"] = False
        st.query_params.pop("present", None)
        st.rerun()
    if "device" in environment():
        environment_lines()
    else:  # until the probe has answered: poll, so the sidebar fills in on the page it is on
        st.fragment(run_every=1)(environment_lines)()
    st.caption(f"**Workspace** · `{workspace.home().name}/`")
    role_box()
    if manager().active():
        job_lines()  # refreshes itself while jobs run; a page drawn with none does not poll

try:
    nav.run()
finally:
    start_probe(environment())  # the page has been drawn: now the probe may import torch
