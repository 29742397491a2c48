"""image_folder against the built-in tensor path: the same network on the same images, three ways;
and with --decoders, the image decoders side by side.

    python benchmarks/image_folder.py --root DATA_ROOT --pngs DIR [--device cpu|cuda] [--steps N] [--json FILE]
    python benchmarks/image_folder.py --root DATA_ROOT --pngs DIR --decoders [--rounds N] [--files N] [--json FILE]

Fashion-MNIST from DATA_ROOT (FashionMNIST/raw/*-ubyte) is written out once as PNGs into DIR
(benchmarks/fashion_mnist_pngs.py), then ResNet-18 trains on it as
  idx        the built-in fashion_mnist dataset: IDX files decoded into one tensor
  cached     dataset=image_folder, decoded once into its cache, then mapped from it
  streaming  dataset=image_folder dataset.cache=false: DataLoader workers decode the PNGs
Before those, one run builds the cache from nothing (in a fresh folder): its start-up less the
warm cached run's is the one-time decode. Each pipeline runs in its own process, in rounds, as
in benchmarks/throughput.py, whose machinery this reuses; the report gives median images/s, the
ratios to idx, the start-up seconds (data and model built) of each, and how busy the machine was.

--decoders times one image decoded to a uint8 tensor, in this process on one thread, by
  torchvision.io  decode_image(read_file(path)), resnet_lab's decoder until torchvision 0.29
                  deprecated it
  torchcodec      resnet_lab.data.images.decode, which decodes with TorchCodec
  PIL             Image.open(path).convert(mode), then to a tensor
on 28x28 grey PNGs (Fashion-MNIST's) and on 500x375 colour PNGs and JPEGs (quality 90) tiled
from them, the decoders taking turns in rounds; the report gives the median microseconds, and
whether the three gave the same pixels for every file.
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
DECODERS = ("torchvision.io", "torchcodec", "PIL")


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


def decoders():
    """name -> decode(path, channels) -> uint8 channels x H x W."""
    import warnings

    import torch
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as TF

    from resnet_lab.data.images import decode

    def torchvision_io(path, channels):
        with warnings.catch_warnings():  # its deprecation, once a call: resnet_lab filtered it too
            warnings.simplefilter("ignore", DeprecationWarning)
            image = decode_image(read_file(path), mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        return TF.to_dtype(image, torch.uint8, scale=True)

    def pil(path, channels):
        with Image.open(path) as im:
            return TF.pil_to_tensor(im.convert("L" if channels == 1 else "RGB"))

    return dict(zip(DECODERS, (torchvision_io, decode, pil)))


def decode_files(pngs: Path, folder: Path, n_files: int) -> dict:
    """kind -> (paths, channels): the first `n_files` Fashion-MNIST test PNGs, and as many colour
    PNGs and JPEGs of 500x375 tiled from them (three images a pixel's channels), in `folder`."""
    import numpy as np
    from PIL import Image

    small = sorted(str(p) for p in (pngs / "test").rglob("*.png"))[:n_files]
    grey = np.stack([np.asarray(Image.open(p)) for p in small])
    rows, cols = -(-375 // 28), -(-500 // 28)
    files = {"28x28 grey PNG": (small, 1), "500x375 colour PNG": ([], 3), "500x375 colour JPEG": ([], 3)}
    for n in range(len(small)):
        picks = [(n * 3 + c + np.arange(rows * cols)) % len(grey) for c in range(3)]
        planes = [grey[i].reshape(rows, cols, 28, 28).transpose(0, 2, 1, 3).reshape(rows * 28, cols * 28)
                  for i in picks]
        image = Image.fromarray(np.stack(planes, -1)[:375, :500], "RGB")
        for kind, suffix, options in (("500x375 colour PNG", ".png", {}),
                                      ("500x375 colour JPEG", ".jpg", {"quality": 90})):
            path = folder / f"{n}{suffix}"
            image.save(path, **options)
            files[kind][0].append(str(path))
    return files


def measure_decoders(args) -> dict:
    import time

    import torch

    torch.set_num_threads(1)
    conditions = watch_conditions()
    folder = Path(tempfile.mkdtemp(prefix="image_folder_decode_"))
    try:
        files, decode = decode_files(Path(args.pngs), folder, args.files), decoders()
        us = {kind: {name: [] for name in DECODERS} for kind in files}
        same = {kind: all(all(torch.equal(decode[name](path, channels), decode["PIL"](path, channels))
                              for name in DECODERS) for path in paths)
                for kind, (paths, channels) in files.items()}
        for r in range(args.rounds + 1):  # round 0 warms the caches up, unmeasured
            order = DECODERS[r % len(DECODERS):] + DECODERS[:r % len(DECODERS)]
            for kind, (paths, channels) in files.items():
                for name in order:
                    began = time.perf_counter()
                    for path in paths:
                        decode[name](path, channels)
                    if r:
                        us[kind][name].append((time.perf_counter() - began) / len(paths) * 1e6)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "device_name": device_name("cpu"),
        "torch": torch.__version__, "torchvision": __import__("torchvision").__version__,
        "torchcodec": __import__("torchcodec").__version__, "pillow": __import__("PIL").__version__,
        "files": args.files, "rounds": args.rounds,
        "conditions": conditions(),
        "us_per_image": {kind: {n: statistics.median(v) for n, v in by.items()} for kind, by in us.items()},
        "us_per_image_rounds": us,
        "same_pixels": same,
    }


def report_decoders(out: dict) -> str:
    lines = [f"{out['device_name']}, one thread; torchvision {out['torchvision']}, torchcodec "
             f"{out['torchcodec']}, Pillow {out['pillow']}; {out['files']} files a kind, "
             f"{out['rounds']} rounds (median us per image)",
             f"{'':<20}" + "".join(f"{n:>15}" for n in DECODERS) + f"{'torchcodec/torchvision.io':>27}"
             + f"{'same pixels':>13}"]
    for kind, by in out["us_per_image"].items():
        lines.append(f"{kind:<20}" + "".join(f"{by[n]:>15.1f}" for n in DECODERS)
                     + f"{by['torchcodec'] / by['torchvision.io']:>27.3f}"
                     + f"{'yes' if out['same_pixels'][kind] else 'NO':>13}")
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
    p.add_argument("--decoders", action="store_true", help="time the image decoders instead")
    p.add_argument("--files", type=int, default=200, help="--decoders: images of each kind")
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
    out = measure_decoders(args) if args.decoders else measure(args)
    print(report_decoders(out) if args.decoders else report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
