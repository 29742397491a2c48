"""Model registry: `@MODELS.register()` on a function that returns an nn.Module."""

from torch import nn

from resnet_lab.errors import UserError, closest
from resnet_lab.models import resnet  # noqa: F401  (registers the variants)
from resnet_lab.models.registry import MODELS

# Config keys passed to the variant's builder when set; None keeps the variant's own value.
KNOBS = ("width", "layers", "block", "stem", "zero_init_residual")


def build_model(cfg, in_channels: int, num_classes: int) -> nn.Module:
    builder = MODELS.get(cfg.name)
    for key, allowed in (("block", resnet.BLOCKS), ("stem", resnet.STEMS)):
        if cfg.get(key) is not None and cfg[key] not in allowed:
            raise UserError(f"model.{key}={cfg[key]}: must be one of {', '.join(allowed)}"
                            f"{closest(cfg[key], allowed)}")
    knobs = {k: cfg[k] for k in KNOBS if cfg.get(k) is not None}
    if "layers" in knobs:
        knobs["layers"] = list(knobs["layers"])
    return builder(in_channels=in_channels, num_classes=num_classes, **knobs)


__all__ = ["MODELS", "build_model"]
