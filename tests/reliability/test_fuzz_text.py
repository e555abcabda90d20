"""Property-based: text ingestion (uploads, pastes, prompts) and text settings either work or say why.

No input raises anything but a UserError with a reason; accepted text is clean (UTF-8, no NUL, no CR-LF)
and is stored inside the workspace under its hash whatever it was called.
"""
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.errors import UserError
from engine.text import causal_lm, generation, lm_finetune, text_files
from tests.text_helpers import make_tiny_lm

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SAMPLE = "The cat sat on the mat.\r\nCafé, naïve — 日本語 🐈\n".encode()


def _decoded_or_reason(data: bytes, name: str = "text") -> str | None:
    try:
        out = text_files.decode_text(data, name)
    except UserError as err:
        assert str(err).strip()
        return None
    assert isinstance(out, str) and out.strip() and "\x00" not in out and "\r\n" not in out
    return out


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_are_text_or_a_reason(data):
    _decoded_or_reason(data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8), st.one_of(st.none(), st.integers(1, 80)),
       st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "latin-1"]))
def test_mutated_and_foreign_encodings_are_text_or_a_reason(edits, cut, encoding):
    data = bytearray(SAMPLE.decode().encode(encoding, errors="replace"))
    for pos, val in edits:
        data[pos % len(data)] = val
    out = _decoded_or_reason(bytes(data[:cut] if cut else data))
    if out is not None and encoding == "utf-8" and not edits and not cut:
        assert out == SAMPLE.decode().replace("\r\n", "\n")


@FUZZ
@given(st.text(max_size=300), st.text(max_size=80))
def test_any_text_and_any_name_is_stored_inside_the_workspace(workspace_home, body, name):
    try:
        path = lm_finetune.save_corpus(body.encode("utf-8", errors="surrogatepass"), name)
    except UserError as err:
        assert str(err).strip()
        return
    assert path.resolve().parent == (workspace_home / "text").resolve() and len(path.stem) == 16
    assert text_files.decode_text(path.read_bytes()) == path.read_bytes().decode()


def test_the_size_limit_is_checked_before_decoding():
    with pytest.raises(UserError, match="the limit is 5 MB"):
        text_files.decode_text(b"\xff" * (text_files.MAX_TEXT_BYTES + 1), "big.txt")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return causal_lm.load(str(make_tiny_lm(tmp_path_factory.mktemp("lm"))))


@FUZZ
@given(st.text(max_size=400), st.integers(1, 80))
def test_any_prompt_is_encoded_to_fit_or_refused_with_a_reason(tiny_lm, prompt, max_new):
    try:
        p = causal_lm.encode_prompt(tiny_lm, prompt, max_new)
    except UserError as err:
        assert str(err).strip()
        return
    # prompt and new tokens fit the context; fewer new tokens or a shortened prompt always come with a notice
    assert 1 <= len(p.ids) and 1 <= p.max_new_tokens <= max_new and len(p.ids) + p.max_new_tokens <= tiny_lm.context
    assert (p.notice is None) == (p.text == prompt and p.max_new_tokens == max_new)


JSONISH = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=8), st.lists(st.text(max_size=4), max_size=3))
GEN_KEYS = ["max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "no_repeat_ngram_size",
            "num_return_sequences", "seed", "stop", "unknown"]


@FUZZ
@given(st.dictionaries(st.sampled_from(GEN_KEYS), JSONISH, max_size=5))
def test_generation_settings_from_anywhere_validate_or_say_why(d):
    # settings come from widgets, the CLI and the history table (JSON): any type may arrive
    try:
        cfg = generation.GenerationConfig.from_dict(d).validate()
    except UserError as err:
        assert str(err).strip()
        return
    assert 1 <= cfg.max_new_tokens <= generation.MAX_NEW_TOKENS and 0 <= cfg.temperature <= 5 and math.isfinite(cfg.top_p)


LM_KEYS = ["epochs", "lr", "block_size", "batch_size", "val_fraction", "model", "seed", "texts", "sample_tokens", "sample_prompt"]


@FUZZ
@given(st.dictionaries(st.sampled_from(LM_KEYS), JSONISH, max_size=5))
def test_text_finetune_settings_validate_or_say_why(d):
    try:
        cfg = lm_finetune.LMFinetuneConfig.from_dict({"texts": ["x.txt"], **d}).validate()
    except UserError as err:
        assert str(err).strip()
        return
    assert (cfg.epochs is None or isinstance(cfg.epochs, int)) and isinstance(cfg.seed, int) and 1e-6 <= cfg.lr <= 1e-2  # None: from the text's size
