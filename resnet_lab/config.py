"""Typed schemas of the composed config, registered in Hydra's ConfigStore, and their checks.

OmegaConf checks types and key names while Hydra composes; `validate` checks what types cannot
say (ranges, choices, cross-field rules) before anything is read or built.
"""

import math
from dataclasses import asdict, dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from resnet_lab.errors import UserError, closest
from resnet_lab.models import MODELS, Architecture, check_config as check_model


@dataclass
class ModelConfig:
    """What every option of the model group has; each kind's schema adds its own keys."""

    name: str = MISSING
    # Start from these weights rather than at random: a state dict file (torchvision's or timm's
    # names, .safetensors too), a run's model.pt, checkpoints/best.pt or checkpoints/ema.pt, or a
    # run folder (resnet_lab.models.weights).
    init: Optional[str] = None


@dataclass
class ResNetConfig(ModelConfig, Architecture):
    # Each resnet_lab variant is an option of the model group, its architecture (models/resnet.py)
    # stored by register_configs; a model.* override changes one knob of it.
    pass


@dataclass
class TimmModelConfig(ModelConfig):
    """model=timm: model.name is any timm model (models/external.py); keys added to model
    (+model.drop_path_rate=0.1) are timm.create_model's keyword arguments."""


@dataclass
class TargetModelConfig(ModelConfig):
    """model=target: the nn.Module class at model._target_; keys added to model (+model.depth=3)
    are its keyword arguments."""

    _target_: str = MISSING
    name: str = "${._target_}"


@dataclass
class DatasetConfig:
    """What every kind of dataset has; each kind's schema adds its own keys (conf/dataset/*.yaml
    name theirs in their defaults list)."""

    name: str = MISSING
    # flip: a horizontal flip with probability 1/2; flip_crop: then a random crop of the image
    # padded by crop_padding zero pixels each side (a translation by up to that many pixels).
    augment: str = "none"
    crop_padding: int = 4
    # Progressive resizing: the training images' side in epochs 1, 2, ... (squares, resized on
    # the device after augmentation); the epochs after the list train at the data's own size.
    train_sizes: List[int] = field(default_factory=list)
    # The share of the training set held out, stratified by class and the same in every run,
    # to choose settings on instead of the test set (0: none).
    val_fraction: float = 0.0
    # Training batches only, on the device (docs/recipes.md): TrivialAugmentWide or RandAugment
    # per image, a vertical flip (p = 1/2) and a rotation by up to `rotate` degrees per image,
    # random erasing of each image with probability erase_prob, Mixup / CutMix of batches.
    auto_augment: str = "none"
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    vflip: bool = False
    rotate: float = 0.0
    erase_prob: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # the probability a batch is mixed (with either alpha > 0)
    switch_prob: float = 0.5  # with both alphas > 0, the probability of CutMix rather than Mixup


@dataclass
class TorchvisionDatasetConfig(DatasetConfig):
    """fashion_mnist, mnist, kmnist (IDX files), cifar10, cifar100 (pickles): torchvision's files."""

    root: str = "data"
    download: bool = True


@dataclass
class SyntheticDatasetConfig(DatasetConfig):
    """Random images and labels: their shape and number."""

    channels: int = 3
    image_size: int = 32
    num_classes: int = 10
    train_size: int = 512
    test_size: int = 128


@dataclass
class ImageFolderConfig(DatasetConfig):
    """Your own images under root; an optional square resize, loader workers, and the decoded
    cache (resnet_lab/data/cache.py)."""

    root: str = MISSING
    resize: Optional[int] = None
    num_workers: int = 2
    # auto: decode once into the cache when the decoded images fit cache_max_gb; true; false.
    # A string: `true` and `false` arrive as "True" and "False", which validate accepts too.
    cache: str = "auto"
    # None: <root>/.resnet_lab_cache, or the user's cache folder where root is not writable.
    cache_dir: Optional[str] = None
    cache_max_gb: float = 4.0


DATASET_KINDS = {"torchvision": TorchvisionDatasetConfig, "synthetic": SyntheticDatasetConfig,
                 "image_folder": ImageFolderConfig}


@dataclass
class OptimConfig:
    name: str = MISSING
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    # The learning rate of everything but the head (fc) is lr times this: < 1 fine-tunes
    # pretrained layers more gently than the new head.
    backbone_lr_scale: float = 1.0
    # The learning rate of every bias, batch norms' too, is its group's times this (the CIFAR-10
    # speed records train their batch-norm biases at a far larger rate than the weights).
    bias_lr_scale: float = 1.0
    # Batch-norm weights and every bias in a group without weight decay.
    no_decay_norm_bias: bool = False
    # Scale the gradients down to this global L2 norm before each update (0: no clipping).
    clip_grad_norm: float = 0.0


