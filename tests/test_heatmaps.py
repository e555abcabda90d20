"""Where the model looked: Grad-CAM heatmaps through captum, checked against a Grad-CAM written out
by hand with hooks, per class, in the CLI."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.__main__ import main
from engine.core.errors import UserError
from engine.vision import finetune, heatmaps, inference, preprocess
from tests.helpers import cfg_for, make_dataset


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("heat")
    with pytest.MonkeyPatch.context() as mp:  # (module-scoped: the per-test workspace does not exist yet)
        mp.setenv("TRANSFER_STUDIO_HOME", str(root / "workspace"))
        data = make_dataset(root / "data", n_classes=3, n=8, size=48)
        finetune.finetune(cfg_for(str(data), strategy="full", epochs=2, image_size=48), root / "run")
        return inference.load_model(root / "run"), sorted((root / "data").rglob("*.png"))


def by_hand(loaded, image, target: int) -> np.ndarray:
    """Grad-CAM from its definition: ReLU(sum_k mean(dy_c/dA_k) A_k), upsampled, divided by its max."""
    pp, model = loaded.preprocessing, loaded.model
    x = preprocess.normalize(preprocess.crops([image], pp), pp)
    saved = {}
    layer = heatmaps.target_layer(model, pp.image_size)
    hook = layer.register_forward_hook(lambda m, i, o: saved.update(a=o))
    try:
        with torch.enable_grad():
            score = model(x)[0, target]
            grad, = torch.autograd.grad(score, saved["a"])
    finally:
        hook.remove()
    cam = F.relu((grad.mean((2, 3), keepdim=True) * saved["a"]).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear")[0, 0].detach().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def test_heatmap_is_grad_cam_for_the_asked_class(trained):
    loaded, files = trained
    images = [Image.open(f).convert("RGB") for f in files[:4]]
    for target in (None, 0, "class_2"):
        for h, im in zip(heatmaps.explain(loaded, images, target=target), images):
            S = loaded.preprocessing.image_size
            assert h.heat.shape == (S, S) and h.overlay.shape == h.crop.shape == (S, S, 3)
            assert 0 <= h.heat.min() and h.heat.max() <= 1
            want = h.target if target is None else (target if isinstance(target, int) else loaded.classes.index(target))
            assert h.target == want and h.label == loaded.classes[want]
            assert np.allclose(h.heat, by_hand(loaded, im, want), atol=1e-4)
            if h.heat.max() > 0:
                assert not np.array_equal(h.overlay, h.crop)  # the heat is drawn over the image
    probs = inference.probabilities(loaded, images[:1])[0]
    assert heatmaps.explain(loaded, images[:1])[0].target == int(probs.argmax())  # default: the predicted class


def test_bad_classes_are_refused(trained):
    loaded, files = trained
    im = Image.open(files[0]).convert("RGB")
    with pytest.raises(UserError, match="unknown class"):
        heatmaps.explain(loaded, [im], target="zebra")
    with pytest.raises(UserError, match="out of range"):
        heatmaps.explain(loaded, [im], target=7)
    assert heatmaps.explain(loaded, []) == []


def test_cli_predict_explain_writes_a_heatmap_per_image(trained, tmp_path, capsys):
    loaded, files = trained
    out = tmp_path / "heat"
    code = main(["predict", "--run", str(loaded.run_dir), str(files[0]), str(files[5]), "--explain", str(out), "--json"])
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    S = loaded.preprocessing.image_size
    for r in rows:
        assert r["heatmap"]["class"] == r["top"][0]["label"]
        assert Image.open(r["heatmap"]["file"]).size == (2 * S, S)  # the crop and its heat, side by side
    assert main(["predict", "--run", str(loaded.run_dir), str(files[0]), "--explain", str(out), "--explain-class", "zebra"]) == 2
    assert "unknown class" in capsys.readouterr().err


def test_the_heat_grid_is_never_coarser_than_4_cells(trained):
    loaded, _ = trained
    model = loaded.model
    assert heatmaps.target_layer(model, 224) is model.layer4  # 7 x 7
    assert heatmaps.target_layer(model, 64) is model.layer3   # layer4 would be 2 x 2


def test_the_report_shows_where_each_mistake_looked(trained):
    from engine import report

    loaded, _ = trained
    ev = json.loads((loaded.run_dir / "eval.json").read_text())
    text = report.build_report(loaded.run_dir)
    shown = [m for m in ev["mistakes"][:report.MAX_MISTAKES]]
    assert shown, "the tiny run makes mistakes"
    assert text.count("right: where it looked for that class") == len(shown)
    assert text.count("data:image/png;base64,") >= len(shown)
