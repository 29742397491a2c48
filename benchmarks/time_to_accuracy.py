"""Seconds to a test accuracy: the real `python -m resnet_lab`, timed from its launch.

    python benchmarks/time_to_accuracy.py --root DIR [--target 0.92] [--max-epochs 30] [--max-seconds S]
                                          [--device auto|cpu|cuda] [--json FILE] [OVERRIDE ...]

Runs ResNet-18 with the CIFAR stem (3x3, no max-pool: 28x28 inputs keep their resolution) and
flip_crop augmentation on Fashion-MNIST from DIR, otherwise the starting-point recipe (Adam 1e-3,
batch 256), as a child process in a fresh run folder. It watches the run's metrics.jsonl and stops
the run (SIGTERM: the run writes its checkpoint and exits) at the first epoch whose test accuracy
reaches the target. Reported: the wall seconds from launch to that epoch's row (start-up, reading
the data, compilation and evaluation included) and the training seconds summed over the epochs.
Further OVERRIDEs go to the run as they are, e.g. device.compile=true or optim.lr=2e-3.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resnet_lab.errors import ended

POLL_S = 0.1
STOP_TIMEOUT_S = 120  # for the run to write its checkpoint and exit once stopped
RECIPE = ["model=resnet18", "model.stem=cifar", "dataset=fashion_mnist", "dataset.augment=flip_crop",
          "optim=adam", "optim.lr=1e-3", "sched=none", "trainer.batch_size=256", "logger=none"]


def rows(path: Path) -> list:
    """The complete rows of a metrics.jsonl that is still being appended to."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def device_name(device: str) -> str:
    import torch

    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"


def measure(args, run_dir: Path) -> dict:
    overrides = [*RECIPE, f"dataset.root={args.root}", "dataset.download=false", f"device={args.device}",
                 f"trainer.epochs={args.max_epochs}", "trainer.progress=false", f"hydra.run.dir={run_dir}",
                 *args.overrides]
    metrics = run_dir / "metrics.jsonl"
    seen, reached, stopped = [], None, False
    # A file, not a pipe: nobody reads a pipe while the run trains, and a full one would stop it.
    with tempfile.TemporaryFile("w+") as errors:
        launched = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "resnet_lab", *overrides], stderr=errors, text=True)
        out_of_time = False
        while reached is None and proc.poll() is None and not out_of_time:
            time.sleep(POLL_S)
            out_of_time = args.max_seconds is not None and time.perf_counter() - launched > args.max_seconds
            for row in rows(metrics)[len(seen):]:
                seen.append({**row, "wall_s": time.perf_counter() - launched})
                print(f"epoch {row['epoch']}: test acc {row['test_acc']:.4f} at {seen[-1]['wall_s']:.1f} s",
                      file=sys.stderr, flush=True)
                if reached is None and row["test_acc"] >= args.target:
                    reached = seen[-1]
        if proc.poll() is None:  # reached, or out of time
            proc.send_signal(signal.SIGTERM)
            stopped = True
        proc.wait(timeout=STOP_TIMEOUT_S)
        # 0: it finished its epochs (the last may be the one); 143: our SIGTERM stopped it after a
        # step; -15: our SIGTERM came before it set up its handler (still starting).
        if proc.returncode != 0 and not (stopped and proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM)):
            errors.seek(0)
            raise SystemExit(f"{errors.read()[-3000:]}\nerror: the run {ended(proc.returncode)}; its log: "
                             f"{run_dir / 'train.log'}")
    seen += [{**row, "wall_s": None} for row in rows(metrics)[len(seen):]]  # written as it exited
    reached = reached or next((r for r in seen if r["test_acc"] >= args.target), None)
    return {
        "device": args.device,
        "device_name": device_name(args.device),
        "target": args.target,
        "overrides": overrides,
        "reached": reached is not None,
        "epoch": reached and reached["epoch"],
        "wall_s": reached and reached["wall_s"],
        "train_s": reached and sum(r["seconds"] for r in seen if r["epoch"] <= reached["epoch"]),
        "test_acc": reached and reached["test_acc"],
        "epochs": seen,
    }


def report(out: dict) -> str:
    if not out["reached"]:
        return (f"{out['device_name']}: test accuracy {out['target']} not reached in "
                f"{len(out['epochs'])} epochs (best {max((r['test_acc'] for r in out['epochs']), default=0):.4f})")
    return (f"{out['device_name']}: test accuracy {out['test_acc']:.4f} >= {out['target']} at epoch "
            f"{out['epoch']}, {out['wall_s']:.1f} s from launch ({out['train_s']:.1f} s of training)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--target", type=float, default=0.92, help="test accuracy to reach, in (0, 1]")
    p.add_argument("--max-epochs", type=int, default=30, help="give up after this many epochs")
    p.add_argument("--max-seconds", type=float, help="give up after this many seconds from launch")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--run-dir", help="a new folder for the run, kept (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="more config overrides for the run")
    args = p.parse_args(argv)
    if not 0 < args.target <= 1:
        p.error(f"--target {args.target}: a test accuracy in (0, 1]")
    if args.max_epochs < 1:
        p.error("--max-epochs must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        out = measure(args, Path(args.run_dir) if args.run_dir else Path(tmp) / "run")
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
