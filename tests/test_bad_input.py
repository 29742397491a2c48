"""Bad data, checkpoints and run folders: one clear line, exit status 2, and nothing that the run
folder held before is removed or changed. (Config mistakes: test_cli.py; a diverging loss and a
full disk: test_reliability.py.)"""

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torchvision
from PIL import Image

from resnet_lab import checkpoint
from resnet_lab.train import train
from tests.conftest import write_cifar_like
from tests.test_cli import run_cli
from tests.test_train import tiny_cfg

RUN = ["dataset.download=false", "device=cpu", "model.width=8", "trainer.batch_size=32",
       "trainer.eval_batch_size=64", "trainer.progress=false"]


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.fixture(scope="module")
def finished_run(one_thread, fmnist_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    train(tiny_cfg(fmnist_root, "trainer.epochs=1", "trainer.limit_train_batches=2"), run_dir)
    return run_dir


def contents(run_dir: Path) -> dict:
    """Every file the run wrote, its bytes and mtime, except Hydra's record of the latest command,
    the log, and W&B's debug logs (its service may still append to them after the run ends)."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*")
            if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
            and not p.name.startswith("debug")}


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    return run_dir


def resume_fails(run_dir, fmnist_root, tmp_path, monkeypatch, capsys, *args) -> str:
    """Run into run_dir with args; return the error line, checking that run_dir lost nothing."""
    before = contents(run_dir)
    code, err = run_cli([f"dataset.root={fmnist_root}", *RUN, f"hydra.run.dir={run_dir}", *args],
                        tmp_path, monkeypatch, capsys)
    assert contents(run_dir) == before
    return one_line_error(code, err)


@pytest.mark.parametrize("file, damage, words", [
    ("train-images-idx3-ubyte", lambda p: os.truncate(p, 100_000),
     ["train-images-idx3-ubyte (truncated: 100,000 bytes, its header says 250,896)"]),
    ("t10k-labels-idx1-ubyte", lambda p: p.write_bytes(os.urandom(80)),
     ["t10k-labels-idx1-ubyte (not an IDX file)"]),
])
def test_damaged_idx_file_is_named(file, damage, words, fmnist_root, tmp_path, monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(fmnist_root, root)
    damage(root / "FashionMNIST" / "raw" / file)
    code, err = run_cli([f"dataset.root={root}", *RUN], tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    for word in ["dataset fashion_mnist: damaged files in", *words, "download"]:
        assert word in last
    assert last.count("ubyte") == 1  # the intact files are not blamed


def test_damaged_cifar_pickle_is_named(tmp_path, monkeypatch, capsys):
    root = write_cifar_like(tmp_path / "data")
    folder = root / torchvision.datasets.CIFAR10.base_folder
    cls = torchvision.datasets.CIFAR10
    # Our pickles cannot match the published checksums: publish theirs instead, so that
    # torchvision's own integrity check runs on them.
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    monkeypatch.setattr(cls, "train_list", [[name, md5[name]] for name, _ in cls.train_list])
    monkeypatch.setattr(cls, "test_list", [[name, md5[name]] for name, _ in cls.test_list])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5[cls.meta["filename"]]})
    data = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(data[:len(data) // 2])
    code, err = run_cli([f"dataset.root={root}", "dataset=cifar10", *RUN], tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert "dataset cifar10: damaged files in" in last and "data_batch_3 (wrong checksum)" in last
    assert "data_batch_1" not in last and "test_batch" not in last


def test_empty_image_folder(tmp_path, monkeypatch, capsys):
    for cls in ("cats", "dogs"):
        (tmp_path / "images" / cls).mkdir(parents=True)
    code, err = run_cli([f"dataset.root={tmp_path / 'images'}", "dataset=image_folder", *RUN],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert "no images under" in last and str(tmp_path / "images") in last


def test_image_folder_of_mixed_sizes_without_resize(tmp_path, monkeypatch, capsys):
    for cls, size in (("cats", (16, 16)), ("dogs", (20, 12))):
        (tmp_path / "images" / cls).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "images" / cls / "0.png")
    code, err = run_cli([f"dataset.root={tmp_path / 'images'}", "dataset=image_folder", *RUN],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    for word in ("different sizes", "16x16", "20x12", "dataset.resize"):
        assert word in last


def test_resume_from_a_missing_checkpoint(fmnist_root, tmp_path, monkeypatch, capsys):
    code, err = run_cli([f"dataset.root={fmnist_root}", *RUN, f"trainer.resume={tmp_path / 'nope.pt'}"],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert "nope.pt: no such checkpoint file" in last and "trainer.resume=none" in last


def test_resume_from_a_truncated_checkpoint(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    last_pt = run_copy / checkpoint.FOLDER / checkpoint.LAST
    os.truncate(last_pt, last_pt.stat().st_size // 2)
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys)
    for word in (str(last_pt), "corrupt or truncated", "best.pt", "trainer.resume=none"):
        assert word in last


def test_resume_from_a_file_that_is_not_a_checkpoint(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys,
                        f"trainer.resume={run_copy / 'model.pt'}")
    assert "model.pt is not a resnet_lab checkpoint" in last and "optimizer" in last


@pytest.mark.parametrize("args, words", [
    (["model=resnet34"], ["does not fit this model", "missing: layer1.2.conv1.weight", "model=resnet18"]),
    (["model.width=16"], ["does not fit this model",
                          "shapes differ: conv1.weight [8, 1, 7, 7] there, [16, 1, 7, 7] here"]),
    (["dataset=synthetic", "dataset.channels=1", "dataset.image_size=28", "dataset.num_classes=5"],
     ["does not fit this model", "fc.weight [10, 64] there, [5, 64] here", "dataset=fashion_mnist"]),
    (["optim=sgd"], ["saved with optim=adam", "this run has optim=sgd"]),
])
def test_resume_into_another_model_names_the_difference(args, words, run_copy, fmnist_root, tmp_path,
                                                        monkeypatch, capsys):
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys, *args)
    for word in words:
        assert word in last


@pytest.mark.parametrize("stretch, named", [
    (["trainer.epochs=2"], "trainer.epochs=2 (checkpoint: 1)"),
    (["trainer.epochs=2", "trainer.batch_size=16"],
     "trainer.epochs=2 (checkpoint: 1); trainer.batch_size=16 (checkpoint: 32)"),
], ids=["epochs", "epochs-and-batch_size"])
def test_a_schedule_laid_over_the_run_keeps_its_length(stretch, named, fmnist_root, tmp_path, monkeypatch, capsys):
    # Stretched, onecycle's restored state would fail at the first step past its end.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    train(tiny_cfg(fmnist_root, "trainer.epochs=1", "trainer.batch_size=32", "trainer.limit_train_batches=0",
                   "sched=onecycle", "logger=none"), run_dir)
    capsys.readouterr()  # what it printed, through the handlers an earlier in-process CLI run left
    last = resume_fails(run_dir, fmnist_root, tmp_path, monkeypatch, capsys, "trainer.limit_train_batches=0",
                        "trainer.epochs=1", "trainer.batch_size=32", "sched=onecycle", *stretch)
    assert last.startswith(f"error: {named}: checkpoint") and "whose sched=onecycle spans its steps" in last
    assert "resume with the checkpoint's values" in last


def test_fresh_start_refuses_to_overwrite_a_run(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys, "trainer.resume=none")
    assert "trainer.resume=none" in last and "already holds a run" in last and "trainer.resume=auto" in last


@pytest.mark.parametrize("blocker", ["a file", "a read-only folder"])
def test_run_folder_that_cannot_be_written(blocker, fmnist_root, tmp_path, monkeypatch, capsys):
    parent = tmp_path / "parent"
    if blocker == "a file":
        parent.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        parent.mkdir(mode=0o500)
    code, err = run_cli([f"dataset.root={fmnist_root}", *RUN, f"hydra.run.dir={parent / 'run'}"],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert str(parent) in last and "writable" in last and "hydra.run.dir" in last
    if blocker == "a file":
        assert parent.read_text() == "not a folder"
