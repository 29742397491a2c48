"""Model registry: `@MODELS.register()` on a function that returns an nn.Module."""

from torch import nn

from resnet_lab.errors import UserError, closest
from resnet_lab.models import resnet  # noqa: F401  (registers the variants)
from resnet_lab.models.registry import MODELS

# Config keys passed to the variant's builder when set; None keeps the variant's own value.
KNOBS = ("width", "widen", "layers", "block", "stem", "shortcut", "groups", "width_per_group",
         "dropout", "zero_init_residual")
CHOICES = {"block": tuple(resnet.BLOCKS), "stem": resnet.STEMS, "shortcut": resnet.SHORTCUTS}
POSITIVE = ("widen", "groups", "width_per_group")


def check_knobs(knobs: dict) -> None:
    """What the schema's types cannot say about the model knobs, as one line per mistake."""
    for key, allowed in CHOICES.items():
        if key in knobs and knobs[key] not in allowed:
            raise UserError(f"model.{key}={knobs[key]}: must be one of {', '.join(allowed)}"
                            f"{closest(knobs[key], allowed)}")
    for key in POSITIVE:
        if key in knobs and knobs[key] < 1:
            raise UserError(f"model.{key}={knobs[key]}: must be >= 1")
    if "layers" in knobs and (not knobs["layers"] or min(knobs["layers"]) < 1):
        raise UserError(f"model.layers={knobs['layers']}: must list at least one stage, "
                        "each of >= 1 blocks")
    if not 0 <= knobs.get("dropout", 0) < 1:
        raise UserError(f"model.dropout={knobs['dropout']}: must be in [0, 1)")


def build_model(cfg, in_channels: int, num_classes: int) -> nn.Module:
    builder = MODELS.get(cfg.name)
    knobs = {k: cfg[k] for k in KNOBS if cfg.get(k) is not None}
    if "layers" in knobs:
        knobs["layers"] = list(knobs["layers"])
    check_knobs(knobs)
    return builder(in_channels=in_channels, num_classes=num_classes, **knobs)


__all__ = ["MODELS", "build_model"]
