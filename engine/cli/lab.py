"""`engine lab …` and `engine pretrain vision|text`: the Transfer Lab's experiments and the bundled models' pretraining."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from engine.cli.common import Parser, emit
from engine.core import runs
from engine.core.errors import UserError


def cmd_pretrain_text(args) -> int:
    from engine.pretrain import mini_gpt2  # deferred: imports torch

    logging.getLogger("engine").setLevel(logging.INFO)  # pretraining is long: always show progress
    if args.remeasure:
        folder = Path(args.out) if args.out else mini_gpt2.TextPretrainConfig().out
        # the held-out fortunes' own grammar check is measured again where the fortunes are installed
        card = mini_gpt2.remeasure(folder, mini_gpt2.FORTUNES_DIR if mini_gpt2.FORTUNES_DIR.is_dir() else None)
        m = card["metrics"]
        emit(args, card, f"dictionary words {m['dictionary_words']} ({m['dictionary']}); sentences that parse {m['sentences_parse']} "
                         f"(held-out fortunes: {m.get('sentences_parse_fortunes')}); generation {m['generation_tokens_per_s']:.0f} "
                         f"tokens/s\nsample: {card['sample']['text']!r}\nwrote {folder / 'model_card.json'}")
        return 0
    if args.steps is None and args.minutes <= 0:
        raise UserError("--minutes must be > 0 (or give --steps)")
    if args.steps is not None and args.steps < 1:
        raise UserError("--steps must be >= 1")
    if args.anneal_steps < 0:
        raise UserError("--anneal-steps must be >= 0")
    cfg = mini_gpt2.TextPretrainConfig(minutes=args.minutes, steps=args.steps, seed=args.seed, threads=args.threads,
                                       precision=args.precision, anneal_steps=args.anneal_steps, anneal_grammar=args.anneal_grammar)
    if args.out:
        cfg.out = Path(args.out)
    card = mini_gpt2.pretrain_text(cfg, resume=args.resume)
    m = card["metrics"]
    emit(args, card, f"validation perplexity {m['val_perplexity']:.1f} ({m['bits_per_byte']:.3f} bits/byte) after "
                     f"{card['training']['steps']} steps\nsample: {card['sample']['text']!r}\nwrote {cfg.out}")
    return 0


def _numbers(value: str | None, what: str, kind: type = int) -> list | None:
    """A comma list from the command line (--ks 5,4,3 or --fractions 0.1,0.3,1); None when not given."""
    if value is None:
        return None
    try:
        return [kind(v) for v in value.split(",") if v.strip()]
    except ValueError:
        example = "1,5,10" if kind is int else "0.1,0.3,1"
        raise UserError(f"{what} must be a comma list of {'integers' if kind is int else 'numbers'}, e.g. {example} (got {value!r})") from None


def cmd_lab(args) -> int:
    from engine.jobs import JobContext, ctrl_c_cancels  # deferred: off the CLI's start-up
    from engine.lab import experiments  # deferred: imports torch

    cfg = experiments.LabConfig(
        experiment=args.lab_command, data=args.data, preset=args.preset, weights=args.weights,
        epochs=getattr(args, "epochs", None), seeds=getattr(args, "seeds", None), image_size=getattr(args, "image_size", None),
        batch_size=getattr(args, "batch_size", None), lr=getattr(args, "lr", None), ks=_numbers(getattr(args, "ks", None), "--ks"),
        sizes=_numbers(getattr(args, "sizes", None), "--sizes"), labels_per_class=getattr(args, "labels_per_class", None),
        ae_epochs=getattr(args, "ae_epochs", None), max_per_class=getattr(args, "max_per_class", None),
        steps=getattr(args, "steps", None), eval_every=getattr(args, "eval_every", None),
        fractions=_numbers(getattr(args, "fractions", None), "--fractions", float))
    resolved = cfg.resolved()  # bad options fail here, before a run is recorded
    cfg.data, title = experiments.data_and_title(cfg)  # "sample" or a demo key -> the dataset's name
    resolved.data = cfg.data
    run_id = runs.create("lab", title, {k: v for k, v in vars(cfg).items() if v is not None})
    stream = sys.stderr if args.json else sys.stdout
    seen = set()

    def on_report(p: dict) -> None:  # one line per finished epoch (or phase message)
        msg = p.get("message")
        if msg and msg not in seen and p.get("phase") in ("training", "pretraining", "measuring", "loading"):
            seen.add(msg)
            print(msg, file=stream, flush=True)

    ctx = JobContext(run_id=run_id, config=vars(resolved), run_dir=runs.run_dir(run_id), on_report=on_report)
    runs.set_status(run_id, "running")
    try:
        with ctrl_c_cancels(ctx):  # Ctrl-C: stop, keep finished runs
            summary = experiments.run_lab(cfg, ctx.run_dir, ctx)
    except BaseException as err:
        runs.set_status(run_id, "failed", error=str(err)[:300])
        raise
    runs.set_status(run_id, "cancelled" if ctx.cancelled() else "done", summary=summary)
    state = experiments.read_result(ctx.run_dir) or {}
    emit(args, experiments.cli_object(run_id, state), experiments.format_text(run_id, state))
    return 130 if ctx.cancelled() else 0


def cmd_lab_demo_data(args) -> int:
    from engine.data import demo_tasks  # deferred: off the CLI's start-up

    keys = args.keys or list(demo_tasks.DEMOS)
    done = [demo_tasks.import_demo(k) for k in keys]
    emit(args, {"datasets": done}, "\n".join(f"{d['dataset']!r}: " + ", ".join(f"{c} {n}" for c, n in d["classes"].items())
                                             + (" (already there)" if d["existed"] else "") for d in done))
    return 0


def cmd_pretrain_vision(args) -> int:
    from engine.pretrain import mini_resnet  # deferred: off the CLI's start-up

    logging.getLogger("engine").setLevel(logging.INFO)  # pretraining is long: always show progress
    if args.probe_only:
        card = mini_resnet.probe_vision(args.out or None, baseline=args.probe_baseline or None)
    else:
        cfg = mini_resnet.VisionPretrainConfig(minutes=args.minutes, steps=args.steps, seed=args.seed,
                                            threads=args.threads, out=args.out or "", probe=not args.no_probe)
        if cfg.steps is None and (cfg.minutes is None or cfg.minutes <= 0):
            raise UserError("--minutes must be > 0 (or give --steps)")
        if cfg.steps is not None and cfg.steps < 1:
            raise UserError("--steps must be >= 1")
        card = mini_resnet.pretrain_vision(cfg, resume=args.resume)
    emit(args, card)
    return 0


def add_commands(sub) -> None:
    """the Transfer Lab's experiments and the bundled models' pretraining."""
    # (showcase parsers)

    # (lab parsers)
    lab_p = sub.add_parser("lab", help="Transfer Lab experiments: compare, freeze, data-size, unsupervised, advise").add_subparsers(
        dest="lab_command", required=True, parser_class=Parser)
    for name, what in (("compare", "pretrained vs from scratch: both curves and start / slope / asymptote"),
                       ("freeze", "sweep k frozen stages (5 = linear probe ... 0 = all train) + the lr/10 rule"),
                       ("data-size", "accuracy vs labelled images per class, pretrained vs scratch"),
                       ("unsupervised", "autoencoder pretrained without labels, fine-tuned with few labels, vs scratch"),
                       ("advise", "size x similarity -> scenario and recommended strategy")):
        s = lab_p.add_parser(name, help=what)
        s.add_argument("--data", default="Fruit (sample)", help="workspace dataset, folder/ZIP, 'sample' or a demo key (lab demo-data)")
        s.add_argument("--preset", default="quick", choices=["quick", "thorough"])
        s.add_argument("--weights", default="auto", help="the pretrained side: auto | imagenet | mini | FILE.safetensors")
        s.add_argument("--image-size", type=int, default=None, help="pixels (default: the preset's)")
        if name == "advise":
            s.add_argument("--max-per-class", type=int, default=None, help="images per class used to measure similarity")
        else:
            s.add_argument("--epochs", type=int, default=None)
            s.add_argument("--seeds", type=int, default=None, help="runs per setting, averaged (spread shown)")
            s.add_argument("--batch-size", type=int, default=None)
            s.add_argument("--lr", type=float, default=None, help="learning rate of the new output layer")
        if name == "freeze":
            s.add_argument("--ks", default=None, help="frozen stages to try, e.g. 5,4,3,2,1,0")
        if name == "data-size":
            s.add_argument("--sizes", default=None, help="labelled images per class, e.g. 1,5,10,0 (0 = all)")
        if name == "unsupervised":
            s.add_argument("--labels-per-class", type=int, default=None)
            s.add_argument("--ae-epochs", type=int, default=None, help="autoencoder pretraining epochs")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_lab)
    for name, what in (("text-compare", "the language model pretrained vs from scratch on a new text: perplexity curves, start / slope / asymptote"),
                       ("text-data-size", "the language model on 10%%, 30%%, 100%% of a new text, pretrained vs scratch")):
        s = lab_p.add_parser(name, help=what)
        s.add_argument("--data", default="example", help="the new text: 'example' (Genesis, King James Version) or a .txt file")
        s.add_argument("--preset", default="quick", choices=["quick", "thorough"])
        s.add_argument("--weights", default="auto", help="the pretrained language model: auto | mini | gpt2 | a model folder")
        s.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the preset's)")
        s.add_argument("--eval-every", type=int, default=None, help="steps between perplexity measurements")
        s.add_argument("--seeds", type=int, default=None, help="runs per setting, averaged (spread shown)")
        s.add_argument("--batch-size", type=int, default=None)
        s.add_argument("--lr", type=float, default=None, help="learning rate, the same for both sides")
        if name == "text-data-size":
            s.add_argument("--fractions", default=None, help="shares of the training text, e.g. 0.1,0.3,1")
        s.add_argument("--json", action="store_true")
        s.set_defaults(func=cmd_lab)
    s = lab_p.add_parser("demo-data", help="import the built-in similar/different demo datasets into the workspace")
    s.add_argument("keys", nargs="*", help="similar-small, similar-large, different-small, different-large, clothing (default: all)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lab_demo_data)

    # (pretrain parsers)
    pre = sub.add_parser("pretrain", help="reproducibly pretrain the bundled mini models").add_subparsers(dest="pretrain_command", required=True, parser_class=Parser)
    s = pre.add_parser("vision", help="pretrain the mini resnet18 (Fashion-MNIST + fractals) into assets/mini-resnet18")
    s.add_argument("--minutes", type=float, default=20.0, help="time budget, turned into a fixed step count (default 20)")
    s.add_argument("--steps", type=int, default=None, help="exact number of steps (reproducible; overrides --minutes)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    s.add_argument("--out", default="", help="output folder (default assets/mini-resnet18)")
    s.add_argument("--no-probe", action="store_true", help="skip the linear-probe transfer measurement")
    s.add_argument("--probe-only", action="store_true", help="only re-measure the transfer numbers of an existing backbone")
    s.add_argument("--resume", action="store_true", help="continue the last run from its saved training state")
    s.add_argument("--probe-baseline", default="", help="with --probe-only: also probe an earlier backbone's folder, as `previous`")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pretrain_vision)
    add_pretrain_text(pre)


def add_pretrain_text(pre) -> None:
    """`engine pretrain text`: the bundled mini GPT-2."""
    s = pre.add_parser("text", help="pretrain the mini GPT-2 (own BPE, Debian fortunes) into assets/mini-gpt2")
    s.add_argument("--minutes", type=float, default=30.0, help="time budget, turned into a fixed step count (default 30)")
    s.add_argument("--steps", type=int, default=None, help="exact number of steps (reproducible; overrides --minutes)")
    s.add_argument("--seed", type=int, default=1337)
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    s.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast the matmuls (1.5x faster on CPUs with native bf16, e.g. AVX-512 BF16; slow elsewhere)")
    s.add_argument("--anneal-steps", type=int, default=0,
                   help="then this many steps on the cleanest fortunes only (with --resume: also after a finished run)")
    s.add_argument("--anneal-grammar", action="store_true",
                   help="anneal only on the fortunes whose every sentence parses (needs Debian's python3-link-grammar)")
    s.add_argument("--out", default="", help="output folder (default assets/mini-gpt2)")
    s.add_argument("--resume", action="store_true", help="continue the last run from its saved optimizer state")
    s.add_argument("--remeasure", action="store_true", help="only measure the samples of an existing model again and rewrite its card")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_pretrain_text)
