"""Browser tests: a real `streamlit run app.py` server driven by Debian's Chromium via Playwright.

Fixtures:
  app_url          base URL of a server on a free port with its own empty workspace (session-wide)
  app_workspace    that workspace folder (to prepare data through the engine before a test)
  browser          one headless Chromium for the session
  page             a fresh page (own context) per test
  fresh_page(browser)  the same as a context manager, for a test with a server of its own
Helpers:
  wait_for_idle(page)        wait until Streamlit has finished running the script
  choose(page, box, option)  pick an option from a selectbox, opening it again if a rerun closed it
  open_generate(page, url, prompt)  Generate text with the mini model loaded and a prompt typed
  screenshot(page, name)     save test-artifacts/<name>.png
  tall_screenshot(page, name) the same with a tall window (Streamlit scrolls inside its main block)
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]


def pytest_collection_modifyitems(items):
    """Every test in this folder is a browser test: `-m "not e2e"` leaves them out."""
    here = Path(__file__).parent
    for item in items:
        if Path(item.fspath).is_relative_to(here):
            item.add_marker(pytest.mark.e2e)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError("streamlit did not become healthy")


@pytest.fixture(scope="session")
def app_workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e-workspace")


@contextlib.contextmanager
def streamlit_server(workspace: Path, log_name: str = "server.log", env: dict | None = None):
    """`streamlit run app.py` on a free port with its own workspace (and extra environment); yields its base URL."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: apt-get install chromium")
    port = _free_port()
    env = dict(os.environ, TRANSFER_STUDIO_HOME=str(workspace), PYTHONUNBUFFERED="1", **(env or {}))
    log = open(workspace / log_name, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(workspace / log_name, ARTIFACTS / log_name)


@pytest.fixture(scope="session")
def app_url(app_workspace):
    with streamlit_server(app_workspace) as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    pg = context.new_page()
    pg.set_default_timeout(90_000)  # generous: CI machines have 2 cores
    yield pg
    context.close()


@contextlib.contextmanager
def fresh_page(browser, width: int = 1400, height: int = 1000):
    """A page in a browser context of its own (its own session), closed afterwards."""
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.set_default_timeout(90_000)  # generous: CI machines have 2 cores
    try:
        yield page
    finally:
        context.close()


def wait_for_idle(page, timeout: float = 60_000) -> None:
    """Wait for the app to render and for Streamlit's 'running' indicator to go away."""
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout)
    page.wait_for_function(
        "() => !document.querySelector(\"[data-testid='stStatusWidget']\")"
        " || !document.querySelector(\"[data-testid='stStatusWidget']\").innerText.includes('Running')",
        timeout=timeout,
    )
    page.wait_for_timeout(300)  # let the last delta paint


def choose(page, box, option, attempts: int = 4) -> None:
    """Pick `option` (a name or a pattern) from the selectbox `box`. A rerun that lands between opening the list
    and clicking in it (the page's own polling, another session's job changing state) closes the list again:
    open it again rather than wait the page's whole timeout on a list that is gone."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(attempts):
        box.click()
        try:
            page.get_by_role("option", name=option).click(timeout=10_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")
            wait_for_idle(page)


def open_generate(page, app_url: str, prompt: str) -> None:
    """The Generate text page with the bundled mini model loaded and `prompt` typed in (not yet generated)."""
    page.goto(f"{app_url}/generate")
    wait_for_idle(page)
    page.get_by_text(re.compile(r"mini-gpt2 .* parameters · context 256 tokens")).wait_for(timeout=90_000)
    page.get_by_role("textbox", name="Prompt").fill(prompt)
    page.get_by_role("textbox", name="Prompt").press("Control+Enter")
    wait_for_idle(page)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def tall_screenshot(page, name: str, height: int = 2000) -> Path:
    """Streamlit scrolls inside its main block, so a full-page shot needs a tall window."""
    size = page.viewport_size
    page.set_viewport_size({"width": size["width"], "height": height})
    page.wait_for_timeout(500)
    path = screenshot(page, name)
    page.set_viewport_size(size)
    return path
