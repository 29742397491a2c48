"""Training images/s of resnet_lab's definition of a timm-named variant against timm's own, side
by side in one process, on CIFAR-shaped input (3x32x32, 10 classes).

    python benchmarks/timm_models.py [--models resnet50d seresnet50] [--batch 32] [--steps 5] [--rounds 3]
        [--json FILE]

Both are the same network (tests/test_timm_models.py: the same state dict gives the same
logits); each step is forward, backward and an SGD update in fp32, eager, contiguous layout, on
the CPU. The two alternate step batches round after round (ours, timm's, timm's, ours, ...) and
the medians are reported, because a shared machine's speed drifts.
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import timm
import torch

from resnet_lab.device import device_name
from resnet_lab.models import MODELS


def images_per_second(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    start = time.perf_counter()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * len(x) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50d", "seresnet50"])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = {"device_name": device_name("cpu"), "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()[0], "models": {}}
    print(f"{result['device_name']}, {result['threads']} threads")
    torch.manual_seed(0)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    print(f"{'model':<12} {'resnet_lab img/s':>16} {'timm img/s':>11} {'ratio':>6}")
    for name in args.models:
        nets = {"resnet_lab": MODELS.get(name)(num_classes=10).train(),
                "timm": timm.create_model(name, num_classes=10).train()}
        for net in nets.values():
            images_per_second(net, x, y, 1)  # warm-up: oneDNN's kernels chosen, memory allocated
        rates = {key: [] for key in nets}
        for r in range(args.rounds):
            for key in (list(nets) if r % 2 == 0 else list(nets)[::-1]):
                rates[key].append(images_per_second(nets[key], x, y, args.steps))
        ours, theirs = (statistics.median(rates[k]) for k in nets)
        print(f"{name:<12} {ours:>16.1f} {theirs:>11.1f} {ours / theirs:>6.3f}")
        result["models"][name] = {"resnet_lab_images_per_s": ours, "timm_images_per_s": theirs,
                                  "ratio": ours / theirs, "rounds": rates}
    result["loadavg_end"] = os.getloadavg()[0]
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
