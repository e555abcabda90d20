"""Language models: loading (once per process, best device, dtype measured), prompts, perplexity.

Generation lives in engine.text.generation, the user's text in engine.text.text_files, LM
fine-tuning in engine.text.lm_finetune, generation history in engine.text.history. Models come from engine.models.sources.resolve_text: `auto`, `mini` (assets/mini-gpt2),
a GPT-2-family hub id from the local Hugging Face cache, or a local HF folder. Never
trust_remote_code; weights are safetensors (transformers refuses pickle unless asked).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core import runs, workspace
from engine.core.device import best_device
from engine.core.errors import UserError
from engine.models import sources, store

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DecodeQueue:
    """Generation requests waiting for a model that is busy decoding (engine.text.generation batches them)."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    pending: list = field(default_factory=list)
    busy: bool = False


@dataclass
class LM:
    """A loaded causal LM, shared read-only by every caller in the process.

    `lock` serialises generation on it: two sessions sharing one model would otherwise fight over
    the CPU cores, and it keeps the per-sample timing honest. Requests that arrive while it is held
    wait in `queue` and are then decoded together, as rows of one batch.
    """

    model: torch.nn.Module
    tokenizer: object
    name: str          # what the UI shows
    spec: str          # what the user asked for: auto, mini, gpt2, a folder
    source: sources.Source
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str
    context: int       # max positions (prompt + new tokens)
    threads: int | None = None  # torch threads while decoding (None: leave as is); see decode_threads
    lock: threading.RLock = field(default_factory=threading.RLock)
    queue: DecodeQueue = field(default_factory=DecodeQueue)

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def dtype_name(self) -> str:
        return next(k for k, v in DTYPES.items() if v == self.dtype)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


MAX_LOADED = 4  # models kept in memory per process; the least recently used one is dropped
_cache: "OrderedDict[tuple, LM]" = OrderedDict()
_cache_lock = threading.Lock()


def load(spec: str = "auto", dtype: str | None = None) -> LM:
    """Load (or return the already loaded) model for `spec`; `dtype` forces fp32/bf16/fp16."""
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    source = sources.resolve_text(spec)
    key = (str(source.path or source.name), dtype or os.environ.get("TRANSFER_STUDIO_TEXT_DTYPE"), str(best_device()))
    with _cache_lock:
        if key not in _cache:
            _cache[key] = _load(spec, source, dtype)
            while len(_cache) > MAX_LOADED:
                _cache.popitem(last=False)
        _cache.move_to_end(key)
        return _cache[key]


