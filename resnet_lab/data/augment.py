"""Batched augmentation on the training device, beyond flip and crop: TrivialAugmentWide and
RandAugment (torchvision's transforms.v2 operations), vertical flips, rotations, random erasing,
and Mixup/CutMix.

Every draw is a function of the batch's seed (seed, epoch, batch index) and a stage number, made
for the whole global batch and sliced to this rank's `part`: N ranks augment each image as one
rank would. Mixup and CutMix pair each image with its mirror position in the rank's own part.
The per-image draws are host-side (NumPy) or on the device's own generator: none waits for the device.
"""

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

# Stages: each draws from its own stream of the batch's seed.
AUTO, GEOMETRY, ERASE, MIX = range(1, 5)


def draws(seed: int, stage: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage])


def device_draws(seed: int, stage: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(draws(seed, stage).integers(2**62)))


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device without waiting for it (through pinned memory on CUDA)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


class AutoAugment:
    """TrivialAugmentWide (one operation of random strength per image) or RandAugment
    (`num_ops` operations of strength `magnitude` of 31 per image), per image as in the papers:
    images that drew the same operation and strength are transformed together."""

    def __init__(self, kind: str, num_ops: int = 2, magnitude: int = 9):
        self.trivial = kind == "trivial"
        self.op = v2.TrivialAugmentWide() if self.trivial else v2.RandAugment(num_ops, magnitude)
        self.space = list(self.op._AUGMENTATION_SPACE.items())
        self.layers = 1 if self.trivial else num_ops
        self.magnitude = magnitude

    def __call__(self, images: torch.Tensor, seed: int, part: slice, total: int) -> torch.Tensor:
        rng = draws(seed, AUTO)
        bins = self.op.num_magnitude_bins
        for _ in range(self.layers):
            ops = rng.integers(len(self.space), size=total)[part]
            strengths = (rng.integers(bins, size=total) if self.trivial else np.full(total, self.magnitude))[part]
            negative = (rng.random(total) < 0.5)[part]
            groups = defaultdict(list)
            for i, key in enumerate(zip(ops.tolist(), strengths.tolist(), negative.tolist())):
                groups[key].append(i)
            # Each group's images, by position in one upload: indexing the device with a list
            # from the host would wait for the device at every group.
            members = upload(np.concatenate(list(groups.values())), images.device)
            out, start = images.clone(), 0
            for (op, strength, neg), group in groups.items():
                name, (magnitudes, signed) = self.space[op]
                table = magnitudes(bins, images.shape[-2], images.shape[-1])
                amount = 0.0 if table is None else float(table[strength]) * (-1 if signed and neg else 1)
                index, start = members[start:start + len(group)], start + len(group)
                out[index] = self.op._apply_image_or_video_transform(
                    images[index], name, amount, interpolation=self.op.interpolation, fill=self.op._fill)
            images = out
        return images


def flip_rotate(images: torch.Tensor, seed: int, part: slice, total: int, vflip: bool,
                degrees: float) -> torch.Tensor:
    """A vertical flip with probability 1/2 (`vflip`), then a rotation by a uniform angle in
    [-degrees, degrees] about the centre, zeros filling the corners; per image."""
    gen = device_draws(seed, GEOMETRY, images.device)
    if vflip:
        flip = torch.rand(total, device=images.device, generator=gen)[part] < 0.5
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(2), images)
    if degrees:
        angle = (torch.rand(total, device=images.device, generator=gen)[part] * 2 - 1) * math.radians(degrees)
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        rotated = F.grid_sample(images.float(), grid, mode="bilinear", align_corners=False)
        images = rotated.round().clamp(0, 255).to(images.dtype)
    return images


