"""What a run records of itself (issue: records a researcher can trust): the optimizer's rates
and momentum as they were, a failed run's reason, the resolved runtime, the config a trained run
is loaded with, and batch norm's buffers under DDP."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from resnet_lab.config import validate
from resnet_lab.errors import UserError
from resnet_lab.optim import build_optimizer, build_scheduler
from resnet_lab.training.train import train
from tests.runs import TINY, metrics

# A few seconds of training on random 8x8 images, without W&B.
SMALL = ["dataset=synthetic", "dataset.channels=1", "dataset.image_size=8", "dataset.train_size=64",
         "dataset.test_size=32", "model.width=4", "model.stem=cifar", "trainer.batch_size=16",
         "trainer.eval_batch_size=32", "trainer.progress=false", "device=cpu", "device.precision=fp32",
         "logger=none"]


def composed(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def beta1_curve(*overrides) -> list:
    """AdamW's beta1 over 30 updates of a one-cycle schedule."""
    cfg = composed("optim=adamw", "sched=onecycle", "trainer.epochs=3", *overrides)
    validate(cfg)
    opt = build_optimizer(torch.nn.Linear(1, 1), cfg.optim)
    scheduler = build_scheduler(opt, cfg.sched, steps_per_epoch=10, epochs=3)
    betas = [opt.param_groups[0]["betas"][0]]
    for _ in range(29):
        opt.step()
        scheduler.step()
        betas.append(opt.param_groups[0]["betas"][0])
    return betas


def test_onecycle_leaves_beta1_as_configured_unless_asked_to_cycle_it():
    assert set(beta1_curve()) == {0.9}
    cycled = beta1_curve("sched.cycle_momentum=true", "sched.momentum_range=[0.8,0.9]")
    assert cycled[0] == pytest.approx(0.9) and min(cycled) == pytest.approx(0.8, abs=1e-3)
    assert cycled.index(min(cycled)) == 8  # at the lr's peak, OneCycleLR's update pct_start * 30 - 1


def test_the_measured_one_cycle_preset_cycles_beta1_in_its_own_yaml():
    cfg = composed("experiment=fashion_mnist_fast")
    assert cfg.sched.cycle_momentum is True and list(cfg.sched.momentum_range) == [0.85, 0.95]


