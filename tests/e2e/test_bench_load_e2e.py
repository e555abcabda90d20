"""Smoke test of `bench load` at the smallest size (the real run is not a test): one browser session
generates and predicts against its own server, and the result lands in a BENCHMARKS-style file."""
import json
import subprocess
import sys

from tests.e2e.conftest import ROOT


def test_bench_load_smallest_run(tmp_path):
    out = tmp_path / "BENCH.md"
    r = subprocess.run([sys.executable, "-m", "engine", "bench", "load", "--sessions", "1", "--seconds", "4", "--rounds", "1",
                        "--no-train", "--out", str(out), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout)
    (one,) = result["rounds"]
    assert one["errors"] == 0, one["error_kinds"]
    assert one["generations"] >= 1 and one["predictions"] >= 1
    assert 0 < one["generate_p50_s"] < 60 and 0 < one["predict_p50_s"] < 60 and one["server_peak_mb"] > 50
    text = out.read_text()
    assert "## Load: many browser sessions on one server" in text and "| goal | measured | met |" in text
