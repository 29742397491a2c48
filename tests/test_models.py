"""The zoo: every variant is the network its paper and torchvision define, proved by counts,
by torchvision's own weights giving the same logits, and by the d2l network built side by side.

Big networks are built on the meta device (no memory, no init) wherever only shapes matter.
"""

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
from torch import nn

from resnet_lab.config import DatasetConfig, model_config
from resnet_lab.errors import UserError
from resnet_lab.models import MODELS, build_model
from resnet_lab.models.__main__ import main as list_models
from resnet_lab.models.__main__ import measure
from resnet_lab.models.resnet import PadShortcut
from resnet_lab.training.train import train
from tests import runs

# torchvision's parameter counts, 3 input channels, 1000 classes.
IMAGENET = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
            "resnet101": 44_549_160, "resnet152": 60_192_808, "resnext50_32x4d": 25_028_904,
            "resnext101_32x8d": 88_791_336, "resnext101_64x4d": 83_455_272,
            "wide_resnet50_2": 68_883_240, "wide_resnet101_2": 126_886_696}
# The ImageNet-layout networks torchvision lacks, as README.md's table gives them.
PREACT_IMAGENET = {"preact_resnet18": 11_687_720, "preact_resnet34": 21_795_880}
# The papers' networks with 3 input channels and 10 classes.
CIFAR10 = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
           "resnet110": 1_727_962, "resnet1202": 19_421_274, "wrn_28_10": 36_479_194,
           "wrn_40_4": 8_949_210, "wrn_16_8": 10_961_370, "preact_resnet110": 1_727_962,
           "preact_resnet164": 1_703_258}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kw) -> nn.Module:
    with torch.device("meta"):
        return MODELS.get(name)(**kw)


def test_every_variant_is_an_option_of_the_model_group_showing_its_architecture():
    assert len(MODELS.names()) == 36
    for name in MODELS.names():
        with initialize_config_module("resnet_lab.conf", version_base="1.3"):
            cfg = compose("config", overrides=[f"model={name}"])
        architecture = MODELS.get(name).architecture
        assert OmegaConf.to_container(cfg.model) == {"name": name, "init": None, **dataclasses.asdict(architecture)}
        # What the config shows is what is built.
        assert on_meta(name).arch == architecture


def test_cfg_job_shows_the_architecture_and_only_the_dataset_kinds_keys(tmp_path):
    job = subprocess.run([sys.executable, "-m", "resnet_lab", "model=resnet18", "--cfg", "job"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True).stdout
    cfg = yaml.safe_load(job)
    assert (cfg["model"]["stem"], cfg["model"]["width"], cfg["model"]["layers"]) == ("imagenet", 64, [2, 2, 2, 2])
    every_kind = {f.name for f in dataclasses.fields(DatasetConfig)}  # name, augment and the recipe keys
    assert set(cfg["dataset"]) == every_kind | {"root", "download"}


@pytest.mark.parametrize("name, params", IMAGENET.items())
def test_imagenet_family_counts_equal_torchvision(name, params):
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)()
    assert count(on_meta(name)) == count(theirs) == params


@pytest.mark.parametrize("name, params", PREACT_IMAGENET.items())
def test_preact_imagenet_counts(name, params):
    assert count(on_meta(name)) == params


