"""CLI: generate (plain / --json, byte-identical under a seed), lm-finetune, and `error: ...` exit 2 on bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.__main__ import main
from tests.text_helpers import corpus

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_and_plain(tiny_dir, capsys):
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "the cat", "--seed", "3",
                         "--num-return-sequences", "2", "--max-new-tokens", "12", "--json")
    assert code == 0
    obj = json.loads(out)
    assert set(obj) >= {"model", "samples", "tokens_per_s", "seed"}
    assert obj["seed"] == 3 and len(obj["samples"]) == 2 and obj["tokens_per_s"] > 0
    assert all(s.startswith("the cat") for s in obj["samples"])
    code, out, err = run(capsys, "generate", "--model", str(tiny_dir), "--prompt", "the cat", "--seed", "3",
                         "--num-return-sequences", "2", "--max-new-tokens", "12")
    assert code == 0 and out == "\n\n---\n\n".join(obj["samples"]) + "\n"
    assert "seed 3" in err and "tokens/s" in err


def test_same_seed_is_byte_identical_across_processes(tiny_dir, tmp_path):
    argv = [sys.executable, "-m", "engine", "generate", "--model", str(tiny_dir), "--prompt", "the dog", "--seed", "11",
            "--max-new-tokens", "20", "--top-k", "0", "--temperature", "1.0", "--stop", "zzz"]
    env = dict(os.environ, TRANSFER_STUDIO_HOME=str(tmp_path / "ws"))
    a = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=300)
    b = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert a.returncode == 0 and b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith(b"the dog")


@pytest.mark.parametrize("argv, message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--num-return-sequences", "9"], "number of samples"),
    (["--prompt", "x", "--max-new-tokens", "0"], "max new tokens"),
    (["--prompt", "x", "--top-k", "abc"], "invalid int value"),
    (["--prompt", "x", "--model", "/no/such/folder"], "model folder not found"),
    (["--prompt", "x", "--model", "gpt2-medium"], "no network"),
])
def test_generate_bad_options_exit_2(tiny_dir, capsys, argv, message):
    full = ["generate", *argv] if "--model" in argv else ["generate", "--model", str(tiny_dir), *argv]
    code, out, err = run(capsys, *full)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_lm_finetune_prints_perplexity_before_and_after(tiny_dir, tmp_path, capsys):
    f = tmp_path / "mine.txt"
    f.write_text(corpus(100, seed=1))
    code, out, err = run(capsys, "lm-finetune", "--text", str(f), "--model", str(tiny_dir), "--epochs", "2",
                         "--lr", "3e-3", "--block-size", "32", "--out", str(tmp_path / "run"), "--json")
    assert code == 0
    obj = json.loads(out)
    assert obj["ppl_after"] < obj["ppl_before"]
    assert (Path(obj["model_dir"]) / "model.safetensors").is_file()
    code, out, err = run(capsys, "lm-finetune", "--text", str(f), "--model", str(tiny_dir), "--epochs", "1",
                         "--block-size", "32", "--out", str(tmp_path / "run2"))
    assert code == 0 and "perplexity on the held-out text: before" in out and "fine-tuned:" in out


def test_lm_finetune_bad_input_exit_2(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait, encore et encore".encode("latin-1"))
    code, out, err = run(capsys, "lm-finetune", "--text", str(bad), "--model", str(tiny_dir), "--out", str(tmp_path / "r"))
    assert code == 2 and "not valid UTF-8" in err and "byte offset 3" in err
    code, out, err = run(capsys, "lm-finetune", "--text", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "r"))
    assert code == 2 and "not found" in err
    code, out, err = run(capsys, "lm-finetune", "--text", str(bad), "--epochs", "0", "--out", str(tmp_path / "r"))
    assert code == 2 and "epochs" in err
