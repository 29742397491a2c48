"""Training recipes: each trick does exactly what its name says (label smoothing, gradient
accumulation and clipping, the no-decay group, an EMA of the weights, the validation split), and
bad values are one line."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import resnet_lab.training.train  # noqa: F401  (registers the schema)
from resnet_lab import device as device_setup
from resnet_lab.config import validate
from resnet_lab.data import build_data, stratified_split
from resnet_lab.data.augment import AutoAugment, Mixing, Recipe, random_erase
from resnet_lab.data.loader import DeviceLoader, Normalizer, TensorSplit
from resnet_lab.errors import UserError
from resnet_lab.models import build_model
from resnet_lab.models.resnet import DropPath
from resnet_lab.optim import build_optimizer, build_scheduler, param_groups
from resnet_lab.training.engine import Callback, RunningTotals, evaluate, train_epoch
from resnet_lab.training.features import EMA, GradClip
from resnet_lab.training.train import train
from tests import runs
from tests.conftest import write_cifar_like
from tests.launch import multirun
from tests.runs import for_kind, metrics

CPU = torch.device("cpu")


def composed(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=for_kind(["device=cpu", "device.precision=fp32", *overrides]))


def runtime():
    return device_setup.resolve(composed().device)


def loader(images, labels, batch, **kw):
    return DeviceLoader(TensorSplit(images, labels), batch, Normalizer(torch.zeros(1), torch.ones(1) / 255, CPU),
                        shuffle=True, **kw)


def one_epoch(model, data, optimizer, callbacks=(), **kw):
    """Train `model` one epoch over `data` with a constant schedule; the epoch's totals."""
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    totals = RunningTotals(CPU)
    rt = runtime()
    train_epoch(model, data, optimizer, scheduler, rt.grad_scaler(), rt, 1, totals, 0, callbacks, **kw)
    return totals


def linear_net(seed=0, inputs=16, classes=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(inputs, 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, classes))


class Identity(torch.nn.Module):
    """Logits = the flattened input, times a weight of 1 for the optimizer to hold."""

    def __init__(self):
        super().__init__()
        self.one = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1) * self.one


def test_smoothed_loss_is_the_formula_on_known_logits():
    # A model whose logits are its fixed input: the loss the loop adds up is the smoothed loss of
    # those logits, and lr=0 leaves them as they are.
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 4.0]])
    labels = torch.tensor([0, 2, 1, 2])
    images = logits.view(4, 1, 1, 3)
    net = Identity()
    data = DeviceLoader(TensorSplit(images, labels), 4, Normalizer(torch.zeros(1), torch.ones(1) / 255, CPU),
                        shuffle=False)
    s = 0.1
    totals = one_epoch(net, data, torch.optim.SGD(net.parameters(), lr=0.0), label_smoothing=s)
    log_p = logits.log_softmax(1)
    # (1 - s) * -log p(label) + s * mean over the 3 classes of -log p(class)
    expected = ((1 - s) * -log_p[torch.arange(4), labels] + s * -log_p.mean(1)).mean()
    assert totals.loss_sum.item() / totals.seen == pytest.approx(expected.item(), rel=1e-6)
    assert expected.item() != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)


def test_accumulating_4_batches_of_64_is_one_batch_of_256_without_batch_norm():
    # 300 images: an update from 256 and one from the last 44, both ways; SGD with momentum and
    # weight decay, so the second update depends on the first.
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (300, 1, 4, 4), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (300,), generator=gen)
    results = []
    for batch, accumulate in ((256, 1), (64, 4)):
        net = linear_net()
        optimizer = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-2)
        counted = Counter()
        one_epoch(net, loader(images, labels, batch), optimizer, [counted], accumulate=accumulate)
        results.append((net.state_dict(), counted.updates))
    (big, updates_big), (small, updates_small) = results
    assert updates_big == updates_small == [1, 2]  # after_step sees each update's last batch
    assert all(torch.allclose(big[k], small[k], atol=1e-6) for k in big)
    assert not torch.allclose(big["1.weight"], linear_net().state_dict()["1.weight"], atol=1e-3)


