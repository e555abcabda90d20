"""A presenter and an audience member in two browser contexts on one server with a presenter password:
the audience finds every costly control locked, a wrong password is refused, the right one unlocks the
presenter's session only, and what the presenter does the audience then sees."""
from playwright.sync_api import expect

from tests.e2e.conftest import screenshot, streamlit_server, wait_for_idle

PASSWORD = "room-42 presenter"


def new_page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(90_000)
    return context, page


def test_presenter_and_audience_on_one_server(browser, tmp_path):
    (tmp_path / "ws").mkdir()
    with streamlit_server(tmp_path / "ws", "roles-server.log", env={"TRANSFER_STUDIO_PRESENTER_PASSWORD": PASSWORD}) as url:
        (ac, audience), (pc, presenter) = new_page(browser), new_page(browser)
        try:
            for page in (audience, presenter):
                page.goto(f"{url}/images")
                wait_for_idle(page)
                expect(page.get_by_text("Role · audience")).to_be_visible()
                expect(page.get_by_role("button", name="Load sample dataset")).to_be_disabled()

            sidebar = presenter.get_by_test_id("stSidebar")
            sidebar.get_by_label("Presenter password").fill("not it")
            sidebar.get_by_role("button", name="Unlock").click()
            wait_for_idle(presenter)
            expect(presenter.get_by_text("Wrong password.")).to_be_visible()
            sidebar.get_by_label("Presenter password").fill(PASSWORD)
            sidebar.get_by_role("button", name="Unlock").click()
            wait_for_idle(presenter)
            expect(presenter.get_by_text("Role · presenter")).to_be_visible()
            presenter.get_by_role("button", name="Load sample dataset").click()
            wait_for_idle(presenter)
            expect(presenter.get_by_text("Loaded 'Fruit (sample)'")).to_be_visible()
            screenshot(presenter, "roles-presenter")

            audience.reload()
            wait_for_idle(audience)
            expect(audience.get_by_text("Role · audience")).to_be_visible()  # the unlock was the presenter's session only
            expect(audience.get_by_role("combobox", name="Dataset", exact=True)).to_have_value("Fruit (sample)", timeout=60_000)
            expect(audience.get_by_role("button", name="Load sample dataset")).to_be_disabled()
            audience.get_by_role("tab", name="Manage").click()
            expect(audience.get_by_role("button", name="Delete dataset")).to_be_disabled()
            screenshot(audience, "roles-audience")
        finally:
            ac.close()
            pc.close()
