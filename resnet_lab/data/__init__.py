"""Dataset registry and the loaders that feed the training loop."""

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from resnet_lab.data.augment import build_recipe
from resnet_lab.data.loader import DeviceLoader, HostLoader, Loader, Normalizer, TensorSplit, channel_stats
from resnet_lab.data.sources import DATASETS
from resnet_lab.errors import UserError

STATS_SAMPLE = 512  # images read to estimate image_folder's normalisation


@dataclass
class Data:
    train: Loader
    test: Loader
    in_channels: int
    classes: List[str]
    # The loaders' own: its memory_format is the batches'; predict and export repeat it.
    normalizer: Normalizer
    val: Optional[Loader] = None  # held out of the training set (dataset.val_fraction)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def close(self) -> None:
        for loader in (self.train, self.test, self.val):
            if loader is not None:
                loader.close()


def labels_of(split) -> torch.Tensor:
    """The labels of a TensorSplit, an image_folder FileSplit or a Subset of one, without
    reading images."""
    if isinstance(split, TensorSplit):
        return split.labels
    if isinstance(split, torch.utils.data.Subset):
        return labels_of(split.dataset)[torch.as_tensor(split.indices)]
    return torch.as_tensor([label for _, label in split.samples])


def stratified_split(labels: torch.Tensor, fraction: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices: round(fraction * n) of each class's n images go to val, drawn with
    a fixed seed so that every run, whatever its seed, holds out the same images."""
    gen = torch.Generator().manual_seed(0)
    val = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        val.append(members[:round(fraction * len(members))])
    val = torch.cat(val).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[val] = False
    return keep.nonzero().flatten(), val


def subset(split, indices: torch.Tensor):
    if isinstance(split, TensorSplit):
        files = split.files and [split.files[i] for i in indices.tolist()]
        return TensorSplit(split.images[indices], split.labels[indices], files)
    return torch.utils.data.Subset(split, indices.tolist())


def build_data(cfg, trainer, device: torch.device, seed: int, rank: int = 0, world_size: int = 1) -> Data:
    """Read the dataset named by cfg.name and wrap its splits in loaders for `device`, each
    giving this rank its part of every batch (config.validate has checked that the batch
    divides among the ranks)."""
    train, test, classes = DATASETS.get(cfg.name)(cfg)
    val = None
    if cfg.val_fraction:
        train_idx, val_idx = stratified_split(labels_of(train), cfg.val_fraction)
        if not len(val_idx):
            raise UserError(f"dataset.val_fraction={cfg.val_fraction}: holds out no image of the {len(train)} "
                            f"training images of dataset {cfg.name}; raise it")
        train, val = subset(train, train_idx), subset(train, val_idx)
    if isinstance(train, TensorSplit) and cfg.name != "image_folder":
        stats_images = train.images
    else:
        # A fixed sample, read from the files or from image_folder's decoded cache alike: either
        # way a run normalises by the same numbers (a resumed run may switch dataset.cache).
        sample = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:STATS_SAMPLE]
        stats_images = (train.images[sample] if isinstance(train, TensorSplit)
                        else torch.stack([train[i][0] for i in sample.tolist()]))
    if trainer.batch_size > len(train):
        raise UserError(f"trainer.batch_size={trainer.batch_size}: larger than the {len(train)} "
                        f"training images of dataset {cfg.name}")
    mean, std = channel_stats(stats_images)
    normalizer = Normalizer(mean, std, device, pad=0 if cfg.augment == "flip" else cfg.crop_padding)
    if isinstance(train, TensorSplit):
        make = DeviceLoader
    else:
        make = functools.partial(HostLoader, num_workers=cfg.num_workers)
    shard = {"rank": rank, "world_size": world_size}

    def evaluation(split) -> Loader:
        return make(split, trainer.eval_batch_size, normalizer, shuffle=False, seed=seed,
                    limit=trainer.limit_eval_batches, **shard)

    return Data(
        train=make(train, trainer.batch_size, normalizer, shuffle=True, seed=seed,
                   augment=cfg.augment != "none", limit=trainer.limit_train_batches,
                   recipe=build_recipe(cfg, len(classes)), sizes=cfg.train_sizes, **shard),
        test=evaluation(test),
        in_channels=stats_images.shape[1],
        classes=classes,
        normalizer=normalizer,
        val=None if val is None else evaluation(val),
    )


__all__ = ["DATASETS", "Data", "build_data", "labels_of", "stratified_split"]