def randomise(model: nn.Module) -> None:
    """Random weights and BN statistics, so a misplaced BN or stride changes the logits."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.zero_()


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_family_computes_what_torchvision_computes(name):
    torch.manual_seed(0)
    with torch.device("meta"):
        theirs = getattr(torchvision.models, name)()
    theirs = theirs.to_empty(device="cpu")
    randomise(theirs)
    ours = on_meta(name)
    # strict: the same keys and shapes; assign: share theirs' tensors instead of copying.
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = theirs.eval()(x)
        got = ours.eval()(x)
    assert expected.std() > 0.1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_same_seed_same_initial_weights_as_torchvision(name):
    torch.manual_seed(0)
    ours = MODELS.get(name)(zero_init_residual=True)
    torch.manual_seed(0)
    theirs = getattr(torchvision.models, name)(zero_init_residual=True)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(torch.equal(ours_sd[k], theirs_sd[k]) for k in ours_sd)


@pytest.mark.parametrize("name, params", CIFAR10.items())
def test_cifar_family_counts_equal_the_papers(name, params):
    assert count(on_meta(name, num_classes=10)) == params


def test_cifar_option_a_has_no_projections_and_b_c_add_them():
    def convs_1x1(model):
        return [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]

    a, b, c = (on_meta("resnet20", num_classes=10, shortcut=s) for s in "ABC")
    assert not convs_1x1(a) and sum(isinstance(m, PadShortcut) for m in a.modules()) == 2
    # B projects (1x1 conv + BN) where the shape changes: 16->32 and 32->64.
    assert len(convs_1x1(b)) == 2
    assert count(b) - count(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    # C projects in all 9 blocks.
    assert len(convs_1x1(c)) == 9


def test_option_a_is_the_strided_identity_padded_with_zeros():
    x = torch.randn(2, 16, 7, 7)
    y = PadShortcut(16, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2]) and not y[:, 16:].any()


@pytest.mark.parametrize("name", ["resnet20", "resnet50", "preact_resnet110", "preact_resnet164", "wrn_16_8",
                                  "resnet50d", "seresnet50", "ecaresnet50d"])
def test_zero_init_residual_makes_every_identity_block_the_identity(name):
    torch.manual_seed(0)
    blocks = {}
    for zero in (False, True):
        model = MODELS.get(name)(width=8, num_classes=10, zero_init_residual=zero)
        blocks[zero] = [b for stage in model.stages for b in getattr(model, stage) if b.downsample is None]
    assert blocks[True]
    for plain, zeroed in zip(blocks[False], blocks[True]):
        x = torch.rand(2, zeroed.conv1.in_channels, 8, 8)  # >= 0, as after a ReLU
        assert torch.equal(zeroed(x), x)
        assert not torch.equal(plain(x), x)


def test_preact_blocks_leave_the_sum_unactivated_and_the_net_ends_in_bn_relu():
    torch.manual_seed(0)
    post, pre = (MODELS.get(name)(width=8, num_classes=10) for name in ("resnet20", "preact_resnet110"))
    x = torch.rand(2, 8, 8, 8)
    assert post.layer1[1](x).min() >= 0 and pre.layer1[1](x).min() < 0
    # The stem's BN-ReLU is the first block's pre-activation; every other block has its own.
    assert pre.layer1[0].bn1 is None and all(b.bn1 is not None for b in list(pre.layer1)[1:])
    assert isinstance(pre.final_act[0], nn.BatchNorm2d) and isinstance(post.final_act, nn.Identity)


def test_wrn_dropout_is_a_knob():
    torch.manual_seed(0)
    plain = MODELS.get("wrn_16_8")(width=4, num_classes=10)
    dropped = MODELS.get("wrn_16_8")(width=4, num_classes=10, dropout=0.3)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert [m.p for m in dropped.modules() if isinstance(m, nn.Dropout)] == [0.3] * 6
    x = torch.randn(2, 3, 16, 16)
    assert not torch.equal(dropped.train()(x), dropped(x))
    assert torch.equal(dropped.eval()(x), dropped(x))


class D2LResidual(nn.Module):
    """d2l.ai, "Residual Networks (ResNet)", as published."""

    def __init__(self, input_channels, num_channels, use_1x1conv=False, strides=1):
        super().__init__()
        self.conv1 = nn.Conv2d(input_channels, num_channels, kernel_size=3, padding=1, stride=strides)
        self.conv2 = nn.Conv2d(num_channels, num_channels, kernel_size=3, padding=1)
        if use_1x1conv:
            self.conv3 = nn.Conv2d(input_channels, num_channels, kernel_size=1, stride=strides)
        else:
            self.conv3 = None
        self.bn1 = nn.BatchNorm2d(num_channels)
        self.bn2 = nn.BatchNorm2d(num_channels)

    def forward(self, X):
        Y = F.relu(self.bn1(self.conv1(X)))
        Y = self.bn2(self.conv2(Y))
        if self.conv3:
            X = self.conv3(X)
        Y += X
        return F.relu(Y)


def d2l_resnet18(in_channels, num_classes):
    def resnet_block(input_channels, num_channels, num_residuals, first_block=False):
        blk = []
        for i in range(num_residuals):
            if i == 0 and not first_block:
                blk.append(D2LResidual(input_channels, num_channels, use_1x1conv=True, strides=2))
            else:
                blk.append(D2LResidual(num_channels, num_channels))
        return blk

    b1 = nn.Sequential(nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3),
                       nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    b2 = nn.Sequential(*resnet_block(64, 64, 2, first_block=True))
    b3 = nn.Sequential(*resnet_block(64, 128, 2))
    b4 = nn.Sequential(*resnet_block(128, 256, 2))
    b5 = nn.Sequential(*resnet_block(256, 512, 2))
    return nn.Sequential(b1, b2, b3, b4, b5, nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                         nn.Linear(512, num_classes))


def d2l_key_to_ours(key: str) -> str:
    part, rest = key.split(".", 1)
    if part == "0":
        return {"0": "conv1", "1": "bn1"}[rest.split(".")[0]] + "." + rest.split(".", 1)[1]
    if part == "7":
        return "fc." + rest
    return f"layer{part}." + rest.replace("conv3.", "downsample.0.")


def test_resnet18_d2l_is_the_d2l_network_bit_for_bit():
    torch.manual_seed(0)
    reference = d2l_resnet18(1, 10)
    torch.manual_seed(0)
    ours = MODELS.get("resnet18_d2l")(in_channels=1, num_classes=10)
    assert count(ours) == count(reference) == 11_178_378
    convs = [m for m in ours.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and all(m.bias is not None for m in convs)
    assert [len(getattr(ours, f"layer{i}")[0].downsample) for i in (2, 3, 4)] == [1, 1, 1]  # conv only
    # The same seed gives the same initial weights, so an old run can be repeated exactly.
    theirs = {d2l_key_to_ours(k): v for k, v in reference.state_dict().items()}
    assert theirs.keys() == ours.state_dict().keys()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(ours(x), reference(x))
    assert torch.equal(ours.eval()(x), reference.eval()(x))


def model_cfg(name, **knobs):
    return OmegaConf.merge(OmegaConf.structured(model_config(name)), knobs)


def test_knobs_reach_the_network():
    model = build_model(model_cfg("wrn_16_8", width=4, widen=2, layers=[1, 2], shortcut="C",
                                  dropout=0.1, block="preact_bottleneck", groups=2, width_per_group=128),
                        in_channels=1, num_classes=3)
    assert model.stages == ["layer1", "layer2"] and len(model.layer2) == 2
    first = model.layer1[0]
    # 4 * 2 planes, 2 groups of 8 * 128 / 64 channels each, expanded 4x at the output.
    assert first.conv2.groups == 2 and first.conv2.out_channels == 2 * 16 and first.conv3.out_channels == 32
    assert all(b.downsample is not None for stage in (model.layer1, model.layer2) for b in stage)
    assert model.fc.in_features == 4 * 2 * 2 * 4 and model.fc.out_features == 3
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def smooth_images(n=64, channels=1, size=12):
    """Images whose neighbouring pixels correlate, as a photograph's do: blurred noise."""
    noise = torch.randn(n, channels, size + 2, size + 2, generator=torch.Generator().manual_seed(0))
    return F.avg_pool2d(noise, 3, 1) * 3 + 0.5


