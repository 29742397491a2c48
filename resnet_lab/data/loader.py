"""Batches on the training device: uint8 images in, normalised (and augmented) float batches out.

Every batch is a pure function of (seed, epoch, batch index), so a run resumed mid-epoch sees
exactly the batches an uninterrupted run would have seen. With several ranks, batch i is the same
global batch as for one rank, and rank r takes its contiguous part of it: N ranks see what one
would, and each batch stays a pure function of (seed, epoch, batch index, rank).
"""

import atexit
import signal
import weakref
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from resnet_lab.errors import UserError
from resnet_lab.preemption import SIGNALS

Batch = Tuple[torch.Tensor, torch.Tensor]
PAD = 4  # the standard CIFAR recipe: 4-pixel zero padding, random 32x32 crop, random flip


@dataclass
class TensorSplit:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    files: Optional[List[str]] = None  # the image files they were decoded from (image_folder's cache)

    def __len__(self) -> int:
        return len(self.labels)


def batch_seed(seed: int, epoch: int, index: int = -1) -> int:
    return (seed * 1_000_003 + epoch) * 1_000_003 + index + 1


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, without a float copy of all."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    total_sq = torch.zeros_like(total)
    for part in images.split(chunk):
        part = part.double()
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.pow(2).sum(dim=(0, 2, 3))
    count = images.numel() / images.shape[1]
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(1e-12).sqrt()
    return (mean / 255).float(), (std / 255).float()


class Normalizer:
    """uint8 batch -> float, normalised per channel, optionally flipped and cropped on the device:
    padded by `pad` zero pixels each side and cropped back to its size at a random place (0: a
    flip alone)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, device: torch.device, pad: int = PAD):
        self.pad = pad
        self.shift = (mean * 255).view(1, -1, 1, 1).to(device)
        self.scale = (1 / (std * 255)).view(1, -1, 1, 1).to(device)
        self.memory_format = torch.contiguous_format
        self.device = device

    def __call__(self, images: torch.Tensor, augment_seed: Optional[int], part: slice,
                 total: int) -> torch.Tensor:
        """`part`: where these images lie in their global batch of `total`, for which the random
        augmentation is drawn (so that a rank's part is augmented as in one rank's batch)."""
        if augment_seed is not None:
            images = self.flip_crop(images, augment_seed, part, total)
        x = (images.float() - self.shift) * self.scale
        return x.contiguous(memory_format=self.memory_format)

    def flip_crop(self, images: torch.Tensor, seed: int, part: slice, total: int) -> torch.Tensor:
        n, c, h, w = images.shape
        gen = torch.Generator(device=self.device).manual_seed(seed)
        flip = torch.rand(total, device=self.device, generator=gen)[part] < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
        if not self.pad:
            return images
        pad = self.pad
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (total, 1), device=self.device, generator=gen)[part]
        dx = torch.randint(0, 2 * pad + 1, (total, 1), device=self.device, generator=gen)[part]
        rows = (dy + torch.arange(h, device=self.device)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w, device=self.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=self.device).view(n, 1, 1, 1)
        chans = torch.arange(c, device=self.device).view(1, c, 1, 1)
        return padded[batch, chans, rows, cols]


class Loader:
    """Shared by both loaders: the epoch's seeded order, the batch count, this rank's part of
    each batch, and normalisation. `batch_size` is the global batch, over all ranks."""

    def __init__(self, num_samples: int, batch_size: int, normalizer: Normalizer, *,
                 shuffle: bool, augment: bool = False, seed: int = 0, limit: int = 0,
                 rank: int = 0, world_size: int = 1, recipe=None, sizes: Sequence[int] = ()):
        """augment: flip and crop; recipe: the rest of the augmentation (data.augment.Recipe);
        sizes: the image side for epochs 1, 2, ... (progressive resizing), the data's own after."""
        self.num_samples, self.batch_size, self.normalize = num_samples, batch_size, normalizer
        self.shuffle, self.augment, self.seed, self.limit = shuffle, augment, seed, limit
        self.recipe, self.sizes = recipe, list(sizes)
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        # Every rank gets at least one image of every batch: a final batch smaller than the
        # world is left out (at most world_size - 1 images).
        n = self.num_samples // self.batch_size + (self.num_samples % self.batch_size >= self.world_size)
        return min(n, self.limit) if self.limit else n

    def global_size(self, index: int) -> int:
        """The number of images in global batch `index`, over all ranks."""
        return min(self.batch_size, self.num_samples - index * self.batch_size)

    def part(self, index: int) -> slice:
        """Where this rank's images lie in global batch `index`."""
        # As torch.tensor_split: the first n % world_size ranks take one image more.
        n, world, rank = self.global_size(index), self.world_size, self.rank
        start = rank * (n // world) + min(rank, n % world)
        return slice(start, start + n // world + (rank < n % world))

    def indices(self, order: torch.Tensor, index: int) -> torch.Tensor:
        """This rank's sample indices of global batch `index` in the epoch's `order`."""
        return order[index * self.batch_size:(index + 1) * self.batch_size][self.part(index)]

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch))
        return torch.randperm(self.num_samples, generator=gen)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The normalised batches of one epoch, from batch index `start` on; with mixing, the
        labels are label weights (N x classes)."""
        for i, (images, labels) in enumerate(self.raw_batches(epoch, start), start):
            seed, part, total = batch_seed(self.seed, epoch, i), self.part(i), self.global_size(i)
            if self.recipe is not None:
                images = self.recipe.images(images, seed, part, total)
            x = self.normalize(images, seed if self.augment else None, part, total)
            if self.recipe is not None:
                x, labels = self.recipe.batch(x, labels, seed, part, total)
            if 1 <= epoch <= len(self.sizes) and self.sizes[epoch - 1] != x.shape[-1]:
                size = self.sizes[epoch - 1]
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                x = x.contiguous(memory_format=self.normalize.memory_format)
            yield x, labels

    def sample(self, n: int) -> torch.Tensor:
        """This rank's first n images of epoch 0's order (fewer in a smaller split), normalised,
        not augmented."""
        parts, seen = [], 0
        for i, (images, _) in enumerate(self.raw_batches(0, 0)):
            parts.append(self.normalize(images, None, self.part(i), self.global_size(i)))
            seen += len(images)
            if seen >= n:
                break
        return torch.cat(parts)[:n]

    def raw_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Free what the loader holds beyond its data (HostLoader: its workers)."""


