import os
import sys
import threading
import time

import pytest

from engine import jobs
from engine.core import runs


def fake_runner(ctx):
    """Counts steps, honours cancel, and resumes from a checkpoint file."""
    start = int((ctx.run_dir / "ckpt").read_text()) if ctx.resume and (ctx.run_dir / "ckpt").exists() else 0
    for step in range(start, ctx.config["steps"]):
        if ctx.cancelled():
            break
        if ctx.config.get("fail"):
            raise ValueError("boom")
        time.sleep(ctx.config.get("sleep", 0))
        ctx.report(step=step + 1, steps=ctx.config["steps"])
        (ctx.run_dir / "ckpt").write_text(str(step + 1))
    return {"steps_done": int((ctx.run_dir / "ckpt").read_text()), "started_at": start}


def _register(monkeypatch):
    monkeypatch.setitem(jobs.RUNNERS, "fake", "tests.test_jobs:fake_runner")


def test_jobs_run_in_order_and_persist(monkeypatch):
    _register(monkeypatch)
    m = jobs.get_manager()
    a = m.submit("fake", {"steps": 3, "sleep": 0.05}, "a", device="cpu")
    b = m.submit("fake", {"steps": 2}, "b", device="cpu")
    assert m.queue_position(b) in (0, 1)
    assert m.wait(a) == "done" and m.wait(b) == "done"
    ra, rb = runs.get(a), runs.get(b)
    assert ra["summary"]["steps_done"] == 3 and rb["summary"]["steps_done"] == 2
    assert ra["finished"] <= rb["started"]  # one worker per device: served one after the other


def test_cancel_stops_and_resume_continues(monkeypatch):
    _register(monkeypatch)
    m = jobs.get_manager()
    run_id = m.submit("fake", {"steps": 200, "sleep": 0.01}, "long", device="cpu")
    while (m.progress(run_id) or {}).get("step", 0) < 3:
        time.sleep(0.01)
    m.cancel(run_id)
    assert m.wait(run_id) == "cancelled"
    done_before = int((runs.run_dir(run_id) / "ckpt").read_text())
    assert 3 <= done_before < 200
    m.resume(run_id, device="cpu")
    assert m.wait(run_id) == "done"
    summary = runs.get(run_id)["summary"]
    assert summary["steps_done"] == 200 and summary["started_at"] == done_before


def test_failure_is_recorded_and_worker_survives(monkeypatch):
    _register(monkeypatch)
    m = jobs.get_manager()
    bad = m.submit("fake", {"steps": 1, "fail": True}, "bad", device="cpu")
    assert m.wait(bad) == "failed"
    assert "ValueError" in runs.get(bad)["error"] and "ref" in runs.get(bad)["error"]
    good = m.submit("fake", {"steps": 1}, "good", device="cpu")
    assert m.wait(good) == "done"


def test_restart_marks_running_runs_interrupted(monkeypatch):
    run_id = runs.create("fake", "orphan", {"steps": 1})
    runs.set_status(run_id, "running")
    m = jobs.JobManager()  # a fresh process
    assert run_id in m.interrupted
    assert runs.get(run_id)["status"] == "interrupted"


def test_queue_limit(monkeypatch):
    _register(monkeypatch)
    monkeypatch.setattr(jobs, "MAX_QUEUED", 2)
    m = jobs.get_manager()
    ids = [m.submit("fake", {"steps": 50, "sleep": 0.02}, f"j{i}", device="cpu") for i in range(2)]
    try:
        m.submit("fake", {"steps": 1}, "one too many", device="cpu")
        raised = False
    except jobs.UserError as err:
        raised = "already queued or running" in str(err)
    for i in ids:
        m.cancel(i)
    for i in ids:
        m.wait(i)
    assert raised


def nice_runner(ctx):
    """Reports the CPU priority its own thread runs at."""
    return {"nice": os.getpriority(os.PRIO_PROCESS, threading.get_native_id())}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are a Linux feature")
def test_jobs_run_below_the_pages_priority(monkeypatch):
    # A presenter's training job must not slow down what the audience waits for (a generation, a
    # prediction): the job's worker thread runs niced, the server's own threads keep their priority.
    monkeypatch.setitem(jobs.RUNNERS, "nice", "tests.test_jobs:nice_runner")
    m = jobs.get_manager()
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    run_id = m.submit("nice", {}, "nice", device="cpu-nice-test")
    assert m.wait(run_id) == "done"
    assert runs.get(run_id)["summary"]["nice"] == min(19, before + jobs.JOB_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the process as a whole too
