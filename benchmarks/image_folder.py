"""image_folder against the built-in tensor path: the same network on the same images, three ways.

    python benchmarks/image_folder.py --root DATA_ROOT --pngs DIR [--device cpu|cuda] [--steps N] [--json FILE]

Fashion-MNIST from DATA_ROOT (FashionMNIST/raw/*-ubyte) is written out once as PNGs into DIR
(benchmarks/fashion_mnist_pngs.py), then ResNet-18 trains on it as
  idx        the built-in fashion_mnist dataset: IDX files decoded into one tensor
  cached     dataset=image_folder, decoded once into its cache, then mapped from it
  streaming  dataset=image_folder dataset.cache=false: DataLoader workers decode the PNGs
Before those, one run builds the cache from nothing (in a fresh folder): its start-up less the
warm cached run's is the one-time decode. Each pipeline runs in its own process, in rounds, as
in benchmarks/throughput.py, whose machinery this reuses; the report gives median images/s, the
ratios to idx, the start-up seconds (data and model built) of each, and how busy the machine was.
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fashion_mnist_pngs import write_pngs  # noqa: E402
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

PIPELINES = ("idx", "cached", "streaming")


def overrides(args, name: str, cache_dir: str) -> list:
    common = [f"model.width={args.width}", f"trainer.batch_size={args.batch_size}", "device.precision=fp32",
              "device.channels_last=false"]
    if name == "idx":
        return [*common, f"dataset.root={args.root}", "dataset.download=false"]
    folder = ["dataset=image_folder", f"dataset.root={args.pngs}", f"dataset.cache_dir={cache_dir}",
              f"dataset.num_workers={args.workers}"]
    return [*common, *folder, f"dataset.cache={'true' if name == 'cached' else 'false'}"]


def start(args, name: str, cache_dir: str) -> Child:
    command = [sys.executable, __file__, "--child", name, "--root", args.root, "--pngs", args.pngs,
               "--device", args.device, "--width", str(args.width), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--cache-dir", cache_dir]
    return Child(name, command)


def measure(args) -> dict:
    conditions = watch_conditions()
    cache_dir = tempfile.mkdtemp(prefix="image_folder_cache_")
    try:
        cold = start(args, "cached", cache_dir)
        cold_s = cold.ask()["build_s"]
        cold.ask({"stop": True})
        children, build_s = {}, {}
        for name in PIPELINES:  # one after another: each start-up alone on the machine
            children[name] = start(args, name, cache_dir)
            build_s[name] = children[name].ask()["build_s"]
        per_round = args.steps // args.rounds
        rates, _ = interleave(children, per_round, args.rounds, args.warmup)
        for c in children.values():
            c.ask({"stop": True})
            c.proc.wait()
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    speed = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "device": args.device,
        "device_name": device_name(args.device),
        "torch": __import__("torch").__version__,
        "batch_size": args.batch_size, "width": args.width, "workers": args.workers,
        "steps": per_round * args.rounds, "rounds": args.rounds,
        "conditions": conditions(),
        "images_per_s": speed,
        "images_per_s_rounds": rates,
        "startup_s": build_s,
        "cold_cache_startup_s": cold_s,
        "decode_s": cold_s - build_s["cached"],
        "ratios": {"cached/idx": speed["cached"] / speed["idx"], "streaming/idx": speed["streaming"] / speed["idx"]},
    }


def report(out: dict) -> str:
    lines = [f"{out['device_name']}, torch {out['torch']}, resnet18 width {out['width']}, batch "
             f"{out['batch_size']}, {out['workers']} workers, {out['steps']} steps in {out['rounds']} rounds (medians)",
             f"{'pipeline':<10} {'images/s':>9} {'start-up s':>11}"]
    for name in PIPELINES:
        lines.append(f"{name:<10} {out['images_per_s'][name]:>9.1f} {out['startup_s'][name]:>11.2f}")
    lines += [f"{k}: {v:.3f}" for k, v in out["ratios"].items()]
    lines.append(f"one-time decode into the cache: {out['decode_s']:.1f} s (start-up with a cold cache "
                 f"{out['cold_cache_startup_s']:.1f} s, warm {out['startup_s']['cached']:.2f} s)")
    lines.append(conditions_line(out["conditions"]))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--pngs", required=True, help="the PNG image folder (written there if not yet complete)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--steps", type=int, default=120, help="measured steps per pipeline, in all rounds")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per pipeline before round 1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="dataset.num_workers of the image_folder runs")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        import torch

        device = torch.device(args.device)
        return serve(lambda: lab_pipeline(device, overrides(args, args.child, args.cache_dir)), device)
    check_root(args.root)
    seconds = write_pngs(args.root, Path(args.pngs))
    if seconds:
        print(f"wrote the PNGs into {args.pngs} in {seconds:.0f} s", file=sys.stderr)
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