class DeviceLoader(Loader):
    """The whole split lives on the device as uint8: a batch is one indexing op, no host work."""

    def __init__(self, split: TensorSplit, batch_size: int, normalizer: Normalizer, **kw):
        super().__init__(len(split), batch_size, normalizer, **kw)
        self.images = split.images.to(normalizer.device)
        self.labels = split.labels.to(normalizer.device)
        self.files = split.files

    def raw_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        order = self.order(epoch).to(self.images.device, non_blocking=True)
        for i in range(start, len(self)):
            idx = self.indices(order, i)
            yield self.images[idx], self.labels[idx]


def _ignore_stop_signals(worker_id: int) -> None:
    # SIGTERM and Ctrl-C reach every process of a job; the main process finishes its step and
    # writes its checkpoint first (resnet_lab.preemption), then ends the workers itself.
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class _EpochBatches:
    """A HostLoader's batch sampler, given each epoch's batches before its DataLoader is iterated:
    one DataLoader, and its workers, serve every epoch."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# HostLoaders whose workers may be alive: ended before Python's exit, where multiprocessing would
# wait forever for workers that ignore its SIGTERM. The hook is registered once workers have
# started, after multiprocessing's own (atexit runs the last registered first).
_WITH_WORKERS = weakref.WeakSet()


def _close_all() -> None:
    for loader in list(_WITH_WORKERS):
        loader.close()


def _end_workers_at_exit(loader: "HostLoader") -> None:
    atexit.unregister(_close_all)  # registered once, and last
    atexit.register(_close_all)
    _WITH_WORKERS.add(loader)


class HostLoader(Loader):
    """A DataLoader over files (image_folder): workers, kept from epoch to epoch, decode to uint8;
    the device normalises and augments."""

    def __init__(self, dataset, batch_size: int, normalizer: Normalizer, num_workers: int = 0, **kw):
        super().__init__(len(dataset), batch_size, normalizer, **kw)
        self.dataset, self.num_workers = dataset, num_workers
        self.sampler = _EpochBatches()
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=num_workers,
            pin_memory=normalizer.device.type == "cuda", worker_init_fn=_ignore_stop_signals,
            persistent_workers=num_workers > 0,
        )

    def raw_batches(self, epoch: int, start: int) -> Iterator[Batch]:
        order = self.order(epoch)
        self.sampler.batches = batches = [self.indices(order, i).tolist() for i in range(start, len(self))]
        device = self.normalize.device
        batch_iter = iter(self.loader)
        if self.num_workers:
            _end_workers_at_exit(self)
        try:
            for batch in batches:
                try:
                    images, labels = next(batch_iter)
                except UserError:
                    if self.num_workers:
                        # A worker's error arrives re-raised with its traceback as the message:
                        # reading the batch here raises the file's own one line instead.
                        for i in batch:
                            self.dataset[i]
                    raise
                yield images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        except BaseException:
            # An error, or an epoch left before its end (a stop): end the workers now, for a
            # traceback may hold this iterator past Python's exit. The next epoch starts new ones.
            self.close()
            raise

    def close(self) -> None:
        """End the workers, if any are running."""
        if self.loader._iterator is not None:
            self.loader._iterator._shutdown_workers()
            self.loader._iterator = None
