"""Smoke test of `bench all` with tiny sizes (the real run is not a test)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_all_tiny_writes_a_table(tmp_path):
    out = tmp_path / "BENCH.md"
    r = subprocess.run([sys.executable, "-m", "engine", "bench", "all", "--per-class", "4", "--image-size", "32",
                        "--epochs", "1", "--train-steps", "1", "--tokens", "4", "--no-cold-start",
                        "--process-per-class", "4", "--process-image-size", "32", "--threads", "1",
                        "--out", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    whats = " ".join(row["what"] for row in result["rows"])
    for part in ("linear probe", "whole processes", "extraction engine", "extraction", "head retraining", "full fine-tune", "input pipeline", "generation"):
        assert part in whats
    assert all(row["baseline_value"] > 0 and row["ours_value"] > 0 for row in result["rows"])
    text = out.read_text()
    assert text.startswith("# Benchmarks") and text.count("\n| ") == len(result["rows"]) + 1
