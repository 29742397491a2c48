"""`python -m resnet_lab.models [--size 224]`: every variant with its parameters and forward MACs."""

import argparse
from typing import List, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from resnet_lab.models import MODELS


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
    parser.add_argument("--size", type=int, default=224, help="input height and width (default 224)")
    parser.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--classes", type=int, default=1000, help="classes (default 1000)")
    args = parser.parse_args(argv)
    print(f"{'model':<18} {'params':>13} {'MMACs':>11}  at {args.channels}x{args.size}x{args.size}, "
          f"{args.classes} classes")
    for name in MODELS.names():
        params, macs = measure(name, args.size, args.channels, args.classes)
        paper = (MODELS.get(name).__doc__ or "").split("\n")[0]
        print(f"{name:<18} {params:>13,} {macs / 1e6:>11,.1f}  {paper}")


if __name__ == "__main__":
    main()