def quiet_transformers() -> None:
    """No progress bars on stderr (CLI output, logs) and no advisory warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _load(spec: str, source: sources.Source, dtype: str | None) -> LM:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()

    path = source.path
    if source.download:  # a hub model not on this machine yet: the model manager fetches and checks it first

        path = store.download(source.download)
    where = str(path) if path else source.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, local_files_only=True, dtype=torch.float32)
    except OSError as err:
        raise UserError(
            f"could not load the language model {source.name!r} ({err.__class__.__name__}: {str(err).splitlines()[0][:200]}); "
            "use --model mini, or place a Hugging Face model folder (config.json, model.safetensors, tokenizer files) and pass its path"
        ) from None
    except (ValueError, KeyError) as err:
        raise UserError(f"{source.name!r} is not a causal language model transformers can load without remote code: {str(err)[:200]}") from None
    # GPT-2 has no pad token: pad with end-of-text so batched / multi-sample generation works.
    if tokenizer.eos_token_id is None:
        raise UserError(f"{source.name!r} has no end-of-text token; only GPT-2-style causal models are supported")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    # Our sampling loop never pads (all rows of a batch share one length), so the forward pass needs
    # no pad id; with one set, GPT-2 warns whenever an end-of-text token appears in its input.
    model.config.pad_token_id = None
    device = best_device()
    model.to(device).eval()
    model.requires_grad_(False)
    chosen, threads, reason = choose_inference(model, device, key=f"{source.kind}:{where}", forced=dtype)
    if chosen != torch.float32:
        model.to(chosen)
    context = int(getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024))
    name = source.name
    card = source.path / "model_card.json" if source.path else None
    if card is not None and card.is_file():
        try:
            name = json.loads(card.read_text()).get("name") or name
        except ValueError:
            pass
    log.info("loaded %s on %s in %s (%s)", name, device, chosen, reason)
    return LM(model, tokenizer, name, spec, source, device, chosen, reason, context, threads)


def model_choices() -> dict[str, str]:
    """{spec: label} of the language models usable now: auto, the bundled mini, cached hub models, fine-tuned runs."""

    out = {"auto": "auto (best available)"}
    if sources.mini_text_available():
        out["mini"] = "mini-gpt2 (bundled, 2.6M parameters)"
    for hub_id in sources.TEXT_HUB_IDS:
        if sources.hf_cached(hub_id):
            out[hub_id] = f"{hub_id} (Hugging Face cache)"

    for hub_id in store.imported_hub_ids():
        out[hub_id] = f"{hub_id} (imported)"
    for run in runs.list_runs("lm-finetune"):
        folder = Path(run["dir"]) / "model"
        if (folder / "config.json").is_file():
            out[str(folder)] = f"fine-tuned: {run['title']} ({run['id']})"
    return out


# ----------------------------------------------------------------------------- threads and dtype
SMALL_MODEL_PARAMS = 30_000_000


def decode_threads(model, device: torch.device) -> int | None:
    """One CPU thread for decoding small models, else torch's default.

    A decoding step of a few-million-parameter model is a handful of ~200x600 matmuls (tens of
    microseconds each): splitting them over threads costs more in synchronisation than it saves,
    and on a busy machine a 2-thread OpenMP barrier waits for a descheduled core. Measured here
    on the 2-core CPU: 1 thread decoded a tiny GPT-2 ~8x faster than 2 while other work ran.
    torch's thread count is per calling thread, so this does not slow other threads down.
    """
    if device.type != "cpu":
        return None
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS else None


class thread_count:
    """Context manager: torch intra-op threads for this thread only, restored on exit."""

    def __init__(self, n: int | None) -> None:
        self.n, self.prev = n, None

    def __enter__(self):
        if self.n and self.n != torch.get_num_threads():
            self.prev = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        if self.prev is not None:
            torch.set_num_threads(self.prev)


def can_pad(model, lean: bool = True) -> bool:
    """Whether start_decoding can take left-padded rows (prompts of different lengths in one batch)."""
    from engine.text.leangpt2 import LeanGPT2  # deferred: imports torch

    return lean and LeanGPT2.supports(model)


def start_decoding(model, ids: torch.Tensor, max_new_tokens: int, lean: bool = True, pads: list[int] | None = None):
    """Run the prompt ids (B, T) through `model`; return (last-position logits (B, vocab), advance), where
    advance(next_ids (B,)) feeds one token per sequence and returns the next logits (KV cache kept inside).

    GPT-2 models go through the lean forward (engine.leangpt2: same weights, without HF's per-call
    bookkeeping), which also takes left-padded rows (`pads`); other architectures, or lean=False,
    through HF's forward, unpadded only.
    """
    from engine.text.leangpt2 import LeanGPT2  # deferred: imports torch

    if can_pad(model, lean):
        decoder = LeanGPT2(model)
        return decoder.prefill(ids, max_new_tokens, pads), decoder.step
    if pads and any(pads):
        raise ValueError("padded rows need the lean GPT-2 forward")
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)  # only the last position's logits

    def advance(next_ids: torch.Tensor) -> torch.Tensor:
        nonlocal out
        out = model(input_ids=next_ids[:, None], cache=out.cache, use_cache=True)
        return out.logits[:, -1, :]
    return out.logits[:, -1, :], advance


def _decode_speed(model, device: torch.device, steps: int = 8) -> float:
    """Seconds per generated token: a 16-token prompt, then `steps` single-token steps with the KV cache,
    through the forward generation uses (start_decoding)."""
    ids = torch.randint(1, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        _, advance = start_decoding(model, ids, steps)
        t0 = time.perf_counter()
        for _ in range(steps):
            advance(ids[:, -1])
    return (time.perf_counter() - t0) / steps


def choose_inference(model, device: torch.device, key: str, forced: str | None = None) -> tuple[torch.dtype, int | None, str]:
    """dtype (fp32 / bf16) and CPU threads for decoding, by measurement, once per model and machine.

    bf16 halves the bytes read per token, which made a GPT-2-124M-shaped model 1.8x faster on a CPU
    with native bf16, but on CPUs without it (AVX2 only) and for few-million-parameter models it is
    slower. Likewise the default thread count wins on an idle many-core machine, one thread on a busy
    one. So we time a few decoding steps of each option, alternating so a noisy neighbour hurts all
    alike, and keep bf16 only when >= 1.2x faster than fp32 and one thread only when >= 1.1x faster.
    The choice is remembered in the workspace (cache/text-dtype.json): the same machine keeps making
    the same choice, so a seed keeps giving the same text. CUDA uses its AMP dtype; MPS stays fp32.
    """
    forced = forced or os.environ.get("TRANSFER_STUDIO_TEXT_DTYPE")
    if device.type == "cuda":
        from engine.core.device import amp_dtype  # deferred: imports torch

        dt = DTYPES[forced] if forced else amp_dtype(device)
        return dt, None, f"{str(dt).replace('torch.', '')} on CUDA"
    if device.type != "cpu":
        return DTYPES.get(forced or "fp32"), None, f"{forced or 'fp32'} on {device.type}"
    rule = decode_threads(model, device)
    threads = [rule] if rule else sorted({torch.get_num_threads(), 1}, reverse=True)  # default first
    dtypes = [forced] if forced else ["fp32", "bf16"]
    n_params = sum(p.numel() for p in model.parameters())
    memo_path = workspace.subdir("cache") / "text-dtype.json"
    memo_key = f"{key}|{n_params}|{torch.__version__}|{torch.get_num_threads()}|{','.join(dtypes)}|lean"
    memo = workspace.read_json(memo_path, {})
    if memo_key not in memo:
        models = {"fp32": model} if "fp32" in dtypes else {}
        if "bf16" in dtypes:
            models["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
        if "fp16" in dtypes:
            models["fp16"] = copy.deepcopy(model).to(torch.float16)
        steps = 8 if n_params < SMALL_MODEL_PARAMS else 4
        times: dict[str, float] = {}
        for round_ in range(3):
            for name, m in models.items():
                for t in threads:
                    with thread_count(t):
                        dt = _decode_speed(m, device, 2 if round_ == 0 else steps)
                    if round_:  # round 0 is the warm-up
                        times[f"{name}@{t}"] = min(times.get(f"{name}@{t}", float("inf")), dt)
        del models
        memo[memo_key] = {**times, "measured": time.time()}
        workspace.atomic_write_json(memo_path, memo)
    times = memo[memo_key]

    def best_threads(name: str) -> int:
        default = threads[0]
        return 1 if 1 in threads and times[f"{name}@{default}"] / times[f"{name}@1"] >= 1.1 else default

    picks = {name: best_threads(name) for name in dtypes}
    chosen = dtypes[0]
    if "bf16" in dtypes:
        speedup = times[f"fp32@{picks['fp32']}"] / times[f"bf16@{picks['bf16']}"]
        chosen = "bf16" if speedup >= 1.2 else "fp32"
        why = f"bf16 measured {speedup:.2f}x fp32" + (" here" if chosen == "bf16" else ", not worth it here")
    else:
        why = "requested"
    t = picks[chosen]
    thread_note = f"{t} thread{'s' if t > 1 else ''}" + (" (small model)" if rule else f" (measured; default {threads[0]})")
    return DTYPES[chosen], t, f"{chosen} on {thread_note}: {why}"


# ----------------------------------------------------------------------------- prompts
@dataclass
class Prompt:
    ids: list[int]
    text: str            # the prompt text actually used (after truncation)
    notice: str | None   # set when the prompt was shortened or fewer new tokens fit
    max_new_tokens: int = 0  # new tokens that fit after it in the model's context


def check_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        raise UserError("the prompt is empty; type a few words for the model to continue")


def encode_prompt(lm: LM, prompt: str, max_new_tokens: int) -> Prompt:
    """Tokenize and refuse an empty prompt; fit prompt + new tokens into the model's context.

    The prompt is kept whole and the new tokens are bounded by the room left after it, as long as
    that room is at least a quarter of the context (or all that was asked for). Only a prompt that
    leaves less is shortened: its last tokens are kept, with room for that many new ones.
    """
    check_prompt(prompt)
    if max_new_tokens < 1:
        raise UserError("ask for at least 1 new token")
    ids = lm.tokenizer(prompt)["input_ids"]
    if len(ids) + max_new_tokens <= lm.context:
        return Prompt(ids, prompt, None, max_new_tokens)
    reserve = max(1, min(max_new_tokens, lm.context // 4))
    if len(ids) + reserve <= lm.context:
        fit = lm.context - len(ids)
        notice = (f"{lm.name} sees at most {lm.context} tokens and your prompt is {len(ids)}, "
                  f"so {fit} new tokens fit (of the {max_new_tokens} asked for).")
        return Prompt(ids, prompt, notice, fit)
    room = lm.context - reserve
    kept = ids[-room:]
    notice = (
        f"The prompt is {len(ids)} tokens but {lm.name} sees at most {lm.context} tokens; "
        f"kept its last {room} tokens so that {reserve} new tokens fit."
    )
    return Prompt(kept, lm.tokenizer.decode(kept), notice, reserve)


# ----------------------------------------------------------------------------- scoring
@dataclass
class TokenScore:
    token: str
    prob: float                        # the model's probability of this token (before sampling settings)
    alternatives: list[tuple[str, float]]  # top tokens at this position, most likely first


@torch.inference_mode()
def score_tokens(lm: LM, prompt_ids: list[int], new_ids: list[int], top: int = 5) -> tuple[list[TokenScore], float]:
    """Each new token's probability and the top alternatives, and the perplexity of the new text.

    One forward pass over prompt + output after generation (so streaming stays fast); the
    probabilities are the model's own distribution, before temperature / top-k / top-p.
    """
    if not new_ids:
        return [], float("nan")
    ids = torch.tensor([prompt_ids + new_ids], device=lm.device)[:, -lm.context :]
    n = len(new_ids)
    # no lock: a forward without a cache changes nothing in the model, so it need not wait for generations
    logits = lm.model(input_ids=ids).logits[0, -n - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(new_ids, device=logp.device)
    chosen = logp.gather(1, target[:, None])[:, 0]
    top_lp, top_ids = logp.topk(min(top, logp.shape[-1]), dim=-1)
    out = []
    for i in range(n):
        alts = [(lm.tokenizer.decode([t]), math.exp(v)) for t, v in zip(top_ids[i].tolist(), top_lp[i].tolist())]
        out.append(TokenScore(lm.tokenizer.decode([new_ids[i]]), math.exp(chosen[i].item()), alts))
    return out, math.exp(-chosen.mean().item())


@torch.inference_mode()
def perplexity(model, token_ids: list[int] | torch.Tensor, block_size: int, batch_size: int = 8, device: torch.device | None = None) -> float:
    """exp(mean next-token loss) over a token stream cut into non-overlapping blocks."""
    data = torch.as_tensor(token_ids, dtype=torch.long)
    if len(data) < 2:
        raise UserError("the text is too short to measure perplexity (fewer than 2 tokens)")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    # Full blocks in batches, then the remainder; y is x shifted by one token.
    n_full = (len(data) - 1) // block_size
    xs = data[: n_full * block_size].view(n_full, block_size)
    ys = data[1 : n_full * block_size + 1].view(n_full, block_size)
    pieces = [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, n_full, batch_size)]
    if len(data) - 1 > n_full * block_size:
        pieces.append((data[n_full * block_size : -1][None], data[n_full * block_size + 1 :][None]))
    total, count = 0.0, 0
    for x, y in pieces:
        logits = model(input_ids=x.to(device)).logits.float()
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return math.exp(total / count)
