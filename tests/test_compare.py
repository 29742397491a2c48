"""`python -m resnet_lab.compare` on a real finished sweep, and on a run killed mid-way beside it."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from resnet_lab.compare import load_runs
from resnet_lab.sweeps.compare import SweepSummary, find_runs, main, plot, records
from tests.launch import LRS, TINY, multirun
from tests.runs import metrics


def test_table_holds_the_values_of_the_metrics_files(grid_sweep, tmp_path, capsys):
    sweep, _ = grid_sweep
    main([str(sweep), "--csv", str(tmp_path / "runs.csv")])
    printed = capsys.readouterr().out
    with open(tmp_path / "runs.csv") as f:
        table = list(csv.DictReader(f))
    # Only the swept key is a column: the keys all runs share are left out. Without a validation
    # split no epoch is chosen: the last epoch's test accuracy judges each run.
    assert list(table[0]) == ["run", "optim.lr", "test_acc", "final_train_loss", "epochs", "seconds",
                              "images_per_s", "status"]
    assert sorted(row["optim.lr"] for row in table) == sorted(LRS)
    for row in table:
        rows = metrics(sweep / row["run"].rsplit("/", 1)[1])
        assert float(row["test_acc"]) == rows[-1]["test_acc"]
        assert float(row["final_train_loss"]) == rows[-1]["train_loss"]
        assert float(row["seconds"]) == pytest.approx(sum(r["seconds"] for r in rows))
        assert float(row["images_per_s"]) == pytest.approx(rows[-1]["images_per_s"])
        assert (row["epochs"], row["status"]) == ("1/1", "finished")
        assert f"{rows[-1]['test_acc']:.4f}" in printed
    finals = [float(row["test_acc"]) for row in table]
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


# Run folders written as a run writes them (.hydra/config.yaml resolved, metrics.jsonl, status),
# with chosen numbers: where the best validation epoch is not the best test epoch.

def write_run(path, config, val=None, test=(0.5,), status="finished"):
    (path / ".hydra").mkdir(parents=True)
    base = {"seed": 0, "trainer": {"epochs": len(test), "objective": "auto"}, "dataset": {"val_fraction": 0.0},
            "optim": {"lr": 0.001}, "model": {"init": None}}
    for key, value in config.items():
        *sections, name = key.split(".")
        where = base
        for section in sections:
            where = where[section]
        where[name] = value
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(base))
    with open(path / "metrics.jsonl", "w") as f:
        for epoch, test_acc in enumerate(test, 1):
            row = {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": 0.5,
                   **({"val_loss": 1.0, "val_acc": val[epoch - 1]} if val else {}),
                   "test_loss": 1.0, "test_acc": test_acc, "lr": 0.1, "seconds": 2.0, "images_per_s": 10.0}
            f.write(json.dumps(row) + "\n")
    (path / "status").write_text(status + "\n")
    return path


def test_a_metrics_file_that_ends_in_a_torn_row_is_compared_without_it(tmp_path, capsys):
    run = write_run(tmp_path / "0", {}, test=[0.5, 0.6])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_lo')  # a copy taken while epoch 3's row was written
    main([str(run), "--csv", str(tmp_path / "runs.csv")])
    out = capsys.readouterr()
    assert out.err == (f"warning: {run / 'metrics.jsonl'}: left out line 3, a row cut off part way (the file was "
                       f"copied while it was written, or lost its end)\n")
    assert "0.6000" in out.out
    with open(tmp_path / "runs.csv") as f:
        [row] = csv.DictReader(f)
    assert (row["test_acc"], row["epochs"], row["status"]) == ("0.6", "2/2", "finished")


def test_with_a_split_runs_are_judged_at_their_best_validation_epoch(tmp_path, capsys):
    split = {"dataset.val_fraction": 0.1}
    # Run 0's best validation epoch is 2, where its test accuracy (0.5) is not its best (0.9).
    write_run(tmp_path / "0", {**split, "optim.lr": 0.1}, val=[0.5, 0.8, 0.7], test=[0.6, 0.5, 0.9])
    write_run(tmp_path / "1", {**split, "optim.lr": 0.2}, val=[0.6, 0.7, 0.79], test=[0.6, 0.95, 0.7])
    rows = records(find_runs([tmp_path]))
    assert [(r["optim.lr"], r["val_acc"], r["test_acc"], r["best_epoch"], r["final_test_acc"]) for r in rows] == \
        [(0.1, 0.8, 0.5, 2, 0.9), (0.2, 0.79, 0.7, 3, 0.7)]
    SweepSummary.summarise(tmp_path)
    out = capsys.readouterr().out
    assert f"best run: {tmp_path / '0'}  best val acc 0.8000 at epoch 2, test acc 0.5000  optim.lr=0.1" in out


def test_runs_differ_by_their_resolved_configs_defaults_included(tmp_path, monkeypatch, capsys):
    # Run a took lr from a default and run b from an override: the value is what differs.
    # Where the runs were kept (model.init's folder, say) is not a difference.
    write_run(tmp_path / "a", {"model.init": "/here/a"})
    write_run(tmp_path / "b", {"optim.lr": 0.01, "model.init": "/there/b"})
    monkeypatch.chdir(tmp_path)
    main(["a", str(tmp_path / "b"), "--csv", "runs.csv"])  # one path relative, one absolute
    with open(tmp_path / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert [(row["run"], row["optim.lr"]) for row in table] == [(str(tmp_path / "a"), "0.001"),
                                                                  (str(tmp_path / "b"), "0.01")]
    assert "model.init" not in table[0]
    assert f"runs under {tmp_path}" in capsys.readouterr().out


def test_by_seed_gives_the_mean_and_spread_of_each_setting(tmp_path, capsys):
    for lr, accs in ((0.1, (0.5, 0.7)), (0.2, (0.8, 0.8))):
        for seed, acc in enumerate(accs):
            write_run(tmp_path / f"{lr}-{seed}", {"optim.lr": lr, "seed": seed}, test=[acc])
    main([str(tmp_path), "--by-seed", "--csv", str(tmp_path / "seeds.csv")])
    with open(tmp_path / "seeds.csv") as f:
        table = list(csv.DictReader(f))
    assert [(row["run"], row["optim.lr"]) for row in table] == [("2 seeds (0, 1)", "0.2"), ("2 seeds (0, 1)", "0.1")]
    assert float(table[0]["test_acc"]) == pytest.approx(0.8) and float(table[0]["test_acc_std"]) == 0
    assert float(table[1]["test_acc"]) == pytest.approx(0.6)
    assert float(table[1]["test_acc_std"]) == pytest.approx(0.1414, abs=1e-4)
    assert "0.6000 ± 0.1414" in capsys.readouterr().out


def test_load_runs_gives_every_config_key_and_the_results(tmp_path):
    write_run(tmp_path / "0", {"optim.lr": 0.1}, test=[0.3, 0.4])
    [record] = load_runs([tmp_path])
    assert record["run"] == str(tmp_path / "0") and record["optim.lr"] == 0.1 and record["trainer.epochs"] == 2
    assert (record["test_acc"], record["final_train_loss"], record["epochs"]) == (0.4, 0.5, "2/2")
    assert record["seconds"] == 4.0 and record["status"] == "finished"
