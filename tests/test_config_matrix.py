"""Every option of every config group composes, passes validation and builds a working part."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import resnet_lab.training.train  # noqa: F401  (registers the schema)
from resnet_lab.config import validate
from resnet_lab.data import build_data
from resnet_lab.models import MODELS, build_model
from resnet_lab.optim import build_optimizer, build_scheduler
from tests.conftest import write_cifar_like, write_mnist_like

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
          for g in ("dataset", "optim", "sched", "device")}
GROUPS["model"] = MODELS.names()  # stored in Hydra's ConfigStore by resnet_lab.config


def composed(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("all_data")
    for folder in ("FashionMNIST", "MNIST", "KMNIST"):
        write_mnist_like(root, folder, n_train=64, n_test=16)
    write_cifar_like(root, classes=10, n_per_batch=8)
    write_cifar_like(root, classes=100, n_per_batch=8)
    for cls in range(2):
        (root / "folder" / f"c{cls}").mkdir(parents=True)
        for i in range(4):
            from PIL import Image
            Image.new("RGB", (20, 20), (cls * 200, i * 40, 0)).save(root / "folder" / f"c{cls}" / f"{i}.png")
    return root


def test_groups_are_discovered():
    assert {"resnet18", "resnet34", "resnet50"} <= set(GROUPS["model"])
    assert len(GROUPS["dataset"]) == 7 and len(GROUPS["optim"]) == 3 and len(GROUPS["sched"]) == 5


@pytest.mark.parametrize("stem", ["imagenet", "cifar"])
@pytest.mark.parametrize("model", GROUPS["model"])
def test_every_model_builds_and_trains_a_step(model, stem):
    cfg = composed(f"model={model}", "model.width=8", f"model.stem={stem}")
    # Small images: the proof is that every parameter gets a gradient, which size does not change,
    # and the 1202-layer network's step costs with every pixel.
    for channels, size in ((1, 16), (3, 12)):
        net = build_model(cfg.model, in_channels=channels, num_classes=10)
        out = net(torch.randn(2, channels, size, size))
        assert out.shape == (2, 10)
        out.sum().backward()
        assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("dataset", GROUPS["dataset"])
def test_every_dataset_loads_in_its_real_format(dataset, data_root, monkeypatch):
    import torchvision.datasets.cifar

    # Our pickles are in CIFAR's real format but cannot match the published MD5 sums.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    where = {"image_folder": [f"dataset.root={data_root / 'folder'}", "dataset.num_workers=0"],
             "synthetic": []}.get(dataset, [f"dataset.root={data_root}", "dataset.download=false"])
    cfg = composed(f"dataset={dataset}", *where, "trainer.batch_size=4", "trainer.eval_batch_size=4")
    data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), seed=0)
    x, y = next(data.train.batches(1))
    assert x.dtype == torch.float32 and x.shape[0] == 4 and x.shape[1] == data.in_channels
    assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) < data.num_classes
    expected_classes = {"cifar100": 100, "image_folder": 2}.get(dataset, 10)
    assert data.num_classes == expected_classes
    assert data.in_channels == (1 if "mnist" in dataset else 3)


@pytest.mark.parametrize("optim", GROUPS["optim"])
@pytest.mark.parametrize("sched", GROUPS["sched"])
def test_every_optimizer_and_schedule_steps(optim, sched):
    cfg = composed(f"optim={optim}", f"sched={sched}", "trainer.epochs=3")
    model = torch.nn.Linear(4, 2)
    opt = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(opt, cfg.sched, steps_per_epoch=5, epochs=cfg.trainer.epochs)
    before = model.weight.detach().clone()
    lrs = []
    for _ in range(15):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    assert not torch.equal(before, model.weight)
    assert all(lr >= 0 for lr in lrs)
    if sched == "none":
        assert set(lrs) == {cfg.optim.lr}
    else:
        assert lrs[-1] < cfg.optim.lr


@pytest.mark.parametrize("device", GROUPS["device"])
def test_every_device_preset_composes(device):
    from resnet_lab import device as device_setup
    from resnet_lab.errors import UserError

    cfg = composed(f"device={device}")
    available = device in ("auto", "cpu") or (device == "cuda" and torch.cuda.is_available()) or (
        device == "mps" and torch.backends.mps.is_available())
    if available:
        runtime = device_setup.resolve(cfg.device)
        assert runtime.precision in ("fp32", "bf16", "fp16")
    else:
        with pytest.raises(UserError, match=f"no {device} device"):
            device_setup.resolve(cfg.device)


def lr_curve(*overrides, steps: int = 30) -> list:
    """The learning rate over 3 epochs of 10 steps, for a base lr of 1."""
    cfg = composed(*overrides, "trainer.epochs=3")
    opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    scheduler = build_scheduler(opt, cfg.sched, steps_per_epoch=10, epochs=3)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(steps):
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_then_schedule():
    lrs = lr_curve("sched=cosine", "sched.warmup_epochs=1")
    assert lrs[0] == pytest.approx(0.01)  # warmup starts low
    assert lrs[10] == pytest.approx(1.0)  # and peaks after one epoch
    assert lrs[29] < 0.05  # cosine to ~0 by the end
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11]))


def test_schedule_knobs_shape_the_curve():
    lrs = lr_curve("sched=cosine", "sched.warmup_epochs=1", "sched.warmup_start_factor=0.1", "sched.min_lr=0.2")
    assert lrs[0] == pytest.approx(0.1) and lrs[10] == pytest.approx(1.0) and lrs[30] == pytest.approx(0.2)
    # onecycle peaks after pct_start of its steps (OneCycleLR steps at most its total, 30, times).
    lrs = lr_curve("sched=onecycle", "sched.pct_start=0.5", steps=29)
    assert 13 <= max(range(len(lrs)), key=lrs.__getitem__) <= 15
    assert max(range(len(lrs)), key=lr_curve("sched=onecycle", steps=29).__getitem__) < 10


def test_linear_schedule_rises_then_falls_in_straight_lines():
    lrs = lr_curve("sched=linear", "sched.warmup_epochs=1", "sched.min_lr=0.1")
    assert lrs[0] == pytest.approx(0.01) and lrs[10] == pytest.approx(1.0) and lrs[30] == pytest.approx(0.1)
    falls = [a - b for a, b in zip(lrs[10:30], lrs[11:31])]
    assert falls == pytest.approx([0.9 / 20] * 20)  # the same step down each update
    assert lr_curve("sched=linear")[0] == 1.0  # no warm-up: it starts at the peak


def test_optimizer_knobs_reach_torch():
    model = torch.nn.Linear(1, 1)
    sgd = build_optimizer(model, composed("optim=sgd", "optim.nesterov=true", "optim.momentum=0.8").optim)
    assert sgd.defaults["nesterov"] is True and sgd.defaults["momentum"] == 0.8
    adamw = build_optimizer(model, composed("optim=adamw", "optim.betas=[0.8,0.9]", "optim.weight_decay=0.3").optim)
    assert adamw.defaults["betas"] == (0.8, 0.9) and adamw.defaults["weight_decay"] == 0.3
