"""A trained run, loaded again for `evaluate`, `predict` and `export`: its config (with the
command's overrides), its data, and its model with the chosen weights, in eval mode.

The config is the one the run trained with (its .hydra/config.yaml), not composed again from
the packaged options, which a run made with --config-dir lacks and an edited preset would
change. The command's overrides apply to it as to any Hydra config: `dataset.root=...` changes
one key, `dataset=cifar10 dataset.root=...` replaces the run's dataset by the packaged option
(another data set, which must have the run's classes).
"""

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from resnet_lab import device as device_setup
from resnet_lab import rundir
from resnet_lab.config import DATASET_KINDS, EXTERNAL_MODELS, DatasetConfig, ResNetConfig, register_configs, validate
from resnet_lab.data import Data, build_data
from resnet_lab.errors import UserError, describe
from resnet_lab.models import build_model, source, weights
from resnet_lab.training import checkpoint

# The last checkpoint's weights, the best epoch's (best.pt), the EMA's at the last checkpoint
# (ema.pt); or the path of a weights file.
CHECKPOINTS = {"last": rundir.LAST, "best": rundir.BEST, "ema": rundir.EMA}
WHY_ABSENT = {"last": "the run has written no checkpoint yet: train it to the end of an epoch",
              "best": "the run chooses no best epoch without a validation split (dataset.val_fraction)",
              "ema": "the run kept no EMA of its weights (ema.decay)"}


@dataclass
class Trained:
    run_dir: Path
    cfg: DictConfig
    runtime: device_setup.Runtime
    data: Data
    model: torch.nn.Module  # the bare model, on the device, in eval mode
    weights: Path  # the file its weights came from


def split_args(args: Sequence[str], options: Dict[str, str]) -> Tuple[Dict[str, str], List[str]]:
    """key=value words: the command's own `options` (with their defaults) and the config overrides."""
    own, overrides = dict(options), []
    for arg in args:
        key, sep, value = arg.partition("=")
        if key in options and sep:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def run_config(run_dir: Path, overrides: Sequence[str]) -> DictConfig:
    """The config the run trained with, then the given overrides.

    Hydra composes it, so that overrides mean what they mean for training: the run's own groups
    are stored as options named RUN of their groups (the defaults list picks them), its other
    keys are the primary config's."""
    record = run_dir / rundir.HYDRA_RECORD / "config.yaml"
    if not record.is_file():
        raise UserError(f"{run_dir}: not a run folder (no {rundir.HYDRA_RECORD}/config.yaml); give the "
                        f"folder a training run wrote, e.g. outputs/runs/<date>/<time>")
    saved = OmegaConf.to_container(OmegaConf.load(record))
    register_configs()
    store = ConfigStore.instance()
    for group in GROUPS:
        store.store(group=group, name=RUN, node=_typed(group, saved.pop(group)))
    store.store(name=RUN, node={"defaults": ["schema", "_self_", *({group: RUN} for group in GROUPS)], **saved})
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        cfg = compose(RUN, overrides=list(overrides))
    validate(cfg)
    return cfg


# The config groups of conf/config.yaml's defaults list that hold keys of their own (the others
# are presets that set keys of these), and the name the run's own option of each is stored under.
GROUPS = ("model", "dataset", "optim", "sched", "device", "logger")
RUN = "trained_run"


def _typed(group: str, node: dict):
    """A model or dataset under the schema of its kind, which the option it came from had named:
    a model's by what builds it (models.source; timm's and a class's keyword arguments, added
    with +model.*, kept), a dataset's the first with all its keys (the common one for a dataset
    of one's own that adds none). The other groups' schemas are the Config's own."""
    if group == "model":
        kinds = {"resnet_lab": ResNetConfig, **EXTERNAL_MODELS}
        typed = OmegaConf.structured(kinds[source(node)])
        OmegaConf.set_struct(typed, False)
        return OmegaConf.merge(typed, node)
    if group != "dataset":
        return node
    kind = next(schema for schema in (DatasetConfig, *DATASET_KINDS.values())
                if set(node) <= {f.name for f in fields(schema)})
    return OmegaConf.merge(OmegaConf.structured(kind), node)


def weights_file(run_dir: Path, choice: str) -> Path:
    """checkpoint=last, best, ema (CHECKPOINTS) or a path."""
    if choice not in CHECKPOINTS:
        return weights.find(Path(choice))
    path = run_dir / rundir.CHECKPOINTS / CHECKPOINTS[choice]
    there = [name for name, file in CHECKPOINTS.items() if name != choice and (path.parent / file).is_file()]
    instead = ", ".join(f"checkpoint={name}" for name in there) + (" or " if there else "")
    if not path.is_file():
        raise UserError(f"{run_dir}: no {rundir.CHECKPOINTS}/{path.name} ({WHY_ABSENT[choice]}); "
                        f"give {instead}checkpoint=<path>")
    if choice != "last":
        return path
    try:
        # As a resume does: a last.pt that fails its check gives way to the checkpoint kept before it.
        return checkpoint.load_good(path, use="using")[1]
    except checkpoint.Damaged as damaged:
        raise UserError(f"{damaged.reason}; give {instead}checkpoint=<path>") from None


def load(run_dir: Path, choice: str, overrides: Sequence[str]) -> Trained:
    run_dir = Path(run_dir)
    cfg = run_config(run_dir, overrides)
    path = weights_file(run_dir, choice)
    runtime = device_setup.resolve(cfg.device)
    data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed)
    saved_classes = _saved_classes(run_dir)
    if saved_classes is not None and data.classes != saved_classes:
        raise UserError(f"dataset {cfg.dataset.name}: its classes {_short(data.classes)} are not the run's "
                        f"{_short(saved_classes)}; give a data set with the run's classes, in its order")
    model = build_model(cfg.model, data.in_channels, data.num_classes)
    weights.load(model, path)
    model = runtime.prepare(model).eval()
    data.normalizer.memory_format = runtime.memory_format  # as the trainer sets it
    return Trained(run_dir, cfg, runtime, data, model, path)


def sample_images(data: Data, n: int) -> torch.Tensor:
    """The first n test images as the model's input before normalisation: uint8 N x C x H x W."""
    loader = data.test
    if hasattr(loader, "images"):  # on the device already
        return loader.images[:n].cpu()
    return torch.stack([loader.dataset[i][0] for i in range(min(n, loader.num_samples))])


def _short(classes: List[str]) -> str:
    return "[" + ", ".join(classes[:5]) + (f", ... ({len(classes)} in all)" if len(classes) > 5 else "") + "]"


def _saved_classes(run_dir: Path) -> Optional[List[str]]:
    """The class names the run trained with: its last good checkpoint's (last.pt, else
    previous.pt), or its final report's (a checkpoint from before they were kept there); None
    where neither has them."""
    for path in (rundir.last(run_dir), rundir.last(run_dir).with_name(rundir.PREVIOUS)):
        try:
            classes = checkpoint.load(path).get("classes") if path.is_file() else None
        except checkpoint.Damaged:  # best.pt can be evaluated without it
            continue
        if classes is not None:
            return classes
    final = run_dir / rundir.EVAL / rundir.FINAL
    return json.loads(final.read_text())["classes"] if final.is_file() else None


def main(command) -> None:
    """Run a command's main with the project's one-line errors: exit 2 and `error: ...`; 130 for
    Ctrl-C, as a shell reports a command that SIGINT ended."""
    try:
        command(sys.argv[1:])
    except KeyboardInterrupt:
        print("error: interrupted; no file was left half-written (each is written whole or not at all)",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        message = describe(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
