"""One ResNet definition; every named variant below is a configuration of it.

Module names follow torchvision's resnet.py (conv1, bn1, layer1..N, downsample, fc), and modules
are registered in its order, so its state dicts load unchanged and one seed gives the same
initial weights.
"""

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab.errors import UserError, closest
from resnet_lab.models.registry import MODELS

STEMS = ("imagenet", "cifar")
SHORTCUTS = ("A", "B", "C")
INITS = ("kaiming", "pytorch")


@dataclass
class Architecture:
    """The knobs of a ResNet, declared once: every named variant is one set of them, and the
    config's model.* keys are these (README.md's Models section says what each means). The
    defaults are ResNet-18's."""

    layers: List[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    block: str = "basic"  # a key of BLOCKS
    width: int = 64  # the stem's channels; stage i has width * widen * 2**i planes
    widen: int = 1
    stem: str = "imagenet"  # 7x7/2 conv and 3x3/2 max-pool; cifar: one 3x3/1 conv
    shortcut: str = "B"  # He et al. 2015's options A, B, C
    groups: int = 1  # ResNeXt's cardinality (bottleneck blocks)
    width_per_group: int = 64
    dropout: float = 0.0  # between a block's convs (WRN)
    # Stochastic depth (Huang et al. 2016): the last block's residual branch is dropped with this
    # probability per image while training, earlier blocks' in proportion to their depth.
    drop_path: float = 0.0
    zero_init_residual: bool = False  # each residual branch's last BN (or conv) starts at zero
    bias: bool = False  # conv biases (the d2l network)
    projection_norm: bool = True  # BN after a post-activation block's 1x1 projection
    weight_init: str = "kaiming"  # torchvision's He-normal fan-out convs; pytorch: each layer's own default


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=bias)


def conv1x1(cin: int, cout: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=bias)


class PadShortcut(nn.Module):
    """Shortcut option A: the identity, subsampled by the stride, with zero channels appended."""

    def __init__(self, extra_channels: int, stride: int):
        super().__init__()
        self.extra_channels, self.stride = extra_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra_channels))


@dataclass(frozen=True)
class BlockOptions:
    shortcut: str = "B"
    groups: int = 1
    width_per_group: int = 64
    dropout: float = 0.0
    bias: bool = False
    # BN after a post-activation block's 1x1 projection (torchvision) or not (the d2l script).
    # Pre-activation blocks never have one: the next block's BN normalises the sum.
    projection_norm: bool = True
    # Pre-activation blocks: BN-ReLU the input. The network's first block gets it from the stem.
    preactivate: bool = True
    drop_path: float = 0.0  # this block's


class DropPath(nn.Module):
    """Zeroes the residual branch of each image with probability p while training, and scales
    the kept ones by 1 / (1 - p) (so evaluation needs no change); nothing at p = 0."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not self.p:
            return x
        keep = torch.empty((len(x),) + (1,) * (x.dim() - 1), device=x.device).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p).to(x.dtype)


def make_shortcut(opts: BlockOptions, cin: int, cout: int, stride: int, norm: bool) -> Optional[nn.Module]:
    """He et al. 2015, section 3.3: A pads where the shape changes, B projects there, C projects
    in every block. None is the plain identity."""
    reshapes = stride != 1 or cin != cout
    if opts.shortcut == "C" or (opts.shortcut == "B" and reshapes):
        projection = conv1x1(cin, cout, stride, bias=opts.bias)
        return nn.Sequential(projection, nn.BatchNorm2d(cout)) if norm else nn.Sequential(projection)
    return PadShortcut(cout - cin, stride) if reshapes else None


def make_dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p else nn.Identity()


def bottleneck_width(planes: int, opts: BlockOptions) -> int:
    """The 3x3 conv's channels: torchvision's rule, which ResNeXt and wide_resnet50_2 configure.
    At least one channel per group, so narrow smoke-test ResNeXts still build."""
    return max(1, int(planes * opts.width_per_group / 64)) * opts.groups


class BasicBlock(nn.Module):
    """Two 3x3 convs; BN after each, ReLU after the first and after the sum (He et al. 2015)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, opts: BlockOptions = BlockOptions()):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride, bias=opts.bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = make_dropout(opts.dropout)
        self.conv2 = conv3x3(planes, planes, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = make_shortcut(opts, cin, planes, stride, opts.projection_norm)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(self.dropout(out)))
        return self.relu(self.drop_path(out) + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; the stride sits on the 3x3 (ResNet
    v1.5), as in torchvision."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, opts: BlockOptions = BlockOptions()):
        super().__init__()
        width = bottleneck_width(planes, opts)
        self.conv1 = conv1x1(cin, width, bias=opts.bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, opts.groups, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.dropout = make_dropout(opts.dropout)
        self.conv3 = conv1x1(width, planes * self.expansion, bias=opts.bias)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = make_shortcut(opts, cin, planes * self.expansion, stride, opts.projection_norm)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.dropout(out)))
        return self.relu(self.drop_path(out) + identity)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU before each 3x3 conv, nothing after
    the sum. A reshaping shortcut takes the activated input, as in the paper's code; with dropout
    between the convs it is the WRN block (Zagoruyko & Komodakis 2016)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, opts: BlockOptions = BlockOptions()):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin) if opts.preactivate else None
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(cin, planes, stride, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = make_dropout(opts.dropout)
        self.conv2 = conv3x3(planes, planes, bias=opts.bias)
        self.downsample = make_shortcut(opts, cin, planes, stride, norm=False)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.bn1 is None else self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return self.drop_path(out) + identity

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al. 2016, ResNet-164): BN-ReLU before each conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, opts: BlockOptions = BlockOptions()):
        super().__init__()
        width = bottleneck_width(planes, opts)
        self.bn1 = nn.BatchNorm2d(cin) if opts.preactivate else None
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(cin, width, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, opts.groups, bias=opts.bias)
        self.bn3 = nn.BatchNorm2d(width)
        self.dropout = make_dropout(opts.dropout)
        self.conv3 = conv1x1(width, planes * self.expansion, bias=opts.bias)
        self.downsample = make_shortcut(opts, cin, planes * self.expansion, stride, norm=False)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.bn1 is None else self.relu(self.bn1(x))
        identity = x if self.downsample is None else self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.dropout(self.relu(self.bn3(out))))
        return self.drop_path(out) + identity

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck,
          "preact": PreActBlock, "preact_bottleneck": PreActBottleneck}
