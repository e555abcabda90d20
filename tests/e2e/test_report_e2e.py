"""The shareable report opens from disk in Chromium with the network off, and its charts render."""
import json

from engine import report
from engine.vision import finetune
from engine.vision.config import FinetuneConfig
from tests.e2e.conftest import ARTIFACTS
from tests.imgs import class_folder


def test_report_renders_offline_with_the_runs_numbers(browser, tmp_path):
    data = class_folder(tmp_path / "data", n=6)
    run_dir = tmp_path / "run"
    finetune.finetune(FinetuneConfig(data=str(data), weights="none", epochs=2, image_size=32), run_dir)
    out = report.write_report(run_dir, tmp_path / "report.html")
    text = out.read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    best = max(m["val_acc"] for m in metrics)
    assert f"{best:.1%}" in text  # the run's actual best accuracy

    context = browser.new_context(offline=True)
    requests = []
    context.on("request", lambda r: requests.append(r.url))
    page = context.new_page()
    page.goto(out.as_uri())
    page.wait_for_selector(".js-plotly-plot .main-svg")
    assert page.locator(".js-plotly-plot").count() == 2  # curves + confusion matrix
    assert page.locator("text=Misclassified validation images").count() == 1
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    context.close()
