"""Time to accuracy, side by side: the d2l.ai ResNet-18 script against resnet_lab presets, each
timed from its launch, on the same machine in one invocation.

    python benchmarks/time_to_accuracy.py --root DIR [--preset fashion_mnist_fast fashion_mnist_fast3x]
        [--reps 2] [--device auto|cpu|cuda] [--max-seconds S] [--json FILE] [--run-dir DIR] [OVERRIDE ...]

Each repetition runs the script and every preset one after the other, the order rotated by one
each repetition (baseline, A, B; then A, B, baseline; ...), as child processes on Fashion-MNIST
from DIR:
  baseline  the d2l.ai ResNet-18 script (benchmarks/throughput.py's baseline pipeline): a DataLoader
            of ToTensor images with 4 workers, the d2l ResNet-18, Adam 1e-3, batch 256, 2 epochs,
            and its test accuracy after each epoch
  presets   `python -m resnet_lab experiment=PRESET`, watched through its metrics.jsonl; further
            OVERRIDEs go to each as they are (e.g. device.compile=true)
Reported for each: the wall seconds from launch to each epoch's evaluation and the test accuracy
there; for each preset, the seconds to 0.90, 0.92, 0.93, 0.94 and 0.95, and its accuracy at 1x and
3x the script's wall time (its last epoch evaluated by then: no epoch is chosen on the test
split); medians over the repetitions; the CPU (or GPU) and the load average.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resnet_lab.errors import ended

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput  # noqa: E402  (the d2l.ai ResNet-18 script's parts, the machine's name)

POLL_S = 0.1
TARGETS = (0.90, 0.92, 0.93, 0.94, 0.95)
HORIZONS = (1, 3)  # the budgets the accuracy is reported at, in baseline wall times
STOP_TIMEOUT_S = 120  # for a run stopped at --max-seconds to write its checkpoint and exit


def rows(path: Path) -> list:
    """The complete rows of a metrics.jsonl that is still being appended to."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines() if line.strip()]


def baseline_child(args) -> None:
    """The d2l.ai ResNet-18 script's 2 epochs, printing each epoch's test accuracy as a JSON line."""
    import torch
    from torchvision import datasets, transforms

    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    train_iter, net, optimizer, loss = throughput.starting_point(args.root, args.batch_size, args.width, device)
    test_data = datasets.FashionMNIST(args.root, train=False, transform=transforms.ToTensor())
    test_iter = torch.utils.data.DataLoader(test_data, args.batch_size, shuffle=False, num_workers=4)
    for epoch in range(1, 3):
        net.train()
        metric = [0.0, 0, 0]
        for i, (X, y) in enumerate(train_iter):
            if args.batches and i == args.batches:
                break
            throughput.script_step(net, optimizer, loss, X, y, device, metric)
        net.eval()
        right = seen = 0
        with torch.no_grad():
            for X, y in test_iter:
                right += (net(X.to(device)).argmax(1) == y.to(device)).sum().item()
                seen += len(y)
        print(json.dumps({"epoch": epoch, "train_loss": metric[0] / metric[2], "test_acc": right / seen}), flush=True)


def run_baseline(args) -> list:
    command = [sys.executable, __file__, "--child", "--root", args.root, "--device", args.device,
               "--batch-size", str(args.batch_size), "--width", str(args.width), "--batches", str(args.batches)]
    launched = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    epochs = [{**json.loads(line), "wall_s": time.perf_counter() - launched} for line in proc.stdout]
    if proc.wait():
        raise SystemExit(f"error: the d2l.ai ResNet-18 script {ended(proc.returncode)} (its messages are above)")
    return epochs


def run_preset(args, preset: str, run_dir: Path) -> list:
    overrides = [f"experiment={preset}", f"dataset.root={args.root}", "dataset.download=false",
                 f"device={args.device}", "trainer.progress=false", "logger=none", f"hydra.run.dir={run_dir}",
                 *args.overrides]
    metrics, seen, stopped = run_dir / "metrics.jsonl", [], False
    # A file, not a pipe: nobody reads a pipe while the run trains, and a full one would stop it.
    with tempfile.TemporaryFile("w+") as errors:
        launched = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "resnet_lab", *overrides], stderr=errors, text=True)
        while proc.poll() is None:
            time.sleep(POLL_S)
            seen += [{**row, "wall_s": time.perf_counter() - launched} for row in rows(metrics)[len(seen):]]
            if args.max_seconds is not None and time.perf_counter() - launched > args.max_seconds and not stopped:
                proc.send_signal(signal.SIGTERM)  # the run writes its checkpoint and exits
                stopped = True
        proc.wait(timeout=STOP_TIMEOUT_S)
        # 143: our SIGTERM stopped it after a step; -15: before it set up its handler.
        if proc.returncode != 0 and not (stopped and proc.returncode in (128 + signal.SIGTERM, -signal.SIGTERM)):
            errors.seek(0)
            raise SystemExit(f"{errors.read()[-3000:]}\nerror: the run {ended(proc.returncode)}; its log: "
                             f"{run_dir / 'train.log'}")
    # Rows written as it exited were never seen while it ran: they have no wall time.
    return seen + [{**row, "wall_s": None} for row in rows(metrics)[len(seen):]]


