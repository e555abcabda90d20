"""`python -m engine bench load`: many real browser sessions at once against one running app.

N Playwright contexts in one headless Chromium (each its own Streamlit session, as N phones would
be) open the app once, then loop for S seconds through: generate 40 tokens with the bundled mini
model -> Predict (the sidebar's link) -> upload a sample image -> see its prediction -> back to
Generate text (the sidebar's link). Timed from the click (or the upload) to the result on screen.
A person moves between pages with the sidebar, which keeps their session and its settings; a
reload per page (as an earlier version of this benchmark did) starts a new session each time and
makes every browser parse the app's JavaScript again. Meanwhile a fine-tuning job runs on the same
machine, at the lower CPU priority the app's job worker gives its jobs, and the server's resident
memory is sampled; the whole load runs twice on the same server, so growth from the first to the
second shows up.

In a room the browsers are the audience's phones and take none of the server's CPU; here they share its
machine, in one of three placements: all on the same cores (the default), the browsers on a core of their
own (`--apart`), or the browsers everywhere at the lowest priority (`--browsers-yield`).

The server is started here with its own workspace (the sample dataset and one quick linear run, so
Predict has a model), offline, with no presenter password (visitor limits are the roles' business,
measured without them here).
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from engine import jobs
from engine.bench import speed
from engine.core import workspace

ROOT = workspace.PROJECT
TOKENS = 40
HEAD = "## Load: many browser sessions on one server"
HEAD_APART = "## Load, the browsers on a core of their own"
HEAD_YIELD = "## Load, the browsers at the lowest priority"
ROOM = "in a room the browsers are the audience's phones, which take none of the server's CPU"


def _rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB (Linux /proc)."""
    total = 0
    pids = [pid]
    try:
        pids += [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        pass
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class Watch:
    """Calls sample() every `every` seconds in a thread while the `with` block runs, and once at its end."""

    every = 0.5

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.sample()


class MemoryWatch(Watch):
    """The peak resident memory of a process and its children."""

    def __init__(self, pid: int):
        super().__init__()
        self.pid, self.peak = pid, 0.0

    def sample(self) -> None:
        self.peak = max(self.peak, _rss_mb(self.pid))


def _cpu_seconds() -> dict[int, tuple[str, float]]:
    """User + system CPU seconds of every process so far, by pid (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            comm, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
            out[int(d.name)] = (comm, (int(rest[11]) + int(rest[12])) / tick)  # fields 14, 15: utime, stime
    return out


class CpuWatch(Watch):
    """Where the machine's CPU went during a round: the server, the browsers, the training job, the rest.
    Sampled each second, so processes that start and end inside the round are counted too."""

    every = 1.0

    def __init__(self, server: int, trainer: int | None):
        super().__init__()
        self.server, self.trainer = server, trainer
        self.start, self.last = _cpu_seconds(), {}

    def sample(self) -> None:
        self.last.update(_cpu_seconds())

    def by_group(self) -> dict[str, float]:
        groups: dict[str, float] = {}
        for pid, (comm, secs) in self.last.items():
            used = secs - self.start.get(pid, (comm, 0.0))[1]
            name = ("server" if pid == self.server else "training job" if pid == self.trainer else
                    "browsers" if "chrom" in comm.lower() or comm in ("node", "playwright") or pid == os.getpid() else "other")
            groups[name] = groups.get(name, 0.0) + used
        return {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


async def _visitor(browser, url: str, images: list[Path], seconds: float, record: dict) -> None:
    context = await browser.new_context(viewport={"width": 1200, "height": 900})
    page = await context.new_page()
    page.set_default_timeout(60_000)
    i = 0
    try:
        try:
            await page.goto(f"{url}/generate", timeout=180_000)
            await _idle(page, 180_000)
            await page.get_by_text("Sampling controls").wait_for(timeout=180_000)
            await _set_tokens(page)
        except Exception as err:  # noqa: BLE001 - a visitor who never got the page is an error, not a crash
            record["errors"].append(f"open: {type(err).__name__}")
            return
        until = time.monotonic() + seconds  # the visitor's clock starts once the page is ready
        while time.monotonic() < until:
            # generate: click -> a new result caption (every generation draws a fresh seed)
            try:
                result = page.get_by_text(re.compile(r"tokens/s · \d+ new tokens"))
                old = await result.inner_text() if await result.count() else ""
                t = time.perf_counter()
                await page.get_by_role("button", name="Generate", exact=True).click()
                await page.wait_for_function(
                    "old => [...document.querySelectorAll('[data-testid=stCaptionContainer]')]"
                    ".some(e => e.innerText.includes('new tokens') && e.innerText !== old)", arg=old, timeout=60_000)
                record["generate"].append(time.perf_counter() - t)
                caption = await result.first.inner_text()
                made = int(re.search(r"(\d+) new tokens", caption).group(1))
                record["model"].append(float(re.search(r"new tokens · ([\d.]+) s", caption).group(1)))  # the model's own time
                if made > TOKENS:  # fewer when the model ends its text early
                    record["errors"].append(f"generate: {made} tokens, not {TOKENS}")
            except Exception as err:  # noqa: BLE001 - every failure is counted, the visitor carries on
                record["errors"].append(f"generate: {type(err).__name__}")
            # predict: the sidebar's link, upload an image -> its top class on screen
            try:
                await _go(page, "Predict", "predict")
                image = images[i % len(images)]
                i += 1
                t = time.perf_counter()
                await page.locator("[data-testid='stFileUploaderDropzoneInput']").first.set_input_files(str(image))
                await page.get_by_text(image.name).first.wait_for(timeout=60_000)
                await page.get_by_test_id("stProgress").first.wait_for(timeout=60_000)  # its probability bars
                record["predict"].append(time.perf_counter() - t)
                if await page.get_by_text("Something went wrong").count():
                    record["errors"].append("predict: the page reported an error")
            except Exception as err:  # noqa: BLE001
                record["errors"].append(f"predict: {type(err).__name__}")
            try:
                await _go(page, "Generate text", "generate")
                shown = await (await _slider(page)).input_value()
                if shown != str(TOKENS):
                    record["errors"].append(f"generate: the page forgot its settings (Max new tokens {shown}, not {TOKENS})")
                    await _set_tokens(page)
            except Exception as err:  # noqa: BLE001
                record["errors"].append(f"navigate: {type(err).__name__}")
                await page.goto(f"{url}/generate")
                await _idle(page)
    finally:
        await context.close()


async def _slider(page):
    """The Max new tokens slider, its expander opened if it was closed."""
    slider = page.get_by_role("slider", name="Max new tokens")
    if not await slider.count() or not await slider.is_visible():
        await page.get_by_text("Sampling controls").click()  # the expander holding the slider
        await slider.wait_for()
    return slider


async def _set_tokens(page) -> None:
    """Max new tokens = TOKENS by keyboard, as a person with a keyboard would. Each key press reruns the
    page, and a press that lands mid-rerun can be lost: read the value back and press again until it is right."""
    slider = await _slider(page)
    for _ in range(6):
        now = int(await slider.input_value())
        if now == TOKENS:
            return
        await slider.focus()
        for _ in range(abs(TOKENS - now)):
            await slider.press("ArrowRight" if now < TOKENS else "ArrowLeft")
        await _idle(page)
        await page.wait_for_timeout(300)
    raise RuntimeError(f"the Max new tokens slider stays at {await slider.input_value()}, not {TOKENS}")


async def _go(page, link: str, path: str) -> None:
    """To another page through the sidebar's link: the same session, as a person clicks."""
    await page.get_by_test_id("stSidebarNav").get_by_role("link", name=link, exact=True).click()
    await page.wait_for_url(re.compile(rf"/{path}(\?|$)"))
    await _idle(page)


async def _idle(page, timeout: float = 60_000) -> None:
    await page.wait_for_selector("[data-testid='stApp']", timeout=timeout)
    await page.wait_for_function(
        "() => !document.querySelector(\"[data-testid='stStatusWidget']\")"
        " || !document.querySelector(\"[data-testid='stStatusWidget']\").innerText.includes('Running')", timeout=timeout)


async def _load(url: str, sessions: int, seconds: float, images: list[Path], chromium: str, warm_up: bool) -> dict:
    from playwright.async_api import async_playwright

    record = {"generate": [], "model": [], "predict": [], "errors": []}
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium, headless=True, args=args)
        if warm_up:  # the server's first visitor imports torch and loads the models: not what the load measures
            await _visitor(browser, url, images, 0.1, {"generate": [], "model": [], "predict": [], "errors": []})

        async def arrive(n: int) -> None:  # a room does not join in the same millisecond: one visitor every 0.5 s
            await asyncio.sleep(0.5 * n)
            await _visitor(browser, url, images, seconds, record)

        await asyncio.gather(*[arrive(n) for n in range(sessions)])
        await browser.close()
    return record


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    return round(statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1], 2) if len(xs) > 1 else round(xs[0], 2)