@pytest.mark.parametrize("channels, kernel", [(1, 2), (3, 2), (1, 3)])
def test_whiten_stem_makes_the_patches_uncorrelated_at_unit_variance_and_stays_frozen(channels, kernel):
    model = build_model(model_cfg("resnet18", stem="whiten", whiten_kernel=kernel, width=4, layers=[1, 1]),
                        in_channels=channels, num_classes=3)
    dims = channels * kernel * kernel
    assert model.conv1.weight.shape == (2 * dims, channels, kernel, kernel) and model.bn1.num_features == 2 * dims
    images = smooth_images(channels=channels)
    raw = F.unfold(images, kernel).transpose(1, 2).reshape(-1, dims)
    assert (raw.T @ raw / len(raw) - torch.eye(dims)).abs().max() > 0.5  # correlated before
    model.whiten_from(images)
    out = model.conv1(images)
    assert out.shape[-1] == 12 + 2 - 2 - kernel + 1  # no padding
    assert torch.equal(out[:, dims:], -out[:, :dims])
    flat = out[:, :dims].permute(0, 2, 3, 1).reshape(-1, dims).double()
    # Unit variance but for the eps added to each eigenvalue: the smallest ones fall a little short.
    assert torch.allclose(flat.T @ flat / len(flat), torch.eye(dims, dtype=torch.double), atol=0.05)
    before = model.conv1.weight.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(images).sum().backward()
    optimizer.step()
    assert not model.conv1.weight.requires_grad and torch.equal(model.conv1.weight, before)
    assert not torch.equal(model.layer1[0].conv1.weight.grad, torch.zeros(1))  # the rest trains


