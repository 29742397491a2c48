"""Data-parallel training on the CPU with gloo: 2 ranks learn what 1 rank learns, every way of
starting ranks gives one run (one folder, one metrics.jsonl, one W&B run), a DDP checkpoint
resumes in one process, and a submitit_local sweep is preempted, requeued and resumed."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from resnet_lab import device as device_setup
from resnet_lab import distributed, rundir
from resnet_lab.__main__ import one_run_folder
from resnet_lab.config import validate
from resnet_lab.data import build_data
from resnet_lab.errors import UserError
from resnet_lab.optim import build_optimizer, build_scheduler
from resnet_lab.trained import evaluate as evaluate_command
from resnet_lab.training.engine import RunningTotals, evaluate, train_epoch
from resnet_lab.training.train import train
from resnet_lab.training.trainer import updates
from tests import runs
from tests.runs import epochs, freeze_at, fresh_env, metrics, start, stop_at
from tests.test_reliability import tiny_cfg
from tests.test_train import tiny_cfg as train_cfg
from tests.wandb_file import read_run

TINY = [*runs.TINY, "trainer.checkpoint_every_steps=0",
        "optim=sgd", "optim.lr=0.05"]


def shards(world_size: int, *overrides):
    """Each rank's train and test batches (epoch 1), on the synthetic data with flip_crop."""
    cfg = tiny_cfg("dataset=synthetic", "dataset.augment=flip_crop", *overrides)
    out = []
    for rank in range(world_size):
        data = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), cfg.seed, rank=rank,
                          world_size=world_size)
        out.append((list(data.train.batches(1)), list(data.test.batches(0))))
    return out


def test_ranks_split_each_global_batch_augmentation_included():
    # 99 images in batches of 32: the last global batch (3 images) splits 2 + 1.
    sizes = ["dataset.train_size=99", "dataset.test_size=37", "trainer.eval_batch_size=16"]
    (one_train, one_test), = shards(1, *sizes)
    two = shards(2, *sizes)
    for split, one in ((0, one_train), (1, one_test)):
        assert [len(y) for _, y in two[0][split]][-1] > [len(y) for _, y in two[1][split]][-1] > 0
        for i, (x, y) in enumerate(one):
            assert torch.equal(torch.cat([two[r][split][i][0] for r in (0, 1)]), x)
            assert torch.equal(torch.cat([two[r][split][i][1] for r in (0, 1)]), y)
    # With 4 ranks the 3-image last batch would leave one rank empty: it is left out.
    four = shards(4, *sizes)
    assert [len(train) for train, _ in four] == [3] * 4 and len(one_train) == 4
    with pytest.raises(UserError, match=r"trainer.batch_size=32: .*world size 3.*multiple of 3"):
        validate(tiny_cfg(), world_size=3)


def bn_free_fit(cfg) -> dict:
    """Two epochs of the real loaders and engine on a model without batch norm, as this rank."""
    ranks = distributed.from_env()
    with distributed.process_group(ranks):
        runtime = device_setup.resolve(cfg.device)
        data = build_data(cfg.dataset, cfg.trainer, runtime.device, cfg.seed, rank=ranks.rank,
                          world_size=ranks.world_size)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 8, 3, stride=2), torch.nn.ReLU(),
                                    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))
        parallel = DistributedDataParallel(model) if ranks.world_size > 1 else model
        all_reduces = []
        if ranks.world_size > 1:
            parallel.register_comm_hook(None, lambda state, bucket: all_reduces.append(1) or
                                        default_hooks.allreduce_hook(None, bucket))
        accumulate = cfg.trainer.accumulate
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.sched, updates(len(data.train), accumulate), cfg.trainer.epochs)
        rows = []
        for epoch in (1, 2):
            totals = RunningTotals(runtime.device)
            train_epoch(parallel, data.train, optimizer, scheduler, runtime.grad_scaler(), runtime, epoch, totals,
                        accumulate=accumulate)
            reduced = totals.reduced()
            rows.append({**reduced.metrics(), "seen": reduced.seen, **evaluate(parallel, data.test, runtime)})
        # Plain lists: tensors would travel through shared memory of a process that has ended.
        return {"rows": rows, "weights": {k: v.tolist() for k, v in model.state_dict().items()},
                "all_reduces": len(all_reduces)}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_ranks_learn_what_one_rank_learns(accumulate):
    # DDP averages gradients; with each rank's loss weighted by its share of the batch that is
    # the 1-rank gradient, uneven last batch (99 = 3 x 32 + 2 + 1) included. Batch norm is left
    # out: its statistics are per rank by design, and SyncBatchNorm runs on CUDA only.
    cfg = tiny_cfg("dataset=synthetic", "dataset.train_size=99", "dataset.test_size=37", *TINY,
                   "optim.momentum=0.9", f"trainer.accumulate={accumulate}")
    one = bn_free_fit(cfg)
    two = distributed.spawn(2, bn_free_fit, cfg)
    # One all-reduce (of the model's one bucket) per update: none on a group's earlier batches.
    assert two["all_reduces"] == 2 * updates(4, accumulate)
    for a, b in zip(one["rows"], two["rows"]):
        assert a["seen"] == b["seen"] == 99
        assert a == pytest.approx(b, rel=1e-5)
    assert one["weights"].keys() == two["weights"].keys()
    for k in one["weights"]:
        torch.testing.assert_close(torch.tensor(two["weights"][k]), torch.tensor(one["weights"][k]),
                                   rtol=1e-5, atol=1e-6)
    # Not vacuous: training moved the weights a thousand times further than the tolerance.
    torch.manual_seed(0)
    first = torch.nn.Conv2d(3, 8, 3, stride=2).weight
    assert (torch.tensor(one["weights"]["0.weight"]) - first).abs().max() > 1e-3


