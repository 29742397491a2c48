"""The benchmarks in their tiny modes: throughput runs every pipeline and writes the full JSON;
time_to_accuracy runs the d2l.ai ResNet-18 script and the preset side by side; gpu_check runs them all."""

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

PIPELINES = ("baseline", "bare", "resnet_lab", "bare_best", "resnet_lab_best")
FIELDS = ("images_per_s", "images_per_s_rounds", "peak_rss_mb", "main_rss_mb", "cuda_peak_mb",
          "warmup_s", "model", "precision", "channels_last", "compile")


def test_benchmark_tiny_run_writes_every_field(fmnist_root, tmp_path, python):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "throughput.py"), "--root", str(fmnist_root), "--device", "cpu",
         "--steps", "4", "--rounds", "2", "--warmup", "1", "--width", "4", "--batch-size", "32",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["steps"] == 4 and result["rounds"] == 2
    assert set(result["conditions"]) == {"seconds", "loadavg_start", "loadavg_end", "cpu_wait_share",
                                         "cpu_steal_share"}
    assert set(result["results"]) == set(PIPELINES)
    for name, r in result["results"].items():
        assert set(FIELDS) <= set(r), name
        assert len(r["images_per_s_rounds"]) == 2 and r["images_per_s"] > 0
        assert r["peak_rss_mb"] >= r["main_rss_mb"] > 0 and r["cuda_peak_mb"] is None
    # The baseline's DataLoader workers are counted in its peak.
    assert result["results"]["baseline"]["peak_rss_mb"] > result["results"]["baseline"]["main_rss_mb"]
    speed = {n: r["images_per_s"] for n, r in result["results"].items()}
    assert math.isclose(result["ratios"]["resnet_lab/bare"], speed["resnet_lab"] / speed["bare"])
    assert math.isclose(result["ratios"]["resnet_lab_best/baseline"], speed["resnet_lab_best"] / speed["baseline"])
    assert "resnet_lab/bare" in proc.stdout  # the printed table


def test_benchmark_says_where_the_data_is_missing(tmp_path, python):
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "throughput.py"), "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "train-images-idx3-ubyte" in proc.stderr and str(tmp_path) in proc.stderr


def test_image_folder_decoders_are_timed_side_by_side_on_the_same_pixels(fmnist_root, tmp_path, python):
    out = tmp_path / "decoders.json"
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "image_folder.py"), "--root", str(fmnist_root), "--pngs",
         str(tmp_path / "pngs"), "--decoders", "--rounds", "2", "--files", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    kinds = ["28x28 grey PNG", "500x375 colour PNG", "500x375 colour JPEG"]
    assert list(result["us_per_image"]) == kinds and result["same_pixels"] == dict.fromkeys(kinds, True)
    for kind in kinds:
        rounds = result["us_per_image_rounds"][kind]
        assert list(rounds) == ["torchvision.io", "torchcodec", "PIL"]
        assert all(len(r) == 2 and min(r) > 0 for r in rounds.values())
    assert "torchcodec/torchvision.io" in proc.stdout and "NO" not in proc.stdout


def time_to_accuracy(python, root, out, *args, **run):
    """The benchmark at a tiny size: the script's network at width 4, 2 batches of 32 per epoch;
    the preset at width 4, 2 batches an epoch."""
    return subprocess.run(
        [python, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--root", str(root), "--device", "cpu",
         "--json", str(out), "--batch-size", "32", "--width", "4", "--batches", "2", *args, "model.width=4",
         "trainer.batch_size=32", "trainer.limit_train_batches=2"],
        capture_output=True, text=True, timeout=300, **run)


