"""Transfer Lab engine: the three numbers, the sweeps, the subsets, the autoencoder transfer, the advisor,
the job runner and the CLI — on tiny generated data (3 classes x 8 images, 32 px, 1-2 epochs)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from engine import jobs
from engine.__main__ import main
from engine.core import runs
from engine.core.errors import UserError
from engine.lab import advisor, autoencoder, experiments
from engine.models import backbones
from engine.train import loop
from engine.vision import network
from tests.helpers import LAB_COLORS as COLORS
from tests.helpers import make_folder, tiny


@pytest.fixture(autouse=True)
def one_thread():
    """Like the lab's jobs (engine/lab/experiments.py CPU_THREADS): on a busy 2-core machine one thread is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def data(tmp_path) -> str:
    return str(make_folder(tmp_path / "imgs"))


# ----------------------------------------------------------------------------- the three numbers
def test_three_numbers_from_a_given_curve():
    n = experiments.three_numbers([0.25, 0.60, 0.70, 0.85, 0.95, 0.90])
    assert n["start"] == 0.60
    assert n["slope"] == pytest.approx((0.85 - 0.25) / 3)  # first 3 epochs, from the untrained network
    assert n["asymptote"] == 0.95
    short = experiments.three_numbers([0.5, 0.75])
    assert short == {"start": 0.75, "slope": pytest.approx(0.25), "asymptote": 0.75}
    with pytest.raises(ValueError):
        experiments.three_numbers([0.3])


def test_benefits_average_over_seeds_with_spread_and_readings():
    def run(group, seed, accs):
        return {"group": group, "seed": seed, "metrics": [{"epoch": i, "val_acc": a} for i, a in enumerate(accs)]}

    runs_ = [run("pretrained", 0, [0.25, 0.7, 0.8, 0.9]), run("pretrained", 1, [0.25, 0.8, 0.9, 0.9]),
             run("scratch", 0, [0.25, 0.3, 0.4, 0.5]), run("scratch", 1, [0.25, 0.4, 0.4, 0.6])]
    b = experiments.benefits(runs_)
    p, s = b["groups"]["pretrained"], b["groups"]["scratch"]
    assert p["start"]["mean"] == pytest.approx(0.75) and p["start"]["std"] == pytest.approx(0.05) and p["start"]["n"] == 2
    assert s["asymptote"]["mean"] == pytest.approx(0.55)
    assert p["slope"]["mean"] == pytest.approx((0.9 - 0.25) / 3, abs=1e-4)  # means are rounded to 4 places
    assert b["difference"]["start"] == pytest.approx(0.40)
    assert "75%" in b["readings"]["start"] and "35%" in b["readings"]["start"]
    assert "ends higher" in b["readings"]["asymptote"]
    curve = experiments.mean_curve([r for r in runs_ if r["group"] == "scratch"])
    assert curve["epoch"] == [0, 1, 2, 3] and curve["mean"][1] == pytest.approx(0.35)
    assert curve["min"][3] == 0.5 and curve["max"][3] == 0.6

    # the shareable report shows the same numbers as a readable table, not the nested record
    from engine import report

    table = report._benefits_table(b)
    assert table.count("<tr>") == 4 and "{" not in table
    assert "<td>accuracy after one epoch</td><td>75% ± 5</td><td>35% ± 5</td><td>+40 points</td>" in table
    assert "<td>best accuracy</td><td>90% ± 0</td><td>55% ± 5</td><td>+35 points</td>" in table
    assert "it also ends higher." in table


def test_benefits_reading_is_honest_when_scratch_wins():
    runs_ = [{"group": "pretrained", "metrics": [{"val_acc": a} for a in (0.3, 0.4, 0.45)]},
             {"group": "scratch", "metrics": [{"val_acc": a} for a in (0.3, 0.5, 0.7)]}]
    r = experiments.benefits(runs_)["readings"]
    assert "no head start" in r["start"] and "from scratch ends higher" in r["asymptote"]


# ----------------------------------------------------------------------------- subsets and sweeps
def test_subset_has_n_per_class():
    y = torch.tensor([0] * 5 + [1] * 8 + [2] * 3)
    for n in (1, 2, 3):
        idx = experiments.subset_per_class(y, n, seed=0)
        assert torch.bincount(y[idx]).tolist() == [n, n, n]
    assert torch.bincount(y[experiments.subset_per_class(y, 4, 0)]).tolist() == [4, 4, 3]  # a class with fewer keeps all
    assert len(experiments.subset_per_class(y, 0, 0)) == len(y)
    assert experiments.subset_per_class(y, 2, 5).tolist() == experiments.subset_per_class(y, 2, 5).tolist()