def run_folders(root: Path):
    return sorted(p.parent for p in root.rglob(".hydra"))


def assert_one_run(run_dir: Path, out: str, epochs_run: int) -> None:
    """One folder's worth of output, written by rank 0 alone."""
    assert [r["epoch"] for r in metrics(run_dir)] == list(range(1, epochs_run + 1))
    wandb_runs = list(run_dir.glob("wandb/*run-*/run-*.wandb"))
    assert len(wandb_runs) == 1
    run = read_run(run_dir)
    assert run.exit_code == 0 and [h["epoch"] for h in run.history if "epoch" in h] == [1]
    assert (run_dir / "status").read_text() == "finished\n"
    # Rank 0 alone prints and logs: each line once.
    log = (run_dir / "train.log").read_text()
    for text in (out, log):
        assert len(re.findall(r"^.*epoch 1/1 ", text, re.M)) == 1
        assert text.count("2 ranks; writing to") == 1


def cli(args, cwd: Path, launcher=(sys.executable, "-m", "resnet_lab"), **popen):
    return subprocess.run([*launcher, *args], cwd=cwd, env=fresh_env(), capture_output=True, text=True,
                          timeout=300, **popen)


@pytest.fixture(scope="module")
def one_rank(fmnist_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one_rank")
    train(train_cfg(fmnist_root, *TINY, "trainer.epochs=1"), run_dir)
    return metrics(run_dir)[0]


def assert_close_to_one_rank(row, one_rank) -> None:
    # ResNets normalise by batch statistics, over each rank's 16 images rather than all 32, so the
    # loss agrees loosely (measured: 1.819 against 1.820 here); accuracies over 320 images after one
    # epoch differ by chance (test: 0.04 against 0.14) and say nothing. The exact agreement is
    # test_two_ranks_learn_what_one_rank_learns'. Each image counted once over both ranks:
    assert row["train_loss"] == pytest.approx(one_rank["train_loss"], rel=0.2)
    assert row["images_per_s"] * row["seconds"] == pytest.approx(320)
    assert one_rank["images_per_s"] * one_rank["seconds"] == pytest.approx(320)


def test_device_world_size_spawns_ranks_inside_one_run(fmnist_root, tmp_path, one_rank):
    proc = cli([f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1", "device.world_size=2",
                f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert run_folders(tmp_path) == [tmp_path / "run"]
    assert_one_run(tmp_path / "run", proc.stdout, 1)
    assert_close_to_one_rank(metrics(tmp_path / "run")[0], one_rank)
    # Both ranks evaluated with rank 0's batch-norm statistics: the model it saved, evaluated in
    # one process, has the loss the run logged (up to the order the ranks' sums were added in).
    evaluated = evaluate_command.main([str(tmp_path / "run")])
    assert evaluated["loss"] == pytest.approx(metrics(tmp_path / "run")[-1]["test_loss"], rel=1e-6, abs=1e-7)


def test_torchrun_ranks_agree_on_one_run_folder(fmnist_root, tmp_path, one_rank):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "-m", "resnet_lab")
    proc = cli([f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1"], tmp_path, launcher=torchrun)
    assert proc.returncode == 0, proc.stderr
    # Hydra's default folder, outputs/runs/<date>/<time>, named by rank 0 for both.
    (run_dir,) = run_folders(tmp_path)
    assert run_dir.relative_to(tmp_path).parts[:2] == ("outputs", "runs")
    assert_one_run(run_dir, proc.stdout, 1)
    assert_close_to_one_rank(metrics(run_dir)[0], one_rank)


def test_multirun_under_torchrun_is_refused():
    with pytest.raises(UserError, match=r"-m \(multirun\) under torchrun.*device.world_size"):
        one_run_folder(["resnet_lab", "-m", "optim.lr=0.1,0.2"], distributed.Ranks(1, 2, 1))


def test_a_stopped_ddp_run_resumes_in_one_process(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = start([f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=2", "trainer.checkpoint_every_steps=1",
                  "device.world_size=2"], run_dir, start_new_session=True)
    try:
        # SIGTERM to the launching process alone: it passes it on to the ranks.
        assert stop_at(proc, run_dir, (1, 2), group=True, to=proc.pid) == 143
    finally:
        proc.kill()
    out = (tmp_path / "run.log").read_text()
    assert out.count("SIGTERM: stopped at epoch 1 step") == 1 and "Traceback" not in out
    state = torch.load(rundir.last(run_dir), weights_only=True)
    # The checkpoint holds the bare model and the totals of both ranks.
    assert state["epoch"] == 1 and 2 <= state["step"] < 10 and state["totals"]["seen"] == 32 * state["step"]
    assert not any(k.startswith("module.") for k in state["model"])
    assert (run_dir / "status").read_text() == "stopped\n"

    train(tiny_cfg(f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=2"), run_dir)
    assert epochs(run_dir) == [1, 2] and (run_dir / "status").read_text() == "finished\n"
    runs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and all(f.stem == f"run-{state['wandb_run_id']}" for f in runs)


def job_process(run_dir: Path) -> int:
    """The submitit task process that runs the job of run_dir: it holds the job's log file open."""
    log = str(run_dir / "train.log")
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes()
            if b"submitit.core._submit" in command and any(
                    os.readlink(fd) == log for fd in (entry / "fd").iterdir()):
                return int(entry.name)
        except OSError:
            continue
    pytest.fail(f"no submitit task holds {log}")


def test_submitit_local_sweep_is_preempted_requeued_and_resumed(fmnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    log = open(tmp_path / "sweep.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "resnet_lab", "-m", "hydra/launcher=submitit_local",
                             "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}",
                             f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=2",
                             "trainer.checkpoint_every_steps=1", "optim.lr=0.05,0.01"],
                            cwd=tmp_path, env=fresh_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        # Job 0 frozen mid-epoch (the whole sweep: its launcher, the jobs' controllers and tasks)
        freeze_at(proc, sweep / "0", (1, 2), group=True)
        # ... gets submitit's preemption signal.
        os.kill(job_process(sweep / "0"), signal.SIGUSR2)
        os.killpg(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=240) == 0, (tmp_path / "sweep.log").read_text()
    finally:
        proc.kill()
    job_logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "SIGUSR2: stopped at epoch 1 step" in job_logs and "Requeued job" in job_logs
    assert "resuming from" in (sweep / "0" / "train.log").read_text()
    for job in ("0", "1"):
        assert epochs(sweep / job) == [1, 2]
        assert (sweep / job / "status").read_text() == "finished\n"
    assert read_run(sweep / "1").exit_code == 0
    # The requeued job continued job 0's W&B run; job 1 ran once.
    resumed = sorted(sweep.glob("0/wandb/offline-run-*/run-*.wandb"))
    assert len(resumed) == 2 and resumed[0].name == resumed[1].name
    assert len(list(sweep.glob("1/wandb/offline-run-*/run-*.wandb"))) == 1


def test_sync_bn_off_cuda_is_a_clear_error(fmnist_root, tmp_path):
    with pytest.raises(UserError, match=r"device.sync_bn=true: .*CUDA only and this run is on cpu"):
        train(tiny_cfg(f"dataset.root={fmnist_root}", *TINY, "device.sync_bn=true"), tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_at_once(fmnist_root, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoint folder goes")
    began = time.monotonic()
    proc = cli([f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1", "device.world_size=2",
                f"hydra.run.dir={run_dir}"], tmp_path)
    # Every rank stops at the failed checkpoint: none waits there for the launcher's grace period.
    assert time.monotonic() - began < distributed.GRACE_S
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not write" in proc.stderr.strip().splitlines()[-1]
    assert "checkpoints/weights-" in proc.stderr.strip().splitlines()[-1]  # a checkpoint's first file


def what_each_rank_raises(notes: Path) -> None:
    """rank_0_failure_stops_all around a user's mistake, then a bug, raised on rank 0 alone."""
    ranks = distributed.from_env()
    with distributed.process_group(ranks):
        for error in (UserError("disk full"), KeyError("oops")):
            try:
                with distributed.rank_0_failure_stops_all():
                    if ranks.is_main:
                        raise error
            except Exception as e:
                with open(notes / str(ranks.rank), "a") as f:
                    f.write(f"{type(e).__name__}: {e}\n")


def test_what_rank_0_alone_fails_at_stops_every_rank(tmp_path):
    distributed.spawn(2, what_each_rank_raises, tmp_path)
    assert (tmp_path / "0").read_text() == "UserError: disk full\nKeyError: 'oops'\n"
    # The others stop too: with rank 0's message, or, for a bug, naming it (exit 1, not 2).
    assert (tmp_path / "1").read_text() == "UserError: disk full\nRuntimeError: rank 0 failed: KeyError: 'oops'\n"


def noting_its_error(cfg, run_dir: Path, notes: Path) -> float:
    """train() as this rank, writing the error it stopped with (if any) to notes/<rank>."""
    try:
        return train(cfg, run_dir)
    except Exception as e:
        (notes / str(distributed.from_env().rank)).write_text(f"{type(e).__name__}: {e}")
        raise


def test_a_tracker_rank_0_cannot_open_stops_every_rank_with_its_message(fmnist_root, tmp_path, monkeypatch):
    # logger.mode=online where W&B finds no API key: rank 0's wandb.init refuses at once. (The
    # ranks and the command below start from this environment.)
    for key in ("WANDB_API_KEY", "WANDB_SERVICE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    args = [f"dataset.root={fmnist_root}", *TINY, "trainer.epochs=1", "logger.mode=online"]
    notes, run_dir = tmp_path / "notes", tmp_path / "spawned"
    notes.mkdir()
    run_dir.mkdir()
    began = time.monotonic()
    with pytest.raises(UserError, match=r"^logger.mode=online: W&B could not start a run: .*API key") as raised:
        distributed.spawn(2, noting_its_error, tiny_cfg(*args), run_dir, notes)
    assert time.monotonic() - began < distributed.GRACE_S
    # Rank 1 stopped with rank 0's message, before training (not at a collective rank 0 never joined).
    message = str(raised.value)
    assert {p.name: p.read_text() for p in notes.iterdir()} == {"0": f"UserError: {message}",
                                                                "1": f"UserError: {message}"}
    assert [p.name for p in run_dir.iterdir()] == ["runtime.json"]  # the record of where it ran, alone
    # From the command line: exit 2 and rank 0's one line, promptly.
    began = time.monotonic()
    proc = cli([*args, "device.world_size=2", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert time.monotonic() - began < distributed.GRACE_S
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"


def test_a_ddp_run_with_dropout_resumes_where_each_rank_stopped(fmnist_root, tmp_path):
    # Each rank draws its own dropout masks; the checkpoint holds every rank's random state, so a
    # run extended from its last checkpoint ends where one that never stopped ends.
    args = [f"dataset.root={fmnist_root}", *TINY, "model.dropout=0.3", "trainer.deterministic=true",
            "trainer.limit_train_batches=3", "logger=none"]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    reference.mkdir()
    resumed.mkdir()
    distributed.spawn(2, train, tiny_cfg(*args, "trainer.epochs=2"), reference)
    distributed.spawn(2, train, tiny_cfg(*args, "trainer.epochs=1"), resumed)
    state = torch.load(resumed / rundir.CHECKPOINTS / rundir.LAST, weights_only=True)
    assert len(state["rng_ranks"]) == 1 and not torch.equal(state["rng"]["torch"], state["rng_ranks"][0]["torch"])
    distributed.spawn(2, train, tiny_cfg(*args, "trainer.epochs=2"), resumed)
    ends = [torch.load(d / "model.pt", weights_only=True) for d in (reference, resumed)]
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
