"""The whole run on a CUDA GPU (skipped without one): each device setting end to end, a stop
and resume, checkpoints moving between the GPU and the CPU, and two ranks over NCCL."""

import math
import subprocess
import sys

import pytest
import torch

from resnet_lab import device as device_setup
from resnet_lab import distributed, rundir
from resnet_lab.optim import build_optimizer
from resnet_lab.training.engine import RunningTotals, train_epoch
from resnet_lab.training.features import build_features
from resnet_lab.training.train import train
from resnet_lab.training.trainer import build
from tests.runs import metrics, start, stop_at
from tests.test_reliability import TINY, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# test_reliability's tiny run (3 epochs of 6 steps), at the GPU's settings.
GPU = ["device=cuda", "device.precision=null", "device.channels_last=null", "trainer.deterministic=false",
       "trainer.checkpoint_every_steps=0", "logger=none"]


@pytest.mark.parametrize("settings", [
    [],  # the GPU's defaults: bf16 (fp16 before Ampere), channels_last, cudnn.benchmark
    ["device.precision=fp16"],
    ["device.precision=fp32", "device.channels_last=false"],
    ["device.compile=true"],
], ids=["defaults", "fp16", "fp32-eager", "compile"])
def test_run_trains_on_the_gpu(fmnist_root, tmp_path, settings):
    acc = train(tiny_cfg(f"dataset.root={fmnist_root}", *GPU, *settings), tmp_path)
    logged = metrics(tmp_path)
    assert [r["epoch"] for r in logged] == [1, 2, 3]
    assert all(math.isfinite(r["train_loss"]) for r in logged)
    assert logged[-1]["train_loss"] < logged[0]["train_loss"]  # it learns
    assert acc == logged[-1]["test_acc"] and 0 <= acc <= 1
    weights = torch.load(tmp_path / "model.pt", weights_only=True)  # saved as CPU tensors
    assert all(w.device.type == "cpu" and torch.isfinite(w.float()).all() for w in weights.values())


def test_a_recipe_run_trains_on_the_gpu(fmnist_root, tmp_path):
    recipe = ["dataset.val_fraction=0.2", "loss.label_smoothing=0.1", "dataset.mixup_alpha=0.2",
              "dataset.cutmix_alpha=1.0", "dataset.auto_augment=trivial", "dataset.erase_prob=0.25",
              "dataset.rotate=10", "model.drop_path=0.1", "ema.decay=0.9", "optim.clip_grad_norm=1.0",
              "trainer.accumulate=2", "trainer.tta=true", "optim.no_decay_norm_bias=true"]
    acc = train(tiny_cfg(f"dataset.root={fmnist_root}", *GPU, *recipe), tmp_path)
    logged = metrics(tmp_path)
    assert acc == logged[-1]["val_acc"]
    assert all(math.isfinite(r[key]) for r in logged for key in ("train_loss", "test_acc_ema", "grad_norm"))


def test_a_recipe_step_does_not_wait_for_the_gpu(fmnist_root):
    """Mixup/CutMix, erasing, rotation, drop path, clipping, the EMA and accumulation add no host
    sync to a step: torch's sync debug mode raises at one. (Auto-augmentation is left out: some
    of torchvision's operations may wait for the device.)"""
    cfg = tiny_cfg(f"dataset.root={fmnist_root}", *GPU, "device.precision=bf16", "dataset.mixup_alpha=0.2",
                   "dataset.cutmix_alpha=1.0", "dataset.erase_prob=0.5", "dataset.rotate=10", "dataset.vflip=true",
                   "model.drop_path=0.2", "loss.label_smoothing=0.1", "ema.decay=0.9", "optim.clip_grad_norm=1.0",
                   "trainer.accumulate=2", "dataset.augment=flip_crop")
    runtime = device_setup.resolve(cfg.device)
    data, model, forward, optimizer, scheduler, scaler = build(cfg, runtime, distributed.Ranks())
    features = build_features(cfg, model, runtime.device, lambda m: {})
    for epoch in (1, 2):  # the first epoch warms up: cuDNN's search, lazy initialisation
        totals = RunningTotals(runtime.device)
        if epoch == 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            train_epoch(forward, data.train, optimizer, scheduler, scaler, runtime, epoch, totals, 0, features,
                        accumulate=2, label_smoothing=0.1)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert features[1].updates == 2 * 3 and math.isfinite(totals.loss_sum.item())


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizers_are_fused_on_the_gpu(name):
    cfg = tiny_cfg(f"optim={name}")
    assert build_optimizer(torch.nn.Linear(2, 2).cuda(), cfg.optim).param_groups[0]["fused"] is True
    assert not build_optimizer(torch.nn.Linear(2, 2), cfg.optim).param_groups[0]["fused"]


def test_stopped_gpu_run_resumes_and_its_checkpoint_continues_on_the_cpu(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    args = [f"dataset.root={fmnist_root}", *TINY, *GPU, "trainer.checkpoint_every_steps=1"]
    proc = start(args, run_dir)
    try:
        assert stop_at(proc, run_dir, (1, 2)) == 143
    finally:
        proc.kill()
    state = torch.load(rundir.last(run_dir), weights_only=True)
    assert state["epoch"] == 1 and state["step"] >= 2 and "cuda" in state["rng"]
    # The same command again: the GPU run continues to its end.
    proc = start(args, run_dir)
    assert proc.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3]
    # Its last checkpoint, one epoch further, on the CPU.
    cpu_dir = tmp_path / "cpu"
    cpu_dir.mkdir()
    train(tiny_cfg(f"dataset.root={fmnist_root}", "device=cpu", "trainer.epochs=4", "logger=none",
                   f"trainer.resume={rundir.last(run_dir)}"), cpu_dir)
    assert [r["epoch"] for r in metrics(cpu_dir)] == [4]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_train_one_run_over_nccl(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", f"dataset.root={fmnist_root}", *TINY, *GPU,
                           "device.world_size=2", "device.sync_bn=true", f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 ranks" in proc.stdout + proc.stderr
    assert [r["epoch"] for r in metrics(run_dir)] == [1, 2, 3]
    assert (run_dir / "model.pt").exists()
