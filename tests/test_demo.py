"""The demo workspace: complete, idempotent, and it never touches a workspace with user data."""
import json
from pathlib import Path

import pytest

from engine import demo, history, imagedata, runs
from engine.errors import UserError
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
