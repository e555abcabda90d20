"""`engine bench finetune|seed-loop|process|load|all|recipes|generate`: the benchmarks behind BENCHMARKS.md."""
from __future__ import annotations

import logging
from pathlib import Path

from engine.cli import options
from engine.cli.common import Parser, emit
from engine.core import workspace
from engine.core.errors import UserError


def cmd_bench_finetune(args) -> int:
    from engine.bench import speed  # deferred: off the CLI's start-up

    result = speed.bench_finetune(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs, threads=args.threads)
    emit(args, result, speed.format_finetune(result))
    return 0


def cmd_bench_seed_loop(args) -> int:
    from engine.bench import speed  # deferred: off the CLI's start-up

    result = speed.seed_loop_process(args.list, args.image_size, args.epochs)
    emit(args, result, f"seed loop: best val acc {result['best_val_acc']:.3f} in {result['seconds']:.1f} s")
    return 0


def cmd_bench_process(args) -> int:
    from engine.bench import speed  # deferred: off the CLI's start-up

    r = speed.bench_process(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs)

    path = speed.write_process_markdown(r, Path(args.out) if args.out else workspace.PROJECT / "BENCHMARKS.md")
    emit(args, r, f"{r['images']} images at {r['image_size']} px, {r['epochs']} epochs, whole processes: seed loop {r['seed_seconds']} s "
                  f"(val acc {r['seed_val_acc']}), engine finetune --strategy linear {r['seconds']} s (val acc {r['val_acc']}): "
                  f"{r['ratio']}x; first run on this machine {r['first_seconds']} s ({r['first_ratio']}x); extractors {r['extractor_img_s']} img/s"
                  f"\nwrote {path}")
    return 0


def cmd_bench_load(args) -> int:
    from engine.bench import browser_load  # deferred: off the CLI's start-up

    if args.apart and args.browsers_yield:
        raise UserError("--apart and --browsers-yield are two different placements: choose one")
    r = browser_load.bench_load(sessions=args.sessions, seconds=args.seconds, rounds=args.rounds, train=not args.no_train,
                                apart=args.apart, browsers_yield=args.browsers_yield)
    path = browser_load.write_markdown(r, Path(args.out) if args.out else None)
    emit(args, r, browser_load.format_load(r) + f"\nwrote {path}")
    return 0


def cmd_bench_all(args) -> int:
    from engine.bench import suite  # deferred: off the CLI's start-up

    result = suite.run_all(n_per_class=args.per_class, image_size=args.image_size, epochs=args.epochs,
                              train_steps=args.train_steps, tokens=args.tokens, cold_start=not args.no_cold_start,
                              threads=args.threads, process_per_class=args.process_per_class,
                              process_image_size=args.process_image_size)
    path = suite.write_markdown(result, Path(args.out) if args.out else None)
    emit(args, result, suite.format_markdown(result) + f"\nwrote {path}")
    return 0


def cmd_bench_recipes(args) -> int:
    from engine.bench import recipe_bench  # deferred: off the CLI's start-up

    datasets, strategies = options.csv(args.datasets), options.csv(args.strategies)
    bad = [d for d in datasets if d not in recipe_bench.DATASETS] + [s for s in strategies if s not in recipe_bench.STRATEGIES]
    if bad or not datasets or not strategies:
        raise UserError(f"unknown dataset or strategy {', '.join(bad) or '(none given)'}; datasets: {', '.join(recipe_bench.DATASETS)}; "
                        f"strategies: {', '.join(recipe_bench.STRATEGIES)}")
    if not 1 <= args.seeds <= 10:
        raise UserError("--seeds must be from 1 to 10")
    logging.getLogger("engine").setLevel(logging.INFO)  # long: show each finished cell
    done = recipe_bench.run(datasets, strategies, seeds=tuple(range(args.seeds)), grid=not args.no_grid,
                             results=Path(args.results) if args.results else None)
    path = recipe_bench.write_markdown(done, Path(args.out) if args.out else workspace.PROJECT / "BENCHMARKS.md")
    emit(args, done, recipe_bench.format_markdown(done) + f"\nwrote {path}")
    return 0