@dataclass
class SchedConfig:
    name: str = "none"
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr: float = 0.0
    # step: lr *= gamma at each milestone, given as fractions of the whole training.
    milestones: List[float] = field(default_factory=lambda: [0.5, 0.75])
    # step: the updates to multiply at instead, as papers give them (32k and 48k iterations).
    milestone_steps: List[int] = field(default_factory=list)
    gamma: float = 0.1
    # onecycle: the fraction of training spent rising (warmup_epochs, if set, wins).
    pct_start: float = 0.3
    # onecycle: also cycle the optimizer's momentum (SGD) or beta1 (Adam, AdamW) against the lr,
    # from momentum_range's high end at the start and end to its low end at the peak
    # (OneCycleLR's cycle_momentum); false: they stay optim.momentum and optim.betas[0].
    cycle_momentum: bool = False
    momentum_range: List[float] = field(default_factory=lambda: [0.85, 0.95])


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
    # One update from the gradients of this many batches of batch_size: the update of a
    # batch this many times larger.
    accumulate: int = 1
    # The metric a run is judged by. With a validation split (auto: val_acc) the run chooses its
    # best epoch on it: best.pt, the value it returns to a sweeper, and every "best" in its
    # records are that epoch's. Without one (auto: test_acc) it chooses no epoch: it returns the
    # last epoch's test accuracy and writes no best.pt. Naming a test metric here chooses the
    # best epoch on the test split, with a warning: that accuracy is then an optimistic estimate.
    objective: str = "auto"
    # Evaluate each image and its mirror image, and average their logits (test-time augmentation).
    tta: bool = False
    # Also evaluate each image (and with tta its mirror) shifted this many pixels both ways
    # diagonally, and average: half the weight on the unshifted views, half on the shifted.
    tta_shift: int = 0


@dataclass
class LossConfig:
    # Cross-entropy against (1 - s) * the label + s / classes everywhere (Szegedy et al. 2016).
    label_smoothing: float = 0.0


@dataclass
class EmaConfig:
    # An exponential moving average of the weights, evaluated beside them (0: none): after each
    # update, ema = decay * ema + (1 - decay) * weights.
    decay: float = 0.0
    # Early updates average with min(decay, (1 + n) / (10 + n)) after n updates, so the
    # average forgets its random start quickly (TensorFlow's num_updates rule).
    warmup: bool = False


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
class SearchConfig:
    # Set by the Optuna search (resnet_lab.sweeps.search) on each of its trials, so that the run
    # reports its objective to the study after every epoch and stops when the pruner says so.
    storage: Optional[str] = None  # the study's storage (resnet_lab.studies)
    study: Optional[str] = None
    trial: Optional[int] = None  # the trial's number in the study


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    seed: int = 0


def model_config(name: str) -> ResNetConfig:
    """The model group's option `name`: the variant's architecture."""
    return ResNetConfig(name=name, **asdict(MODELS.get(name).architecture))


# The model group's options beside resnet_lab's variants: models built elsewhere.
EXTERNAL_MODELS = {"timm": TimmModelConfig, "target": TargetModelConfig}


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="schema", node=Config)
    # Each dataset kind's schema, under the dataset options' defaults: root configs rather than
    # a group, so that --help, which lists groups, lists only the groups a user picks from.
    for kind, schema in DATASET_KINDS.items():
        store.store(name=f"schema_dataset_{kind}", node=schema)
    for name in MODELS.names():
        store.store(group="model", name=name, node=model_config(name))
    for name, schema in EXTERNAL_MODELS.items():
        store.store(group="model", name=name, node=schema)


CHOICES = {
    "dataset.augment": ("none", "flip", "flip_crop"),
    "sched.name": ("none", "cosine", "linear", "step", "onecycle"),
    "device.type": ("auto", "cpu", "cuda", "mps"),
    "device.precision": (None, "fp32", "bf16", "fp16"),
    "device.compile_mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "logger.name": ("none", "wandb"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "trainer.objective": ("auto", "val_acc", "test_acc", "val_acc_ema", "test_acc_ema"),
    "dataset.auto_augment": ("none", "trivial", "randaugment"),
}

