"""Live camera in Chromium with a fake camera (a generated video: an apple, then a banana, looping):
the top-1 prediction on the Predict page's live video follows what the camera shows."""
import time

from playwright.sync_api import expect

from tests.e2e.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, streamlit_server, wait_for_idle
from tests.e2e.fake_camera import write_y4m


def test_live_predictions_follow_the_camera(browser, workspace_home, tmp_path):
    from engine.data import sample
    from engine.models import sources
    from engine.vision import export, finetune
    from engine.vision.config import FinetuneConfig

    workspace_home.mkdir(parents=True, exist_ok=True)
    dataset = sample.load_sample()["dataset"]
    finetune.finetune(FinetuneConfig(data=dataset, strategy="linear"), tmp_path / "run")
    export.import_model(export.export_run(tmp_path / "run", tmp_path / "model.zip", onnx=False))
    video = write_y4m([sorted((sources.ASSETS / "sample" / c).iterdir())[0] for c in ("apple", "banana")], tmp_path / "camera.y4m")
    camera = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", f"--use-file-for-fake-video-capture={video}",
              "--disable-features=WebRtcHideLocalIpsWithMdns"]  # (host candidates by address: nothing to resolve offline)
    with streamlit_server(workspace_home, "live-server.log") as url:
        # a Chromium of its own (the camera flags), from the session's Playwright
        camera_browser = browser.browser_type.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS + camera)
        try:
            page = camera_browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(90_000)
            page.goto(f"{url}/predict")
            wait_for_idle(page)
            page.get_by_role("tab", name="Camera").click()
            page.get_by_text("Live video").click()
            wait_for_idle(page)
            page.frame_locator("iframe[title*='webrtc']").get_by_role("button", name="START").click()
            expect(page.get_by_text("predictions/s")).to_be_visible(timeout=60_000)
            seen, deadline = set(), time.time() + 30
            while time.time() < deadline and not {"apple", "banana"} <= seen:
                seen.update(page.locator("[data-testid='stMarkdownContainer'] strong").all_inner_texts())
                time.sleep(0.25)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "live-camera.png"))
            assert {"apple", "banana"} <= seen, seen  # the bars followed the camera from one fruit to the other
        finally:
            camera_browser.close()
