"""Two browser sessions at once against one server: both upload a dataset, both start fine-tuning, a third
generates text meanwhile. The runs queue on the one CPU worker, each session watches only its own run, nothing
deadlocks and both runs finish with the epochs and data they were given."""
import re
import time
from urllib.parse import parse_qs, urlparse

from playwright.sync_api import expect

from engine.core import runs
from engine.train import recipes
from tests.e2e.conftest import choose, open_generate, screenshot, wait_for_idle
from tests.imgs import png, zip_bytes

EPOCHS = 8  # long enough that text generated meanwhile lands while a run is still going
SIZE = 96  # px: full fine-tuning slow enough per epoch that the second run really waits
# Two sessions, each with its own dataset name, classes and colours.
SESSIONS = {
    "a": {"dataset": "Warm session A", "classes": {"red": (220, 30, 30), "orange": (240, 150, 20)}},
    "b": {"dataset": "Cool session B", "classes": {"blue": (30, 30, 220), "green": (30, 190, 40)}},
}


def new_page(browser):
    """A separate browser context: its own cookies and websocket, i.e. its own Streamlit session."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(90_000)
    return context, page


def dataset_zip(tmp_path, spec: dict):
    """A ZIP of two class folders with 10 noisy solid-colour 40 px PNGs each."""
    entries = {f"{c}/{c}{i}.png": png(color, (40, 40), seed=i) for c, color in spec["classes"].items() for i in range(10)}
    path = tmp_path / f"{spec['dataset'].replace(' ', '_')}.zip"
    path.write_bytes(zip_bytes(entries))
    return path


def create_dataset(page, name: str) -> None:
    page.get_by_role("button", name="New dataset").click()
    page.get_by_label("Name", exact=True).fill(name)
    page.get_by_role("button", name="Create").click()
    wait_for_idle(page)
    expect(page.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(name, timeout=90_000)


def upload_zip(page, path) -> None:
    page.get_by_text("ZIP of class folders").click()
    wait_for_idle(page)
    # the per-class uploader is replaced by the ZIP one; wait until only the ZIP one is left
    page.get_by_test_id("stFileUploader").filter(has_text="ZIP file").wait_for()
    page.wait_for_function("document.querySelectorAll(\"[data-testid='stFileUploaderDropzoneInput']\").length === 1")
    page.get_by_test_id("stFileUploader").filter(has_text="ZIP file").locator("[data-testid='stFileUploaderDropzoneInput']").set_input_files(str(path))
    page.get_by_role("button", name="Import ZIP").click()
    wait_for_idle(page)
    page.get_by_text("20 of 20 files added.").wait_for()


def prepare_finetune(page, dataset: str) -> None:
    """Full fine-tuning, EPOCHS epochs at SIZE px, through the page's own options."""
    # through the sidebar, which keeps the session (a page.goto would open a new one)
    page.get_by_test_id("stSidebarNav").get_by_role("link", name="Fine-tune", exact=True).click()
    page.wait_for_url(re.compile(r"/finetune"))
    wait_for_idle(page)
    # the form defaults to the dataset this session just built, not to the other session's newer one
    expect(page.get_by_role("combobox", name="Dataset", exact=True)).to_have_value(f"{dataset} · 2 classes · 20 images", timeout=90_000)
    page.get_by_test_id("stRadio").filter(has_text="Strategy").get_by_text("full", exact=True).click()
    wait_for_idle(page)
    page.get_by_text("Training options").click()
    # each strategy has its own widgets, starting at its recipe's values: wait until full's alone are left
    page.wait_for_function("""() => { const e = document.querySelectorAll("input[aria-label='Epochs']");
                                      return e.length === 1 && e[0].value === '%d'; }""" % recipes.vision_recipe("full", 16, 2).epochs)
    epochs = page.get_by_label("Epochs", exact=True)
    epochs.fill(str(EPOCHS))
    epochs.press("Enter")
    wait_for_idle(page)
    choose(page, page.get_by_role("combobox", name="Image size", exact=True), f"{SIZE} px")
    wait_for_idle(page)
    expect(epochs).to_have_value(str(EPOCHS))
    expect(page.get_by_role("combobox", name="Image size", exact=True)).to_have_value(f"{SIZE} px")
    page.get_by_text(re.compile(rf"Images are used at {SIZE} px")).wait_for()


def run_id_of(page) -> str:
    page.wait_for_url(re.compile(r"[?&]run="))
    return parse_qs(urlparse(page.url).query)["run"][0]


def heading(page, dataset: str):
    return page.get_by_test_id("stHeading").filter(has_text=re.compile(rf"^{re.escape(dataset)} · resnet18 · full$"))


