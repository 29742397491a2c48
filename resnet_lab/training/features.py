"""Per-update features of a training recipe, each an engine.Callback: gradient clipping by norm,
and an exponential moving average (EMA) of the weights."""

import copy
from typing import Callable, Dict, List

import torch

from resnet_lab import distributed
from resnet_lab.training.engine import Callback


class GradClip(Callback):
    """Scales the gradients down to `max_norm` (global L2) before each update. The norm before
    clipping stays on the device: logged where the trainer reads the loss anyway, and its
    epoch's mean (over the updates where it was finite) in the epoch's row."""

    name = "grad_clip"

    def __init__(self, model: torch.nn.Module, max_norm: float, device: torch.device):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.max_norm = max_norm
        self.norm = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.finite = torch.zeros((), device=device, dtype=torch.long)

    def before_optimizer_step(self, step, optimizer, scaler) -> None:
        scaler.unscale_(optimizer)  # an fp16 scaler's inf gradients give an inf norm; it skips the update
        self.norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        finite = torch.isfinite(self.norm)
        self.norm_sum += torch.where(finite, self.norm, 0)
        self.finite += finite

    def logged(self) -> Dict[str, torch.Tensor]:
        return {"grad_norm": self.norm}

    def end_epoch(self) -> Dict[str, float]:
        mean = self.norm_sum.item() / max(1, self.finite.item())
        self.norm_sum.zero_()
        self.finite.zero_()
        return {"grad_norm": mean}

    def state_dict(self) -> Dict:
        return {"norm_sum": self.norm_sum, "finite": self.finite}

    def load_state_dict(self, state: Dict) -> None:
        self.norm_sum.copy_(state["norm_sum"])
        self.finite.copy_(state["finite"])


class EMA(Callback):
    """After each update, average = d * average + (1 - d) * weights, over every floating-point
    entry of the state dict (batch-norm statistics too; step counters are copied). d is `decay`,
    or with `warmup`, min(decay, (1 + n) / (10 + n)) after n updates.

    `evaluate(model)` gives the metrics of a model; each epoch's row gets the average's, as
    `<metric>_ema`.
    """

    name = "ema"

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool,
                 evaluate: Callable[[torch.nn.Module], Dict[str, float]]):
        self.average = copy.deepcopy(model).requires_grad_(False)
        self.decay, self.warmup, self.evaluate = decay, warmup, evaluate
        self.updates = 0
        now, average = model.state_dict(), self.average.state_dict()
        self.floats: List[List[torch.Tensor]] = [[], []]
        self.others: List[List[torch.Tensor]] = [[], []]
        for key, value in average.items():
            pairs = self.floats if value.is_floating_point() else self.others
            pairs[0].append(value)
            pairs[1].append(now[key])

    def rate(self) -> float:
        """The weight of the old average in the next update."""
        return min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay

    @torch.no_grad()
    def after_step(self, step, loss) -> None:
        average, now = self.floats
        torch._foreach_lerp_(average, now, 1 - self.rate())
        for mine, theirs in zip(*self.others):
            mine.copy_(theirs)
        self.updates += 1

    def end_epoch(self) -> Dict[str, float]:
        distributed.broadcast_buffers(self.average)  # each rank averaged its own statistics
        return {f"{key}_ema": value for key, value in self.evaluate(self.average).items()}

    def state_dict(self) -> Dict:
        return {"weights": self.average.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Dict) -> None:
        self.average.load_state_dict(state["weights"])
        self.updates = state["updates"]


def build_features(cfg, model: torch.nn.Module, device: torch.device,
                   evaluate: Callable[[torch.nn.Module], Dict[str, float]]) -> List[Callback]:
    """The features cfg switches on, in the order they run (clipping before the update, the
    average after it)."""
    features: List[Callback] = []
    if cfg.optim.clip_grad_norm:
        features.append(GradClip(model, cfg.optim.clip_grad_norm, device))
    if cfg.ema.decay:
        features.append(EMA(model, cfg.ema.decay, cfg.ema.warmup, evaluate))
    return features
