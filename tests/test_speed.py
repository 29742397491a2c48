"""The benchmarks in their tiny modes: throughput runs every pipeline and writes the full JSON;
time_to_accuracy stops a real run at its target; gpu_check runs them all."""

import json
import math
import os
import subprocess
import time
from pathlib import Path

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


def time_to_accuracy(python, root, out, *args):
    return subprocess.run(
        [python, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--root", str(root), "--device", "cpu",
         "--json", str(out), *args, "model.width=4", "trainer.batch_size=32"],
        capture_output=True, text=True, timeout=300)


def test_time_to_accuracy_stops_the_run_at_the_target(fmnist_root, tmp_path, python):
    out, run_dir = tmp_path / "tta.json", tmp_path / "run"
    proc = time_to_accuracy(python, fmnist_root, out, "--target", "0.01", "--max-epochs", "20",
                            "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["reached"] and result["epoch"] == 1 and result["test_acc"] >= 0.01
    assert result["wall_s"] > result["train_s"] > 0  # from launch: start-up and evaluation count
    assert "model.stem=cifar" in result["overrides"] and "dataset.augment=flip_crop" in result["overrides"]
    # Stopped (SIGTERM) long before its 20 epochs, with the run's own checkpoint written.
    assert (run_dir / "status").read_text().strip() == "stopped"
    assert len(result["epochs"]) < 20 and (run_dir / "checkpoints" / "last.pt").exists()


def test_time_to_accuracy_reports_a_target_not_reached(fmnist_root, tmp_path, python):
    out = tmp_path / "tta.json"
    proc = time_to_accuracy(python, fmnist_root, out, "--target", "1.0", "--max-epochs", "1",
                            "trainer.limit_train_batches=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["reached"] and result["wall_s"] is None and len(result["epochs"]) == 1
    assert "not reached in 1 epochs" in proc.stdout
    # Out of time: the run is stopped, and what it did is reported. (A learning rate too small to
    # learn: given time, the tiny data can be learnt perfectly.)
    began = time.monotonic()
    proc = time_to_accuracy(python, fmnist_root, out, "--target", "1.0", "--max-epochs", "1000",
                            "--max-seconds", "15", "trainer.limit_train_batches=1", "optim.lr=1e-9")
    assert proc.returncode == 0 and time.monotonic() - began < 60, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert not result["reached"] and 0 < len(result["epochs"]) < 1000


def test_time_to_accuracy_names_the_signal_that_killed_the_run(fmnist_root, tmp_path, python):
    # A run that dies of a signal, as oneDNN's crash killed it: this interpreter, started as
    # `python -m resnet_lab`, sends itself SIGBUS before doing anything.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import os, signal, sys\n"
        "if sys.orig_argv[1:3] == ['-m', 'resnet_lab']:\n"
        "    os.kill(os.getpid(), signal.SIGBUS)\n")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [python, str(ROOT / "benchmarks" / "time_to_accuracy.py"), "--root", str(fmnist_root), "--device", "cpu",
         "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == \
        f"error: the run died of SIGBUS (signal 7); its log: {run_dir / 'train.log'}"


def test_gpu_check_runs_every_step_and_records_each_status(fmnist_root, tmp_path, python):
    # Here, without a GPU, the CUDA tests skip and the two benchmarks stop at once: what is
    # checked is that each step runs under its limit and lands in OUT.
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{Path(python).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(fmnist_root), str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert [line.split()[0] for line in (out / "status.txt").read_text().splitlines()] == \
        ["tests", "throughput", "time_to_accuracy"], proc.stdout[-3000:]
    if not torch.cuda.is_available():
        assert (out / "status.txt").read_text() == "tests 0\nthroughput 1\ntime_to_accuracy 1\n"
        assert "needs a CUDA GPU" in (out / "tests.log").read_text()
        assert "no CUDA device" in (out / "throughput.log").read_text()