class Counter(Callback):
    def __init__(self):
        self.updates, self.batches = [], []

    def after_step(self, step, loss):
        self.updates.append(len(self.updates) + 1)
        self.batches.append(step)


def test_accumulation_calls_after_step_at_each_group_s_last_batch():
    images = torch.zeros(10, 1, 4, 4, dtype=torch.uint8)
    net = linear_net()
    counted = Counter()
    one_epoch(net, loader(images, torch.zeros(10, dtype=torch.long), 2), torch.optim.SGD(net.parameters(), lr=0.1),
              [counted], accumulate=2)
    assert counted.batches == [1, 3, 4]  # 5 batches: groups of 2, 2 and 1


class Weights(Callback):
    """Records the trained model's weights after every update."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def after_step(self, step, loss):
        self.seen.append(copy.deepcopy(self.model.state_dict()))


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_weights_follow_the_recurrence_by_hand(warmup):
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=gen)
    net = torch.nn.Sequential(linear_net(), torch.nn.BatchNorm1d(3))  # a buffer and a step counter too
    start = copy.deepcopy(net.state_dict())
    ema = EMA(net, 0.8, warmup, evaluate=lambda model: {})
    weights = Weights(net)
    one_epoch(net, loader(images, torch.randint(0, 3, (40,), generator=gen), 8),
              torch.optim.SGD(net.parameters(), lr=0.5), [ema, weights])
    expected = start
    for n, now in enumerate(weights.seen):
        d = min(0.8, (1 + n) / (10 + n)) if warmup else 0.8
        expected = {k: d * expected[k] + (1 - d) * now[k] if now[k].is_floating_point() else now[k] for k in now}
    average = ema.average.state_dict()
    assert len(weights.seen) == 5 and ema.updates == 5
    assert all(torch.allclose(average[k].float(), expected[k].float(), atol=1e-6) for k in expected)
    assert average["1.num_batches_tracked"] == 5
    assert not torch.allclose(average["0.1.weight"], net.state_dict()["0.1.weight"])


def test_clipping_scales_the_gradient_to_the_norm_and_keeps_the_norm_before():
    net = linear_net()
    net(torch.randn(4, 16)).pow(2).sum().mul(100).backward()
    before = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert before > 1
    clip = GradClip(net, 1.0, CPU)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    clip.before_optimizer_step(0, optimizer, torch.amp.GradScaler("cpu", enabled=False))
    after = torch.cat([p.grad.flatten() for p in net.parameters()]).norm()
    assert after == pytest.approx(1.0, rel=1e-5)
    assert clip.logged()["grad_norm"].item() == pytest.approx(before.item(), rel=1e-5)
    assert clip.end_epoch() == {"grad_norm": pytest.approx(before.item(), rel=1e-5)}


def test_the_no_decay_group_holds_exactly_the_norm_weights_and_biases():
    # resnet18_d2l has conv biases and BN-less projections: biases outside norm layers too.
    model = build_model(composed("model=resnet18_d2l", "model.width=4").model, 1, 10)
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    biases = {id(p) for name, p in model.named_parameters() if name.endswith(".bias")}
    assert biases - norms  # the conv and fc biases
    cfg = composed("optim=sgd", "optim.weight_decay=5e-4", "optim.no_decay_norm_bias=true").optim
    decay, no_decay = param_groups(model, cfg)
    assert {id(p) for p in no_decay["params"]} == norms | biases
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} - norms - biases
    optimizer = build_optimizer(model, cfg)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert len(build_optimizer(model, composed("optim=sgd").optim).param_groups) == 1


def test_the_validation_split_is_disjoint_stratified_and_the_same_every_run():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100, generator=torch.Generator().manual_seed(3))]
    train_idx, val_idx = stratified_split(labels, 0.1)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(100))
    assert labels[val_idx].bincount().tolist() == [5, 3, 2]
    again = stratified_split(labels, 0.1)[1]
    assert torch.equal(again, val_idx)
    # Through build_data: no held-out image trains, whatever the run's seed.
    cfg = composed("dataset=synthetic", "dataset.val_fraction=0.25", "trainer.batch_size=32")
    data = build_data(cfg.dataset, cfg.trainer, CPU, seed=5)
    train_images = {bytes(im.numpy()) for im in data.train.images}
    val_images = [bytes(im.numpy()) for im in data.val.images]
    assert data.val.num_samples + data.train.num_samples == 512 and data.val.num_samples == pytest.approx(128, abs=5)
    assert not train_images.intersection(val_images)
    full = build_data(composed("dataset=synthetic").dataset, cfg.trainer, CPU, seed=5).train.labels.bincount()
    assert torch.allclose(data.val.labels.bincount() / data.val.num_samples, full / 512, atol=0.01)


@pytest.mark.parametrize("override, words", [
    ("loss.label_smoothing=1.0", "loss.label_smoothing=1.0: must be in [0, 1)"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing=-0.1: must be in [0, 1)"),
    ("trainer.accumulate=0", "trainer.accumulate=0: must be >= 1"),
    ("ema.decay=1.0", "ema.decay=1.0: must be in [0, 1)"),
    ("dataset.val_fraction=1.0", "dataset.val_fraction=1.0: must be in [0, 1)"),
    ("optim.clip_grad_norm=-1", "optim.clip_grad_norm=-1.0: must be >= 0"),
    ("trainer.objective=val_acc", "trainer.objective=val_acc: needs a validation split"),
    ("trainer.objective=test_acc_ema", "trainer.objective=test_acc_ema: needs an EMA"),
    ("trainer.objective=loss", "trainer.objective=loss: must be one of auto, val_acc"),
])
def test_bad_recipe_values_are_one_line(override, words):
    with pytest.raises(UserError) as raised:
        validate(composed(override))
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_a_run_with_every_recipe_key_reports_and_returns_its_validation_accuracy(fmnist_root, tmp_path):
    cfg = composed(f"dataset.root={fmnist_root}", *runs.TINY, "trainer.epochs=2", "trainer.limit_train_batches=3",
                   "logger=none", "dataset.val_fraction=0.2", "loss.label_smoothing=0.1",
                   "optim.clip_grad_norm=1.0", "optim.no_decay_norm_bias=true", "ema.decay=0.9", "ema.warmup=true",
                   "trainer.accumulate=2", "trainer.tta=true")
    result = train(cfg, tmp_path)
    rows = metrics(tmp_path)
    assert result == max(row["val_acc"] for row in rows)  # the best epoch's, chosen on validation
    for key in ("val_loss", "val_acc", "test_acc", "grad_norm", "val_acc_ema", "test_acc_ema", "test_loss_ema"):
        assert all(math.isfinite(row[key]) for row in rows), key
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["features"]["ema"]["updates"] == 4  # 2 epochs of 3 batches, 2 to an update
    assert state["scheduler"]["last_epoch"] == 4
    # best.pt keeps the objective's best: the last checkpoint's weights (a hard link to their file)
    # exactly when the last epoch has the best validation accuracy.
    assert state["best_acc"] == max(row["val_acc"] for row in rows)
    last_is_best = rows[-1]["val_acc"] > rows[0]["val_acc"]
    assert (tmp_path / "checkpoints" / "best.pt").samefile(tmp_path / "checkpoints" / state["model"]) == last_is_best
    # ema.pt: the average's weights at the last checkpoint, a state dict evaluate can load.
    ema = torch.load(tmp_path / "checkpoints" / "ema.pt", weights_only=True)
    assert ema.keys() == state["features"]["ema"]["weights"].keys()
    assert all(torch.equal(ema[k], state["features"]["ema"]["weights"][k]) for k in ema)
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_a_mixup_batch_is_the_convex_combination_with_the_drawn_lambda():
    mixing = Mixing(num_classes=4, mixup_alpha=0.4)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    mix = mixing.draw(seed=7, height=8, width=8)
    assert mix.kind == "mixup" and 0 < mix.lam < 1
    mixed, weights = mixing.apply(x, y, mix)
    assert torch.allclose(mixed, mix.lam * x + (1 - mix.lam) * x[[5, 4, 3, 2, 1, 0]])
    expected = mix.lam * F.one_hot(y, 4) + (1 - mix.lam) * F.one_hot(y[[5, 4, 3, 2, 1, 0]], 4)
    assert torch.allclose(weights, expected.float())
    assert mixing.draw(seed=7, height=8, width=8) == mix != mixing.draw(seed=8, height=8, width=8)


def test_a_cutmix_box_s_area_matches_its_lambda():
    mixing = Mixing(num_classes=3, cutmix_alpha=1.0)
    x, y = torch.randn(4, 1, 20, 30), torch.tensor([0, 1, 2, 0])
    for seed in range(20):
        mix = mixing.draw(seed, 20, 30)
        top, bottom, left, right = mix.box
        assert mix.kind == "cutmix" and (bottom - top) * (right - left) == pytest.approx((1 - mix.lam) * 600)
        mixed, weights = mixing.apply(x, y, mix)
        pasted = torch.zeros(20, 30, dtype=torch.bool)
        pasted[top:bottom, left:right] = True
        assert torch.equal(mixed[..., pasted], x.flip(0)[..., pasted]) and torch.equal(mixed[..., ~pasted], x[..., ~pasted])
        assert torch.allclose(weights, mix.lam * F.one_hot(y, 3) + (1 - mix.lam) * F.one_hot(y.flip(0), 3))


def test_mix_prob_and_switch_prob_choose_per_batch():
    both = Mixing(num_classes=2, mixup_alpha=1.0, cutmix_alpha=1.0, switch_prob=0.5)
    kinds = [both.draw(seed, 8, 8).kind for seed in range(200)]
    assert 60 < kinds.count("cutmix") < 140 and kinds.count("cutmix") + kinds.count("mixup") == 200
    never = Mixing(num_classes=2, mixup_alpha=1.0, prob=0.0)
    mix = never.draw(0, 8, 8)
    assert mix.kind == "none"
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    mixed, weights = never.apply(x, y, mix)
    assert torch.equal(mixed, x) and torch.equal(weights, F.one_hot(y, 2).float())


def recipe_loader(n=24, batch=8, rank=0, world_size=1, **recipe):
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 3, (n,), generator=gen)
    return loader(images, labels, batch, augment=True, rank=rank, world_size=world_size, recipe=Recipe(**recipe))


def test_every_augmentation_is_a_function_of_seed_epoch_batch_and_rank():
    recipe = {"auto": AutoAugment("trivial"), "vflip": True, "rotate": 15.0, "erase_prob": 0.5,
              "mixing": Mixing(3, mixup_alpha=0.4, cutmix_alpha=1.0)}
    whole = list(recipe_loader(**recipe).batches(2))
    again = list(recipe_loader(**recipe).batches(2, start=1))  # a resumed epoch
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole[1:], again))
    assert all(torch.allclose(y.sum(1), torch.ones(len(y))) for _, y in whole)
    assert not torch.equal(whole[0][0], list(recipe_loader(**recipe).batches(3))[0][0])
    # Two ranks: each image gets the augmentation one rank gives it (mixing pairs within a part).
    no_mix = {**recipe, "mixing": None}
    one = list(recipe_loader(**no_mix).batches(2))
    two = [list(recipe_loader(rank=r, world_size=2, **no_mix).batches(2)) for r in (0, 1)]
    assert all(torch.equal(torch.cat([two[0][i][0], two[1][i][0]]), x) for i, (x, _) in enumerate(one))


def test_auto_augmentation_draws_per_image():
    same = torch.full((32, 3, 16, 16), 100, dtype=torch.uint8)
    same[:, :, 4:12, 4:12] = 200
    for kind in ("trivial", "randaugment"):
        out = AutoAugment(kind)(same, seed=1, part=slice(0, 32), total=32)
        assert out.dtype == torch.uint8 and out.shape == same.shape
        assert len({bytes(image.numpy()) for image in out}) > 8, kind  # one draw for all would give 1


def test_random_erasing_erases_rectangles_of_the_drawn_sizes():
    x = torch.randn(400, 1, 20, 20) + 10  # no zero but the erased ones
    erased = random_erase(x, seed=3, part=slice(0, 400), total=400, prob=0.5) == 0
    hit = erased.flatten(1).any(1)
    assert 150 < hit.sum() < 250
    for mask in erased[hit, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert mask.sum() == height * width  # a filled rectangle
        assert 1 <= mask.sum() <= 400 / 3 + 20


def test_drop_path_drops_whole_branches_per_image_in_training_only():
    drop = DropPath(0.5)
    x = torch.ones(2000, 2, 3, 3)
    out = drop(x)
    per_image = out.flatten(1)
    assert set(per_image.unique().tolist()) == {0.0, 2.0} and (per_image.std(1) == 0).all()
    assert per_image[:, 0].mean() == pytest.approx(1.0, abs=0.1)
    assert torch.equal(drop.eval()(x), x)
    model = build_model(composed("model=resnet20", "model.drop_path=0.3", "model.width=4").model, 1, 10)
    rates = [m.p for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 9 and rates[-1] == pytest.approx(0.3) and rates[0] == pytest.approx(0.3 / 9)


def test_tta_averages_the_logits_of_each_image_and_its_mirror():
    images = torch.randint(0, 256, (6, 1, 2, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = DeviceLoader(TensorSplit(images, labels), 6, Normalizer(torch.zeros(1), torch.ones(1) / 255, CPU),
                        shuffle=False)
    net = Identity()
    plain = evaluate(net, data, runtime())
    tta = evaluate(net, data, runtime(), tta=True)
    logits = (images.float().flatten(1) + images.float().flip(3).flatten(1)) / 2
    assert tta["test_loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert plain["test_loss"] != pytest.approx(tta["test_loss"])


def test_tta_shift_averages_the_image_moved_one_pixel_each_way_diagonally():
    images = torch.randint(0, 256, (6, 1, 4, 5), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    data = DeviceLoader(TensorSplit(images, labels), 6, Normalizer(torch.zeros(1), torch.ones(1) / 255, CPU),
                        shuffle=False)
    x = images.float()
    rows, cols = torch.arange(4), torch.arange(5)
    # Moved down-right: pixel (i, j) shows (i - 1, j - 1), the first row and column repeated;
    # moved up-left: it shows (i + 1, j + 1), the last ones repeated.
    down = x[:, :, (rows - 1).clamp(0)][..., (cols - 1).clamp(0)]
    up = x[:, :, (rows + 1).clamp(max=3)][..., (cols + 1).clamp(max=4)]
    for tta, expected in [(False, x / 2 + (down + up) / 4),
                          (True, (x + x.flip(3)) / 4 + (down + down.flip(3) + up + up.flip(3)) / 8)]:
        got = evaluate(Identity(), data, runtime(), tta=tta, tta_shift=1)
        assert got["test_loss"] == pytest.approx(F.cross_entropy(expected.flatten(1), labels).item(), rel=1e-6)
    assert composed("trainer.tta_shift=2").trainer.tta_shift == 2
    with pytest.raises(UserError, match=r"^trainer.tta_shift=-1: must be >= 0$"):
        validate(composed("trainer.tta_shift=-1"))


@pytest.mark.parametrize("override, words", [
    ("dataset.erase_prob=1.5", "dataset.erase_prob=1.5: must be in [0, 1]"),
    ("dataset.mix_prob=2", "dataset.mix_prob=2.0: must be in [0, 1]"),
    ("dataset.mixup_alpha=-1", "dataset.mixup_alpha=-1.0: must be >= 0"),
    ("dataset.auto_augment=autoaugment", "dataset.auto_augment=autoaugment: must be one of none, trivial"),
    ("dataset.randaugment_magnitude=31", "dataset.randaugment_magnitude=31: must be in 0..30"),
    ("model.drop_path=1", "model.drop_path=1.0: must be in [0, 1)"),
])
def test_bad_augmentation_values_are_one_line(override, words):
    test_bad_recipe_values_are_one_line(override, words)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    return write_cifar_like(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(autouse=True)
def any_cifar_checksum(monkeypatch):
    import torchvision.datasets.cifar

    # Our pickles are in CIFAR's real format but cannot match the published MD5 sums.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)


PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_each_preset_composes_and_trains_a_few_steps(preset, cifar_root, fmnist_root, tmp_path):
    probe = composed(f"experiment={preset}")
    validate(probe)
    root = cifar_root if probe.dataset.name == "cifar10" else fmnist_root
    cfg = composed(f"experiment={preset}", "debug=smoke", f"dataset.root={root}", *runs.TINY, "model.width=4",
                   "trainer.batch_size=64", "trainer.limit_train_batches=2")
    train(cfg, tmp_path)
    row, = metrics(tmp_path)
    assert row["epoch"] == 1 and 0 <= row["test_acc"] <= 1 and math.isfinite(row["train_loss"])
    # A preset that compiles its network trains compiled here, not an eager stand-in.
    compiled = json.loads((tmp_path / "runtime.json").read_text())["compile"]
    assert compiled == (probe.device.compile_mode if probe.device.compile else False)
    trained = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["config"]
    assert trained["optim"] == OmegaConf.to_container(probe.optim)
    assert trained["dataset"]["augment"] == probe.dataset.augment


def test_the_he2015_preset_is_the_paper_s_schedule_and_its_depth_table_one_sweep(cifar_root, tmp_path):
    he = composed("experiment=cifar10_he2015")
    assert (he.optim.name, he.optim.lr, he.optim.momentum, he.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert (he.trainer.batch_size, he.dataset.augment, list(he.sched.milestone_steps)) == (128, "flip_crop",
                                                                                          [32000, 48000])
    steps = math.ceil(50000 / 128) * he.trainer.epochs
    assert 64000 <= steps < 64000 + math.ceil(50000 / 128)  # 64k iterations, to the epoch
    code, sweep, _ = multirun(tmp_path, cifar_root, "experiment=cifar10_he2015", "model=resnet20,resnet32",
                              "model.width=4", "trainer.limit_train_batches=1", "trainer.limit_eval_batches=1")
    assert code == 0
    jobs = [yaml.safe_load((sweep / str(i) / ".hydra" / "config.yaml").read_text()) for i in (0, 1)]
    assert [job["model"]["layers"] for job in jobs] == [[3, 3, 3], [5, 5, 5]]
    assert all(job["sched"]["milestone_steps"] == [32000, 48000] for job in jobs)
    assert all((sweep / str(i) / "metrics.jsonl").exists() for i in (0, 1))


def test_milestone_steps_divide_the_rate_at_those_updates():
    net = linear_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    scheduler = build_scheduler(optimizer, composed("sched=step", "sched.milestone_steps=[3,5]").sched,
                                steps_per_epoch=4, epochs=2)
    rates = []
    for _ in range(7):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_a_test_metric_named_as_objective_chooses_best_pt_on_test_with_a_warning(fmnist_root, tmp_path, caplog):
    cfg = composed(f"dataset.root={fmnist_root}", *runs.TINY, "trainer.epochs=2", "trainer.limit_train_batches=2",
                   "logger=none", "trainer.objective=test_acc")
    with caplog.at_level("WARNING", logger="resnet_lab"):
        result = train(cfg, tmp_path)
    rows = metrics(tmp_path)
    assert result == max(row["test_acc"] for row in rows)
    assert "chosen on the test split" in caplog.text and "optimistic" in caplog.text
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    first_is_best = rows[0]["test_acc"] >= rows[1]["test_acc"]
    assert (tmp_path / "checkpoints" / "best.pt").samefile(tmp_path / "checkpoints" / state["model"]) != first_is_best
