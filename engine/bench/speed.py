"""Benchmarks (`python -m engine bench ...`): ratios measured in one run, never thresholds in tests.

One function per benchmark, each returning a JSON-able dict, plus a `format_*` for the terminal.

bench_finetune: on the same generated data (coloured shapes written to a temp folder) and the
same backbone, the naive seed loop — every epoch a full fp32 forward of the frozen network,
backward into fc only, batch 32 — against the project's `linear` strategy (features computed
once, cached, head trained on them), 10 epochs each, same optimiser (SGD lr 1e-3 momentum 0.9,
constant lr), same seed and batch order. Also: extraction img/s vs a plain fp32 forward.

What to expect on a CPU without fast bf16: the cold linear path does one forward per image
instead of `epochs` of them, each ~1.4x faster (BatchNorm folded, channels_last, inference mode),
so the cold ratio is bounded by about epochs x 1.4 (~11x measured for 10 epochs); a second run on
the same data (another lr, more epochs) finds the features cached (~40-70x). On a busy machine,
`--threads 1` gives steadier timings: with two threads every small op of the naive loop waits
for a descheduled second thread, which inflates its time (and the ratio) several-fold.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from engine.core import workspace
from engine.core.errors import UserError
from engine.data import fractals, imagedata
from engine.models import backbones, sources
from engine.vision.config import FinetuneConfig


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server a benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- BENCHMARKS.md sections
def section(text: str, head: str) -> str:
    """The section of a BENCHMARKS.md text that starts at `head` (a "## " line), up to the next one ("" if absent)."""
    if head not in text:
        return ""
    start = text.index(head)
    nxt = text.find("\n## ", start + len(head))
    return text[start:nxt + 1 if nxt != -1 else len(text)].rstrip() + "\n"


def replace_section(path: Path, head: str, body: str) -> Path:
    """Replace (or add at the end) the section starting at `head` with `body`; the rest of the file is kept."""
    text = path.read_text() if path.is_file() else "# Benchmarks\n"
    if head in text:
        start = text.index(head)
        nxt = text.find("\n## ", start + len(head))
        rest = text[nxt + 1:] if nxt != -1 else ""  # the blank lines before the next section go with the old one
        text = text[:start] + body.rstrip() + "\n\n" + rest
    else:
        text = text.rstrip() + "\n\n" + body.rstrip() + "\n"
    workspace.atomic_write_bytes(path, (text.rstrip() + "\n").encode())
    return path


def _naive_linear(cfg, data, source, pp) -> dict:
    """The seed's loop: a new fc on a frozen network, every epoch a full forward of every image.

    Like the seeds, the images are decoded and transformed again every epoch (ImageFolder +
    DataLoader style, here without worker processes) and everything runs in fp32, NCHW.
    The only deviation: frozen BatchNorm stays in eval mode (as in the project), so both paths
    compute the same function and their accuracies can be compared.
    """
    import torch
    import torch.nn.functional as F

    from engine.train import loop  # deferred: imports torch
    from engine.vision import network, preprocess  # deferred: imports torch

    model = network.build_model(cfg.model, len(data.classes), source, seed=cfg.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in backbones.head(model).parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(backbones.head(model).parameters(), lr=cfg.lr, momentum=0.9)
    train_paths, train_y = [p for p, _ in data.train], torch.tensor([y for _, y in data.train])
    val_paths, val_y = [p for p, _ in data.val], torch.tensor([y for _, y in data.val])

    def load(paths):  # decode + resize + centre-crop + normalise, as a torchvision transform pipeline would
        return preprocess.normalize(preprocess.center_crop(preprocess.load_images(paths, pp.resize), pp.image_size), pp).contiguous()

    model.eval()  # frozen BatchNorm uses its running statistics (a train-mode forward would change them)
    with torch.no_grad():
        model(load(train_paths[:8]))  # warm-up outside the timing, as the project path gets its own
    t0 = time.time()
    accs = []
    for epoch in range(cfg.epochs):
        model.eval()  # frozen BN in eval mode; fc has no BN
        gen = loop.epoch_gen(cfg.seed, epoch)
        for idx in loop.epoch_batches(len(train_paths), cfg.batch_size, gen):
            x = load([train_paths[i] for i in idx])
            loss = F.cross_entropy(model(x), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = torch.cat([model(load(val_paths[i:i + 32])) for i in range(0, len(val_paths), 32)])
        accs.append((logits.argmax(1) == val_y).float().mean().item())
    return {"seconds": time.time() - t0, "best_val_acc": max(accs), "final_val_acc": accs[-1]}


def _forward_rates(model, images, pp, dev, rounds: int = 7, chunk: int = 128) -> dict:
    """img/s of a plain fp32 NCHW forward (batch 32, preprocessed as the seeds do) vs the project's
    extraction path (feature_cache.extract) on the same images. On a shared machine single timings
    swing 2-3x, so the two alternate in chunks and the medians are reported."""

    import torch

    from engine.vision import feature_cache, preprocess  # deferred: imports torch

    model.eval()
    dtype = feature_cache.extraction_dtype(dev)
    prefix = feature_cache.frozen_prefix(model, 5, dev)
    part = images[:chunk]

    def plain():
        with torch.no_grad():
            x = preprocess.normalize(preprocess.center_crop(part, pp.image_size), pp).contiguous()  # NCHW, fp32
            for i in range(0, len(x), 32):
                model(x[i:i + 32])

    def fast():
        feature_cache.extract(prefix, part, pp, dev, dtype)

    plain(), fast()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "fast": []}
    for r in range(rounds):
        for name, fn in ((("plain", plain), ("fast", fast)) if r % 2 else (("fast", fast), ("plain", plain))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    p, f = len(part) / statistics.median(times["plain"]), len(part) / statistics.median(times["fast"])
    return {"plain_fp32_img_s": round(p, 1), "extraction_img_s": round(f, 1), "speedup": round(f / p, 2),
            "extraction_dtype": str(dtype or torch.float32).replace("torch.", "")}


def seed_loop_process(list_file: Path, image_size: int, epochs: int, weights: str = "mini") -> dict:
    """`bench seed-loop`: the seed's loop as a process of its own, on a split written by bench_process
    (original image files, read and decoded every epoch)."""

    from engine.vision import preprocess  # deferred: imports torch

    split = json.loads(Path(list_file).read_text())
    data = SimpleNamespace(classes=split["classes"], train=[tuple(x) for x in split["train"]], val=[tuple(x) for x in split["val"]])
    cfg = FinetuneConfig(data="-", weights=weights, strategy="linear", epochs=epochs, batch_size=32, lr=1e-3,
                                optimizer="sgd", schedule="constant", image_size=image_size, seed=0)
    source = sources.resolve_vision(cfg.model, cfg.weights)
    return _naive_linear(cfg, data, source, preprocess.preprocessing_for(source, image_size))


def bench_process(n_per_class: int = 150, image_size: int = 160, epochs: int = 10, n_classes: int = 4) -> dict:
    """Whole processes, timed from start to exit: the seed's loop (`bench seed-loop`) against
    `engine finetune --strategy linear` on the same images and split, the bundled backbone in both.

    The project process starts in an empty workspace, so it stores the images, decodes them,
    extracts the features and fits the probe; it runs twice: the first time on this machine (the
    extraction engine is measured, ~2 s, and the backbone's ONNX graph exported), then with both
    remembered (a fresh workspace holding only cache/extractor.json and cache/onnx/) — what every
    later run of that backbone on the machine is.
    """

    def run(cmd: list[str], home: Path) -> tuple[float, dict]:
        env = {**os.environ, "TRANSFER_STUDIO_HOME": str(home)}
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "engine", *cmd, "--json"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t
        if out.returncode:
            raise RuntimeError(f"{' '.join(cmd[:2])} failed: {out.stderr[-400:]}")
        return seconds, json.loads(out.stdout.strip().splitlines()[-1])

    with workspace.temporary_workspace() as tmp:
        folder = fractals.write_shapes_dataset(tmp / "shapes", n_per_class, size=image_size, seed=0, shapes=fractals.SHAPES[:n_classes])
        data = imagedata.training_data(str(folder), 0.2, 0)  # the project's split; the seed reads the same files
        original = {hashlib.sha256(p.read_bytes()).hexdigest(): str(p) for p in folder.rglob("*.png")}
        by_hash = lambda items: [[original[Path(p).stem], y] for p, y in items]  # noqa: E731  (store files are named by hash)
        (tmp / "split.json").write_text(json.dumps({"classes": data.classes, "train": by_hash(data.train), "val": by_hash(data.val)}))
        seed_s, seed = run(["bench", "seed-loop", "--list", str(tmp / "split.json"), "--image-size", str(image_size),
                            "--epochs", str(epochs)], tmp / "ws-seed")
        ours = ["finetune", "--data", str(folder), "--strategy", "linear", "--weights", "mini", "--image-size", str(image_size),
                "--epochs", str(epochs)]
        first_s, first = run([*ours, "--out", str(tmp / "run-first")], tmp / "ws-first")
        memo = tmp / "ws-first" / "cache" / "extractor.json"
        (tmp / "ws-again" / "cache").mkdir(parents=True)
        (tmp / "ws-again" / "cache" / "extractor.json").write_bytes(memo.read_bytes())
        if (memo.parent / "onnx").is_dir():
            shutil.copytree(memo.parent / "onnx", tmp / "ws-again" / "cache" / "onnx")
        again_s, again = run([*ours, "--out", str(tmp / "run-again")], tmp / "ws-again")
        engine_rates = next(iter(json.loads(memo.read_text()).values()))["img_s"]
    return {"images": len(data.train) + len(data.val), "image_size": image_size, "epochs": epochs,
            "seed_seconds": round(seed_s, 1), "seed_val_acc": round(seed["best_val_acc"], 4),
            "first_seconds": round(first_s, 1), "seconds": round(again_s, 1), "val_acc": round(again["best_val_acc"], 4),
            "first_val_acc": round(first["best_val_acc"], 4), "ratio": round(seed_s / again_s, 2),
            "first_ratio": round(seed_s / first_s, 2), "extractor_img_s": engine_rates}


PROCESS_HEAD = "## Whole processes: the seed loop vs engine finetune"


def write_process_markdown(r: dict, path: Path) -> Path:
    """Replace (or add) the whole-process section of BENCHMARKS.md."""
    rates = r["extractor_img_s"]
    best = max(rates, key=rates.get)
    met = r["ratio"] >= 10 and r["val_acc"] >= r["seed_val_acc"] - 0.01
    body = "\n".join([
        PROCESS_HEAD, "",
        f"`python -m engine bench process`: {r['images']} generated images at {r['image_size']} px, {r['epochs']} epochs, the bundled "
        "backbone in both, each a whole process timed from start to exit on the same files and split. The project process "
        "starts from an empty workspace (it stores, decodes, extracts and fits the probe).", "",
        "| | seconds | val acc |", "|---|---|---|",
        f"| the seed's loop (`bench seed-loop`: decode + full forward every epoch, SGD on the head) | {r['seed_seconds']} | {r['seed_val_acc']:.3f} |",
        f"| `engine finetune --strategy linear`, the extraction engine and the ONNX graph remembered | {r['seconds']} | {r['val_acc']:.3f} |",
        f"| the same, first run on this machine (also times the engines, exports the graph) | {r['first_seconds']} | {r['first_val_acc']:.3f} |", "",
        f"Ratio **{r['ratio']}x** (first run {r['first_ratio']}x); goal >= 10x at equal accuracy: {'met' if met else '**not met**'}. "
        f"Extraction engines measured at batch 32: {', '.join(f'{n} {v:g} img/s' for n, v in rates.items())}; chosen: {best}."])
    return replace_section(path, PROCESS_HEAD, body)


def bench_finetune(n_per_class: int = 150, image_size: int = 64, epochs: int = 10, threads: int = 0,
                   n_classes: int = 4, weights: str = "auto") -> dict:
    """Naive seed loop vs the project's linear path; see the module docstring."""
    import torch

    from engine.core import device as devices  # deferred: imports torch
    from engine.vision import finetune, network, preprocess  # deferred: imports torch

    if threads:
        torch.set_num_threads(threads)
    with workspace.temporary_workspace() as tmp:
        folder = fractals.write_shapes_dataset(Path(tmp) / "shapes", n_per_class, size=image_size, seed=0,
                                               shapes=fractals.SHAPES[:n_classes])
        imagedata.import_path(folder, "bench-shapes")  # a workspace dataset, as in the app: both loops read the same stored files
        cfg = FinetuneConfig(data="bench-shapes", weights=weights, strategy="linear", epochs=epochs, batch_size=32,
                                    lr=1e-3, optimizer="sgd", schedule="constant", image_size=image_size, seed=0)
        data = imagedata.training_data(cfg.data, cfg.val_fraction, cfg.seed)
        source = sources.resolve_vision(cfg.model, cfg.weights)
        pp = preprocess.preprocessing_for(source, cfg.image_size)
        dev = devices.best_device()

        naive = _naive_linear(cfg, data, source, pp)
        # the project path, cold (features computed): three runs, the median (single short timings
        # on a shared machine swing with its load)
        cold = []
        for i in range(3):
            shutil.rmtree(Path(os.environ["TRANSFER_STUDIO_HOME"]) / "cache" / "features", ignore_errors=True)
            t = time.time()
            fast = finetune.finetune(cfg, Path(tmp) / f"run-{i}")
            cold.append(time.time() - t)
        fast_seconds = sorted(cold)[1]
        # a second run with another learning rate reuses the cached features (the common "try again" case)
        t = time.time()
        finetune.finetune(FinetuneConfig(**{**cfg.__dict__, "lr": 2e-3}), Path(tmp) / "run2")
        warm_seconds = time.time() - t

        model = network.build_model(cfg.model, len(data.classes), source, seed=0)
        images = preprocess.load_images([p for p, _ in data.train + data.val], pp.resize)
        rates = _forward_rates(model, images, pp, dev)
    return {
        "data": f"{n_classes} classes x {n_per_class} generated coloured shapes, {image_size} px ({len(data.train)} train / {len(data.val)} val)",
        "backbone": f"{cfg.model}, weights {source.name}",
        "device": devices.label(dev),
        "epochs": epochs,
        "naive_seconds": round(naive["seconds"], 2),
        "linear_seconds": round(fast_seconds, 2),
        "linear_seconds_runs": [round(c, 2) for c in cold],
        "ratio": round(naive["seconds"] / fast_seconds, 1),
        "naive_val_acc": round(naive["best_val_acc"], 4),
        "linear_val_acc": round(fast["best_val_acc"], 4),
        "acc_diff_points": round(100 * (fast["best_val_acc"] - naive["best_val_acc"]), 2),
        "linear_warm_cache_seconds": round(warm_seconds, 2),
        "ratio_warm_cache": round(naive["seconds"] / warm_seconds, 1),
        **rates,
    }


def format_finetune(r: dict) -> str:
    return "\n".join([
        f"data: {r['data']}; backbone: {r['backbone']}; device: {r['device']}; {r['epochs']} epochs each",
        f"naive seed loop (fp32 forward of the frozen net every epoch): {r['naive_seconds']:.2f} s, val acc {r['naive_val_acc']:.4f}",
        f"linear path (features once, cached; head on features):      {r['linear_seconds']:.2f} s (median of 3 cold runs), val acc {r['linear_val_acc']:.4f}",
        f"ratio: {r['ratio']}x (goal >= 20x); accuracy difference {r['acc_diff_points']:+.2f} points",
        f"again with the cache warm (another lr): {r['linear_warm_cache_seconds']:.2f} s -> {r['ratio_warm_cache']}x",
        f"extraction: {r['extraction_img_s']} img/s ({r['extraction_dtype']}, channels_last, inference mode) vs plain fp32 forward "
        f"{r['plain_fp32_img_s']} img/s -> {r['speedup']}x",
    ])


# ----------------------------------------------------------------------------- bench generate
# On the same model and prompt: tokens/s of plain Hugging Face `model.generate` (fp32, the model's
# default settings, i.e. greedy) against the project's path (engine.text.generation: dtype chosen per
# model by measurement, a lean KV-cache loop with a private RNG). Both make exactly the same
# number of new tokens (HF: min_new_tokens; ours: end-of-text masked). Best of `repeats` runs,
# alternating, so a noisy neighbour on a shared CPU hurts both alike.

class _IdTokenizer:
    """Stands in for a tokenizer on the random-weight GPT-2-124M-shaped model (no vocab files offline)."""

    eos_token_id = 50256
    pad_token_id = 50256

    def decode(self, ids, **_) -> str:
        return " ".join(str(i) for i in ids)


def _gen_case(name: str, model, tokenizer, prompt_ids: list[int], new_tokens: int, repeats: int, memo_key: str) -> dict:
    import torch

    from engine.core.device import best_device  # deferred: imports torch
    from engine.text import causal_lm, generation  # deferred: imports torch

    dev = best_device()
    model = model.to(dev).eval()
    model.requires_grad_(False)
    eos = tokenizer.eos_token_id
    ids = torch.tensor([prompt_ids], device=dev)

    def plain() -> float:  # plain HF generate, fp32, default (greedy) settings
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, pad_token_id=eos, eos_token_id=eos)
        assert out.shape[1] - ids.shape[1] == new_tokens
        return new_tokens / (time.perf_counter() - t)

    # The project's path on its own copy (it may convert the weights to bf16).

    ours = copy.deepcopy(model)
    dtype, threads, reason = causal_lm.choose_inference(ours, dev, key=memo_key)
    ours.to(dtype)
    ctx_len = int(getattr(model.config, "n_positions", 1024))
    lm = causal_lm.LM(ours, tokenizer, name, name, sources.Source("bench", name, ""), dev, dtype, reason, ctx_len, threads)

    def project(settings: dict, lean: bool = True) -> float:
        cfg = generation.GenerationConfig(max_new_tokens=new_tokens, seed=0, **settings)
        t = time.perf_counter()
        with causal_lm.thread_count(lm.threads):
            samples = generation.decode_samples(lm, prompt_ids, cfg, 0, None, None, ignore_eos=True, lean=lean)
        assert len(samples[0].token_ids) == new_tokens
        return new_tokens / (time.perf_counter() - t)

    def plain_same_threads() -> float:  # separates the thread choice from the rest of the path
        with causal_lm.thread_count(threads):
            return plain()

    default_threads = torch.get_num_threads()

    greedy = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    balanced = generation.PRESETS["Balanced"]
    plain(), project(greedy)  # warm-up: allocator, kernels, first-call overheads
    best = {"plain": 0.0, "plain_same_threads": 0.0, "greedy": 0.0, "balanced": 0.0, "hf_forward": 0.0}
    for _ in range(repeats):
        best["plain"] = max(best["plain"], plain())
        if threads != default_threads:
            best["plain_same_threads"] = max(best["plain_same_threads"], plain_same_threads())
        best["greedy"] = max(best["greedy"], project(greedy))
        best["balanced"] = max(best["balanced"], project(balanced))
        best["hf_forward"] = max(best["hf_forward"], project(greedy, lean=False))  # the loop without the lean forward
    if threads == default_threads:
        best["plain_same_threads"] = best["plain"]
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": new_tokens,
        "plain_hf_fp32_tokens_per_s": round(best["plain"], 1),
        "project_tokens_per_s": round(best["greedy"], 1),
        "ratio": round(best["greedy"] / best["plain"], 2),
        "plain_hf_fp32_project_threads_tokens_per_s": round(best["plain_same_threads"], 1),
        "ratio_same_threads": round(best["greedy"] / best["plain_same_threads"], 2),
        "project_balanced_tokens_per_s": round(best["balanced"], 1),
        "project_hf_forward_tokens_per_s": round(best["hf_forward"], 1),
        "ratio_lean_forward": round(best["greedy"] / best["hf_forward"], 2),
        "ratio_balanced": round(best["balanced"] / best["plain"], 2),
        "project_dtype": str(dtype).replace("torch.", ""),
        "project_threads": threads or torch.get_num_threads(),
        "plain_threads": torch.get_num_threads(),
        "dtype_reason": reason,
    }


