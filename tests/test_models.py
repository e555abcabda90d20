"""The model manager: downloads with progress, cancel and clean-up, checks of what arrived, `auto`
choosing the best weights this machine can have, offline import, and the CLI twin.

A local HTTP server (tests/weights_server.py) stands in for the weight hosts through
TRANSFER_STUDIO_MODELS_URL; no test touches the internet.
"""
import hashlib
import io
import json
import time
import zipfile

import pytest
import torch

from engine.__main__ import main
from engine.core.errors import Cancelled, UserError
from engine.models import backbones, sources, store
from engine.text import causal_lm
from engine.vision import network
from tests.weights_server import WeightsServer

ARCH = "mobilenet_v3_large"  # the smallest torchvision checkpoint among the backbones (a random one: ~22 MB)


@pytest.fixture(autouse=True)
def caches(tmp_path, monkeypatch):
    """Empty torch and hub caches of this test's own."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(sources, "_online", {})
    return tmp_path


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """A random-weight ARCH state dict, saved the way torchvision's checkpoints are."""
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(backbones.construct(ARCH).state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def server(monkeypatch):
    """The weight hosts, answering on 127.0.0.1: downloads are allowed (the network 'answers')."""
    s = WeightsServer()
    monkeypatch.setenv("TRANSFER_STUDIO_MODELS_URL", s.url)
    monkeypatch.delenv("TRANSFER_STUDIO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (read from the environment when the library was imported)
    yield s
    s.close()


@pytest.fixture
def named_for(monkeypatch):
    """torchvision names each checkpoint after its sha256 prefix; our random one gets a name of the same form."""
    def name(data: bytes) -> str:
        filename = f"{ARCH}-{hashlib.sha256(data).hexdigest()[:8]}.pth"
        real = sources.imagenet_file
        monkeypatch.setattr(sources, "imagenet_file", lambda arch: real(arch).with_name(filename) if arch == ARCH else real(arch))
        return filename
    return name


def no_leftovers(folder) -> bool:
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


# ----------------------------------------------------------------------------- vision downloads
def test_download_reports_progress_checks_the_hash_and_auto_then_uses_it(server, checkpoint, named_for):
    server.add_vision(named_for(checkpoint), checkpoint)
    assert store.get(ARCH).status == "downloadable"
    source = sources.resolve_vision(ARCH, "auto")  # nothing cached, the network answers: the real weights, fetched first
    assert source.kind == "imagenet" and source.download == ARCH and "downloaded first" in source.reason
    seen = []
    path = store.download(ARCH, report=lambda **p: seen.append(p))
    assert path.read_bytes() == checkpoint and path == sources.imagenet_file(ARCH)
    sizes = [p["bytes"] for p in seen if "bytes" in p]
    assert sizes == sorted(sizes) and sizes[-1] == len(checkpoint) and seen[-1]["progress"] == 1.0
    assert all(p["phase"] == "downloading" and p["total"] == len(checkpoint) for p in seen if "bytes" in p)
    assert store.get(ARCH).status == "cached"
    cached = sources.resolve_vision(ARCH, "auto")
    assert cached.kind == "imagenet" and cached.download is None
    model = network.build_model(ARCH, 3, cached)
    state = torch.load(io.BytesIO(checkpoint), weights_only=True)
    assert torch.equal(model.features[0][0].weight, state["features.0.0.weight"])
    assert store.delete(ARCH).status == "downloadable" and not path.exists()


def test_a_wrong_hash_or_a_dropped_connection_leaves_nothing_and_the_earlier_cache_intact(server, checkpoint, named_for, caches):
    filename = named_for(checkpoint)
    earlier = sources.imagenet_file("resnet18")  # another model already in the cache
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"earlier weights")
    server.add_vision(filename, checkpoint[:-10] + b"0123456789")  # same size, other bytes: the checksum catches it
    with pytest.raises(UserError, match="checksum"):
        store.download(ARCH)
    server.add_vision(filename, checkpoint)
    server.truncate.add(f"/torchvision/{filename}")  # the network drops half-way
    with pytest.raises(UserError, match="stopped"):
        store.download(ARCH)
    assert [p.name for p in earlier.parent.iterdir()] == [earlier.name] and earlier.read_bytes() == b"earlier weights"
    assert store.get(ARCH).status == "downloadable"


def test_cancel_stops_the_download_and_cleans_up(server, checkpoint, named_for, caches):
    server.add_vision(named_for(checkpoint), checkpoint)
    server.delay = 0.01
    seen = []
    with pytest.raises(Cancelled):
        store.download(ARCH, report=lambda **p: seen.append(p), cancelled=lambda: len(seen) >= 2)
    assert no_leftovers(caches / "torch")
    assert store.get(ARCH).status == "downloadable"


def test_a_download_job_runs_beside_training_and_can_be_cancelled(server, checkpoint, named_for, caches, fresh_manager):
    from engine.core import runs
    from pages.common import manager

    server.add_vision(named_for(checkpoint), checkpoint)
    server.delay = 0.02
    jobs = manager()
    run_id = jobs.submit("download", {"name": ARCH}, "download", device="network")
    for _ in range(400):  # the job reports bytes while it runs
        p = jobs.progress(run_id) or {}
        if p.get("bytes"):
            break
        time.sleep(0.01)
    assert p.get("bytes") and p.get("model") == ARCH and "MB" in p.get("message", "")
    jobs.cancel(run_id)
    assert jobs.wait(run_id, timeout=30) == "cancelled"
    assert no_leftovers(caches / "torch")
    server.delay = 0.0
    run_id = jobs.submit("download", {"name": ARCH}, "download", device="network")
    assert jobs.wait(run_id, timeout=60) == "done"
    assert runs.get(run_id)["summary"]["model"] == ARCH and store.get(ARCH).status == "cached"


def test_not_enough_disk_space_is_a_clear_message_and_writes_nothing(server, checkpoint, named_for, caches, monkeypatch):
    server.add_vision(named_for(checkpoint), checkpoint)
    monkeypatch.setattr(store, "_free_bytes", lambda folder: 10 * 2**20)
    with pytest.raises(UserError, match="not enough disk space"):
        store.download(ARCH)
    assert no_leftovers(caches / "torch") and not server.requests


def test_offline_auto_picks_the_mini_and_says_why(monkeypatch):
    monkeypatch.setenv("TRANSFER_STUDIO_OFFLINE", "1")
    source = sources.resolve_vision("resnet18", "auto")
    assert source.kind == "mini" and "TRANSFER_STUDIO_OFFLINE" in source.reason and source.download is None
    assert store.get("resnet18").status == "unavailable"
    with pytest.raises(UserError, match="no network"):
        store.download("resnet18")
    assert sources.resolve_text("auto").kind == "mini"
    assert sources.available()["auto"]["vision"].endswith("(offline)")


def test_cli_finetune_downloads_first_with_a_progress_line(server, checkpoint, named_for, tmp_path, capsys):
    from tests.helpers import make_dataset

    server.add_vision(named_for(checkpoint), checkpoint)
    data = make_dataset(tmp_path / "data", n_classes=2, n=4)
    code = main(["finetune", "--data", str(data), "--model", ARCH, "--image-size", "32", "--epochs", "1",
                 "--strategy", "linear", "--out", str(tmp_path / "run"), "--json"])
    assert code == 0
    out = capsys.readouterr()
    assert f"downloading {ARCH}" in out.err and "of" in out.err and "MB" in out.err
    assert json.loads(out.out)["weights"]["kind"] == "imagenet"
    assert main(["models", "delete", ARCH]) == 0
    capsys.readouterr()
    # --offline anywhere on the line: no download, the random init it falls back to says why
    code = main(["finetune", "--data", str(data), "--model", ARCH, "--image-size", "32", "--epochs", "1",
                 "--strategy", "linear", "--out", str(tmp_path / "run2"), "--json", "--offline"])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["weights"]["kind"] == "none"
    assert store.get(ARCH).status == "unavailable"


# ----------------------------------------------------------------------------- hub downloads
def test_hub_download_through_the_hub_library_then_auto_generates_with_it(server, tiny_dir, caches):
    server.add_hub_folder("gpt2", tiny_dir)
    source = sources.resolve_text("auto")
    assert source.kind == "hub" and source.download == "gpt2"
    seen = []
    path = store.download("gpt2", report=lambda **p: seen.append(p))
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert any(p.get("file") == "model.safetensors" for p in seen) and any(p.get("progress") == 1.0 for p in seen)
    assert store.get("gpt2").status == "cached"
    lm = causal_lm.load("auto")
    assert lm.source.kind == "hub" and lm.source.download is None
    assert lm.tokenizer.decode(lm.tokenizer.encode("hello")) == "hello"


def test_cli_lm_finetune_with_auto_downloads_gpt2_first_with_a_progress_line(server, tiny_dir, tmp_path, capsys):
    from tests.text_helpers import corpus

    server.add_hub_folder("gpt2", tiny_dir)
    text_file = tmp_path / "style.txt"
    text_file.write_text(corpus(60, seed=3))
    code = main(["lm-finetune", "--text", str(text_file), "--model", "auto", "--epochs", "1", "--block-size", "32",
                 "--out", str(tmp_path / "lm"), "--json"])
    assert code == 0
    out = capsys.readouterr()
    assert "downloading gpt2" in out.err and store.get("gpt2").status == "cached"
    assert "ppl_after" in json.loads(out.out)  # it trained on the downloaded model


def test_hub_model_without_safetensors_is_refused(server, tiny_dir, caches):
    server.add_hub_folder("distilgpt2", tiny_dir)
    del server.files["/distilgpt2/resolve/main/model.safetensors"]
    with pytest.raises(UserError, match="safetensors"):
        store.download("distilgpt2")
    assert store.get("distilgpt2").status == "downloadable"


# ----------------------------------------------------------------------------- offline import
def test_import_a_torchvision_checkpoint_found_by_its_tensors(checkpoint, tmp_path):
    f = tmp_path / "weights.pth"
    f.write_bytes(checkpoint)
    m = store.import_file(f)
    assert m.name == ARCH and m.status == "cached"
    assert sources.resolve_vision(ARCH, "auto").kind == "imagenet"
    with pytest.raises(UserError, match="not resnet18"):  # named for another architecture: checked, refused
        store.import_file(f, name="resnet18")
    assert not sources.imagenet_cached("resnet18")


def test_import_refuses_pickles_and_strangers_and_keeps_the_earlier_file(checkpoint, tmp_path):
    store.import_file(tmp_path / "w.pth", data=checkpoint)
    before = sources.imagenet_file(ARCH).read_bytes()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with pytest.raises(UserError, match="weights-only"):
        store.import_file(tmp_path / "evil.pth", data=buf.getvalue())
    buf = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(3, 3)}, buf)
    with pytest.raises(UserError, match="fits none"):
        store.import_file(tmp_path / "other.pth", data=buf.getvalue())
    with pytest.raises(UserError, match=r"\.pth.*\.zip"):
        store.import_file(tmp_path / "weights.bin", data=b"x")
    assert sources.imagenet_file(ARCH).read_bytes() == before