PREACT = (PreActBlock, PreActBottleneck)


class ResNet(nn.Module):
    """Stem, stages of residual blocks, global average pool, linear head.

    Stage i holds layers[i] blocks of width * widen * 2**i planes (times the block's expansion at
    its output); every stage but the first halves the resolution in its first block. The stem is
    conv-BN-ReLU, 7x7/2 plus a 3x3/2 max-pool ("imagenet") or 3x3/1 ("cifar"). Pre-activation
    networks take their first block's BN-ReLU from the stem and end in BN-ReLU before the pool,
    as fb.resnet.torch's preresnet does.

    `arch` holds the knobs (Architecture); the dataset gives in_channels and num_classes.
    """

    def __init__(self, arch: Optional[Architecture] = None, in_channels: int = 3, num_classes: int = 1000):
        super().__init__()
        arch = arch or Architecture()
        check(arch)
        self.arch = arch
        width = arch.width
        block_cls = BLOCKS[arch.block]
        opts = BlockOptions(arch.shortcut, arch.groups, arch.width_per_group, arch.dropout, arch.bias,
                            arch.projection_norm)
        if arch.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=arch.bias)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, width, bias=arch.bias)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)

        cin = width
        self.stages = [f"layer{i + 1}" for i in range(len(arch.layers))]
        depths = iter(range(1, sum(arch.layers) + 1))
        for i, (name, depth) in enumerate(zip(self.stages, arch.layers)):
            planes = width * arch.widen * 2**i
            blocks = []
            for j in range(depth):
                # The stem's BN-ReLU pre-activates the first block; stochastic depth's rate grows
                # linearly to drop_path at the last block.
                block_opts = replace(opts, preactivate=i + j > 0,
                                     drop_path=arch.drop_path * next(depths) / sum(arch.layers))
                blocks.append(block_cls(cin, planes, 2 if i > 0 and j == 0 else 1, block_opts))
                cin = planes * block_cls.expansion
            setattr(self, name, nn.Sequential(*blocks))
        self.final_act = (nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
                          if block_cls in PREACT else nn.Identity())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

        if arch.weight_init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if arch.zero_init_residual:
            # Each residual branch starts as zero, so every block starts as (nearly) the identity.
            for m in self.modules():
                if isinstance(m, tuple(BLOCKS.values())):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(self.final_act(x)), 1))


def check(arch: Architecture) -> None:
    """What the knobs' types cannot say, as one line naming the config key."""
    choices = {"block": tuple(BLOCKS), "stem": STEMS, "shortcut": SHORTCUTS, "weight_init": INITS}
    for key, allowed in choices.items():
        value = getattr(arch, key)
        if value not in allowed:
            raise UserError(f"model.{key}={value}: must be one of {', '.join(allowed)}{closest(value, allowed)}")
    for key in ("width", "widen", "groups", "width_per_group"):
        if getattr(arch, key) < 1:
            raise UserError(f"model.{key}={getattr(arch, key)}: must be >= 1")
    if not arch.layers or min(arch.layers) < 1:
        raise UserError(f"model.layers={list(arch.layers)}: must list at least one stage, each of >= 1 blocks")
    for key in ("dropout", "drop_path"):
        if not 0 <= getattr(arch, key) < 1:
            raise UserError(f"model.{key}={getattr(arch, key)}: must be in [0, 1)")
    if BLOCKS[arch.block].expansion == 1 and (arch.groups != 1 or arch.width_per_group != 64):
        raise UserError(f"model.groups={arch.groups}, model.width_per_group={arch.width_per_group}: "
                        "basic blocks take only 1 and 64; grouped convs need a bottleneck block")


