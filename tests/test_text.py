"""Text engine on a tiny random GPT-2 made in the test: loading, generation knobs, stop, scores, prompts, input text."""
from __future__ import annotations

import math
import threading
import time

import pytest

from engine.core.errors import UserError
from engine.text import causal_lm, generation, history, text_files


@pytest.fixture
def lm(tiny_dir):
    return causal_lm.load(str(tiny_dir))


def cfg(**kw) -> generation.GenerationConfig:
    return generation.GenerationConfig(**{"max_new_tokens": 20, "seed": 1, **kw})


def ids(gen) -> list[list[int]]:
    return [s.token_ids for s in gen.samples]


def test_load_pads_with_eos_and_runs_in_eval_mode(lm):
    assert lm.tokenizer.pad_token_id == lm.eos_id
    assert lm.model.generation_config.pad_token_id == lm.eos_id
    assert not lm.model.training and lm.context == 64
    assert causal_lm.load(lm.spec) is lm  # loaded once per process


def test_missing_model_is_a_clear_error(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(UserError, match="could not load|not a causal"):
        causal_lm.load(str(tmp_path / "broken"))
    with pytest.raises(UserError, match="no network"):
        causal_lm.load("gpt2-medium")


def test_same_seed_same_text_other_seed_other_text(lm):
    a = generation.generate(lm, "the cat", cfg(num_return_sequences=3, seed=42))
    b = generation.generate(lm, "the cat", cfg(num_return_sequences=3, seed=42))
    c = generation.generate(lm, "the cat", cfg(num_return_sequences=3, seed=43))
    assert [s.text for s in a.samples] == [s.text for s in b.samples]
    assert ids(a) != ids(c)
    assert len({tuple(x) for x in ids(a)}) > 1  # the samples of one call differ from each other
    assert all(s.text.startswith("the cat") for s in a.samples)


def test_no_seed_picks_one_and_reports_it(lm):
    gen = generation.generate(lm, "the cat", cfg(seed=None))
    assert isinstance(gen.seed, int) and gen.settings["seed"] == gen.seed
    again = generation.generate(lm, "the cat", generation.GenerationConfig.from_dict(gen.settings))
    assert ids(again) == ids(gen)


def test_seed_is_private_to_the_generation(lm):
    """Someone else drawing from torch's global RNG (a training job) must not change the text."""
    import torch

    a = generation.generate(lm, "the dog", cfg(seed=5))
    torch.manual_seed(123)
    torch.rand(1000)
    b = generation.generate(lm, "the dog", cfg(seed=5))
    assert ids(a) == ids(b)


def test_greedy_ignores_the_seed(lm):
    a = generation.generate(lm, "the cat", cfg(temperature=0.0, seed=1))
    b = generation.generate(lm, "the cat", cfg(temperature=0.0, seed=2))
    assert ids(a) == ids(b)


def test_stop_event_ends_generation_early(lm):
    stop = threading.Event()
    seen = []

    def on_token(t):
        seen.append(t)
        if len(seen) == 3:
            stop.set()

    gen = generation.generate(lm, "the cat", cfg(max_new_tokens=50, seed=3), stop_event=stop, on_token=on_token)
    full = generation.generate(lm, "the cat", cfg(max_new_tokens=50, seed=3))
    assert gen.samples[0].finish == "stopped"
    assert len(gen.samples[0].token_ids) == 3 < len(full.samples[0].token_ids)
    assert gen.samples[0].token_ids == full.samples[0].token_ids[:3]


def test_lean_forward_gives_the_hf_models_logits(lm):
    import torch

    from engine.text.leangpt2 import LeanGPT2

    model = lm.model.float()
    assert LeanGPT2.supports(model)
    ids = torch.tensor([lm.tokenizer("the cat sat on")["input_ids"]] * 2)
    lean = LeanGPT2(model)
    with torch.inference_mode():
        ours = lean.prefill(ids, max_new_tokens=6)
        out = model(input_ids=ids, use_cache=True)
        torch.testing.assert_close(ours, out.logits[:, -1], rtol=1e-5, atol=1e-5)
        nxt = torch.tensor([3, 7])  # two different continuations: the rows must not mix
        for _ in range(6):
            ours = lean.step(nxt)
            out = model(input_ids=nxt[:, None], cache=out.cache, use_cache=True)
            torch.testing.assert_close(ours, out.logits[:, -1], rtol=1e-5, atol=1e-5)
            nxt = ours.argmax(-1)
        with pytest.raises(ValueError, match="KV cache"):
            lean.step(nxt)  # the cache was sized for 6 new tokens


def test_lean_forward_with_left_padded_rows_gives_each_prompts_own_logits(lm):
    """Prompts of different lengths in one batch: a row's logits are those of its prompt alone."""
    import torch

    from engine.text.leangpt2 import LeanGPT2

    model = lm.model.float()
    prompts = [lm.tokenizer(t)["input_ids"] for t in ("the cat sat on the mat", "a dog", "one two three")]
    width = max(map(len, prompts))
    pads = [width - len(p) for p in prompts]
    batch = torch.tensor([[lm.eos_id] * n + p for n, p in zip(pads, prompts)])
    lean = LeanGPT2(model)
    with torch.inference_mode():
        together = [lean.prefill(batch, max_new_tokens=5, pads=pads)]
        nxt = torch.tensor([3, 7, 11])
        for _ in range(5):
            together.append(lean.step(nxt))
        for row, p in enumerate(prompts):
            alone = LeanGPT2(model)
            mine = [alone.prefill(torch.tensor([p]), max_new_tokens=5)] + [alone.step(nxt[row : row + 1]) for _ in range(5)]
            for a, b in zip(together, mine):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a[row : row + 1], b, rtol=1e-5, atol=1e-5)


