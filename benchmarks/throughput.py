"""Training throughput side by side: the d2l.ai ResNet-18 script, the bare step, and resnet_lab.

    python benchmarks/throughput.py --root DIR [--device cpu|cuda] [--steps N] [--json FILE]

Pipelines, all on Fashion-MNIST from DIR at one batch size, fed full batches of 28x28 images:
  baseline         the d2l.ai ResNet-18 script, written out below: torchvision dataset with
                   ToTensor, DataLoader(shuffle, 4 workers), the d2l ResNet-18 (resnet18_d2l),
                   Adam, .item() every step
  bare             forward, backward and Adam step of resnet_lab's resnet18 on one fixed batch
                   in plain torch: the limit of the hardware for those settings
  resnet_lab       resnet_lab.training.engine.train_epoch with the package's own loader, model,
                   optimizer and scheduler, built from the config (eager fp32, as bare)
  bare_best,       the same two at the device's best settings (`settings` below)
  resnet_lab_best

Each pipeline lives in its own child process, so its peak memory is its own; the parent runs
them in turn, round after round (A B C D E, B C D E A, ...), and reports medians, because the
speed of a shared machine drifts over minutes.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from resnet_lab.device import device_name
from resnet_lab.errors import ended

PIPELINES = ("baseline", "bare", "resnet_lab", "bare_best", "resnet_lab_best")
EAGER = {"precision": "fp32", "channels_last": False, "compile": False}
SAMPLE_S = 0.1  # how often the parent reads each pipeline's memory
SETTLE_S = 0.5  # after a baseline round its workers refill their queue: let them, not the next pipeline


def settings(name: str, device: str, width: int) -> dict:
    """EAGER, or for the _best pipelines the device's defaults for resnet18 at `width` (where
    channels_last would crash oneDNN, without it), compiled on CUDA only: on the CPU compilation
    gained nothing in steady state and costs half a minute (docs/speed.md)."""
    if not name.endswith("_best"):
        return EAGER
    from resnet_lab.device import channels_last_hazard, defaults
    from resnet_lab.models import MODELS

    chosen = dict(defaults(device))
    if device == "cpu" and chosen["channels_last"]:
        model = MODELS.get("resnet18")(in_channels=1, num_classes=10, width=width)
        chosen["channels_last"] = channels_last_hazard(model) is None
    return {**chosen, "compile": device == "cuda"}


# ---------------------------------------------------------------------------------------------
# The pipelines: each returns run(steps) -> images trained, and runs in a child process.

def starting_point(root: str, batch_size: int, width: int, device):
    """The d2l.ai ResNet-18 script's parts: its DataLoader of ToTensor images (4 workers, shuffled),
    its network, optimizer and loss."""
    import warnings

    import torch
    from torch import nn
    from torchvision import datasets, transforms

    from resnet_lab.models import MODELS

    # The script's 4 workers on a 2-core machine: torch warns about it, and it is what ran.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    train_data = datasets.FashionMNIST(root, train=True, transform=transforms.ToTensor())
    train_iter = torch.utils.data.DataLoader(train_data, batch_size, shuffle=True, num_workers=4)
    # The script's network: resnet18_d2l is it, logit for logit (tests/test_models.py).
    net = MODELS.get("resnet18_d2l")(in_channels=1, num_classes=10, width=width).to(device)
    return train_iter, net, torch.optim.Adam(net.parameters(), lr=1e-3), nn.CrossEntropyLoss()


def script_step(net, optimizer, loss, X, y, device, metric) -> None:
    """One training step as the script takes it, its two host syncs (.item()) included."""
    optimizer.zero_grad()
    X, y = X.to(device), y.to(device)
    y_hat = net(X)
    l = loss(y_hat, y)  # noqa: E741  (the script's names)
    l.backward()
    optimizer.step()
    metric[0] += l.item() * len(y)
    metric[1] += (y_hat.argmax(1) == y).sum().item()
    metric[2] += len(y)


def baseline(args, device, _settings):
    train_iter, net, optimizer, loss = starting_point(args.root, args.batch_size, args.width, device)
    batches = iter(())
    metric = [0.0, 0, 0]

    def run(steps):
        nonlocal batches
        net.train()
        for _ in range(steps):
            X, y = next(batches, (None, None))
            if X is None or len(y) < args.batch_size:  # the script's next epoch (full batches only)
                batches = iter(train_iter)
                X, y = next(batches)
            script_step(net, optimizer, loss, X, y, device, metric)
        return steps * args.batch_size

    return run


def bare(args, device, s):
    import torch
    from torch.nn import functional as F
    from torchvision import datasets

    from resnet_lab.models import MODELS

    data = datasets.FashionMNIST(args.root, train=True)
    x = data.data[:args.batch_size].unsqueeze(1).float().div(255).to(device)
    y = data.targets[:args.batch_size].to(device)
    model = MODELS.get("resnet18")(in_channels=1, num_classes=10, width=args.width).to(device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # as resnet_lab's runtime sets it
    if s["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model, dynamic=False) if s["compile"] else model
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda" or None)  # as resnet_lab's
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s["precision"])
    scaler = torch.amp.GradScaler(device.type, enabled=s["precision"] == "fp16")

    def run(steps):
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(forward(x), y)
            if scaler.is_enabled():
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        return steps * args.batch_size

    return run


def resnet_lab(args, device, s):
    return lab_pipeline(device, [
        f"dataset.root={args.root}", "dataset.download=false", f"model.width={args.width}",
        f"trainer.batch_size={args.batch_size}", f"device.precision={s['precision']}",
        f"device.channels_last={s['channels_last']}", f"device.compile={s['compile']}"])


def lab_pipeline(device, overrides):
    """resnet_lab's own parts, built from the config with `overrides` as a run builds them:
    run(steps) -> images trained. Also used by benchmarks/image_folder.py."""
    import torch
    from hydra import compose, initialize_config_module

    from resnet_lab import device as device_setup
    from resnet_lab.config import register_configs, validate
    from resnet_lab.distributed import Ranks
    from resnet_lab.training.engine import RunningTotals, train_epoch
    from resnet_lab.training.trainer import build

    register_configs()
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"device={device.type}", *overrides])
    validate(cfg)
    runtime = device_setup.resolve(cfg.device)
    torch.manual_seed(cfg.seed)
    data, _, forward, optimizer, scheduler, scaler = build(cfg, runtime, Ranks())
    full_batches = data.train.num_samples // data.train.batch_size  # no short last batch
    epoch, start = 1, 0

    def run(steps):
        nonlocal epoch, start
        images = 0
        while steps:
            if start == full_batches:
                epoch, start = epoch + 1, 0
            chunk = min(steps, full_batches - start)
            data.train.limit = start + chunk  # train_epoch runs to the loader's end: the chunk's
            totals = RunningTotals(runtime.device)
            train_epoch(forward, data.train, optimizer, scheduler, scaler, runtime, epoch, totals, start)
            images += totals.seen
            start, steps = start + chunk, steps - chunk
        return images

    run.settings = device_setup.resolved(runtime)  # as the machine settled what the config left open
    return run


BUILDERS = {"baseline": baseline, "bare": bare, "resnet_lab": resnet_lab,
            "bare_best": bare, "resnet_lab_best": resnet_lab}


def child(args) -> None:
    import torch

    device = torch.device(args.device)
    serve(lambda: BUILDERS[args.child](args, device, settings(args.child, args.device, args.width)), device)


def serve(build, device) -> None:
    """In a child: build() the pipeline, then answer the parent's commands, one JSON line each;
    the first says how long build() took (and, for resnet_lab's, the device settings it runs at)."""
    import torch

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, not into the replies
    began = time.perf_counter()
    run = build()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    replies.write(json.dumps({"ready": True, "build_s": time.perf_counter() - began,
                              "settings": getattr(run, "settings", None)}) + "\n")
    for line in sys.stdin:
        command = json.loads(line)
        if "run" in command:
            sync()
            start = time.perf_counter()
            images = run(command["run"])
            sync()
            replies.write(json.dumps({"images": images, "seconds": time.perf_counter() - start}) + "\n")
        else:
            cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
            # ru_maxrss: the child's own peak resident set, in KiB on Linux.
            main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            replies.write(json.dumps({"main_rss_mb": main_mb, "cuda_peak_mb": cuda_mb}) + "\n")
            return


# ---------------------------------------------------------------------------------------------
# The parent: start the children, interleave their rounds, watch their memory.

def process_table():
    """pid -> (parent pid, resident bytes), from /proc."""
    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        table[int(entry)] = (int(fields[1]), int(fields[21]) * page)
    return table


class MemoryWatch(threading.Thread):
    """The peak of the summed RSS of each child and all its descendants (DataLoader workers)."""

    def __init__(self, pids):
        super().__init__(daemon=True)
        self.peak = {pid: 0 for pid in pids}
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(SAMPLE_S):
            table = process_table()
            children = {}
            for pid, (ppid, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            for root in self.peak:
                tree, total = [root], 0
                while tree:
                    pid = tree.pop()
                    total += table.get(pid, (0, 0))[1]
                    tree += children.get(pid, [])
                self.peak[root] = max(self.peak[root], total)


class Child:
    """A pipeline in a process of its own (`command`, which calls serve)."""

    def __init__(self, name, command):
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, command=None):
        if command is not None:
            self.proc.stdin.write(json.dumps(command) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: pipeline {self.name} {ended(self.proc.wait())} (its messages are above)")
        return json.loads(line)


def check_root(root: str) -> None:
    raw = Path(root) / "FashionMNIST" / "raw"
    names = [f"{s}-{k}-idx{n}-ubyte" for s in ("train", "t10k") for k, n in (("images", 3), ("labels", 1))]
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        raise SystemExit(f"error: --root {root}: {', '.join(missing)} not found in {raw} "
                         f"(Fashion-MNIST in torchvision's raw layout)")


def cpu_wait_us():
    """Microseconds that some task has waited for a CPU since boot (Linux PSI), or None."""
    try:
        return int(Path("/proc/pressure/cpu").read_text().split("total=")[1].split()[0])
    except (OSError, IndexError):
        return None


def cpu_ticks():
    """(all, stolen) CPU ticks since boot: stolen is time the hypervisor gave to other machines."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(values[:8]), values[7]


def watch_conditions():
    """How busy the machine is from now on: call the result for the numbers so far. Other programs
    slow every pipeline alike, round by round."""
    load_start, wait_start, start, ticks_start = os.getloadavg(), cpu_wait_us(), time.monotonic(), cpu_ticks()

    def so_far() -> dict:
        wait_end, seconds = cpu_wait_us(), time.monotonic() - start
        ticks = [end - begin for end, begin in zip(cpu_ticks(), ticks_start)]
        return {
            "seconds": seconds,
            "loadavg_start": load_start[0],
            "loadavg_end": os.getloadavg()[0],
            "cpu_wait_share": None if wait_start is None else (wait_end - wait_start) / (seconds * 1e6),
            "cpu_steal_share": ticks[1] / max(ticks[0], 1),
        }

    return so_far


def conditions_line(c: dict) -> str:
    wait = "" if c["cpu_wait_share"] is None else f", some task waiting for a CPU {c['cpu_wait_share']:.0%} of the time"
    return (f"{c['seconds']:.0f} s; load average {c['loadavg_start']:.1f} at the start, "
            f"{c['loadavg_end']:.1f} at the end{wait}; {c['cpu_steal_share']:.0%} of CPU time stolen")


def interleave(children: dict, per_round: int, rounds: int, warmup: int):
    """Warm each child up, then run them in turn, round after round, the order rotating (no fixed
    neighbours): (the images/s of each round, the warm-up seconds), by name."""
    names = tuple(children)
    warm = {name: c.ask({"run": warmup})["seconds"] for name, c in children.items()}
    rates = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            reply = children[name].ask({"run": per_round})
            rates[name].append(reply["images"] / reply["seconds"])
            if name == "baseline":
                time.sleep(SETTLE_S)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items()),
              file=sys.stderr, flush=True)
    return rates, warm


def measure(args) -> dict:
    conditions = watch_conditions()
    common = ["--root", args.root, "--device", args.device, "--width", str(args.width),
              "--batch-size", str(args.batch_size)]
    children = {name: Child(name, [sys.executable, __file__, "--child", name, *common]) for name in PIPELINES}
    watch = MemoryWatch([c.proc.pid for c in children.values()])
    watch.start()
    for c in children.values():
        c.ask()  # ready
    per_round = args.steps // args.rounds
    rates, warmup = interleave(children, per_round, args.rounds, args.warmup)
    results = {}
    for name, c in children.items():
        final = c.ask({"stop": True})
        c.proc.wait()
        results[name] = {
            "images_per_s": statistics.median(rates[name]),
            "images_per_s_rounds": rates[name],
            # Sampled tree peak, or the main process's exact peak if a sample missed it.
            "peak_rss_mb": max(watch.peak[c.proc.pid] / 2**20, final["main_rss_mb"]),
            "main_rss_mb": final["main_rss_mb"],
            "cuda_peak_mb": final["cuda_peak_mb"],
            "warmup_s": warmup[name],
            "model": "resnet18_d2l" if name == "baseline" else "resnet18",
            **settings(name, args.device, args.width),
        }
    watch.stopped.set()
    speed = {name: r["images_per_s"] for name, r in results.items()}
    return {
        "device": args.device,
        "device_name": device_name(args.device),
        "torch": __import__("torch").__version__,
        "batch_size": args.batch_size,
        "width": args.width,
        "steps": per_round * args.rounds,
        "rounds": args.rounds,
        # How busy the machine was: other programs slow every pipeline alike, round by round.
        "conditions": conditions(),
        "results": results,
        "ratios": {
            "resnet_lab/bare": speed["resnet_lab"] / speed["bare"],
            "resnet_lab_best/baseline": speed["resnet_lab_best"] / speed["baseline"],
            "resnet_lab_best/bare_best": speed["resnet_lab_best"] / speed["bare_best"],
        },
    }


def report(out: dict) -> str:
    lines = [f"{out['device_name']}, torch {out['torch']}, batch {out['batch_size']}, width "
             f"{out['width']}, {out['steps']} steps in {out['rounds']} rounds (medians)",
             f"{'pipeline':<16} {'settings':<22} {'images/s':>9} {'peak RSS MB':>12} {'main RSS MB':>12}"
             f"{' CUDA peak MB' if out['device'] == 'cuda' else ''}"]
    for name, r in out["results"].items():
        shown = f"{r['precision']}{' channels_last' if r['channels_last'] else ''}{' compile' if r['compile'] else ''}"
        cuda = f" {r['cuda_peak_mb']:>12.0f}" if r["cuda_peak_mb"] is not None else ""
        lines.append(f"{name:<16} {shown:<22} {r['images_per_s']:>9.1f} {r['peak_rss_mb']:>12.0f} "
                     f"{r['main_rss_mb']:>12.0f}{cuda}")
    lines += [f"{k}: {v:.3f}" for k, v in out["ratios"].items()]
    lines.append(conditions_line(out["conditions"]))
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--steps", type=int, default=240, help="measured steps per pipeline, in all rounds")
    p.add_argument("--rounds", type=int, default=12, help="interleaved rounds; the report takes medians")
    p.add_argument("--warmup", type=int, default=5, help="unmeasured steps per pipeline before round 1")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--width", type=int, default=64, help="base channels of both networks")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", choices=PIPELINES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key in ("steps", "rounds", "warmup", "batch_size", "width"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.steps < args.rounds:
        p.error(f"--steps {args.steps} must be at least --rounds {args.rounds}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        return child(args)
    check_root(args.root)
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        raise SystemExit("error: --device cuda: no CUDA device is available here")
    out = measure(args)
    print(report(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
