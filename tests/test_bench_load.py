"""The load benchmark's own accounting (the benchmark itself runs real browsers, by hand: README)."""
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_browsers_yield_has_its_own_section(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n")
    both = {"sessions": 10, "seconds": 60, "tokens": 40, "rounds": [round_(1), round_(2)], "memory_growth_mb": 5.0,
            "training_job": {"exit_code": 0, "seconds": 200.0, "error": ""}, "cores": {"server": [0, 1], "browsers": [0, 1]}}
    browser_load.write_markdown({**both, "placement": "shared"}, md)
    browser_load.write_markdown({**both, "placement": "yield"}, md)
    text = md.read_text()
    assert text.count(browser_load.HEAD) == 1 and text.count(browser_load.HEAD_YIELD) == 1
    assert "--browsers-yield" in text.split(browser_load.HEAD_YIELD)[1] and "--browsers-yield" not in text.split(browser_load.HEAD_YIELD)[0]


@pytest.mark.skipif(not Path("/proc/self/autogroup").is_file(), reason="Linux autogroup scheduling is off here")
def test_the_browser_wrapper_puts_its_session_group_at_the_lowest_priority(tmp_path):
    # what Chromium does when Playwright starts it: a session of its own; the wrapper then lowers that session's group
    ours = Path("/proc/self/autogroup").read_text()
    wrapper = tmp_path / "chromium"
    wrapper.write_text(browser_load.browser_wrapper("cat", None, lowest=True))
    wrapper.chmod(0o755)
    out = subprocess.run(["setsid", str(wrapper), "/proc/self/autogroup"], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("nice 19")
    assert Path("/proc/self/autogroup").read_text() == ours  # the tests' own group is untouched
    pinned = browser_load.browser_wrapper("/usr/bin/chromium", [1], lowest=False)
    assert "taskset -c 1 /usr/bin/chromium" in pinned and "autogroup" not in pinned
