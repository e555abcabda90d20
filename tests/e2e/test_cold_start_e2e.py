"""A server's very first request: nothing is lost and nothing odd is shown.

A fresh server's first script run goes through Streamlit's legacy pages/-folder mode before app.py's
st.navigation takes over (pages/__init__.py hands a deep link over to app.py). These tests start a
new server for every try and act at once, as a person opening a bookmark would.
"""
import os
import subprocess
import sys

from tests.e2e.conftest import ROOT, screenshot, streamlit_server
from tests.imgs import png

# records every sidebar navigation label the page ever shows, from the first paint on
WATCH_SIDEBAR = """
window.__navSeen = [];
new MutationObserver(() => {
  document.querySelectorAll("[data-testid='stSidebarNav'] a").forEach(a => {
    const t = a.innerText.trim().split("\\n").pop();
    if (t && !window.__navSeen.includes(t)) window.__navSeen.push(t);
  });
}).observe(document, {subtree: true, childList: true, characterData: true});
"""
SEED = ("from engine.data import imagedata; from tests.imgs import png; imagedata.create_dataset('Colours'); "
        "imagedata.add_images('Colours', 'red', [('a.png', png((200, 20, 20), (48, 48), seed=9))])")


def test_the_first_upload_on_a_fresh_server_is_never_lost(browser, tmp_path):
    files = []
    for i in range(3):
        f = tmp_path / f"red{i}.png"
        f.write_bytes(png((220, 30, 30), (48, 48), seed=i))
        files.append(str(f))
    for attempt in range(5):
        workspace = tmp_path / f"ws{attempt}"
        workspace.mkdir()
        subprocess.run([sys.executable, "-c", SEED], cwd=ROOT, check=True,
                       env={**os.environ, "TRANSFER_STUDIO_HOME": str(workspace)})
        with streamlit_server(workspace, f"cold-start-{attempt}.log") as url:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            page.set_default_timeout(90_000)
            page.add_init_script(WATCH_SIDEBAR)
            page.goto(f"{url}/images")  # a bookmark, as the server's first request
            uploader = page.locator("[data-testid='stFileUploaderDropzoneInput']")
            uploader.wait_for(state="attached")
            uploader.set_input_files(files)  # the very first action: no waiting for the app to settle
            try:
                page.get_by_role("button", name="Add 3 file(s) to red").click()
                page.get_by_text("3 of 3 files added.").wait_for()
            except Exception:
                screenshot(page, f"cold-start-{attempt}")
                raise
            seen = page.evaluate("window.__navSeen")
            # only the app's own page titles, never the modules of pages/ (common, lab charts, ...)
            assert "Images" in seen and not {"common", "lab charts", "finetune options", "app"} & set(seen), seen
            context.close()
