"""Live classification: every frame passes, predictions are throttled, the heat lands on the model's crop."""
import numpy as np
import pytest
from PIL import Image

from engine.vision import finetune, inference, live
from tests.helpers import cfg_for, make_dataset


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFER_STUDIO_HOME", str(root / "workspace"))
        data = make_dataset(root / "data", n_classes=2, n=6)
        finetune.finetune(cfg_for(str(data), epochs=1), root / "run")
        return inference.load_model(root / "run"), sorted((root / "data").rglob("*.png"))


def test_frames_pass_through_and_predictions_are_throttled(loaded):
    model, files = loaded
    frame = np.asarray(Image.open(files[0]).convert("RGB").resize((80, 60)))
    clf = live.Classifier(model, top_k=2, every_s=60)
    for _ in range(5):
        assert np.array_equal(clf.process(frame), frame)  # no heat asked for: the frame is shown as it came
    top, _ = clf.latest()
    assert clf.frames == 5 and clf.predictions == 1  # one prediction per every_s, not one per frame
    assert top == inference.predict(model, [Image.fromarray(frame)], top_k=2)[0]


def test_heat_overlay_covers_the_centre_crop_only(loaded):
    model, files = loaded
    frame = np.asarray(Image.open(files[0]).convert("RGB").resize((120, 60)))
    out = live.Classifier(model, every_s=0, heat=True).process(frame)
    assert out.shape == frame.shape
    side = round(60 * model.preprocessing.image_size / model.preprocessing.resize)
    left = (120 - side) // 2
    assert np.array_equal(out[:, :left - 1], frame[:, :left - 1]) and np.array_equal(out[:, left + side + 1:], frame[:, left + side + 1:])
    assert not np.array_equal(out[:, left:left + side], frame[:, left:left + side])
