"""SIGKILL the process mid-training: the run comes back `interrupted`, resumes from its last
epoch checkpoint and finishes with the right number of epochs; the database stays sound."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from engine import jobs
from engine.core import runs, workspace
from engine.data import imagedata
from tests.imgs import class_folder

EPOCHS = 8

CHILD = textwrap.dedent(f"""
    import sys, time
    from engine import jobs
    from engine.vision import finetune
    finetune.CHECKPOINT_EVERY_S = 0  # a checkpoint after every epoch: tiny epochs would otherwise all finish before the first
    cfg = dict(data=sys.argv[1], weights="none", strategy="full", epochs={EPOCHS}, batch_size=8, image_size=32, lr=0.01)
    run_id = jobs.get_manager().submit("finetune", cfg, "killed mid-run", device="cpu")
    print(run_id, flush=True)
    time.sleep(600)
""")


def _epochs(run_dir) -> list[int]:
    try:
        return [m["epoch"] for m in json.loads((run_dir / "metrics.json").read_text())]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def test_sigkill_mid_training_then_resume(tmp_path, workspace_home):
    data = class_folder(tmp_path / "data", n=6)
    imagedata.create_dataset("kept")  # user data that must survive
    imagedata.add_images("kept", "x", [(p.name, p.read_bytes()) for p in (data / "red").iterdir()])

    env = dict(os.environ, TRANSFER_STUDIO_HOME=str(workspace_home), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(data)], env=env, stdout=subprocess.PIPE, text=True)
    run_id = child.stdout.readline().strip()
    run_dir = runs.run_dir(run_id)
    deadline = time.time() + 180
    while len(_epochs(run_dir)) < 2 and time.time() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = _epochs(run_dir)
    assert 2 <= len(done_before) < EPOCHS, "the run must be killed mid-way"

    workspace._local.conn = None  # a new process: fresh connection
    assert workspace.db().execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    manager = jobs.JobManager()
    assert run_id in manager.interrupted and runs.get(run_id)["status"] == "interrupted"
    manager.resume(run_id, device="cpu")
    assert manager.wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]
    assert _epochs(run_dir) == list(range(1, EPOCHS + 1))
    assert runs.get(run_id)["summary"]["epochs_done"] == EPOCHS
    assert imagedata.dataset_counts("kept") == {"x": 6}
    assert not list(run_dir.glob(".tmp-*")), "no half-written files left behind"
