"""Optimizer registry and learning-rate schedules (stepped once per training step)."""

from torch import nn, optim
from torch.optim import lr_scheduler

from resnet_lab.errors import UserError
from resnet_lab.registry import Registry

OPTIMIZERS = Registry("optimizer")


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


def build_optimizer(model: nn.Module, cfg) -> optim.Optimizer:
    # On CUDA the fused kernels update every parameter in one launch, and they take fp16's
    # loss scaling without the grad scaler reading the device each step.
    fused = next(model.parameters()).is_cuda or None
    params = model.parameters()
    if cfg.backbone_lr_scale != 1:
        # Two groups, the backbone's first: schedules scale each group's own rate.
        head = {id(p) for p in model.fc.parameters()}
        params = [{"params": [p for p in model.parameters() if id(p) not in head],
                   "lr": cfg.lr * cfg.backbone_lr_scale},
                  {"params": list(model.fc.parameters())}]
    return OPTIMIZERS.get(cfg.name)(params, cfg, fused)


def build_scheduler(optimizer: optim.Optimizer, cfg, steps_per_epoch: int,
                    epochs: int) -> lr_scheduler.LRScheduler:
    """cfg.name over the whole run, after cfg.warmup_epochs of linear warmup (in steps)."""
    total_steps = steps_per_epoch * epochs
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    main_steps = max(1, total_steps - warmup)
    if cfg.name == "onecycle":
        # OneCycleLR has its own rise; warmup_epochs, when set, sets its length.
        pct = warmup / total_steps if warmup else cfg.pct_start
        return lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                       total_steps=total_steps, pct_start=pct)
    if cfg.name == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=cfg.min_lr)
    elif cfg.name == "step":
        milestones = sorted({max(1, round(m * total_steps) - warmup) for m in cfg.milestones})
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.name == "none":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise UserError(f"sched.name={cfg.name}: must be one of none, cosine, step, onecycle")
    if not warmup:
        return main
    rise = lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [rise, main], milestones=[warmup])
