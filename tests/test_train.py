"""Training in-process: determinism, and the on-device loader's guarantees."""

import io
import sys

import pytest
import torch
from hydra import compose, initialize_config_module

from resnet_lab.config import validate
from resnet_lab.data import build_data
from resnet_lab.data.loader import DeviceLoader, Normalizer, TensorSplit
from resnet_lab.errors import UserError
from resnet_lab.training.train import train
from tests import runs
from tests.runs import for_kind


def tiny_cfg(root, *extra):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=for_kind([*runs.TINY, f"dataset.root={root}", *extra]))


def test_same_seed_same_metrics(fmnist_root, tmp_path):
    metrics = []
    for name in ("a", "b"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        acc = train(tiny_cfg(fmnist_root, "trainer.epochs=2", "dataset.augment=flip_crop"), run_dir)
        rows = runs.metrics(run_dir)
        assert acc == rows[-1]["test_acc"]
        metrics.append([{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows])
        weights = torch.load(run_dir / "model.pt")
        metrics[-1].append(float(sum(w.float().sum() for w in weights.values())))
    assert metrics[0] == metrics[1]


def test_different_seed_different_run(fmnist_root, tmp_path):
    losses = []
    for seed in (0, 1):
        run_dir = tmp_path / str(seed)
        run_dir.mkdir()
        train(tiny_cfg(fmnist_root, "trainer.epochs=1", f"seed={seed}"), run_dir)
        losses.append(runs.metrics(run_dir)[0]["train_loss"])
    assert losses[0] != losses[1]


def make_loader(n=50, batch=8, augment=False, seed=0, limit=0, pad=4):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8)
    split = TensorSplit(images, torch.arange(n))
    norm = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25), torch.device("cpu"), pad=pad)
    return DeviceLoader(split, batch, norm, shuffle=True, augment=augment, seed=seed, limit=limit), split


def test_loader_visits_every_index_once_per_epoch():
    loader, _ = make_loader()
    labels = torch.cat([y for _, y in loader.batches(1)])
    assert len(loader) == 7 and sorted(labels.tolist()) == list(range(50))


def test_loader_order_is_seeded_and_changes_across_epochs():
    a, _ = make_loader(seed=3)
    b, _ = make_loader(seed=3)
    order = lambda loader, epoch: torch.cat([y for _, y in loader.batches(epoch)]).tolist()  # noqa: E731
    assert order(a, 1) == order(b, 1)
    assert order(a, 1) != order(a, 2)
    assert order(a, 1) != order(make_loader(seed=4)[0], 1)


def test_loader_resumes_mid_epoch_with_the_same_batches():
    loader, _ = make_loader(augment=True)
    full = list(loader.batches(2))
    rest = list(loader.batches(2, start=3))
    assert len(rest) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_no_augment_gives_exactly_the_normalised_images():
    loader, split = make_loader()
    for x, y in loader.batches(1):
        expected = (split.images[y].float() / 255 - 0.5) / 0.25
        assert torch.allclose(x, expected, atol=1e-5)


def test_flip_crop_keeps_shape_dtype_and_labels():
    loader, split = make_loader(augment=True)
    changed = 0
    for x, y in loader.batches(1):
        assert x.shape == (len(y), 3, 8, 8) and x.dtype == torch.float32
        plain = (split.images[y].float() / 255 - 0.5) / 0.25
        changed += int(not torch.allclose(x, plain))
        # Each augmented image is a shifted (and maybe mirrored) view of its own source image:
        # its centre pixels appear somewhere in the source.
        src = split.images[y[0]].float().div(255).sub(0.5).div(0.25)
        centre = x[0, :, 4, 4]
        candidates = torch.cat([src, src.flip(2)], dim=2).permute(1, 2, 0).reshape(-1, 3)
        assert torch.isclose(candidates, centre).all(dim=1).any()
    assert changed > 0