def zipped(folder, drop=(), add=None, top="my-model") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted(folder.iterdir()):
            if f.name not in drop:
                z.write(f, f"{top}/{f.name}" if top else f.name)
        for name, data in (add or {}).items():
            z.writestr(name, data)
    return buf.getvalue()


def test_import_a_zipped_hub_folder_then_auto_finds_it(tiny_dir, tmp_path):
    m = store.import_file(tmp_path / "gpt2.zip", data=zipped(tiny_dir))
    assert m.name == "gpt2" and m.status == "cached"
    assert sources.resolve_text("auto").kind == "hub"
    lm = causal_lm.load("gpt2")
    assert lm.model.config.n_layer == 2
    other = store.import_file(tmp_path / "x.zip", data=zipped(tiny_dir, top=None), name="someone/tiny")
    assert other.status == "cached" and "someone/tiny" in [x.name for x in store.catalog()]
    assert store.delete("someone/tiny").name == "someone/tiny"
    assert "someone/tiny" not in [x.name for x in store.catalog()]


@pytest.mark.parametrize("bad, message", [
    (dict(drop=("tokenizer.json",)), "no tokenizer"),
    (dict(drop=("config.json",)), "no config.json"),
    (dict(add={"my-model/pytorch_model.bin": b"pickle"}), "pickle"),
    (dict(add={"../evil.txt": b"x"}), "unsafe path"),
    (dict(drop=("config.json",), add={"my-model/config.json": json.dumps({"model_type": "gpt2", "auto_map": {"x": "y"}})}), "custom code"),
    (dict(drop=("model.safetensors",), add={"my-model/model.safetensors": b"not a safetensors file"}), "not a valid safetensors"),
])
def test_bad_hub_zips_are_refused_and_the_earlier_import_stays(tiny_dir, tmp_path, bad, message):
    store.import_file(tmp_path / "gpt2.zip", data=zipped(tiny_dir))
    before = sorted(p.name for p in sources.hf_snapshot("gpt2").iterdir())
    with pytest.raises(UserError, match=message):
        store.import_file(tmp_path / "gpt2.zip", data=zipped(tiny_dir, **bad))
    assert sorted(p.name for p in sources.hf_snapshot("gpt2").iterdir()) == before
    assert not list(sources.hf_folder("gpt2").glob("snapshots/.*"))  # no half-written snapshot left behind


