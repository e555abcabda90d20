"""Labels that look wrong: confident learning (Northcutt et al. 2021) through cleanlab.

Every image gets class probabilities from a model that never saw it: k-fold linear heads
(logistic regressions on the standardised frozen features of the pretrained backbone, from the
feature cache), each fitted on the other folds. cleanlab's `find_label_issues` then flags the
images whose given label the out-of-fold model finds unlikely compared with how confident it is
on that class in general, ranked by the given label's own probability (the lowest first).
Seconds on a few hundred images; nothing is changed until the user relabels or deletes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.core.errors import UserError
from engine.data import imagedata

FOLDS = 5


def out_of_fold_probabilities(feats: np.ndarray, labels: np.ndarray, n_classes: int, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """(N, classes) probabilities, each row from a head fitted without that image."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels, minlength=n_classes)
    if counts.min() < 2:
        raise UserError("every class needs at least 2 images to check its labels")
    k = int(min(folds, counts.min()))
    probs = np.zeros((len(labels), n_classes))
    for train, held in StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(feats, labels):
        head = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        head.fit(feats[train], labels[train])
        probs[np.ix_(held, head[-1].classes_)] = head.predict_proba(feats[held])
    return probs


def find(data: str, weights: str = "auto", arch: str = "resnet18", seed: int = 0, ctx=None) -> dict:
    """The images whose labels look wrong, most suspicious first."""
    from cleanlab.filter import find_label_issues

    from engine.vision import datamap  # deferred: imports torch

    f = datamap.dataset_features(data, weights, arch, seed, sides=("pretrained",), ctx=ctx)
    probs = out_of_fold_probabilities(f.feats["pretrained"], f.labels, len(f.classes), seed=seed)
    ranked = find_label_issues(f.labels, probs, return_indices_ranked_by="self_confidence")
    ids = imagedata.image_ids(data) if not Path(data).exists() else {}
    issues = []
    for i in ranked:
        sha = Path(f.files[i]).stem
        row = ids.get(sha, {})
        issues.append({"file": f.files[i], "name": row.get("name", Path(f.files[i]).name), "image_id": row.get("id"),
                       "given": f.classes[f.labels[i]], "suggested": f.classes[int(probs[i].argmax())],
                       "p_given": round(float(probs[i, f.labels[i]]), 4), "p_suggested": round(float(probs[i].max()), 4)})
    agree = float((probs.argmax(1) == f.labels).mean())
    return {"issues": issues, "images": len(f.labels), "classes": f.classes, "out_of_fold_accuracy": round(agree, 4),
            "weights": f.weights}
