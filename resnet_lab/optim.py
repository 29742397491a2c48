"""Optimizer registry and learning-rate schedules (stepped once per update)."""

import logging
from typing import Dict, List

from torch import nn, optim
from torch.optim import lr_scheduler

from resnet_lab.errors import UserError
from resnet_lab.models import head_prefix
from resnet_lab.registry import Registry

log = logging.getLogger("resnet_lab")

OPTIMIZERS = Registry("optimizer")
NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@OPTIMIZERS.register()
def adam(params, cfg, fused):
    return optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


@OPTIMIZERS.register()
def adamw(params, cfg, fused):
    return optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, fused=fused)


@OPTIMIZERS.register()
def sgd(params, cfg, fused):
    return optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                     weight_decay=cfg.weight_decay, fused=fused)


def no_decay_names(model: nn.Module) -> List[str]:
    """The parameters weight decay should leave alone: normalisation layers' weights and every bias."""
    return [f"{module_name}.{name}".lstrip(".") for module_name, module in model.named_modules()
            for name, _ in module.named_parameters(recurse=False)
            if name == "bias" or isinstance(module, NORMS)]


def param_groups(model: nn.Module, cfg) -> List[Dict]:
    """One group; with cfg.backbone_lr_scale != 1 the backbone (all but the head: fc, or a timm
    model's classifier) apart, at lr times that scale; with cfg.bias_lr_scale != 1 the biases
    (normalisation layers' too) apart, at their rate times that; with cfg.no_decay_norm_bias the
    norm weights and biases apart, without weight decay. Backbone groups first, biases before
    weights, decayed before exempt: schedules scale each group's own rate, the last group's is
    the one logged as `lr`, and a checkpoint's groups come back in the same order."""
    exempt = set(no_decay_names(model)) if cfg.no_decay_norm_bias else set()
    scaled, biased = cfg.backbone_lr_scale != 1, cfg.bias_lr_scale != 1
    head = head_prefix(model)
    split: Dict[tuple, list] = {}
    for name, p in model.named_parameters():
        bias = biased and name.rsplit(".", 1)[-1] == "bias"
        split.setdefault((scaled and not name.startswith(head), bias, name in exempt), []).append(p)
    groups = []
    for backbone, bias, no_decay in sorted(split, key=lambda key: (not key[0], not key[1], key[2])):
        params = split[backbone, bias, no_decay]
        lr = cfg.lr * (cfg.backbone_lr_scale if backbone else 1) * (cfg.bias_lr_scale if bias else 1)
        groups.append({"params": params, **({"lr": lr} if lr != cfg.lr else {}),
                       **({"weight_decay": 0.0} if no_decay else {})})
        if len(split) > 1:
            part = "backbone" if backbone else "head" if scaled else "all"
            log.info(f"optimizer group: {len(params)} tensors ({sum(p.numel() for p in params):,} parameters), "
                     f"{part}{' biases' if bias else ''} at lr {lr}, "
                     f"weight decay {0.0 if no_decay else cfg.weight_decay}")
    return groups


def build_optimizer(model: nn.Module, cfg) -> optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch, and they take fp16's
    # loss scaling without the grad scaler reading the device each step.
    fused = next(model.parameters()).is_cuda or None
    return OPTIMIZERS.get(cfg.name)(param_groups(model, cfg), cfg, fused)


def logged_rates(optimizer: optim.Optimizer, backbone_scaled: bool) -> Dict[str, float]:
    """What an epoch's row says of the optimizer now: `lr`, the head's (the last group's, see
    param_groups) or the single rate; with a backbone rate apart also `lr_backbone` and
    `lr_head`; and the momentum (SGD) or beta1 (Adam, AdamW) in use, which a one-cycle schedule
    with sched.cycle_momentum moves."""
    head = optimizer.param_groups[-1]
    rates = {"lr": head["lr"]}
    if backbone_scaled:
        rates.update(lr_backbone=optimizer.param_groups[0]["lr"], lr_head=head["lr"])
    if "betas" in head:
        rates["beta1"] = head["betas"][0]
    else:
        rates["momentum"] = head["momentum"]
    return rates


def build_scheduler(optimizer: optim.Optimizer, cfg, steps_per_epoch: int,
                    epochs: int) -> lr_scheduler.LRScheduler:
    """cfg.name over the whole run, after cfg.warmup_epochs of linear warmup (in steps: updates)."""
    total_steps = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    main_steps = max(1, total_steps - warmup)
    if cfg.name == "onecycle":
        # OneCycleLR has its own rise; warmup_epochs, when set, sets its length.
        pct = warmup / total_steps if warmup else cfg.pct_start
        low, high = cfg.momentum_range
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                       total_steps=total_steps, pct_start=pct, cycle_momentum=cfg.cycle_momentum,
                                       base_momentum=low, max_momentum=high)
    if cfg.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=cfg.min_lr)
    elif cfg.name == "linear":
        # Warm-up then a straight line down (the CIFAR-10 speed records' schedule); min_lr is
        # the head's end (the last group's), the other groups end in proportion to their rate.
        end = cfg.min_lr / optimizer.param_groups[-1]["lr"]
        main = lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=min(end, 1.0), total_iters=main_steps)
    elif cfg.name == "step":
        at = cfg.milestone_steps or [round(m * total_steps) for m in cfg.milestones]
        milestones = sorted({max(1, s - warmup) for s in at})
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.name == "none":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise UserError(f"sched.name={cfg.name}: must be one of none, cosine, linear, step, onecycle")
    if not warmup:
        return main
    rise = lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])
