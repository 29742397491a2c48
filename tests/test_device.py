"""Device options: each trains a tiny ResNet for real, on the CPU and on a CUDA GPU where there is
one, and agrees with fp32 eager on the same device."""

import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from resnet_lab import device as device_setup
from resnet_lab.data.loader import DeviceLoader, Normalizer, TensorSplit
from resnet_lab.models import MODELS
from resnet_lab.training.engine import RunningTotals, train_epoch
from tests import runs


def runtime(**settings):
    cfg = {"type": "cpu", "precision": "fp32", "channels_last": False, "compile": False,
           "compile_mode": "default", **settings}
    return device_setup.resolve(OmegaConf.create(cfg))


def train_steps(rt, steps=2):
    """A few SGD steps through the package's loader and loop: the loss, and each weight's change."""
    torch.manual_seed(0)
    # Brightness tells the class: the gradient is signal, not the near-cancellation of noise,
    # so low-precision rounding shows as a small relative error.
    labels = torch.arange(16 * steps) % 10
    images = (torch.randint(0, 128, (16 * steps, 1, 16, 16)) + 12 * labels.view(-1, 1, 1, 1)).byte()
    split = TensorSplit(images, labels)
    normalizer = Normalizer(torch.tensor([0.5]), torch.tensor([0.25]), rt.device)
    loader = DeviceLoader(split, 16, normalizer, shuffle=False)
    model = rt.prepare(MODELS.get("resnet18")(in_channels=1, num_classes=10, width=4, layers=[1]))
    normalizer.memory_format = rt.memory_format
    before = [p.detach().clone() for p in model.parameters()]
    forward = rt.compiled(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    totals = RunningTotals(rt.device)
    train_epoch(forward, loader, optimizer, scheduler, rt.grad_scaler(), rt, 1, totals)
    change = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    return totals.metrics()["train_loss"], change


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=CUDA)])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def reference(kind):
    return train_steps(runtime(type=kind))


# CUDA's fp32 convolutions and matrix products run in TF32 (10 bits of mantissa) by default, and
# each memory format or compiled kernel rounds differently: fp32-to-fp32 comparisons are looser there.
FP32_SLACK = {"cpu": 1, "cuda": 100}


# (setting, tolerance on the loss, tolerance on the weights' change): bf16 keeps 8 bits of
# mantissa (measured error ~0.11), fp16 keeps 11 (~0.01), channels_last only reorders (~1e-6).
@pytest.mark.parametrize("settings, loss_tol, change_tol", [
    ({"channels_last": True}, 1e-5, 1e-4),
    ({"precision": "bf16"}, 1e-2, 0.2),
    ({"precision": "bf16", "channels_last": True}, 1e-2, 0.2),
    ({"precision": "fp16"}, 1e-2, 0.05),
], ids=["channels_last", "bf16", "bf16-channels_last", "fp16"])
def test_setting_trains_like_fp32_eager(kind, reference, settings, loss_tol, change_tol):
    if "precision" not in settings:
        loss_tol, change_tol = loss_tol * FP32_SLACK[kind], change_tol * FP32_SLACK[kind]
    loss, change = train_steps(runtime(type=kind, **settings))
    ref_loss, ref_change = reference
    assert change.abs().sum() > 0  # the steps were taken (fp16: not skipped by the grad scaler)
    assert loss == pytest.approx(ref_loss, rel=loss_tol)
    assert (change - ref_change).norm() / ref_change.norm() < change_tol


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "clang++", "c++")),
                    reason="torch.compile builds C++ kernels on the CPU and no C++ compiler is here")
def test_compile_trains_like_eager(kind, reference):
    loss, change = train_steps(runtime(type=kind, compile=True))
    ref_loss, ref_change = reference
    assert loss == pytest.approx(ref_loss, rel=1e-4 * FP32_SLACK[kind])
    assert (change - ref_change).norm() / ref_change.norm() < 1e-3 * FP32_SLACK[kind]


