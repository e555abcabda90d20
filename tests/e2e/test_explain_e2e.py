"""Why it works, in the browser: the dataset map (pretrained vs random), where the model looked on a
prediction, and the first-layer filters and feature maps in the Lab."""
from pathlib import Path

from playwright.sync_api import expect

from tests.e2e.conftest import fresh_page, screenshot, streamlit_server, tall_screenshot, wait_for_idle


def test_map_heatmap_and_filters(browser, workspace_home, tmp_path):
    from engine.data import sample
    from engine.models import sources
    from engine.vision import export, finetune
    from engine.vision.config import FinetuneConfig

    workspace_home.mkdir(parents=True, exist_ok=True)
    dataset = sample.load_sample()["dataset"]
    finetune.finetune(FinetuneConfig(data=dataset, strategy="linear"), tmp_path / "run")
    export.import_model(export.export_run(tmp_path / "run", tmp_path / "model.zip", onnx=False))  # a model for Predict
    photo = sorted((sources.ASSETS / "sample" / "apple").iterdir())[0]
    with streamlit_server(workspace_home, "explain-server.log") as url:
        with fresh_page(browser) as page:
            page.goto(f"{url}/images")
            wait_for_idle(page)
            page.get_by_role("tab", name="Map").click()
            page.get_by_role("button", name="Draw the map").click()
            page.set_viewport_size({"width": 1400, "height": 1500})
            expect(page.get_by_test_id("stMetricLabel").filter(has_text="Random weights")).to_be_visible(timeout=60_000)
            wait_for_idle(page)
            expect(page.locator(".js-plotly-plot:visible").first).to_be_visible()
            screenshot(page, "explain-1-map")
            page.set_viewport_size({"width": 1400, "height": 1000})

            page.goto(f"{url}/predict")
            wait_for_idle(page)
            page.get_by_text("Show where the model looked").click()
            wait_for_idle(page)
            page.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(str(photo))
            expect(page.get_by_text("looked for")).to_be_visible(timeout=60_000)
            wait_for_idle(page)
            tall_screenshot(page, "explain-2-heatmap")

            page.goto(f"{url}/lab")
            wait_for_idle(page)
            page.get_by_role("tab", name="Inside the network").click()
            expect(page.get_by_text("random weights", exact=True)).to_be_visible()
            expect(page.get_by_text("layer4 · 512 maps")).to_be_visible()
            tall_screenshot(page, "explain-3-inside", height=2600)
    assert Path(photo).is_file()
