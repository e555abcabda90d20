r"""The vision backbone registry: one entry per torchvision family, and nothing else knows its layout.

Every backbone is seen the same way by the rest of the engine:

    image -> stem -> layer1 -> layer2 -> layer3 -> layer4 -> pool -> head
             \_____________ 5 stages (what freezing counts) _/     \_ new nn.Linear, one output per class

`pool` is everything between the last stage and the final Linear layer (global pooling, flatten and,
for some families, a pretrained neck such as MobileNetV3's 960->1280 Linear). It belongs to the
backbone: it is pretrained, it is frozen with the last stage (k=5, a linear probe on its output)
and trains with it otherwise.

Stages are cut where the feature maps halve (stride 4, 4, 8, 16, 32 for ResNet), so "freeze the first
3 stages" means about the same depth in every family. Adding a family is one entry here.

The registry itself is plain data (the config and the CLI read it without loading torch); the
helpers below import torch inside, for that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.core.errors import UserError

if TYPE_CHECKING:
    from torch import nn

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
FLATTEN = "flatten"  # a pool step that is torch.flatten(x, 1) in the family's forward, not a module


@dataclass(frozen=True)
class Backbone:
    name: str                              # torchvision.models constructor, e.g. "resnet18"
    stages: tuple[tuple[str, ...], ...]    # 5 stages, each the dotted names of its submodules, in order
    pool: tuple[str, ...]                  # from the last stage's maps to the feature vector
    head: str                              # dotted name of the final nn.Linear (replaced by a new head)
    good_for: str                          # one line for the model pickers
    cls: str                               # torchvision's class (a model built elsewhere is known by it)


def _resnet(name: str, good_for: str) -> Backbone:
    return Backbone(name, (("conv1", "bn1", "relu", "maxpool"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)),
                    ("avgpool", FLATTEN), "fc", good_for, "ResNet")


def _features(*groups: range) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"features.{i}" for i in g) for g in groups)


REGISTRY: dict[str, Backbone] = {b.name: b for b in (
    _resnet("resnet18", "11.7M parameters: fast on a CPU, the default (and the bundled mini backbone)"),
    _resnet("resnet34", "21.8M parameters: deeper ResNet, about twice resnet18's compute"),
    _resnet("resnet50", "25.6M parameters: bottleneck ResNet, the classic transfer-learning baseline"),
    # features: 0 stem conv (s2), 1 (s2), 2-3 (s4), 4-6 (s8), 7-12 (s16), 13-15 (s32), 16 the 960-channel 1x1 conv
    Backbone("mobilenet_v3_large", _features(range(0, 2), range(2, 4), range(4, 7), range(7, 13), range(13, 17)),
             ("avgpool", FLATTEN, "classifier.0", "classifier.1", "classifier.2"), "classifier.3",
             "5.5M parameters: built for phones, the fastest here per image", "MobileNetV3"),
    # features: 0 stem (s2), 1 (s2), 2 (s4), 3 (s8), 4-5 (s16), 6-7 (s32), 8 the 1280-channel 1x1 conv
    Backbone("efficientnet_b0", _features(range(0, 2), range(2, 3), range(3, 4), range(4, 6), range(6, 9)),
             ("avgpool", FLATTEN, "classifier.0"), "classifier.1",
             "5.3M parameters: compound-scaled; more accurate than resnet50 on ImageNet at a fifth of its compute", "EfficientNet"),
    # features: 0 patchify stem (s4), 1 stage 1, 2 downsample + 3 stage 2 (s8), 4-5 (s16), 6-7 (s32); no BatchNorm
    Backbone("convnext_tiny", _features(range(0, 1), range(1, 2), range(2, 4), range(4, 6), range(6, 8)),
             ("avgpool", "classifier.0", "classifier.1"), "classifier.2",
             "28.6M parameters: a modern ConvNet (LayerNorm, 7x7 depthwise convs); the strongest features here", "ConvNeXt"),
)}
NAMES = tuple(REGISTRY)
RESNETS = ("resnet18", "resnet34", "resnet50")  # built without torchvision (models/resnet.py)


def get(arch: str) -> Backbone:
    if arch not in REGISTRY:
        raise UserError(f"unknown model {arch!r}; choose one of {', '.join(NAMES)}")
    return REGISTRY[arch]


def entry(model: nn.Module) -> Backbone:
    """The registry entry a built model came from: construct() tags it; a torchvision model built
    elsewhere is known by its class (one layout per class); a DDP wrapper is looked through."""
    model = getattr(model, "module", model)
    if hasattr(model, "arch"):
        return REGISTRY[model.arch]
    return next(b for b in REGISTRY.values() if b.cls == type(model).__name__)


def construct(arch: str) -> nn.Module:
    """`arch` with random weights (on the current default device; use meta to skip init). The ResNets are
    the engine's own copy of torchvision's (models/resnet.py: same layout and init, no torchvision import)."""
    if arch in RESNETS:
        from engine.models import resnet  # deferred: imports torch

        model = resnet.resnet(arch)
    else:
        import torchvision  # deferred: the registry is read without torch

        model = getattr(torchvision.models, get(arch).name)(weights=None)
    model.arch = arch  # a plain attribute: every helper below finds the layout from it
    return model


def empty(arch: str) -> nn.Module:
    """`arch` for a caller that loads every tensor, on the CPU; the global random state is left as it was.

    Built with a throw-away random init, not on the meta device: the meta device's first use costs
    ~0.9 s per process here, a random init 0.05-0.2 s (resnet18 0.08 s, convnext_tiny 0.2 s)."""
    import torch  # deferred: the registry is read without torch

    with torch.random.fork_rng(devices=[]):
        return construct(arch)


def _sequence(model: nn.Module, names: tuple[str, ...]) -> nn.Module:
    from torch import nn  # deferred: the registry is read without torch

    mods = [nn.Flatten(1) if n == FLATTEN else model.get_submodule(n) for n in names]
    return mods[0] if len(mods) == 1 else nn.Sequential(*mods)


def stages(model: nn.Module) -> list[nn.Module]:
    """The 5 stages as modules (views on the model's own layers: training them trains the model)."""
    return [_sequence(model, names) for names in entry(model).stages]


def pool(model: nn.Module) -> nn.Module:
    return _sequence(model, entry(model).pool)


def frozen_modules(model: nn.Module, k: int) -> list[nn.Module]:
    """What k frozen stages cover: the first k stages, and with k=5 the pool too (its output is the feature vector)."""
    return stages(model)[:k] + ([pool(model)] if k >= 5 else [])


def head(model: nn.Module) -> nn.Linear:
    return model.get_submodule(entry(model).head)


def set_head(model: nn.Module, layer: nn.Module) -> None:
    parent, _, name = entry(model).head.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, layer)


def head_prefix(arch: str) -> str:
    """State-dict prefix of the head, e.g. "fc." or "classifier.3."."""
    return get(arch).head + "."


def feature_dim(model: nn.Module) -> int:
    return head(model).in_features


def prefixes(arch: str, k: int) -> tuple[str, ...]:
    """State-dict prefixes of the first k stages (and of the pool with k=5): what k frozen stages hold."""
    b = get(arch)
    names = [n for st in b.stages[:k] for n in st] + (list(b.pool) if k >= 5 else [])
    return tuple(f"{n}." for n in names if n != FLATTEN)


def pool_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(pool(model).parameters())


def infer(keys: set[str]) -> str | None:
    """Which family a state dict's tensor names belong to (head excluded), or None."""
    import torch  # deferred: the registry is read without torch

    for arch in NAMES:
        with torch.device("meta"):
            model = construct(arch)
        want = {k for k in model.state_dict() if not k.startswith(head_prefix(arch)) and not k.endswith("num_batches_tracked")}
        have = {k for k in keys if not k.startswith(head_prefix(arch)) and not k.endswith("num_batches_tracked")}
        if want == have:
            return arch
    return None
