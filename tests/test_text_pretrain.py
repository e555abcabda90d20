"""Mini GPT-2 pretraining on a small fake fortunes folder: cleaning, output folder, model card, exact resume."""
from __future__ import annotations

import gzip
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from engine.core.errors import UserError
from engine.pretrain import mini_gpt2
from engine.text import causal_lm, generation, grammar
from tests.text_helpers import corpus


def fake_fortunes(folder):
    folder.mkdir()
    lines = corpus(300, seed=2).split("\n")
    (folder / "wisdom").write_text("\n%\n".join(lines[:150]) + "\n%\n\t\t-- Someone Famous\n")
    (folder / "people").write_text("\n%\n".join(lines[150:]) + "\n%\n _/\\_ |__| /\\/\\ |\n")
    (folder / "people.dat").write_bytes(b"\x00\x01binary index")  # index files are ignored
    (folder / "ascii-art").write_text("@@@@\n%\n####\n")
    return folder


def dictd_number(n: int) -> str:
    digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    out = ""
    while True:
        out = digits[n % 64] + out
        n //= 64
        if not n:
            return out


def fake_jargon(folder, entries: dict[str, str]):
    """A dictd database like dict-jargon's: gzip text plus an index of base-64 offsets."""
    folder.mkdir(exist_ok=True)
    text, index = b"", []
    for head, body in {"00-database-short": "The Jargon File\n", **entries}.items():
        chunk = body.encode()
        index.append(f"{head}\t{dictd_number(len(text))}\t{dictd_number(len(chunk))}")
        text += chunk
    (folder / "jargon.dict.dz").write_bytes(gzip.compress(text))
    (folder / "jargon.index").write_text("\n".join(index) + "\n")
    return folder / "jargon.dict.dz"


JARGON = {
    "kluge": "kluge\n /klooj/, n.\n\n    [from the German klug] A clever programming trick intended to solve a\n    particular nasty case in an expedient, if not clear, manner. See {hack}.\n\n",
    "hack": "hack\n /hak/\n\n    1. n. Originally, a quick job that produces what is needed, but not well.\n\n    2. n. An incredibly good, and perhaps very time-consuming, piece of work.\n\n",
}


def tiny_cfg(tmp_path, **kw) -> mini_gpt2.TextPretrainConfig:
    return mini_gpt2.TextPretrainConfig(**{
        "out": tmp_path / "mini", "data_dir": tmp_path / "fortunes", "state_dir": tmp_path / "state", "steps": 6,
        "jargon_file": fake_jargon(tmp_path / "dictd", JARGON),
        "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 300, "block_size": 48, "batch_size": 4,
        "warmup": 2, "eval_every": 3, "val_fraction": 0.1, **kw})


def test_clean_fortune():
    assert mini_gpt2.clean_fortune("Hello\n  wrapped\tline.\n\n\t\t-- Mark Twain\n") == "Hello wrapped line.\n-- Mark Twain"
    assert mini_gpt2.clean_fortune("_\bb_\bo_\bl_\bd text here") == "bold text here"
    assert mini_gpt2.clean_fortune("  /\\_/\\  \n ( o.o ) \n  > ^ <") is None  # a picture
    assert mini_gpt2.clean_fortune("hi") is None


def test_missing_fortunes_says_how_to_install(tmp_path):
    with pytest.raises(UserError, match="apt-get install fortunes"):
        mini_gpt2.load_fortunes(tmp_path / "nope")
    with pytest.raises(UserError, match="apt-get install dict-jargon"):
        mini_gpt2.load_jargon(tmp_path / "jargon.dict.dz")


def test_jargon_entries_read_from_the_dictd_index_as_prose(tmp_path):
    entries = mini_gpt2.load_jargon(fake_jargon(tmp_path, JARGON))
    assert entries[0] == ("kluge: [from the German klug] A clever programming trick intended to solve a particular nasty case "
                          "in an expedient, if not clear, manner. See hack.")  # no headword line, pronunciation or braces
    assert entries[1].startswith("hack: 1. n. Originally, a quick job") and "\n2. n. An incredibly good" in entries[1]
    assert len(entries) == 2  # the database's own 00-database entries are not text


def test_dictionary_word_share(tmp_path):
    words = tmp_path / "words"
    words.write_text("the\ncat\nsat\nCat's\ndon't\n")
    assert mini_gpt2.dictionary_words(["The cat sat, don't blorf."], words) == 0.8
    assert mini_gpt2.dictionary_words(["cats' zzz"], tmp_path / "none") is None


