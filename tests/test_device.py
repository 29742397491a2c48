"""Device options: each trains a tiny ResNet for real, on the CPU and on a CUDA GPU where there is
one, and agrees with fp32 eager on the same device."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf

from resnet_lab import device as device_setup
from resnet_lab.data.loader import DeviceLoader, Normalizer, TensorSplit
from resnet_lab.engine import RunningTotals, train_epoch
from resnet_lab.models import MODELS


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
    normalizer = Normalizer(torch.tensor([0.5]), torch.tensor([0.25]), rt.device, rt.channels_last)
    loader = DeviceLoader(split, 16, normalizer, shuffle=False)
    model = rt.prepare(MODELS.get("resnet18")(in_channels=1, num_classes=10, width=4, layers=[1, 1]))
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
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert runtime(**unset).precision == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    rt = runtime(**unset)
    assert rt.precision == "fp32" and rt.channels_last
    assert runtime(precision="fp16", channels_last=False).precision == "fp16"  # set beats default


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
