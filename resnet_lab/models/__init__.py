"""Model registry: each named variant is a set of ResNet's knobs (models/resnet.py); and the
models built elsewhere (models/external.py: timm's by name, any class by its dotted path)."""

from dataclasses import fields

from torch import nn

from resnet_lab.models import external
from resnet_lab.models.registry import MODELS
from resnet_lab.models.resnet import Architecture, ResNet, check


def architecture(cfg) -> Architecture:
    """The architecture a model config describes: its knobs; its name is a label (a config of
    one's own names itself)."""
    knobs = {f.name: cfg[f.name] for f in fields(Architecture)}
    return Architecture(**{**knobs, "layers": list(knobs["layers"])})


def source(cfg) -> str:
    """Who builds the model a config describes: a `_target_` is Hydra's convention for a class
    by its path (model=target); a config with ResNet's knobs is resnet_lab's; else timm's
    (model=timm)."""
    if "_target_" in cfg:
        return "target"
    return "resnet_lab" if "layers" in cfg else "timm"


def check_config(cfg) -> None:
    """The model config's checks, before anything is built: its knobs, or that timm has the model,
    or that the class imports and takes num_classes."""
    kind = source(cfg)
    if kind == "timm":
        external.check_timm(cfg)
    elif kind == "target":
        external.check_target(cfg)
    else:
        check(architecture(cfg))


def build_model(cfg, in_channels: int, num_classes: int) -> nn.Module:
    kind = source(cfg)
    if kind == "timm":
        return external.build_timm(cfg, in_channels, num_classes)
    if kind == "target":
        return external.build_target(cfg, in_channels, num_classes)
    return ResNet(architecture(cfg), in_channels, num_classes)


def head_prefix(model: nn.Module) -> str:
    """The state-dict prefix of the classifier, the part that depends on the class count: fc. in
    a resnet_lab ResNet (and timm's), what timm's get_classifier() names in other timm models,
    else the last linear layer."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in reversed(list(model.named_modules())):
        if module is head or (head is None and isinstance(module, nn.Linear)):
            return name + "."
    return "fc."


__all__ = ["MODELS", "Architecture", "architecture", "build_model", "check", "check_config", "head_prefix", "source"]
