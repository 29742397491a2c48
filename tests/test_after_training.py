"""After training: evaluate, predict and export a trained run, and fine-tune from weights
(model.init: torchvision's state dicts, other class counts, grey against colour input)."""

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from resnet_lab.config import OptimConfig
from resnet_lab.errors import UserError
from resnet_lab.models import MODELS, weights
from resnet_lab.optim import build_optimizer
from resnet_lab.trained import evaluate, export, predict
from resnet_lab.trained import load as trained
from tests.runs import contents, fresh_env, metrics, read_only_copy

CLASSES = [f"k{i}" for i in range(6)]  # more than 5: top-5 accuracy too
TEST_PER_CLASS = (3, 4, 2, 5, 3, 4)
RUN = ["dataset=image_folder", "dataset.num_workers=0", "model.width=4", "trainer.epochs=2",
       "trainer.batch_size=16", "trainer.eval_batch_size=7", "device=cpu", "device.precision=fp32",
       "trainer.progress=false", "logger=none"]


def write_images(root: Path, classes=CLASSES, seed: int = 0) -> Path:
    """root/train and root/test, 16x16 PNGs, brighter with the class index."""
    rng = np.random.default_rng(seed)
    for split, counts in (("train", [8] * len(classes)), ("test", TEST_PER_CLASS)):
        for c, (name, n) in enumerate(zip(classes, counts)):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 100, (16, 16, 3)) + 25 * c
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished two-epoch run on image_folder, trained by the command line."""
    tmp = tmp_path_factory.mktemp("trained")
    images = write_images(tmp / "images")
    folder = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", *RUN, f"dataset.root={images}",
                           f"hydra.run.dir={folder}"], capture_output=True, text=True, cwd=tmp,
                          env=fresh_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return folder


def command(module, args, monkeypatch, capsys):
    """A command's main as `python -m` runs it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["x", *map(str, args)])
    code = 0
    try:
        trained.main(module.main)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_evaluate_reproduces_the_runs_last_test_accuracy_and_counts_every_image(run_dir, monkeypatch, capsys):
    code, out, _ = command(evaluate, [run_dir], monkeypatch, capsys)
    assert code == 0
    report = json.loads((run_dir / "eval" / "image_folder-last.json").read_text())
    last = metrics(run_dir)[-1]
    assert report["accuracy"] == last["test_acc"] and report["loss"] == last["test_loss"]
    assert f"accuracy {last['test_acc']:.4f}" in out
    matrix = report["confusion_matrix"]
    assert [sum(row) for row in matrix] == list(TEST_PER_CLASS) and report["classes"] == CLASSES
    assert sum(matrix[i][i] for i in range(6)) / sum(TEST_PER_CLASS) == report["accuracy"]
    assert 0 <= report["top5_accuracy"] <= 1 and report["top5_accuracy"] >= report["accuracy"]
    for i, name in enumerate(CLASSES):
        stats = report["per_class"][name]
        assert stats["count"] == TEST_PER_CLASS[i] and stats["accuracy"] == matrix[i][i] / TEST_PER_CLASS[i]
    # The run's own final report, counted during its last evaluation, says the same.
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    assert final["confusion_matrix"] == matrix and final["per_class"] == report["per_class"]
    rows = list(csv.reader((run_dir / "eval" / "image_folder-last_confusion.csv").open()))
    assert rows[0][1:] == CLASSES and [list(map(int, r[1:])) for r in rows[1:]] == matrix
    for suffix in ("_confusion.png", "_wrong.png"):
        assert (run_dir / "eval" / f"image_folder-last{suffix}").read_bytes()[:4] == b"\x89PNG"


def test_predict_top_1_equals_evaluates_predictions(run_dir, tmp_path, monkeypatch, capsys):
    assert command(evaluate, [run_dir, "name=again"], monkeypatch, capsys)[0] == 0
    expected = {r["file"]: r["predicted"] for r in csv.DictReader((run_dir / "eval" / "again_predictions.csv").open())}
    test_folder = Path(next(iter(expected))).parents[1]
    out = tmp_path / "predictions.csv"
    code, said, _ = command(predict, [run_dir, test_folder, "--out", out, "--top-k", "3"], monkeypatch, capsys)
    assert code == 0 and f"{len(expected)} images: wrote {out}" in said
    rows = list(csv.DictReader(out.open()))
    assert {r["file"]: r["class_1"] for r in rows} == expected
    assert all(float(r["probability_1"]) >= float(r["probability_2"]) >= float(r["probability_3"]) for r in rows)


