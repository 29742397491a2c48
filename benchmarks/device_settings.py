"""resnet_lab's training step at each precision, eager and compiled, side by side, for one network.

    python benchmarks/device_settings.py --root DIR [--device cpu|cuda] [--precision fp32 bf16]
        [--compile false true] [--steps N] [--rounds N] [--json FILE] [OVERRIDE ...]

The network, data, optimizer and schedule are a run's, composed from the config with the
OVERRIDEs (by default experiment=fashion_mnist_fast: the speed preset's network), on Fashion-MNIST
from DIR. Each pair of device.precision and device.compile trains it in a child process of its
own, on full batches, at the device's default memory format, round after round, the order
rotating (benchmarks/throughput.py's machinery). The report gives the median images/s of each,
its ratio to the first setting (fp32 eager by default), the seconds of its warm-up steps
(compilation included), the memory format the device chose, the CPU (or GPU) and how busy the
machine was.
"""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import (  # noqa: E402
    Child,
    check_root,
    conditions_line,
    device_name,
    interleave,
    lab_pipeline,
    serve,
    watch_conditions,
)


def setting_overrides(name: str) -> list:
    precision, mode = name.split("_")
    return [f"device.precision={precision}", f"device.compile={'true' if mode == 'compiled' else 'false'}"]


def measure(args) -> dict:
    names = [f"{p}_{'compiled' if c == 'true' else 'eager'}" for p, c in itertools.product(args.precision, args.compile)]
    conditions = watch_conditions()
    common = ["--root", args.root, "--device", args.device, *args.overrides]
    children = {n: Child(n, [sys.executable, __file__, "--child", n, *common]) for n in names}
    ready = {n: c.ask() for n, c in children.items()}
    rates, warmup = interleave(children, args.steps // args.rounds, args.rounds, args.warmup)
    for c in children.values():
        c.ask({"stop": True})
        c.proc.wait()
    speed = {n: statistics.median(rates[n]) for n in names}
    return {
        "device": args.device,
        "device_name": device_name(args.device),
        "torch": __import__("torch").__version__,
        "overrides": args.overrides,
        "steps": args.steps // args.rounds * args.rounds,
        "rounds": args.rounds,
        "conditions": conditions(),
        "results": {n: {"images_per_s": speed[n], "images_per_s_rounds": rates[n], "warmup_s": warmup[n],
                        f"ratio_to_{names[0]}": speed[n] / speed[names[0]],
                        **{k: ready[n]["settings"][k] for k in ("precision", "memory_format", "compile")}}
                    for n in names},
    }


def report(out: dict) -> str:
    first = next(iter(out["results"]))
    lines = [f"{out['device_name']}, torch {out['torch']}, {' '.join(out['overrides'])}, "
             f"{out['steps']} steps in {out['rounds']} rounds (medians)",
             f"{'setting':<16} {'memory format':<15} {'images/s':>9} {'/ ' + first:>16} {'warm-up s':>10}"]
    for name, r in out["results"].items():
        lines.append(f"{name:<16} {r['memory_format']:<15} {r['images_per_s']:>9.1f} "
                     f"{r[f'ratio_to_{first}']:>16.3f} {r['warmup_s']:>10.1f}")
    lines.append(conditions_line(out["conditions"]))
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--precision", nargs="+", choices=("fp32", "bf16", "fp16"), default=["fp32", "bf16"])
    p.add_argument("--compile", nargs="+", choices=("false", "true"), default=["false", "true"])
    p.add_argument("--steps", type=int, default=120, help="measured steps per setting, in all rounds")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds; the report takes medians")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per setting before round 1")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", default=["experiment=fashion_mnist_fast"],
                   help="config overrides that choose the network (default: experiment=fashion_mnist_fast)")
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device here")
    if args.child:
        overrides = [f"dataset.root={args.root}", "dataset.download=false", *args.overrides,
                     *setting_overrides(args.child)]
        serve(lambda: lab_pipeline(torch.device(args.device), overrides), torch.device(args.device))
        return
    check_root(args.root)
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
