"""Inside the network: first-layer filters and stage-by-stage feature maps, and the Lab tab that shows them."""
import numpy as np
import torch

from engine.models import sources
from engine.vision import filters, network
from tests.helpers import make_dataset, open_page


def roughness(model) -> float:
    """Mean absolute difference of neighbouring taps of the standardised first-layer filters."""
    f = filters.first_conv(model).weight.detach()
    f = (f - f.mean((1, 2, 3), keepdim=True)) / f.std((1, 2, 3), keepdim=True)
    return float((f[..., 1:, :] - f[..., :-1, :]).abs().mean() + (f[..., 1:] - f[..., :-1]).abs().mean())


def test_pretrained_filters_are_smooth_patterns_and_random_ones_are_noise():
    pretrained = network.build_model("resnet18", 2, sources.resolve_vision("resnet18", "mini"))
    random = network.build_model("resnet18", 2, sources.resolve_vision("resnet18", "none"))
    assert roughness(pretrained) < 0.8 * roughness(random)  # edges and blobs vs white noise
    a, b = filters.filter_grid(pretrained), filters.filter_grid(random)
    assert a.shape == b.shape == (8 * (7 * 6 + 1) + 1,) * 2 + (3,) and a.dtype == np.uint8 and not np.array_equal(a, b)


def test_stage_maps_follow_the_network_down():
    model = network.build_model("resnet18", 2, sources.resolve_vision("resnet18", "mini")).eval()
    maps = filters.stage_maps(model, torch.randn(1, 3, 64, 64))
    assert [n.split(" ·")[0] for n, _ in maps] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert "512 maps of 2x2" in maps[-1][0] and all(g.dtype == np.uint8 and g.ndim == 2 for _, g in maps)


def test_tile_lays_out_a_grid():
    grid = filters.tile(np.zeros((5, 2, 3), np.uint8), columns=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1) and grid[0, 0] == 255 and grid[1, 1] == 0


def test_lab_inside_the_network_tab(tmp_path):
    from engine.data import imagedata

    imagedata.import_path(make_dataset(tmp_path / "d", n_classes=2, n=6), "two")
    at = open_page("pages/lab.py")
    assert not at.exception
    captions = [c.value for c in at.caption]
    assert any("64 filters" in c for c in captions) and any("stage by stage" in s.value for s in at.subheader)