def test_bn_momentum_and_frozen_bn_weights_reach_every_batch_norm():
    model = build_model(model_cfg("resnet18", width=4, layers=[1, 1], bn_momentum=0.4, bn_weight_frozen=True),
                        in_channels=1, num_classes=3)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and {m.momentum for m in norms} == {0.4}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(smooth_images()).square().mean().backward()
    optimizer.step()
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.weight.requires_grad for m in norms)
    assert all(m.bias.abs().sum() > 0 for m in norms)  # the biases still train
    default = build_model(model_cfg("resnet18", width=4), in_channels=1, num_classes=3)
    assert all(m.momentum == 0.1 and m.weight.requires_grad for m in default.modules()
               if isinstance(m, nn.BatchNorm2d))


def test_narrow_resnext_keeps_one_channel_per_group():
    # torchvision's rule gives 8 planes * 4 / 64 = 0.5 channels per group at the smoke width.
    narrow = on_meta("resnext50_32x4d", width=8).layer1[0].conv2
    assert (narrow.out_channels, narrow.groups) == (32, 32)
    standard = on_meta("resnext50_32x4d").layer1[0].conv2
    assert (standard.out_channels, standard.groups) == (128, 32)


@pytest.mark.parametrize("name, knobs, words", [
    ("resnet18", {"shortcut": "E"}, ["model.shortcut=E", "A, B, C, D"]),
    ("resnet18", {"block": "preac"}, ["model.block=preac", "did you mean preact"]),
    ("resnet18", {"stem": "tiny"}, ["model.stem=tiny", "imagenet, cifar, deep"]),
    ("resnet18", {"attention": "sse"}, ["model.attention=sse", "none, se, eca", "did you mean se"]),
    ("resnet50", {"attention_reduction": 0}, ["model.attention_reduction=0", ">= 1"]),
    ("preact_resnet18", {"attention": "se"}, ["model.attention=se", "post-activation", "preact"]),
    ("wrn_16_8", {"blur": True}, ["model.blur=True", "basic or bottleneck"]),
    ("resnet50d", {"width": 1}, ["model.width=1", "deep stem"]),
    ("wrn_28_10", {"dropout": 1.0}, ["model.dropout=1.0", "[0, 1)"]),
    ("resnet50", {"groups": 0}, ["model.groups=0", ">= 1"]),
    ("resnet18", {"layers": []}, ["model.layers=[]", "at least one stage"]),
    ("resnet18", {"layers": [2, 0]}, ["model.layers=[2, 0]", ">= 1 blocks"]),
    ("resnet18", {"groups": 32}, ["model.groups=32", "bottleneck"]),
    ("resnet18", {"stem": "whiten", "whiten_kernel": 0}, ["model.whiten_kernel=0", ">= 1"]),
    ("resnet18", {"bn_momentum": 1.5}, ["model.bn_momentum=1.5", "[0, 1]"]),
    ("resnet18", {"bn_weight_frozen": True, "zero_init_residual": True},
     ["model.bn_weight_frozen=true", "model.zero_init_residual=true", "stay at zero"]),
])
def test_bad_knob_is_one_clear_line(name, knobs, words):
    with pytest.raises(UserError) as error:
        build_model(model_cfg(name, **knobs), in_channels=3, num_classes=10)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def cifar_resnet_macs(n: int, classes: int = 10) -> int:
    """He et al. 2015's 6n+2 network on 32x32 by hand: each conv costs out pixels x out channels x
    in channels x 9."""
    stem = 32 * 32 * 16 * 3 * 9
    stage1 = 2 * n * 32 * 32 * 16 * 16 * 9
    stage2 = 16 * 16 * 32 * 9 * (16 + (2 * n - 1) * 32)
    stage3 = 8 * 8 * 64 * 9 * (32 + (2 * n - 1) * 64)
    return stem + stage1 + stage2 + stage3 + 64 * classes


