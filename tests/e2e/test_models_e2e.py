"""The Models page downloads a small model from a local stand-in for the weight hosts: the progress bar
is watched until it reaches 100%, the model is then on this machine, and the page says so."""
import re

from playwright.sync_api import expect

from tests.e2e.conftest import choose, fresh_page, screenshot, streamlit_server, wait_for_idle
from tests.text_helpers import make_tiny_lm
from tests.weights_server import WeightsServer

# every value a progress bar shows, as the page repaints (a download of small files passes quickly)
WATCH_BARS = """() => { window.seen = [];
  new MutationObserver(() => document.querySelectorAll('[role=progressbar]').forEach(b => {
      const v = Number(b.getAttribute('aria-valuenow')); if (!Number.isNaN(v)) window.seen.push(v); }))
    .observe(document.body, {subtree: true, childList: true, attributes: true}); }"""


def test_download_a_model_through_the_models_page(browser, tmp_path):
    weights = WeightsServer()
    weights.add_hub_folder("distilgpt2", make_tiny_lm(tmp_path / "tiny"))
    weights.delay = 1.0  # one second per 64 KB chunk: every file's bar rests at 100% before the next begins
    (tmp_path / "ws").mkdir()
    env = {"TRANSFER_STUDIO_MODELS_URL": weights.url, "TRANSFER_STUDIO_OFFLINE": "0", "HF_HUB_OFFLINE": "0",
           "HF_HUB_CACHE": str(tmp_path / "hub"), "TORCH_HOME": str(tmp_path / "torch")}
    try:
        with streamlit_server(tmp_path / "ws", "models-server.log", env=env) as url:
            with fresh_page(browser) as page:
                page.goto(f"{url}/models")
                wait_for_idle(page)
                expect(page.get_by_text("Network: online")).to_be_visible()
                choose(page, page.get_by_role("combobox", name="Model"), re.compile(r"^distilgpt2"))
                wait_for_idle(page)
                page.evaluate(WATCH_BARS)
                page.get_by_role("button", name="Download", exact=True).click()
                expect(page.get_by_text(re.compile(r"distilgpt2: .* of .*(KB|MB)"))).to_be_visible(timeout=30_000)
                screenshot(page, "models-downloading")
                expect(page.get_by_text("distilgpt2 is on this machine")).to_be_visible(timeout=60_000)
                seen = page.evaluate("window.seen")
                assert seen and max(seen) == 100, seen
                expect(page.get_by_role("combobox", name="Delete a downloaded or imported model")).to_have_value("distilgpt2")
                screenshot(page, "models-downloaded")
    finally:
        weights.close()
    assert (tmp_path / "hub" / "models--distilgpt2" / "refs" / "main").is_file()
