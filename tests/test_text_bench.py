"""Smoke test for `bench generate` on the bundled mini model (numbers are reported, never asserted)."""
from engine.__main__ import main
from engine.bench import speed
from engine.models import sources


def test_bench_generate_mini_smoke():
    assert sources.mini_text_available()
    r = speed.bench_generate(new_tokens=8, repeats=1, models=("mini",))
    (case,) = r["cases"]
    assert case["new_tokens"] == 16 and case["prompt_tokens"] > 0
    for key in ("plain_hf_fp32_tokens_per_s", "project_tokens_per_s", "project_balanced_tokens_per_s"):
        assert case[key] > 0
    assert abs(case["ratio"] - case["project_tokens_per_s"] / case["plain_hf_fp32_tokens_per_s"]) < 0.02 * case["ratio"] + 0.01
    assert "tokens/s" in speed.format_generate(r)


def test_bench_generate_bad_option(capsys):
    assert main(["bench", "generate", "--tokens", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --tokens must be 1..200")
