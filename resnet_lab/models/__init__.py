"""Model registry: each named variant is a set of ResNet's knobs (models/resnet.py)."""

from dataclasses import fields

from torch import nn

from resnet_lab.models.registry import MODELS
from resnet_lab.models.resnet import Architecture, ResNet, check


def architecture(cfg) -> Architecture:
    """The architecture a model config describes: its knobs; its name is a label (a config of
    one's own names itself)."""
    knobs = {f.name: cfg[f.name] for f in fields(Architecture)}
    return Architecture(**{**knobs, "layers": list(knobs["layers"])})


def build_model(cfg, in_channels: int, num_classes: int) -> nn.Module:
    return ResNet(architecture(cfg), in_channels, num_classes)


__all__ = ["MODELS", "Architecture", "architecture", "build_model", "check"]
