"""The load benchmark's own accounting (the benchmark itself runs real browsers, by hand: README)."""
import subprocess
import sys

from engine.bench import browser_load


def round_(n: int) -> dict:
    return {"round": n, "sessions": 10, "generations": 30, "predictions": 30, "errors": 0, "error_kinds": [],
            "generate_p50_s": 3.0, "generate_p95_s": 4.5, "model_p50_s": 0.1, "model_p95_s": 0.3, "predict_p50_s": 2.0,
            "predict_p95_s": 6.0, "server_peak_mb": 1000.0, "cpu_seconds": {"browsers": 150.0, "server": 20.0}}


def test_cpu_seconds_are_counted_per_process_group():
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"])
    with browser_load.CpuWatch(server=busy.pid, trainer=None) as cpu:
        busy.wait()
    groups = cpu.by_group()
    assert 1.0 <= groups["server"] <= 2.0  # the busy 1.5 s, counted although the process ended inside the round


def test_each_configuration_has_its_own_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    shared = {"sessions": 10, "seconds": 60, "tokens": 40, "rounds": [round_(1), round_(2)], "memory_growth_mb": 5.0,
              "training_job": {"exit_code": 0, "seconds": 200.0, "error": ""}, "cores": {"server": [0, 1], "browsers": [0, 1]}}
    apart = {**shared, "rounds": [round_(1), {**round_(2), "generate_p95_s": 7.0}], "cores": {"server": [0], "browsers": [1]}}
    browser_load.write_markdown(shared, md)
    browser_load.write_markdown(apart, md)
    text = md.read_text()
    assert text.count(browser_load.HEAD) == 1 and text.count(browser_load.HEAD_APART) == 1
    shared_part, apart_part = text.split(browser_load.HEAD_APART)
    assert "| generation of 40 tokens p95 < 5 s | 4.5 s | yes |" in shared_part and "share the machine's 2 cores" in shared_part
    assert "| generation of 40 tokens p95 < 5 s | 7.0 s | **no** |" in apart_part and "--apart" in apart_part
    assert "browsers 150, server 20" in apart_part
