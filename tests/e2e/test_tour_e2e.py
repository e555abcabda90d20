"""Presentation mode: every step of the guided tour renders, fits a 1280x720 projector without
scrolling (with a finished run and a Lab comparison to show), and the mode survives navigation."""
from engine import demo, jobs
from engine.core import runs
from engine.data import sample
from engine.lab import experiments
from pages.tour import STEPS
from tests.e2e.conftest import screenshot, streamlit_server, wait_for_idle

# the main area's overflow: what a presenter would have to scroll
MAIN_OVERFLOW = """() => { const m = document.querySelector("[data-testid='stMain']");
  return m.scrollHeight - m.clientHeight; }"""


def toggle(page):
    return page.get_by_test_id("stSidebar").locator("input[type='checkbox']")  # the sidebar's one toggle


def _seed(workspace, monkeypatch) -> None:
    """What the tour shows: the sample, a short fine-tuning run and a short pretrained-vs-scratch comparison."""
    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(workspace))
    demo.prepare(epochs=3, generations=False, lab=False)
    run_id = experiments.submit(experiments.LabConfig("compare", data=sample.SAMPLE_NAME, epochs=3, seeds=1), jobs.get_manager())
    assert jobs.get_manager().wait(run_id, timeout=600) == "done", runs.get(run_id)["error"]


def test_every_tour_step_fits_a_projector_in_presentation_mode(browser, tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    _seed(workspace, monkeypatch)
    with streamlit_server(workspace, "tour-server.log") as url:
        context = browser.new_context(viewport={"width": 1280, "height": 720})
        page = context.new_page()
        page.set_default_timeout(90_000)
        for i, (title, _) in enumerate(STEPS, start=1):
            page.goto(f"{url}/tour?present=1&step={i}")
            wait_for_idle(page)
            page.get_by_role("heading", name=title).wait_for()
            page.wait_for_timeout(800)  # charts and images settle
            assert page.locator("[data-testid='stException']").count() == 0, f"step {i} raised"
            page.get_by_text(f"Step {i} of {len(STEPS)}").wait_for()
            screenshot(page, f"tour-step-{i}")
            assert page.evaluate(MAIN_OVERFLOW) <= 2, f"step {i} ({title}) scrolls at 1280x720"
            if i in (3, 4, 6):  # the steps with pictures of real results, not a "finish a run first" note
                assert page.locator("[data-testid='stPlotlyChart']").count() >= 1, f"step {i} has no chart"
        page.get_by_role("button", name="Back").click()
        wait_for_idle(page)
        page.get_by_role("heading", name=STEPS[-2][0]).wait_for()

        # the sidebar's links carry no query parameters: the mode must survive them
        page.get_by_test_id("stSidebarNav").get_by_role("link", name="Images").click()
        wait_for_idle(page)
        page.get_by_role("heading", name="Images").wait_for()
        page.wait_for_url("**/images?present=1")
        assert toggle(page).is_checked()
        page.reload()
        wait_for_idle(page)
        assert toggle(page).is_checked()  # the address keeps it
        page.get_by_text("Presentation mode").click()  # and it can be left
        wait_for_idle(page)
        assert "present" not in page.url
        context.close()
