"""Transfer Lab for text: the three numbers on perplexity curves, the less-data sweep, the job and the CLI,
with a tiny GPT-2 pretrained for a few seconds on one style of text and tested on another."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine import jobs
from engine.__main__ import main
from engine.core import runs
from engine.core.errors import UserError
from engine.lab import experiments, text_transfer
from tests.text_helpers import corpus, make_pretrained_tiny_lm
from tests.text_helpers import tiny_text_lab as tiny


@pytest.fixture(scope="module")
def pretrained_lm(tmp_path_factory) -> str:
    return str(make_pretrained_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny"))


@pytest.fixture
def new_text(tmp_path) -> str:
    path = tmp_path / "new.txt"
    path.write_text(corpus(400, seed=7))
    return str(path)


def test_three_numbers_from_a_given_perplexity_curve():
    n = text_transfer.three_numbers([4000.0, 200.0, 100.0, 50.0, 25.0, 30.0])
    assert n["start"] == 200.0 and n["asymptote"] == 25.0
    assert n["slope"] == pytest.approx(math.log(200 / 25) / 3)  # halves per interval: log 2 nats per interval
    assert text_transfer.three_numbers([300.0, 100.0])["slope"] == 0.0  # one interval: no early slope to read
    with pytest.raises(ValueError):
        text_transfer.three_numbers([300.0])


def run(group: str, ppl: list[float], seed: int = 0, x: float = 1.0) -> dict:
    return {"group": group, "seed": seed, "x": x, "done": True, "seconds": 1.0, "train_tokens": 100,
            "metrics": [{"epoch": i, "step": 10 * i, "val_ppl": v} for i, v in enumerate(ppl)]}


def test_benefits_read_lower_perplexity_as_better_and_say_when_it_reaches_scratchs_best():
    b = text_transfer.benefits([run("pretrained", [300, 120, 90, 80, 70]), run("scratch", [4000, 900, 400, 250, 200])])
    g = b["groups"]
    assert g["pretrained"]["start"]["mean"] == 120 and g["scratch"]["asymptote"]["mean"] == 200
    assert b["steps_to_scratch_best"] == 10 and b["steps"] == 40  # 120 <= 200 already after the first interval
    r = b["readings"]
    assert "perplexity 120" in r["start"] and "a model of English" in r["start"]
    assert "falls faster here" in r["slope"] and "at step 10 of 40" in r["slope"]
    assert "ends lower" in r["asymptote"]
    worse = text_transfer.benefits([run("pretrained", [300, 290, 285, 280]), run("scratch", [4000, 250, 200, 150])])
    assert "no head start" in worse["readings"]["start"] and "from scratch ends lower" in worse["readings"]["asymptote"]
    assert worse["steps_to_scratch_best"] is None


def test_less_data_sweep_reports_the_ratio_per_fraction():
    rs = [run("pretrained", [300, 100, 80], x=0.1), run("scratch", [4000, 900, 400], x=0.1),
          run("pretrained", [300, 90, 60], x=1.0), run("scratch", [4000, 500, 120], x=1.0)]
    res = text_transfer.summarise("text-data-size", rs)
    assert [p["x"] for p in res["sweep"]["pretrained"]] == [0.1, 1.0]
    assert res["ratio"] == [{"x": 0.1, "ratio": 5.0}, {"x": 1.0, "ratio": 2.0}]
    assert "The less text, the more pretraining is worth" in res["reading"]
    assert "Pretrained on 10% of the text (80) beats from scratch on 100% of it (120)" in res["reading"]
    rs[0] = run("pretrained", [300, 140, 130], x=0.1)  # pretrained on 10% now worse than scratch on all of it: not claimed
    assert "beats" not in text_transfer.summarise("text-data-size", rs)["reading"]


def test_fractions_keep_a_seeded_share_of_the_blocks():
    a, b = text_transfer.keep_fraction(100, 0.3, seed=0), text_transfer.keep_fraction(100, 0.3, seed=0)
    assert torch.equal(a, b) and len(a) == 30 and len(set(a.tolist())) == 30
    assert not torch.equal(a, text_transfer.keep_fraction(100, 0.3, seed=1))
    assert len(text_transfer.keep_fraction(5, 0.01, seed=0)) == 2 and len(text_transfer.keep_fraction(7, 1.0, seed=0)) == 7


def test_compare_trains_both_sides_the_same_steps_and_pretrained_starts_lower(pretrained_lm, new_text, tmp_path):
    head = experiments.run_lab(tiny("text-compare", new_text, pretrained_lm), tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    assert state["status"] == "done" and [r["group"] for r in state["runs"]] == ["pretrained", "scratch"]
    for r in state["runs"]:
        assert [m["step"] for m in r["metrics"]] == [0, 4, 8, 12] and r["done"]
    pre, scr = ([m["val_ppl"] for m in r["metrics"]] for r in state["runs"])
    assert pre[0] < scr[0] / 2  # the pretrained model already knows the words; the random one is near chance
    assert head["pretrained_start"] < head["scratch_start"]
    assert state["weights"]["parameters"] > 0 and state["data"]["train_tokens"] > state["data"]["val_tokens"] > 0
    assert "validation perplexity" in experiments.format_text("x", state)


def test_the_scratch_side_is_the_same_architecture_with_random_weights(pretrained_lm):
    from transformers import GPT2LMHeadModel

    pre = GPT2LMHeadModel.from_pretrained(pretrained_lm)
    a, b = text_transfer.scratch_model(pre, seed=0), text_transfer.scratch_model(pre, seed=0)
    assert a.config.to_dict() == pre.config.to_dict()
    assert torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)  # seeded
    assert not torch.equal(a.transformer.wte.weight, pre.transformer.wte.weight)


def test_data_size_trains_on_each_fraction(pretrained_lm, new_text, tmp_path):
    experiments.run_lab(tiny("text-data-size", new_text, pretrained_lm, fractions=[0.25, 1.0], steps=8), tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    tokens = {(r["group"], r["x"]): r["train_tokens"] for r in state["runs"]}
    assert set(tokens) == {(g, f) for g in ("pretrained", "scratch") for f in (0.25, 1.0)}
    assert tokens[("pretrained", 0.25)] == pytest.approx(tokens[("pretrained", 1.0)] / 4, rel=0.1)
    assert len(state["result"]["ratio"]) == 2 and state["result"]["reading"]


def test_text_lab_job_runs_in_the_background(pretrained_lm, new_text):
    m = jobs.get_manager()
    run_id = experiments.submit(tiny("text-compare", new_text, pretrained_lm, steps=4), m)
    assert m.wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]
    run = runs.get(run_id)
    assert "new.txt" in run["title"] and "pretrained_asymptote" in run["summary"]


def test_cli_text_compare_prints_curves_and_numbers(pretrained_lm, new_text, capsys):
    code = main(["lab", "text-compare", "--data", new_text, "--weights", pretrained_lm, "--steps", "6", "--eval-every", "3",
                 "--seeds", "1", "--batch-size", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["group"] for r in out["runs"]] == ["pretrained", "scratch"] and all(r["step"] == [0, 3, 6] for r in out["runs"])
    assert set(out["result"]["benefits"]["groups"]["pretrained"]) == {"start", "slope", "asymptote"}


@pytest.mark.parametrize("argv, words", [
    (["lab", "text-compare", "--data", "no-such-file.txt", "--steps", "2"], "no text file"),
    (["lab", "text-compare", "--steps", "0"], "steps"),
    (["lab", "text-data-size", "--fractions", "0.1,x"], "--fractions"),
    (["lab", "text-data-size", "--fractions", "0,1"], "fractions of the text"),
])
def test_cli_bad_text_options_exit_2_with_one_error_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_a_missing_text_is_refused_before_anything_is_queued():
    with pytest.raises(UserError, match="no text file"):
        experiments.submit(experiments.LabConfig("text-compare", data="nowhere.txt"))
