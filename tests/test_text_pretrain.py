"""Mini GPT-2 pretraining on a small fake fortunes folder: cleaning, output folder, model card, exact resume."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from engine.core.errors import UserError
from engine.pretrain import mini_gpt2
from engine.text import causal_lm, generation
from tests.text_helpers import corpus


def fake_fortunes(folder):
    folder.mkdir()
    lines = corpus(300, seed=2).split("\n")
    (folder / "wisdom").write_text("\n%\n".join(lines[:150]) + "\n%\n\t\t-- Someone Famous\n")
    (folder / "people").write_text("\n%\n".join(lines[150:]) + "\n%\n _/\\_ |__| /\\/\\ |\n")
    (folder / "people.dat").write_bytes(b"\x00\x01binary index")  # index files are ignored
    (folder / "ascii-art").write_text("@@@@\n%\n####\n")
    return folder


def tiny_cfg(tmp_path, **kw) -> mini_gpt2.TextPretrainConfig:
    return mini_gpt2.TextPretrainConfig(**{
        "out": tmp_path / "mini", "data_dir": tmp_path / "fortunes", "state_dir": tmp_path / "state", "steps": 6,
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
