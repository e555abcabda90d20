"""The demo workspace: complete, idempotent, and it never touches a workspace with user data."""
import json
from pathlib import Path

import pytest

from engine import demo
from engine.core import runs
from engine.core.errors import UserError
from engine.data import imagedata
from engine.text import history
from tests.imgs import png


def test_demo_is_complete_and_idempotent():
    first = demo.prepare(epochs=1, lab=False)
    assert "sample dataset" in first["added"] and "fine-tuning run" in first["added"]
    assert imagedata.dataset_counts("Fruit (sample)") == {"apple": 40, "banana": 40, "lemon": 40, "strawberry": 40}
    (run,) = runs.list_runs("finetune")
    assert run["status"] == "done"
    run_dir = Path(run["dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert len(metrics) == 1 and (run_dir / "eval.json").is_file() and (run_dir / "model.safetensors").is_file()
    assert run["summary"]["best_val_acc"] == max(m["val_acc"] for m in metrics)
    gens = history.recent()
    assert len(gens) == len(demo.DEMO_PROMPTS) and all(g["outputs"][0] for g in gens)

    second = demo.prepare(epochs=1, lab=False)
    assert second["added"] == []
    assert len(runs.list_runs()) == 1 and len(history.recent()) == len(demo.DEMO_PROMPTS)


def test_demo_refuses_a_workspace_with_user_data():
    imagedata.create_dataset("my holiday photos")
    imagedata.add_images("my holiday photos", "beach", [("a.png", png())])
    with pytest.raises(UserError, match="your own data"):
        demo.prepare(epochs=1, lab=False, generations=False)
    assert [d["name"] for d in imagedata.list_datasets()] == ["my holiday photos"]


def test_reset_removes_what_is_not_the_demo_and_restores_what_is_missing():
    demo.prepare(epochs=1, lab=False)
    (demo_run,) = runs.list_runs("finetune")
    imagedata.create_dataset("audience photos")
    imagedata.add_images("audience photos", "cat", [("c.png", png())])
    history.save("mini", "an audience prompt", {"seed": 1}, ["…"], {})
    runs.delete(demo_run["id"])  # someone deleted the demo run
    assert demo.user_data() == ["dataset 'audience photos'", f"generation {history.recent()[0]['id']}"]
    assert demo.missing(lab=False) == ["fine-tuning run"]

    done = demo.reset(epochs=1, lab=False)
    assert done["added"] == ["fine-tuning run"] and len(done["removed"]) == 2
    assert [d["name"] for d in imagedata.list_datasets()] == ["Fruit (sample)"]
    assert demo.user_data() == [] and demo.missing(lab=False) == []
    assert [g["prompt"] for g in history.recent()] == list(reversed(demo.DEMO_PROMPTS))


def test_reset_runs_as_a_background_job_and_can_be_cancelled_between_steps():
    from engine import jobs

    imagedata.create_dataset("to go")
    imagedata.add_images("to go", "x", [("x.png", png())])
    manager = jobs.get_manager()
    run_id = manager.submit("demo", {"reset": True, "epochs": 1, "lab": False}, demo.RESET_TITLE)
    assert manager.wait(run_id, timeout=300) == "done"
    run = runs.get(run_id)
    assert run["summary"] == {"added": ["sample dataset", "fine-tuning run", f"{len(demo.DEMO_PROMPTS)} generations"], "removed": 1}
    assert demo.user_data() == []  # the job's own record is a demo record, not user data

    # cancelled before it starts a step: nothing is added, and it says so
    runs.delete(runs.list_runs("finetune")[0]["id"])
    ctx = jobs.JobContext(run_id="x", config={"reset": True, "epochs": 1, "lab": False}, run_dir=Path("."))
    ctx.cancel_event.set()
    assert jobs.execute("demo", ctx)[0] == "cancelled"
    assert demo.missing(lab=False) == ["fine-tuning run"]


def test_demo_cli_reset(capsys):
    from engine.__main__ import main

    imagedata.create_dataset("mine")
    imagedata.add_images("mine", "a", [("a.png", png())])
    assert main(["demo", "--epochs", "1", "--no-lab"]) != 0  # refuses: user data, and says how to go on
    assert "--reset" in capsys.readouterr().err
    assert main(["demo", "--reset", "--epochs", "1", "--no-lab", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["removed"] == ["dataset 'mine'"] and "fine-tuning run" in out["added"]