@pytest.mark.parametrize("fmt", ["pt2", "onnx"])
def test_each_export_format_matches_eager(fmt, run_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / f"model.{fmt}"
    code, said, err = command(export, [run_dir, "--format", fmt, "--out", out], monkeypatch, capsys)
    assert code == 0, err
    assert said.startswith(f"wrote {out} ({fmt}): uint8 images N x 3 x 16 x 16 in, 6 logits out")
    assert list(tmp_path.iterdir()) == [out]  # the weights inside, no temporary file left
    # Loaded here on its own, the exported model gives the eager model's logits on test images.
    run = trained.load(run_dir, "last", export.CPU_FP32)
    images = trained.sample_images(run.data, 5)
    with torch.no_grad():
        eager = export.Deployed(run.model, run.data.normalizer)(images)
    if fmt == "pt2":
        got = torch.export.load(str(out)).module()(images)
    else:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    assert torch.allclose(got, eager, atol=1e-4, rtol=0)


def torchvision_resnet18(tmp_path, **kw):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(**kw).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def test_a_torchvision_state_dict_loaded_with_model_init_gives_torchvisions_logits(tmp_path, caplog):
    reference, path = torchvision_resnet18(tmp_path)
    ours = MODELS.get("resnet18")(in_channels=3, num_classes=1000)
    weights.init(ours, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.eval()(x), reference(x), atol=1e-5)
    # Another class count: the head starts afresh, every other weight comes from the file.
    ten = MODELS.get("resnet18")(in_channels=3, num_classes=10)
    head = ten.fc.weight.detach().clone()
    with caplog.at_level("INFO", logger="resnet_lab"):
        weights.init(ten, path)
    assert "has 1000 classes, this run 10: the head (fc) starts afresh" in caplog.text
    assert torch.equal(ten.fc.weight, head)
    assert torch.equal(ten.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    # Any other difference: one line naming keys, and nothing loaded or said before it.
    caplog.clear()
    cifar = MODELS.get("resnet20")(num_classes=10)
    before = {k: v.clone() for k, v in cifar.state_dict().items()}
    with caplog.at_level("INFO", logger="resnet_lab"), pytest.raises(UserError) as failed:
        weights.init(cifar, path)
    assert str(failed.value).startswith(f"{path} does not fit this model (shapes differ: conv1.weight [64, 3, 7, 7] "
                                        f"there, [16, 3, 3, 3] here")
    assert "; missing: layer1.2.conv1.weight" in str(failed.value)
    assert "; unexpected: layer2.0.downsample" in str(failed.value)
    assert "model.init" not in caplog.text
    assert all(torch.equal(v, before[k]) for k, v in cifar.state_dict().items())


def test_colour_weights_on_grey_images_give_the_same_logits_as_grey_copied_to_rgb(tmp_path, caplog):
    reference, path = torchvision_resnet18(tmp_path)
    grey = MODELS.get("resnet18")(in_channels=1, num_classes=1000)
    with caplog.at_level("INFO", logger="resnet_lab"):
        weights.init(grey, path)
    assert "has 3 input channels, this run 1: conv1's weights summed over the channels" in caplog.text
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(grey.eval()(x), reference(x.repeat(1, 3, 1, 1)), atol=1e-4)
    # And back: grey weights on colour images, a grey image in colour gives the grey logits.
    grey_file = tmp_path / "grey.pt"
    torch.save(grey.state_dict(), grey_file)
    colour = MODELS.get("resnet18")(in_channels=3, num_classes=1000)
    weights.init(colour, grey_file)
    with torch.no_grad():
        assert torch.allclose(colour.eval()(x.repeat(1, 3, 1, 1)), grey(x), atol=1e-4)


def test_model_init_from_a_run_folder_starts_a_new_run_from_its_weights(run_dir, tmp_path):
    from resnet_lab import device as device_setup
    from resnet_lab import distributed
    from resnet_lab.training.trainer import build

    cfg = trained.run_config(run_dir, [f"model.init={run_dir}"])
    _, model, *_ = build(cfg, device_setup.resolve(cfg.device), distributed.Ranks())
    saved = torch.load(run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


def test_backbone_lr_scale_trains_the_backbone_slower_than_the_head():
    model = MODELS.get("resnet20")(num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, backbone_lr_scale=0.01))
    backbone, head = optimizer.param_groups
    assert (backbone["lr"], head["lr"]) == pytest.approx((0.001, 0.1))
    assert head["params"] == list(model.fc.parameters())
    assert len(backbone["params"]) + 2 == len(list(model.parameters()))


def test_bias_lr_scale_trains_every_bias_faster_and_schedules_it_alike():
    from resnet_lab.config import SchedConfig
    from resnet_lab.optim import build_scheduler

    model = MODELS.get("resnet20")(num_classes=10)
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, bias_lr_scale=8))
    biases, weights = optimizer.param_groups
    assert (biases["lr"], weights["lr"]) == pytest.approx((0.8, 0.1))
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in biases["params"]} == {"bias"}
    assert "bn1.bias" in {names[id(p)] for p in biases["params"]} and "fc.bias" in {names[id(p)] for p in biases["params"]}
    assert len(biases["params"]) + len(weights["params"]) == len(list(model.parameters()))
    scheduler = build_scheduler(optimizer, SchedConfig(name="onecycle"), steps_per_epoch=10, epochs=1)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    assert biases["lr"] == pytest.approx(8 * weights["lr"])
    # With a backbone rate too: the backbone's biases at both scales, the head's weights last.
    optimizer = build_optimizer(model, OptimConfig(name="sgd", lr=0.1, bias_lr_scale=8, backbone_lr_scale=0.5))
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.4, 0.05, 0.8, 0.1])
    assert optimizer.param_groups[-1]["params"] == [model.fc.weight]