def cmd_bench_generate(args) -> int:
    from engine.bench import speed  # deferred: off the CLI's start-up

    result = speed.bench_generate(new_tokens=args.tokens, repeats=args.repeats, threads=args.threads,
                                  models=tuple(args.models) if args.models else ("gpt2-124m-random", "mini"))
    emit(args, result, speed.format_generate(result))
    return 0


def add_commands(sub) -> None:
    """the benchmarks behind BENCHMARKS.md (not tests)."""
    bench = sub.add_parser("bench", help="benchmarks (not tests)").add_subparsers(dest="bench_command", required=True, parser_class=Parser)
    s = bench.add_parser("finetune", help="naive frozen-backbone loop vs the cached linear path")
    s.add_argument("--per-class", type=int, default=150, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=64, help="the mini backbone's own size")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_finetune)
    s = bench.add_parser("seed-loop", help="the seed's frozen-backbone loop as its own process (used by bench process)")
    s.add_argument("--list", required=True, help="JSON split written by bench process")
    s.add_argument("--image-size", type=int, default=160)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_seed_loop)
    s = bench.add_parser("process", help="whole processes from start to exit: the seed loop vs engine finetune --strategy linear")
    s.add_argument("--per-class", type=int, default=150, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=160)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_process)
    s = bench.add_parser("load", help="N real browser sessions generating and predicting at once against one server")
    s.add_argument("--sessions", type=int, default=10)
    s.add_argument("--seconds", type=float, default=60)
    s.add_argument("--rounds", type=int, default=2, help="the load again on the same server (memory growth)")
    s.add_argument("--no-train", action="store_true", help="no fine-tuning job meanwhile")
    s.add_argument("--apart", action="store_true",
                   help="browsers on the last CPU core, the server and its training job on the others (as phones in a room)")
    s.add_argument("--browsers-yield", action="store_true",
                   help="browsers on every core at the lowest CPU priority: the server keeps the machine when it needs it")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_load)
    s = bench.add_parser("all", help="every benchmark side by side; writes BENCHMARKS.md")
    s.add_argument("--per-class", type=int, default=40, help="generated images per class (4 classes)")
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--train-steps", type=int, default=3, help="timed full fine-tuning steps per variant")
    s.add_argument("--tokens", type=int, default=32, help="new tokens per generation run")
    s.add_argument("--process-per-class", type=int, default=150, help="whole-process row: generated images per class")
    s.add_argument("--process-image-size", type=int, default=160, help="whole-process row: image size")
    s.add_argument("--no-cold-start", action="store_true", help="skip the app cold-start measurement (needs Chromium)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_all)
    s = bench.add_parser("recipes", help="old defaults vs the recipe book vs a small grid, per strategy and dataset")
    s.add_argument("--datasets", default="sample,shapes,clothing,digits", help="comma list of sample,shapes,clothing,digits")
    s.add_argument("--strategies", default="linear,partial,full,two-phase,scratch")
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--no-grid", action="store_true", help="only the old and the new defaults")
    s.add_argument("--results", default=None, help="JSON file of finished cells (resumes from it)")
    s.add_argument("--out", default=None, help="markdown file (default: BENCHMARKS.md at the repository root)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_recipes)
    # (bench generate parser: bench.add_parser("generate", ...))
    s = bench.add_parser("generate", help="tokens/s: plain HF generate (fp32) vs the project's generation path")
    s.add_argument("--tokens", type=int, default=64, help="new tokens per run on the 124M-shaped model (the mini makes twice as many)")
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    s.add_argument("--models", nargs="+", choices=("gpt2-124m-random", "mini"), default=None)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_bench_generate)
