"""`engine generate|lm-finetune`: the language model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import ProgressLine, emit


def cmd_generate(args) -> int:
    from engine.text import causal_lm, generation  # deferred: imports torch

    cfg = generation.GenerationConfig(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
        num_return_sequences=args.num_return_sequences, seed=args.seed, stop=args.stop or [],
    ).validate()
    causal_lm.check_prompt(args.prompt)
    lm = causal_lm.load(args.model)
    gen = generation.generate(lm, args.prompt, cfg)
    if gen.prompt_notice:
        print(f"note: {gen.prompt_notice}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": lm.name, "samples": [s.text for s in gen.samples], "tokens_per_s": round(gen.tokens_per_s, 1),
                          "seed": gen.seed, "completions": [s.completion for s in gen.samples], "finish": [s.finish for s in gen.samples],
                          "new_tokens": gen.new_tokens, "seconds": round(gen.seconds, 3), "dtype": gen.dtype}))
    else:
        print("\n\n---\n\n".join(s.text for s in gen.samples))
        # stdout holds only the texts (byte-identical for the same seed); the stats go to stderr
        print(f"[{lm.name} · {gen.new_tokens} tokens in {gen.seconds:.2f} s · {gen.tokens_per_s:.1f} tokens/s · seed {gen.seed}]", file=sys.stderr)
    return 0


def cmd_lm_finetune(args) -> int:
    from engine.jobs import JobContext, ctrl_c_cancels  # deferred: off the CLI's start-up
    from engine.text import lm_finetune  # deferred: imports torch
    from engine.text import text_files  # deferred: off the CLI's start-up

    texts = [str(text_files.EXAMPLE_TEXT) if t == "example" else t for t in args.text]
    cfg = lm_finetune.LMFinetuneConfig(texts=texts, model=args.model, epochs=args.epochs, lr=args.lr, block_size=args.block_size,
                                   batch_size=args.batch_size, seed=args.seed, sample_prompt=args.prompt or "").validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stream = sys.stderr if args.json else sys.stdout
    seen = {"epoch": None}
    download_line = ProgressLine(stream)

    def on_report(p: dict) -> None:
        if p.get("phase") == "downloading":
            download_line(**p)
        elif p.get("phase") in ("loading", "evaluating", "sampling", "resuming"):
            print(p.get("message", ""), file=stream, flush=True)
        elif p.get("phase") == "training" and (p["step"] == p["steps"] or p["epoch"] != seen["epoch"]):
            seen["epoch"] = p["epoch"]
            print(f"epoch {p['epoch']}/{p['epochs']} step {p['step']}/{p['steps']} loss {p['loss']:.3f} ({p['tokens_s']:.0f} tokens/s)", file=stream, flush=True)

    ctx = JobContext(run_id=out.name, config=cfg.__dict__, run_dir=out, resume=args.resume, on_report=on_report)
    with ctrl_c_cancels(ctx):  # Ctrl-C: stop, keep a resumable checkpoint
        summary = lm_finetune.run_job(ctx)
    if ctx.cancelled():
        emit(args, summary, f"cancelled at step {summary['step']}/{summary['steps']}; continue with --resume")
        return 130
    text = (f"perplexity on the held-out text: before {summary['ppl_before']:.2f} -> after {summary['ppl_after']:.2f}\n"
            f"prompt: {summary['sample_prompt']!r} (seed {summary['sample_seed']})\n"
            f"base:       {summary['sample_base']!r}\nfine-tuned: {summary['sample_finetuned']!r}\nwrote {summary['model_dir']}")
    emit(args, {k: v for k, v in summary.items() if k != "losses"}, text)
    return 0


def add_commands(sub) -> None:
    """generate, lm-finetune."""
    s = sub.add_parser("generate", help="generate text with GPT-2 or the bundled mini model")
    s.add_argument("--model", default="auto", help="auto | mini | gpt2 | distilgpt2 | hub id | PATH to a Hugging Face model folder")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=60)
    s.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=40, help="0 = off")
    s.add_argument("--top-p", type=float, default=0.95, help="1 = off")
    s.add_argument("--repetition-penalty", type=float, default=1.1, help="1 = off")
    s.add_argument("--no-repeat-ngram-size", type=int, default=0, help="0 = off")
    s.add_argument("--num-return-sequences", type=int, default=1, help="1..5")
    s.add_argument("--seed", type=int, default=None, help="same seed + options -> the same text (default: a fresh seed, printed)")
    s.add_argument("--stop", nargs="+", default=None, metavar="STR", help="end a sample when it produces one of these strings")
    s.add_argument("--json", action="store_true", help='{"model", "samples", "tokens_per_s", "seed", ...}')
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("lm-finetune", help="fine-tune the language model on your own .txt files")
    s.add_argument("--text", nargs="+", required=True, metavar="FILE",
                   help="UTF-8 .txt files; `example` is the bundled Genesis (King James Version)")
    s.add_argument("--model", default="auto", help="auto | mini | gpt2 | hub id | PATH")
    s.add_argument("--epochs", type=int, default=None, help="passes over the text (default: about 300 steps' worth, from its size)")
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--block-size", type=int, default=128)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prompt", default="", help="prompt for the base vs fine-tuned samples (default: start of the held-out text)")
    s.add_argument("--out", required=True, metavar="DIR", help="run folder; the model goes to DIR/model")
    s.add_argument("--resume", action="store_true", help="continue from DIR's last checkpoint")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_lm_finetune)