def test_listing_shows_every_variant_with_counts_that_add_up(capsys):
    list_models(["--size", "32", "--classes", "10"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert sorted(rows) == MODELS.names()
    for name in ("resnet20", "resnet56"):
        assert int(rows[name][1].replace(",", "")) == CIFAR10[name]
        n = (int(name[6:]) - 2) // 6
        assert float(rows[name][2].replace(",", "")) == pytest.approx(cifar_resnet_macs(n) / 1e6, abs=0.05)
    assert measure("resnet20", 32, num_classes=10) == (CIFAR10["resnet20"], cifar_resnet_macs(3))


@pytest.mark.parametrize("name", IMAGENET)
def test_imagenet_macs_equal_torchvision_published(name):
    meta = torchvision.models.get_model_weights(name).DEFAULT.meta
    params, macs = measure(name, 224)
    assert params == meta["num_params"]
    assert round(macs / 1e9, 3) == pytest.approx(meta["_ops"], abs=0.0011)


def test_resnet56_cifar_stem_trains(tmp_path):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        cfg = compose("config", overrides=[
            "model=resnet56", "model.stem=cifar", "debug=smoke", "dataset=synthetic", "device=cpu",
            "trainer.progress=false", "trainer.save_weights=true", "trainer.batch_size=64"])
    acc = train(cfg, tmp_path)
    row, = runs.metrics(tmp_path)
    assert row["test_acc"] == acc and row["train_loss"] > 0
    weights = torch.load(tmp_path / "model.pt")
    assert "layer3.8.bn2.weight" in weights and not any(k.startswith("layer4") for k in weights)
    assert weights["conv1.weight"].shape == (8, 3, 3, 3)  # the smoke width, a 3x3 CIFAR stem


def test_listing_without_options_shows_each_variant_at_its_own_layout(capsys):
    """The docs' table is what `python -m resnet_lab.models` prints with no options."""
    list_models([])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["resnet18"][1:5] == ["11,689,512", "1,814.1", "3x224x224", "1000"]
    assert rows["resnet56"][3:5] == ["3x32x32", "10"]
    assert int(rows["resnet56"][1].replace(",", "")) == CIFAR10["resnet56"]