def test_time_to_accuracy_runs_all_in_rotating_order_and_compares_them(fmnist_root, tmp_path, python):
    out = tmp_path / "tta.json"
    presets = ["fashion_mnist_fast", "fashion_mnist_fast3x"]
    proc = time_to_accuracy(python, fmnist_root, out, "--reps", "2", "--preset", *presets, "trainer.epochs=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["presets"] == presets and "trainer.epochs=3" in result["overrides"]
    assert result["device_name"] in proc.stdout
    first, second = result["repetitions"]
    assert first["order"] == ["baseline", *presets] and second["order"] == [*presets, "baseline"]
    for rep in (first, second):
        assert [r["epoch"] for r in rep["baseline"]] == [1, 2]
        budget = rep["baseline_wall_s"]
        assert budget == rep["baseline"][-1]["wall_s"]
        for name in presets:
            preset = rep["presets"][name]
            assert [r["epoch"] for r in preset["epochs"]] == [1, 2, 3]  # the override reached each preset
            for run in (rep["baseline"], preset["epochs"]):
                walls = [r["wall_s"] for r in run if r["wall_s"] is not None]
                assert walls == sorted(walls) and walls[0] > 0 and all(0 <= r["test_acc"] <= 1 for r in run)
            # What the preset had reached at 1x and 3x the baseline's time: its last row evaluated by then.
            for horizon in (1, 3):
                by_then = [r["test_acc"] for r in preset["epochs"]
                           if r["wall_s"] is not None and r["wall_s"] <= horizon * budget]
                assert preset[f"acc_at_{horizon}x"] == (by_then[-1] if by_then else None)
            assert list(preset["seconds_to"]) == ["0.9", "0.92", "0.93", "0.94", "0.95"]
            for target, seconds in preset["seconds_to"].items():
                reached = [r["wall_s"] for r in preset["epochs"]
                           if r["wall_s"] is not None and r["test_acc"] >= float(target)]
                assert seconds == (reached[0] if reached else None)
    assert result["medians"]["baseline_wall_s"] == pytest.approx(
        (first["baseline_wall_s"] + second["baseline_wall_s"]) / 2)
    assert "medians: baseline" in proc.stdout and all(f"  {name}: at 1x" in proc.stdout for name in presets)


def test_time_to_accuracy_names_the_signal_that_killed_the_run(fmnist_root, tmp_path, python):
    # A run that dies of a signal, as oneDNN's crash killed it: this interpreter, started as
    # `python -m resnet_lab`, sends itself SIGBUS before doing anything.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "if sys.orig_argv[1:3] == ['-m', 'resnet_lab']:\n"
        "    os.kill(os.getpid(), signal.SIGBUS)\n")
    proc = time_to_accuracy(python, fmnist_root, tmp_path / "tta.json", "--reps", "1", "--run-dir", str(tmp_path),
                            "--preset", "fashion_mnist_fast", env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: the run died of SIGBUS (signal 7); its log: {tmp_path}/fashion_mnist_fast1/train.log"


def test_gpu_check_runs_every_step_and_records_each_status(fmnist_root, tmp_path, python):
    # Here, without a GPU, the CUDA tests skip and the two benchmarks stop at once: what is
    # checked is that each step runs under its limit and lands in OUT.
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(fmnist_root), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert [line.split()[0] for line in (out / "status.txt").read_text().splitlines()] == \
        ["tests", "throughput", "time_to_accuracy", "image_folder", "cifar10_resnet56_epoch",
         "resnet18_schedule"], proc.stdout[-3000:]
    if not torch.cuda.is_available():
        assert (out / "status.txt").read_text() == \
            "tests 0\nthroughput 1\ntime_to_accuracy 1\nimage_folder 1\ncifar10_resnet56_epoch 2\nresnet18_schedule 2\n"
        # The config is checked before the device, so this also says the runs' overrides compose.
        for name in ("cifar10_resnet56_epoch", "resnet18_schedule"):
            assert "no cuda device" in (out / f"{name}.log").read_text()
        assert "needs a CUDA GPU" in (out / "tests.log").read_text()
        assert "no CUDA device" in (out / "throughput.log").read_text()


def test_device_settings_are_timed_side_by_side_each_as_asked(fmnist_root, tmp_path, python):
    out = tmp_path / "settings.json"
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "device_settings.py"), "--root", str(fmnist_root), "--device", "cpu",
         "--precision", "fp32", "bf16", "--compile", "false", "--steps", "4", "--rounds", "2", "--warmup", "1",
         "--json", str(out), "experiment=fashion_mnist_fast", "model.width=4", "trainer.batch_size=32"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["overrides"][0] == "experiment=fashion_mnist_fast" and result["steps"] == 4
    assert list(result["results"]) == ["fp32_eager", "bf16_eager"]
    for name, r in result["results"].items():
        assert (r["precision"], r["compile"]) == (name.split("_")[0], False)
        assert len(r["images_per_s_rounds"]) == 2 and r["images_per_s"] > 0
    # Width 4 has a strided 1x1 convolution that crashes oneDNN in channels_last: dropped.
    assert {r["memory_format"] for r in result["results"].values()} == {"contiguous"}
    fp32, bf16 = (result["results"][n] for n in ("fp32_eager", "bf16_eager"))
    assert fp32["ratio_to_fp32_eager"] == 1 and math.isclose(bf16["ratio_to_fp32_eager"],
                                                             bf16["images_per_s"] / fp32["images_per_s"])
    assert "bf16_eager" in proc.stdout and "load average" in proc.stdout
