"""The Home page's "Reset demo": nothing is deleted until the dialog is confirmed; then a background job
removes what is not the demo's and completes the demo, and the page reports it."""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import pages  # noqa: F401 - see test_pages_vision
from engine import demo
from engine.data import imagedata
from engine.text import history
from tests.imgs import png

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_manager")  # tests/conftest.py


def test_reset_demo_asks_first_then_runs_in_the_background(monkeypatch):
    # the demo's own run is made with 1 epoch and without the Lab comparison, to keep this test short
    real_reset = demo.reset
    monkeypatch.setattr(demo, "reset", lambda **kw: real_reset(**{**kw, "epochs": 1, "lab": False}))
    imagedata.create_dataset("audience photos")
    imagedata.add_images("audience photos", "cat", [("c.png", png())])

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    assert any("**1** thing not in the demo" in c.value for c in at.caption)
    at.button(key="demo_reset").click().run()
    assert any("deletes **1** thing that is not" in w.value for w in at.warning)
    assert any("audience photos" in m.value for m in at.markdown)
    at.button(key="demo_no").click().run()  # cancel: nothing deleted, no job
    assert [d["name"] for d in imagedata.list_datasets()] == ["audience photos"]
    assert "demo_job" not in at.session_state

    at.button(key="demo_reset").click().run()
    at.button(key="demo_yes").click().run()
    run_id = at.session_state["demo_job"]
    from pages.common import manager

    assert manager().wait(run_id, timeout=300) == "done"
    at.run()  # the progress fragment sees the finished job and reruns the whole page
    assert not at.exception
    assert [d["name"] for d in imagedata.list_datasets()] == ["Fruit (sample)"]
    assert len(history.recent()) == len(demo.DEMO_PROMPTS)
    assert any("The demo is ready" in s.value for s in at.success)
    assert any("**0** things not in the demo" in c.value for c in at.caption)


def test_the_first_page_does_not_wait_for_torch(tmp_path):
    # torch takes seconds to import on a cold start: the Home page must render without it (the sidebar's
    # device probe imports it in a background thread, after the page is drawn)
    import subprocess
    import sys

    # the first import of torch is recorded with the thread that made it: it must be the probe, after the page
    code = ("import builtins, sys, threading\n"
            "seen = []\n"
            "real = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name.split('.')[0] == 'torch' and not seen and 'torch' not in sys.modules:\n"
            "        seen.append(threading.current_thread().name)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "import pages; from streamlit.testing.v1 import AppTest; at = AppTest.from_file('app.py').run()\n"
            "assert not at.exception, at.exception\n"
            "drawn = at.title[0].value\n"
            "[t.join(120) for t in threading.enumerate() if t.name == 'environment-probe']\n"
            "print(seen, drawn)")
    env = {**__import__("os").environ, "TRANSFER_STUDIO_HOME": str(tmp_path / "ws")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["['environment-probe']", "Transfer", "Studio"]


def test_counts_on_the_cards_read_as_english():
    imagedata.create_dataset("pets")
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("pages/home.py")
    at.run()
    labels = [link.label for link in at.get("page_link")]
    assert "Images (1 dataset)" in labels and "Fine-tune (0 runs)" in labels
