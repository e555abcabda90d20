"""Two sessions at once: both start training, both finish correctly, one after the other on the
device; text generation still answers while a training job runs; lm fine-tuning shares the queue."""
import threading
import time
from pathlib import Path

from engine import jobs
from engine.core import runs
from engine.text import causal_lm, generation
from tests.imgs import class_folder


def test_two_sessions_train_and_generate_at_once(tmp_path, tiny_dir):  # noqa: F811
    data = {s: class_folder(tmp_path / s, classes=("red", "blue", "green") if s == "b" else ("red", "blue"), n=5) for s in "ab"}
    manager = jobs.get_manager()
    ids, errors = {}, []

    def session(name):
        try:
            cfg = dict(data=str(data[name]), weights="none", strategy="full", epochs=2, batch_size=4, image_size=32)
            ids[name] = manager.submit("finetune", cfg, f"session {name}", device="cpu")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=session, args=(s,)) for s in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ids) == 2

    # generation answers while the worker trains (it does not go through the job queue)
    lm = causal_lm.load(str(tiny_dir))
    t0 = time.time()
    gen = generation.generate(lm, "the cat", generation.GenerationConfig(max_new_tokens=8, seed=1))
    assert gen.samples[0].token_ids and time.time() - t0 < 60
    assert any(runs.get(i)["status"] in ("queued", "running") for i in ids.values()), "generation ran during training"

    for i in ids.values():
        assert manager.wait(i, timeout=600) == "done", runs.get(i)["error"]
    a, b = runs.get(ids["a"]), runs.get(ids["b"])
    # each session sees its own run: its own classes and epochs
    assert a["summary"]["classes"] == ["blue", "red"] and b["summary"]["classes"] == ["blue", "green", "red"]
    assert a["summary"]["epochs_done"] == b["summary"]["epochs_done"] == 2
    first, second = sorted((a, b), key=lambda r: r["started"])
    assert first["finished"] <= second["started"] + 1e-3  # one device, one job at a time
    assert Path(a["dir"]) != Path(b["dir"])