def test_pretrain_writes_a_loadable_model_with_a_card_and_resumes_exactly(tmp_path):
    fake_fortunes(tmp_path / "fortunes")
    fortunes, files = mini_gpt2.load_fortunes(tmp_path / "fortunes")
    assert files == ["people", "wisdom"] and len(fortunes) == 301  # no .dat, no ascii-art, no picture

    card = mini_gpt2.pretrain_text(tiny_cfg(tmp_path))
    out = tmp_path / "mini"
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "model_card.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "model_card.json").read_text()) == card
    assert card["training"]["steps"] == 6 and not card["partial"]
    assert card["command"] == "python -m engine pretrain text --steps 6 --seed 1337"
    assert card["metrics"]["val_perplexity"] > 1 and card["sample"]["text"].startswith("The meaning of life is")
    assert card["data"]["jargon_entries"] == 2 and "dict-jargon" in card["data"]["source"]
    assert [x["seed"] for x in card["samples"]] == list(range(10))
    assert all(x["text"].startswith(x["prompt"]) for x in card["samples"]) and card["metrics"]["generation_tokens_per_s"] > 0
    assert "(seed 9)" in (out / "README.md").read_text()
    assert "resumed on two threads" in mini_gpt2._readme({**card, "training": {**card["training"], "note": "resumed on two threads"}})
    assert "100 completions" in card["metrics"]["dictionary"]  # ten prompts x ten seeds: a steadier share than ten samples
    if grammar.available():  # the grammar check over the same completions, and over the held-out fortunes to read it against
        m = card["metrics"]
        assert 0 <= m["sentences_parse"] <= 1 and m["parse_sentences"] >= 100 and 0 < m["sentences_parse_fortunes"] <= 1
        assert f"{m['sentences_parse']:.1%} of the {m['parse_sentences']} sentences" in (out / "README.md").read_text()
        first = card["samples"][0]  # each quoted sample says how many of its sentences parse
        assert first["sentences"] == len(grammar.sentences(first["text"])) >= 1 and 0 <= first["parse"] <= first["sentences"]
        assert f"(seed 0) {first['text']!r} ({first['parse']} of {first['sentences']} parse)" in (out / "README.md").read_text()
    else:
        assert "not measured (Link Grammar is not installed" in (out / "README.md").read_text()
    # --remeasure: the same weights give the same samples, and the card keeps its training numbers
    (out / "README.md").write_text("stale")
    again = mini_gpt2.remeasure(out)
    assert again["samples"] == card["samples"] and again["sample"] == card["sample"] and again["training"] == card["training"]
    speed = {"generation_tokens_per_s": again["metrics"]["generation_tokens_per_s"]}
    assert again["metrics"] == card["metrics"] | speed  # the fortunes' own grammar check kept as measured
    with_fortunes = mini_gpt2.remeasure(out, tmp_path / "fortunes")  # ... or measured again on the same held-out fortunes
    assert with_fortunes["metrics"] == card["metrics"] | {"generation_tokens_per_s": with_fortunes["metrics"]["generation_tokens_per_s"]}
    assert json.loads((out / "model_card.json").read_text()) == with_fortunes and "(seed 9)" in (out / "README.md").read_text()
    assert all(t.dtype == torch.float16 for t in load_file(str(out / "model.safetensors")).values())
    lm = causal_lm.load(str(out))
    assert lm.eos_id == 0 and lm.context == 48
    assert generation.generate(lm, "the cat", generation.GenerationConfig(max_new_tokens=5, seed=0)).samples

    # 3 steps, then --resume to 6: the same weights as 6 steps straight
    straight = load_file(str(out / "model.safetensors"))
    cfg = tiny_cfg(tmp_path, out=tmp_path / "mini2", state_dir=tmp_path / "state2", steps=3)
    mini_gpt2.pretrain_text(cfg)
    state = json.loads((tmp_path / "state2" / "state.json").read_text())
    state["max_steps"] = 6  # as if the 6-step run had been interrupted at step 3
    (tmp_path / "state2" / "state.json").write_text(json.dumps(state))
    resumed_card = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "mini2", state_dir=tmp_path / "state2", steps=None), resume=True)
    assert resumed_card["training"]["steps"] == 6
    resumed = load_file(str(tmp_path / "mini2" / "model.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_bf16_precision_trains_under_autocast_and_says_so_in_the_card(tmp_path):
    fake_fortunes(tmp_path / "fortunes")
    fp32 = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, steps=3, eval_every=100, out=tmp_path / "a", state_dir=tmp_path / "sa"))
    bf16 = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, steps=3, eval_every=100, out=tmp_path / "b", state_dir=tmp_path / "sb", precision="bf16"))
    assert fp32["command"] == "python -m engine pretrain text --steps 3 --seed 1337"
    assert bf16["command"] == "python -m engine pretrain text --steps 3 --seed 1337 --precision bf16"
    assert bf16["training"]["precision"] == "bf16" and "bf16 autocast" in (tmp_path / "b" / "README.md").read_text()
    assert math.isfinite(bf16["metrics"]["val_loss"])
    # same seed, same batches: only the matmuls' precision differs, and it shows in the weights
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # a resumed run goes on in the precision it began with, even when --precision is not repeated
    state = json.loads((tmp_path / "sb" / "state.json").read_text())
    state["max_steps"] = 4
    (tmp_path / "sb" / "state.json").write_text(json.dumps(state))
    more = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, steps=None, eval_every=100, out=tmp_path / "b", state_dir=tmp_path / "sb"), resume=True)
    assert more["training"]["steps"] == 4 and more["command"].endswith("--steps 4 --seed 1337 --precision bf16")


