"""Model registry: each named variant is a set of ResNet's knobs (models/resnet.py)."""

from dataclasses import fields

from torch import nn

from resnet_lab.models.registry import MODELS
from resnet_lab.models.resnet import Architecture, ResNet, check


def architecture(cfg) -> Architecture:
    """The architecture a model config describes (its knobs, whatever its name)."""
    MODELS.get(cfg.name)  # an unknown name: one line with the choices
    knobs = {f.name: cfg[f.name] for f in fields(Architecture)}
    return Architecture(**{**knobs, "layers": list(knobs["layers"])})


def build_model(cfg, in_channels: int, num_classes: int) -> nn.Module:
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


__all__ = ["MODELS", "Architecture", "architecture", "build_model", "check", "head_prefix"]
