"""Every test gets its own empty workspace, no network and the CPU."""
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
