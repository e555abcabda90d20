"""LM fine-tuning: perplexity drops, the job cancels and resumes exactly, the model is usable and exportable; the page."""
from __future__ import annotations

import json
import math
import time
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from engine import jobs
from engine.core import runs
from engine.core.errors import UserError
from engine.text import causal_lm, lm_finetune, text_files
from tests.text_helpers import corpus

PAGE = str(Path(__file__).resolve().parents[1] / "pages" / "text_finetune.py")
# the page's cached manager() must belong to this test's workspace: a manager left from another test's
# workspace made jobs.get_manager() start a new one, which marked the page's running job "interrupted"
pytestmark = pytest.mark.usefixtures("fresh_manager")


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "style.txt"
    path.write_text(corpus(120, seed=7))
    return path


def config(tiny_dir, corpus_file, **kw) -> lm_finetune.LMFinetuneConfig:
    return lm_finetune.LMFinetuneConfig(**{"texts": [str(corpus_file)], "model": str(tiny_dir), "epochs": 2, "lr": 3e-3,
                                       "block_size": 32, "batch_size": 8, "sample_tokens": 10, **kw})


def test_finetune_lowers_perplexity_and_writes_a_loadable_model(tiny_dir, corpus_file, tmp_path):
    out = lm_finetune.finetune(config(tiny_dir, corpus_file), tmp_path / "run")
    assert math.isfinite(out["ppl_before"]) and math.isfinite(out["ppl_after"])
    assert out["ppl_after"] < out["ppl_before"] * 0.8
    tuned = causal_lm.load(out["model_dir"])
    assert tuned.name.startswith("tiny-lm") and "fine-tuned" in tuned.name
    # the held-out perplexity is reproducible from the saved model
    ids = tuned.tokenizer(corpus_file.read_text())["input_ids"]
    _, val, block = lm_finetune.split_tokens(ids, 0.1, 32)
    assert causal_lm.perplexity(tuned.model, val, block) == pytest.approx(out["ppl_after"], rel=1e-3)
    assert out["sample_base"].startswith(out["sample_prompt"]) and out["sample_finetuned"].startswith(out["sample_prompt"])
    z = lm_finetune.export_zip(Path(out["model_dir"]))
    names = {Path(n).name for n in zipfile.ZipFile(z).namelist()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "model_card.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_job_cancel_then_resume_matches_an_uninterrupted_run(tiny_dir, corpus_file, monkeypatch, tmp_path):
    straight = lm_finetune.finetune(config(tiny_dir, corpus_file, epochs=4), tmp_path / "straight")
    monkeypatch.setattr(lm_finetune, "CHECKPOINT_EVERY_S", 0.0)  # checkpoint every step
    m = jobs.get_manager()
    run_id = m.submit("lm-finetune", config(tiny_dir, corpus_file, epochs=4).__dict__, "cancel me", device="cpu")
    while (m.progress(run_id) or {}).get("step", 0) < 2:
        time.sleep(0.01)
    m.cancel(run_id)
    assert m.wait(run_id, 120) == "cancelled"
    ckpt = json.loads((runs.run_dir(run_id) / "checkpoint" / "checkpoint.json").read_text())
    assert 2 <= ckpt["step"] < straight["steps"]
    m.resume(run_id, device="cpu")
    assert m.wait(run_id, 120) == "done"
    resumed = runs.get(run_id)["summary"]
    assert resumed["steps"] == straight["steps"]
    assert resumed["ppl_after"] == pytest.approx(straight["ppl_after"], rel=1e-4)
    assert str(runs.run_dir(run_id) / "model") in causal_lm.model_choices()


def test_text_input_is_validated(tiny_dir, tmp_path):
    with pytest.raises(UserError, match="byte offset 2"):
        lm_finetune.save_corpus(b"ok\xc3\x28 broken", "bad.txt")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(UserError, match="at least 32 tokens"):
        lm_finetune.finetune(lm_finetune.LMFinetuneConfig(texts=[str(short)], model=str(tiny_dir)), tmp_path / "r")
    with pytest.raises(UserError, match="epochs"):
        lm_finetune.LMFinetuneConfig(texts=["x"], epochs=0).validate()
    with pytest.raises(UserError, match="no text"):
        lm_finetune.LMFinetuneConfig().validate()
    p = lm_finetune.save_corpus("héllo wörld".encode(), "good.txt")
    assert p.read_text() == "héllo wörld" and p.parent.name == "text"


def test_page_trains_and_shows_before_after(tiny_as_mini):
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    at.button[0].click().run()
    assert any("upload a .txt file or paste" in e.value for e in at.error)
    at.text_area(key="tf_paste").set_value(corpus(80, seed=3))
    at.select_slider(key="tf_block").set_value(32)
    at.button[0].click().run()
    assert not at.exception and not at.error
    run_id = at.session_state.tf_run
    assert jobs.get_manager().wait(run_id, 120) == "done"
    at.run()
    labels = {m.label: m.value for m in at.metric}
    assert float(labels["Perplexity after"]) < float(labels["Perplexity before"])
    assert any(c.value.startswith("Base: ") for c in at.caption)
    assert any(c.value == "Fine-tuned" for c in at.caption)
    # how many tokens the perplexity rests on, and a warning when they are too few to mean much
    val_tokens = runs.get(run_id)["summary"]["val_tokens"]
    assert any(f"{val_tokens} held-out tokens" in c.value for c in at.caption)
    assert val_tokens >= 1000 or any("too few" in w.value for w in at.warning)


def test_the_uploader_enforces_the_limit_its_label_states(tiny_as_mini):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    up = at.get("file_uploader")[0]
    mb = text_files.MAX_TEXT_BYTES // 2**20
    assert f"up to {mb} MB each" in up.proto.label
    assert up.proto.max_upload_size_mb == mb  # the browser refuses larger files with the same number


def test_a_second_run_is_shown_when_it_starts(tiny_as_mini):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.text_area(key="tf_paste").set_value(corpus(40, seed=5))
    at.select_slider(key="tf_block").set_value(32)
    at.button[0].click().run()
    first = at.session_state.tf_run
    assert jobs.get_manager().wait(first, 120) == "done"
    at.run()
    assert at.selectbox(key="tf_pick").value == first
    at.slider(key="tf_epochs").set_value(2)
    at.button[0].click().run()  # new settings, a new run: the page must show it, not the previous one
    second = at.session_state.tf_run
    assert second != first and at.selectbox(key="tf_pick").value == second
    jobs.get_manager().wait(second, 120)


# ----------------------------------------------------------------------------- defaults that show an effect
def test_epochs_from_the_text_size_give_a_step_budget_not_a_fixed_pass_count():
    small, large = 2_600_000, 124_000_000
    assert lm_finetune.plan_epochs(3, 8, small) == lm_finetune.MAX_AUTO_EPOCHS  # a paste: many passes, capped
    e = lm_finetune.plan_epochs(428, 8, small)  # a book: 54 steps a pass
    assert e * 54 >= lm_finetune.TARGET_STEPS["small"] > (e - 1) * 54
    assert lm_finetune.plan_epochs(428, 8, large) * 54 < lm_finetune.plan_epochs(428, 8, small) * 54  # big models: fewer
    assert lm_finetune.plan_epochs(100_000, 8, small) == 1


def test_a_run_without_epochs_takes_them_from_the_text(tiny_dir, corpus_file, tmp_path):
    out = lm_finetune.finetune(config(tiny_dir, corpus_file, epochs=None), tmp_path / "run")
    ids = causal_lm.load(str(tiny_dir)).tokenizer(corpus_file.read_text())["input_ids"]
    train, _, block = lm_finetune.split_tokens(ids, 0.1, 32)
    n_blocks = len(lm_finetune.blocks(train, block)[0])
    assert out["epochs_from"] == "the text's size" and out["epochs"] == lm_finetune.plan_epochs(n_blocks, 8, 10**6)
    assert out["steps"] == out["epochs"] * math.ceil(n_blocks / 8) >= 2 * math.ceil(n_blocks / 8)  # more than the old 2 passes


@pytest.mark.slow
def test_the_bundled_example_text_changes_the_bundled_model_visibly(tmp_path):
    """One pass of the mini GPT-2 over Genesis (KJV): the held-out perplexity falls by more than half."""
    text = text_files.EXAMPLE_TEXT.read_text()
    assert text.startswith("In the beginning God created") and len(text) > 150_000
    out = lm_finetune.finetune(lm_finetune.LMFinetuneConfig(texts=[str(text_files.EXAMPLE_TEXT)], model="mini", epochs=1,
                                                            sample_prompt=text_files.EXAMPLE_PROMPT, sample_tokens=12), tmp_path / "run")
    assert out["ppl_after"] < 0.5 * out["ppl_before"]
    assert out["sample_base"].startswith("And the LORD said") and out["sample_finetuned"] != out["sample_base"]


def test_try_the_example_starts_a_run_on_it_in_one_click(tiny_as_mini):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    next(b for b in at.button if b.label.startswith("Try it on")).click().run()
    run = runs.get(at.session_state.tf_run)
    assert run["config"]["texts"] == [str(text_files.EXAMPLE_TEXT)] and run["config"]["epochs"] is None
    assert run["config"]["sample_prompt"] == text_files.EXAMPLE_PROMPT and text_files.EXAMPLE_TITLE in run["title"]
    jobs.get_manager().cancel(run["id"])
    jobs.get_manager().wait(run["id"], 60)


def test_the_form_keeps_its_text_and_settings_across_a_visit_to_another_page(tiny_as_mini):
    """Pasted text and chosen settings survive a look at another page (Streamlit would drop them)."""
    from tests.helpers import away_and_back, open_page

    at = open_page("pages/text_finetune.py")
    at.text_area(key="tf_paste").set_value("Call me Ishmael. Some years ago, never mind how long precisely.")
    at.select_slider(key="tf_lr").set_value(3e-4)
    at.text_input(key="tf_prompt").set_value("Call me")
    away_and_back(at.run(), "pages/text_finetune.py", "pages/generate.py")
    assert at.text_area(key="tf_paste").value.startswith("Call me Ishmael")
    assert at.select_slider(key="tf_lr").value == 3e-4 and at.text_input(key="tf_prompt").value == "Call me"