def test_cpu_defaults_follow_bf16_support(monkeypatch):
    unset = {"precision": None, "channels_last": None}
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert runtime(**unset).precision == "bf16"
    # oneDNN capped at AVX2, or ATen's kernels at AVX2 (ATEN_CPU_CAPABILITY): bf16 is emulated there.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert runtime(**unset).precision == "fp32"
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert runtime(**unset).precision == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    rt = runtime(**unset)
    assert rt.precision == "fp32" and rt.channels_last
    assert runtime(precision="fp16", channels_last=False).precision == "fp16"  # set beats default


def small_resnet(width, stem="cifar"):
    return MODELS.get("resnet18")(in_channels=1, num_classes=10, width=width, layers=[1, 1], stem=stem)


@pytest.mark.parametrize("isa, width, safe", [("AVX2", 4, False), ("AVX2", 6, False), ("AVX2", 8, True),
                                              ("AVX512_CORE", 8, False), ("AVX512_CORE", 16, True)])
def test_channels_last_default_is_dropped_where_onednn_crashes(monkeypatch, isa, width, safe):
    # The rule of benchmarks/onednn_channels_last_repro.py: a strided 1x1 convolution (a
    # downsampling shortcut) with fewer input channels than an AVX2 (8) or AVX-512 (16) register
    # holds fp32s crashes.
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    rt = runtime(channels_last=None)
    model = rt.prepare(small_resnet(width))
    assert rt.channels_last == safe
    assert model.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last) == safe
    assert (device_setup.channels_last_hazard(model) is None) == safe


def test_channels_last_asked_on_a_crashing_network_is_one_line(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    with pytest.raises(device_setup.UserError, match=r"device.channels_last=true: the 4-channel strided 1x1 "
                       r"convolution layer2.0.downsample.0 crashes oneDNN's AVX2 kernels in channels_last"):
        runtime(channels_last=True).prepare(small_resnet(4))
    assert runtime(channels_last=True).prepare(small_resnet(16)).layer1[0].conv1.weight.is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.skipif(not torch.cpu._is_avx2_supported(), reason="oneDNN's AVX2 kernels need an AVX2 CPU")
def test_the_configuration_that_crashed_on_avx2_trains(fmnist_root, tmp_path):
    """The every-CPU issue's reproduction, which died of SIGBUS/SIGSEGV in loss.backward() with
    channels_last; ONEDNN_MAX_CPU_ISA=AVX2 runs oneDNN's AVX2 kernels on an AVX-512 CPU too."""
    run_dir = tmp_path / "run"
    env = {**runs.fresh_env(), "ONEDNN_MAX_CPU_ISA": "AVX2"}
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", "model=resnet18", "model.stem=cifar", "model.width=4",
                           "trainer.batch_size=32", "device=cpu", "logger=none", f"dataset.root={fmnist_root}",
                           "dataset.download=false", "trainer.epochs=1", "trainer.limit_train_batches=4",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(runs.metrics(run_dir)) == 1
    announced = next(line for line in (run_dir / "train.log").read_text().splitlines() if "parameters) on" in line)
    assert "cpu fp32" in announced and "channels_last" not in announced


def test_cuda_default_precision_without_bf16_is_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert device_setup.defaults("cuda")["precision"] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert device_setup.defaults("cuda")["precision"] == "bf16"


@CUDA
def test_cuda_turns_on_cudnn_benchmark():
    torch.backends.cudnn.benchmark = False
    runtime(type="cuda")
    assert torch.backends.cudnn.benchmark


@pytest.mark.parametrize("width, hazard", [(4, True), (16, False)])
def test_compile_keeps_inductor_off_channels_last_where_onednn_crashes(monkeypatch, width, hazard):
    # Inductor turns convolutions channels_last by itself (layout_optimization), whatever
    # device.channels_last says: on a network with a crashing convolution that must be off.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    asked = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: asked.update(kwargs) or model)
    rt = runtime(channels_last=None, compile=True, compile_mode="max-autotune-no-cudagraphs")
    rt.compiled(rt.prepare(small_resnet(width)))
    assert rt.layout_hazard == hazard and asked["dynamic"] is False
    if hazard:
        assert "mode" not in asked and asked["options"]["layout_optimization"] is False
        assert asked["options"]["max_autotune"] is True  # the mode's own options kept
    else:
        assert asked["mode"] == "max-autotune-no-cudagraphs" and "options" not in asked