def browser_wrapper(chromium: str, cores: list[int] | None, lowest: bool) -> str:
    """A shell script that starts Chromium pinned to `cores` and/or with its session's group at the lowest CPU
    priority. Chromium starts a session of its own, and with Linux's autogroup scheduling the kernel shares
    the CPU between sessions before any nice value counts: so the group's nice (/proc/PID/autogroup), not
    Chromium's own, is what lets the server go first."""
    lines = ["#!/bin/sh"]
    if lowest:
        lines.append("echo 19 > /proc/$$/autogroup 2>/dev/null || true")
    taskset = f"taskset -c {','.join(map(str, cores))} " if cores else ""
    lines.append(f'exec {taskset}{chromium} "$@"')
    return "\n".join(lines) + "\n"


def bench_load(sessions: int = 10, seconds: float = 60.0, rounds: int = 2, train: bool = True, apart: bool = False,
               browsers_yield: bool = False) -> dict:
    """`apart`: the browsers on the machine's last CPU core and the server and its training job on the others,
    so that the room's browsers (phones, in a real room) cannot take the server's CPU. `browsers_yield`: the
    browsers on every core but at the lowest priority, so the server keeps the whole machine when it needs it."""
    chromium = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
    cores = sorted(os.sched_getaffinity(0))
    if apart and len(cores) < 2:
        raise RuntimeError("--apart needs at least 2 CPU cores")
    server_cores, browser_cores = (cores[:-1], cores[-1:]) if apart else (cores, cores)
    pin = lambda: os.sched_setaffinity(0, server_cores)  # noqa: E731  (in the child, before it starts)

    def as_a_job() -> None:  # the training job at the priority the app's job worker gives it
        pin()
        os.nice(jobs.JOB_NICE)
    with tempfile.TemporaryDirectory() as tmp:
        if apart or browsers_yield:  # Chromium and every process it starts inherit this wrapper's affinity and group
            wrapper = Path(tmp) / "chromium"
            wrapper.write_text(browser_wrapper(chromium, browser_cores if apart else None, browsers_yield))
            wrapper.chmod(0o755)
            chromium = str(wrapper)
        env = {**os.environ, "TRANSFER_STUDIO_HOME": str(Path(tmp) / "ws"), "TRANSFER_STUDIO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        env.pop("TRANSFER_STUDIO_PRESENTER_PASSWORD", None)
        run = lambda *a: subprocess.run([sys.executable, "-m", "engine", *a], env=env, check=True, capture_output=True)  # noqa: E731
        run("demo", "--no-lab")  # the sample dataset, a finished run for Predict, a few generations
        images = sorted(p for p in (ROOT / "assets" / "sample").rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))[::7]
        port = speed.free_port()
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                   "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=pin)
        url = f"http://127.0.0.1:{port}"
        results = []
        try:
            for _ in range(120):
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.5)
            trainer, t_train = None, time.perf_counter()
            if train:  # a fine-tuning job on the same machine all along (the full strategy on the sample)
                trainer = subprocess.Popen([sys.executable, "-m", "engine", "finetune", "--data", "Fruit (sample)", "--strategy", "full",
                                            "--out", str(Path(tmp) / "train")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           preexec_fn=as_a_job)
            for r in range(rounds):
                with MemoryWatch(server.pid) as mem, CpuWatch(server.pid, trainer.pid if trainer else None) as cpu:
                    t = time.perf_counter()
                    rec = asyncio.run(_load(url, sessions, seconds, images, chromium, warm_up=r == 0))
                    wall = time.perf_counter() - t
                results.append({"round": r + 1, "sessions": sessions, "seconds": round(wall, 1),
                                "generations": len(rec["generate"]), "predictions": len(rec["predict"]),
                                "errors": len(rec["errors"]), "error_kinds": sorted(set(rec["errors"])),
                                "generate_p50_s": _pct(rec["generate"], 50), "generate_p95_s": _pct(rec["generate"], 95),
                                "model_p50_s": _pct(rec["model"], 50), "model_p95_s": _pct(rec["model"], 95),
                                "predict_p50_s": _pct(rec["predict"], 50), "predict_p95_s": _pct(rec["predict"], 95),
                                "server_peak_mb": round(mem.peak, 1), "cpu_seconds": cpu.by_group()})
            training = None
            if trainer is not None:
                code = trainer.wait(timeout=1800)
                training = {"exit_code": code, "seconds": round(time.perf_counter() - t_train, 1),
                            "error": trainer.stderr.read().decode()[-300:] if code else ""}
        finally:
            server.terminate()
            server.wait(10)
    return {"sessions": sessions, "seconds": seconds, "tokens": TOKENS, "rounds": results, "training_job": training,
            "cores": {"server": server_cores, "browsers": browser_cores},
            "placement": "apart" if apart else "yield" if browsers_yield else "shared",
            "memory_growth_mb": round(results[-1]["server_peak_mb"] - results[0]["server_peak_mb"], 1) if len(results) > 1 else None}


def format_load(r: dict) -> str:
    lines = [f"{r['sessions']} browser sessions for {r['seconds']:.0f} s, generate {r['tokens']} tokens + predict, per round:"]
    for x in r["rounds"]:
        lines.append(f"  round {x['round']}: {x['generations']} generations, {x['predictions']} predictions, {x['errors']} errors "
                     f"{x['error_kinds'] or ''}; generate p50 {x['generate_p50_s']} s p95 {x['generate_p95_s']} s "
                     f"(the model's own time p50 {x.get('model_p50_s')} s p95 {x.get('model_p95_s')} s); "
                     f"predict p50 {x['predict_p50_s']} s p95 {x['predict_p95_s']} s; server peak {x['server_peak_mb']} MB")
        lines.append("    CPU seconds: " + ", ".join(f"{k} {v}" for k, v in x.get("cpu_seconds", {}).items()))
    if r["memory_growth_mb"] is not None:
        lines.append(f"  server memory, round 2 vs round 1 peak: {r['memory_growth_mb']:+.1f} MB")
    if r["training_job"]:
        t = r["training_job"]
        lines.append(f"  training job meanwhile: {'finished' if t['exit_code'] == 0 else 'FAILED ' + t['error']} in {t['seconds']} s")
    return "\n".join(lines)


def write_markdown(r: dict, path: Path | None = None) -> Path:
    """Replace (or add) the load section of BENCHMARKS.md (one section per configuration: shared, --apart, --browsers-yield)."""

    placement = r.get("placement") or ("apart" if r["cores"]["server"] != r["cores"]["browsers"] else "shared")
    rows = ["| round | sessions | generations | predictions | errors | generate p50 / p95 | of which the model p50 / p95 | "
            "predict p50 / p95 | server peak memory | CPU seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {x['round']} | {x['sessions']} | {x['generations']} | {x['predictions']} | {x['errors']} | "
             f"{x['generate_p50_s']} / {x['generate_p95_s']} s | {x['model_p50_s']} / {x['model_p95_s']} s | "
             f"{x['predict_p50_s']} / {x['predict_p95_s']} s | {x['server_peak_mb']} MB | "
             + ", ".join(f"{k} {v:.0f}" for k, v in x["cpu_seconds"].items()) + " |" for x in r["rounds"]]
    last = r["rounds"][-1]
    t = r["training_job"]
    goals = [("10 sessions for 60 s, 0 errors", f"{r['sessions']} sessions, {r['seconds']:.0f} s, {sum(x['errors'] for x in r['rounds'])} errors",
              r["sessions"] >= 10 and r["seconds"] >= 60 and all(x["errors"] == 0 for x in r["rounds"])),
             (f"generation of {r['tokens']} tokens p95 < 5 s", f"{last['generate_p95_s']} s", (last["generate_p95_s"] or 99) < 5),
             ("memory bounded (no growth in a second round)", f"{r['memory_growth_mb']:+.1f} MB" if r["memory_growth_mb"] is not None else "-",
              r["memory_growth_mb"] is not None and r["memory_growth_mb"] < 100),
             ("a training job meanwhile finishes", (f"finished in {t['seconds']} s" if t and t["exit_code"] == 0 else "no") if t else "not run",
              bool(t and t["exit_code"] == 0))]
    where = {
        "apart": f"The browsers run on CPU core {', '.join(map(str, r['cores']['browsers']))} and the server and its training job on "
                 f"core(s) {', '.join(map(str, r['cores']['server']))} (`--apart`): {ROOM}; here the server keeps only part of the machine.",
        "yield": f"The server, its training job and the browsers share the machine's {len(r['cores']['server'])} cores, the browsers' "
                 f"session group at the lowest CPU priority (`--browsers-yield`: Linux autogroup nice 19): {ROOM}; here they get "
                 "the CPU the server and its job leave.",
        "shared": f"The server, its training job and all the browsers share the machine's {len(r['cores']['server'])} cores.",
    }[placement]
    head, flag = {"apart": (HEAD_APART, " --apart"), "yield": (HEAD_YIELD, " --browsers-yield"), "shared": (HEAD, "")}[placement]
    body = "\n".join([head, "", f"`python -m engine bench load --sessions {r['sessions']} --seconds {r['seconds']:.0f}{flag}`: "
                      f"real Chromium sessions (Playwright contexts) on one `streamlit run` server, each opening the app once and then looping generate "
                      f"{r['tokens']} tokens (bundled mini GPT-2) -> Predict through the sidebar -> upload a sample image -> its "
                      "prediction -> back to Generate text through the sidebar; times from the click or upload to the result on screen "
                      "(\"of which the model\": the server's decoding time, from the generation's own caption). A fine-tuning job (`full` on "
                      f"the sample) runs on the same machine meanwhile, at the app's job priority (nice +{jobs.JOB_NICE}). The load runs twice on the same server. {where}", "", *rows, "",
                      "| goal | measured | met |", "|---|---|---|", *[f"| {g} | {m} | {'yes' if ok else '**no**'} |" for g, m, ok in goals]])
    return speed.replace_section(path or ROOT / "BENCHMARKS.md", head, body)
