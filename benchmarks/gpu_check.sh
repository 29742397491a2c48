#!/usr/bin/env bash
# Every GPU check in one command, for a GPU machine lent for a few minutes: the CUDA tests, the
# throughput benchmark, the time-to-accuracy presets against the d2l.ai script, image_folder
# against the IDX path (its PNGs go to a temporary folder, not OUT), one epoch of
# experiment=cifar10_resnet56 for its images/s (on CIFAR-10-sized random images: there is no
# CIFAR-10 on a machine that reaches nothing, and the pixels do not change the speed), and
# experiment=fashion_mnist_resnet18's whole schedule (hours on 2 CPU cores). The two runs' folders
# are temporary; their metrics.jsonl (and the ResNet-18's train.log) go into OUT. Each step has a
# time limit, so one that hangs leaves time for the rest: the whole takes at most 6 limits
# (GPU_CHECK_LIMIT_S=90 for a machine lent 10 minutes a call); logs and JSON results go into OUT.
#
#   bash benchmarks/gpu_check.sh DATA_ROOT OUT     (DATA_ROOT holds FashionMNIST/raw/*-ubyte)
set -u -o pipefail
root=${1:?usage: bash benchmarks/gpu_check.sh DATA_ROOT OUT}
out=${2:?usage: bash benchmarks/gpu_check.sh DATA_ROOT OUT}
limit=${GPU_CHECK_LIMIT_S:-170}  # seconds per step
root=$(cd "$root" && pwd) && out=$(mkdir -p "$out" && cd "$out" && pwd) || exit 2
export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
python=${PYTHON:-python}  # the interpreter that has torch and resnet_lab
cd "$(dirname "$0")/.."

step() {  # step NAME COMMAND...: run it under the time limit, its output to OUT/NAME.log
    local name=$1 status
    shift
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    status=$?
    if ((status == 124)); then
        echo "== $name: stopped at the ${limit} s limit"
    elif ((status > 128)); then  # the shell's 128 + N for a death by signal N
        echo "== $name: died of SIG$(kill -l $((status - 128))) (signal $((status - 128))); its log: $out/$name.log"
    else
        echo "== $name: exit status $status"
    fi
    echo "$name $status" >>"$out/status.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$python" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee "$out/gpu.txt"
step tests "$python" -m pytest -q -rs tests/test_cuda.py tests/test_device.py
step throughput "$python" benchmarks/throughput.py --root "$root" --device cuda --json "$out/throughput.json"
step time_to_accuracy "$python" benchmarks/time_to_accuracy.py --root "$root" --device cuda \
    --max-seconds $((limit > 80 ? limit - 40 : limit / 2)) --json "$out/time_to_accuracy.json"
step image_folder "$python" benchmarks/image_folder.py --root "$root" --pngs "${TMPDIR:-/tmp}/fmnist_png" \
    --device cuda --json "$out/image_folder.json"
run56=${TMPDIR:-/tmp}/cifar10_resnet56_epoch
rm -rf "$run56"  # a finished run in it would be resumed as done, and time nothing
step cifar10_resnet56_epoch "$python" -m resnet_lab experiment=cifar10_resnet56 dataset=synthetic \
    dataset.train_size=50000 dataset.test_size=10000 dataset.augment=flip_crop trainer.epochs=1 \
    device=cuda logger=none trainer.progress=false hydra.run.dir="$run56"
cp "$run56/metrics.jsonl" "$out/cifar10_resnet56_epoch.jsonl" 2>/dev/null
run18=${TMPDIR:-/tmp}/fashion_mnist_resnet18
step resnet18_schedule "$python" -m resnet_lab experiment=fashion_mnist_resnet18 dataset.root="$root" \
    dataset.download=false device=cuda logger=none trainer.progress=false hydra.run.dir="$run18"
cp "$run18/metrics.jsonl" "$run18/train.log" "$out/" 2>/dev/null