def test_data_size_runs_train_on_n_per_class_and_test_on_the_same_images(data, tiny_weights, tmp_path):
    experiments.run_lab(tiny("data-size", data, tiny_weights, sizes=[1, 3, 0]), tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    per_class_train = state["data"]["train_per_class"]
    assert {r["x"] for r in state["runs"]} == {1, 3, max(per_class_train)}
    for r in state["runs"]:
        assert r["done"] and r["train_images"] == len(COLORS) * min(r["x"], max(per_class_train))
    assert {r["group"] for r in state["runs"]} == {"pretrained", "scratch"}
    assert [p["x"] for p in state["result"]["sweep"]["scratch"]] == [1, 3, max(per_class_train)]
    assert len(state["result"]["gap"]) == 3


def test_freeze_sweep_really_freezes_k_stages(data, tiny_weights, tmp_path):
    import torchvision

    experiments.run_lab(tiny("freeze", data, tiny_weights, ks=[5, 2, 0]), tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    ref = torchvision.models.resnet18(weights=None)
    ref.fc = torch.nn.Linear(512, len(COLORS))
    st = backbones.stages(ref)

    def expected(k):
        return sum(p.numel() for s in st[k:] for p in s.parameters()) + sum(p.numel() for p in ref.fc.parameters())

    by_label = {(r["group"], r["frozen"]): r for r in state["runs"]}
    assert set(by_label) == {("one-lr", 5), ("one-lr", 2), ("one-lr", 0), ("rule", 0)}
    for (group, k), r in by_label.items():
        assert r["params"]["trainable"] == expected(k), (group, k)
    assert by_label[("one-lr", 5)]["params"]["trainable"] == 512 * 3 + 3  # linear probe: only the new head
    assert by_label[("rule", 0)]["backbone_lr"] == experiments.BACKBONE_LR and by_label[("one-lr", 0)]["backbone_lr"] == 1.0
    assert "lr_rule" in state["result"] and [p["x"] for p in state["result"]["sweep"]["one-lr"]] == [0, 2, 5]


def test_frozen_stages_do_not_change_and_the_rest_does(data, tiny_weights):
    split = experiments.load_split(data, tiny_weights, 32)
    arm = experiments.Arm("k=2", "one-lr", tiny_weights, frozen=2)
    out = experiments.train_arm(arm, split, epochs=1, batch_size=8, lr=0.05, steps_per_epoch=2, dev=torch.device("cpu"), keep_model=True)
    from engine.models import sources

    before = network.build_model(experiments.ARCH, 3, sources.resolve_vision(experiments.ARCH, tiny_weights))
    after = out["model"]
    for i, (a, b) in enumerate(zip(backbones.stages(before), backbones.stages(after))):
        same = all(torch.equal(x, y.cpu()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert same == (i < 2), f"stage {i}"


def test_compare_writes_both_curves_and_the_numbers(data, tiny_weights, tmp_path):
    summary = experiments.run_lab(tiny("compare", data, tiny_weights, epochs=2, seeds=2), tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    assert state["status"] == "done" and len(state["runs"]) == 4
    assert [r["group"] for r in state["runs"]] == ["pretrained", "scratch"] * 2  # seeds interleaved
    assert all([m["epoch"] for m in r["metrics"]] == [0, 1, 2] for r in state["runs"])
    assert {r["weights"] for r in state["runs"] if r["group"] == "scratch"} == {"none"}
    b = state["result"]["benefits"]["groups"]
    assert b["pretrained"]["start"]["n"] == 2 and b["scratch"]["asymptote"]["n"] == 2
    assert state["result"]["curves"]["pretrained"]["epoch"] == [0, 1, 2]
    assert summary["pretrained_start"] == b["pretrained"]["start"]["mean"]


def test_bad_options_are_refused_before_anything_runs():
    for kw, words in ((dict(experiment="nope"), "unknown experiment"), (dict(experiment="compare", preset="huge"), "preset"),
                      (dict(experiment="freeze", ks=[6]), "frozen stages"), (dict(experiment="compare", epochs=0), "epochs"),
                      (dict(experiment="data-size", sizes=[]), "sizes"), (dict(experiment="compare", weights="none"), "pretrained"),
                      (dict(experiment="compare", lr=float("nan")), "learning rate")):
        with pytest.raises(UserError, match=words):
            experiments.LabConfig(**kw).resolved()
    cfg = experiments.LabConfig("compare").resolved()
    assert cfg.epochs == experiments.PRESETS["compare"]["quick"]["epochs"] and cfg.seeds >= 2


# ----------------------------------------------------------------------------- unsupervised pretraining
def test_autoencoder_encoder_transfer_loads_the_weights():
    torch.manual_seed(0)
    ae = autoencoder.AutoEncoder(width=8)
    with torch.no_grad():
        for p in ae.encoder.parameters():
            p.add_(1.0)  # make them unlike any fresh initialisation
    clf = autoencoder.transfer_encoder(ae, n_classes=3, seed=0)
    for k, v in ae.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[k], v), k
    assert clf.fc.out_features == 3
    scratch = autoencoder.Classifier(3, width=8)
    assert not torch.equal(scratch.encoder.body[0][0].weight, clf.encoder.body[0][0].weight)


def test_autoencoder_learns_to_reconstruct_without_labels(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(24, 3, 32, 32, generator=g).round()  # blocky 0/1 images
    images = torch.nn.functional.interpolate(images[:, :, :8, :8], size=32)
    ae, losses = autoencoder.pretrain(images, epochs=6, batch_size=8, width=8, lr=5e-3)
    assert len(losses) == 6 and losses[-1] < losses[0]
    autoencoder.save_reconstructions(ae, images, tmp_path / "rec.png", n=4, scale=1)
    assert Image.open(tmp_path / "rec.png").size == (4 * 32, 2 * 32)


def test_unsupervised_experiment_end_to_end(data, tmp_path):
    experiments.run_lab(experiments.LabConfig("unsupervised", data=data, epochs=1, seeds=1, ae_epochs=2, labels_per_class=2, batch_size=8),
                tmp_path / "run")
    state = experiments.read_result(tmp_path / "run")
    assert state["status"] == "done" and len(state["ae"]["loss"]) == 2
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    assert [r["train_images"] for r in state["runs"]] == [2 * len(COLORS)] * 2
    assert state["result"]["benefits"]["groups"]["pretrained"]["start"]["n"] == 1


# ----------------------------------------------------------------------------- advisor
@pytest.mark.parametrize("per_class, similarity, scenario, strategy", [
    (10, 0.9, "small + similar", "full"),  # measured: gentle full fine-tuning beats the probe on small sets (bench recipes)
    (1000, 0.9, "large + similar", "full"),
    (10, 0.1, "small + different", "partial"),
    (1000, 0.1, "large + different", "full"),
    (advisor.SMALL_MAX_PER_CLASS, advisor.SIMILAR_MIN, "large + similar", "full"),       # thresholds are inclusive
    (advisor.SMALL_MAX_PER_CLASS - 1, advisor.SIMILAR_MIN - 0.01, "small + different", "partial"),
])
def test_advisor_maps_size_and_similarity_to_the_four_scenarios(per_class, similarity, scenario, strategy):
    a = advisor.advise(per_class, similarity)
    assert a.scenario == scenario and a.strategy == strategy and a.reasons
    cfg = advisor.recommended_config("some data", a)  # always a valid fine-tune run
    assert cfg.strategy == strategy
    filled, _ = cfg.filled(int(per_class) * 4, 4, "mini")  # the settings come from the recipe book
    if scenario == "small + different":
        assert cfg.freeze == 2 and filled.augment  # early layers frozen only, augmentation on
    if scenario == "large + different":
        assert a.alternative == "scratch"


def test_advisor_refuses_nonsense():
    for args in ((-1, 0.5), (float("nan"), 0.5), (10, float("inf"))):
        with pytest.raises(UserError):
            advisor.advise(*args)


def test_prototype_accuracy_and_similarity_score():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(10)
    clustered = torch.randn(30, 5, generator=g) * 0.1 + torch.nn.functional.one_hot(y, 5).float() * 3
    assert advisor.prototype_accuracy(clustered, y) == 1.0
    noise = torch.randn(30, 5, generator=g)
    assert advisor.prototype_accuracy(noise, y) < 0.7
    two = torch.tensor([0, 0, 1, 1])  # 2 per class: 1 shot, the other image is classified
    assert advisor.prototype_accuracy(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0], [0.1, 0.9]]), two) == 1.0
    with pytest.raises(UserError):
        advisor.prototype_accuracy(torch.randn(3, 2), torch.tensor([0, 0, 1]))
    assert advisor.similarity_score(0.9, 0.5) == pytest.approx(0.8)
    assert advisor.similarity_score(0.4, 0.5) == 0.0 and advisor.similarity_score(1.0, 1.0) == 1.0


def test_advisor_measures_a_dataset(data, tiny_weights):
    r = advisor.measure(data, weights=tiny_weights, image_size=32, max_per_class=6)
    assert r["images_per_class"] == 8 and r["probe_images"] == 18
    assert set(r["nearest_mean_accuracy"]) == {"pixels", "random", "pretrained"}
    assert 0.0 <= r["similarity"] <= 1.0 and r["advice"]["size"] == "small"
    assert r["nearest_mean_accuracy"]["pixels"] > 0.9  # the classes differ by colour: raw pixels separate them
    with pytest.raises(UserError, match="pretrained"):
        advisor.measure(data, weights="none")


# ----------------------------------------------------------------------------- job and CLI
def test_lab_job_runs_in_the_background_and_persists(data, tiny_weights):
    m = jobs.get_manager()
    run_id = experiments.submit(tiny("compare", data, tiny_weights), m)
    assert m.wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]
    run = runs.get(run_id)
    assert run["kind"] == "lab" and "pretrained_asymptote" in run["summary"]
    assert experiments.read_result(run["dir"])["status"] == "done"


def test_cli_compare_prints_curves_and_numbers(data, tiny_weights, capsys):
    code = main(["lab", "compare", "--data", data, "--weights", tiny_weights, "--epochs", "2", "--seeds", "1",
                 "--image-size", "32", "--batch-size", "8", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [r["group"] for r in out["runs"]] == ["pretrained", "scratch"] and all(len(r["val_acc"]) == 3 for r in out["runs"])
    assert set(out["result"]["benefits"]["groups"]["pretrained"]) == {"start", "slope", "asymptote"}
    assert runs.get(out["run_id"])["status"] == "done"  # the page can re-open it


@pytest.mark.parametrize("argv, words", [
    (["lab", "compare", "--data", "no-such-dataset", "--epochs", "1"], "neither a dataset"),
    (["lab", "compare", "--epochs", "0"], "epochs"),
    (["lab", "freeze", "--ks", "5,x"], "--ks"),
    (["lab", "freeze", "--ks", "9"], "frozen stages"),
    (["lab", "data-size", "--sizes", "-1"], "sizes"),
    (["lab", "compare", "--preset", "huge"], "invalid choice"),
    (["lab", "advise", "--data", "x", "--weights", "none"], "pretrained"),
    (["lab", "demo-data", "nope"], "unknown demo"),
])
def test_cli_bad_input_exits_2_with_one_error_line(argv, words, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0]


def test_batches_cover_every_example_once_per_pass_and_never_leave_one_alone():
    g = torch.Generator().manual_seed(0)
    for n, bs in ((9, 8), (9, 4), (16, 8), (3, 16), (2, 8)):
        stream = loop.endless_batches(n, bs, g)
        seen = []
        while len(seen) < n:
            b = next(stream)
            assert len(b) >= 2
            seen += b.tolist()
        assert sorted(seen) == list(range(n)), (n, bs)


# ----------------------------------------------------------------------------- demo tasks
def test_demo_tasks_are_generated_deterministically_and_import_once():
    from engine.data import demo_tasks, imagedata

    for key in ("similar-small", "different-small", "clothing"):
        a, b = demo_tasks.demo_members(key), demo_tasks.demo_members(key)
        assert [m.data for m in a.members] == [m.data for m in b.members]  # same images every time
        counts = {}
        for m in a.members:
            counts[m.cls] = counts.get(m.cls, 0) + 1
        assert len(counts) == 4 and set(counts.values()) == {demo_tasks.DEMOS[key].per_class}
    first = demo_tasks.import_demo("different-small")
    assert not first["existed"] and set(first["classes"]) == set(demo_tasks.SHAPES)
    assert demo_tasks.import_demo("different-small")["existed"]  # idempotent
    assert demo_tasks.ensure_dataset("different-small") == demo_tasks.DEMOS["different-small"].name
    assert len(imagedata.list_datasets()) == 1
    with pytest.raises(UserError, match="unknown demo"):
        demo_tasks.import_demo("nope")
    # the two versions of a task differ only in size: small below the advisor's threshold, large above
    assert demo_tasks.DEMOS["similar-small"].per_class < advisor.SMALL_MAX_PER_CLASS <= demo_tasks.DEMOS["similar-large"].per_class


def test_the_tour_draws_the_lab_comparison_on_the_labs_own_epochs(data, tiny_weights):
    """Epoch 0 is the untrained network in the Lab; the tour's chart of the same result numbers it the same."""
    import json as _json

    from tests.helpers import open_page

    m = jobs.get_manager()
    run_id = experiments.submit(tiny("compare", data, tiny_weights, epochs=2), m)
    assert m.wait(run_id, timeout=300) == "done", runs.get(run_id)["error"]
    curves = experiments.read_result(runs.get(run_id)["dir"])["result"]["curves"]
    at = open_page("pages/tour.py", step="6")
    assert not at.exception
    drawn = {t["name"]: t for t in _json.loads(at.get("plotly_chart")[0].proto.spec)["data"]}
    for group in ("pretrained", "scratch"):
        assert list(drawn[group]["x"]) == curves[group]["epoch"] == [0, 1, 2]
        assert list(drawn[group]["y"]) == curves[group]["mean"]
    pre = curves["pretrained"]["mean"]
    assert any(f"After one epoch: **{pre[1]:.0%}** pretrained" in md.value for md in at.markdown)