# Bad input: one line naming the file and the fix, exit 2, nothing written.

def test_a_run_folder_without_weights(run_dir, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    (empty / ".hydra" / "config.yaml").write_text((run_dir / ".hydra" / "config.yaml").read_text())
    code, _, err = command(evaluate, [empty], monkeypatch, capsys)
    assert code == 2 and err.startswith(f"error: {empty}: no checkpoints/last.pt") and "checkpoint=" in err
    assert sorted(p.name for p in empty.iterdir()) == [".hydra"]
    code, _, err = command(evaluate, [tmp_path], monkeypatch, capsys)
    assert code == 2 and f"{tmp_path}: not a run folder" in err


def test_without_a_validation_split_there_is_no_best_checkpoint_and_evaluate_says_why(run_dir, monkeypatch, capsys):
    assert not (run_dir / "checkpoints" / "best.pt").exists()
    code, _, err = command(evaluate, [run_dir, "checkpoint=best"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {run_dir}: no checkpoints/best.pt (the run chooses no best epoch without a "
                          f"validation split (dataset.val_fraction)); give checkpoint=last or checkpoint=<path>")


def test_checkpoint_ema_evaluates_the_average_the_run_measured(tmp_path, monkeypatch, capsys):
    # ... with the test-time augmentation the run measured it with.
    images = write_images(tmp_path / "images")
    folder = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", *RUN, f"dataset.root={images}", "trainer.epochs=1",
                           "ema.decay=0.5", "trainer.tta=true", "trainer.tta_shift=1", f"hydra.run.dir={folder}"], capture_output=True, text=True, cwd=tmp_path,
                          env=fresh_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr
    last = metrics(folder)[-1]
    assert last["test_acc_ema"] != last["test_acc"] or last["test_loss_ema"] != last["test_loss"]
    code, out, _ = command(evaluate, [folder, "checkpoint=ema"], monkeypatch, capsys)
    assert code == 0
    report = json.loads((folder / "eval" / "image_folder-ema.json").read_text())
    assert report["accuracy"] == last["test_acc_ema"]
    assert report["loss"] == pytest.approx(last["test_loss_ema"], rel=1e-5)
    code, out, _ = command(evaluate, [folder, "checkpoint=ema", "name=plain", "trainer.tta=false",
                                      "trainer.tta_shift=0"], monkeypatch, capsys)
    assert code == 0
    plain = json.loads((folder / "eval" / "plain.json").read_text())
    assert plain["loss"] != pytest.approx(report["loss"], rel=1e-5)
    # predict gives each image the probabilities evaluate measured, test-time augmentation and all.
    table = folder / "eval" / "image_folder-ema_predictions.csv"
    confidence = {r["file"]: float(r["confidence"]) for r in csv.DictReader(table.open())}
    out = tmp_path / "predictions.csv"
    code, _, _ = command(predict, [folder, images / "test", "checkpoint=ema", "--out", out], monkeypatch, capsys)
    assert code == 0
    predicted = {r["file"]: float(r["probability_1"]) for r in csv.DictReader(out.open())}
    assert predicted == pytest.approx(confidence, abs=2e-6)


def test_weights_of_another_architecture(run_dir, tmp_path, monkeypatch, capsys):
    other = tmp_path / "resnet20.pt"
    torch.save(MODELS.get("resnet20")(num_classes=6).state_dict(), other)
    before = sorted((run_dir / "eval").iterdir())
    code, _, err = command(evaluate, [run_dir, f"checkpoint={other}", "name=other"], monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"error: {other} does not fit this model (") and "model=<its name>" in err
    assert sorted((run_dir / "eval").iterdir()) == before


@pytest.mark.parametrize("final_report", ["kept", "lost"])
def test_a_data_set_with_other_classes(final_report, run_dir, tmp_path, monkeypatch, capsys):
    if final_report == "lost":  # eval/final.json, lost to a kill or a full disk: last.pt knows the classes
        run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))
        (run_dir / "eval" / "final.json").unlink()
    other = write_images(tmp_path / "other", classes=[f"z{i}" for i in range(6)])
    code, _, err = command(evaluate, [run_dir, f"dataset.root={other}", "name=z"], monkeypatch, capsys)
    assert code == 2 and "its classes [z0, z1" in err and "are not the run's [k0, k1" in err
    assert not (run_dir / "eval" / "z.json").exists()


