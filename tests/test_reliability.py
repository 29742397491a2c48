"""Checkpoints and resume: a run killed (SIGKILL) or stopped (SIGTERM) anywhere and resumed ends
bit-identical to one that never stopped; checkpoint writes are atomic; signals and a diverged
loss stop training cleanly."""

import contextlib
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from PIL import Image

from resnet_lab import rundir
from resnet_lab.errors import UserError
from resnet_lab.preemption import Stopped, StopSignals
from resnet_lab.training import checkpoint
from resnet_lab.training.checkpoint import Checkpointer
from resnet_lab.training.engine import RunningTotals
from resnet_lab.training.tracking import Tracker
from resnet_lab.training.train import train
from resnet_lab.trained import evaluate as evaluate_command
from tests import runs
from tests.runs import contents, epochs, for_kind, freeze_at, fresh_env, start, stop_at
from tests.test_cli import run_cli
from tests.wandb_file import history, read_run

EPOCHS, STEPS, EVERY = 3, 6, 3
TINY = [*runs.TINY, "trainer.deterministic=true",
        f"trainer.epochs={EPOCHS}", f"trainer.limit_train_batches={STEPS}",
        f"trainer.checkpoint_every_steps={EVERY}"]
TIMINGS = ("seconds", "images_per_s")


def tiny_cfg(*overrides):
    with initialize_config_module("resnet_lab.conf", version_base="1.3"):
        return compose("config", overrides=for_kind([*TINY, *overrides]))


def outcome(run_dir: Path):
    """What a finished run leaves: its metrics rows without the timings, and its final weights."""
    rows = runs.metrics(run_dir)
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows], torch.load(run_dir / "model.pt")


def assert_same_outcome(a, b) -> None:
    (rows_a, weights_a), (rows_b, weights_b) = a, b
    assert rows_a == rows_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


@pytest.fixture(scope="module")
def reference(fmnist_root, tmp_path_factory):
    """The uninterrupted run, without mid-epoch checkpoints."""
    run_dir = tmp_path_factory.mktemp("reference")
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.checkpoint_every_steps=0"), run_dir)
    result = outcome(run_dir)
    assert [row["epoch"] for row in result[0]] == [1, 2, 3]
    return result


def killed_at(args, run_dir: Path, target):
    """Start a run, SIGKILL it at its first checkpoint at or past target; that (epoch, step)."""
    proc = start(args, run_dir)
    try:
        return freeze_at(proc, run_dir, target)
    finally:
        proc.kill()
        proc.wait()


def test_sigkill_after_an_epoch_and_mid_epoch_then_resume_is_bit_exact(fmnist_root, tmp_path, reference, caplog):
    run_dir = tmp_path / "run"
    args = [f"dataset.root={fmnist_root}", *TINY]
    # Killed right after epoch 1's checkpoint (the only one: the whole of epoch 2 to catch it) ...
    proc = start([*args, "trainer.checkpoint_every_steps=0"], run_dir)
    try:
        assert freeze_at(proc, run_dir, (2, 0)) == (2, 0)
    finally:
        proc.kill()
        proc.wait()
    killed = proc.pid
    # ... the command again (a requeued job) takes over the dead run's lock, continues from
    # there, and is killed mid-epoch 2 ...
    epoch, step = killed_at([*args, "trainer.checkpoint_every_steps=1"], run_dir, (2, 1))
    assert epoch == 2 and 0 < step < STEPS
    log = (tmp_path / "run.log").read_text()
    assert "resuming from" in log
    taken = [line for line in log.splitlines() if "ended without releasing it" in line]
    assert len(taken) == 1 and f"(pid {killed} on host " in taken[0] and "taking it over" in taken[0]
    # ... and once more, to the end: every epoch once in metrics.jsonl, the same numbers, the same weights.
    with caplog.at_level("INFO", logger="resnet_lab"):
        assert train(tiny_cfg(f"dataset.root={fmnist_root}"), run_dir) == reference[0][-1]["test_acc"]
    assert_same_outcome(outcome(run_dir), reference)
    # The killed parts' W&B service wrote little or nothing of their records; over the three
    # parts' offline folders each epoch's row is there once, and the sync line names all three.
    parts = sorted(run_dir.glob("wandb/offline-run-*"))
    run_id = torch.load(rundir.last(run_dir), weights_only=True)["wandb_run_id"]
    logged = sorted((row["epoch"], row["global_step"], row["test/acc"]) for part in parts
                    for row in history(part / f"run-{run_id}.wandb") if "epoch" in row)
    assert logged == [(row["epoch"], row["epoch"] * STEPS, row["test_acc"]) for row in runs.metrics(run_dir)]
    synced = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(parts) == 3 and synced == [f"W&B run saved offline; upload it with: wandb sync {' '.join(map(str, parts))}"]