def bench_generate(new_tokens: int = 64, repeats: int = 3, threads: int = 0, models: tuple[str, ...] = ("gpt2-124m-random", "mini")) -> dict:
    """Plain HF generate vs the project's path on a GPT-2-124M-shaped model (random weights) and the bundled mini."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from engine.core import device as devices  # deferred: imports torch
    from engine.text.causal_lm import quiet_transformers  # deferred: imports torch

    quiet_transformers()
    if threads:
        torch.set_num_threads(threads)
    if not (1 <= new_tokens <= 200):
        raise UserError("--tokens must be 1..200")
    cases = []
    prompt = "The meaning of life is"
    for name in models:
        if name == "gpt2-124m-random":
            torch.manual_seed(0)
            model = GPT2LMHeadModel(GPT2Config())  # GPT-2 small's shape: 12 layers, 768 wide, 50257 tokens
            model.config.pad_token_id = None
            ids = torch.randint(0, 50000, (8,), generator=torch.Generator().manual_seed(0)).tolist()
            cases.append(_gen_case("GPT-2-124M-shaped (random weights)", model, _IdTokenizer(), ids, new_tokens, repeats, "bench:gpt2-124m-random"))
        elif name == "mini":
            if not sources.mini_text_available():
                raise UserError(f"bundled mini GPT-2 missing at {sources.MINI_TEXT}; run `python -m engine pretrain text`")
            tok = AutoTokenizer.from_pretrained(sources.MINI_TEXT, local_files_only=True)
            model = GPT2LMHeadModel.from_pretrained(sources.MINI_TEXT, local_files_only=True, dtype=torch.float32)
            model.config.pad_token_id = None
            ids = tok(prompt)["input_ids"]
            cases.append(_gen_case("mini-gpt2 (bundled)", model, tok, ids, min(new_tokens * 2, 200), repeats, f"mini:{sources.MINI_TEXT}"))
        else:
            raise UserError(f"unknown bench model {name!r}")
    return {"device": devices.label(), "repeats": repeats, "cases": cases}


def format_generate(r: dict) -> str:
    lines = [f"device: {r['device']}; best of {r['repeats']} alternating runs; same prompt and number of new tokens"]
    for c in r["cases"]:
        rows = [
            ("plain HF generate, fp32, default settings (greedy)", c["plain_hf_fp32_tokens_per_s"], ""),
            (f"project path, greedy ({c['project_dtype']}, {c['project_threads']} thread(s))", c["project_tokens_per_s"], f"{c['ratio']}x"),
            ("project path, Balanced sampling", c["project_balanced_tokens_per_s"], f"{c['ratio_balanced']}x"),
            ("project path, greedy, HF forward instead of the lean one", c["project_hf_forward_tokens_per_s"],
             f"lean forward is {c['ratio_lean_forward']}x this"),
            (f"plain HF generate on {c['project_threads']} thread(s) (for reference)", c["plain_hf_fp32_project_threads_tokens_per_s"],
             f"project greedy is {c['ratio_same_threads']}x this"),
        ]
        lines.append(f"{c['model']}: {c['parameters'] / 1e6:.1f}M parameters, {c['prompt_tokens']} prompt + {c['new_tokens']} new tokens")
        lines += [f"  {name:<58} {v:8.1f} tokens/s  {note}".rstrip() for name, v, note in rows]
        lines.append(f"  dtype: {c['dtype_reason']}")
    return "\n".join(lines)
