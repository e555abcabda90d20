"""A new user builds a two-class dataset in the browser."""
from tests.e2e.conftest import choose, screenshot, wait_for_idle
from tests.imgs import png


def _add_class(page, name, color, tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"{name}{i}.png"
        f.write_bytes(png(color, (48, 48), seed=i))
        files.append(str(f))
    choose(page, page.get_by_test_id("stSelectbox").filter(has_text="Class").first, "➕ New class…")
    page.get_by_label("New class name").fill(name)
    page.get_by_label("New class name").press("Enter")
    wait_for_idle(page)
    # the previous upload's widget is replaced by a fresh one; wait until only the fresh one is left
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stFileUploaderDropzoneInput']\").length === 1")
    page.locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(files)
    page.get_by_role("button", name=f"Add 3 file(s) to {name}").click()
    wait_for_idle(page)
    page.get_by_text("3 of 3 files added.").wait_for()


def test_upload_two_classes_and_see_counts(app_url, page, tmp_path):
    page.goto(f"{app_url}/images")
    wait_for_idle(page)
    page.get_by_role("button", name="New dataset").click()
    page.get_by_label("Name").fill("Colours")
    page.get_by_role("button", name="Create").click()
    wait_for_idle(page)
    _add_class(page, "red", (220, 30, 30), tmp_path)
    _add_class(page, "blue", (30, 30, 220), tmp_path)
    page.get_by_role("tab", name="Browse").click()
    wait_for_idle(page)
    page.get_by_text("6 images in 2 classes").wait_for()
    assert page.locator("[data-testid='stImage']").count() >= 3
    screenshot(page, "images-two-classes")
