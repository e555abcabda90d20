"""`python -m engine bench all`: every benchmark side by side, written to BENCHMARKS.md.

Each row compares a baseline with the project's path in the same process, on the same data and
model, one after the other. Sizes are parameters so the whole suite fits in a few minutes on a
small CPU; the numbers are only comparable within one run (and one machine).
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from engine.bench import browser_load, recipe_bench, speed
from engine.core import workspace
from engine.data import fractals, imagedata
from engine.models import sources

log = logging.getLogger(__name__)
ROOT = workspace.PROJECT


def _row(what: str, baseline: str, base_val: float, ours: str, ours_val: float, unit: str, goal: str = "",
         met: bool | None = None, higher_is_better: bool = True, note: str = "") -> dict:
    ratio = (ours_val / base_val if higher_is_better else base_val / ours_val) if base_val and ours_val else None
    return {"what": what, "baseline": baseline, "baseline_value": round(base_val, 3), "ours": ours,
            "ours_value": round(ours_val, 3), "unit": unit, "ratio": round(ratio, 2) if ratio else None,
            "goal": goal, "met": met, "note": note}


def _timed(fn, repeats: int = 1) -> float:
    """Best wall time of `repeats` calls (after the caller's warm-up)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_vision(n_per_class: int, image_size: int, epochs: int, train_steps: int) -> tuple[list[dict], str]:
    """The vision rows of `bench all`, each a measured pair on the same data in one process.

    Long because it is a list: one block per row, in the order BENCHMARKS.md shows them.
    """
    import torch
    import torch.nn.functional as F

    from engine.core import device as devices  # deferred: imports torch
    from engine.train import loop  # deferred: imports torch
    from engine.vision import feature_cache, network, preprocess  # deferred: imports torch

    rows = []
    r = speed.bench_finetune(n_per_class=n_per_class, image_size=image_size, epochs=epochs)
    rows.append(_row(f"linear probe, {epochs} epochs ({r['data']})", "naive seed loop (fp32, decode every epoch)",
                     r["naive_seconds"], "cached-feature linear path", r["linear_seconds"], "s", "ratio >= 20x at equal accuracy",
                     r["ratio"] >= 20 and abs(r["acc_diff_points"]) <= 5, higher_is_better=False,
                     note=f"val acc {r['naive_val_acc']:.3f} vs {r['linear_val_acc']:.3f}"))
    dev = devices.best_device()
    with workspace.temporary_workspace() as tmp:
        folder = fractals.write_shapes_dataset(Path(tmp) / "shapes", n_per_class, size=image_size, seed=0,
                                               shapes=fractals.SHAPES[:4])
        imagedata.import_path(folder, "bench-shapes")
        data = imagedata.training_data("bench-shapes", 0.2, 0)
        source = sources.resolve_vision("resnet18", "auto")
        pp = preprocess.preprocessing_for(source, image_size)
        paths = [p for p, _ in data.train + data.val]
        model = network.build_model("resnet18", len(data.classes), source, seed=0).to(dev).eval()

        # ---- extraction: plain fp32 forward, the project's extractor, the best forward we know of
        images = preprocess.load_images(paths, pp.resize)
        x_nchw = preprocess.normalize(preprocess.center_crop(images, pp.image_size), pp).contiguous().to(dev)
        prefix = feature_cache.frozen_prefix(model, 5, dev)
        dtype = feature_cache.extraction_dtype(dev)

        def plain():
            with torch.no_grad():
                for i in range(0, len(x_nchw), 32):
                    prefix(x_nchw[i:i + 32])

        def ceiling():  # bf16 autocast + channels_last under inference_mode, input already prepared
            xc = x_nchw.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), devices.autocast(dev, devices.amp_dtype(dev)):
                for i in range(0, len(xc), 64):
                    prefix(xc[i:i + 64])

        ours = lambda: feature_cache.extract(prefix, images, pp, dev, dtype)  # noqa: E731  (includes normalising)
        for f in (plain, ceiling, ours):
            f()  # warm-up
        n = len(images)
        t_plain, t_ceiling, t_ours = _timed(plain, 2), _timed(ceiling, 2), _timed(ours, 2)
        best_s = min(t_plain, t_ceiling)
        rows.append(_row(f"frozen-feature extraction ({n} images, {pp.image_size} px)", "plain fp32 forward",
                         n / t_plain, f"project extractor ({str(dtype).replace('torch.', '') if dtype else 'fp32'})", n / t_ours, "img/s"))
        rows.append(_row("extraction vs the device's best forward", "best of fp32 / bf16+channels_last", n / best_s,
                         "project extractor", n / t_ours, "img/s", "extraction >= 80% of the ceiling", t_ours <= best_s / 0.8))

        # ---- head retraining on cached features (what every linear re-run does)
        feats = feature_cache.extract(prefix, images, pp, dev, dtype).clone()
        labels = torch.tensor([y for _, y in data.train + data.val])
        head = torch.nn.Linear(feats.shape[1], len(data.classes))
        opt = torch.optim.SGD(head.parameters(), lr=1e-2, momentum=0.9)

        def retrain():
            for epoch in range(10):
                for idx in loop.epoch_batches(len(feats), 32, loop.epoch_gen(0, epoch)):
                    loss = F.cross_entropy(head(feats[idx]), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()

        retrain()
        per_1000 = _timed(retrain, 2) * 1000 / len(feats)
        rows.append(_row("head retraining on cached features, 10 epochs", "goal budget", 1.0, "per 1,000 images",
                         per_1000, "s", "< 1 s per 1,000 images per 10 epochs (CPU)", per_1000 < 1.0, higher_is_better=False))

        # ---- full fine-tuning throughput: fp32 NCHW vs channels_last vs autocast
        def train_rate(channels_last: bool, amp) -> float:
            m = network.build_model("resnet18", len(data.classes), source, seed=0).to(dev)
            if channels_last:
                m = m.to(memory_format=torch.channels_last)
            m.train()
            o = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)
            xb = x_nchw[:32].contiguous(memory_format=torch.channels_last) if channels_last else x_nchw[:32]
            yb = labels[:32].to(dev)

            def step():
                with devices.autocast(dev, amp):
                    loss = F.cross_entropy(m(xb).float(), yb)
                o.zero_grad(set_to_none=True)
                loss.backward()
                o.step()

            step()
            t = time.perf_counter()
            for _ in range(train_steps):
                step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return train_steps * len(xb) / (time.perf_counter() - t)

        amp = devices.amp_dtype(dev)
        base = train_rate(False, None)
        cl = train_rate(True, None)
        cl_amp = train_rate(True, amp)
        rows.append(_row("full fine-tune step, batch 32", "fp32 NCHW", base, "fp32 channels_last (the project's CPU default)", cl, "img/s"))
        rows.append(_row("full fine-tune step, batch 32", "fp32 NCHW", base, f"{str(amp).replace('torch.', '')} autocast + channels_last", cl_amp, "img/s",
                         note="the project trains with autocast on CUDA only" if dev.type != "cuda" else ""))

        # ---- data pipeline: decode every epoch vs decode once into a uint8 tensor (finetune.finetune)
        def decode_every_epoch():
            for _ in range(3):
                preprocess.normalize(preprocess.center_crop(preprocess.load_images(paths, pp.resize), pp.image_size), pp)

        def decoded_once():
            cached = preprocess.load_images(paths, pp.resize)
            for _ in range(3):
                preprocess.normalize(preprocess.center_crop(cached, pp.image_size), pp)

        decoded_once()
        t_dec, t_once = _timed(decode_every_epoch), _timed(decoded_once)
        rows.append(_row(f"input pipeline, 3 epochs of {n} PNGs", "PIL decode + resize every epoch", t_dec,
                         "decoded once into a uint8 tensor, reused", t_once, "s", higher_is_better=False))
    return rows, devices.label(dev)