def random_erase(x: torch.Tensor, seed: int, part: slice, total: int, prob: float) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017), per image with probability `prob`: a rectangle of 2% to
    1/3 of the image, aspect ratio 0.3 to 3.3 (log-uniform), set to 0 (the mean, once
    normalised); one that does not fit is clipped to the image."""
    n, _, h, w = x.shape
    gen = device_draws(seed, ERASE, x.device)
    u = torch.rand(5, total, device=x.device, generator=gen)[:, part]
    area = h * w * (0.02 + u[0] * (1 / 3 - 0.02))
    ratio = torch.exp(math.log(0.3) + u[1] * (math.log(3.3) - math.log(0.3)))
    eh = (area * ratio).sqrt().round().clamp(1, h)
    ew = (area / ratio).sqrt().round().clamp(1, w)
    top = (u[2] * (h - eh + 1)).floor().view(n, 1, 1)
    left = (u[3] * (w - ew + 1)).floor().view(n, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = ((rows >= top) & (rows < top + eh.view(n, 1, 1)) & (cols >= left) & (cols < left + ew.view(n, 1, 1))
              & (u[4] < prob).view(n, 1, 1))
    return x.masked_fill(inside.unsqueeze(1), 0)


@dataclass(frozen=True)
class Mix:
    """One batch's draw: mixup or cutmix with weight `lam` on each image's own label, the
    cutmix box (top, bottom, left, right) pasted from the paired image; or no mixing."""

    kind: str  # "none", "mixup" or "cutmix"
    lam: float = 1.0
    box: Optional[Tuple[int, int, int, int]] = None


@dataclass(frozen=True)
class Mixing:
    """Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) of training batches, timm's way:
    a batch is mixed with probability `prob`; with both on, CutMix with probability `switch_prob`;
    lam ~ Beta(alpha, alpha); each image is paired with the one at the mirror position."""

    num_classes: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    def draw(self, seed: int, height: int, width: int) -> Mix:
        rng = draws(seed, MIX)
        if rng.random() >= self.prob:
            return Mix("none")
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        lam = float(rng.beta(*[self.cutmix_alpha if cutmix else self.mixup_alpha] * 2))
        if not cutmix:
            return Mix("mixup", lam)
        # A box of (1 - lam) of the area around a uniform centre, clipped to the image; lam is
        # then the share of the image left as it was.
        cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        return Mix("cutmix", 1 - (bottom - top) * (right - left) / (height * width), (top, bottom, left, right))

    def apply(self, x: torch.Tensor, y: torch.Tensor, mix: Mix) -> Tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch and its label weights (N x classes)."""
        one_hot = F.one_hot(y, self.num_classes).to(x.dtype)
        if mix.kind == "mixup":
            x = x * mix.lam + x.flip(0) * (1 - mix.lam)
        elif mix.kind == "cutmix":
            top, bottom, left, right = mix.box
            x = x.clone()
            x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
        return x, one_hot * mix.lam + one_hot.flip(0) * (1 - mix.lam)


@dataclass
class Recipe:
    """The augmentation a config asks for beyond flip and crop, in its order: on the uint8
    images (auto-augmentation, vertical flip, rotation), then after normalisation (erasing,
    mixing)."""

    auto: Optional[AutoAugment] = None
    vflip: bool = False
    rotate: float = 0.0
    erase_prob: float = 0.0
    mixing: Optional[Mixing] = None

    def images(self, images: torch.Tensor, seed: int, part: slice, total: int) -> torch.Tensor:
        if self.auto is not None:
            images = self.auto(images, seed, part, total)
        if self.vflip or self.rotate:
            images = flip_rotate(images, seed, part, total, self.vflip, self.rotate)
        return images

    def batch(self, x: torch.Tensor, y: torch.Tensor, seed: int, part: slice,
              total: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.erase_prob:
            x = random_erase(x, seed, part, total, self.erase_prob)
        if self.mixing is not None:
            x, y = self.mixing.apply(x, y, self.mixing.draw(seed, x.shape[-2], x.shape[-1]))
        return x, y


def build_recipe(cfg, num_classes: int) -> Optional[Recipe]:
    """The dataset config's recipe, or None when it asks for none of it."""
    mixing = None
    if cfg.mixup_alpha or cfg.cutmix_alpha:
        mixing = Mixing(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.switch_prob)
    auto = None if cfg.auto_augment == "none" else AutoAugment(cfg.auto_augment, cfg.randaugment_ops,
                                                                cfg.randaugment_magnitude)
    recipe = Recipe(auto, cfg.vflip, cfg.rotate, cfg.erase_prob, mixing)
    return recipe if recipe != Recipe() else None
