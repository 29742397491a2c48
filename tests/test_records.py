"""What a run records of itself (issue: records a researcher can trust): the optimizer's rates
and momentum as they were, a failed run's reason, the resolved runtime, the config a trained run
is loaded with, and batch norm's buffers under DDP."""

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
