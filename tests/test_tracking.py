"""The Tracker without Hydra's runtime: W&B offline runs decoded from their files, the step-loss
sync budget, failed runs, rank gating, and how logger.mode=auto chooses."""

import json
import logging
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module

from resnet_lab.config import validate
from resnet_lab.errors import UserError
from resnet_lab.models import build_model
from resnet_lab.training import tracking
from resnet_lab.training.tracking import Tracker
from resnet_lab.training.train import train
from tests.runs import metrics
from tests.wandb_file import read_run, records


def cfg_with(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=["logger.mode=offline", "trainer.progress=false", *overrides])


def epoch_row(epoch, acc):
    return {"epoch": epoch, "train_loss": 1.0 / epoch, "train_acc": acc, "test_loss": 1.0, "test_acc": acc,
            "lr": 0.1, "seconds": 1.0, "images_per_s": 100.0}


class CountingLoss:
    """A loss that counts how often it is read off the device."""

    def __init__(self):
        self.reads = 0

    def item(self):
        self.reads += 1
        return 0.5


def test_single_run_is_named_after_its_folder_and_keeps_its_weights(fmnist_root, tmp_path):
    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    cfg = cfg_with(f"dataset.root={fmnist_root}", "dataset.download=false", "device=cpu", "model.width=8",
                   "trainer.epochs=2", "trainer.batch_size=64", "logger.log_weights=true")
    acc = train(cfg, run_dir)
    run = read_run(run_dir)
    rows = metrics(run_dir)
    assert run.exit_code == 0 and run.run.display_name == "my-run" and run.run.run_group == ""
    assert [h["epoch"] for h in run.history if "epoch" in h] == [1, 2]
    # Without a validation split no epoch is chosen: the run is judged by its last epoch.
    assert run.summary["final/test_acc"] == acc == rows[-1]["test_acc"]
    assert not [key for key in run.summary if key.startswith("best/")]
    assert [h["test/acc"] for h in run.history if "epoch" in h] == [r["test_acc"] for r in rows]
    assert run.summary["params"] == sum(p.numel() for p in build_model(cfg.model, 1, 10).parameters())
    assert [(a.type, a.name) for a in run.artifacts if a.type == "model"] == [("model", f"weights-{run.run.run_id}")]
    # The final confusion matrix and per-class accuracy, as W&B charts (each a table behind it).
    tables = sorted(a.name.split("-")[2] for a in run.artifacts if a.type == "run_table")
    assert tables == ["finalconfusion_matrix_table", "finalper_class_accuracy_table"]
    final = json.loads((run_dir / "eval" / "final.json").read_text())
    assert sum(map(sum, final["confusion_matrix"])) == 80  # every test image once (conftest: 80)
    assert (run_dir / "status").read_text() == "finished\n"


def test_a_run_that_raises_is_finished_as_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with Tracker(tmp_path, cfg_with()) as tracker:
            assert (tmp_path / "status").read_text() == "running\n"
            tracker.epoch(epoch_row(1, 0.4))
            raise RuntimeError("boom")
    run = read_run(tmp_path)
    assert run.exit_code == 1
    assert run.summary["final/test_acc"] == 0.4
    assert (tmp_path / "status").read_text() == "failed\n"


@pytest.mark.parametrize("objective", ["auto", "test_acc"])
def test_the_best_epoch_is_chosen_on_validation_unless_a_test_metric_is_named(tmp_path, objective):
    # Epoch 2 has the best validation accuracy; epoch 3 the best test accuracy.
    val, test = [0.5, 0.8, 0.7], [0.6, 0.5, 0.9]
    with Tracker(tmp_path, cfg_with("dataset.val_fraction=0.2", f"trainer.objective={objective}")) as tracker:
        for epoch in (1, 2, 3):
            tracker.epoch({**epoch_row(epoch, test[epoch - 1]), "val_loss": 1.0, "val_acc": val[epoch - 1]})
        tracker.finish({})
    summary = read_run(tmp_path).summary
    best = 2 if objective == "auto" else 3
    assert (summary["best/epoch"], summary["best/val_acc"], summary["best/test_acc"]) == \
        (best, val[best - 1], test[best - 1])
    assert (summary["final/val_acc"], summary["final/test_acc"]) == (0.7, 0.9)
    assert [h["val/acc"] for h in read_run(tmp_path).history if "epoch" in h] == val