def batched_requests(lm) -> list[generation.Request]:
    """Different prompts (lengths), settings, seeds and sample counts, as visitors would send them."""
    def req(prompt, **kw):
        c = cfg(**kw)
        return generation.Request(lm.tokenizer(prompt)["input_ids"], c, c.seed)

    return [req("the cat", seed=5, num_return_sequences=2), req("one two three four five", seed=6, temperature=1.2, top_k=0),
            req("a", seed=7, max_new_tokens=6, repetition_penalty=1.5), req("the dog ran", temperature=0.0),
            req("the cat", seed=5, stop=["alm"]), req("x y", seed=8, no_repeat_ngram_size=2, top_p=0.5)]


def test_requests_decoded_in_one_batch_write_what_each_writes_alone(lm):
    lm.model.float()
    together = batched_requests(lm)
    finished = []
    generation.decode_batch(lm, together, on_done=lambda r: finished.append(r))
    assert sorted(map(id, finished)) == sorted(map(id, together))
    # the 6-token request is handed back before every longer one: its caller goes on while they decode
    longer = [r for r in together if max(len(x.token_ids) for x in r.samples) > 6]
    assert longer and all(finished.index(together[2]) < finished.index(r) for r in longer)
    for r in together:
        alone = generation.decode_samples(lm, r.prompt_ids, r.cfg, r.seed, None, None)
        assert [s.token_ids for s in r.samples] == [s.token_ids for s in alone]
        assert [(s.text, s.finish) for s in r.samples] == [(s.text, s.finish) for s in alone]
    assert together[4].samples[0].finish == "stop string"
    # a forward that cannot take padded rows (HF's, here) decodes the same requests one after another
    hf = batched_requests(lm)
    for r in hf:
        r.lean = False
    generation.decode_batch(lm, hf)
    assert [[x.token_ids for x in r.samples] for r in hf] == [[x.token_ids for x in r.samples] for r in together]


