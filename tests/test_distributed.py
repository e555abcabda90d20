"""Data-parallel fine-tuning with torchrun: 2 CPU processes on gloo against one process.

Tolerances:
- linear with --no-cache (every step runs the whole network, only fc trains, frozen BatchNorm in
  eval mode): each rank's loss is the mean over half of the global batch and DDP averages the two
  gradients, which is the same step as one process up to float summation order -> 1e-4.
- full: BatchNorm in training mode normalises each rank's half batch with its own statistics (no
  SyncBatchNorm on CPU) and running statistics come from rank 0's halves, so the runs are close,
  not equal; on 4 validation images we allow one image of accuracy difference and a finite loss.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.train import distributed, loop
from engine.vision import finetune
from engine.vision.config import FinetuneConfig
from tests.imgs import class_folder

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = {"run.json", "metrics.json", "eval.json", "model.safetensors", "last.json", "last.safetensors"}


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "engine", "finetune", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def _single(cfg: FinetuneConfig, out: Path) -> list[dict]:
    finetune.finetune(cfg, out)
    return json.loads((out / "metrics.json").read_text())


def _args(cfg: FinetuneConfig) -> list[str]:
    return distributed.torchrun_command(cfg, 2, out="X").split(" ")[6:-2]  # the finetune options only


@pytest.fixture
def data(tmp_path):
    return class_folder(tmp_path / "data", n=8)  # 2 classes x 8 images, 32 px


def test_ddp_linear_matches_single_process_exactly(tmp_path, data):
    cfg = FinetuneConfig(data=str(data), weights="none", strategy="linear", cache=False, epochs=2,
                                batch_size=8, image_size=32, seed=3)
    single = _single(cfg, tmp_path / "single")
    r = _torchrun(_args(cfg) + ["--out", str(tmp_path / "ddp"), "--json"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert [m["epoch"] for m in ddp] == [1, 2]
    for a, b in zip(single, ddp):
        for key in ("train_loss", "val_loss", "train_acc", "val_acc"):
            assert abs(a[key] - b[key]) <= 1e-4, (key, a, b)
    # rank 0 alone printed the summary (one JSON object on stdout)
    assert json.loads(r.stdout)["epochs_done"] == 2


def test_ddp_full_close_to_single_process_one_set_of_outputs_and_resume(tmp_path, data):
    cfg = FinetuneConfig(data=str(data), weights="none", strategy="full", epochs=2, batch_size=8,
                                image_size=32, seed=0)
    single = _single(cfg, tmp_path / "single")
    out = tmp_path / "runs" / "ddp"
    r = _torchrun(_args(cfg) + ["--out", str(out)], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("epoch 2/2") == 1  # one rank reports
    ddp = json.loads((out / "metrics.json").read_text())
    assert len(ddp) == len(single) == 2
    for a, b in zip(single, ddp):
        assert abs(a["val_acc"] - b["val_acc"]) <= 0.25 + 1e-9, (a, b)  # one of 4 validation images
        assert 0 < b["val_loss"] < 10 and 0 < b["train_loss"] < 10
    # only one set of outputs, nothing per rank, nothing next to the run folder
    assert {p.name for p in out.iterdir()} == OUTPUTS
    assert [p.name for p in out.parent.iterdir()] == ["ddp"]
    run = json.loads((out / "run.json").read_text())
    assert run["summary"]["epochs_done"] == 2 and run["strategy"]["name"] == "full"
    # resume one more epoch with the same options on 2 ranks
    more = FinetuneConfig(**{**cfg.__dict__, "epochs": 3})
    r = _torchrun(_args(more) + ["--out", str(out), "--resume"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == ddp


def test_torchrun_command_single_and_multi_node():
    cfg = FinetuneConfig(data="Fruit (sample)", strategy="partial", freeze=2, epochs=5, lr=0.01,
                                augment=["flip", "crop"], seed=0)
    cmd = distributed.torchrun_command(cfg, 4, out="runs/fruit")
    assert cmd == ("torchrun --nproc-per-node 4 -m engine finetune --data 'Fruit (sample)' --strategy partial "
                   "--freeze 2 --epochs 5 --lr 0.01 --augment flip,crop --out runs/fruit")
    multi = distributed.torchrun_command(FinetuneConfig(data="d", cache=False), 8, nnodes=2)
    assert multi.startswith("torchrun --nproc-per-node 8 --nnodes 2 --node-rank NODE_RANK --rdzv-backend c10d "
                            "--rdzv-endpoint HOST:29500")
    assert multi.endswith("--data d --no-cache --out RUN_DIR")
    with pytest.raises(ValueError):
        distributed.torchrun_command(cfg, 0)


def test_helpers_are_no_ops_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = distributed.env_info()
    assert not info.enabled and info.is_main
    import torch

    batches = [torch.arange(8), torch.arange(8, 9)]
    assert distributed.shard_batches(batches) is batches
    assert distributed.all_reduce_sums(1.5, 2) == [1.5, 2]


def test_shard_batches_under_two_ranks(monkeypatch):
    import torch

    monkeypatch.setattr(distributed, "_INFO", distributed.DistInfo(rank=1, world_size=2))
    parts = distributed.shard_batches([torch.arange(0, 8), torch.arange(8, 16), torch.arange(16, 19)])
    # the last global batch (3 images) cannot give each rank 2, so it joins the previous one
    assert [p.tolist() for p in parts] == [[1, 3, 5, 7], [9, 11, 13, 15, 17]]


def test_one_process_batches_keep_every_index_once():
    # a last batch of 1 joins the one before it (and 3 images in batches of 2 make one batch of 3)
    for n, bs in [(3, 2), (5, 2), (9, 4), (8, 4)]:
        parts = loop.epoch_batches(n, bs, None)
        assert sorted(i for b in parts for i in b.tolist()) == list(range(n))
        assert min(len(b) for b in parts) >= 2


def test_finetune_page_shows_the_torchrun_command_for_its_settings(tmp_path):
    from tests.helpers import make_page_dataset as make_dataset
    from tests.helpers import open_page

    make_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    assert not at.exception
    codes = [c.value for c in at.code if c.value.startswith("torchrun")]
    # the form's defaults are the recipe's, which the CLI fills in the same way: nothing to repeat
    assert codes == ["torchrun --nproc-per-node 2 -m engine finetune --data tiny --out RUN_DIR"]
    at.radio(key="ft_strategy").set_value("linear").run()
    assert "--strategy linear" in [c.value for c in at.code if c.value.startswith("torchrun")][0]
