"""Bad data, checkpoints and run folders: one clear line, exit status 2, and nothing that the run
folder held before is removed or changed. (Config mistakes: test_cli.py; a diverging loss and a
full disk: test_reliability.py.)"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_lab import rundir
from resnet_lab.__main__ import main
from resnet_lab.data import build_data
from resnet_lab.data.images import decode, headers
from resnet_lab.errors import UserError
from resnet_lab.training.train import train
from tests import runs
from tests.conftest import write_cifar_like
from tests.runs import contents, for_kind, fresh_env
from tests.test_cli import run_cli
from tests.test_train import tiny_cfg

RUN = runs.TINY


def one_line_error(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    return last


@pytest.fixture(scope="module")
def finished_run(fmnist_root, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    train(tiny_cfg(fmnist_root, "trainer.epochs=1", "trainer.limit_train_batches=2"), run_dir)
    return run_dir


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


@pytest.mark.parametrize("file, label, split, count", [
    ("train-labels-idx1-ubyte", 200, "train", 320),
    # One past the last class: before this check, found by the loss only after a whole epoch.
    ("t10k-labels-idx1-ubyte", 10, "test", 80),
])
def test_an_idx_label_out_of_range_is_named_before_training(file, label, split, count, fmnist_root, tmp_path,
                                                            monkeypatch, capsys):
    root = tmp_path / "data"
    shutil.copytree(fmnist_root, root)
    path = root / "FashionMNIST" / "raw" / file
    data = bytearray(path.read_bytes())
    data[8 + 5] = label  # the sixth label, after the IDX header's magic and size
    path.write_bytes(bytes(data))
    code, err = run_cli([f"dataset.root={root}", *RUN, "trainer.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"],
                        tmp_path, monkeypatch, capsys)
    assert one_line_error(code, err) == (
        f"error: dataset fashion_mnist: a {split} label is {label} (1 of the {count} {split} labels in "
        f"{path.parent} are out of range), but the data set has 10 classes (labels 0 to 9); its label file is "
        f"damaged or from another data set: delete it and download (or copy) it again")
    assert not (tmp_path / "run" / rundir.METRICS).exists() and not rundir.last(tmp_path / "run").exists()


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


def test_image_folder_with_one_class_is_named(tmp_path, monkeypatch, capsys):
    # The root one level too high: root/all/<class>/<image> reads as one class, "all".
    images = tmp_path / "images"
    for cls in ("a", "b", "c"):
        (images / "all" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (12, 12), (i * 40, 0, 0)).save(images / "all" / cls / f"{i}.png")
    code, err = run_cli([f"dataset.root={images}", "dataset=image_folder", *RUN], tmp_path, monkeypatch, capsys)
    assert one_line_error(code, err) == (f"error: dataset image_folder: {images} has one class folder, all (it holds "
                                         f"a, b, c: should dataset.root be {images / 'all'}?); a classifier needs "
                                         f"at least two (<root>/<class>/<image>)")
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("last.pt"))


@pytest.mark.parametrize("where", ["", "train", "test"])
def test_image_folder_with_an_empty_class(where, tmp_path, monkeypatch, capsys):
    images = tmp_path / "images"
    if where:
        write_split_folder(images)
    else:
        (images / "c0").mkdir(parents=True)
        Image.new("RGB", (12, 12)).save(images / "c0" / "0.png")
    (images / where / "c2").mkdir()
    code, err = run_cli([f"dataset.root={images}", "dataset=image_folder", *RUN], tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert "c2" in last and f"(in {images / where})" in last and "each class folder at least one image" in last


@pytest.mark.parametrize("folders", [("cats", "dogs"), ("train/cats", "test/cats", "train/dogs", "test/dogs")])
def test_image_folder_of_mixed_sizes_without_resize(folders, tmp_path, monkeypatch, capsys):
    for folder, size in zip(folders, ((16, 16), (20, 12), (16, 16), (16, 16))):
        (tmp_path / "images" / folder).mkdir(parents=True)
        Image.new("RGB", size).save(tmp_path / "images" / folder / "0.png")
    code, err = run_cli([f"dataset.root={tmp_path / 'images'}", "dataset=image_folder", *RUN],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    for word in ("different sizes", "16x16", "20x12", "dataset.resize"):
        assert word in last
    # ... and with dataset.resize=N they are all read at N x N.
    cfg = tiny_cfg(tmp_path / "images", "dataset=image_folder", "dataset.resize=12", "dataset.num_workers=0",
                   "trainer.batch_size=1")
    data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), cfg.seed)
    assert {x.shape[-2:] for loader in (data.train, data.test) for x, _ in loader.batches(1)} == {(12, 12)}


def write_split_folder(root: Path) -> Path:
    """root/train and root/test, two classes, 12x12 noise as PNG and JPEG (noise, so that most of
    a JPEG is image data after its header: cut in half, its header still opens)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 2)):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                for suffix in (".png", ".jpg"):
                    pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(root / split / c / f"{i}{suffix}")
    return root