def summary(baseline: list, preset: list) -> dict:
    """A preset against one repetition's baseline: seconds to each target, and the accuracy of its
    last epoch evaluated within each horizon (in baseline wall times)."""
    budget = baseline[-1]["wall_s"]
    timed = [r for r in preset if r["wall_s"] is not None]
    return {
        "seconds_to": {str(t): next((r["wall_s"] for r in timed if r["test_acc"] >= t), None) for t in TARGETS},
        **{f"acc_at_{h}x": ([r["test_acc"] for r in timed if r["wall_s"] <= h * budget] or [None])[-1]
           for h in HORIZONS},
    }


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def measure(args, where: Path) -> dict:
    load_start, reps = os.getloadavg()[0], []
    runs = ["baseline", *args.preset]
    for rep in range(args.reps):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]
        got = {}
        for name in order:
            print(f"repetition {rep + 1}/{args.reps}: {name}", file=sys.stderr, flush=True)
            got[name] = run_baseline(args) if name == "baseline" else run_preset(args, name, where / f"{name}{rep + 1}")
        reps.append({"order": order, "baseline": got["baseline"], "baseline_wall_s": got["baseline"][-1]["wall_s"],
                     "baseline_acc": got["baseline"][-1]["test_acc"],
                     "presets": {name: {"epochs": got[name], **summary(got["baseline"], got[name])}
                                 for name in args.preset}})
    keys = [f"acc_at_{h}x" for h in HORIZONS]
    return {
        "device_name": throughput.device_name("cuda" if args.device != "cpu" and cuda() else "cpu"),
        "torch": __import__("torch").__version__,
        "presets": args.preset,
        "overrides": args.overrides,
        "loadavg": {"start": load_start, "end": os.getloadavg()[0]},
        "repetitions": reps,
        "medians": {
            "baseline_wall_s": median(r["baseline_wall_s"] for r in reps),
            "baseline_acc": median(r["baseline_acc"] for r in reps),
            "presets": {name: {**{k: median(r["presets"][name][k] for r in reps) for k in keys},
                               "seconds_to": {str(t): median(r["presets"][name]["seconds_to"][str(t)] for r in reps)
                                              for t in TARGETS}}
                        for name in args.preset},
        },
    }


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def report(out: dict) -> str:
    show = lambda v, f="{:.1f}": "-" if v is None else f.format(v)  # noqa: E731
    lines = [f"{out['device_name']}, torch {out['torch']}; load average {out['loadavg']['start']:.1f} at the start, "
             f"{out['loadavg']['end']:.1f} at the end",
             f"{'rep':>3} {'run':<24} {'epoch':>5} {'wall s':>7} {'test acc':>8}"]
    for i, rep in enumerate(out["repetitions"], 1):
        for name in rep["order"]:
            epochs = rep["baseline"] if name == "baseline" else rep["presets"][name]["epochs"]
            lines += [f"{i:>3} {name:<24} {r['epoch']:>5} {show(r['wall_s']):>7} {r['test_acc']:>8.4f}" for r in epochs]
    m = out["medians"]
    lines.append(f"medians: baseline {show(m['baseline_acc'], '{:.4f}')} at {show(m['baseline_wall_s'])} s")
    for name, p in m["presets"].items():
        lines.append(f"  {name}: " + ", ".join(f"at {h}x {show(p[f'acc_at_{h}x'], '{:.4f}')}" for h in HORIZONS)
                     + "; seconds to " + ", ".join(f"{t}: {show(s)}" for t, s in p["seconds_to"].items()))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--preset", nargs="+", default=["fashion_mnist_fast", "fashion_mnist_fast3x"],
                   help="the experiment= presets to time")
    p.add_argument("--reps", type=int, default=2, help="repetitions, alternating which runs first")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-seconds", type=float, help="stop a preset run after this many seconds from launch")
    p.add_argument("--batch-size", type=int, default=256, help="the d2l.ai ResNet-18 script's batch size")
    p.add_argument("--width", type=int, default=64, help="the d2l.ai ResNet-18 script's network width")
    p.add_argument("--batches", type=int, default=0, help="the script's training batches per epoch (0: all)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--run-dir", help="a folder for the presets' runs, one per preset and repetition (default: a new "
                                     "temporary one, kept, so that a failed run's log stays)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="more config overrides for the preset's runs")
    args = p.parse_args(argv)
    # --preset takes every word after it; the overrides that follow it are those with an '='.
    args.overrides = [w for w in args.preset if "=" in w] + args.overrides
    args.preset = [w for w in args.preset if "=" not in w]
    if not args.preset:
        p.error("--preset: name at least one experiment preset")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return baseline_child(args)
    throughput.check_root(args.root)
    if args.device == "cuda" and not cuda():
        raise SystemExit("error: --device cuda: no CUDA device is available here")
    out = measure(args, Path(args.run_dir or tempfile.mkdtemp(prefix="time_to_accuracy_")))
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
