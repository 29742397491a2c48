"""Sweeps end to end, W&B offline: one W&B run per job under the basic launcher (all jobs in one
process), a failing job that does not leak into the next, the Optuna search with a diverging
trial (tests/test_search.py has the rest of it), joblib."""

import json
import os
import re

import pytest
import yaml

from resnet_lab import rundir, sharing
from resnet_lab.training.tracking import wandb_key
from tests.launch import LRS, multirun
from tests.runs import metrics
from tests.wandb_file import read_run


def test_each_job_of_a_multirun_is_its_own_wandb_run(grid_sweep):
    sweep, out = grid_sweep
    ids = set()
    for job, lr in enumerate(LRS):
        run_dir = sweep / str(job)
        run = read_run(run_dir)
        ids.add(run.run.run_id)
        assert run.exit_code == 0
        # One group for the sweep's jobs: its folder's name and an id of its own.
        assert run.run.run_group == (sweep / ".wandb_group").read_text().strip()
        assert run.run.run_group.startswith(f"{sweep.name}-") and len(run.run.run_group) == len(sweep.name) + 9
        # Hydra's override_dirname (its own value formatting), without logger.*, dataset.root, ...
        assert run.run.display_name == (f"device.precision=fp32,device=cpu,model.width=8,optim.lr={lr},trainer.batch_size=64,"
                                        "trainer.epochs=1,trainer.eval_batch_size=$\\{trainer.batch_size\\},"
                                        "trainer.save_weights=False")
        assert run.run.job_type == "train" and run.run.project == "resnet_lab"
        assert list(run.run.tags) == ["ci", "tiny"]
        # The fully resolved config: the interpolation is a number, not "${...}".
        assert run.config["optim"]["lr"] == float(lr) and run.config["trainer"]["eval_batch_size"] == 64
        assert run.config["model"] == yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())["model"]
        rows = metrics(run_dir)
        epochs = [h for h in run.history if "epoch" in h]
        assert [{k: h[wandb_key(k)] for k in rows[0]} for h in epochs] == rows
        # 320 images in batches of 64: 5 steps; the loss is read every 2nd step.
        assert [h["global_step"] for h in run.history if "train/loss_step" in h] == [2, 4]
        assert epochs[0]["global_step"] == 5
        assert run.summary["final/test_acc"] == rows[-1]["test_acc"] and "best/test_acc" not in run.summary
        assert run.summary["params"] > 0 and run.summary["total_seconds"] > 0
        assert (run_dir / "status").read_text().strip() == "finished"
    assert len(ids) == 3
    assert "wandb sync" in out


def test_a_job_that_raises_fails_its_own_run_only(tmp_path, fmnist_root):
    # SGD at lr 1e30 diverges in its first steps: the first job raises while training.
    code, sweep, _ = multirun(tmp_path, fmnist_root, "optim=sgd", "optim.lr=1e30,0.01")
    assert code == 2  # Hydra's basic sweeper runs every job, then re-raises the first failure
    failed, clean = read_run(sweep / "0"), read_run(sweep / "1")
    assert failed.exit_code != 0 and not [h for h in failed.history if "epoch" in h]
    assert (sweep / "0" / "status").read_text().strip() == "failed"
    assert clean.exit_code == 0 and clean.run.run_id != failed.run.run_id
    assert clean.config["optim"]["lr"] == 0.01
    assert [h["epoch"] for h in clean.history if "epoch" in h] == [1]
    assert (sweep / "1" / "status").read_text().strip() == "finished"


def test_a_sweep_job_with_a_learning_rate_that_is_not_finite_is_one_line(tmp_path, fmnist_root, capsys):
    code, sweep, _ = multirun(tmp_path, fmnist_root, "optim.lr=nan,1e-2", "logger=none")
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == "error: optim.lr=nan: must be a finite number"
    assert not (sweep / "0" / "status").exists()
    assert (sweep / "1" / "status").read_text() == "finished\n"


def test_a_sweep_with_a_failed_job_still_ends_with_its_runs_side_by_side(tmp_path, fmnist_root, capsys):
    # Hydra's basic sweeper runs every job, then raises the first failure (skipping the callback
    # that prints the table): the table comes before the error line all the same.
    code, sweep, out = multirun(tmp_path, fmnist_root, "optim=sgd", "optim.lr=1e30,0.01", "logger=none")
    assert code == 2
    assert f"sweep {sweep}" in out and "failed" in out and f"best run: {sweep / '1'}" in out
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: the training loss became NaN")


def test_a_sweep_rerun_into_its_folder_does_not_take_a_refused_jobs_earlier_run_for_its_result(tmp_path, fmnist_root):
    code, sweep, _ = multirun(tmp_path, fmnist_root, "optim.lr=0.001,0.002", "logger=none")
    assert code == 0
    # Job 0 asks for another rate than the finished run in its folder, job 1 for one out of range:
    # both are refused, and their folders keep the first sweep's runs (lr 0.001 and 0.002).
    code, _, out = multirun(tmp_path, fmnist_root, "optim.lr=0.003,-1", "logger=none")
    assert code == 2
    assert "not run: 0, 1 (failed before training; left out: what their folders hold is from before this sweep)" in out
    assert "best run: none, no run finished" in out and f"sweep {sweep}" not in out
    # The first sweep's command again: each job finds its finished run, which is its result again.
    code, _, out = multirun(tmp_path, fmnist_root, "optim.lr=0.001,0.002", "logger=none")
    assert code == 0 and "not run" not in out and f"best run: {sweep}{os.sep}" in out