@pytest.mark.parametrize("logger", ["wandb", "none"])
def test_the_step_loss_is_read_only_every_n_steps(tmp_path, logger):
    loss, norm = CountingLoss(), CountingLoss()
    with Tracker(tmp_path, cfg_with(f"logger={logger}", "logger.log_every_steps=3")) as tracker:
        for step in range(1, 11):
            tracker.step(step, loss, {"grad_norm": norm})  # a feature's value, read with the loss
        tracker.epoch(epoch_row(1, 0.5))
        tracker.finish({"params": 1})
    if logger == "none":
        assert loss.reads == norm.reads == 0 and tracker.run_id is None and not (tmp_path / "wandb").exists()
        return
    assert loss.reads == norm.reads == 3
    run = read_run(tmp_path)
    assert run.run.run_id == tracker.run_id
    assert [(h["global_step"], h["train/loss_step"], h["grad_norm"]) for h in run.history
            if "train/loss_step" in h] == [(3, 0.5, 0.5), (6, 0.5, 0.5), (9, 0.5, 0.5)]
    assert [h["global_step"] for h in run.history if "epoch" in h] == [10]


def test_resuming_continues_the_same_wandb_run(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with Tracker(tmp_path, cfg_with()) as first:
            first.epoch(epoch_row(1, 0.3))
            raise KeyboardInterrupt
    assert (tmp_path / "status").read_text() == "failed\n"
    with Tracker(tmp_path, cfg_with(), resume_id=first.run_id) as second:
        second.epoch(epoch_row(2, 0.6))
        second.finish({})
    assert second.run_id == first.run_id
    # Offline, each start writes its own offline-run-<second>-<id> folder; `wandb sync` joins them by id.
    last = sorted(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))[-1]
    assert next(r.run for r in records(last) if r.WhichOneof("record_type") == "run").run_id == first.run_id
    epochs = [json.loads(i.value_json) for r in records(last) if r.WhichOneof("record_type") == "history"
              for i in r.history.item if i.key == "epoch" or list(i.nested_key) == ["epoch"]]
    assert epochs[-1] == 2
    assert (tmp_path / "status").read_text() == "finished\n"


def test_ranks_other_than_zero_write_nothing(tmp_path):
    loss = CountingLoss()
    with Tracker(tmp_path, cfg_with("logger.log_every_steps=1"), rank=1) as tracker:
        tracker.step(1, loss)
        tracker.epoch(epoch_row(1, 0.5))
        tracker.finish({})
    assert tracker.run_id is None and loss.reads == 0
    assert list(tmp_path.iterdir()) == []


def test_auto_mode_follows_wandb_mode_and_announces_once(monkeypatch, caplog):
    monkeypatch.setattr(tracking, "_announced_mode", False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with caplog.at_level(logging.INFO, logger="resnet_lab"):
        assert [tracking.choose_mode("auto") for _ in range(2)] == ["disabled", "disabled"]
    assert [r.getMessage() for r in caplog.records] == [
        "W&B logging disabled: WANDB_MODE is set; logger.mode=online/offline/disabled to choose"]
    assert tracking.choose_mode("offline") == "offline"


NO_KEY_RUN = """
import sys
from omegaconf import OmegaConf
from resnet_lab.errors import UserError
from resnet_lab.training.tracking import Tracker, choose_mode
print(choose_mode("auto"))
if len(sys.argv) > 1:
    logger = dict(name="wandb", mode="online", project="p", entity=None, tags=[], log_every_steps=1,
                  log_weights=False)
    try:
        Tracker(sys.argv[1], OmegaConf.create(dict(trainer=dict(epochs=1), logger=logger)))
    except UserError as e:
        print(e)
"""


def test_auto_mode_is_online_only_with_an_api_key_and_online_needs_one(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_SILENT="true")

    def run(*args, **extra):
        return subprocess.run([sys.executable, "-c", NO_KEY_RUN, *args], env={**env, **extra}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120).stdout.strip().splitlines()

    assert run(WANDB_API_KEY="x" * 40) == ["online"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert run(str(run_dir)) == ["offline", "logger.mode=online: W&B could not start a run: No API key "
                                 "configured. Use `wandb login` to log in. (logger.mode=offline logs without an account)"]
    assert not (run_dir / "status").exists()


def test_a_bad_logger_mode_is_one_clear_line():
    with pytest.raises(UserError, match="logger.mode=onlin: must be one of auto, online, offline, disabled"):
        validate(cfg_with("logger.mode=onlin"))


def test_an_epoch_row_takes_the_step_it_ends_at(tmp_path):
    # A run resumed after its epoch's last step trains no step before the epoch's row.
    with Tracker(tmp_path, cfg_with()) as tracker:
        tracker.epoch(epoch_row(3, 0.5), global_step=12)
        tracker.finish({})
    assert [h["global_step"] for h in read_run(tmp_path).history if "epoch" in h] == [12]
