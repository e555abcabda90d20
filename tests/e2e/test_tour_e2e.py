"""Presentation mode renders every step of the guided tour without an exception."""
from pages.tour import STEPS
from tests.e2e.conftest import screenshot, wait_for_idle


def test_every_tour_step_renders_in_presentation_mode(app_url, page):
    for i, (title, _) in enumerate(STEPS, start=1):
        page.goto(f"{app_url}/tour?present=1&step={i}")
        wait_for_idle(page)
        page.get_by_role("heading", name=title).wait_for()
        assert page.locator("[data-testid='stException']").count() == 0, f"step {i} raised"
        page.get_by_text(f"Step {i} of {len(STEPS)}").wait_for()
        if i == 1:
            screenshot(page, "tour-step-1")
    page.get_by_role("button", name="Back").click()
    wait_for_idle(page)
    page.get_by_role("heading", name=STEPS[-2][0]).wait_for()
