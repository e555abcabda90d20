"""The showcase: open the Transfer Lab, run "pretrained vs scratch" on the sample and watch both curves."""
import re

from tests.e2e.conftest import tall_screenshot, wait_for_idle


def test_pretrained_vs_scratch_curves(app_url, app_workspace, page, monkeypatch):
    from engine.data import sample

    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(app_workspace))  # the server's workspace
    sample.load_sample()

    page.goto(f"{app_url}/lab")
    wait_for_idle(page)
    page.get_by_role("tab", name="Pretrained vs scratch", exact=True).wait_for()
    tall_screenshot(page, "lab-0-open")
    shown = page.get_by_test_id("stSelectbox").first.evaluate(
        "e => e.innerText + ' ' + Array.from(e.querySelectorAll('input')).map(i => i.value).join(' ')")
    assert "Fruit (sample)" in shown  # the sample is the default dataset
    # an even smaller setting than the quick preset (a CPU shared with other jobs), through the page's own options
    page.get_by_text("Options").click()
    for label, value in (("Epochs (0 = preset)", "2"), ("Seeds to average (0 = preset)", "2")):
        box = page.get_by_label(label)
        box.fill(value)
        box.press("Enter")
        wait_for_idle(page)
    tall_screenshot(page, "lab-1-start")
    page.get_by_role("button", name="Run it").first.click()

    # live: the progress bar and the curves appear while it trains (polled by the page itself)
    page.get_by_text(re.compile(r"run \d/4 · ")).first.wait_for(timeout=120_000)
    chart = page.locator(".js-plotly-plot").filter(has_text="Accuracy on images it never trained on")
    chart.first.wait_for(timeout=120_000)
    tall_screenshot(page, "lab-2-running")
    # finished (the one-line readings appear only then): both curves, the three numbers beside them
    page.get_by_text(re.compile(r"^After one epoch the pretrained network is at \d+%")).wait_for(timeout=300_000)
    wait_for_idle(page)
    chart = page.locator(".js-plotly-plot").filter(has_text="Accuracy on images it never trained on").first
    assert chart.get_by_text(re.compile(r"^pretrained: ")).count() >= 1
    assert chart.get_by_text("from scratch (random weights)").count() >= 1
    for words in ("Higher start", "Higher slope", "Higher asymptote"):
        assert page.get_by_text(words).first.is_visible()
    assert page.get_by_text(re.compile(r"points vs scratch")).count() == 3
    assert page.get_by_role("button", name="Cancel").count() == 0
    page.wait_for_timeout(2500)  # the page redraws once more when the job's record says done
    wait_for_idle(page)
    tall_screenshot(page, "lab-3-done")
    # the finished experiment is labelled as such without a reload, and never as still running
    page.get_by_text(re.compile(r"^Done: 4 training runs in \d+ s\.")).wait_for(timeout=30_000)
    results = page.get_by_test_id("stSelectbox").filter(has_text="Results").first
    shown = results.evaluate("e => e.innerText + ' ' + Array.from(e.querySelectorAll('input')).map(i => i.value).join(' ')")
    assert "Fruit (sample)" in shown and "running" not in shown
