"""In the browser: generate with the bundled mini GPT-2 and see text + tokens/s; fine-tune it on a tiny text."""
import re

from tests.e2e.conftest import open_generate, screenshot, tall_screenshot, wait_for_idle

TEXT = "\n".join([
    "The captain looked at the sea and said: the ship will sail at dawn.",
    "The sailors sang a song about the wind, the rain and the long road home.",
    "At night the stars were bright over the harbour and the old lighthouse.",
    "The captain wrote in his log: calm sea, fair wind, all hands on deck.",
] * 6)



def sample_text(page) -> str:
    return page.get_by_test_id("stMarkdownContainer").filter(has_text=re.compile(r"^The meaning of life is")).first.inner_text()


def test_generate_with_the_mini_model(app_url, page):
    open_generate(page, app_url, "The meaning of life is")
    page.get_by_role("button", name="Generate", exact=True).click()
    stats = page.get_by_text(re.compile(r"tokens/s · \d+ new tokens"))
    stats.wait_for(timeout=120_000)
    wait_for_idle(page)
    assert re.search(r"[\d.]+ tokens/s", stats.inner_text())
    assert page.get_by_text("The meaning of life is").count() >= 1
    page.get_by_text("Perplexity of the generated text").wait_for(timeout=30_000)
    tall_screenshot(page, "text-1-generate")

    # the same seed again gives the same text
    seed = re.search(r"seed (\d+)", stats.inner_text()).group(1)
    first = sample_text(page)
    page.get_by_role("button", name="Reuse this seed").click()
    wait_for_idle(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_timeout(500)
    wait_for_idle(page, timeout=120_000)
    page.get_by_text(re.compile(rf"seed {seed}")).first.wait_for()
    again = sample_text(page)
    assert again == first


def test_finetune_on_a_tiny_text(app_url, page):
    page.goto(f"{app_url}/text_finetune")
    wait_for_idle(page)
    page.get_by_role("textbox", name="…or paste text").fill(TEXT)
    page.get_by_role("textbox", name="…or paste text").press("Control+Enter")
    wait_for_idle(page)
    page.get_by_role("button", name="Start fine-tuning").click()
    page.wait_for_url(re.compile(r"[?&]run="))
    screenshot(page, "text-2-finetune-live")
    page.get_by_text("Perplexity after").wait_for(timeout=240_000)
    wait_for_idle(page)
    before = float(page.get_by_test_id("stMetric").filter(has_text="Perplexity before").get_by_test_id("stMetricValue").inner_text())
    after = float(page.get_by_test_id("stMetric").filter(has_text="Perplexity after").get_by_test_id("stMetricValue").inner_text())
    assert after < before
    assert page.get_by_text("Fine-tuned", exact=True).is_visible()
    tall_screenshot(page, "text-3-finetune-results")

    # the fine-tuned model is offered on the Generate page
    page.goto(f"{app_url}/generate")
    wait_for_idle(page)
    page.get_by_test_id("stSelectbox").filter(has_text="Model").click()
    assert page.get_by_role("option", name=re.compile("fine-tuned")).count() == 1
