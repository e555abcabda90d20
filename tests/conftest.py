"""Every test gets its own empty workspace, no network and the CPU; fixtures shared by several test modules."""
import os

import pytest

os.environ.setdefault("TRANSFER_STUDIO_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFER_STUDIO_DEVICE", "cpu")


@pytest.fixture(autouse=True)
def workspace_home(tmp_path, monkeypatch):
    home = tmp_path / "workspace"
    monkeypatch.setenv("TRANSFER_STUDIO_HOME", str(home))
    return home


@pytest.fixture
def fresh_manager():
    """pages.common.manager() is cached per process; page tests get their own (for their own workspace)."""
    from pages.common import manager

    manager.clear()
    yield
    manager.clear()


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> str:
    """A resnet18 state dict (random, seeded) saved as safetensors: the 'pretrained' side in tests."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_file(state, str(path))
    return str(path)


# ----------------------------------------------------------------------------- a tiny language model
@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model as an HF folder, made once per test session."""
    from tests.text_helpers import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="session")
def tiny_mini_dir(tmp_path_factory):
    """A second copy for tiny_as_mini: loaded models are cached by folder, so the folder seen as
    `mini` is never also loaded under its own name by another test."""
    from tests.text_helpers import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-mini"))


@pytest.fixture
def tiny_as_mini(tiny_mini_dir, monkeypatch):
    """Pages and the CLI see the tiny model as the bundled `mini` (fast, no assets needed)."""
    from engine.models import sources

    monkeypatch.setattr(sources, "MINI_TEXT", tiny_mini_dir)
    return tiny_mini_dir
