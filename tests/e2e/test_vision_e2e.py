"""A new user fine-tunes on the sample dataset, watches it learn, predicts and exports, in the browser."""
import re
import zipfile
from pathlib import Path

from engine.train import recipes
from tests.e2e.conftest import screenshot, tall_screenshot, wait_for_idle

ROOT = Path(__file__).resolve().parents[2]



def test_sample_finetune_predict_export(app_url, page, tmp_path):
    page.goto(f"{app_url}/images")
    wait_for_idle(page)
    page.get_by_role("button", name="Load sample dataset").click()
    # it says what arrived ("Loaded …", or "… is already here" when another test of this server loaded it)
    page.get_by_text(re.compile(r"'Fruit \(sample\)'.*160 images in 4 classes")).first.wait_for(timeout=90_000)
    wait_for_idle(page)

    # fine-tune: the defaults a new user gets (the recipe book's full fine-tuning), fewer epochs to keep the test short;
    # through the sidebar, which keeps the session: the form then defaults to the dataset just loaded, even
    # when other tests' datasets in the shared workspace are newer
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Fine-tune", exact=True).click()
    page.wait_for_url(re.compile(r"/finetune"))
    wait_for_idle(page)
    page.get_by_text("Training options").click()
    epochs = page.get_by_label("Epochs", exact=True)
    assert epochs.input_value() == str(recipes.vision_recipe(recipes.DEFAULT_STRATEGY, 128, 4).epochs)  # the recipe's, for 128 images
    epochs.fill("3")
    epochs.press("Enter")
    wait_for_idle(page)
    # which weights, and why, before training
    page.get_by_test_id("stAlert").filter(has_text=re.compile(r"Weights: mini \(bundled resnet18\)")).wait_for()
    tall_screenshot(page, "vision-1-form")
    page.get_by_role("button", name="Start fine-tuning").click()

    # the run id is in the URL; the status line follows the run by itself (it said "queued" for a whole run)
    page.wait_for_url(re.compile(r"[?&]run="))
    page.get_by_text(re.compile(r"^Run \S+ · running")).wait_for(timeout=60_000)
    # a refresh mid-run finds the run again
    page.reload()
    wait_for_idle(page)
    page.get_by_text(re.compile(r"Fruit \(sample\) · resnet18 · full")).first.wait_for()
    screenshot(page, "vision-2-live")  # usually mid-run: progress bar, metrics, Cancel
    # no more reloads: the results appear through the page's own polling
    page.get_by_text("Best validation accuracy").wait_for(timeout=120_000)
    wait_for_idle(page)
    page.locator(".js-plotly-plot").filter(has_text="Confusion matrix").wait_for()
    assert page.locator(".js-plotly-plot").filter(has_text="Loss").count() >= 1
    assert page.locator(".js-plotly-plot").filter(has_text="Accuracy").count() >= 1
    assert page.get_by_text("Per class (validation)").is_visible()
    tall_screenshot(page, "vision-3-results", 2600)

    # predict an image with the new model
    page.get_by_role("link", name="Try it on new images").click()
    wait_for_idle(page)
    image = ROOT / "assets" / "sample" / "banana" / "banana_000.jpg"
    page.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(str(image))
    wait_for_idle(page)
    page.get_by_test_id("stProgress").first.wait_for()  # the probability bars
    assert page.get_by_text(re.compile(r"^(apple|banana|lemon|strawberry) · \d+\.\d%$")).first.is_visible()
    tall_screenshot(page, "vision-4-predict")

    # export downloads a ZIP with the model and its ONNX twin
    page.get_by_role("tab", name="Export").click()
    page.get_by_role("button", name="Build export ZIP").click()
    wait_for_idle(page)
    with page.expect_download() as info:
        page.get_by_role("button", name=re.compile(r"^Download .*\.zip")).click()
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    with zipfile.ZipFile(path) as z:
        assert {"model.safetensors", "labels.json", "preprocessing.json", "model_card.md", "model.onnx"} <= set(z.namelist())
    screenshot(page, "vision-5-export")

    # the run is in the history
    page.goto(f"{app_url}/runs")
    wait_for_idle(page)
    page.get_by_text("Compare").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    assert page.get_by_text(re.compile(r"^Fruit \(sample\) · resnet18 · full · ")).first.is_visible()  # listed, picked to compare
    tall_screenshot(page, "vision-6-runs")