# key: (smallest allowed, whether the bound itself is allowed)
BOUNDS = {
    "optim.lr": (0, False),
    "optim.weight_decay": (0, True),
    "optim.momentum": (0, True),
    "optim.backbone_lr_scale": (0, True),
    "optim.bias_lr_scale": (0, True),
    "sched.warmup_epochs": (0, True),
    "sched.min_lr": (0, True),
    "sched.gamma": (0, False),  # above 1 is allowed (a warm restart by hand); 0 or below is not a rate
    "seed": (0, True),
    "device.world_size": (1, True),
    "trainer.epochs": (1, True),
    "trainer.batch_size": (1, True),
    "trainer.eval_batch_size": (1, True),
    "trainer.limit_train_batches": (0, True),
    "trainer.limit_eval_batches": (0, True),
    "trainer.checkpoint_every_steps": (0, True),
    "trainer.accumulate": (1, True),
    "trainer.tta_shift": (0, True),
    "dataset.crop_padding": (1, True),
    "dataset.randaugment_ops": (1, True),
    "dataset.randaugment_magnitude": (0, True),
    "dataset.rotate": (0, True),
    "dataset.mixup_alpha": (0, True),
    "dataset.cutmix_alpha": (0, True),
    "optim.clip_grad_norm": (0, True),
    "dataset.channels": (1, True),
    "dataset.image_size": (1, True),
    "dataset.num_classes": (2, True),
    "dataset.train_size": (1, True),
    "dataset.test_size": (1, True),
    "dataset.num_workers": (0, True),
    "dataset.cache_max_gb": (0, True),
    "logger.log_every_steps": (1, True),
    "search.trial": (0, True),
}

# Fractions and probabilities, from 0: key -> whether 1 itself is allowed.
UNIT_RANGE = {
    "dataset.val_fraction": False,
    "loss.label_smoothing": False,
    "ema.decay": False,
    "dataset.erase_prob": True,
    "dataset.mix_prob": True,
    "dataset.switch_prob": True,
    "sched.pct_start": False,
}
SEEDS = 2 ** 32  # numpy's seeds are below this