def test_an_optuna_search_whose_every_trial_fails_says_so(tmp_path, fmnist_root, capsys):
    code, _, out = multirun(tmp_path, fmnist_root, "hparams_search=optuna", "hydra.sweeper.params=null",
                            "hydra.sweeper.n_trials=1", "optim=sgd", "optim.lr=1e30", "logger=none")
    assert code == 2 and "Failed experiment: the training loss became NaN or inf" in out
    assert capsys.readouterr().err.splitlines()[-1] == \
        "error: every trial of the Optuna search failed (the 'Failed experiment' lines above say why)"


def test_optuna_sweep_survives_a_diverging_trial(tmp_path, fmnist_root, capsys):
    # The grid sampler runs each of the three learning rates exactly once; 1e30 diverges.
    code, sweep, out = multirun(tmp_path, fmnist_root, "hparams_search=optuna",
                                "hydra/sweeper/sampler=grid", "hydra.sweeper.params=null",
                                "optim=sgd", "optim.lr=choice(0.01,0.03,1e30)", "logger=none")
    assert code == 0
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    runs = {}
    for d in (d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")):
        lr = next(o for o in yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) if o.startswith("optim.lr="))
        runs[float(lr.split("=")[1])] = d
    assert sorted(runs) == [0.01, 0.03, 1e30]
    assert not (runs[1e30] / "metrics.jsonl").exists()  # stopped at the step the loss went bad
    assert (runs[1e30] / "status").read_text().strip() == "failed"
    assert "Failed experiment: the training loss became NaN or inf" in out
    # Hydra's line names the failed trial: in a sweep it is shown, not held back as for one run.
    failed, = [line for line in capsys.readouterr().err.splitlines() if line.startswith("Error executing job")]
    assert "'optim.lr=1e+30'" in failed
    # A search holds out a validation split and chooses on it.
    finite = {lr: metrics(runs[lr])[-1]["val_acc"] for lr in (0.01, 0.03)}
    assert result["best_value"] == max(finite.values())
    assert result["best_params"]["optim.lr"] in finite
    best_dir = runs[result["best_params"]["optim.lr"]]
    assert result["best_run"] == str(best_dir)
    assert f"best run: {best_dir}  best val acc {result['best_value']:.4f} at epoch 1" in out


def test_two_sweeps_in_folders_of_one_name_get_groups_of_their_own(tmp_path):
    first, second = tmp_path / "a" / "lr_search", tmp_path / "b" / "lr_search"
    for folder in (first, second):
        folder.mkdir(parents=True)
    group = rundir.sweep_group(first)
    assert rundir.sweep_group(first) == group  # its jobs, and the sweep resumed, share it
    assert rundir.sweep_group(second) != group and rundir.sweep_group(second).startswith("lr_search-")
    assert sorted(p.name for p in first.iterdir()) == [".wandb_group"]


def test_joblib_launcher_runs_jobs_in_processes_with_wandb(tmp_path, fmnist_root):
    code, sweep, _ = multirun(tmp_path, fmnist_root, "hydra/launcher=joblib",
                              "hydra.launcher.n_jobs=2", "optim.lr=1e-3,2e-3")
    assert code == 0
    runs = [read_run(sweep / str(job)) for job in (0, 1)]
    assert [r.exit_code for r in runs] == [0, 0]
    assert [r.config["optim"]["lr"] for r in runs] == [1e-3, 2e-3]
    assert runs[0].run.run_id != runs[1].run.run_id
    for job, run in enumerate(runs):
        assert [h["test/acc"] for h in run.history if "epoch" in h] == [m["test_acc"] for m in metrics(sweep / str(job))]
    # Each job took a slot of the machine and its share of the CPU threads (resnet_lab.sharing).
    slots = []
    for job in (0, 1):
        found = re.search(r"parallel job slot (\d) of 2 on this machine: (\d+) CPU thread",
                          (sweep / str(job) / "train.log").read_text())
        assert found, job
        slots.append(int(found[1]))
        runtime = json.loads((sweep / str(job) / "runtime.json").read_text())
        assert runtime["cpu_threads"] == int(found[2]) == max(1, sharing.cores() // 2)
    assert set(slots) <= {0, 1}


@pytest.mark.parametrize("preset", ["d2l_fashion_mnist", "cifar10_resnet56"])
def test_experiment_presets_compose(preset):
    from hydra import compose, initialize_config_module

    import resnet_lab.training.train  # noqa: F401  (registers the schema)
    from resnet_lab.config import validate

    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={preset}"])
    validate(cfg)
    if preset == "cifar10_resnet56":
        assert cfg.model.name == "resnet56"
        assert cfg.dataset.name == "cifar10" and cfg.dataset.augment == "flip_crop"
        assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
        assert (cfg.sched.name, list(cfg.sched.milestones), cfg.sched.gamma) == ("step", [0.5, 0.75], 0.1)
        assert cfg.trainer.batch_size == 128
    else:
        assert (cfg.model.name, cfg.dataset.name, cfg.dataset.augment, cfg.optim.name, cfg.optim.lr,
                cfg.trainer.batch_size, cfg.trainer.epochs) == (
            "resnet18_d2l", "fashion_mnist", "none", "adam", 1e-3, 256, 2)
