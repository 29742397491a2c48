"""One ResNet definition (He et al. 2015); the named variants below are configurations of it.

Module names follow torchvision's resnet.py (conv1, bn1, layer1..4, downsample, fc), so its
state dicts load unchanged.
"""

from typing import List, Sequence, Type, Union

import torch
from torch import nn

from resnet_lab.models.registry import MODELS


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError("basic blocks take no groups or width_per_group (use bottleneck)")
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    # The stride sits on the 3x3 conv (ResNet v1.5), as in torchvision.
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module = None,
                 groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    def __init__(self, layers: Sequence[int], block: str = "basic", width: int = 64,
                 stem: str = "imagenet", in_channels: int = 3, num_classes: int = 1000,
                 groups: int = 1, width_per_group: int = 64, zero_init_residual: bool = False):
        super().__init__()
        block_cls: Type[Union[BasicBlock, Bottleneck]] = BLOCKS[block]
        self.groups, self.base_width = groups, width_per_group
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, width, 7, 2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        else:
            self.conv1 = conv3x3(in_channels, width)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        stages: List[nn.Module] = []
        for i, n in enumerate(layers):
            stages.append(self._make_stage(block_cls, width * 2**i, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block starts as the identity.
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_stage(self, block_cls, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block_cls.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block_cls.expansion, stride),
                nn.BatchNorm2d(planes * block_cls.expansion),
            )
        layers = [block_cls(self.inplanes, planes, stride, downsample, self.groups, self.base_width)]
        self.inplanes = planes * block_cls.expansion
        layers += [block_cls(self.inplanes, planes, groups=self.groups, base_width=self.base_width)
                   for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@MODELS.register()
def resnet18(**kw) -> ResNet:
    return ResNet(**{"layers": [2, 2, 2, 2], "block": "basic", **kw})


@MODELS.register()
def resnet34(**kw) -> ResNet:
    return ResNet(**{"layers": [3, 4, 6, 3], "block": "basic", **kw})


@MODELS.register()
def resnet50(**kw) -> ResNet:
    return ResNet(**{"layers": [3, 4, 6, 3], "block": "bottleneck", **kw})