def test_concurrent_generations_share_batches_and_keep_their_texts(lm, monkeypatch):
    lm.model.float()
    alone = {i: ids(generation.generate(lm, f"the cat {i}", cfg(seed=i, max_new_tokens=30))) for i in range(8)}
    sizes, first = [], threading.Event()
    real = generation.decode_batch

    def slow_first(lm_, batch, on_done=lambda r: None):
        sizes.append(len(batch))
        if len(sizes) == 1:  # the first batch takes long enough for the others to queue up behind it
            first.set()
            time.sleep(0.5)
        real(lm_, batch, on_done)

    monkeypatch.setattr(generation, "decode_batch", slow_first)
    out = {}

    def visitor(i):
        out[i] = ids(generation.generate(lm, f"the cat {i}", cfg(seed=i, max_new_tokens=30)))

    threads = [threading.Thread(target=visitor, args=(0,))]
    threads[0].start()
    first.wait(5)
    threads += [threading.Thread(target=visitor, args=(i,)) for i in range(1, 8)]
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(30)
    assert out == alone
    assert sizes == [1, 7]  # the seven who waited were decoded together, not one after another


def test_a_stop_in_a_batch_stops_only_that_request(lm):
    stop = threading.Event()
    a, b = batched_requests(lm)[:2]
    a.stop_event, a.on_token = stop, lambda t: stop.set()
    generation.decode_batch(lm, [a, b])
    assert [s.finish for s in a.samples] == ["stopped", "stopped"] and len(a.samples[0].token_ids) == 1
    assert all(s.finish != "stopped" for s in b.samples) and len(b.samples[0].token_ids) > 1