def truncate_image_data(path: Path) -> None:
    """Cut the file in the middle of its image data, its header left whole."""
    data = path.read_bytes()
    start = data.index(b"\xff\xda" if path.suffix == ".jpg" else b"IDAT")  # JPEG's scan, PNG's data
    path.write_bytes(data[:(start + len(data)) // 2])


DAMAGE = {  # how an image file goes bad, and the words that must say so
    "truncated png": (".png", truncate_image_data, ["truncated or corrupt", "image file is truncated"]),
    "truncated jpeg": (".jpg", truncate_image_data, ["truncated or corrupt", "image file is truncated"]),
    "empty": (".jpg", lambda p: p.write_bytes(b""), ["the file is empty (0 bytes)"]),
    "not an image": (".jpg", lambda p: p.write_text("<html>404 Not Found</html>"),
                     ["not an image file (PIL cannot identify it)"]),
    "broken link": (".png", lambda p: (p.unlink(), p.symlink_to(p.with_name("gone.png"))),
                    ["No such file or directory"]),
}
# Found by the header pass at the start: everything but a truncated file. (A file without read
# permission: test_image_without_read_permission_is_named.)
FOUND_AT_START = [kind for kind in DAMAGE if not kind.startswith("truncated")]


def assert_names(line: str, path: Path, words) -> None:
    assert f"dataset image_folder: cannot read {path}: " in line
    for word in words:
        assert word in line
    assert "delete it" in line


@pytest.mark.parametrize("kind", FOUND_AT_START)
def test_unreadable_image_is_named_before_training(kind, tmp_path, monkeypatch, capsys):
    # In the test split, which training reads only after the first epoch.
    images = write_split_folder(tmp_path / "images")
    suffix, damage, words = DAMAGE[kind]
    bad = images / "test" / "c1" / f"1{suffix}"
    damage(bad)
    run_dir = tmp_path / "run"
    code, err = run_cli([f"dataset.root={images}", "dataset=image_folder", *RUN, f"hydra.run.dir={run_dir}"],
                        tmp_path, monkeypatch, capsys)
    assert_names(one_line_error(code, err), bad, words)
    assert not (run_dir / rundir.CHECKPOINTS).exists() and not (run_dir / "status").exists()


def test_truncated_training_image_is_named_before_training(tmp_path, monkeypatch, capsys):
    # A truncated file opens; decoding the cache reads it whole (streaming: the sample that sets
    # the normalisation).
    images = write_split_folder(tmp_path / "images")
    bad = images / "train" / "c0" / "3.jpg"
    truncate_image_data(bad)
    code, err = run_cli([f"dataset.root={images}", "dataset=image_folder", *RUN], tmp_path, monkeypatch, capsys)
    assert_names(one_line_error(code, err), bad, DAMAGE["truncated jpeg"][2])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", DAMAGE)
def test_image_that_goes_bad_is_named_when_read(kind, workers, tmp_path):
    # The header check has passed it; the file goes bad before a streaming loader (or its worker)
    # reads it.
    images = write_split_folder(tmp_path / "images")
    cfg = tiny_cfg(images, "dataset=image_folder", f"dataset.num_workers={workers}", "trainer.eval_batch_size=4",
                   "dataset.cache=false")
    data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), seed=0)
    suffix, damage, words = DAMAGE[kind]
    bad = images / "test" / "c1" / f"0{suffix}"
    damage(bad)
    with pytest.raises(UserError) as raised:
        list(data.test.batches(0))
    message = str(raised.value)
    assert "\n" not in message and "Traceback" not in message
    assert_names(message, bad, words)