@pytest.mark.parametrize("overrides, message", [
    (["sched=cosine", "sched.cycle_momentum=true"], "sched.cycle_momentum=true: only sched=onecycle"),
    (["sched=onecycle", "sched.momentum_range=[0.95,0.85]"], "sched.momentum_range=[0.95, 0.85]: must be"),
    (["sched=onecycle", "sched.momentum_range=[0.9]"], "sched.momentum_range=[0.9]: must be"),
])
def test_cycle_momentum_settings_are_checked(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate(composed(*overrides))


def test_each_epoch_row_has_every_rate_and_the_momentum_in_use(tmp_path):
    run_dir = tmp_path / "run"
    train(composed(*SMALL, "trainer.epochs=2", "optim=adamw", "optim.lr=0.01", "optim.backbone_lr_scale=0.1",
                   "optim.no_decay_norm_bias=true", "sched=onecycle", "sched.cycle_momentum=true"), run_dir)
    rows = metrics(run_dir)
    for row in rows:
        assert row["lr"] == row["lr_head"] and row["lr_backbone"] == pytest.approx(0.1 * row["lr_head"])
        assert 0.85 <= row["beta1"] <= 0.95
    # Mid-run (after epoch 1 of 2, past the peak) the lr has fallen from it and beta1 risen back.
    assert rows[0]["lr"] < 0.01 and rows[0]["beta1"] > 0.85
    assert rows[-1]["beta1"] > rows[0]["beta1"] and rows[-1]["lr"] < rows[0]["lr"]
    sgd = train(composed(*SMALL, "trainer.epochs=1", "optim=sgd", "optim.momentum=0.7"), tmp_path / "sgd")
    assert sgd is not None and "lr_backbone" not in metrics(tmp_path / "sgd")[0]
    assert metrics(tmp_path / "sgd")[0]["momentum"] == 0.7


def test_a_failed_run_says_why_in_train_log_and_in_its_wandb_summary(fmnist_root, tmp_path, monkeypatch, capsys):
    from tests.test_cli import run_cli
    from tests.wandb_file import read_run

    # The step schedule multiplies the learning rate by 1e33 halfway: the run diverges in epoch 2.
    run_dir = tmp_path / "diverged"
    code, err = run_cli([f"dataset.root={fmnist_root}", *TINY, "logger=wandb", "logger.mode=offline",
                         "trainer.epochs=2", "trainer.limit_train_batches=4", "sched=step",
                         "sched.milestones=[0.5]", "sched.gamma=1e33", f"hydra.run.dir={run_dir}"],
                        tmp_path, monkeypatch, capsys)
    error = err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: the training loss became NaN or inf at epoch 2")
    assert (run_dir / "train.log").read_text().strip().splitlines()[-1].endswith(f"[ERROR] - {error}")
    assert (run_dir / "status").read_text() == "failed\n"
    assert read_run(run_dir).summary["error"] == error.removeprefix("error: ")
    # A UserError raised inside the job before training (a warmup longer than the run) ends train.log too.
    run_dir = tmp_path / "refused"
    code, err = run_cli([f"dataset.root={fmnist_root}", *TINY, "logger=none", "trainer.epochs=1",
                         "sched=cosine", "sched.warmup_epochs=3", f"hydra.run.dir={run_dir}"],
                        tmp_path, monkeypatch, capsys)
    error = err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: sched.warmup_epochs=3")
    assert (run_dir / "train.log").read_text().strip().splitlines()[-1].endswith(f"[ERROR] - {error}")


def test_a_run_of_ones_own_model_config_is_loaded_with_the_config_it_trained_with(tmp_path, monkeypatch, capsys):
    from resnet_lab.errors import describe
    from resnet_lab.trained import evaluate
    from resnet_lab.trained import load as trained
    from resnet_lab.__main__ import main
    from tests.test_after_training import command

    # A model of one's own, named as one likes (not a variant's name), from --config-dir.
    (tmp_path / "my_conf" / "model").mkdir(parents=True)
    own = tmp_path / "my_conf" / "model" / "tiny.yaml"
    own.write_text("defaults: [resnet18, _self_]\nname: tiny\nwidth: 4\nlayers: [1, 1]\nstem: cifar\n")
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["resnet_lab", "--config-dir", str(tmp_path / "my_conf"), "model=tiny", *SMALL,
                                     "trainer.epochs=1", f"hydra.run.dir={run_dir}"])
    main()
    # Edited after training: the run keeps what it trained with.
    own.write_text("defaults: [resnet18, _self_]\nname: tiny\nwidth: 16\n")
    cfg = trained.run_config(run_dir, ["trainer.eval_batch_size=8"])
    assert (cfg.model.name, cfg.model.width, list(cfg.model.layers)) == ("tiny", 4, [1, 1])
    assert cfg.trainer.eval_batch_size == 8 and cfg.dataset.train_size == 64
    # A group option replaces the run's whole group, as in training; a typo is one line.
    assert trained.run_config(run_dir, ["dataset=cifar10"]).dataset.root == "data"
    with pytest.raises(Exception) as typo:
        trained.run_config(run_dir, ["dataset.image_sise=16"])
    assert describe(typo.value).startswith("dataset.image_sise: no such key (did you mean image_size?)")
    code, out, err = command(evaluate, [run_dir], monkeypatch, capsys)
    assert code == 0, err
    report = json.loads((run_dir / "eval" / "synthetic-last.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics(run_dir)[-1]["test_acc"])


def test_a_dataset_of_ones_own_is_a_registered_loader_and_a_yaml(tmp_path, monkeypatch):
    from resnet_lab.__main__ import main
    from resnet_lab.data import DATASETS
    from resnet_lab.data.loader import TensorSplit
    from resnet_lab.trained import load as trained

    def stripes(cfg):
        """Class 1's images have a bright row, class 0's not."""
        labels = torch.arange(48) % 2
        images = torch.zeros(48, 1, 8, 8, dtype=torch.uint8)
        images[labels == 1, :, 3] = 255
        return TensorSplit(images[:32], labels[:32]), TensorSplit(images[32:], labels[32:]), ["plain", "striped"]

    monkeypatch.setitem(DATASETS._entries, "stripes", stripes)
    (tmp_path / "my_conf" / "dataset").mkdir(parents=True)
    (tmp_path / "my_conf" / "dataset" / "stripes.yaml").write_text("name: stripes\nval_fraction: 0.25\n")
    run_dir = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["resnet_lab", "--config-dir", str(tmp_path / "my_conf"), "dataset=stripes",
                                     *SMALL[5:], "trainer.epochs=1", f"hydra.run.dir={run_dir}"])
    main()
    assert {"val_acc", "test_acc"} <= set(metrics(run_dir)[0])
    loaded = trained.load(run_dir, "last", [])
    assert loaded.data.classes == ["plain", "striped"] and loaded.data.val.num_samples == 8
    assert "root" not in loaded.cfg.dataset  # the keys every dataset has, as it trained with


@pytest.mark.parametrize("command", ["evaluate", "predict", "export"])
def test_each_command_after_training_runs_as_python_dash_m(command, tmp_path, monkeypatch, capsys):
    import runpy

    from PIL import Image

    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    args = {"predict": [str(tmp_path / "x.png")], "export": ["--format", "onnx"]}.get(command, [])
    monkeypatch.setattr("sys.argv", [command, str(tmp_path), *args])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"resnet_lab.{command}", run_name="__main__")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(f"error: {tmp_path}: not a run folder"), err


def test_the_resolved_runtime_is_recorded_beside_the_config_and_in_wandb(tmp_path):
    from resnet_lab import device as device_setup
    from tests.wandb_file import read_run

    run_dir = tmp_path / "run"
    # Left to the machine: device.type auto, precision and channels_last null (device=auto's).
    cfg = composed(*[o for o in SMALL if not o.startswith(("device", "logger"))], "device=auto", "trainer.epochs=1",
                   "trainer.accumulate=2", "dataset.val_fraction=0.25", "logger=wandb", "logger.mode=offline")
    assert cfg.device.type == "auto" and cfg.device.precision is None and cfg.device.channels_last is None
    train(cfg, run_dir)
    runtime = json.loads((run_dir / "runtime.json").read_text())
    settled = device_setup.resolve(cfg.device)
    assert runtime["device"] == settled.device.type and runtime["precision"] == settled.precision in ("fp32", "bf16")
    # On the CPU a width-4 network drops the default channels_last (device.channels_last_hazard).
    assert runtime["memory_format"] == ("contiguous" if settled.device.type == "cpu" else "channels_last")
    assert runtime["compile"] is False
    assert (runtime["world_size"], runtime["batch_per_rank"], runtime["global_batch"], runtime["images_per_update"]) \
        == (1, 16, 16, 32)
    assert (runtime["train_images"], runtime["val_images"], runtime["test_images"]) == (48, 16, 32)
    assert runtime["torch"] == torch.__version__ and runtime["cpu_isa"] == torch.backends.cpu.get_cpu_capability()
    assert runtime["device_name"] == device_setup.device_name(settled.device.type)
    assert read_run(run_dir).config["runtime"] == runtime