def test_an_image_that_cannot_be_read(run_dir, tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    code, _, err = command(predict, [run_dir, bad, "--out", out], monkeypatch, capsys)
    assert code == 2 and err.strip() == (f"error: predict: cannot read {bad}: not an image file (PIL cannot "
                                         f"identify it); replace it with a good copy or delete it")
    assert not out.exists()


def test_export_without_its_package(run_dir, tmp_path, monkeypatch, capsys):
    import builtins

    real = builtins.__import__

    def no_onnx(name, *args, **kw):
        if name == "onnx":
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        return real(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    out = tmp_path / "m.onnx"
    code, _, err = command(export, [run_dir, "--format", "onnx", "--out", out], monkeypatch, capsys)
    assert code == 2 and err.strip() == ("error: --format onnx needs the packages onnx, onnxscript and "
                                         "onnxruntime (onnx is missing): pip install 'resnet_lab[onnx]'")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", ["/proc/m.pt2", "a folder"])
def test_export_to_a_place_that_cannot_be_written(out, run_dir, tmp_path, monkeypatch, capsys):
    if out == "a folder":
        out = tmp_path / "exported"
        out.mkdir()
    code, _, err = command(export, [run_dir, "--format", "pt2", "--out", out], monkeypatch, capsys)
    assert code == 2 and len(err.splitlines()) == 1
    if out == "/proc/m.pt2":  # procfs makes no files, whoever asks
        assert err.startswith("error: could not write /proc/m.pt2 (") and "no m.pt2 was written" in err
        assert err.strip().endswith(", or give --out a file elsewhere")
    else:
        assert err.strip() == (f"error: {out} is a folder, not a file: nothing was written into it; give the "
                               f"path of a file (one inside it, say)")
        assert list(out.iterdir()) == []


def test_predict_out_a_folder_names_the_folder(run_dir, tmp_path, monkeypatch, capsys):
    image = next((run_dir.parent / "images" / "test" / CLASSES[0]).iterdir())
    code, _, err = command(predict, [run_dir, image, "--out", tmp_path], monkeypatch, capsys)
    assert code == 2 and err.strip() == (f"error: {tmp_path} is a folder, not a file: nothing was written into it; "
                                         f"give the path of a file (one inside it, say)")
    assert list(tmp_path.iterdir()) == []


def test_export_from_a_read_only_run_folder_says_to_write_elsewhere(run_dir, tmp_path, tiny_tmpfs, monkeypatch,
                                                                   capsys):
    copy, why = read_only_copy(run_dir, tmp_path, tiny_tmpfs)
    code, _, err = command(export, [copy, "--format", "pt2"], monkeypatch, capsys)
    assert code == 2 and err.strip() == (f"error: could not write {copy}/export/model.pt2 ({why}); no model.pt2 was "
                                         f"written; make {copy}/export writable, or give --out a file elsewhere")
    assert "hydra.run.dir" not in err


def writing_end(fifo: Path, proc: subprocess.Popen) -> int:
    """The FIFO's writing end, opened once proc has opened the FIFO to read: proc then waits in
    its read for bytes that never come."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            if e.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        time.sleep(0.01)
    pytest.fail(f"{proc.args} never opened {fifo}")


@pytest.mark.parametrize("name", ["evaluate", "predict"])
def test_ctrl_c_exits_130_with_one_line_and_leaves_no_partial_file(name, run_dir, tmp_path):
    # A FIFO for an image: the command blocks reading it (evaluate checking its data set's image
    # headers, predict decoding it), and the SIGINT arrives there.
    images = Path(shutil.copytree(run_dir.parent / "images", tmp_path / "images"))
    fifo = images / "test" / CLASSES[0] / "blocks.bmp"
    os.mkfifo(fifo)
    out = tmp_path / "predictions.csv"
    args = ([run_dir, f"dataset.root={images}", "name=interrupted"] if name == "evaluate"
            else [run_dir, images / "test" / CLASSES[0] / "0.png", fifo, "--out", out])
    before = contents(run_dir)
    proc = subprocess.Popen([sys.executable, "-m", f"resnet_lab.{name}", *map(str, args)], cwd=tmp_path,
                            env=fresh_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # as a terminal's Ctrl-C finds it, whatever this process ignores
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    held = writing_end(fifo, proc)
    proc.send_signal(signal.SIGINT)
    # The kernel may hand the signal to another of its threads, which leaves the main thread in its
    # read: the FIFO's end (no bytes) brings it back to Python, which then raises KeyboardInterrupt.
    time.sleep(0.2)
    os.close(held)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip() == "error: interrupted; no file was left half-written (each is written whole or not at all)"
    assert contents(run_dir) == before and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_evaluate_with_wandb_logs_an_eval_run_with_its_charts_and_wrong_images(run_dir, monkeypatch, capsys):
    from tests.wandb_file import read_run

    code, _, err = command(evaluate, [run_dir, "logger=wandb", "logger.mode=offline", "name=wb"], monkeypatch, capsys)
    assert code == 0, err
    run = read_run(run_dir / "eval")  # apart from the training run's W&B files
    report = json.loads((run_dir / "eval" / "wb.json").read_text())
    assert run.run.job_type == "eval" and run.run.display_name == "eval-wb" and run.run.run_group == run_dir.name
    assert run.summary["accuracy"] == report["accuracy"] and run.summary["top5_accuracy"] == report["top5_accuracy"]
    tables = sorted(a.name.split("-")[2] for a in run.artifacts if a.type == "run_table")
    assert tables == ["evalconfusion_matrix_table", "evalper_class_accuracy_table", "evalwrong"]


def test_a_run_resumes_only_with_the_parameter_groups_it_saved(tmp_path):
    from resnet_lab.training import resume
    from tests.test_trainer import composed, save_checkpoint

    save_checkpoint(tmp_path, composed(), epoch=2, step=0)
    assert resume.plan(tmp_path, composed("optim.lr=0.01")).action == "continue"
    with pytest.raises(UserError, match=r"optim.backbone_lr_scale=0.1: checkpoint .* was saved with "
                                        r"optim.backbone_lr_scale=1.0"):
        resume.plan(tmp_path, composed("optim.backbone_lr_scale=0.1"))
    with pytest.raises(UserError, match=r"optim.bias_lr_scale=4.0: checkpoint .* was saved with "
                                        r"optim.bias_lr_scale=1.0"):
        resume.plan(tmp_path, composed("optim.bias_lr_scale=4"))