def test_image_without_read_permission_is_named():
    # Root reads any file: as root, the reads run in a child process that becomes nobody, so the
    # folder lies outside pytest's root-only tmp_path.
    with tempfile.TemporaryDirectory() as folder:
        os.chmod(folder, 0o755)
        bad = Path(folder) / "0.png"
        Image.new("RGB", (4, 4)).save(bad)
        bad.chmod(0)
        readout, writeend = os.pipe()
        if os.fork() == 0:
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                said = []
                for read in (lambda p: headers([p]), lambda p: decode(p, 3)):  # the header check, the loader
                    try:
                        read(str(bad))
                        said.append("read")
                    except UserError as e:
                        said.append(str(e))
                os.write(writeend, "\n".join(said).encode())
            finally:
                os._exit(0)
        os.close(writeend)
        with os.fdopen(readout) as f:
            said = f.read().splitlines()
        os.wait()
    assert len(said) == 2
    for line in said:
        assert_names(line, bad, ["no permission to read it", "chmod a+r"])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> Path:
    """A finished one-epoch image_folder run, and its folder of images."""
    root = tmp_path_factory.mktemp("image_run")
    images = write_split_folder(root / "images")
    (root / "run").mkdir()
    train(tiny_cfg(images, "dataset=image_folder", "dataset.num_workers=0", "logger=none",
                   "trainer.batch_size=8", "trainer.epochs=1"), root / "run")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_image_that_fails_mid_run_keeps_the_checkpoint(workers, image_run, tmp_path, monkeypatch, capsys):
    # Epoch 2 trains, then evaluation meets the truncated file before last.pt is rewritten (when
    # decoding while training: a decoded cache would be rebuilt, and meet it before training).
    shutil.copytree(image_run, tmp_path / "copy")
    images, run_dir = tmp_path / "copy" / "images", tmp_path / "copy" / "run"
    bad = images / "test" / "c0" / "1.png"
    truncate_image_data(bad)
    kept = {name: (run_dir / name).read_bytes() for name in
            ("checkpoints/last.pt", "metrics.jsonl")}
    args = [f"dataset.root={images}", "dataset=image_folder", *RUN, "logger=none", "trainer.batch_size=8",
            "trainer.epochs=2", f"dataset.num_workers={workers}", "dataset.cache=false", f"hydra.run.dir={run_dir}"]
    if workers:
        # In its own process: the workers must not keep it from exiting.
        done = subprocess.run([sys.executable, "-m", "resnet_lab", *for_kind(args)], capture_output=True, text=True,
                              cwd=tmp_path, env=fresh_env(), timeout=120)
        code, err = done.returncode, done.stderr
    else:
        code, err = run_cli(args, tmp_path, monkeypatch, capsys)
    assert_names(one_line_error(code, err), bad, DAMAGE["truncated png"][2])
    assert "resuming from" in (run_dir / "train.log").read_text()
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept
    assert (run_dir / "status").read_text() == "failed\n"


def test_resume_from_a_missing_checkpoint(fmnist_root, tmp_path, monkeypatch, capsys):
    code, err = run_cli([f"dataset.root={fmnist_root}", *RUN, f"trainer.resume={tmp_path / 'nope.pt'}"],
                        tmp_path, monkeypatch, capsys)
    last = one_line_error(code, err)
    assert "nope.pt: no such checkpoint file" in last and "trainer.resume=none" in last


def test_resume_from_a_truncated_checkpoint(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    last_pt = run_copy / rundir.CHECKPOINTS / rundir.LAST
    os.truncate(last_pt, last_pt.stat().st_size // 2)
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys)
    for word in (str(last_pt), "corrupt or truncated", "trainer.resume=none"):
        assert word in last


def test_resume_from_a_file_that_is_not_a_checkpoint(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys,
                        f"trainer.resume={run_copy / 'model.pt'}")
    assert "model.pt is not a resnet_lab checkpoint" in last and "optimizer" in last


def test_resume_from_random_bytes_names_what_the_unpickler_met(run_copy, fmnist_root, tmp_path, monkeypatch,
                                                                capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes([0x80, 2, 197]) + bytes(100))  # a pickle protocol 2 header, then no opcode
    last = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys, f"trainer.resume={junk}")
    assert f"checkpoint {junk} is corrupt or truncated (UnpicklingError: Unsupported operand 197); " in last
    assert "weights_only" not in last and "2.6" not in last


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


def test_an_existing_run_folder_on_a_read_only_file_system(finished_run, fmnist_root, tmp_path, tiny_tmpfs,
                                                          monkeypatch, capsys):
    run_dir, why = runs.read_only_copy(finished_run, tmp_path, tiny_tmpfs)
    code, err = run_cli([f"dataset.root={fmnist_root}", *RUN, f"hydra.run.dir={run_dir}"], tmp_path, monkeypatch,
                        capsys)
    last = one_line_error(code, err)
    assert last == (f"error: {run_dir / 'train.log'}: {why}; the run folder must be writable and "
                    f"have free space (choose it with hydra.run.dir, or hydra.sweep.dir for -m)")


