"""AppTest tests for the Transfer Lab page: empty workspace, a finished experiment re-opened, the advisor's one click.

The page is opened through app.py (st.navigation), as in the browser. Experiments here are real but
tiny (3 colour classes x 8 images, 32 px, 1 epoch); the live polling is exercised by the browser test.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import pages  # noqa: F401 - imported outside a script run, so its legacy-URL redirect cannot hijack the first AppTest
from engine import jobs
from engine.core import runs
from engine.data import imagedata
from engine.lab import experiments
from tests.helpers import make_folder, tiny
from tests.text_helpers import corpus, make_pretrained_tiny_lm, tiny_text_lab

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("fresh_manager")  # tests/conftest.py


def open_lab() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("pages/lab.py")
    return at.run()


def finished(cfg: experiments.LabConfig) -> str:
    """A lab run recorded in the workspace and run to the end (what the job worker does)."""
    run_id = runs.create("lab", f"Lab · {experiments.EXPERIMENTS[cfg.experiment]} · tiny · quick", vars(cfg))
    summary = experiments.run_lab(cfg, runs.run_dir(run_id))
    runs.set_status(run_id, "done", summary=summary)
    return run_id


def test_empty_workspace_offers_the_sample_and_demo_tasks():
    at = open_lab()
    assert not at.exception
    assert at.info and "sample" in at.info[0].value
    assert at.button(key="lab_demo")
    image = [e for e in experiments.EXPERIMENTS if e not in experiments.TEXT_EXPERIMENTS]
    assert all(at.button(key=f"lab_start_{e}").disabled for e in image)  # no images to run on yet
    # the text experiments have their text already: the bundled Genesis
    assert all(not at.button(key=f"lab_start_{e}").disabled for e in experiments.TEXT_EXPERIMENTS)
    assert at.radio(key="lab_text_choice_text-compare").value == "Genesis (King James Version)"


def test_finished_text_compare_is_reopened_with_perplexity_curves_and_the_three_numbers(tmp_path):
    lm = make_pretrained_tiny_lm(tmp_path / "lm")
    text = tmp_path / "new.txt"
    text.write_text(corpus(300, seed=7))
    run_id = finished(tiny_text_lab("text-compare", str(text), str(lm)))
    at = open_lab()
    assert not at.exception and not at.error
    assert at.selectbox(key="lab_pick_text-compare").value == run_id
    metrics = {m.label: m for m in at.metric}
    assert {"Lower start", "Lower asymptote"} <= set(metrics) and any(m.startswith("Faster fall") for m in metrics)
    assert "vs scratch's" in metrics["Lower start"].delta and metrics["Lower start"].delta.startswith("-")  # lower: a fall
    assert any("training tokens" in c.value for c in at.caption)


def test_finished_compare_is_reopened_with_curves_and_the_three_numbers(tmp_path, tiny_weights):  # noqa: F811
    imagedata.import_path(make_folder(tmp_path / "imgs"), "tiny")
    run_id = finished(tiny("compare", "tiny", tiny_weights, epochs=2))
    at = open_lab()
    assert not at.exception and not at.error
    assert at.selectbox(key="lab_data").value == "tiny"
    assert at.selectbox(key="lab_pick_compare").value == run_id  # re-opened from the workspace, e.g. after a restart
    labels = [m.label for m in at.metric]
    assert any("start" in m for m in labels) and any("slope" in m for m in labels) and any("asymptote" in m for m in labels)
    assert any("points vs scratch" in (m.delta or "") for m in at.metric)


def test_start_button_queues_a_lab_job(tmp_path, tiny_weights):  # noqa: F811
    imagedata.import_path(make_folder(tmp_path / "imgs"), "tiny")
    at = open_lab()
    at.number_input(key="lab_epochs").set_value(1)
    at.number_input(key="lab_seeds").set_value(1)
    at.button(key="lab_start_freeze").click().run()
    assert not at.exception and not at.error
    run_id = at.session_state["lab_freeze"]
    run = runs.get(run_id)
    assert run["kind"] == "lab" and run["config"]["experiment"] == "freeze" and run["config"]["epochs"] == 1
    jobs.get_manager().cancel(run_id)
    jobs.get_manager().wait(run_id, timeout=120)


def test_advisor_result_starts_the_recommended_finetune_run(tmp_path, tiny_weights):  # noqa: F811
    imagedata.import_path(make_folder(tmp_path / "imgs"), "tiny")
    finished(experiments.LabConfig("advise", data="tiny", weights=tiny_weights, image_size=32, max_per_class=8))
    at = open_lab()
    assert not at.exception and not at.error
    assert at.success and "small + " in at.success[0].value  # 8 images per class: a small dataset
    button = next(b for b in at.button if b.key == "lab_start_advised")
    assert "None" not in button.label and "recipe" in button.label  # the epochs come from the recipe when it starts
    button.click().run()
    ft = [r for r in runs.list_runs("finetune")]
    assert len(ft) == 1 and ft[0]["config"]["data"] == "tiny" and "(advised)" in ft[0]["title"]
    # the run uses what was measured: the same weights and image size, the advised strategy
    assert ft[0]["config"]["weights"] == tiny_weights and ft[0]["config"]["image_size"] == 32
    assert ft[0]["config"]["strategy"] in ("full", "partial")
    assert at.session_state["ft_run"] == ft[0]["id"]
    jobs.get_manager().cancel(ft[0]["id"])
    jobs.get_manager().wait(ft[0]["id"], timeout=120)
