"""Background jobs: one worker thread per device, a FIFO queue, progress, cancel, resume.

Training never runs in the Streamlit script thread. A page calls `get_manager().submit(...)`
and then polls `progress(run_id)` (e.g. from `st.fragment(run_every=1)`). Two browser
sessions that start runs at once are served one after the other on the same device.

A runner is a function `run_job(ctx: JobContext) -> dict` named in RUNNERS. It reads
ctx.config, writes its files into ctx.run_dir, calls ctx.report(...) as it goes and checks
ctx.cancelled() every step; when cancelled it saves what it learned and returns. With
ctx.resume True it continues from the last checkpoint in ctx.run_dir. The dict it returns is
the run's summary (e.g. best_val_acc, epochs, img_s) stored in SQLite.

Workers never call Streamlit. Progress is a lock-guarded dict; the run's status and summary
live in SQLite (engine.runs) so a restart finds them.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engine.core import runs, workspace
from engine.core.errors import Cancelled, UserError

log = logging.getLogger(__name__)

RUNNERS = {
    "finetune": "engine.vision.finetune:run_job",
    "lr-find": "engine.vision.lrfind:run_job",
    "lm-finetune": "engine.text.lm_finetune:run_job",
    "lab": "engine.lab.experiments:run_job",
    "demo": "engine.demo:run_job",
    "download": "engine.models.store:run_job",
}
# queued + running, per process; more is refused with a clear message
MAX_QUEUED = int(os.environ.get("TRANSFER_STUDIO_MAX_JOBS", 8))
# How much lower the workers' CPU priority is than the pages' (Unix nice; 0 = the same). A training job
# takes every core it can get; without this, a room's generations and predictions queue behind it.
JOB_NICE = int(os.environ.get("TRANSFER_STUDIO_JOB_NICE", 10))


@dataclass
class JobContext:
    """What a runner sees. Also usable without a manager (the CLI runs jobs in the foreground)."""

    run_id: str
    config: dict
    run_dir: Path
    resume: bool = False
    device: str | None = None
    on_report: Callable[[dict], None] | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _progress: dict = field(default_factory=dict)

    def report(self, **fields) -> None:
        """Update the progress record (epoch, epochs, step, steps, loss, acc, img_s, eta_s, phase, message, ...)."""
        with self._lock:
            self._progress.update(fields, updated=time.time())
            snap = dict(self._progress)
        if self.on_report:
            self.on_report(snap)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self._progress)

    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def check_cancel(self) -> None:
        if self.cancel_event.is_set():
            raise Cancelled()


class Quiet:
    """A JobContext stand-in for work run outside a job (a test, a script): reports go nowhere and
    nothing is ever cancelled."""

    resume = False
    device = None

    def report(self, **_) -> None:
        pass

    def cancelled(self) -> bool:
        return False


@contextlib.contextmanager
def ctrl_c_cancels(ctx: JobContext):
    """While the CLI runs a job in the foreground, Ctrl-C asks it to stop (it keeps what it learned and
    can be resumed) instead of killing the process mid-write."""
    previous = signal.signal(signal.SIGINT, lambda *_: ctx.cancel_event.set())
    try:
        yield ctx
    finally:
        signal.signal(signal.SIGINT, previous)


def _runner(kind: str) -> Callable[[JobContext], dict]:
    module, func = RUNNERS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def execute(kind: str, ctx: JobContext) -> tuple[str, dict, str | None]:
    """Run one job to its end; return (status, summary, error message). Never raises."""
    try:
        summary = _runner(kind)(ctx) or {}
        return ("cancelled" if ctx.cancelled() else "done"), summary, None
    except Cancelled:
        return "cancelled", {}, None
    except UserError as err:
        return "failed", {}, str(err)
    except Exception as err:  # noqa: BLE001 - a worker must survive anything a job does
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            _free_accelerator_memory()
            return "failed", {}, "out of memory on the device; try a smaller batch size or image size"
        ref = workspace.log_unexpected(err, f"job {kind} run={ctx.run_id}")
        return "failed", {}, f"unexpected error ({type(err).__name__}); details in studio.log, ref {ref}"


def lower_priority(nice: int = JOB_NICE) -> None:
    """Run the calling thread, and the threads it starts (torch's intra-op pool), `nice` steps below the
    process. Linux only: there a thread has a priority of its own, elsewhere setpriority would change
    the whole process (or another one)."""
    if nice > 0 and sys.platform.startswith("linux"):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))


def _free_accelerator_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class JobManager:
    """Process-wide: keeps live job contexts and one worker per device."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[str, queue.Queue] = {}
        self._live: dict[str, JobContext] = {}
        self._kinds: dict[str, str] = {}
        self._order: list[str] = []  # run ids waiting, in order, for queue positions
        self.interrupted = runs.mark_interrupted()

    # -- submitting
    def submit(self, kind: str, config: dict, title: str, device: str | None = None) -> str:
        if kind not in RUNNERS:
            raise UserError(f"unknown job kind {kind!r}")
        with self._lock:
            if len(self._live) >= MAX_QUEUED:
                raise UserError(f"{len(self._live)} jobs are already queued or running; try again when one has finished")
        workspace.ensure_space()
        run_id = runs.create(kind, title, config)
        self._enqueue(run_id, kind, config, resume=False, device=device)
        return run_id

    def resume(self, run_id: str, device: str | None = None) -> None:
        run = runs.get(run_id)
        if run["status"] not in runs.RESUMABLE:
            raise UserError(f"run {run_id} is {run['status']}; only interrupted, failed or cancelled runs can be resumed")
        if run_id in self._live:
            raise UserError(f"run {run_id} is already queued")
        runs.set_status(run_id, "queued")
        self._enqueue(run_id, run["kind"], run["config"], resume=True, device=device)

    def _enqueue(self, run_id: str, kind: str, config: dict, resume: bool, device: str | None) -> None:
        from engine.core.device import best_device  # deferred: imports torch

        device = device or str(best_device())
        ctx = JobContext(run_id=run_id, config=config, run_dir=runs.run_dir(run_id), resume=resume, device=device)
        ctx.report(phase="queued")
        with self._lock:
            self._live[run_id] = ctx
            self._kinds[run_id] = kind
            self._order.append(run_id)
            q = self._queues.get(device)
            if q is None:
                q = self._queues[device] = queue.Queue()
                threading.Thread(target=self._work, args=(q,), name=f"worker-{device}", daemon=True).start()
        q.put(run_id)

    # -- the worker
    def _work(self, q: queue.Queue) -> None:
        lower_priority()
        while True:
            run_id = q.get()
            ctx, kind = self._live[run_id], self._kinds[run_id]
            with self._lock:
                self._order.remove(run_id)
            if ctx.cancelled():
                runs.set_status(run_id, "cancelled")
                ctx.report(phase="cancelled")
            else:
                runs.set_status(run_id, "running", device=ctx.device)
                ctx.report(phase="running")
                status, summary, error = execute(kind, ctx)
                runs.set_status(run_id, status, error=error, summary=summary or None)
                ctx.report(phase=status, error=error)
            with self._lock:
                self._live.pop(run_id, None)
                self._kinds.pop(run_id, None)
            q.task_done()

    # -- what pages poll
    def cancel(self, run_id: str) -> None:
        ctx = self._live.get(run_id)
        if ctx is not None:
            ctx.cancel_event.set()

    def progress(self, run_id: str) -> dict | None:
        """The live progress record, or None when the run is not queued/running in this process."""
        ctx = self._live.get(run_id)
        return ctx.snapshot() if ctx else None

    def queue_position(self, run_id: str) -> int | None:
        """0 when next in line, 1.. when waiting behind others; None when running or not queued."""
        with self._lock:
            return self._order.index(run_id) if run_id in self._order else None

    def active(self) -> list[dict]:
        """Queued and running jobs with their progress, for the sidebar."""
        with self._lock:
            ids = list(self._live)
        out = []
        for run_id in ids:
            ctx = self._live.get(run_id)
            if ctx:
                out.append({"run_id": run_id, "kind": self._kinds.get(run_id), **ctx.snapshot()})
        return out

    def wait(self, run_id: str, timeout: float = 600) -> str:
        """Block until the run leaves the queue (tests, CLI). Returns its final status."""
        deadline = time.time() + timeout
        while run_id in self._live and time.time() < deadline:
            time.sleep(0.05)
        return runs.get(run_id)["status"]


_manager: JobManager | None = None
_manager_lock = threading.Lock()


def get_manager() -> JobManager:
    """The process-wide manager (created on first use; marks dead runs interrupted)."""
    global _manager
    with _manager_lock:
        home = workspace.home()
        if _manager is None or getattr(_manager, "_home", None) != home:
            _manager = JobManager()
            _manager._home = home
        return _manager