def test_a_command_that_trains_nothing_leaves_the_run_s_hydra_record(fmnist_root, tmp_path, monkeypatch, capsys):
    # Hydra rewrites <run>/.hydra before the job runs; compare reads the run's overrides there.
    run_dir = tmp_path / "run"
    args = [f"dataset.root={fmnist_root}", *RUN, "logger=none", "trainer.limit_train_batches=2",
            f"hydra.run.dir={run_dir}"]

    def succeeds(*change):
        with monkeypatch.context() as patch:
            patch.chdir(tmp_path)
            patch.setattr(sys, "argv", ["resnet_lab", *args, *change])
            patch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it for Hydra: not for later tests
            main()
        return {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")}

    trained = succeeds("trainer.epochs=1")
    assert b"trainer.epochs=1" in trained["overrides.yaml"]
    for change in (["trainer.epochs=2", "model=resnet34"],  # a resume into another model: refused
                   ["trainer.epochs=2", "optim.lr=-1"],     # a value out of range
                   ["trainer.epochs=1", "optim.lr=0.5"]):   # finished, with other settings: refused
        one_line_error(*run_cli([*args, *change], tmp_path, monkeypatch, capsys))
        assert {p.name: p.read_bytes() for p in (run_dir / ".hydra").glob("*.yaml")} == trained
    # Finished: the same command again, with settings that train nothing differently.
    assert succeeds("trainer.epochs=1", "trainer.progress=true") == trained
    # A record that cannot be put back costs that alone: the run's own error still comes out.
    with monkeypatch.context() as patch:
        patch.setattr(rundir, "atomic_write", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left")))
        line = one_line_error(*run_cli([*args, "trainer.epochs=2", "model=resnet34"], tmp_path, monkeypatch, capsys))
    assert "does not fit" in line and "it was saved by model=resnet18" in line
    # A command that trains (one epoch more) is the run's record from then on.
    extended = succeeds("trainer.epochs=2")
    assert b"trainer.epochs=2" in extended["overrides.yaml"]
    assert extended == {p.name: p.read_bytes() for p in (run_dir / "checkpoints" / "hydra").glob("*.yaml")}


def test_a_finished_run_rerun_with_settings_that_train_nothing_differently(run_copy, fmnist_root):
    last = run_copy / rundir.CHECKPOINTS / rundir.LAST
    state = torch.load(last, weights_only=True)
    del state["config"]["trainer"]["limit_eval_batches"]  # as a checkpoint from before that key
    torch.save(state, last)
    before = contents(run_copy)
    assert train(tiny_cfg(fmnist_root, "trainer.epochs=1", "trainer.limit_train_batches=2", "device=auto",
                          "trainer.checkpoint_every_steps=5", "trainer.save_weights=false",
                          "trainer.eval_batch_size=7"), run_copy) == state["metrics"]["test_acc"]
    assert contents(run_copy) == before


def test_a_checkpoint_past_the_epochs_asked_for(run_copy, fmnist_root, tmp_path, monkeypatch, capsys):
    # A run extended to 2 epochs and stopped in the middle of the second, run again with 1: the
    # weights are past epoch 1, so neither "finished" nor a model.pt from them would be true.
    last = run_copy / rundir.CHECKPOINTS / rundir.LAST
    state = torch.load(last, weights_only=True)
    state.update(epoch=2, step=1)
    state["config"]["trainer"]["epochs"] = 2
    del state["elapsed"]  # as checkpoints written before it was kept
    torch.save(state, last)
    line = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys, "trainer.epochs=1",
                        "trainer.limit_train_batches=2")
    assert f"{last} is at step 1 of epoch 2, past trainer.epochs=1; resume with trainer.epochs=2, as it was saved" in line
    train(tiny_cfg(fmnist_root, "trainer.epochs=2", "trainer.limit_train_batches=2"), run_copy)
    assert runs.epochs(run_copy) == [1, 2]


@pytest.mark.parametrize("damaged", [rundir.LAST, "weights"])
def test_a_checkpoint_damaged_in_its_middle_is_named_before_it_is_used(damaged, run_copy, fmnist_root, tmp_path,
                                                                       monkeypatch, capsys):
    last = rundir.last(run_copy)
    path = last if damaged == rundir.LAST else last.parent / torch.load(last, weights_only=True)["model"]
    runs.damage_in_middle(path)
    line = resume_fails(run_copy, fmnist_root, tmp_path, monkeypatch, capsys, "trainer.epochs=4")
    assert f"{path}" in line and "is damaged (record " in line and "does not match its stored checksum" in line
