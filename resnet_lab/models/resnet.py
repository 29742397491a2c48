"""One ResNet definition; every named variant below is a configuration of it.

Module names follow torchvision's resnet.py (conv1, bn1, layer1..N, downsample, fc), and modules
are registered in its order, so its state dicts load unchanged and one seed gives the same
initial weights. Where torchvision has no such part (the deep stem, the average-pool shortcut,
channel attention) the names are timm's (conv1.0..6, downsample.1..2, se), so timm's state dicts
load unchanged too.
"""

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab.errors import UserError, closest
from resnet_lab.models.registry import MODELS

STEMS = ("imagenet", "cifar", "deep", "whiten")
SHORTCUTS = ("A", "B", "C", "D")
INITS = ("kaiming", "pytorch")
ATTENTIONS = ("none", "se", "eca")
POST_ACTIVATION = ("basic", "bottleneck")


@dataclass
class Architecture:
    """The knobs of a ResNet, declared once: every named variant is one set of them, and the
    config's model.* keys are these (README.md's Models section says what each means). The
    defaults are ResNet-18's."""

    layers: List[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    block: str = "basic"  # a key of BLOCKS
    width: int = 64  # the stem's channels; stage i has width * widen * 2**i planes
    widen: int = 1
    # imagenet: a 7x7/2 conv and a 3x3/2 max-pool; cifar: one 3x3/1 conv; deep: three 3x3 convs
    # (width / 2, width / 2, width channels, the first /2) and the max-pool (He et al. 2019's ResNet-C);
    # whiten: a frozen whiten_kernel x whiten_kernel conv, no padding, set from the training images'
    # patches (whiten_from) to whiten them, each filter also negated (the CIFAR-10 speed records' first layer)
    stem: str = "imagenet"
    whiten_kernel: int = 2
    # He et al. 2015's options A, B, C; D: B's projection with its stride moved to a 2x2 average
    # pool before it (He et al. 2019's ResNet-D)
    shortcut: str = "B"
    # Channel attention at the end of each residual branch: se (Hu et al. 2018), eca (Wang et al. 2020)
    attention: str = "none"
    attention_reduction: int = 16  # SE's hidden channels: the branch's channels / this
    # Anti-aliased downsampling (Zhang 2019): each strided 3x3 conv (and the stem's max-pool)
    # runs at stride 1, then a 3x3 binomial blur subsamples by 2
    blur: bool = False
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
    bn_momentum: float = 0.1  # every batch norm's: running = (1 - m) * running + m * the batch's
    bn_weight_frozen: bool = False  # every batch norm's scale stays at its initial 1; its bias trains


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


class SqueezeExcite(nn.Module):
    """Hu et al. 2018: each channel's mean through a 1x1 bottleneck (ReLU) and a sigmoid scales
    that channel. The hidden channels are channels / reduction rounded to the nearest multiple of
    8, at least 8: timm's rule, so its SE models' weights fit."""

    def __init__(self, channels: int, reduction: int):
        super().__init__()
        hidden = max(8, int(channels / reduction + 4) // 8 * 8)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))).sigmoid()


class EfficientChannelAttention(nn.Module):
    """ECA (Wang et al. 2020): the channels' means, a 1-D conv across neighbouring channels and a
    sigmoid scale the channels; the conv's odd kernel grows with log2(channels), as the paper and
    timm compute it."""

    def __init__(self, channels: int):
        super().__init__()
        t = int(abs(math.log(channels, 2) + 1) / 2)
        k = max(t if t % 2 else t + 1, 3)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.mean((2, 3)).view(len(x), 1, -1))
        return x * y.sigmoid().view(len(x), -1, 1, 1)


class BlurPool(nn.Module):
    """Zhang 2019: each channel low-pass filtered by the 3x3 binomial kernel ([1, 2, 1] / 4 times
    its transpose) on reflected borders, as timm pads, then subsampled by 2. A 1-pixel map has
    nothing to reflect (timm fails there): its border repeats the pixel. The kernel is a
    constant, not part of the state dict."""

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0]) / 4
        self.register_buffer("filt", (k[:, None] * k[None, :]).expand(channels, 1, 3, 3).contiguous(),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mode = "reflect" if min(x.shape[-2:]) > 1 else "replicate"
        return F.conv2d(F.pad(x, (1, 1, 1, 1), mode=mode), self.filt, stride=2, groups=len(self.filt))


def make_attention(kind: str, channels: int, reduction: int) -> nn.Module:
    if kind == "se":
        return SqueezeExcite(channels, reduction)
    return EfficientChannelAttention(channels) if kind == "eca" else nn.Identity()


def strided(stride: int, blur: bool, channels: int) -> Tuple[int, nn.Module]:
    """A strided conv's own stride and what follows its activation: the blur subsamples instead."""
    return (1, BlurPool(channels)) if blur and stride > 1 else (stride, nn.Identity())


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
    attention: str = "none"  # post-activation blocks
    attention_reduction: int = 16
    blur: bool = False  # post-activation blocks


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
    in every block; D (He et al. 2019) projects where B does, after a 2x2 average pool that takes
    the stride, so the 1x1 conv sees every pixel. None is the plain identity."""
    reshapes = stride != 1 or cin != cout
    if opts.shortcut == "C" or (opts.shortcut in ("B", "D") and reshapes):
        layers = [conv1x1(cin, cout, stride, bias=opts.bias)]
        if opts.shortcut == "D":
            # timm's layout (pool, conv, BN), whose keys its resnet*d weights have.
            pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
            layers = [pool, conv1x1(cin, cout, bias=opts.bias)]
        return nn.Sequential(*layers, *([nn.BatchNorm2d(cout)] if norm else []))
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
        conv_stride, self.blur = strided(stride, opts.blur, planes)
        self.conv1 = conv3x3(cin, planes, conv_stride, bias=opts.bias)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = make_dropout(opts.dropout)
        self.conv2 = conv3x3(planes, planes, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = make_attention(opts.attention, planes, opts.attention_reduction)
        self.downsample = make_shortcut(opts, cin, planes, stride, opts.projection_norm)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.blur(self.relu(self.bn1(self.conv1(x))))
        out = self.se(self.bn2(self.conv2(self.dropout(out))))
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
        conv_stride, self.blur = strided(stride, opts.blur, width)
        self.conv1 = conv1x1(cin, width, bias=opts.bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, conv_stride, opts.groups, bias=opts.bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.dropout = make_dropout(opts.dropout)
        self.conv3 = conv1x1(width, planes * self.expansion, bias=opts.bias)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.se = make_attention(opts.attention, planes * self.expansion, opts.attention_reduction)
        self.downsample = make_shortcut(opts, cin, planes * self.expansion, stride, opts.projection_norm)
        self.drop_path = DropPath(opts.drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.blur(self.relu(self.bn2(self.conv2(out))))
        out = self.se(self.bn3(self.conv3(self.dropout(out))))
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
    conv-BN-ReLU, 7x7/2 plus a 3x3/2 max-pool ("imagenet"), 3x3/1 ("cifar"), or three 3x3 convs,
    the first /2, plus the max-pool ("deep"), or a frozen whitening conv ("whiten", set by
    whiten_from; its 2 * in_channels * k * k channels feed the first stage). Pre-activation
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
                            arch.projection_norm, attention=arch.attention,
                            attention_reduction=arch.attention_reduction, blur=arch.blur)
        if arch.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=arch.bias)
        elif arch.stem == "deep":
            half = width // 2
            self.conv1 = nn.Sequential(
                conv3x3(in_channels, half, 2, bias=arch.bias), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                conv3x3(half, half, bias=arch.bias), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
                conv3x3(half, width, bias=arch.bias))
        elif arch.stem == "whiten":
            k = arch.whiten_kernel
            self.conv1 = nn.Conv2d(in_channels, 2 * in_channels * k * k, k, bias=False).requires_grad_(False)
        else:
            self.conv1 = conv3x3(in_channels, width, bias=arch.bias)
        stem_out = self.conv1.out_channels if arch.stem == "whiten" else width
        if arch.stem in ("cifar", "whiten"):
            self.maxpool = nn.Identity()
        elif arch.blur:
            self.maxpool = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), BlurPool(width))
        else:
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_out)
        self.relu = nn.ReLU(inplace=True)

        cin = stem_out
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
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = arch.bn_momentum
                m.weight.requires_grad_(not arch.bn_weight_frozen)

    @torch.no_grad()
    def whiten_from(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """stem=whiten: conv1's filters become the eigenvectors of the covariance of `images`'
        patches (normalised training images), each divided by the square root of its eigenvalue
        (+ eps), and their negations: the conv's outputs are the patches' uncorrelated components
        at unit variance, both signs, which the ReLU after it keeps."""
        k = self.conv1.kernel_size[0]
        patches = F.unfold(images.float(), k).transpose(1, 2).reshape(-1, self.conv1.in_channels * k * k)
        covariance = (patches.T.double() @ patches.double()) / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / (eigenvalues + eps).sqrt()[:, None]).flip(0)  # the largest first
        filters = filters.reshape(-1, *self.conv1.weight.shape[1:]).to(self.conv1.weight)
        self.conv1.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(self.final_act(x)), 1))


def check(arch: Architecture) -> None:
    """What the knobs' types cannot say, as one line naming the config key."""
    choices = {"block": tuple(BLOCKS), "stem": STEMS, "shortcut": SHORTCUTS, "weight_init": INITS,
               "attention": ATTENTIONS}
    for key, allowed in choices.items():
        value = getattr(arch, key)
        if value not in allowed:
            raise UserError(f"model.{key}={value}: must be one of {', '.join(allowed)}{closest(value, allowed)}")
    for key in ("width", "widen", "groups", "width_per_group", "attention_reduction"):
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
    for key, off in (("attention", "none"), ("blur", False)):
        if getattr(arch, key) != off and arch.block not in POST_ACTIVATION:
            raise UserError(f"model.{key}={getattr(arch, key)}: needs a post-activation block "
                            f"(model.block={' or '.join(POST_ACTIVATION)}), not {arch.block}")
    if arch.whiten_kernel < 1:
        raise UserError(f"model.whiten_kernel={arch.whiten_kernel}: must be >= 1")
    if arch.bn_weight_frozen and arch.zero_init_residual:
        raise UserError("model.bn_weight_frozen=true with model.zero_init_residual=true: the residual branches' "
                        "last batch norms would stay at zero; set one of them to false")
    if not 0 <= arch.bn_momentum <= 1:
        raise UserError(f"model.bn_momentum={arch.bn_momentum}: must be in [0, 1]")
    if arch.stem == "deep" and arch.width < 2:
        raise UserError(f"model.width={arch.width}: the deep stem needs >= 2 (its first convs have width / 2)")


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

# He et al. 2019, "Bag of Tricks for Image Classification with Convolutional Neural Networks":
# ResNet-D is ResNet-B (torchvision's stride on the 3x3) with ResNet-C's deep stem and the
# average-pool shortcut; its residual branches start at zero (the paper's zero gamma), as timm's
# models of these names, whose weights load into them unchanged (tests/test_timm_models.py).
TRICKS = {"stem": "deep", "shortcut": "D", "zero_init_residual": True}
variant("resnet18d", "ResNet-18-D, He et al. 2019 (Bag of Tricks; timm's resnet18d)", layers=[2, 2, 2, 2], **TRICKS)
variant("resnet26d", "ResNet-26-D, He et al. 2019 (Bag of Tricks; timm's resnet26d)", layers=[2, 2, 2, 2],
        block="bottleneck", **TRICKS)
variant("resnet34d", "ResNet-34-D, He et al. 2019 (Bag of Tricks; timm's resnet34d)", layers=[3, 4, 6, 3], **TRICKS)
variant("resnet50d", "ResNet-50-D, He et al. 2019 (Bag of Tricks; timm's resnet50d)", layers=[3, 4, 6, 3],
        block="bottleneck", **TRICKS)
variant("resnet101d", "ResNet-101-D, He et al. 2019 (Bag of Tricks; timm's resnet101d)", layers=[3, 4, 23, 3],
        block="bottleneck", **TRICKS)
# Channel attention on each residual branch: squeeze-and-excitation (Hu et al. 2018) and ECA
# (Wang et al. 2020), as timm builds them.
SE = {"attention": "se", "zero_init_residual": True}
variant("seresnet50", "SE-ResNet-50, Hu et al. 2018 (timm's seresnet50)", layers=[3, 4, 6, 3], block="bottleneck",
        **SE)
variant("seresnext26d_32x4d", "SE-ResNeXt-26-D 32x4d, Hu et al. 2018 on He et al. 2019's ResNet-D (timm's "
        "seresnext26d_32x4d)", layers=[2, 2, 2, 2], block="bottleneck", groups=32, width_per_group=4,
        **SE, stem="deep", shortcut="D")
variant("seresnext50_32x4d", "SE-ResNeXt-50 32x4d, Hu et al. 2018 (timm's seresnext50_32x4d)", layers=[3, 4, 6, 3],
        block="bottleneck", groups=32, width_per_group=4, **SE)
variant("ecaresnet50d", "ECA-ResNet-50-D, Wang et al. 2020 on He et al. 2019's ResNet-D (timm's ecaresnet50d)",
        layers=[3, 4, 6, 3], block="bottleneck", **{**TRICKS, "attention": "eca"})
# Anti-aliased downsampling (Zhang 2019, "Making Convolutional Networks Shift-Invariant Again").
BLUR = {"blur": True, "zero_init_residual": True}
variant("resnetblur18", "ResNet-18 with blur-pooled downsampling, Zhang 2019 (timm's resnetblur18)",
        layers=[2, 2, 2, 2], **BLUR)
variant("resnetblur50", "ResNet-50 with blur-pooled downsampling, Zhang 2019 (timm's resnetblur50)",
        layers=[3, 4, 6, 3], block="bottleneck", **BLUR)
variant("resnetblur50d", "ResNet-50-D with blur-pooled downsampling, Zhang 2019 (timm's resnetblur50d)",
        layers=[3, 4, 6, 3], block="bottleneck", **{**TRICKS, **BLUR})
