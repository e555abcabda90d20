"""Export ZIP (safetensors, labels, preprocessing, card, ONNX == PyTorch) and import back."""
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from engine import runs, vision
from engine.errors import UserError
from tests.helpers import cfg_for, make_dataset


@pytest.fixture
def trained(tmp_path):
    data = make_dataset(tmp_path / "shapes")
    out = tmp_path / "run"
    vision.finetune(cfg_for(str(data), epochs=2, optimizer="adamw", lr=3e-2), out)
    images = [Image.open(p).convert("RGB") for p in sorted(data.glob("class_*/img_*.png"))[::3]]
    return out, images


def test_export_zip_contents_and_onnx_matches_pytorch(trained, tmp_path):
    import onnxruntime as ort

    run_dir, images = trained
    path = vision.export_run(run_dir, tmp_path / "model.zip", onnx=True)
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["labels.json", "model.onnx", "model.safetensors", "model_card.md", "preprocessing.json"]
        labels = json.loads(z.read("labels.json"))
        pp = json.loads(z.read("preprocessing.json"))
        card = z.read("model_card.md").decode()
        onnx_bytes = z.read("model.onnx")
    assert labels == ["class_0", "class_1", "class_2"]
    assert pp["image_size"] == 32 and pp["arch"] == "resnet18" and len(pp["mean"]) == len(pp["std"]) == 3
    assert "class_0" in card and "linear" in card and "Best validation accuracy" in card
    # ONNX vs PyTorch on a batch of real, preprocessed images: within 1e-4
    loaded = vision.load_model(run_dir)
    x = torch.stack([vision.center_crop(vision.load_square(im, pp["resize"]), pp["image_size"]) for im in images])
    x = vision.normalize(x, loaded.preprocessing).contiguous()
    with torch.inference_mode():
        want = loaded.model(x).numpy()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input": x.numpy()})[0]
    assert got.shape == (len(images), 3)
    assert np.abs(got - want).max() < 1e-4


def test_export_without_onnx_and_by_run_id(trained, tmp_path):
    run_dir, _ = trained
    path = vision.export_run(run_dir, tmp_path / "plain.zip", onnx=False)
    with zipfile.ZipFile(path) as z:
        assert "model.onnx" not in z.namelist()
    with pytest.raises(UserError):
        vision.export_run("no-such-run", tmp_path / "x.zip")


@pytest.mark.parametrize("kind", ["zip", "safetensors"])
def test_exported_model_imported_back_predicts_the_same(trained, tmp_path, kind):
    run_dir, images = trained
    path = vision.export_run(run_dir, tmp_path / "model.zip", onnx=False)
    if kind == "safetensors":  # the bare weights carry labels and preprocessing in their metadata
        with zipfile.ZipFile(path) as z:
            (tmp_path / "model.safetensors").write_bytes(z.read("model.safetensors"))
        path = tmp_path / "model.safetensors"
    run_id = vision.import_model(path)
    assert runs.get(run_id)["kind"] == "imported" and runs.get(run_id)["status"] == "done"
    original, imported = vision.load_model(run_dir), vision.load_model(run_id)
    assert imported.classes == original.classes
    assert imported.preprocessing == original.preprocessing
    a, b = vision.predict(original, images, top_k=3), vision.predict(imported, images, top_k=3)
    for ra, rb in zip(a, b):
        assert [lab for lab, _ in ra] == [lab for lab, _ in rb]
        assert np.allclose([p for _, p in ra], [p for _, p in rb], atol=1e-6)
    # and the imported run exports again
    assert vision.export_run(run_id, tmp_path / "again.zip", onnx=False).is_file()


def test_import_refuses_bad_files(trained, tmp_path):
    run_dir, _ = trained
    model = vision.load_model(run_dir).model
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(UserError, match="pickle"):
        vision.import_model(tmp_path / "model.pt")
    # pickle bytes inside a ZIP under the expected name
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as z:
        z.write(tmp_path / "model.pt", "model.safetensors")
    with pytest.raises(UserError, match="not a safetensors file"):
        vision.import_model(tmp_path / "evil.zip")
    with zipfile.ZipFile(tmp_path / "empty.zip", "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UserError, match="no model.safetensors"):
        vision.import_model(tmp_path / "empty.zip")
    (tmp_path / "notzip.zip").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UserError):
        vision.import_model(tmp_path / "notzip.zip")
    # labels that do not match the head
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(UserError, match="labels"):
        vision.import_model(tmp_path / "bare.safetensors", labels=["a", "b"])
    run_id = vision.import_model(tmp_path / "bare.safetensors")  # no metadata: numbered labels, arch inferred
    assert vision.load_model(run_id).classes == ["class_0", "class_1", "class_2"]
    # a head that does not fit the architecture's features is refused and leaves no run behind
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.zeros(3, 100)
    save_file(state, str(tmp_path / "badfc.safetensors"))
    before = len(runs.list_runs())
    with pytest.raises(UserError):
        vision.import_model(tmp_path / "badfc.safetensors")
    assert len(runs.list_runs()) == before
