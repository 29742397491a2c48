"""The command line end to end: a real run in a subprocess, and one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from resnet_lab.__main__ import main
from tests import runs
from tests.runs import for_kind

TINY = [*runs.TINY, "trainer.epochs=1"]


def test_default_recipe_end_to_end(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_lab", f"dataset.root={fmnist_root}", f"hydra.run.dir={run_dir}", *TINY],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = runs.metrics(run_dir)
    assert [r["epoch"] for r in rows] == [1]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr",
                            "beta1", "seconds", "images_per_s"}
    assert 0 <= rows[0]["test_acc"] <= 1 and rows[0]["images_per_s"] > 0
    assert rows[0]["lr"] == pytest.approx(1e-3)
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert config["model"]["name"] == "resnet18" and config["dataset"]["name"] == "fashion_mnist"
    assert config["optim"] == {"name": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9,
                               "nesterov": False, "betas": [0.9, 0.999], "backbone_lr_scale": 1.0, "bias_lr_scale": 1.0,
                               "no_decay_norm_bias": False, "clip_grad_norm": 0.0}
    assert (run_dir / "model.pt").exists()
    line = next(line for line in proc.stdout.splitlines() if line.startswith("epoch 1/1"))
    for word in ("train loss", "train acc", "test acc", " s ", "img/s"):
        assert word in line


def test_help_lists_the_groups_a_user_picks_from_and_their_options(tmp_path):
    # In a subprocess: --help leaves Hydra's global config half set, which later tests would see.
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    groups = proc.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = {line.split(":")[0] for line in groups.splitlines()[2:] if ": " in line}
    assert listed == {"dataset", "debug", "device", "experiment", "hparams_search", "logger", "model", "optim", "sched"}
    for group, option in [("model", "resnet50"), ("dataset", "cifar100"), ("optim", "sgd"),
                          ("sched", "onecycle"), ("device", "mps")]:
        assert option in next(line for line in groups.splitlines() if line.startswith(f"{group}: "))


def test_the_readme_shows_the_error_a_misspelt_key_gives(tmp_path, monkeypatch, capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command, shown = readme.split("$ python -m resnet_lab ", 1)[1].splitlines()[:2]
    code, err = run_cli([command], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines()[-1] == shown


def run_cli(args, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["resnet_lab", *for_kind(args)])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(SystemExit) as exited:
        main()
    return exited.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["optim.lr=abc"], ["optim.lr", "abc", "Float"]),
    (["trainer.epochs=-1"], ["trainer.epochs=-1", ">= 1"]),
    (["optim.lr=0"], ["optim.lr=0", "> 0"]),
    (["model=resnet19"], ["model=resnet19", "resnet18", "resnet50", "did you mean"]),
    (["dataset=nope"], ["dataset=nope", "fashion_mnist", "cifar10"]),
    (["optim.lrr=1e-3"], ["optim.lrr", "no such key", "did you mean lr"]),
    (["modle=resnet18"], ["modle", "did you mean model"]),
    (["experiment=nope"], ["experiment=nope", "choose from"]),
    (["device.precision=bf32"], ["device.precision=bf32", "fp32", "bf16", "fp16"]),
    (["sched=cosine", "sched.warmup_epochs=3"], ["sched.warmup_epochs=3", "trainer.epochs=2"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0", ">= 1"]),
    # Not finite: Adam would refuse it in a traceback, SGD train until the NaN guard stops it.
    (["optim.lr=nan"], ["optim.lr=nan: must be a finite number"]),
    (["optim=sgd", "optim.lr=inf"], ["optim.lr=inf: must be a finite number"]),
    (["optim.weight_decay=-inf"], ["optim.weight_decay=-inf: must be a finite number"]),
    (["optim.betas=[0.9,nan]"], ["optim.betas=[0.9, nan]: must be a finite number"]),
    (["sched=step", "sched.gamma=nan"], ["sched.gamma=nan: must be a finite number"]),
    # Ranges of the schedule, the seed and the betas (each trained or failed in a traceback before).
    (["sched=step", "sched.gamma=-1"], ["sched.gamma=-1.0: must be > 0"]),
    (["sched=step", "sched.gamma=0"], ["sched.gamma=0.0: must be > 0"]),
    (["sched=cosine", "sched.min_lr=-1"], ["sched.min_lr=-1.0: must be >= 0"]),
    (["sched=onecycle", "sched.pct_start=1.5"], ["sched.pct_start=1.5: must be in [0, 1)"]),
    (["sched=onecycle", "sched.pct_start=0"], ["sched.pct_start=0.0: must be in (0, 1)"]),
    (["sched.warmup_start_factor=-1"], ["sched.warmup_start_factor=-1.0: must be in (0, 1]"]),
    (["seed=-1"], ["seed=-1: must be >= 0"]),
    (["seed=4294967296"], ["seed=4294967296: must be < 4294967296"]),
    (["optim.betas=[0.9]"], ["optim.betas=[0.9]: must be two numbers in [0, 1)"]),
    (["optim.betas=[0.9,1.5]"], ["optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"]),
    (["hydra.run.dir=/tmp/ünïcödé_日本"], ["LexerNoViableAltException", "beyond ASCII only in a quoted value",
                                          "'hydra.run.dir=\"/tmp/ünïcödé_日本\"'"]),
])
def test_bad_config_is_one_clear_line(args, words, tmp_path, monkeypatch, capsys):
    code, err = run_cli(args, tmp_path, monkeypatch, capsys)
    assert code == 2
    last, = err.strip().splitlines()  # one line, whether Hydra or the job found the mistake
    assert last.startswith("error: ")
    for word in words:
        assert word in last


def test_missing_data_offline_says_where_and_what(tmp_path, monkeypatch, capsys):
    code, err = run_cli([f"dataset.root={tmp_path / 'empty'}", "dataset.download=false"],
                        tmp_path, monkeypatch, capsys)
    assert code == 2
    last, = err.strip().splitlines()
    for word in ("FashionMNIST/raw", "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "dataset.root"):
        assert word in last


def test_a_failed_sweep_job_is_named_above_its_error(tmp_path, monkeypatch, capsys):
    code, err = run_cli(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.root={tmp_path / 'empty'}",
                         "dataset.download=false", "optim.lr=0.01"], tmp_path, monkeypatch, capsys)
    assert code == 2
    job, last = err.strip().splitlines()
    assert job.startswith("Error executing job with overrides:") and "'optim.lr=0.01'" in job
    assert last.startswith("error: dataset fashion_mnist: files not found")


def test_batch_larger_than_dataset(fmnist_root, tmp_path, monkeypatch, capsys):
    code, err = run_cli([f"dataset.root={fmnist_root}", "dataset.download=false", "trainer.batch_size=100000"],
                        tmp_path, monkeypatch, capsys)
    assert code == 2
    assert "trainer.batch_size=100000" in err and "320 training images" in err


def test_two_commands_in_one_process_behave_as_two_processes(tmp_path, monkeypatch, capsys):
    # What a command learns of its jobs (single run or sweep, the sweep's folder) is held by that
    # command alone: a single run after a failed sweep in the same process is not summarised as
    # that sweep, and its error is one line.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    missing = [f"dataset.root={tmp_path / 'empty'}", "dataset.download=false"]
    ended = []
    for args in (["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *missing, "optim.lr=0.01,0.02"],
                 [f"hydra.run.dir={tmp_path / 'run'}", *missing]):
        monkeypatch.setattr(sys, "argv", ["resnet_lab", *args])
        with pytest.raises(SystemExit) as exited:
            main()
        ended.append((exited.value.code, capsys.readouterr()))
    (sweep_code, sweep), (run_code, single) = ended
    assert sweep_code == run_code == 2
    assert sweep.err.startswith("Error executing job with overrides:") and "best run: none" in sweep.out
    assert "sweep" not in single.out and "best run" not in single.out
    last, = single.err.strip().splitlines()
    assert last.startswith("error: dataset fashion_mnist: files not found")