# Every training feature with state or randomness of its own: an EMA (with warm-up), updates of
# 2 batches, clipping (its epoch's mean norm is in the rows), Mixup and CutMix, per-image
# augmentation and erasing, stochastic depth.
RECIPE = ["trainer.accumulate=2", "ema.decay=0.9", "ema.warmup=true", "optim.clip_grad_norm=0.5",
          "dataset.mixup_alpha=0.4", "dataset.cutmix_alpha=1.0", "dataset.auto_augment=trivial",
          "dataset.erase_prob=0.5", "model.drop_path=0.2", "trainer.epochs=2"]


def test_a_recipe_run_killed_mid_epoch_resumes_to_the_metrics_of_one_never_stopped(fmnist_root, tmp_path):
    args = [f"dataset.root={fmnist_root}", *TINY, *RECIPE]
    reference_dir = tmp_path / "reference"
    train(tiny_cfg(*args, "trainer.checkpoint_every_steps=0"), reference_dir)
    run_dir = tmp_path / "run"
    epoch, step = killed_at([*args, "trainer.checkpoint_every_steps=1"], run_dir, (2, 1))
    assert epoch == 2 and 0 < step < STEPS and step % 2 == 0  # checkpoints fall between updates
    train(tiny_cfg(*args), run_dir)
    rows, _ = outcome(run_dir)
    assert {"test_acc_ema", "grad_norm"} <= rows[-1].keys()
    assert_same_outcome(outcome(run_dir), outcome(reference_dir))