def variant(name: str, paper: str, **knobs) -> None:
    """Register `name(in_channels=3, num_classes=1000, **changes)`: the ResNet of these knobs (the
    rest at Architecture's defaults), any knob in `changes` replacing the variant's own. Its
    `architecture` is what the config's model group shows for it."""
    architecture = Architecture(**knobs)

    def build(in_channels: int = 3, num_classes: int = 1000, **changes) -> ResNet:
        return ResNet(replace(architecture, **changes), in_channels, num_classes)

    build.__doc__, build.architecture = paper, architecture
    MODELS.register(name)(build)


# ImageNet layout (He et al. 2015; torchvision): 4 stages of 64-128-256-512 planes, projections
# where the shape changes; the bottleneck nets are v1.5 (stride on the 3x3), as torchvision's.
variant("resnet18", "ResNet-18, He et al. 2015", layers=[2, 2, 2, 2])
variant("resnet34", "ResNet-34, He et al. 2015", layers=[3, 4, 6, 3])
variant("resnet50", "ResNet-50, He et al. 2015 (v1.5: stride on the 3x3)", layers=[3, 4, 6, 3], block="bottleneck")
variant("resnet101", "ResNet-101, He et al. 2015 (v1.5)", layers=[3, 4, 23, 3], block="bottleneck")
variant("resnet152", "ResNet-152, He et al. 2015 (v1.5)", layers=[3, 8, 36, 3], block="bottleneck")
variant("resnext50_32x4d", "ResNeXt-50 32x4d, Xie et al. 2017", layers=[3, 4, 6, 3], block="bottleneck",
        groups=32, width_per_group=4)
variant("resnext101_32x8d", "ResNeXt-101 32x8d, Xie et al. 2017", layers=[3, 4, 23, 3], block="bottleneck",
        groups=32, width_per_group=8)
variant("resnext101_64x4d", "ResNeXt-101 64x4d, Xie et al. 2017", layers=[3, 4, 23, 3], block="bottleneck",
        groups=64, width_per_group=4)
variant("wide_resnet50_2", "Wide ResNet-50-2, Zagoruyko & Komodakis 2016 (torchvision: 2x wider bottleneck 3x3)",
        layers=[3, 4, 6, 3], block="bottleneck", width_per_group=128)
variant("wide_resnet101_2", "Wide ResNet-101-2, Zagoruyko & Komodakis 2016 (torchvision: 2x wider bottleneck "
        "3x3)", layers=[3, 4, 23, 3], block="bottleneck", width_per_group=128)
# The d2l.ai network: conv biases, 1x1 projections without BN, PyTorch's default initialisation.
variant("resnet18_d2l", "ResNet-18 as d2l.ai builds it (its ResNet chapter)",
        layers=[2, 2, 2, 2], bias=True, projection_norm=False, weight_init="pytorch")

# CIFAR layout (He et al. 2015, section 4.2): a 3x3 stem, 3 stages of 16-32-64 planes,
# 6n+2 layers, parameter-free option-A shortcuts.
CIFAR = {"width": 16, "stem": "cifar", "shortcut": "A"}
for _n in (3, 5, 7, 9, 18, 200):
    variant(f"resnet{6 * _n + 2}", f"ResNet-{6 * _n + 2} (n={_n}), He et al. 2015, section 4.2",
            layers=[_n] * 3, **CIFAR)

# Pre-activation (He et al. 2016, "Identity Mappings in Deep Residual Networks").
variant("preact_resnet18", "Pre-activation ResNet-18, He et al. 2016 (ImageNet layout)",
        layers=[2, 2, 2, 2], block="preact")
variant("preact_resnet34", "Pre-activation ResNet-34, He et al. 2016 (ImageNet layout)",
        layers=[3, 4, 6, 3], block="preact")
variant("preact_resnet110", "Pre-activation ResNet-110, He et al. 2016 (CIFAR layout, option A)",
        layers=[18, 18, 18], block="preact", **CIFAR)
variant("preact_resnet164", "Pre-activation ResNet-164, He et al. 2016 (CIFAR layout, bottleneck, projections)",
        layers=[18, 18, 18], block="preact_bottleneck", **{**CIFAR, "shortcut": "B"})

# Wide ResNets (Zagoruyko & Komodakis 2016): WRN-d-k is the CIFAR layout with pre-activation
# blocks, (d-4)/6 per stage, k times wider stages, and dropout between the convs as a knob.
WRN = {"width": 16, "stem": "cifar", "block": "preact"}
variant("wrn_16_8", "WRN-16-8, Zagoruyko & Komodakis 2016", layers=[2, 2, 2], widen=8, **WRN)
variant("wrn_28_10", "WRN-28-10, Zagoruyko & Komodakis 2016", layers=[4, 4, 4], widen=10, **WRN)
variant("wrn_40_4", "WRN-40-4, Zagoruyko & Komodakis 2016", layers=[6, 6, 6], widen=4, **WRN)
