"""Text generation: settings, presets, a lean sampling loop, streaming with a real Stop, token scores.

The loop is nanoGPT's `generate` with a KV cache: one forward per step over the last token,
Hugging Face's own logits processors for the knobs (repetition penalty, no-repeat n-gram,
temperature, top-k, top-p), then sampling with a private torch.Generator. Compared with
`model.generate` this keeps the per-token Python work small, makes the seed independent of
anything else using torch's global RNG in the process (a training job, another session), and
lets one place check the Stop event and the stop strings after every token.

Requests that arrive while a model is busy are decoded together, as rows of one batch (decode()).

Streaming: `Stream` runs the loop in a worker thread that feeds an HF `TextIteratorStreamer`
(batch size 1); the consumer iterates with a timeout so a dead worker cannot hang the page, and
leaving the iteration early (Stop button, page rerun) sets the stop event so the backend stops too.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Callable, Iterator

import torch

from engine.core.errors import UserError, number_in
from engine.text.causal_lm import LM, TokenScore, can_pad, encode_prompt, score_tokens, start_decoding, thread_count

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 512
MAX_SAMPLES = 5
MAX_STOP_STRINGS = 8
STREAM_TIMEOUT_S = 60.0  # longest wait for the next chunk before the page gives up on the worker
# wall-clock budget of one generation (all samples); a shared demo must not be held by one long request
MAX_GENERATION_SECONDS = float(os.environ.get("TRANSFER_STUDIO_MAX_GENERATION_SECONDS", 120))


@dataclass
class GenerationConfig:
    """Sampling settings. temperature 0 means greedy; top_k 0, top_p 1 and repetition_penalty 1 mean off."""

    max_new_tokens: int = 60
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.1
    no_repeat_ngram_size: int = 0
    num_return_sequences: int = 1
    seed: int | None = None          # None: a fresh seed is drawn and reported
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "GenerationConfig":
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(number_in(self.max_new_tokens, 1, MAX_NEW_TOKENS, integer=True), f"max new tokens must be 1..{MAX_NEW_TOKENS} (got {self.max_new_tokens})")
        need(number_in(self.temperature, 0.0, 5.0), f"temperature must be between 0 (greedy) and 5 (got {self.temperature})")
        need(number_in(self.top_k, 0, 100_000, integer=True), f"top-k must be 0 (off) or a positive number of tokens (got {self.top_k})")
        need(number_in(self.top_p, 0.0, 1.0) and self.top_p > 0, f"top-p must be in (0, 1] (got {self.top_p})")
        need(number_in(self.repetition_penalty, 1.0, 3.0), f"repetition penalty must be between 1 (off) and 3 (got {self.repetition_penalty})")
        need(number_in(self.no_repeat_ngram_size, 0, 10, integer=True), f"no-repeat n-gram size must be 0 (off) to 10 (got {self.no_repeat_ngram_size})")
        need(number_in(self.num_return_sequences, 1, MAX_SAMPLES, integer=True), f"number of samples must be 1..{MAX_SAMPLES} (got {self.num_return_sequences})")
        need(self.seed is None or number_in(self.seed, 0, 2**63 - 1, integer=True), f"seed must be a non-negative integer (got {self.seed})")
        need(isinstance(self.stop, (list, tuple)) and len(self.stop) <= MAX_STOP_STRINGS, f"stop strings must be a list of at most {MAX_STOP_STRINGS}")
        need(all(isinstance(s, str) and s for s in self.stop), "stop strings must not be empty")
        need(self.temperature > 0 or self.num_return_sequences == 1, "greedy decoding (temperature 0) gives the same text every time; ask for 1 sample or raise the temperature")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GenerationConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# Visible in the UI next to the preset picker; each is a complete set of sampling knobs.
PRESETS: dict[str, dict] = {
    "Precise": {"temperature": 0.3, "top_k": 20, "top_p": 0.9, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
    "Balanced": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1, "no_repeat_ngram_size": 0},
    "Creative": {"temperature": 1.1, "top_k": 0, "top_p": 0.98, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0},
}


@dataclass
class Sample:
    text: str          # prompt + completion
    completion: str
    token_ids: list[int]
    finish: str        # "length" | "end of text" | "stop string" | "stopped" | "time limit"


@dataclass
class Generation:
    model: str
    prompt: str
    prompt_notice: str | None
    prompt_ids: list[int]
    settings: dict     # the GenerationConfig with the seed actually used
    seed: int
    samples: list[Sample]
    new_tokens: int    # over all samples
    seconds: float
    tokens_per_s: float
    dtype: str

    def stats(self) -> dict:
        return {"model": self.model, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 3),
                "tokens_per_s": round(self.tokens_per_s, 1), "dtype": self.dtype, "seed": self.seed,
                "samples": len(self.samples), "finish": [s.finish for s in self.samples]}


def _processors(cfg: GenerationConfig, eos_id: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """HF's logits processors for these settings, applied in order: (ids, scores) -> scores."""
    from transformers.generation.logits_process import (NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    procs = []
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.no_repeat_ngram_size > 0:
        procs.append(NoRepeatNGramLogitsProcessor(cfg.no_repeat_ngram_size))
    if cfg.temperature > 0:  # greedy ignores the sampling warpers
        if cfg.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k > 0:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p < 1.0:
            procs.append(TopPLogitsWarper(cfg.top_p))

    def apply(ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # called directly: LogitsProcessorList inspects every processor's signature on every token
        for proc in procs:
            scores = proc(ids, scores)
        return scores
    return apply


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


@dataclass
class Request:
    """One generation waiting to be decoded, alone or as rows of a batch with others."""

    prompt_ids: list[int]
    cfg: GenerationConfig
    seed: int
    stop_event: threading.Event | None = None
    on_token: Callable[[int], None] | None = None  # sample 0's new tokens, as they come
    ignore_eos: bool = False  # benchmarks only: keep going past end-of-text, so every run makes max_new_tokens tokens
    lean: bool = True
    samples: list[Sample] | None = None  # set once all its rows are finished
    seconds: float = 0.0                 # from the start of its batch to its last token
    error: BaseException | None = None


MAX_BATCH_ROWS = 16  # rows decoded together; more waiting requests go in the next batch


@torch.inference_mode()
def decode_batch(lm: LM, requests: list[Request], on_done: Callable[[Request], None] = lambda r: None) -> None:
    """Decode requests together: the num_return_sequences rows of every request in one batch, prompts of
    different lengths left-padded. Each request keeps what it would have alone: its own settings (logits
    processors on its own rows and tokens), its own torch.Generator for sampling, its own stop event, stop
    strings and length; so the same seed gives the same text as decoded alone, up to the float rounding of
    a batched matmul (a near-tie between two tokens could then go the other way). A request is handed
    to `on_done` as soon as its rows are finished, while the others go on.

    The gain is the forward pass: one step of a small model costs about the same for 1 row as for 10.
    """
    tok, eos = lm.tokenizer, lm.eos_id
    if len(requests) > 1 and len({len(r.prompt_ids) for r in requests}) > 1 and not can_pad(lm.model, requests[0].lean):
        for r in requests:  # this forward cannot take padded rows: one after another
            decode_batch(lm, [r], on_done)
        return
    span, pads, batch = _rows(requests, eos, lm.device)
    rows = len(pads)
    ids = [torch.tensor([r.prompt_ids] * r.cfg.num_return_sequences, dtype=torch.long, device=lm.device) for r in requests]
    gens = [torch.Generator(device=lm.device).manual_seed(r.seed) for r in requests]
    procs = [_processors(r.cfg, eos) for r in requests]
    new: list[list[int]] = [[] for _ in range(rows)]
    finish = ["length"] * rows
    done = [False] * rows
    left = list(range(len(requests)))  # requests not yet handed back
    t0 = time.perf_counter()
    deadline = time.monotonic() + MAX_GENERATION_SECONDS
    # The prompts in one forward, then one token per row per step with the KV cache.
    last, advance = start_decoding(lm.model, batch, max(r.cfg.max_new_tokens for r in requests), requests[0].lean, pads)
    last = last.float()
    step = 0
    while True:
        late = step and time.monotonic() > deadline  # always at least one token
        for k in left:
            r, (a, b) = requests[k], span[k]
            why = ("length" if step >= r.cfg.max_new_tokens else "stopped" if r.stop_event is not None and r.stop_event.is_set()
                   else "time limit" if late else None)
            if why:
                for i in range(a, b):
                    finish[i] = finish[i] if done[i] else why
                    done[i] = True
        for k in [k for k in left if all(done[slice(*span[k])])]:
            r, (a, b) = requests[k], span[k]
            r.samples, r.seconds = _samples(tok, r, new[a:b], finish[a:b]), time.perf_counter() - t0
            left.remove(k)
            on_done(r)
        if not left:
            break
        picked = [eos] * rows  # finished rows keep stepping in the batch; their tokens are ignored
        for k in left:
            r, (a, b) = requests[k], span[k]
            logits = last[a:b]
            if r.ignore_eos:
                logits[:, eos] = -float("inf")  # before top-k/top-p, so they never leave only end-of-text
            scores = procs[k](ids[k], logits)
            if r.cfg.temperature == 0:
                nxt = scores.argmax(dim=-1)
            else:
                nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gens[k])[:, 0]
            streamed = None  # sample 0's new token, for the streamer
            for i, t in zip(range(a, b), nxt.tolist()):
                if done[i]:
                    continue
                if t == eos:
                    done[i], finish[i] = True, "end of text"
                    continue
                new[i].append(t)
                picked[i] = t
                streamed = t if i == a else streamed
                if r.cfg.stop and _find_stop(tok.decode(new[i], skip_special_tokens=True), r.cfg.stop) is not None:
                    done[i], finish[i] = True, "stop string"
                    streamed = None if i == a else streamed
            if r.on_token is not None and streamed is not None:
                r.on_token(streamed)
            ids[k] = torch.cat([ids[k], torch.tensor(picked[a:b], dtype=torch.long, device=lm.device)[:, None]], dim=1)
        step += 1
        if all(all(done[slice(*span[k])]) for k in left):
            continue  # every request left is finished: hand them back without another forward
        last = advance(torch.tensor(picked, dtype=torch.long, device=lm.device)).float()


def _rows(requests: list[Request], pad_id: int, device) -> tuple[list[tuple[int, int]], list[int], torch.Tensor]:
    """Each request's rows [a, b) of the batch, each row's left padding, and the left-padded prompts (rows, width)."""
    span, rows = [], 0
    for r in requests:
        span.append((rows, rows + r.cfg.num_return_sequences))
        rows += r.cfg.num_return_sequences
    width = max(len(r.prompt_ids) for r in requests)
    pads = [width - len(r.prompt_ids) for r in requests for _ in range(r.cfg.num_return_sequences)]
    batch = [[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids for r in requests for _ in range(r.cfg.num_return_sequences)]
    return span, pads, torch.tensor(batch, dtype=torch.long, device=device)


def _samples(tok, r: Request, new: list[list[int]], finish: list[str]) -> list[Sample]:
    prompt_text = tok.decode(r.prompt_ids, skip_special_tokens=True)
    out = []
    for ids, why in zip(new, finish):
        completion = tok.decode(ids, skip_special_tokens=True)
        cut = _find_stop(completion, r.cfg.stop) if r.cfg.stop else None
        if cut is not None:
            completion = completion[:cut]
        out.append(Sample(prompt_text + completion, completion, ids, why))
    return out


def decode_samples(lm: LM, prompt_ids: list[int], cfg: GenerationConfig, seed: int, stop_event: threading.Event | None,
                   on_token: Callable[[int], None] | None, ignore_eos: bool = False, lean: bool = True) -> list[Sample]:
    """The sampling loop for one request alone: num_return_sequences copies of the prompt."""
    r = Request(prompt_ids, cfg, seed, stop_event, on_token, ignore_eos, lean)
    decode_batch(lm, [r])
    return r.samples


def decode(lm: LM, r: Request) -> None:
    """Decode `r` now, or together with the requests that arrive while the model is busy.

    The first request to find the model free decodes every request waiting (up to MAX_BATCH_ROWS rows,
    first come first served) as one batch; requests arriving meanwhile wait, and the first of them to find
    the model free again takes all those waiting. Ten visitors pressing Generate at once then cost about
    two batches, not ten turns. Sets r.samples, or r.error when its batch failed.
    """
    q = lm.queue
    finished = lambda: r.samples is not None or r.error is not None  # noqa: E731
    with q.cond:
        q.pending.append(r)
    while True:
        with q.cond:
            while q.busy and not finished():
                q.cond.wait()
            if finished():
                return
            batch, rows = [], 0
            for w in list(q.pending):  # one forward (lean or not) per batch
                if w.lean == r.lean and (not batch or rows + w.cfg.num_return_sequences <= MAX_BATCH_ROWS):
                    batch.append(w)
                    rows += w.cfg.num_return_sequences
                    q.pending.remove(w)
            q.busy = True

        def hand_back(_: Request) -> None:
            with q.cond:
                q.cond.notify_all()  # its caller goes on while the rest of the batch decodes

        try:
            with lm.lock, thread_count(lm.threads):
                decode_batch(lm, batch, hand_back)
        except BaseException as err:  # noqa: BLE001 - every request of the batch learns what went wrong
            for w in batch:
                if w.samples is None:
                    w.error = err
        finally:
            with q.cond:
                q.busy = False
                q.cond.notify_all()


def generate(lm: LM, prompt: str, cfg: GenerationConfig, stop_event: threading.Event | None = None,
             on_token: Callable[[int], None] | None = None, ignore_eos: bool = False, lean: bool = True) -> Generation:
    """Generate cfg.num_return_sequences continuations of `prompt`. Same seed + settings -> same text."""
    cfg.validate()
    p = encode_prompt(lm, prompt, cfg.max_new_tokens)
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    settings = {**cfg.to_dict(), "seed": seed}
    run = dataclasses.replace(cfg, max_new_tokens=p.max_new_tokens)  # what fits after the prompt
    r = Request(p.ids, run, seed, stop_event, on_token, ignore_eos, lean)
    decode(lm, r)
    if r.error is not None:
        raise r.error
    n_new = sum(len(s.token_ids) for s in r.samples)
    return Generation(lm.name, p.text, p.notice, p.ids, settings, seed, r.samples, n_new, r.seconds,
                      n_new / r.seconds if r.seconds > 0 else 0.0, lm.dtype_name)


def token_view(lm: LM, gen: Generation, sample: int = 0, top: int = 5) -> tuple[list[TokenScore], float]:
    """Per-token probabilities + top alternatives, and the perplexity, of one sample's completion."""
    return score_tokens(lm, gen.prompt_ids, gen.samples[sample].token_ids, top=top)


class Stream:
    """Generate in a worker thread and iterate over the first sample's text as it appears.

        s = Stream(lm, prompt, cfg)
        for chunk in s: show(chunk)     # leaving the loop early stops the backend
        s.result                        # the Generation (partial when stopped)
    """

    def __init__(self, lm: LM, prompt: str, cfg: GenerationConfig, timeout: float = STREAM_TIMEOUT_S) -> None:
        from transformers import TextIteratorStreamer

        cfg.validate()
        encode_prompt(lm, prompt, cfg.max_new_tokens)  # fail early, in the caller's thread
        self.lm, self.prompt, self.cfg, self.timeout = lm, prompt, cfg, timeout
        self.stop_event = threading.Event()
        self.streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=False, timeout=timeout, skip_special_tokens=True)
        self.result: Generation | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="generate-stream", daemon=True)

    def _run(self) -> None:
        try:
            self.result = generate(self.lm, self.prompt, self.cfg, self.stop_event,
                                   on_token=lambda t: self.streamer.put(torch.tensor([t])))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread
            self.error = err
        finally:
            self.streamer.end()  # always: the consumer must never wait for a dead worker

    def stop(self) -> None:
        """Ask the backend to stop after the current token."""
        self.stop_event.set()

    def __iter__(self) -> Iterator[str]:
        self.thread.start()
        finished = False
        try:
            for chunk in self.streamer:
                if chunk:
                    yield chunk
            finished = True
        except queue.Empty:
            self.stop_event.set()
            raise UserError(f"generation produced nothing for {self.timeout:.0f} s and was stopped; the model may be busy with another session, try again") from None
        finally:
            if not finished:
                self.stop_event.set()  # the consumer left early (Stop, rerun, error): stop the backend too
        self.thread.join(timeout=self.timeout)
        if self.error is not None:
            raise self.error