def test_two_runs_started_together_in_one_folder_one_trains_the_other_is_refused(fmnist_root, tmp_path,
                                                                                 reference):
    run_dir = tmp_path / "run"
    lock = run_dir / rundir.LOCK
    common = [f"dataset.root={fmnist_root}", *TINY, "trainer.checkpoint_every_steps=0", "logger=none",
              f"hydra.run.dir={run_dir}"]
    # Two seeds: a run that took over the other's checkpoints or record would show it.
    procs = {seed: subprocess.Popen([sys.executable, "-m", "resnet_lab", *common, f"seed={seed}"], cwd=tmp_path,
                                    env=fresh_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for seed in (0, 1)}
    try:
        # Whichever takes the folder is held there until the other has given up.
        deadline = time.monotonic() + 300
        # The holder writes its record into the locked file: wait until it is whole.
        while not rundir._holder(lock):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values())
            time.sleep(0.003)
        holder = json.loads(lock.read_text())["pid"]
        os.kill(holder, signal.SIGSTOP)
        winner = next(seed for seed, p in procs.items() if p.pid == holder)
        loser = procs[1 - winner]
        err = loser.communicate(timeout=300)[1].decode()
        os.kill(holder, signal.SIGCONT)
        assert procs[winner].wait(timeout=300) == 0
    finally:
        for proc in procs.values():
            proc.kill()
            proc.communicate()
    assert loser.returncode == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: run folder {run_dir} is in use by another run (pid {holder} on host ")
    assert "started " in line and "hydra.run.dir" in line
    # The folder is the winner's alone: its record, and a lone run's metrics and weights.
    overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert f"seed={winner}" in overrides and f"seed={1 - winner}" not in overrides
    names = sorted(p.name for p in (run_dir / rundir.CHECKPOINTS).iterdir())
    # The finished run keeps the last checkpoint's weights file alone (no previous.pt any more).
    assert names[:2] == ["hydra", rundir.LAST] and len(names) == 3
    assert names[2].startswith(rundir.WEIGHTS_PREFIX)
    assert not lock.exists()
    lone = reference
    if winner == 1:
        lone_dir = tmp_path / "lone"
        lone_dir.mkdir()
        train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.checkpoint_every_steps=0", "seed=1"), lone_dir)
        lone = outcome(lone_dir)
    assert_same_outcome(outcome(run_dir), lone)


def write_image_folder(root: Path, classes: int = 3, per_class: int = 30) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            colour = (c * 100, i * 8, (c * 37 + i * 11) % 256)
            Image.new("RGB", (12, 12), colour).save(root / f"c{c}" / f"{i}.png")
    return root


def test_sigterm_to_the_job_mid_epoch_stops_cleanly_and_resumes_exactly(tmp_path):
    # image_folder decoding while training has loader workers: the SIGTERM a scheduler sends to
    # every process of the job must not kill them under the main process's last step.
    images = write_image_folder(tmp_path / "images")
    args = [f"dataset.root={images}", "dataset=image_folder", *TINY, "trainer.batch_size=9",
            "trainer.limit_train_batches=0", "trainer.epochs=1", "dataset.cache=false"]
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    train(tiny_cfg(*args, "dataset.num_workers=0", "trainer.checkpoint_every_steps=0"), reference_dir)

    run_dir = tmp_path / "run"
    proc = start([*args, "dataset.num_workers=2", "trainer.checkpoint_every_steps=1"], run_dir,
                 start_new_session=True)
    try:
        assert stop_at(proc, run_dir, (1, 1), group=True) == 143
    finally:
        proc.kill()
    log = (tmp_path / "run.log").read_text()
    assert "SIGTERM: stopped at epoch 1 step" in log and "Traceback" not in log
    state = torch.load(rundir.last(run_dir), weights_only=True)
    assert state["epoch"] == 1 and 0 < state["step"] < 9 and state["totals"]["seen"] == 9 * state["step"]
    assert not (run_dir / "metrics.jsonl").exists()
    # The W&B run is closed with the signal's status, and the folder says it was stopped.
    stopped = read_run(run_dir)
    assert stopped.exit_code == 143 and stopped.run.run_id == state["wandb_run_id"]
    assert (run_dir / "status").read_text() == "stopped\n"
    assert not (run_dir / rundir.LOCK).exists()  # released: the resume takes over nothing

    train(tiny_cfg(*args, "dataset.num_workers=0"), run_dir)
    assert_same_outcome(outcome(run_dir), outcome(reference_dir))
    assert (run_dir / "status").read_text() == "finished\n"
    resumed = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(resumed) == 2 and all(f.stem == f"run-{state['wandb_run_id']}" for f in resumed)


class FullDisk:
    """A file on a disk that fills up after `room` bytes."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            self.f.write(bytes(data[:self.room]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(fmnist_root, tmp_path, monkeypatch, reference):
    writes = []

    def open_on_full_disk(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        if Path(path).name == f".{rundir.LAST}.tmp":
            writes.append(path)
            if len(writes) == 2:  # the first checkpoint succeeds, the disk fills during the second
                return FullDisk(f, room=10_000)
        return f

    monkeypatch.setattr(rundir, "open", open_on_full_disk, raising=False)
    cfg = tiny_cfg(f"dataset.root={fmnist_root}")
    with pytest.raises(UserError, match="No space left on device.*the previous last.pt is intact; free some space, then run again"):
        train(cfg, tmp_path)
    last = tmp_path / rundir.CHECKPOINTS / rundir.LAST
    # No temporary file left, nor the failed checkpoint's weights: last.pt, kept as previous.pt
    # before the write that failed, and the weights it names.
    state = checkpoint.load(last)
    assert sorted(p.name for p in last.parent.iterdir()) == [rundir.LAST, rundir.PREVIOUS, state["weights_file"].name]
    assert (last.parent / rundir.PREVIOUS).samefile(last)
    assert (state["epoch"], state["step"]) == (1, EVERY)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    # The failed write came at epoch 1's end, after its metrics row; the resumed run writes that
    # epoch again, once.
    assert epochs(tmp_path) == [1]

    monkeypatch.undo()
    train(cfg, tmp_path)
    assert_same_outcome(outcome(tmp_path), reference)


def test_disk_full_while_writing_model_pt_leaves_no_partial_file(fmnist_root, tmp_path, monkeypatch, capsys):
    def open_on_full_disk(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return FullDisk(f, room=50_000) if Path(path).name == ".model.pt.tmp" else f

    run_dir = tmp_path / "run"
    args = [f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1", "logger=none", f"hydra.run.dir={run_dir}"]
    with monkeypatch.context() as patch:
        patch.setattr(rundir, "open", open_on_full_disk, raising=False)
        without_hard_links(patch)
        code, err = run_cli(args, tmp_path, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line == (f"error: could not write {run_dir / 'model.pt'} (No space left on device); no model.pt was "
                    f"written; free some space, then run again to write it from {rundir.LAST}")
    assert not (run_dir / "model.pt").exists() and not list(run_dir.glob(".*.tmp"))
    assert (run_dir / "status").read_text() == "failed\n"
    # The same settings again write it from the finished checkpoint, without training.
    train(tiny_cfg(*args[:-1]), run_dir)
    assert epochs(run_dir) == [1] and (run_dir / "status").read_text() == "finished\n"
    weights = torch.load(run_dir / "model.pt", weights_only=True)
    saved = checkpoint.load(rundir.last(run_dir))["model"]
    assert all(torch.equal(weights[k], saved[k]) for k in saved)


def without_hard_links(patch) -> None:
    """A file system without hard links: best.pt and model.pt are then written as copies."""
    def refuse(*args, **kw):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    patch.setattr(checkpoint.os, "link", refuse)


def test_a_really_full_file_system_at_the_second_checkpoint_keeps_the_first(fmnist_root, tmp_path, tiny_tmpfs):
    args = [f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=2", "trainer.checkpoint_every_steps=0",
            "logger=none"]
    sizes = tmp_path / "sizes"
    sizes.mkdir()
    train(tiny_cfg(*args), sizes)
    checkpoint_size = (sizes / rundir.CHECKPOINTS / rundir.LAST).stat().st_size
    # Room for one checkpoint (last.pt and its weights) and the small files, and half of the
    # next checkpoint's weights: the first checkpoint goes in, the second does not.
    weights_size = (sizes / "model.pt").stat().st_size
    run_dir = tiny_tmpfs(checkpoint_size + weights_size + 64_000 + weights_size // 2) / "run"
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", *args, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True, cwd=tmp_path, env=fresh_env(), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: could not write {run_dir / rundir.CHECKPOINTS}/{rundir.WEIGHTS_PREFIX}")
    assert "(No space left on device)" in line and line.endswith("free some space, then run again to resume")
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "checkpoints", "metrics.jsonl", "runtime.json",
                                                         "status", "train.log"]
    assert checkpoint.load(rundir.last(run_dir))["epoch"] == 2


def test_disk_full_at_best_pt_says_last_pt_was_written(fmnist_root, tmp_path, monkeypatch):
    def open_on_full_disk(path, mode="r", *args, **kw):
        f = open(path, mode, *args, **kw)
        return FullDisk(f, room=10_000) if Path(path).name == f".{rundir.BEST}.tmp" else f

    monkeypatch.setattr(rundir, "open", open_on_full_disk, raising=False)
    without_hard_links(monkeypatch)
    with pytest.raises(UserError) as failed:
        train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=1", "trainer.checkpoint_every_steps=0",
                       "dataset.val_fraction=0.2"), tmp_path)
    assert str(failed.value).endswith(f"{rundir.BEST} (No space left on device); no {rundir.BEST} was "
                                      f"written; free some space; {rundir.LAST} was written: run again to resume")
    assert checkpoint.load(tmp_path / rundir.CHECKPOINTS / rundir.LAST)["epoch"] == 2


def test_metrics_and_status_on_a_full_disk_are_left_whole(tmp_path, monkeypatch):
    from resnet_lab.rundir import write_status
    from resnet_lab.training.tracking import MetricsFile

    rows = MetricsFile(tmp_path)
    rows.write({"epoch": 1, "test_acc": 0.5})
    write_status(tmp_path, "running")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(rundir, "open", lambda path, mode="r": FullDisk(open(path, mode), room=3),
                        raising=False)
    with pytest.raises(UserError, match=r"metrics.jsonl \(No space left on device\); the previous metrics.jsonl "
                                        r"is intact; free some space$"):
        rows.write({"epoch": 2, "test_acc": 0.6})
    with pytest.raises(UserError, match="status .*the previous status is intact"):
        write_status(tmp_path, "finished")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_finished_run_run_again_returns_at_once_and_more_epochs_extend_it(fmnist_root, tmp_path, reference):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    root = f"dataset.root={fmnist_root}"
    final = train(tiny_cfg(root, "trainer.epochs=2"), run_dir)
    finished = read_run(run_dir)
    before = contents(run_dir)
    assert {"model.pt", "metrics.jsonl", "status"} <= set(before) and finished.exit_code == 0
    # The same command again in a fresh process (a requeued sweep job): one line, exit 0 ...
    proc = subprocess.run([sys.executable, "-m", "resnet_lab", root, *TINY, "trainer.epochs=2",
                           f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=fresh_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"this run has finished its 2 epochs, final test acc {final:.4f}: "
                                        f"nothing to train (set trainer.epochs above 2 to train it further)"]
    # ... and the run's files as they were: model.pt, metrics.jsonl, status, checkpoints, and its
    # one W&B run (no new run, no resumed one, its summary's total_seconds kept).
    assert contents(run_dir) == before
    assert read_run(run_dir).summary == finished.summary and finished.summary["total_seconds"] > 0
    # The objective a sweeper gets is the stored final test accuracy, also for fewer epochs.
    for epochs_now in (2, 1):
        assert train(tiny_cfg(root, f"trainer.epochs={epochs_now}"), run_dir) == final
    # Other settings would train another run: its result is not theirs (a sweep rerun into the
    # same folder with new values must not hand its sweeper the old accuracies).
    with pytest.raises(UserError, match=r"finished with other settings \(optim.lr=0.5 \(checkpoint: 0.001\)\)"):
        train(tiny_cfg(root, "trainer.epochs=2", "optim.lr=0.5"), run_dir)
    assert contents(run_dir) == before
    # A run killed after its last checkpoint, before model.pt and the end of its W&B run, writes them.
    kept = outcome(run_dir)
    (run_dir / "model.pt").unlink()
    (run_dir / "status").write_text("running\n")
    assert train(tiny_cfg(root, "trainer.epochs=2"), run_dir) == final
    assert_same_outcome(outcome(run_dir), kept)
    assert (run_dir / "status").read_text() == "finished\n"
    # More epochs in the same folder train on, in the same W&B run, as if it had never stopped.
    train(tiny_cfg(root, "trainer.epochs=3"), run_dir)
    assert_same_outcome(outcome(run_dir), reference)
    assert (run_dir / "status").read_text() == "finished\n"
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 3 and {f.name for f in runs} == {f"run-{finished.run.run_id}.wandb"}


def test_a_diverging_sweep_job_fails_alone_and_keeps_its_last_good_checkpoint(fmnist_root, tmp_path,
                                                                              monkeypatch, capsys):
    # The step schedule multiplies the learning rate by 1e33 halfway: job 0 diverges in epoch 2.
    code, err = run_cli(["-m", f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=2",
                         "trainer.limit_train_batches=4", "trainer.checkpoint_every_steps=0",
                         "sched=step", "sched.milestones=[0.5]", "sched.gamma=1e33,0.1",
                         f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path, monkeypatch, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: the training loss became NaN or inf at epoch 2 step ")
    assert "lower optim.lr" in last and "last good checkpoint" in last
    diverged, fine = tmp_path / "sweep" / "0", tmp_path / "sweep" / "1"
    assert epochs(diverged) == [1]
    state = checkpoint.load(diverged / rundir.CHECKPOINTS / rundir.LAST)
    assert (state["epoch"], state["step"]) == (2, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (diverged / "model.pt").exists()
    # The sweep went on: job 1 ran to the end.
    assert epochs(fine) == [1, 2]
    assert (fine / "model.pt").exists()


def test_running_totals_remember_the_first_non_finite_step():
    totals = RunningTotals(torch.device("cpu"))
    logits, y = torch.tensor([[2.0, 1.0], [0.0, 1.0]]), torch.tensor([0, 0])
    for step, loss in enumerate([1.0, 3.0, math.nan, math.inf, 2.0]):
        totals.add(step, torch.tensor(loss), logits, y)
        assert totals.bad_step() == (None if step < 2 else 2)
    restored = RunningTotals.from_state_dict(totals.state_dict(), torch.device("cpu"))
    assert restored.bad_step() == 2 and restored.seen == 10 and restored.correct.item() == 5


def test_signals_ask_for_a_stop_and_a_second_ctrl_c_interrupts_at_once():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler repeating itself changes nothing
        assert signals.signum == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    # A multirun runs its jobs in one process: the handlers are put back.
    assert {s: signal.getsignal(s) for s in before} == before


def test_checkpoint_holds_what_the_issue_lists(fmnist_root, tmp_path):
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=1", "trainer.limit_train_batches=2",
                   "optim=sgd", "sched=onecycle", "dataset.val_fraction=0.2"), tmp_path)
    state = checkpoint.load(tmp_path / rundir.CHECKPOINTS / rundir.LAST)
    assert set(state) == {"epoch", "step", "model", "optimizer", "scheduler", "scaler", "totals", "best_acc",
                          "best_epoch", "metrics", "rng", "rng_ranks", "config", "wandb_run_id", "elapsed",
                          "weights_file", "features", "classes"}
    # The weights are read from their own file, which best.pt (the best weights alone) links to.
    assert state["weights_file"].name.startswith(rundir.WEIGHTS_PREFIX)
    assert state["weights_file"].samefile(tmp_path / rundir.CHECKPOINTS / rundir.BEST)
    assert state["features"] == {}  # no feature with a state of its own (an EMA) is on
    assert state["elapsed"] > 0
    assert state["rng_ranks"] == []  # one rank: its random state is "rng"
    assert (state["epoch"], state["step"], state["totals"]) == (2, 0, None)
    assert set(state["rng"]) == {"python", "numpy", "torch"}
    assert state["config"]["optim"]["name"] == "sgd"
    # The W&B run this checkpoint belongs to, so a resume continues that run.
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{state['wandb_run_id']}"))
    assert state["scheduler"]["last_epoch"] == 2 and state["optimizer"]["state"]
    assert state["best_acc"] == state["metrics"]["val_acc"] and state["best_epoch"] == 1
    assert state["classes"][:2] == ["T-shirt/top", "Trouser"]  # what evaluate holds another data set to


@pytest.mark.parametrize("ending", ["stopped", "finished", "failed"])
def test_submitit_requeues_only_a_run_that_stopped_for_its_signal(ending, monkeypatch):
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    requeued = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))
    try:
        with pytest.raises((Stopped, UserError)) if ending != "finished" else contextlib.nullcontext():
            with StopSignals() as signals:
                os.kill(os.getpid(), signal.SIGUSR2)
                assert signals.signum == signal.SIGUSR2
                if ending == "stopped":
                    raise Stopped(signals.signum)
                if ending == "failed":
                    raise UserError("the loss became NaN")
        # submitit's handler (here: the recorder) runs only for the stop the signal asked for.
        assert requeued == ([signal.SIGUSR2] if ending == "stopped" else [])
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_a_new_folder_resumed_from_another_runs_checkpoint_gets_its_own_wandb_run(fmnist_root, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=1", "trainer.limit_train_batches=2"), first)
    start_from = first / rundir.CHECKPOINTS / rundir.LAST
    first_id = checkpoint.load(start_from)["wandb_run_id"]
    # A new folder with no more epochs than the run trained would train nothing: refused, untouched.
    with pytest.raises(UserError, match=r"trainer.resume=.*last.pt: that run has trained 1 epochs and "
                                        r"trainer.epochs=1 leaves nothing to train; set trainer.epochs above 1"):
        train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=1", "trainer.limit_train_batches=2",
                       f"trainer.resume={start_from}"), second)
    assert not list(second.iterdir())
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=2", "trainer.limit_train_batches=2",
                   f"trainer.resume={start_from}"), second)
    second_id = checkpoint.load(second / rundir.CHECKPOINTS / rundir.LAST)["wandb_run_id"]
    assert second_id and second_id != first_id
    assert read_run(second).run.run_id == second_id
    assert epochs(second) == [2]  # it continued training from the first run's epoch 1


def test_a_resumed_run_counts_the_seconds_of_every_part(fmnist_root, tmp_path):
    last = tmp_path / rundir.CHECKPOINTS / rundir.LAST
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=4", "logger=none"), tmp_path)
    first = torch.load(last, weights_only=True)["elapsed"]
    began = time.perf_counter()
    train(tiny_cfg(f"dataset.root={fmnist_root}", "trainer.epochs=5", "logger=none"), tmp_path)
    part = time.perf_counter() - began
    # The first part's seconds carry over (alone, the one-epoch second part would count fewer).
    assert 0 < first < torch.load(last, weights_only=True)["elapsed"] <= first + part


@pytest.mark.parametrize("saved_fused, fused", [(None, True), (True, None)], ids=["into-fused", "from-fused"])
def test_a_checkpoint_resumes_fused_or_not_as_this_device_builds(saved_fused, fused, tmp_path):
    # CUDA builds fused optimizers and the CPU unfused ones; torch fuses on the CPU too, so both
    # directions run here, under an fp16 grad scaler, which steps fused optimizers differently.
    def parts(fused_now):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused_now)
        scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
        scaler = torch.amp.GradScaler("cpu", enabled=True)
        cfg = tiny_cfg("optim=adam")
        return model, optimizer, Checkpointer(tmp_path, cfg, model, optimizer, scheduler, scaler, torch.device("cpu"))

    def step(model, optimizer, scaler):
        model(torch.ones(3, 4)).sum().mul(scaler.scale(torch.ones(()))).backward()
        scaler.step(optimizer)
        scaler.update()

    model, optimizer, saving = parts(saved_fused)
    step(model, optimizer, saving.scaler)
    saving.save(1, 1, totals=None, best_acc=0.0, metrics={}, wandb_run_id=None, elapsed=1.0)
    model, optimizer, restoring = parts(fused)
    restoring.restore(checkpoint.load(tmp_path / rundir.CHECKPOINTS / rundir.LAST), tmp_path)
    assert optimizer.param_groups[0]["fused"] is fused
    before = [p.detach().clone() for p in model.parameters()]
    step(model, optimizer, restoring.scaler)  # an AssertionError inside torch, were the flags mixed
    assert all(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))


def test_ctrl_c_mid_epoch_writes_last_pt_and_exits_130(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = start([f"dataset.root={fmnist_root}", *TINY, "trainer.checkpoint_every_steps=1", "logger=none"], run_dir)
    try:
        assert stop_at(proc, run_dir, (1, 1), signal.SIGINT) == 130
    finally:
        proc.kill()
    state = torch.load(rundir.last(run_dir), weights_only=True)
    assert state["epoch"] == 1 and state["step"] >= 1 and (run_dir / "status").read_text() == "stopped\n"
    log = (tmp_path / "run.log").read_text()
    assert "SIGINT: stopped at epoch 1 step" in log and "Traceback" not in log


def test_changed_optimizer_settings_on_resume_are_what_runs_and_the_schedule_follows(fmnist_root, tmp_path,
                                                                                   caplog):
    args = [f"dataset.root={fmnist_root}", *TINY, "sched=cosine", "logger=none"]
    new = ["optim.lr=1e-2", "optim.weight_decay=0.01", "optim.betas=[0.8,0.99]"]
    reference_dir = tmp_path / "reference"
    train(tiny_cfg(*args, *new, "trainer.checkpoint_every_steps=0"), reference_dir)
    run_dir = tmp_path / "run"
    assert killed_at(args, run_dir, (1, EVERY)) == (1, EVERY)
    with caplog.at_level("INFO", logger="resnet_lab"):
        train(tiny_cfg(*args, *new), run_dir)
    # Every epoch's learning rate is the new run's schedule at that point, not the old one's.
    logged = [row["lr"] for row in runs.metrics(run_dir)]
    assert logged == pytest.approx([row["lr"] for row in runs.metrics(reference_dir)], rel=1e-6)
    assert logged[0] > 2e-3  # the old schedule at 1e-3 never goes above 1e-3
    group = torch.load(rundir.last(run_dir), weights_only=True)["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"], group["betas"]) == (1e-2, 0.01, (0.8, 0.99))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("optimizer settings applied")]
    assert said == [f"optimizer settings applied from epoch 1 step {EVERY} on, the schedule rescaled to them: "
                    f"optim.betas=[0.8, 0.99] (checkpoint: [0.9, 0.999]); optim.lr=0.01 (checkpoint: 0.001); "
                    f"optim.weight_decay=0.01 (checkpoint: 0.0)"]


class Killed(BaseException):
    """A SIGKILL at a chosen line: the process ends there, with nothing after it run."""


def killed_in(monkeypatch, owner, name, when=lambda *args: True):
    """Make owner.name end the run (Killed) the first time `when(*its args)` holds."""
    original = getattr(owner, name)

    def kill(*args, **kw):
        if when(*args, **kw):
            monkeypatch.setattr(owner, name, original)
            raise Killed
        return original(*args, **kw)

    monkeypatch.setattr(owner, name, kill)


def test_a_kill_between_last_pt_and_best_pt_is_repaired_on_resume(fmnist_root, tmp_path, monkeypatch):
    args = [f"dataset.root={fmnist_root}", "trainer.epochs=2", "trainer.checkpoint_every_steps=0",
            "dataset.val_fraction=0.2", "logger=none"]
    run_dir = tmp_path / "run"
    # Killed once epoch 2's last.pt names it the best epoch, before best.pt follows it.
    killed_in(monkeypatch, Checkpointer, "publish",
              lambda self, target, after: target.name == rundir.BEST and self.weights is not None
              and torch.load(rundir.last(run_dir), weights_only=True)["epoch"] == 3)
    with pytest.raises(Killed):
        train(tiny_cfg(*args), run_dir)
    saved = torch.load(rundir.last(run_dir), weights_only=True)
    assert saved["best_epoch"] == 2
    best_weights = torch.load(run_dir / "checkpoints" / saved["model"], weights_only=True)
    stale = torch.load(run_dir / "checkpoints" / rundir.BEST, weights_only=True)  # epoch 1's
    assert not all(torch.equal(stale[k], best_weights[k]) for k in stale)
    train(tiny_cfg(*args), run_dir)
    best = torch.load(run_dir / "checkpoints" / rundir.BEST, weights_only=True)
    assert all(torch.equal(best[k], best_weights[k]) for k in best_weights)


def test_a_kill_before_the_final_report_is_repaired_on_resume(fmnist_root, tmp_path, monkeypatch):
    args = [f"dataset.root={fmnist_root}", "trainer.epochs=1", "trainer.checkpoint_every_steps=0", "logger=none"]
    run_dir = tmp_path / "run"
    killed_in(monkeypatch, Tracker, "final_report")
    with pytest.raises(Killed):
        train(tiny_cfg(*args), run_dir)
    assert not (run_dir / rundir.EVAL / rundir.FINAL).exists()
    train(tiny_cfg(*args), run_dir)
    report = json.loads((run_dir / rundir.EVAL / rundir.FINAL).read_text())
    matrix = torch.tensor(report["confusion_matrix"])
    assert report["classes"][0] == "T-shirt/top" and matrix.sum() == 80
    assert matrix.trace().item() / matrix.sum().item() == runs.metrics(run_dir)[-1]["test_acc"]
    assert (run_dir / rundir.STATUS).read_text() == "finished\n"


def test_the_temporary_files_of_a_kill_mid_write_are_gone_after_the_rerun(fmnist_root, tmp_path):
    args = [f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1", "trainer.checkpoint_every_steps=0",
            "logger=none"]
    run_dir = tmp_path / "run"
    # Killed with a weights file written under its temporary name (each one's name is new) ...
    runs.killed_at_rename(".weights-*.pt.tmp", args, run_dir)
    [weights] = (run_dir / rundir.CHECKPOINTS).glob(".weights-*.pt.tmp")
    # ... then, the command again, with model.pt's hard link made but not yet renamed over it ...
    runs.killed_at_rename(".model.pt.link", args, run_dir)
    assert not weights.exists() and (run_dir / ".model.pt.link").is_file()
    # ... and once more, to the end, writing no model.pt: nothing temporary stays.
    train(tiny_cfg(*args, "trainer.save_weights=false"), run_dir)
    assert (run_dir / rundir.STATUS).read_text() == "finished\n"
    assert not [path for path in run_dir.rglob(".*") if path.suffix in (".tmp", ".link")]


def test_a_damaged_last_pt_resumes_from_the_checkpoint_kept_before_it(fmnist_root, tmp_path, reference, caplog):
    run_dir = tmp_path / "run"
    args = [f"dataset.root={fmnist_root}", *TINY, "logger=none"]
    assert killed_at(args, run_dir, (EPOCHS, EVERY)) == (EPOCHS, EVERY)
    folder = run_dir / rundir.CHECKPOINTS
    last, previous = folder / rundir.LAST, folder / rundir.PREVIOUS
    assert (checkpoint.load(previous)["epoch"], checkpoint.load(previous)["step"]) == (EPOCHS, 0)
    # Each keeps a weights file of its own (the kill may leave an older one, which the next goes).
    named = {checkpoint.load(path)["weights_file"].name for path in (last, previous)}
    assert named <= {path.name for path in folder.glob(f"{rundir.WEIGHTS_PREFIX}*")} and len(named) == 2
    # A copy with both damaged: nothing is good to resume from, one line naming last.pt.
    both = tmp_path / "both"
    shutil.copytree(run_dir, both)
    runs.damage_in_middle(both / rundir.CHECKPOINTS / rundir.LAST)
    runs.damage_in_middle(both / rundir.CHECKPOINTS / rundir.PREVIOUS)
    with pytest.raises(checkpoint.Damaged) as refused:
        train(tiny_cfg(*args), both)
    assert str(refused.value).startswith(f"checkpoint {both / rundir.CHECKPOINTS / rundir.LAST} is damaged (record ")
    assert "\n" not in str(refused.value)
    # Evaluated, it says the same in words for evaluation: no advice to resume.
    with pytest.raises(UserError) as refused:
        evaluate_command.main([str(both)])
    assert str(refused.value).startswith(f"checkpoint {both / rundir.CHECKPOINTS / rundir.LAST} is damaged (record ")
    assert str(refused.value).endswith("; give checkpoint=<path>") and "trainer.resume" not in str(refused.value)
    runs.damage_in_middle(last)
    # Evaluating the last weights of the run, as resuming it, takes those kept before a damaged last.pt.
    peek = tmp_path / "peek"
    shutil.copytree(run_dir, peek)
    with caplog.at_level("WARNING", logger="resnet_lab"):
        evaluated = evaluate_command.main([str(peek)])
    kept = peek / rundir.CHECKPOINTS / rundir.PREVIOUS
    assert evaluated["weights"] == str(kept) and 0 <= evaluated["accuracy"] <= 1
    said = [r.getMessage() for r in caplog.records if "kept before it" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(f"; using the checkpoint kept before it, {kept} (epoch {EPOCHS} step 0)")
    caplog.clear()
    with caplog.at_level("WARNING", logger="resnet_lab"):
        train(tiny_cfg(*args), run_dir)
    said = [r.getMessage() for r in caplog.records if "kept before it" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"checkpoint {last} is damaged (record ")
    assert said[0].endswith(f"; resuming from the checkpoint kept before it, {previous} (epoch {EPOCHS} step 0)")
    # The last epoch's first half trained again: the run ends as one never damaged, and, finished,
    # keeps no checkpoint before the last.
    assert_same_outcome(outcome(run_dir), reference)
    assert not previous.exists()
