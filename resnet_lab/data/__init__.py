"""Dataset registry and the loaders that feed the training loop."""

import functools
from dataclasses import dataclass
from typing import List

import torch

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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def close(self) -> None:
        self.train.close()
        self.test.close()


def build_data(cfg, trainer, device: torch.device, seed: int, rank: int = 0, world_size: int = 1) -> Data:
    """Read the dataset named by cfg.name and wrap its splits in loaders for `device`, each
    giving this rank its part of every batch (config.validate has checked that the batch
    divides among the ranks)."""
    train, test, classes = DATASETS.get(cfg.name)(cfg)
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
    normalizer = Normalizer(mean, std, device)
    if isinstance(train, TensorSplit):
        make = DeviceLoader
    else:
        make = functools.partial(HostLoader, num_workers=cfg.num_workers)
    shard = {"rank": rank, "world_size": world_size}
    return Data(
        train=make(train, trainer.batch_size, normalizer, shuffle=True, seed=seed,
                   augment=cfg.augment != "none", limit=trainer.limit_train_batches, **shard),
        test=make(test, trainer.eval_batch_size, normalizer, shuffle=False, seed=seed,
                  limit=trainer.limit_eval_batches, **shard),
        in_channels=stats_images.shape[1],
        classes=classes,
        normalizer=normalizer,
    )


__all__ = ["DATASETS", "Data", "build_data"]
