"""The hot loop: one training epoch and one evaluation pass.

Loss and accuracy accumulate on the device; the host waits for the device only where a number
is needed (a callback decides when, and the end of the epoch). With several ranks each
accumulates its own share, summed over the ranks where the numbers are read.
"""

import contextlib
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from resnet_lab import distributed
from resnet_lab.data import Loader
from resnet_lab.device import Runtime


class Callback:
    """Where a per-step feature plugs into the loop (gradient clipping, an EMA of the weights,
    the trainer's checkpoint and stop policy). Each update (the last batch of a group of
    `accumulate` batches) runs, in this order:

    1. forward pass and loss (under autocast) of each batch of the group, and its backward pass
       (the loss scaled for fp16; under DDP the gradients are all-reduced on the last one only);
    2. `before_optimizer_step` of each callback, in list order: the gradients are complete and
       still scaled (call `scaler.unscale_(optimizer)` before reading or clipping them);
    3. optimizer step, grad-scaler update, scheduler step;
    4. `after_step` of each callback, in list order: the weights are the update's new ones,
       `step` is the group's last batch and `loss` its loss (on the device: reading it waits
       for the device).

    A feature with state of its own gives it in `state_dict` (checkpoints hold it, under `name`),
    device values for the trainer to log where it reads the loss anyway in `logged`, and its
    part of an epoch's row in `end_epoch` (the host may wait for the device there).
    """

    name = ""

    def before_optimizer_step(self, step: int, optimizer: torch.optim.Optimizer,
                              scaler: torch.amp.GradScaler) -> None:
        pass

    def after_step(self, step: int, loss: torch.Tensor) -> None:
        pass

    def logged(self) -> Dict[str, torch.Tensor]:
        return {}

    def end_epoch(self) -> Dict[str, float]:
        return {}

    def state_dict(self) -> Dict:
        return {}

    def load_state_dict(self, state: Dict) -> None:
        pass


