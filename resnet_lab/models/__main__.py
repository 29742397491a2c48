"""`python -m resnet_lab.models [--size N --channels C --classes K]`: every variant with its parameters
and forward MACs, each at its own layout's input (ImageNet stem: 3x224x224, 1000 classes; CIFAR
stem: 3x32x32, 10 classes) unless the options set one for all."""

import argparse
from typing import List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from resnet_lab.models import MODELS

# The input each stem was designed for: (image size, classes).
LAYOUTS = {"imagenet": (224, 1000), "deep": (224, 1000), "cifar": (32, 10)}


def measure(name: str, size: int, in_channels: int = 3, num_classes: int = 1000) -> Tuple[int, int]:
    """Parameters and multiply-accumulates of one forward pass of one image.

    On the meta device nothing is allocated or computed, so even resnet1202 takes a moment.
    FlopCounterMode counts 2 FLOPs per multiply-accumulate of convs and matmuls.
    """
    with torch.device("meta"):
        model = MODELS.get(name)(in_channels=in_channels, num_classes=num_classes).eval()
        image = torch.empty(1, in_channels, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.models", description=__doc__)
    parser.add_argument("--size", type=int, help="input height and width (default: the layout's)")
    parser.add_argument("--channels", type=int, help="input channels (default 3)")
    parser.add_argument("--classes", type=int, help="classes (default: the layout's)")
    args = parser.parse_args(argv)
    print(f"{'model':<18} {'params':>13} {'MMACs':>11}  {'input':<10} {'classes':>7}  paper")
    for name in MODELS.names():
        size, classes = LAYOUTS[MODELS.get(name).architecture.stem]
        size, classes, channels = args.size or size, args.classes or classes, args.channels or 3
        params, macs = measure(name, size, channels, classes)
        paper = (MODELS.get(name).__doc__ or "").split("\n")[0]
        print(f"{name:<18} {params:>13,} {macs / 1e6:>11,.1f}  {f'{channels}x{size}x{size}':<10} {classes:>7}  {paper}")


if __name__ == "__main__":
    main()