# ----------------------------------------------------------------------------- the CLI twin
def test_cli_models_list_download_delete_and_errors(server, checkpoint, named_for, capsys):
    server.add_vision(named_for(checkpoint), checkpoint)
    assert main(["models", "list", "--json"]) == 0
    listed = {m["name"]: m for m in json.loads(capsys.readouterr().out)["models"]}
    assert set(backbones.NAMES) <= set(listed) and {"gpt2", "distilgpt2", "gpt2-medium", "mini-resnet18", "mini-gpt2"} <= set(listed)
    assert listed[ARCH]["status"] == "downloadable" and listed["mini-gpt2"]["status"] == "bundled"
    assert all(m["good_for"] and m["size_mb"] > 0 for m in listed.values())
    assert main(["models", "download", ARCH]) == 0
    out = capsys.readouterr()
    assert "cached" in out.out and f"downloading {ARCH}" in out.err
    assert main(["models", "delete", "mini-gpt2"]) == 2
    assert "bundled" in capsys.readouterr().err
    assert main(["models", "download", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["models", "import", "missing.pth"]) == 2
    assert "not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pages
def test_models_page_lists_everything_and_deletes_offline(checkpoint, tmp_path):
    from tests.helpers import open_page

    store.import_file(tmp_path / "w.pth", data=checkpoint)
    at = open_page("pages/models.py")
    assert not at.exception
    table = at.dataframe[0].value
    status = dict(zip(table["model"], table["status"]))
    assert status[ARCH] == "on this machine" and status["mini-gpt2"] == "bundled" and status["gpt2"] == "unavailable offline"
    assert any("offline" in c.value for c in at.caption)
    assert not [b for b in at.button if b.label == "Download"]  # offline: nothing to download
    delete = next(s for s in at.selectbox if s.label.startswith("Delete"))
    assert delete.value == ARCH
    next(b for b in at.button if b.label == "Delete").click().run()
    assert not at.exception and not sources.imagenet_cached(ARCH)


def test_finetune_page_offers_the_download_in_one_line_and_downloads_in_the_background(server, checkpoint, named_for,
                                                                                        tmp_path, fresh_manager):
    from pages.common import manager
    from tests.helpers import make_page_dataset, open_page

    server.add_vision(named_for(checkpoint), checkpoint)
    make_page_dataset(tmp_path / "imgs")
    at = open_page("pages/finetune.py")
    model_box = next(s for s in at.selectbox if s.label == "Backbone")
    model_box.set_value(ARCH).run()
    assert not at.exception
    offer = [i.value for i in at.info if "not on this machine yet" in i.value]
    assert offer and ARCH in offer[0]
    next(b for b in at.button if b.label.startswith("Download ")).click().run()
    run_id = at.session_state["downloading"]
    assert manager().wait(run_id, timeout=60) == "done"
    assert store.get(ARCH).status == "cached"
