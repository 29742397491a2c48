"""The hot loop: one training epoch and one evaluation pass.

Loss and accuracy accumulate on the device; the host waits for the device only where a number
is needed (the `on_step` callback decides when, and the end of the epoch).
"""

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from resnet_lab.data import Loader
from resnet_lab.device import Runtime

StepHook = Callable[[int, torch.Tensor], None]


def train_epoch(model: torch.nn.Module, loader: Loader, optimizer: torch.optim.Optimizer,
                scheduler, scaler: torch.amp.GradScaler, runtime: Runtime, epoch: int,
                start: int = 0, on_step: Optional[StepHook] = None) -> Dict[str, float]:
    """Train over the epoch's batches from index `start`: mean loss, accuracy, images seen."""
    model.train()
    device = runtime.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for step, (x, y) in enumerate(loader.batches(epoch, start), start):
        with runtime.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        loss = loss.detach()
        loss_sum += loss * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if on_step is not None:
            on_step(step, loss)
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen, "images": seen}


@torch.inference_mode()
def evaluate(model: torch.nn.Module, loader: Loader, runtime: Runtime) -> Dict[str, float]:
    model.eval()
    device = runtime.device
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in loader.batches(0):
        with runtime.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    return {"test_loss": loss_sum.item() / seen, "test_acc": correct.item() / seen}