def _floats(node: Any, prefix: str = ""):
    """(key, value) for every float in the config, alone or in a list."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{prefix}{key}" if isinstance(node, dict) else prefix.rstrip(".")
        if isinstance(value, float):
            yield path, value
        else:
            yield from _floats(value, f"{path}.")


def _check_finite(cfg: Any) -> None:
    for key, value in _floats(OmegaConf.to_container(cfg, resolve=True)):
        if not math.isfinite(value):
            raise UserError(f"{key}={OmegaConf.select(cfg, key)}: must be a finite number")


def _check_table(cfg: Any) -> None:
    """CHOICES and BOUNDS, for the keys this config has (each kind of dataset has its own)."""
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"{key}={value}: must be one of {shown}{closest(value, allowed)}")
    for key, (low, inclusive) in BOUNDS.items():
        value = OmegaConf.select(cfg, key)
        if value is None:
            continue
        if value < low or (value == low and not inclusive):
            rule = f">= {low}" if inclusive else f"> {low}"
            raise UserError(f"{key}={value}: must be {rule}")
    for key, one_allowed in UNIT_RANGE.items():
        value = OmegaConf.select(cfg, key)
        if value is not None and not (0 <= value <= 1 and (one_allowed or value < 1)):
            raise UserError(f"{key}={value}: must be in [0, 1{']' if one_allowed else ')'}")


def _check_cycle_momentum(sched: Any) -> None:
    low_high = list(sched.momentum_range)
    if len(low_high) != 2 or not 0 <= low_high[0] <= low_high[1] < 1:
        raise UserError(f"sched.momentum_range={low_high}: must be [low, high] with 0 <= low <= high < 1")
    if sched.cycle_momentum and sched.name != "onecycle":
        raise UserError(f"sched.cycle_momentum=true: only sched=onecycle cycles the momentum (this run has "
                        f"sched={sched.name}); set sched.cycle_momentum=false")


def _check_objective(cfg: Any) -> None:
    """trainer.objective names a metric the run reports."""
    objective = cfg.trainer.objective
    if objective.startswith("val") and not cfg.dataset.val_fraction:
        raise UserError(f"trainer.objective={objective}: needs a validation split; set dataset.val_fraction "
                        f"(e.g. 0.1), or trainer.objective=test_acc")
    if objective.endswith("_ema") and not cfg.ema.decay:
        raise UserError(f"trainer.objective={objective}: needs an EMA of the weights; set ema.decay (e.g. 0.999)")


def objective(cfg: Any) -> str:
    """The metric the run is judged by (also of a config saved before the keys existed: test_acc)."""
    chosen = OmegaConf.select(cfg, "trainer.objective", default="auto")
    if chosen == "auto":
        return "val_acc" if OmegaConf.select(cfg, "dataset.val_fraction", default=0.0) else "test_acc"
    return chosen


def chooses_best(cfg: Any) -> bool:
    """Whether the run chooses a best epoch by its objective (trainer.objective says when)."""
    return objective(cfg).startswith("val") or OmegaConf.select(cfg, "trainer.objective", default="auto") != "auto"


def returned(cfg: Any, best_acc: float, metrics: dict) -> float:
    """What a run returns to its sweeper: its objective at the epoch it is judged by."""
    return best_acc if chooses_best(cfg) else metrics[objective(cfg)]


def chosen_epoch(rows: List[dict], key: str, best: bool) -> Optional[dict]:
    """The metrics row a run is judged by: the first epoch with the highest `key` when it chooses
    a best epoch, else the last; None before its first epoch."""
    if not rows:
        return None
    return max(rows, key=lambda row: row.get(key, -math.inf)) if best else rows[-1]


def _check_search(cfg: Any) -> None:
    """A trial of a search names all three of its keys (the search sets them), or none."""
    keys = {key: OmegaConf.select(cfg, f"search.{key}") for key in ("storage", "study", "trial")}
    if any(v is not None for v in keys.values()) and any(v is None for v in keys.values()):
        unset = ", ".join(f"search.{k}" for k, v in keys.items() if v is None)
        raise UserError(f"{unset}: unset, while the other search.* keys are set; the Optuna search sets all "
                        f"three for each of its trials (hparams_search=optuna), leave them to it")


CACHE_MODES = ("auto", "true", "false")


def _check_cache(cfg: Any) -> None:
    value = OmegaConf.select(cfg, "dataset.cache")
    if value is not None and str(value).lower() not in CACHE_MODES:
        raise UserError(f"dataset.cache={value}: must be one of {', '.join(CACHE_MODES)}"
                        f"{closest(str(value).lower(), CACHE_MODES)}")


def validate(cfg: Any, world_size: int = 1) -> None:
    """Every check of the config's values, before any data is read: a UserError naming the key,
    the bad value and what is allowed. Types and key names are OmegaConf's (while Hydra
    composes); the model's knobs are checked by models.check; what depends on the machine
    (device.resolve) or on the data (build_data: the batch against the dataset's size) where
    those are known. `world_size`: the ranks this run trains on."""
    _check_finite(cfg)
    _check_table(cfg)
    _check_cache(cfg)
    check_model(cfg.model)
    if cfg.sched.warmup_epochs >= cfg.trainer.epochs and cfg.sched.warmup_epochs > 0:
        raise UserError(
            f"sched.warmup_epochs={cfg.sched.warmup_epochs}: must be shorter than "
            f"trainer.epochs={cfg.trainer.epochs}"
        )
    if cfg.seed >= SEEDS:
        raise UserError(f"seed={cfg.seed}: must be < {SEEDS} (2**32, the seeds numpy takes)")
    if not 0 < cfg.sched.warmup_start_factor <= 1:
        raise UserError(f"sched.warmup_start_factor={cfg.sched.warmup_start_factor}: must be in (0, 1] "
                        f"(the warmup's first rate, as a fraction of optim.lr)")
    if cfg.sched.pct_start == 0:
        raise UserError("sched.pct_start=0.0: must be in (0, 1) (the share of training spent rising)")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise UserError(f"optim.betas={betas}: must be two numbers in [0, 1) (the decay rates of Adam's "
                        f"gradient and squared-gradient averages, e.g. [0.9,0.999])")
    if cfg.optim.nesterov and (cfg.optim.name != "sgd" or cfg.optim.momentum <= 0):
        raise UserError("optim.nesterov=true: needs optim=sgd with optim.momentum > 0")
    if not all(s >= 1 for s in cfg.sched.milestone_steps):
        raise UserError(f"sched.milestone_steps={list(cfg.sched.milestone_steps)}: each must be an update >= 1")
    _check_cycle_momentum(cfg.sched)
    if not all(0 < m < 1 for m in cfg.sched.milestones):
        raise UserError(f"sched.milestones={list(cfg.sched.milestones)}: each must be a fraction in (0, 1)")
    _check_objective(cfg)
    _check_search(cfg)
    if not all(s >= 1 for s in cfg.dataset.train_sizes):
        raise UserError(f"dataset.train_sizes={list(cfg.dataset.train_sizes)}: each must be an image side >= 1 pixel")
    if cfg.dataset.randaugment_magnitude > 30:
        raise UserError(f"dataset.randaugment_magnitude={cfg.dataset.randaugment_magnitude}: must be in 0..30 "
                        f"(of torchvision's 31 magnitude bins)")
    if cfg.trainer.batch_size % world_size:
        raise UserError(f"trainer.batch_size={cfg.trainer.batch_size}: the global batch must divide by the "
                        f"world size {world_size} (device.world_size, or the ranks of torchrun or SLURM); "
                        f"use a multiple of {world_size}")
