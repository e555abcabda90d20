"""Export ZIP (safetensors, labels, preprocessing, card, ONNX == PyTorch) and import back."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine.core import runs
from engine.core.errors import UserError
from engine.vision import export, finetune, inference, preprocess
from tests.helpers import cfg_for, make_dataset


@pytest.fixture
def trained(tmp_path):
    data = make_dataset(tmp_path / "shapes")
    out = tmp_path / "run"
    finetune.finetune(cfg_for(str(data), epochs=2, optimizer="adamw", lr=3e-2), out)
    images = [Image.open(p).convert("RGB") for p in sorted(data.glob("class_*/img_*.png"))[::3]]
    return out, images


def test_export_zip_contents_and_onnx_matches_pytorch(trained, tmp_path):
    import onnxruntime as ort

    run_dir, images = trained
    path = export.export_run(run_dir, tmp_path / "model.zip", onnx=True)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["labels.json", "model.onnx", "model.safetensors", "model_card.md", "preprocessing.json"]
        labels = json.loads(z.read("labels.json"))
        pp = json.loads(z.read("preprocessing.json"))
        card = z.read("model_card.md").decode()
        onnx_bytes = z.read("model.onnx")
    assert labels == ["class_0", "class_1", "class_2"]
    assert pp["image_size"] == 32 and pp["arch"] == "resnet18" and len(pp["mean"]) == len(pp["std"]) == 3
    assert "class_0" in card and "linear" in card and "Best validation accuracy" in card
    # ONNX (uint8 crops in, preprocessing inside the graph) vs PyTorch on real images: within 1e-4
    loaded = inference.load_model(run_dir)
    crops = torch.stack([preprocess.center_crop(preprocess.load_square(im, pp["resize"]), pp["image_size"]) for im in images])
    with torch.inference_mode():
        want = loaded.model(preprocess.normalize(crops, loaded.preprocessing).contiguous())
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["image"] and sess.get_inputs()[0].type == "tensor(uint8)"
    logits, probs = sess.run(["logits", "probabilities"], {"image": crops.permute(0, 2, 3, 1).numpy()})
    assert logits.shape == probs.shape == (len(images), 3)
    assert np.abs(logits - want.numpy()).max() < 1e-4
    assert np.abs(probs - want.softmax(1).numpy()).max() < 1e-5 and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_model_card_example_runs_as_written_and_predicts_what_the_app_predicts(trained, tmp_path):
    """The card's onnxruntime example, copied out and run in a fresh process beside the unzipped files."""
    import re
    import subprocess
    import sys

    run_dir, images = trained
    path = export.export_run(run_dir, tmp_path / "model.zip", onnx=True)
    folder = tmp_path / "user"
    with zipfile.ZipFile(path) as z:
        z.extractall(folder)
    code = re.search(r"```python\n(.*?)```", (folder / "model_card.md").read_text(), re.S).group(1)
    assert len(code.strip().splitlines()) <= 12 and "torch" not in code
    loaded = inference.load_model(run_dir)
    for i, photo in enumerate([images[0], images[-1], images[2].resize((57, 31))]):  # a non-square odd size too
        photo.save(folder / "photo.jpg", quality=95)
        out = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        label, prob = out.stdout.split()
        app = inference.predict(loaded, [Image.open(folder / "photo.jpg")], top_k=1)[0][0]
        assert label == app[0] and abs(float(prob) - app[1]) < 1e-4, i


def test_parity_check_and_fp16_export(trained, tmp_path):
    from engine.vision import export

    run_dir, _ = trained
    full = export.export_run(run_dir, tmp_path / "fp32.zip", onnx=True)
    half = export.export_run(run_dir, tmp_path / "fp16.zip", onnx=True, half=True)
    check = export.parity(run_dir, full)
    assert check["images"] == 20 or check["images"] == len(json.loads((run_dir / "run.json").read_text())["data"]["parity_files"])
    assert "validation" in check["what"] and check["max_prob_diff"] < 1e-5 and check["top1_agree"] == check["images"]
    check16 = export.parity(run_dir, half)
    assert check["max_prob_diff"] < check16["max_prob_diff"] < 1e-2
    assert check16["top1_agree"] >= check16["images"] - 1
    with zipfile.ZipFile(full) as a, zipfile.ZipFile(half) as b:
        for name in ("model.onnx", "model.safetensors"):
            assert b.getinfo(name).file_size < 0.55 * a.getinfo(name).file_size, name
        assert "fp16" in b.read("model_card.md").decode()
    # the fp16 export imports back and predicts like the original
    imported = inference.load_model(export.import_model(half))
    assert imported.classes == inference.load_model(run_dir).classes
    with pytest.raises(UserError, match="no model.onnx"):
        export.parity(run_dir, export.export_run(run_dir, tmp_path / "plain.zip", onnx=False))


def test_export_without_onnx_and_by_run_id(trained, tmp_path):
    run_dir, _ = trained
    path = export.export_run(run_dir, tmp_path / "plain.zip", onnx=False)
    with zipfile.ZipFile(path) as z:
        assert "model.onnx" not in z.namelist()
    with pytest.raises(UserError):
        export.export_run("no-such-run", tmp_path / "x.zip")


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_exported_model_imported_back_predicts_the_same(trained, tmp_path, kind):
    run_dir, images = trained
    path = export.export_run(run_dir, tmp_path / "model.zip", onnx=False)
    if kind == "safetensors":  # the bare weights carry labels and preprocessing in their metadata
        with zipfile.ZipFile(path) as z:
            (tmp_path / "model.safetensors").write_bytes(z.read("model.safetensors"))
        path = tmp_path / "model.safetensors"
    run_id = export.import_model(path)
    assert runs.get(run_id)["kind"] == "imported" and runs.get(run_id)["status"] == "done"
    original, imported = inference.load_model(run_dir), inference.load_model(run_id)
    assert imported.classes == original.classes
    assert imported.preprocessing == original.preprocessing
    a, b = inference.predict(original, images, top_k=3), inference.predict(imported, images, top_k=3)
    for ra, rb in zip(a, b):
        assert [lab for lab, _ in ra] == [lab for lab, _ in rb]
        assert np.allclose([p for _, p in ra], [p for _, p in rb], atol=1e-6)
    # and the imported run exports again
    assert export.export_run(run_id, tmp_path / "again.zip", onnx=False).is_file()


def test_import_refuses_bad_files(trained, tmp_path):
    run_dir, _ = trained
    model = inference.load_model(run_dir).model
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserError, match="pickle"):
        export.import_model(tmp_path / "model.pt")
    # pickle bytes inside a ZIP under the expected name
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.write(tmp_path / "model.pt", "model.safetensors")
    with pytest.raises(UserError, match="not a safetensors file"):
        export.import_model(tmp_path / "evil.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UserError, match="no model.safetensors"):
        export.import_model(tmp_path / "empty.zip")
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError):
        export.import_model(tmp_path / "notzip.zip")
    # labels that do not match the head
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(UserError, match="labels"):
        export.import_model(tmp_path / "bare.safetensors", labels=["a", "b"])
    run_id = export.import_model(tmp_path / "bare.safetensors")  # no metadata: numbered labels, arch inferred
    assert inference.load_model(run_id).classes == ["class_0", "class_1", "class_2"]
    # a head that does not fit the architecture's features is refused and leaves no run behind
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 100)
    save_file(state, str(tmp_path / "badfc.safetensors"))
    before = len(runs.list_runs())
    with pytest.raises(UserError):
        export.import_model(tmp_path / "badfc.safetensors")
    assert len(runs.list_runs()) == before
