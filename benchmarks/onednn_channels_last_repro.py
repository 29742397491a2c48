"""Which convolutions crash torch's oneDNN CPU kernels in channels_last: the plain-torch
reproduction behind resnet_lab's channels_last rule (resnet_lab/device.py, `channels_last_hazard`).

    python benchmarks/onednn_channels_last_repro.py [--isa AVX2,default] [--threads 1,2] [--quick]

Each case is one convolution, channels_last, forward and backward on a channels_last input, run
in a child process of its own (a crash is a signal, a hang is a timeout) under
ONEDNN_MAX_CPU_ISA=<isa>. It prints the torch version and this CPU's capability, then one row a
case: ok, or how it died. Found with torch 2.14.1 on AMD EPYC (AVX-512 CPU, and the same CPU
capped at AVX2): `nn.Conv2d(4, 8, 1, stride=2)` on a 32x4x28x28 input dies with SIGBUS, SIGSEGV
or `double free or corruption` under AVX2. Rerun it when torch moves, and update the rule.
"""

import argparse
import itertools
import os
import signal
import subprocess
import sys

CHILD = """
import sys, torch
torch.set_num_threads({threads})
cin, cout, k, stride, size, batch = {cin}, {cout}, {k}, {stride}, {size}, {batch}
conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False).to(memory_format=torch.channels_last)
x = torch.randn(batch, cin, size, size).to(memory_format=torch.channels_last).requires_grad_()
for _ in range(3):
    conv(x).sum().backward()
"""
TIMEOUT_S = 60


def run_case(isa: str, threads: int, cin: int, cout: int, k: int, stride: int, size: int, batch: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if isa != "default":
        env["ONEDNN_MAX_CPU_ISA"] = isa
    code = CHILD.format(threads=threads, cin=cin, cout=cout, k=k, stride=stride, size=size, batch=batch)
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"hung (> {TIMEOUT_S} s)"
    if done.returncode < 0:
        return f"died of {signal.Signals(-done.returncode).name}"
    if done.returncode:
        return f"failed: {done.stderr.strip().splitlines()[-1][:80]}"
    return "ok"


def cases(quick: bool):
    if quick:  # the case, its neighbours, and the stride-1 / 3x3 controls
        yield from [(4, 8, 1, 2, 28, 32), (6, 12, 1, 2, 28, 32), (8, 16, 1, 2, 28, 32), (4, 8, 1, 1, 28, 32),
                    (4, 8, 3, 2, 28, 32), (3, 8, 1, 2, 28, 32), (12, 24, 1, 2, 28, 32), (16, 32, 1, 2, 28, 32)]
        return
    for cin in (1, 2, 3, 4, 6, 7, 8, 12, 15, 16, 24):
        yield cin, 2 * cin, 1, 2, 28, 32
    for k, stride in ((1, 1), (3, 1), (3, 2)):
        for cin in (2, 4, 6):
            yield cin, 2 * cin, k, stride, 28, 32
    for size, batch in ((8, 32), (28, 4)):
        yield 4, 8, 1, 2, size, batch
    for cin in (4, 8, 12):  # larger images: the AVX-512 kernels take another path there
        for size in (56, 112):
            yield cin, 2 * cin, 1, 2, size, 32


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", default="AVX2,default", help="ONEDNN_MAX_CPU_ISA values, comma-separated")
    parser.add_argument("--threads", default="1", help="thread counts, comma-separated")
    parser.add_argument("--quick", action="store_true", help="only the issue's case and its neighbours")
    args = parser.parse_args()
    import torch

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{os.cpu_count()} cores")
    print(f"{'isa':8} {'thr':>3} {'cin':>3} {'cout':>4} {'k':>2} {'s':>2} {'size':>4} {'batch':>5}  result")
    for isa, threads in itertools.product(args.isa.split(","), map(int, args.threads.split(","))):
        for case in cases(args.quick):
            result = run_case(isa, threads, *case)
            print(f"{isa:8} {threads:>3} " + " ".join(f"{v:>{w}}" for v, w in zip(case, (3, 4, 2, 2, 4, 5)))
                  + f"  {result}", flush=True)


if __name__ == "__main__":
    main()
