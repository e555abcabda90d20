"""Text generation: settings, presets, a lean sampling loop, streaming with a real Stop, token scores.

The loop is nanoGPT's `generate` with a KV cache: one forward per step over the last token,
Hugging Face's own logits processors for the knobs (repetition penalty, no-repeat n-gram,
temperature, top-k, top-p), then sampling with a private torch.Generator. Compared with
`model.generate` this keeps the per-token Python work small, makes the seed independent of
anything else using torch's global RNG in the process (a training job, another session), and
lets one place check the Stop event and the stop strings after every token.

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
from engine.text.causal_lm import LM, TokenScore, encode_prompt, score_tokens, start_decoding, thread_count

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


@torch.inference_mode()
def decode_samples(lm: LM, prompt_ids: list[int], cfg: GenerationConfig, seed: int, stop_event: threading.Event | None,
            on_token: Callable[[int], None] | None, ignore_eos: bool = False, lean: bool = True) -> list[Sample]:
    """The sampling loop for num_return_sequences copies of the prompt (same length: no padding needed).

    ignore_eos (benchmarks only) keeps going past end-of-text so every run makes max_new_tokens tokens.
    """
    tok, eos = lm.tokenizer, lm.eos_id
    n = cfg.num_return_sequences
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    procs = _processors(cfg, eos)
    ids = torch.tensor([prompt_ids] * n, dtype=torch.long, device=lm.device)
    new: list[list[int]] = [[] for _ in range(n)]
    finish = ["length"] * n
    done = [False] * n
    deadline = time.monotonic() + MAX_GENERATION_SECONDS
    # The prompt in one forward, then one token per step with the KV cache.
    last, advance = start_decoding(lm.model, ids, cfg.max_new_tokens, lean)
    last = last.float()
    for step in range(cfg.max_new_tokens):
        if stop_event is not None and stop_event.is_set():
            finish = ["stopped" if not d else f for d, f in zip(done, finish)]
            break
        if step and time.monotonic() > deadline:  # always at least one token
            finish = ["time limit" if not d else f for d, f in zip(done, finish)]
            break
        logits = last
        if ignore_eos:
            logits[:, eos] = -float("inf")  # before top-k/top-p, so they never leave only end-of-text
        scores = procs(ids, logits)
        if cfg.temperature == 0:
            nxt = scores.argmax(dim=-1)
        else:
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=gen)[:, 0]
        picked = nxt.tolist()
        streamed = None  # sample 0's new token, for the streamer
        for i, t in enumerate(picked):
            if done[i]:
                picked[i] = eos  # finished rows keep stepping in the batch; their tokens are ignored
                continue
            if t == eos:
                done[i], finish[i] = True, "end of text"
                continue
            new[i].append(t)
            streamed = t if i == 0 else streamed
            if cfg.stop and _find_stop(tok.decode(new[i], skip_special_tokens=True), cfg.stop) is not None:
                done[i], finish[i] = True, "stop string"
                streamed = None if i == 0 else streamed
        if on_token is not None and streamed is not None:
            on_token(streamed)
        if all(done):
            break
        nxt = torch.tensor(picked, dtype=torch.long, device=lm.device)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        last = advance(nxt).float()
    samples = []
    prompt_text = tok.decode(prompt_ids, skip_special_tokens=True)
    for i in range(n):
        completion = tok.decode(new[i], skip_special_tokens=True)
        cut = _find_stop(completion, cfg.stop) if cfg.stop else None
        if cut is not None:
            completion = completion[:cut]
        samples.append(Sample(prompt_text + completion, completion, new[i], finish[i]))
    return samples


def generate(lm: LM, prompt: str, cfg: GenerationConfig, stop_event: threading.Event | None = None,
             on_token: Callable[[int], None] | None = None, ignore_eos: bool = False, lean: bool = True) -> Generation:
    """Generate cfg.num_return_sequences continuations of `prompt`. Same seed + settings -> same text."""
    cfg.validate()
    p = encode_prompt(lm, prompt, cfg.max_new_tokens)
    seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31)
    settings = {**cfg.to_dict(), "seed": seed}
    run = dataclasses.replace(cfg, max_new_tokens=p.max_new_tokens)  # what fits after the prompt
    with lm.lock, thread_count(lm.threads):
        t0 = time.perf_counter()
        samples = decode_samples(lm, p.ids, run, seed, stop_event, on_token, ignore_eos, lean)
        seconds = time.perf_counter() - t0
    n_new = sum(len(s.token_ids) for s in samples)
    return Generation(lm.name, p.text, p.notice, p.ids, settings, seed, samples, n_new, seconds,
                      n_new / seconds if seconds > 0 else 0.0, lm.dtype_name)


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
