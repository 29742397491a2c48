"""The trainer's decisions without training: the after-a-step policy, the resume plan, and the
order in which the loop calls its callbacks."""

import pytest
import torch
from hydra import compose, initialize_config_module

import resnet_lab.training.train  # noqa: F401  (registers the schema)
from resnet_lab import device as device_setup
from resnet_lab import rundir
from resnet_lab.data.loader import DeviceLoader, Normalizer, TensorSplit
from resnet_lab.errors import UserError
from resnet_lab.training import checkpoint, resume
from resnet_lab.training.engine import Callback, RunningTotals, train_epoch
from resnet_lab.training.trainer import Decision, State, after_step


def test_mid_epoch_checkpoints_fall_every_n_steps_of_the_run_not_of_the_epoch():
    # 5 steps an epoch, a checkpoint every 3 steps of the run: after run steps 3, 6 (epoch 2
    # step 1) and 9; not at an epoch's last step (the epoch's end writes its own).
    due = [(epoch, step) for epoch in (1, 2) for step in range(1, 6)
           if after_step(State(epoch=epoch, step=step), 5, 3, 0, False).save]
    assert due == [(1, 3), (2, 1), (2, 4)]
    assert not any(after_step(State(epoch=1, step=s), 5, 0, 0, False).save for s in range(1, 6))


def test_with_accumulation_checkpoints_count_updates_and_fall_between_them():
    # 6 batches an epoch, 2 to an update (3 updates), a checkpoint every 2 updates of the run.
    due = [(epoch, step) for epoch in (1, 2) for step in (2, 4, 6)
           if after_step(State(epoch=epoch, step=step), 6, 2, 0, False, accumulate=2).save]
    assert due == [(1, 4), (2, 2)]


def test_a_signal_saves_and_stops_and_every_save_looks_at_the_loss_first():
    assert after_step(State(epoch=1, step=2), 5, 0, 15, False) == Decision(check_loss=True, save=True, stop=15)
    assert after_step(State(epoch=1, step=3), 5, 3, 0, False) == Decision(check_loss=True, save=True)
    # Where reading the loss costs nothing (the CPU), it is read after every step.
    assert after_step(State(epoch=1, step=1), 5, 0, 0, True) == Decision(check_loss=True)
    assert after_step(State(epoch=1, step=1), 5, 0, 0, False) == Decision()


def composed(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=["model=resnet18", "optim=adam", "sched=none", "trainer.epochs=2",
                                            *overrides])


def save_checkpoint(run_dir, cfg, epoch, step):
    """A checkpoint as the trainer writes one, for a linear model (the plan reads no weights)."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    saver = checkpoint.Checkpointer(run_dir, cfg, model, optimizer, scheduler,
                                    torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"))
    saver.save(epoch, step, totals=None, best_acc=0.5, metrics={"test_acc": 0.5}, wandb_run_id=None, elapsed=1.0)
    return rundir.last(run_dir)


def test_resume_plan_fresh_continue_finished_refuse(tmp_path):
    cfg = composed()
    assert resume.plan(tmp_path, cfg).action == "fresh"
    last = save_checkpoint(tmp_path, cfg, epoch=2, step=0)
    plan = resume.plan(tmp_path, composed("optim.lr=0.01"))
    assert (plan.action, plan.checkpoint, plan.own) == ("continue", last, True)
    assert plan.changes == ["optim.lr=0.01 (checkpoint: 0.001)"]
    with pytest.raises(UserError, match="already holds a run"):
        resume.plan(tmp_path, composed("trainer.resume=none"))
    with pytest.raises(UserError, match="saved with optim=adam, this run has optim=sgd"):
        resume.plan(tmp_path, composed("optim=sgd"))
    cosine = tmp_path / "cosine"
    save_checkpoint(cosine, composed("sched=cosine"), epoch=2, step=0)
    with pytest.raises(UserError, match="trainer.batch_size=64 .checkpoint: 256.: .* sched=cosine"):
        resume.plan(cosine, composed("sched=cosine", "trainer.batch_size=64"))
    with pytest.raises(UserError, match="trainer.accumulate=2 .checkpoint: 1.: .* sched=cosine"):
        resume.plan(cosine, composed("sched=cosine", "trainer.accumulate=2"))
    with pytest.raises(UserError, match="saved with optim.no_decay_norm_bias=False, this run has .*=True"):
        resume.plan(tmp_path, composed("optim.no_decay_norm_bias=true"))
    # A schedule-less run may change its length.
    assert resume.plan(tmp_path, composed("trainer.batch_size=64")).action == "continue"
    # Past its epochs: finished once its status says so, with any setting that trains nothing differently.
    save_checkpoint(tmp_path, cfg, epoch=3, step=0)
    assert resume.plan(tmp_path, cfg).action == "continue"  # killed before it closed: it finishes
    (tmp_path / "status").write_text("finished\n")
    assert resume.plan(tmp_path, composed("device=cpu", "trainer.epochs=1")).action == "finished"
    with pytest.raises(UserError, match="finished with other settings"):
        resume.plan(tmp_path, composed("seed=1"))
    with pytest.raises(UserError, match="leaves nothing to train"):
        resume.plan(tmp_path / "elsewhere", composed(f"trainer.resume={last}"))


class Recorder(Callback):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def before_optimizer_step(self, step, optimizer, scaler):
        grads = [p.grad is not None for p in optimizer.param_groups[0]["params"]]
        self.calls.append((self.name, "before_optimizer_step", step, all(grads)))

    def after_step(self, step, loss):
        self.calls.append((self.name, "after_step", step, loss.dim() == 0))


def test_callbacks_run_in_the_documented_order():
    torch.manual_seed(0)
    split = TensorSplit(torch.randint(0, 256, (12, 1, 4, 4), dtype=torch.uint8), torch.randint(0, 2, (12,)))
    loader = DeviceLoader(split, 4, Normalizer(torch.zeros(1), torch.ones(1), torch.device("cpu")), shuffle=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    runtime = device_setup.resolve(composed("device=cpu", "device.precision=fp32").device)
    calls = []
    train_epoch(model, loader, optimizer, scheduler, runtime.grad_scaler(), runtime, 1,
                RunningTotals(torch.device("cpu")), 1, [Recorder("a", calls), Recorder("b", calls)])
    assert calls == [(name, hook, step, True) for step in (1, 2)
                     for hook in ("before_optimizer_step", "after_step") for name in "ab"]