def bench_whole_process(n_per_class: int = 150, image_size: int = 160, epochs: int = 10) -> list[dict]:
    """The seed's loop and `engine finetune --strategy linear` as whole processes (start to exit),
    by default 600 generated images at 160 px, 10 epochs, the bundled backbone in both."""

    r = speed.bench_process(n_per_class=n_per_class, image_size=image_size, epochs=epochs)
    rates = r["extractor_img_s"]
    best = max(rates, key=rates.get)
    return [
        _row(f"linear probe as whole processes, start to exit ({r['images']} images, {r['image_size']} px, {r['epochs']} epochs)",
             "the seed's loop (`bench seed-loop`)", r["seed_seconds"], "`engine finetune --strategy linear`", r["seconds"], "s",
             "ratio >= 10x at equal accuracy (±1 point)", r["ratio"] >= 10 and r["val_acc"] >= r["seed_val_acc"] - 0.01, higher_is_better=False,
             note=f"val acc {r['seed_val_acc']:.3f} vs {r['val_acc']:.3f}; the first run on a machine, which also times the "
                  f"extraction engines: {r['first_seconds']} s ({r['first_ratio']}x)"),
        _row(f"feature extraction engine, chosen by measurement ({r['image_size']} px, batch 32)", "torch fp32 (folded BatchNorm, channels_last)",
             rates["torch fp32"], f"chosen: {best}", rates[best], "img/s"),
    ]


def bench_generation(tokens: int) -> list[dict]:
    r = speed.bench_generate(new_tokens=tokens, repeats=2, models=("mini",))
    rows = []
    for c in r["cases"]:
        rows.append(_row(f"generation, {c.get('model', 'mini')}", "plain HF generate fp32", c["plain_hf_fp32_tokens_per_s"],
                         "project generation path (greedy)", c["project_tokens_per_s"], "tokens/s", "ratio >= 1.5x",
                         c["ratio"] >= 1.5))
    return rows


