"""CLI twins of the vision UI: finetune, predict, export, import-model; `error:` + exit 2 on bad input."""
import dataclasses
import json
import os
import subprocess
import sys
import zipfile

import pytest

from engine.__main__ import main
from engine.models import sources
from engine.vision import config
from tests.helpers import make_dataset


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "shapes")


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def tiny(data, out, *extra):
    return ["finetune", "--data", str(data), "--weights", "none", "--image-size", "32", "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "--out", str(out), *extra]


def test_cli_choices_match_the_engine():
    from engine.__main__ import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    choices = {a.dest: tuple(a.choices) for a in sub._actions if a.choices}
    assert choices["strategy"] == tuple(config.STRATEGIES)
    assert choices["optimizer"] == config.OPTIMIZERS and choices["schedule"] == config.SCHEDULES
    assert choices["model"] == sources.VISION_ARCHS


def test_finetune_predict_export_import(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(tiny(data, out, "--json"), capsys)
    assert code == 0
    summary = json.loads(stdout)  # --json: one object on stdout, progress on stderr
    assert 0 <= summary["best_val_acc"] <= 1 and summary["epochs_done"] == 2
    assert "epoch 1/2" in err and "epoch 2/2" in err
    for name in ("metrics.json", "model.safetensors", "run.json", "eval.json"):
        assert (out / name).is_file()
    assert json.loads((out / "run.json").read_text())["config"]["epochs"] == 2

    # text mode prints one line per epoch on stdout
    code, stdout, _ = run(tiny(data, tmp_path / "run2", "--strategy", "partial", "--freeze", "4", "--augment", "flip"), capsys)
    assert code == 0 and "epoch 1/2" in stdout and "epoch 2/2" in stdout and "best val acc" in stdout

    img = sorted(data.glob("class_1/*.png"))[0]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, stdout, _ = run(["predict", "--run", str(out), str(img), "--top-k", "2", "--json"], capsys)
    assert code == 0
    (res,) = json.loads(stdout)
    assert res["file"] == str(img) and len(res["top"]) == 2 and {"label", "prob"} <= set(res["top"][0])
    # a bad image: an error entry for that file, the good one still predicted, exit 2
    code, stdout, _ = run(["predict", "--run", str(out), str(img), str(bad), "--json"], capsys)
    assert code == 2
    good, err_entry = json.loads(stdout)
    assert "top" in good and err_entry["file"] == str(bad) and "not an image" in err_entry["error"]
    code, stdout, err = run(["predict", "--run", str(out), str(bad)], capsys)
    assert code == 2 and err.startswith("error: ") and str(bad) in err

    zpath = tmp_path / "export.zip"
    code, stdout, _ = run(["export", "--run", str(out), "--out", str(zpath), "--onnx"], capsys)
    assert code == 0 and "model.onnx" in zipfile.ZipFile(zpath).namelist()
    code, stdout, _ = run(["import-model", str(zpath), "--json"], capsys)
    assert code == 0
    run_id = json.loads(stdout)["run_id"]
    code, stdout, _ = run(["predict", "--run", run_id, str(img), "--json"], capsys)  # a run id works too
    assert code == 0 and json.loads(stdout)[0]["top"]


def test_resume_from_cli(data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(tiny(data, out, "--resume"), capsys)
    assert code == 2 and "nothing to resume" in err
    assert run(tiny(data, out), capsys)[0] == 0
    code, stdout, _ = run(tiny(data, out, "--resume", "--json"), capsys)  # already complete: nothing more to do
    assert code == 0 and json.loads(stdout)["epochs_done"] == 2


@pytest.mark.parametrize("extra,needle", [
    (["--strategy", "bogus"], "invalid choice"),
    (["--epochs", "0"], "epochs"),
    (["--lr", "-1"], "learning rate"),
    (["--batch-size", "1"], "batch size"),
    (["--strategy", "partial", "--freeze", "7"], "freeze"),
    (["--augment", "flip,blur"], "augmentation"),
    (["--image-size", "8"], "image size"),
    (["--epochs", "two"], "invalid int"),
    (["--weights", "model.pt"], "pickle"),
    (["--weights", "missing.safetensors"], "not found"),
    (["--weights", "imagenet"], "not available offline"),
    (["--model", "resnet34", "--weights", "mini"], "mini"),
])
def test_finetune_bad_options(data, tmp_path, capsys, extra, needle):
    code, stdout, err = run(tiny(data, tmp_path / "r") + extra, capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("error: ") and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_data_and_runs(tmp_path, capsys):
    code, _, err = run(["finetune", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "neither a dataset" in err
    one = make_dataset(tmp_path / "one", n_classes=1)
    code, _, err = run(["finetune", "--data", str(one), "--weights", "none", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and err.startswith("error: ")
    code, _, err = run(["predict", "--run", "no-such-run", "x.png"], capsys)
    assert code == 2 and "no-such-run" in err
    code, _, err = run(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.zip")], capsys)
    assert code == 2 and "no trained model" in err
    code, _, err = run(["import-model", str(tmp_path / "x.pth")], capsys)
    assert code == 2 and err.startswith("error: ")


def test_exit_code_and_error_line_in_a_real_process(tmp_path):
    env = dict(os.environ)
    p = subprocess.run([sys.executable, "-m", "engine", "finetune", "--data", "x", "--out", str(tmp_path / "r"), "--epochs", "0"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and p.stderr.strip() == "error: epochs must be an integer from 1 to 1000 (got 0)"


def test_bench_finetune_smoke(capsys, workspace_home):
    # a benchmark, not a timed test: only that it runs end to end and reports what it promises
    code, stdout, _ = run(["bench", "finetune", "--per-class", "5", "--image-size", "32", "--epochs", "2", "--json"], capsys)
    assert code == 0
    r = json.loads(stdout)
    for key in ("naive_seconds", "linear_seconds", "ratio", "naive_val_acc", "linear_val_acc", "extraction_img_s", "plain_fp32_img_s"):
        assert key in r, key
    assert abs(r["naive_val_acc"] - r["linear_val_acc"]) <= 0.01  # same optimisation, computed two ways
    assert not list(workspace_home.glob("images/*/*"))  # generated data stayed out of the user's workspace


def test_cli_options_come_from_the_config_fields_and_load_no_torch():
    from engine.__main__ import build_parser
    from engine.cli.vision import RUN_FIELDS, TRAIN_FIELDS
    from engine.vision.config import FinetuneConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    by_dest = {a.dest: a for a in sub._actions}
    for f in dataclasses.fields(FinetuneConfig):  # every field is an option, with the field's default
        assert f.name in RUN_FIELDS + TRAIN_FIELDS, f.name
        assert by_dest[f.name].default == (None if f.name == "data" else f.default), f.name
    assert by_dest["data"].required and "recipe" in by_dest["lr"].help
    args = build_parser().parse_args(["finetune", "--data", "d", "--out", "o", "--augment", "none", "--no-cache", "--lr", "0.1"])
    assert (args.augment, args.cache, args.lr, args.epochs) == ([], False, 0.1, None)
    code = "import sys; from engine.__main__ import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # `--help` and every parse stay fast: no torch import


def test_every_command_prints_its_help():
    """`--help` of every command and subcommand: argparse formats help strings with %, so a bare % breaks one."""
    import argparse

    from engine.__main__ import build_parser

    def commands(parser, path):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, [*path, name])

    paths = list(commands(build_parser(), []))
    assert ["lab", "text-data-size"] in paths and ["pretrain", "text"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*path, "--help"])
        assert done.value.code == 0, path
