"""The dataset map (pretrained vs random features in 2-D) and label issues (cleanlab on out-of-fold
probabilities): engine functions on tiny data, the CLI twins and the Images page's tabs."""
import json
import shutil

import numpy as np
import pytest

from engine.__main__ import main
from engine.core import workspace
from engine.core.errors import UserError
from engine.data import imagedata
from engine.vision import datamap, finetune, label_issues
from engine.vision.config import FinetuneConfig
from tests.helpers import make_dataset, open_page


def test_knn_accuracy_and_embedding():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 10)
    clusters = np.eye(3)[labels] * 5 + rng.normal(0, 0.3, (30, 3))
    assert datamap.knn_accuracy(clusters, labels) == 1.0
    noise = rng.normal(0, 1, (30, 3))
    assert datamap.knn_accuracy(noise, labels) < 0.7
    a, method = datamap.embed(clusters, seed=1)
    b, _ = datamap.embed(clusters, seed=1)
    assert a.shape == (30, 2) and method == "t-SNE" and np.allclose(a, b)  # seeded: the same map twice
    tiny, method = datamap.embed(clusters[:6])
    assert tiny.shape == (6, 2) and method == "PCA"


def test_map_has_both_sides_and_reuses_the_linear_runs_features(tmp_path):
    data = str(make_dataset(tmp_path / "data", n_classes=3, n=8))
    finetune.finetune(FinetuneConfig(data=data, strategy="linear", epochs=2), tmp_path / "run")  # caches the pretrained side
    cache = workspace.subdir("cache/features")
    before = set(cache.iterdir())
    m = datamap.compute(data)
    assert len(set(cache.iterdir()) - before) == 1  # only the random side was computed
    assert set(m.points) == {"pretrained", "random"} and all(p.shape == (24, 2) for p in m.points.values())
    assert all(0 <= v <= 1 for v in m.knn.values()) and "mini" in m.weights
    rows = m.rows()
    assert len(rows) == 48 and {r["class"] for r in rows} == {"class_0", "class_1", "class_2"}
    with pytest.raises(UserError, match="weights other than none"):
        datamap.compute(data, weights="none")


@pytest.fixture
def mislabelled(tmp_path):
    """Three classes of distinct colours, two images of class_0 filed under class_1, imported as a dataset."""
    root = make_dataset(tmp_path / "data", n_classes=3, n=12)
    for i in (0, 1):
        shutil.move(root / "class_0" / f"img_{i}.png", root / "class_1" / f"wrong_{i}.png")
    imagedata.import_path(root, "shapes")
    return "shapes"


def test_label_issues_find_the_mislabelled_images(mislabelled):
    found = label_issues.find(mislabelled)
    flagged = [i["name"] for i in found["issues"]]
    assert {"wrong_0.png", "wrong_1.png"} <= set(flagged) and len(flagged) <= 6
    wrong = next(i for i in found["issues"] if i["name"] == "wrong_0.png")
    assert wrong["given"] == "class_1" and wrong["suggested"] == "class_0" and wrong["image_id"] is not None
    ranks = [i["p_given"] for i in found["issues"]]
    assert ranks == sorted(ranks)  # the least likely label first
    before = imagedata.move_image(wrong["image_id"], "class_0")  # relabel, then undo
    assert before == "class_1" and imagedata.dataset_counts(mislabelled)["class_0"] == 11
    imagedata.move_image(wrong["image_id"], before)
    assert imagedata.dataset_counts(mislabelled)["class_0"] == 10
    with pytest.raises(UserError, match="no class"):
        imagedata.move_image(wrong["image_id"], "zebra")


def test_a_class_with_one_image_is_a_clear_message():
    labels = np.array([0, 0, 0, 1])
    with pytest.raises(UserError, match="at least 2 images"):
        label_issues.out_of_fold_probabilities(np.zeros((4, 3)), labels, 2)


def test_cli_data_issues_and_map(mislabelled, capsys):
    assert main(["data", "issues", mislabelled, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {"wrong_0.png", "wrong_1.png"} <= {i["name"] for i in found["issues"]}
    assert main(["data", "map", mislabelled, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m["knn"]) == {"pretrained", "random"} and len(m["points"]) == 2 * 36
    assert main(["data", "issues", "no such dataset"]) == 2


def test_images_page_map_and_label_issue_relabel(mislabelled):
    at = open_page("pages/images.py")
    next(b for b in at.button if b.key == "map_go_images").click().run()
    assert not at.exception
    assert {m.label.split(" (")[0] for m in at.metric} >= {"Pretrained", "Random weights"}
    next(b for b in at.button if b.key == "issues_go").click().run()
    assert not at.exception
    relabel = [b for b in at.button if b.label.startswith("Relabel as")]
    assert relabel
    counts = imagedata.dataset_counts(mislabelled)
    relabel[0].click().run()
    assert imagedata.dataset_counts(mislabelled) != counts
    next(b for b in at.button if b.key == "undo_label_go").click().run()
    assert imagedata.dataset_counts(mislabelled) == counts