def _cold_start_once(browser, timeout: float) -> tuple[float, float]:
    """Seconds from `streamlit run` to a healthy server, and to the Home page's title in Chromium."""

    page = browser.new_page()
    port = speed.free_port()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRANSFER_STUDIO_HOME": str(Path(tmp) / "ws"), "TRANSFER_STUDIO_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
                                 "--server.port", str(port), "--server.address", "127.0.0.1",
                                 "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"http://127.0.0.1:{port}"
            while True:  # what a user's browser cannot do faster: wait until the server answers
                try:
                    urllib.request.urlopen(url + "/_stcore/health", timeout=1).close()
                    break
                except OSError:
                    if time.perf_counter() - t0 > timeout:
                        raise
                    time.sleep(0.02)
            healthy = time.perf_counter() - t0
            page.goto(url + "/", timeout=int(timeout * 1000))
            page.get_by_role("heading", name="Transfer Studio").first.wait_for(timeout=int(timeout * 1000))
            return healthy, time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
            page.close()


def bench_cold_start(timeout: float = 60.0, repeats: int = 3) -> list[dict]:
    """`streamlit run app.py` with an empty workspace until Chromium shows the first page (Home); median of runs."""

    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
    args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
            "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=args)  # browser start not counted
        try:
            times = [_cold_start_once(browser, timeout) for _ in range(repeats)]
        finally:
            browser.close()
    healthy = statistics.median(t[0] for t in times)
    seconds = statistics.median(t[1] for t in times)
    return [_row("app cold start to the rendered first page (Home)", "goal budget", 3.0, "streamlit run + first page",
                 seconds, "s", "< 3 s", seconds < 3.0, higher_is_better=False,
                 note=f"median of {repeats}; server answering after {healthy:.1f} s, page drawn {seconds - healthy:.1f} s later")]


def run_all(n_per_class: int = 40, image_size: int = 64, epochs: int = 10, train_steps: int = 3,
            tokens: int = 32, cold_start: bool = True, threads: int = 0, process_per_class: int = 150,
            process_image_size: int = 160) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    t0 = time.time()
    rows, device = bench_vision(n_per_class, image_size, epochs, train_steps)
    rows += bench_whole_process(process_per_class, process_image_size, epochs)
    rows += bench_generation(tokens)
    if cold_start:
        rows += bench_cold_start()
    return {"device": device, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "seconds": round(time.time() - t0, 1), "rows": rows,
            "sizes": {"n_per_class": n_per_class, "image_size": image_size, "epochs": epochs,
                      "train_steps": train_steps, "tokens": tokens, "process_per_class": process_per_class,
                      "process_image_size": process_image_size}}


def format_markdown(r: dict) -> str:
    fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) and v < 100 else f"{v:,.0f}"  # noqa: E731
    lines = ["# Benchmarks", "",
             "Written by `python -m engine bench all`. Every row is a side-by-side measurement in one run, on the same",
             "data and model; ratio > 1 means the project's path is better (faster, or less time).", "",
             f"Device: **{r['device']}** ({r['cpu_count']} CPU cores, {r['torch_threads']} torch threads). "
             f"Load average before/after: {r['load_before']} / {r['load_after']}"
             + (" — **a busy machine shared with other jobs**: absolute CPU numbers are low and noisy; ratios matter more."
                if r["load_before"] > 0.5 * (r["cpu_count"] or 1) else "."),  # after: the benchmark's own load
             f"Sizes: {r['sizes']}. Total {r['seconds']} s.", "",
             "| what | baseline | ours | ratio | goal | met |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        met = "" if row["met"] is None else ("yes" if row["met"] else "**no**")
        note = f" ({row['note']})" if row["note"] else ""
        lines.append(f"| {row['what']} | {row['baseline']}: {fmt(row['baseline_value'])} {row['unit']} | "
                     f"{row['ours']}: {fmt(row['ours_value'])} {row['unit']}{note} | "
                     f"{row['ratio']}x | {row['goal']} | {met} |")
    lines += ["", "No GPU was available for this run: the CUDA path (bf16 autocast, channels_last, NCCL) is implemented "
              "but not measured here." if "CUDA" not in r["device"] else ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(r: dict, path: Path | None = None) -> Path:
    path = path or ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.is_file() else ""
    # `bench recipes` and `bench load` write sections of their own: kept
    heads = (speed.PROCESS_HEAD, recipe_bench.HEAD, browser_load.HEAD)
    kept = "\n".join(sec for sec in (speed.section(text, h) for h in heads) if sec)
    workspace.atomic_write_bytes(path, (format_markdown(r).rstrip() + ("\n\n" + kept if kept else "\n")).encode())
    return path
