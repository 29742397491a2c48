"""`python -m resnet_lab.compare` on a real finished sweep, and on a run killed mid-way beside it."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from resnet_lab.sweeps.compare import find_runs, main, plot
from tests.launch import LRS, TINY, multirun
from tests.runs import metrics


def test_table_holds_the_values_of_the_metrics_files(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    main([str(sweep), "--csv", str(tmp_path / "runs.csv")])
    printed = capsys.readouterr().out
    with open(tmp_path / "runs.csv") as f:
        table = list(csv.DictReader(f))
    # Only the swept key is a column: the overrides all runs share are left out.
    assert list(table[0]) == ["run", "optim.lr", "best_test_acc", "final_test_acc", "final_train_loss",
                              "epochs", "seconds", "images_per_s", "status"]
    assert sorted(row["optim.lr"] for row in table) == sorted(LRS)
    for row in table:
        rows = metrics(sweep / row["run"].rsplit("/", 1)[1])
        assert float(row["final_test_acc"]) == rows[-1]["test_acc"]
        assert float(row["best_test_acc"]) == max(r["test_acc"] for r in rows)
        assert float(row["final_train_loss"]) == rows[-1]["train_loss"]
        assert float(row["seconds"]) == pytest.approx(sum(r["seconds"] for r in rows))
        assert float(row["images_per_s"]) == pytest.approx(rows[-1]["images_per_s"])
        assert (row["epochs"], row["status"]) == ("1/1", "finished")
        assert f"{rows[-1]['test_acc']:.4f}" in printed
    finals = [float(row["final_test_acc"]) for row in table]
    assert finals == sorted(finals, reverse=True)


def test_a_sweep_ends_by_naming_its_best_run(grid_sweep):
    sweep, out = grid_sweep
    finals = {lr: metrics(sweep / str(job))[-1]["test_acc"] for job, lr in enumerate(LRS)}
    job = max(range(3), key=lambda j: (finals[LRS[j]], -j))
    assert f"best run: {sweep / str(job)}  final test acc {finals[LRS[job]]:.4f}  optim.lr={LRS[job]}" in out


def test_plot_draws_one_line_per_run(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    figure = plot(find_runs([sweep]))
    for axes in figure.axes:
        assert sorted(line.get_label() for line in axes.lines) == [f"optim.lr={lr}" for lr in LRS]
    main([str(sweep), "--plot", str(tmp_path / "curves.png")])
    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.width > 500 and image.height > 300


def test_an_interrupted_run_shows_as_not_finished(grid_sweep, tmp_path, fmnist_root, capsys):
    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen([sys.executable, "-m", "resnet_lab", f"hydra.run.dir={run_dir}",
                             f"dataset.root={fmnist_root}", *TINY, "logger=none", "trainer.epochs=300"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").exists() and metrics(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no handler runs, nothing is cleaned up: a lost machine
        proc.wait()
    main([str(grid_sweep[0]), str(run_dir), "--csv", str(tmp_path / "runs.csv")])
    with open(tmp_path / "runs.csv") as f:
        table = {row["run"]: row for row in csv.DictReader(f)}
    assert table[str(run_dir)]["status"] == "running"
    assert table[str(run_dir)]["epochs"] == f"{len(metrics(run_dir))}/300"
    assert table[str(run_dir)]["trainer.epochs"] == "300"
    assert [table[str(grid_sweep[0] / str(job))]["status"] for job in range(3)] == ["finished"] * 3


def test_a_job_that_failed_before_training_shows_as_not_started(tmp_path, fmnist_root):
    code, sweep, _ = multirun(tmp_path, fmnist_root, "optim.lr=-1,0.001", "logger=none")
    assert code == 2  # job 0's optim.lr=-1 is refused before it trains
    main([str(sweep), "--csv", str(tmp_path / "runs.csv")])
    with open(tmp_path / "runs.csv") as f:
        assert {row["run"]: row["status"] for row in csv.DictReader(f)} == \
            {str(sweep / "0"): "not started", str(sweep / "1"): "finished"}


def test_a_folder_without_runs_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([str(tmp_path)])
    assert exited.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path}: no run folders there (a run folder holds .hydra/config.yaml)"