class RunningTotals:
    """An epoch's sums so far (of training, or of an evaluation pass), on the device.

    A mid-epoch checkpoint saves them, so that a resumed epoch reports the same metrics as an
    uninterrupted one.
    """

    def __init__(self, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0
        self.seconds = 0.0
        # The first step whose loss was NaN or inf, -1 while there is none: recorded on the
        # device so that watching for divergence costs no sync; read where the host syncs anyway.
        self.first_bad_step = torch.full((), -1, device=device, dtype=torch.long)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """y: the labels, or mixed label weights (N x classes), whose largest counts as the label."""
        if y.is_floating_point():
            y = y.argmax(1)
        self.loss_sum += loss * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        self.first_bad_step.masked_fill_(~torch.isfinite(loss) & (self.first_bad_step < 0), step)

    def bad_step(self) -> Optional[int]:
        """The first step with a non-finite loss on any rank, or None (waits for the device; all
        ranks must ask together)."""
        none = torch.iinfo(torch.long).max
        step = torch.where(self.first_bad_step < 0, none, self.first_bad_step)
        step = int(distributed.all_reduce(step, "min"))
        return None if step == none else step

    def reduced(self) -> "RunningTotals":
        """The sums over all ranks, on every rank (all ranks must ask together)."""
        total = RunningTotals(self.loss_sum.device)
        total.loss_sum = distributed.all_reduce(self.loss_sum.clone())
        total.correct = distributed.all_reduce(self.correct.clone())
        seen = torch.tensor(self.seen, device=self.loss_sum.device)
        total.seen = int(distributed.all_reduce(seen))
        total.seconds, total.first_bad_step = self.seconds, self.first_bad_step.clone()
        return total

    def metrics(self, split: str = "train") -> Dict[str, float]:
        return {f"{split}_loss": self.loss_sum.item() / self.seen, f"{split}_acc": self.correct.item() / self.seen}

    def state_dict(self) -> Dict:
        return dict(vars(self))

    @classmethod
    def from_state_dict(cls, state: Dict, device: torch.device) -> "RunningTotals":
        totals = cls(device)
        for key, value in state.items():
            setattr(totals, key, value.to(device) if isinstance(value, torch.Tensor) else value)
        return totals


def train_epoch(model: torch.nn.Module, loader: Loader, optimizer: torch.optim.Optimizer,
                scheduler, scaler: torch.amp.GradScaler, runtime: Runtime, epoch: int,
                totals: RunningTotals, start: int = 0, callbacks: Sequence[Callback] = (), *,
                accumulate: int = 1, label_smoothing: float = 0.0) -> None:
    """Train over the epoch's batches from index `start`, adding to `totals`. Each group of
    `accumulate` batches (g * accumulate onwards, fewer at the epoch's end) makes one update,
    from the gradient of the group's mean loss; `callbacks` run inside it as `Callback` says."""
    model.train()
    steps = len(loader)
    for step, (x, y) in enumerate(loader.batches(epoch, start), start):
        first = step - step % accumulate
        last = min(first + accumulate, steps) - 1
        if step in (first, start):
            optimizer.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients; weighting each rank's mean loss by its share of the
        # group's images makes the sum of the group's gradients that of its mean loss, also for
        # uneven batches. The ranks all-reduce only the group's last backward pass.
        share = len(y) * loader.world_size / sum(loader.global_size(i) for i in range(first, last + 1))
        with contextlib.nullcontext() if step == last else getattr(model, "no_sync", contextlib.nullcontext)():
            with runtime.autocast():
                logits = model(x)
                loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            scaler.scale(loss * share).backward()
        loss = loss.detach()
        totals.add(step, loss, logits, y)
        if step == last:
            _update(step, loss, optimizer, scheduler, scaler, callbacks)


def _update(step: int, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler,
            scaler: torch.amp.GradScaler, callbacks: Sequence[Callback]) -> None:
    for callback in callbacks:
        callback.before_optimizer_step(step, optimizer, scaler)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    for callback in callbacks:
        callback.after_step(step, loss)


def shifted(x: torch.Tensor, pixels: int) -> list:
    """x moved `pixels` down and right, and as far up and left, the edge rows and columns
    repeated into the gap (the CIFAR-10 speed records' test-time translation)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    return [padded[..., :h, :w], padded[..., 2 * pixels:, 2 * pixels:]]


def predict(model: torch.nn.Module, x: torch.Tensor, tta: bool = False, tta_shift: int = 0) -> torch.Tensor:
    """The logits of x; with `tta`, the mean of those of x and its mirror; with `tta_shift`, the
    mean of that and the same of x shifted both ways by so many pixels (shifted)."""
    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return (model(x) + model(x.flip(3))) / 2 if tta else model(x)

    logits = mirrored(x)
    if tta_shift:
        down, up = shifted(x, tta_shift)
        logits = (logits + (mirrored(down) + mirrored(up)) / 2) / 2
    return logits


def evaluate(model: torch.nn.Module, loader: Loader, runtime: Runtime, split: str = "test", tta: bool = False,
             keep: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]] = None,
             tta_shift: int = 0) -> Dict[str, float]:
    """`split`_loss and `split`_acc of predict's logits (test-time augmentation: `tta`, `tta_shift`);
    `keep`, when given, sees each batch's inputs, logits and labels on the device (a confusion
    matrix counts them; `python -m resnet_lab.evaluate` keeps more)."""
    model.eval()
    totals = RunningTotals(runtime.device)
    # A compiled model that alternates between inference mode and training can fail
    # (pytorch/pytorch#135892); no_grad costs it nothing measurable.
    with torch.no_grad() if runtime.compile else torch.inference_mode():
        for step, (x, y) in enumerate(loader.batches(0)):
            with runtime.autocast():
                logits = predict(model, x, tta, tta_shift)
            totals.add(step, F.cross_entropy(logits.float(), y), logits, y)
            if keep is not None:
                keep(x, logits, y)
    return totals.reduced().metrics(split)