def test_a_failed_batch_is_every_callers_error(lm, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(generation, "decode_batch", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        generation.generate(lm, "the cat", cfg())
    assert not lm.queue.busy and not lm.queue.pending  # the next request is not stuck behind it


@pytest.mark.parametrize("settings", [dict(temperature=0.0, num_return_sequences=1), dict(seed=5, num_return_sequences=3)])
def test_lean_and_hf_forwards_generate_the_same_text(lm, settings):
    lm.model.float()
    c = cfg(max_new_tokens=25, **settings)
    lean = generation.decode_samples(lm, lm.tokenizer("the dog")["input_ids"], c, c.seed or 0, None, None, lean=True)
    hf = generation.decode_samples(lm, lm.tokenizer("the dog")["input_ids"], c, c.seed or 0, None, None, lean=False)
    assert [s.token_ids for s in lean] == [s.token_ids for s in hf] and [s.finish for s in lean] == [s.finish for s in hf]


def test_generation_time_limit_cuts_it_short_and_says_so(lm, monkeypatch):
    clock = iter(range(0, 10_000, 10))  # every look at the clock is 10 s later
    monkeypatch.setattr(generation.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(generation, "MAX_GENERATION_SECONDS", 25)
    gen = generation.generate(lm, "the cat", cfg(max_new_tokens=50, seed=3, num_return_sequences=2))
    assert [s.finish for s in gen.samples] == ["time limit"] * 2
    assert 1 <= len(gen.samples[0].token_ids) < 50  # the text made before the limit is kept
    monkeypatch.setattr(generation, "MAX_GENERATION_SECONDS", 0)
    assert len(generation.generate(lm, "the cat", cfg(max_new_tokens=50, seed=3)).samples[0].token_ids) == 1  # never nothing


def test_stream_yields_text_and_leaving_early_stops_the_backend(lm):
    s = generation.Stream(lm, "the cat", cfg(max_new_tokens=60, seed=4))
    chunks = list(s)
    assert "".join(chunks) == s.result.samples[0].completion
    early = generation.Stream(lm, "the cat", cfg(max_new_tokens=60, seed=4))
    for _ in early:
        break  # the page went away (Stop button, rerun)
    early.thread.join(timeout=10)
    assert not early.thread.is_alive()
    assert early.stop_event.is_set()
    assert early.result.samples[0].finish == "stopped" or len(early.result.samples[0].token_ids) < 60


def test_streams_of_several_visitors_at_once_each_stream_their_own_text(lm):
    """The page's path under load: streams started together share batches; each streams exactly its own
    sample, and one leaving early stops only its own rows."""
    alone = [generation.generate(lm, p, cfg(max_new_tokens=40, seed=i)).samples[0].completion
             for i, p in enumerate(["the cat", "a dog ran", "x"])]
    streams = [generation.Stream(lm, p, cfg(max_new_tokens=40, seed=i)) for i, p in enumerate(["the cat", "a dog ran", "x"])]
    leaver = generation.Stream(lm, "the cat", cfg(max_new_tokens=60, seed=9))
    texts = {}

    def read(i, s):
        texts[i] = "".join(s)

    threads = [threading.Thread(target=read, args=(i, s)) for i, s in enumerate(streams)]
    for t in threads:
        t.start()
    for _ in leaver:
        break  # this visitor's page went away after its first token
    for t in threads:
        t.join(30)
    assert [texts[i] for i in range(3)] == alone == [s.result.samples[0].completion for s in streams]
    leaver.thread.join(timeout=10)
    assert leaver.stop_event.is_set() and len(leaver.result.samples[0].token_ids) < 60


def test_stream_reports_a_failed_worker(lm):
    s = generation.Stream(lm, "the cat", cfg())
    s.lm = None  # the worker will crash on its first line
    with pytest.raises(AttributeError):
        list(s)


def test_stop_string_ends_a_sample_and_is_cut(lm):
    full = generation.generate(lm, "the cat", cfg(max_new_tokens=40, seed=9))
    toks = full.samples[0].token_ids
    # a stop string made of one generated token's text, some way into the output
    k = next(i for i in range(5, len(toks)) if lm.tokenizer.decode([toks[i]]).strip().isalpha())
    stop = lm.tokenizer.decode([toks[k]]).strip()
    gen = generation.generate(lm, "the cat", cfg(max_new_tokens=40, seed=9, stop=[stop]))
    s = gen.samples[0]
    assert s.finish == "stop string"
    assert toks[: len(s.token_ids)] == s.token_ids and len(s.token_ids) <= k + 1
    assert stop in lm.tokenizer.decode(s.token_ids) and stop not in s.completion


def test_no_repeat_ngram(lm):
    gen = generation.generate(lm, "the", cfg(max_new_tokens=60, no_repeat_ngram_size=2, temperature=0.0, repetition_penalty=1.0))
    seq = gen.prompt_ids + gen.samples[0].token_ids
    bigrams = list(zip(seq, seq[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_token_view_probabilities_and_perplexity(lm):
    gen = generation.generate(lm, "the cat sat", cfg(max_new_tokens=15, seed=2))
    scores, ppl = generation.token_view(lm, gen)
    assert len(scores) == len(gen.samples[0].token_ids)
    for s in scores:
        assert 0 < s.prob <= 1
        probs = [p for _, p in s.alternatives]
        assert probs == sorted(probs, reverse=True) and probs[0] >= s.prob - 1e-6
        assert sum(probs) <= 1 + 1e-4
    assert math.isfinite(ppl) and ppl >= 1
    assert ppl == pytest.approx(math.exp(-sum(math.log(s.prob) for s in scores) / len(scores)), rel=1e-4)


def test_empty_prompt_is_refused(lm):
    for p in ("", "   \n"):
        with pytest.raises(UserError, match="prompt is empty"):
            generation.generate(lm, p, cfg())


def test_long_prompt_keeps_its_last_tokens(lm):
    prompt = " ".join(["the cat sat on the mat"] * 40)
    gen = generation.generate(lm, prompt, cfg(max_new_tokens=10))
    assert gen.prompt_notice and "kept its last 54 tokens" in gen.prompt_notice
    assert len(gen.prompt_ids) == 54 and gen.prompt_ids == lm.tokenizer(prompt)["input_ids"][-54:]
    assert len(gen.prompt_ids) + len(gen.samples[0].token_ids) <= lm.context



def test_a_short_prompt_is_kept_and_the_new_tokens_bounded_by_the_context(lm):
    # asking for as many new tokens as the context holds used to throw the prompt away
    gen = generation.generate(lm, "the cat", cfg(max_new_tokens=64, stop=[]), ignore_eos=True)
    n_prompt = len(lm.tokenizer("the cat")["input_ids"])
    assert gen.prompt == "the cat" and len(gen.prompt_ids) == n_prompt
    assert len(gen.samples[0].token_ids) == lm.context - n_prompt
    assert gen.prompt_notice and f"{lm.context - n_prompt} new tokens fit" in gen.prompt_notice


@pytest.mark.parametrize("bad", [
    {"max_new_tokens": 0}, {"max_new_tokens": 513}, {"temperature": -1}, {"top_k": -1}, {"top_p": 0},
    {"repetition_penalty": 0.5}, {"num_return_sequences": 6}, {"seed": -1}, {"stop": [""]},
    {"temperature": 0, "num_return_sequences": 2}, {"no_repeat_ngram_size": 11},
])
def test_bad_settings_are_user_errors(bad):
    with pytest.raises(UserError):
        generation.GenerationConfig(**bad).validate()


def test_presets_are_valid_and_distinct():
    for values in generation.PRESETS.values():
        generation.GenerationConfig(**values).validate()
    temps = [v["temperature"] for v in generation.PRESETS.values()]
    assert temps == sorted(temps) and len(set(temps)) == 3


def test_history_roundtrip(lm):
    gen = generation.generate(lm, "the cat", cfg(num_return_sequences=2))
    gid = history.save_generation("tiny", gen)
    row = history.get(gid)
    assert row["prompt"] == "the cat" and row["model"] == "tiny"
    assert row["outputs"] == [s.completion for s in gen.samples]
    assert row["settings"]["seed"] == gen.seed and row["stats"]["new_tokens"] == gen.new_tokens
    assert history.recent(5)[0]["id"] == gid
    rerun = generation.generate(lm, row["prompt"], generation.GenerationConfig.from_dict(row["settings"]))
    assert [s.completion for s in rerun.samples] == row["outputs"]


def test_decode_text_explains_bad_input():
    assert text_files.decode_text("héllo\r\nworld".encode()) == "héllo\nworld"
    assert text_files.decode_text(b"\xef\xbb\xbfbom") == "bom"
    with pytest.raises(UserError, match=r"byte offset 3") as err:
        text_files.decode_text(b"abc\xff\xfedef", "notes.txt")
    assert "notes.txt" in str(err.value) and "ff fe" in str(err.value)
    with pytest.raises(UserError, match="UTF-16"):
        text_files.decode_text("hi".encode("utf-16"))
    with pytest.raises(UserError, match="empty"):
        text_files.decode_text(b"  \n ")
    with pytest.raises(UserError, match="limit"):
        text_files.decode_text(b"a" * (text_files.MAX_TEXT_BYTES + 1))


def test_small_models_decode_on_one_thread(lm):
    import torch

    assert lm.threads == 1
    before = torch.get_num_threads()
    generation.generate(lm, "the cat", cfg(max_new_tokens=3))
    assert torch.get_num_threads() == before  # restored for the caller


def test_ignore_eos_never_leaves_nothing_to_sample(lm):
    """Benchmarks mask end-of-text; with a tight top-p that must not leave an all -inf distribution."""
    import types

    import torch

    class EosLoves:  # a stand-in model whose favourite next token is always end-of-text
        config = lm.model.config

        def __call__(self, input_ids, **_):
            logits = torch.zeros(input_ids.shape[0], 1, lm.model.config.vocab_size)
            logits[..., lm.eos_id] = 50.0
            logits[..., 7] = 5.0
            return types.SimpleNamespace(logits=logits, cache=None)

    fake = causal_lm.LM(EosLoves(), lm.tokenizer, "fake", "fake", lm.source, lm.device, torch.float32, "", lm.context, 1)
    samples = generation.decode_samples(fake, [5, 6], cfg(max_new_tokens=4, top_p=0.05), 0, None, None, ignore_eos=True)
    assert samples[0].token_ids == [7, 7, 7, 7]
    ended = generation.decode_samples(fake, [5, 6], cfg(max_new_tokens=4, top_p=0.05), 0, None, None)
    assert ended[0].token_ids == [] and ended[0].finish == "end of text"