def test_two_sessions_upload_train_and_generate_at_once(app_url, app_workspace, browser, tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(app_workspace))  # the server's workspace, read through the engine
    # the server is shared with the other browser tests: start when its worker has nothing else queued
    deadline = time.time() + 180
    while any(r["status"] in runs.ACTIVE for r in runs.list_runs()) and time.time() < deadline:
        time.sleep(1)
    t0 = time.time()
    contexts, pages = [], {}
    try:
        for s in ("a", "b", "c"):
            ctx, pages[s] = new_page(browser)
            contexts.append(ctx)
        a, b, c = pages["a"], pages["b"], pages["c"]

        # 1. both sessions upload their own dataset, step by step in turn
        for s in "ab":
            pages[s].goto(f"{app_url}/images")
            wait_for_idle(pages[s])
        print(f"{time.time() - t0:.0f} s: pages open", flush=True)
        for s in "ab":
            create_dataset(pages[s], SESSIONS[s]["dataset"])
        print(f"{time.time() - t0:.0f} s: datasets created", flush=True)
        for s in "ab":
            upload_zip(pages[s], dataset_zip(tmp_path, SESSIONS[s]))
        print(f"{time.time() - t0:.0f} s: uploaded", flush=True)

        # 2. both prepare the form; a third session opens Generate text (the model loads before training starts)
        for s in "ab":
            prepare_finetune(pages[s], SESSIONS[s]["dataset"])
        open_generate(c, app_url, "The two ships sailed")
        print(f"{time.time() - t0:.0f} s: forms ready", flush=True)

        # ...then start one right after the other: the second waits behind the first on the cpu worker
        # (B clicks once A's run exists: two clicks in a row may reach the server in either order)
        a.get_by_role("button", name="Start fine-tuning").click()
        ids = {"a": run_id_of(a)}
        b.get_by_role("button", name="Start fine-tuning").click()
        ids["b"] = run_id_of(b)
        assert ids["a"] != ids["b"]
        b.get_by_text("Queued — starts next.").wait_for(timeout=30_000)
        assert runs.get(ids["b"])["status"] == "queued"
        heading(b, SESSIONS["b"]["dataset"]).wait_for()
        b.get_by_text(re.compile(rf"^Run {ids['b']} · queued")).wait_for()
        heading(a, SESSIONS["a"]["dataset"]).wait_for()
        a.get_by_test_id("stProgress").wait_for(timeout=30_000)  # A's own progress while B waits
        # A was queued for the moment before the worker took it; its page shows that until its next poll
        expect(a.get_by_text("Queued — starts next.")).to_have_count(0, timeout=30_000)
        screenshot(b, "two-browsers-1-b-queued")
        print(f"{time.time() - t0:.0f} s: started", flush=True)

        # 3. generation while a training job runs still answers (it does not go through the job queue)
        active = [runs.get(i)["status"] for i in ids.values()]
        assert "running" in active, f"both runs already left the worker before generating: {active}"
        c.get_by_role("button", name="Generate", exact=True).click()
        stats = c.get_by_text(re.compile(r"tokens/s · \d+ new tokens"))
        stats.wait_for(timeout=120_000)
        gen_done = {k: runs.get(i)["status"] for k, i in ids.items()}
        assert int(re.search(r"(\d+) new tokens", stats.inner_text()).group(1)) > 0
        assert c.get_by_text("The two ships sailed").count() >= 1  # the prompt, shown with its continuation
        assert set(gen_done.values()) & set(runs.ACTIVE), f"training had ended before the text came: {gen_done}"
        screenshot(c, "two-browsers-2-generate-during-training")
        screenshot(a, "two-browsers-2-a-mid-run")
        print(f"{time.time() - t0:.0f} s: generated", flush=True)

        # 4. both reach their results, each in its own page, through the page's own polling
        for s in "ab":
            pages[s].get_by_text("Best validation accuracy").wait_for(timeout=180_000)
            wait_for_idle(pages[s])
        for s, other in (("a", "b"), ("b", "a")):
            page = pages[s]
            assert run_id_of(page) == ids[s]
            assert heading(page, SESSIONS[s]["dataset"]).count() == 1
            assert heading(page, SESSIONS[other]["dataset"]).count() == 0
            page.get_by_text(re.compile(rf"^Run {ids[s]} · done")).wait_for()
            assert page.get_by_text(ids[other]).count() == 0  # nothing of the other session's run
            page.locator(".js-plotly-plot").filter(has_text="Confusion matrix").wait_for()
            screenshot(page, f"two-browsers-3-{s}-results")

        # the engine's record: both done, with the epochs and the dataset each session chose
        for s, run_id in ids.items():
            run = runs.get(run_id)
            assert run["status"] == "done", run["error"]
            assert run["config"]["data"] == SESSIONS[s]["dataset"]
            assert (run["config"]["epochs"], run["config"]["strategy"], run["config"]["image_size"]) == (EPOCHS, "full", SIZE)
            assert run["summary"]["epochs_done"] == EPOCHS
            assert run["summary"]["classes"] == sorted(SESSIONS[s]["classes"])
        first, second = runs.get(ids["a"]), runs.get(ids["b"])
        assert first["finished"] <= second["started"] + 1e-3  # one cpu worker: B started after A was finished
        print(f"runs {ids}; status when the generated text was shown: {gen_done}; test took {time.time() - t0:.0f} s")
    except Exception:
        for s, page in pages.items():  # what each session showed when it failed
            screenshot(page, f"two-browsers-failed-{s}")
        raise
    finally:
        for ctx in contexts:
            ctx.close()