@pytest.mark.parametrize("pad", [0, 1])
def test_flip_crop_moves_each_image_by_at_most_its_padding(pad):
    loader, split = make_loader(augment=True, pad=pad)
    shifts = set()
    for x, y in loader.batches(1):
        for image, label in zip(x, y):
            src = split.images[label].float().div(255).sub(0.5).div(0.25)
            padded = torch.nn.functional.pad(torch.stack([src, src.flip(2)]), (pad,) * 4, value=-2.0)
            found = [(m, dy, dx) for m in range(2) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                     if torch.allclose(padded[m, :, dy:dy + 8, dx:dx + 8], image, atol=1e-5)]
            assert found, "not a shift by <= pad pixels of the image or its mirror"
            shifts.update(found)
    assert {m for m, _, _ in shifts} == {0, 1}  # both mirrored and not
    assert {(dy, dx) for _, dy, dx in shifts} == {(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)}


def test_augment_flip_and_crop_padding_reach_the_loader(fmnist_root):
    for augment, padding, pad in [("flip", 3, 0), ("flip_crop", 2, 2), ("flip_crop", 4, 4)]:
        cfg = tiny_cfg(fmnist_root, f"dataset.augment={augment}", f"dataset.crop_padding={padding}")
        data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), 0)
        assert data.train.augment and data.normalizer.pad == pad


def test_train_sizes_resize_the_training_batches_of_their_epochs_only(fmnist_root, tmp_path):
    cfg = tiny_cfg(fmnist_root, "dataset.train_sizes=[12,20]")
    data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), 0)
    native = next(data.test.batches(0))[0].shape[-1]
    assert [next(data.train.batches(epoch))[0].shape[-2:] for epoch in (1, 2, 3)] == \
        [(12, 12), (20, 20), (native, native)]
    x = next(data.train.batches(1))[0]
    assert torch.isfinite(x).all() and x.std() > 0.5  # resized images, not a blank
    # A run trains through the sizes and evaluates at the data's own size.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(tiny_cfg(fmnist_root, "trainer.epochs=2", "dataset.train_sizes=[12]"), run_dir)
    assert [r["epoch"] for r in runs.metrics(run_dir)] == [1, 2]
    with pytest.raises(UserError, match=r"dataset.train_sizes=\[12, 0\]: each must be an image side >= 1"):
        validate(tiny_cfg(fmnist_root, "dataset.train_sizes=[12,0]"))


def test_whiten_stem_is_set_from_the_normalised_training_images_and_kept_by_the_run(fmnist_root, tmp_path):
    from resnet_lab.models import build_model
    from resnet_lab.training.trainer import WHITEN_IMAGES

    cfg = tiny_cfg(fmnist_root, "model.stem=whiten")
    data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), 0)
    sample = data.train.sample(WHITEN_IMAGES)
    assert len(sample) == min(WHITEN_IMAGES, data.train.num_samples)
    assert torch.equal(sample[:3], next(data.train.batches(0))[0][:3])  # epoch 0's first, normalised
    expected = build_model(cfg.model, data.in_channels, data.num_classes)
    expected.whiten_from(sample)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(tiny_cfg(fmnist_root, "model.stem=whiten", "trainer.epochs=2"), run_dir)
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    assert torch.allclose(weights["conv1.weight"], expected.conv1.weight)  # as set, frozen through training
    assert [r["epoch"] for r in runs.metrics(run_dir)] == [1, 2]


def test_limit_cuts_the_epoch():
    loader, _ = make_loader(limit=2)
    assert len(loader) == 2 and len(list(loader.batches(1))) == 2


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bar_only_on_a_terminal(terminal, monkeypatch):
    from resnet_lab.training.tracking import EpochProgress

    out = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    with EpochProgress(True, epoch=2, epochs=3, total=10, start=4) as bar:
        for _ in range(3):
            bar.advance()
        if terminal:
            assert bar.bar.tasks[0].completed == 7 and bar.bar.tasks[0].total == 10
    if terminal:
        assert "epoch 2/3" in out.getvalue()
    else:
        assert bar.bar is None and out.getvalue() == ""
    with EpochProgress(False, epoch=1, epochs=1, total=5) as off:
        off.advance()
    assert off.bar is None
