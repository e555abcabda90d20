"""AppTest tests for the vision pages (Fine-tune, Predict, Runs) with a real tiny model.

Pages are opened through app.py (st.navigation), as in the browser. Training runs are real but
tiny: two generated colour classes, 32 px, resnet18 from random weights, 1-2 epochs.
The live polling (st.fragment(run_every=1)) is exercised by the browser test; here the
progress record it reads is checked directly.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import pages  # noqa: F401 - imported here, outside a script run, so its legacy-URL redirect cannot hijack the first AppTest
from engine import jobs
from engine.core import runs
from engine.train import recipes
from tests.helpers import PAGE_COLORS as COLORS
from tests.helpers import has_button
from tests.helpers import make_page_dataset as make_dataset
from tests.helpers import noisy_png as png
from tests.helpers import away_and_back, open_page, widget

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("fresh_manager")  # tests/conftest.py


def train_tiny(tmp_path: Path, epochs: int = 1) -> str:
    from engine.vision.config import FinetuneConfig

    make_dataset(tmp_path / "imgs")
    cfg = FinetuneConfig(data="tiny", weights="none", strategy="linear", epochs=epochs, image_size=32)
    m = jobs.get_manager()
    run_id = m.submit("finetune", dataclasses.asdict(cfg), "tiny run", device="cpu")
    assert m.wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]
    return run_id


@pytest.mark.parametrize("page, hint", [
    ("pages/finetune.py", "Images"),
    ("pages/predict.py", "Fine-tune"),
    ("pages/runs.py", "Fine-tune"),
])
def test_empty_workspace_shows_guidance(page, hint):
    at = open_page(page)
    assert not at.exception
    assert at.info and hint in at.info[0].value
    assert any(hint.lower() in (link.label or "").lower() for link in at.get("page_link"))


# ----------------------------------------------------------------------------- fine-tune
def test_finetune_form_explains_strategies_and_weights(tmp_path):
    from engine.vision import config, finetune
    from engine.vision.config import FinetuneConfig

    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    assert not at.exception
    assert at.selectbox(key="ft_data").options == ["tiny · 2 classes · 16 images"]
    radio = at.radio(key="ft_strategy")
    assert radio.options == list(config.STRATEGIES) and radio.value == recipes.DEFAULT_STRATEGY
    assert at.info and at.info[0].value.startswith("**Weights:**")  # which weights, and why, before training
    assert not at.get("slider") or all(s.key != "ft_freeze" for s in at.slider)
    # the training options start at the recipe's values for this strategy and dataset
    full, _ = finetune.plan_settings(FinetuneConfig(data="tiny"))
    assert widget(at, "number_input", "Epochs").value == full.epochs and widget(at, "select_slider", "Learning rate (head)").value == full.lr
    radio.set_value("partial").run()
    assert at.slider(key="ft_freeze").value == FinetuneConfig(data="").freeze
    partial, _ = finetune.plan_settings(FinetuneConfig(data="tiny", strategy="partial"))
    assert widget(at, "number_input", "Epochs").value == partial.epochs
    at.radio(key="ft_strategy").set_value("linear").run()  # the probe: L-BFGS, no learning rate to set
    assert widget(at, "radio", "Optimiser").value == "lbfgs" and not any(s.label == "Learning rate (head)" for s in at.select_slider)
    at.radio(key="ft_strategy").set_value("scratch").run()
    assert at.selectbox(key="ft_weights").disabled and "random" in at.info[0].value


def test_finetune_form_keeps_its_settings_across_a_visit_to_another_page(tmp_path):
    """Someone who chose a strategy and options, went to add images and came back found the defaults again."""
    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    at.radio(key="ft_strategy").set_value("partial").run()
    at.slider(key="ft_freeze").set_value(2).run()
    widget(at, "number_input", "Epochs").set_value(7).run()
    at.selectbox(key="ft_size").set_value(96).run()
    away_and_back(at, "pages/finetune.py", "pages/images.py")
    assert at.radio(key="ft_strategy").value == "partial" and at.slider(key="ft_freeze").value == 2
    assert widget(at, "number_input", "Epochs").value == 7 and at.selectbox(key="ft_size").value == 96


def test_finetune_uploaded_weights_are_checked_and_stored_by_content(tmp_path, workspace_home):
    import torch
    import torchvision
    from safetensors.torch import save

    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    at.selectbox(key="ft_weights").set_value("upload").run()
    assert not has_button(at, "ft_start")  # nothing to start with until weights are uploaded
    at.file_uploader(key="ft_upload").set_value(("../../x.safetensors", b"\x80\x04 pickle, not safetensors", "application/octet-stream")).run()
    assert at.error and "not a safetensors file" in at.error[0].value and not has_button(at, "ft_start")

    state = {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items() if v.dtype == torch.float32}
    at.file_uploader(key="ft_upload").set_value(("../../mine.safetensors", save(state), "application/octet-stream")).run()
    assert not at.error and has_button(at, "ft_start")
    stored = list((workspace_home / "weights").glob("*.safetensors"))
    assert len(stored) == 1 and "mine" not in stored[0].name  # stored by content hash, not by the upload's name
    assert "uploaded" in at.info[0].value


def test_finetune_start_submits_job_and_shows_results(tmp_path):
    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    at.selectbox(key="ft_weights").set_value("none").run()
    at.selectbox(key="ft_size").set_value(32).run()
    widget(at, "number_input", "Epochs").set_value(1)
    widget(at, "select_slider", "Batch size").set_value(8)
    at.run()
    at.button(key="ft_start").click().run()
    assert not at.exception and not at.error
    run_id = at.session_state["ft_run"]
    assert at.query_params["run"] == run_id  # a refresh finds the run again
    run = runs.get(run_id)
    assert run["config"]["data"] == "tiny" and run["config"]["epochs"] == 1 and run["config"]["image_size"] == 32
    assert jobs.get_manager().wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]

    at = open_page("pages/finetune.py", run=run_id)  # a fresh session: found via the URL alone
    assert not at.exception
    assert any("Best validation accuracy" in s.value for s in at.success)
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = [c["layout"].get("title", {}).get("text") for c in charts]
    assert "Loss" in titles and "Accuracy" in titles and "Confusion matrix (validation)" in titles
    heat = next(c for c in charts if c["layout"].get("title", {}).get("text", "").startswith("Confusion"))
    assert list(heat["data"][0]["x"]) == ["blue", "red"]
    per_class = at.dataframe[0].value
    assert list(per_class.index) == ["blue", "red"] and {"precision", "recall", "f1"} <= set(per_class.columns)
    assert any(b.label == "Download report" for b in at.get("download_button"))


def test_finetune_progress_record_has_what_the_page_shows(tmp_path):
    """The fragment polls manager().progress(): check the worker fills the fields it reads."""
    from engine.vision.config import FinetuneConfig

    make_dataset(tmp_path / "imgs")
    cfg = FinetuneConfig(data="tiny", weights="none", strategy="full", epochs=2, image_size=32, batch_size=4)
    m = jobs.get_manager()
    run_id = m.submit("finetune", dataclasses.asdict(cfg), "progress", device="cpu")
    seen: dict = {}
    while runs.get(run_id)["status"] in runs.ACTIVE:
        seen |= {k: v for k, v in (m.progress(run_id) or {}).items() if v is not None}
        time.sleep(0.01)
    assert runs.get(run_id)["status"] == "done", runs.get(run_id)["error"]
    assert seen.get("epochs") == 2 and 1 <= seen.get("epoch", 0) <= 2
    assert seen.get("steps", 0) >= 1 and "loss" in seen


def test_finetune_cancel_button_stops_a_running_job(tmp_path):
    from engine.vision.config import FinetuneConfig

    make_dataset(tmp_path / "imgs")
    cfg = FinetuneConfig(data="tiny", weights="none", strategy="scratch", epochs=500, image_size=32, batch_size=2)
    m = jobs.get_manager()
    run_id = m.submit("finetune", dataclasses.asdict(cfg), "long", device="cpu")
    at = open_page("pages/finetune.py")  # another session, without the run in its URL: it is pointed at it
    at.button(key=f"ft_watch_{run_id}").click().run()
    assert at.query_params["run"] == run_id
    assert not at.exception and at.get("progress")  # the live view (its first draw; polling is tested in the browser)
    at.button(key="ft_cancel").click().run()
    assert m.wait(run_id, timeout=60) == "cancelled"
    at = open_page("pages/finetune.py", run=run_id)
    assert any("cancelled" in w.value for w in at.warning) and has_button(at, "ft_resume")


def test_finetune_resume_button_continues_an_interrupted_run(tmp_path):
    run_id = train_tiny(tmp_path)
    runs.set_status(run_id, "interrupted")
    at = open_page("pages/finetune.py", run=run_id)
    assert any("interrupted" in w.value for w in at.warning)
    at.button(key="ft_resume").click().run()
    assert not at.exception
    assert jobs.get_manager().wait(run_id, timeout=300) == "done"


def test_finetune_unknown_run_in_url_is_ignored(tmp_path):
    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py", run="no-such-run")
    assert not at.exception and not at.error
    assert has_button(at, "ft_start")  # the form, no broken run view
    assert "run" not in at.query_params


# ----------------------------------------------------------------------------- predict
def test_predict_shows_probabilities_and_per_file_reasons(tmp_path):
    run_id = train_tiny(tmp_path, epochs=2)
    at = open_page("pages/predict.py")
    assert not at.exception
    assert at.selectbox[0].value == run_id
    at.file_uploader(key="pr_files").set_value([
        ("red.png", png(COLORS["red"], seed=99), "image/png"),
        ("notes.png", b"this is not an image", "image/png"),
    ])
    at.run()
    assert not at.exception
    assert any("notes.png" in w.value and "not an image" in w.value for w in at.warning)
    shown = bars(at)
    assert len(shown) == 2  # one bar per class of the one valid image
    assert sorted(label for label, _ in shown) == ["blue", "red"] and abs(sum(p for _, p in shown) - 1) < 2e-3  # probabilities
    assert [p for _, p in shown] == sorted((p for _, p in shown), reverse=True)  # most likely first

    buf = io.BytesIO()
    Image.open(io.BytesIO(png(COLORS["blue"], seed=7))).save(buf, "JPEG")
    at.radio(key="pr_cam_mode").set_value("Live video").run()
    assert any("Live video cannot start here" in w.value for w in at.warning)  # (no live server session in a script test)
    at.radio(key="pr_cam_mode").set_value("Still photo").run()  # the fallback
    at.camera_input(key="pr_camera").set_value(("photo.jpg", buf.getvalue(), "image/jpeg")).run()
    assert not at.exception and len(bars(at)) == 4  # the camera photo gets its own bars


def bars(at) -> list[tuple[str, float]]:
    """The Predict page's probability bars: (class, probability) as each bar's text says it."""
    out = []
    for bar in at.get("progress"):
        label, pct = bar.proto.text.rsplit(" · ", 1)
        assert abs(bar.proto.value - float(pct[:-1])) <= 1  # the bar's length is its number (whole percent)
        out.append((label, float(pct[:-1]) / 100))
    return out


def test_predict_zip_gives_csv_with_reasons(tmp_path):
    train_tiny(tmp_path)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photos/a.png", png(COLORS["blue"], seed=5))
        z.writestr("b.png", png(COLORS["red"], seed=6))
        z.writestr("broken.jpg", b"\xff\xd8 truncated")
        z.writestr("__MACOSX/._a.png", b"junk")
    at = open_page("pages/predict.py")
    at.file_uploader(key="pr_zip_in").set_value(("batch.zip", buf.getvalue(), "application/zip")).run()
    assert not at.exception
    df = at.dataframe[0].value.set_index("file")
    assert set(df.index) == {"photos/a.png", "b.png", "broken.jpg"}
    assert df.loc["broken.jpg", "error"] and not df.loc["b.png", "error"]
    assert df.loc["b.png", "prediction"] in ("red", "blue") and 0 <= df.loc["b.png", "probability"] <= 1
    assert any(d.label == "Download predictions.csv" for d in at.get("download_button"))
    at.file_uploader(key="pr_zip_in").set_value(("fake.zip", b"PK not really", "application/zip")).run()
    assert not at.exception and "not a valid ZIP" in at.error[0].value
    assert at.button(key="pr_export")  # the other tabs still render


def test_predict_export_then_import(tmp_path, workspace_home):
    run_id = train_tiny(tmp_path)
    at = open_page("pages/predict.py")
    at.file_uploader(key="pr_files").set_value(("r.png", png(COLORS["red"]), "image/png")).run()
    before = bars(at)
    at.checkbox(key="pr_onnx").uncheck()
    at.button(key="pr_export").click().run()
    assert not at.exception and not at.error
    download = at.get("download_button")
    assert download and download[0].label.startswith(f"Download {run_id}")
    exported = next(Path(runs.run_dir(run_id), "export").glob("*.zip"))
    with zipfile.ZipFile(exported) as z:
        assert "model.safetensors" in z.namelist() and "model.onnx" not in z.namelist()

    at.file_uploader(key="pr_import").set_value(("../../evil name.zip", exported.read_bytes(), "application/zip")).run()
    at.button(key="pr_import_go").click().run()
    assert not at.exception and not at.error
    new_id = at.selectbox[0].value
    assert new_id != run_id and len(at.selectbox[0].options) == 2  # imported, selected, and the original still there
    # the upload's name is only a label: nothing lands outside the workspace's uploads folder
    assert all(p.is_relative_to(workspace_home / "uploads") for p in tmp_path.rglob("evil*"))
    at.file_uploader(key="pr_files").set_value(("r.png", png(COLORS["red"]), "image/png")).run()
    assert bars(at) == before  # same model, same answer (classes and probabilities to 0.1%)


def test_predict_export_with_onnx_and_fp16_shows_the_parity_check(tmp_path):
    run_id = train_tiny(tmp_path)
    at = open_page("pages/predict.py")
    at.checkbox(key="pr_fp16").check()
    at.button(key="pr_export").click().run()
    assert not at.exception and not at.error
    exported = next(Path(runs.run_dir(run_id), "export").glob("*-onnx-fp16.zip"))
    assert at.get("download_button")[0].label.startswith(f"Download {exported.name}")
    metric = next(m for m in at.metric if m.label.startswith("Parity"))
    assert 0 < float(metric.value) < 1e-2  # fp16 weights: a small, non-zero difference, measured on the file
    assert "validation images" in metric.help


# ----------------------------------------------------------------------------- runs
def test_runs_lists_compares_and_deletes_with_confirmation(tmp_path):
    run_id = train_tiny(tmp_path)
    at = open_page("pages/runs.py")
    assert not at.exception
    df = at.dataframe[0].value
    row = df.set_index("id").loc[run_id]
    assert row["dataset"] == "tiny" and row["backbone"] == "resnet18" and row["strategy"] == "linear"
    assert row["status"] == "done" and row["epochs"] == "1/1" and 0 <= row["best val acc"] <= 1
    assert at.multiselect(key="rn_compare").value == [run_id] and len(at.get("plotly_chart")) == 2
    at.button(key="rn_delete").click().run()
    assert any("cannot be undone" in w.value for w in at.warning)
    assert runs.list_runs("finetune")  # nothing deleted before the confirmation
    at.button(key="rn_no").click().run()
    assert runs.list_runs("finetune") and not at.warning
    at.button(key="rn_delete").click().run()
    at.button(key="rn_yes").click().run()
    assert not at.exception
    assert runs.list_runs("finetune") == [] and not Path(runs.run_dir(run_id)).exists()
    assert "No runs yet" in at.info[0].value


def test_runs_resume_interrupted(tmp_path):
    run_id = train_tiny(tmp_path)
    runs.set_status(run_id, "interrupted")
    at = open_page("pages/runs.py")
    at.button(key="rn_resume").click().run()
    assert not at.exception
    assert jobs.get_manager().wait(run_id, timeout=300) == "done"


def test_runs_show_no_none_for_an_imported_model_and_time_trained_for_a_resumed_run(tmp_path):
    from engine.core import workspace
    from engine.vision import export

    run_id = train_tiny(tmp_path)
    imported = export.import_model(export.export_run(runs.run_dir(run_id), tmp_path / "m.zip", onnx=False))
    # a resumed run: started long before it finished (the gap between its sessions is not training)
    with workspace.db() as db:
        db.execute("UPDATE runs SET started = started - 1000 WHERE id = ?", (run_id,))
    at = open_page("pages/runs.py")
    df = at.dataframe[0].value.set_index("id")
    for col in ("best val acc", "duration", "img/s"):
        assert df[col].dtype.kind == "f", col  # numeric: a missing value is empty, never the word "None"
    assert df.loc[imported, "strategy"] == "imported"
    assert df.loc[run_id, "duration"] == pytest.approx(runs.get(run_id)["summary"]["seconds"])


def test_runs_show_image_speed_only_where_images_were_trained_on(tmp_path):
    # a linear run trains its head on cached features: an "img/s" there (50,000) is not comparable with a
    # full run's (11); the table shows the speed of training on images only
    run_id = train_tiny(tmp_path)
    at = open_page("pages/runs.py")
    row = at.dataframe[0].value.set_index("id").loc[run_id]
    assert row["img/s"] is None or row["img/s"] != row["img/s"]  # empty (None / NaN)
    assert list(at.dataframe[0].value.columns).index("status") < list(at.dataframe[0].value.columns).index("img/s")


def test_a_runs_model_is_loaded_once_and_again_when_its_weights_change(tmp_path):
    """Every session shares one loaded model per run; a resumed run's new weights load afresh."""
    import os

    from pages.common import model_for

    run = runs.get(train_tiny(tmp_path))
    first = model_for(run)
    assert model_for(run) is first
    weights = Path(run["dir"]) / "model.safetensors"
    os.utime(weights, (weights.stat().st_atime, weights.stat().st_mtime + 5))
    assert model_for(run) is not first
