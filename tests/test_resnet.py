"""The engine's own ResNets are torchvision's: same keys, same seeded init, same forward, and no torchvision import."""
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from engine.models import backbones, resnet, sources
from tests.helpers import ROOT


@pytest.mark.parametrize("arch", backbones.RESNETS)
def test_same_keys_same_seeded_init_as_torchvision(arch):
    torch.manual_seed(3)
    ours = resnet.resnet(arch).state_dict()
    torch.manual_seed(3)
    theirs = getattr(torchvision.models, arch)(weights=None).state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), "the same seed must give the same random weights"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_same_forward_as_torchvision_on_loaded_weights(arch):
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode means something
        for m in theirs.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    ours = resnet.resnet(arch)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    for mode in ("eval", "train"):
        getattr(ours, mode)(), getattr(theirs, mode)()
        with torch.no_grad():
            assert torch.allclose(ours(x), theirs(x), atol=1e-5), mode


def test_registry_builds_the_engine_copy():
    model = backbones.construct("resnet18")
    assert isinstance(model, resnet.ResNet) and backbones.entry(model).name == "resnet18"


def test_imagenet_file_names_match_torchvision():
    from torchvision.models import get_model_weights

    for arch in backbones.NAMES:
        assert sources.IMAGENET_FILES[arch] == os.path.basename(get_model_weights(arch).DEFAULT.url)


def test_a_resnet_run_needs_no_torchvision():
    """Building the bundled backbone with its weights and extracting features imports no torchvision."""
    code = ("import sys, torch\n"
            "from engine.models import sources\n"
            "from engine.vision import network\n"
            "m = network.build_model('resnet18', 3, sources.resolve_vision('resnet18', 'auto'), seed=0).eval()\n"
            "m(torch.zeros(1, 3, 64, 64))\n"
            "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRANSFER_STUDIO_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_an_empty_model_leaves_the_seeds_alone():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    backbones.empty("resnet18")
    assert torch.equal(torch.rand(3), a)