def test_anneal_finishes_on_the_clean_files_and_resumes_after_a_finished_run(tmp_path):
    fake_fortunes(tmp_path / "fortunes")
    (tmp_path / "fortunes" / "zippy").write_text("\n%\n".join(["Frobnoz glarb the quux, yow!"] * 20))  # coined words
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(set(corpus(300, seed=2).replace(".", "").split()) | {"the", "yow"})))
    by_file = mini_gpt2.load_fortunes_by_file(tmp_path / "fortunes")
    assert mini_gpt2.clean_files(by_file, 0.93, words) == ["people", "wisdom"]
    with pytest.raises(UserError, match="wamerican"):
        mini_gpt2.clean_files(by_file, 0.97, tmp_path / "no-dictionary")

    # 4 steps then 2 of anneal, straight
    card = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, steps=4, anneal_steps=2, words_file=words, eval_every=100))
    t = card["training"]
    assert t["steps"] == 6 and t["max_steps"] == 4 and card["command"].endswith("--steps 4 --seed 1337 --anneal-steps 2")
    assert t["anneal"]["files"] == ["people", "wisdom"] and t["anneal"]["done"] == 2 and 0 < t["anneal"]["tokens"] < card["data"]["train_tokens"]
    readme = (tmp_path / "mini" / "README.md").read_text()
    assert "on the cleanest text only" in readme and "without their `-- Author` lines:" in readme
    assert card["metrics"]["val_perplexity_without_attributions"] > 1
    assert mini_gpt2.without_attribution("Be kind.\n-- Someone Famous\nAgain.") == "Be kind.\nAgain."
    straight = load_file(str(tmp_path / "mini" / "model.safetensors"))

    # a finished 4-step run, resumed with --anneal-steps 2: the same weights, and not the 4-step ones
    cfg = tiny_cfg(tmp_path, out=tmp_path / "m2", state_dir=tmp_path / "s2", steps=4, words_file=words, eval_every=100)
    mini_gpt2.pretrain_text(cfg)
    four = load_file(str(tmp_path / "m2" / "model.safetensors"))
    again = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "m2", state_dir=tmp_path / "s2", steps=None, anneal_steps=2,
                                             words_file=words, eval_every=100), resume=True)
    assert again["training"]["steps"] == 6 and again["command"] == card["command"]
    annealed = load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert all(torch.equal(straight[k], annealed[k]) for k in straight)
    assert any(not torch.equal(four[k], annealed[k]) for k in four)


@pytest.mark.skipif(not grammar.available(), reason=f"Link Grammar is not installed ({grammar.INSTALL})")
def test_anneal_grammar_keeps_only_the_fortunes_whose_every_sentence_parses(tmp_path):
    good = "The cat sat on the mat. It was happy."
    assert mini_gpt2.grammatical([good, "The cat sat on the mat. cat the mat on sat the", "Yow!"]) == [good]
    fake_fortunes(tmp_path / "fortunes")  # word salad, of which a few lines parse
    proverbs = ["The dog ran to the park.", "She reads a book about ships.", "The sea is calm today.", "A bird sang in the tree."]
    (tmp_path / "fortunes" / "proverbs").write_text("\n%\n".join(proverbs * 10))
    words = tmp_path / "words"
    words.write_text("\n".join(sorted(set(corpus(300, seed=2).replace(".", "").split()) | {"the", "a", "is"})))
    kw = {"steps": 4, "anneal_steps": 2, "words_file": words, "eval_every": 100}
    plain = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "a", state_dir=tmp_path / "sa", **kw))["training"]["anneal"]
    card = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "b", state_dir=tmp_path / "sb", anneal_grammar=True, **kw))
    strict = card["training"]["anneal"]
    assert strict["grammar"] and not plain["grammar"] and strict["files"] == plain["files"]
    assert 30 <= strict["fortunes"] < plain["fortunes"] / 2 and strict["tokens"] < plain["tokens"] / 2  # the proverbs and a few lines
    assert card["command"].endswith("--steps 4 --seed 1337 --anneal-steps 2 --anneal-grammar")
    assert "only the fortunes whose every sentence parses" in (tmp_path / "b" / "README.md").read_text()
    # a finished 4-step run resumed into a grammar anneal: the same weights as one run straight
    mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "c", state_dir=tmp_path / "sc", **{**kw, "anneal_steps": 0}))
    again = mini_gpt2.pretrain_text(tiny_cfg(tmp_path, out=tmp_path / "c", state_dir=tmp_path / "sc", **{**kw, "steps": None},
                                             anneal_grammar=True), resume=True)
    assert again["training"]["anneal"] == strict and json.loads((tmp_path / "sc" / "state.json").read_text())["anneal_grammar"]
    b, c = load_file(str(tmp_path / "b" / "model.safetensors")), load_file(str(tmp_path / "c" / "model.safetensors"))
    assert all(torch.equal(b[k], c[k]) for k in b)
