"""Typed schemas of the composed config, registered in Hydra's ConfigStore, and their checks.

OmegaConf checks types and key names while Hydra composes; `validate` checks what types cannot
say (ranges, choices, cross-field rules) before anything is built.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional, get_args

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from resnet_lab.errors import UserError, closest


@dataclass
class ModelConfig:
    # Architecture knobs left at None take the named variant's own value; README.md's Models
    # section says what each means, resnet_lab/models/__init__.py checks their values.
    name: str = MISSING
    width: Optional[int] = None
    widen: Optional[int] = None
    layers: Optional[List[int]] = None
    block: Optional[str] = None
    stem: Optional[str] = None
    shortcut: Optional[str] = None
    groups: Optional[int] = None
    width_per_group: Optional[int] = None
    dropout: Optional[float] = None
    zero_init_residual: Optional[bool] = None


@dataclass
class DatasetConfig:
    name: str = MISSING
    root: str = "data"
    download: bool = True
    augment: str = "none"
    # synthetic: the shape and size of the random data.
    channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    train_size: int = 512
    test_size: int = 128
    # image_folder: optional square resize, and loader workers.
    resize: Optional[int] = None
    num_workers: int = 2


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class SchedConfig:
    name: str = "none"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0
    # step: lr *= gamma at each milestone, given as fractions of the whole training.
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])
    gamma: float = 0.1
    # onecycle: the fraction of training spent rising (warmup_epochs, if set, wins).
    pct_start: float = 0.3


@dataclass
class DeviceConfig:
    type: str = "auto"
    # None: the measured default for the device the run lands on (see resnet_lab.device).
    precision: Optional[str] = None
    channels_last: Optional[bool] = None
    compile: bool = False
    compile_mode: str = "default"
    # Local ranks this run spawns for DDP (device=cuda: GPUs 0..N-1); torchrun and SLURM set
    # their own ranks instead.
    world_size: int = 1
    # Batch norm statistics over the global batch rather than each rank's part (CUDA only).
    sync_bn: bool = False


@dataclass
class TrainerConfig:
    epochs: int = 2
    batch_size: int = 256
    eval_batch_size: int = 1024
    # 0 means every batch; a positive number cuts each epoch short (smoke runs).
    limit_train_batches: int = 0
    limit_eval_batches: int = 0
    deterministic: bool = False
    progress: bool = True
    save_weights: bool = True
    # auto: continue from the run folder's checkpoints/last.pt if it has one; none: start
    # fresh; anything else: the path of a checkpoint to continue from.
    resume: str = "auto"
    # Also write checkpoints/last.pt every this many training steps (0: only at epoch ends).
    checkpoint_every_steps: int = 0


@dataclass
class LoggerConfig:
    name: str = "none"
    # auto: online when a W&B API key is configured (WANDB_MODE, when set, decides), else offline.
    mode: str = "auto"
    project: str = "resnet_lab"
    entity: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    # The training loss is read from the device (a sync) only every this many steps.
    log_every_steps: int = 50
    log_weights: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0


def register_configs() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


CHOICES = {
    "dataset.augment": ("none", "flip_crop"),
    "sched.name": ("none", "cosine", "step", "onecycle"),
    "device.type": ("auto", "cpu", "cuda", "mps"),
    "device.precision": (None, "fp32", "bf16", "fp16"),
    "device.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
}

# key: (smallest allowed, whether the bound itself is allowed)
BOUNDS = {
    "optim.lr": (0, False),
    "optim.weight_decay": (0, True),
    "optim.momentum": (0, True),
    "sched.warmup_epochs": (0, True),
    "sched.min_lr": (0, True),
    "device.world_size": (1, True),
    "trainer.epochs": (1, True),
    "trainer.batch_size": (1, True),
    "trainer.eval_batch_size": (1, True),
    "trainer.limit_train_batches": (0, True),
    "trainer.limit_eval_batches": (0, True),
    "trainer.checkpoint_every_steps": (0, True),
    "model.width": (1, True),
    "dataset.channels": (1, True),
    "dataset.image_size": (1, True),
    "dataset.num_classes": (2, True),
    "dataset.train_size": (1, True),
    "dataset.test_size": (1, True),
    "dataset.num_workers": (0, True),
    "logger.log_every_steps": (1, True),
}


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _has_float(annotation) -> bool:
    return annotation is float or any(map(_has_float, get_args(annotation)))


def _float_keys(schema=None, prefix: str = "") -> List[str]:
    """The keys the schema types as floats (alone, optional or in lists)."""
    keys = []
    for f in fields(schema or Config):
        if is_dataclass(f.type):
            keys += _float_keys(f.type, f"{prefix}{f.name}.")
        elif _has_float(f.type):
            keys.append(prefix + f.name)
    return keys


def validate(cfg: Any) -> None:
    """Raise UserError naming the key, the bad value and what is allowed."""
    for key in _float_keys():
        value = _get(cfg, key)
        if value is not None and not all(map(math.isfinite, value if isinstance(value, Sequence) else [value])):
            raise UserError(f"{key}={value}: must be a finite number")
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"{key}={value}: must be one of {shown}{closest(value, allowed)}")
    for key, (low, inclusive) in BOUNDS.items():
        value = _get(cfg, key)
        if value is None:
            continue
        if value < low or (value == low and not inclusive):
            rule = f">= {low}" if inclusive else f"> {low}"
            raise UserError(f"{key}={value}: must be {rule}")
    if cfg.sched.warmup_epochs >= cfg.trainer.epochs and cfg.sched.warmup_epochs > 0:
        raise UserError(
            f"sched.warmup_epochs={cfg.sched.warmup_epochs}: must be shorter than "
            f"trainer.epochs={cfg.trainer.epochs}"
        )
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        raise UserError("optim.nesterov=true: needs optim=sgd with optim.momentum > 0")
    if not all(0 < m < 1 for m in cfg.sched.milestones):
        raise UserError(f"sched.milestones={list(cfg.sched.milestones)}: each must be a fraction in (0, 1)")
