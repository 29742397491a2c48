"""The Optuna search (hparams_search=optuna): a persistent study that resumes after a SIGKILL,
two processes sharing one study (a journal file, and a real PostgreSQL server), pruning, and one
line for each bad input before any trial starts."""

import glob
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from resnet_lab.sweeps import results
from tests.launch import multirun
from tests.runs import TINY, fresh_env, freeze_at, metrics
from tests.wandb_file import read_run

SEARCH = ["hparams_search=optuna", "hydra.sweeper.params=null", "optim.lr=tag(log, interval(1e-3, 1e-2))",
          "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0"]


def study(sweep: Path, storage=None):
    import optuna

    from resnet_lab.studies import default_url, open_storage

    return optuna.load_study(study_name="resnet_lab", storage=open_storage(storage or default_url(sweep)))


def states(trials) -> list:
    return [t.state.name for t in trials]


def search_process(where: Path, fmnist_root: Path, name: str, *args) -> subprocess.Popen:
    """`python -m resnet_lab hparams_search=optuna ...` on the tiny run, its output in <name>.log."""
    log = open(where / f"{name}.log", "a")
    return subprocess.Popen([sys.executable, "-m", "resnet_lab", *TINY, f"dataset.root={fmnist_root}",
                             f"hydra.sweep.dir={where / 'sweep'}", "logger=none", *SEARCH, *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=where, env=fresh_env())


def trials_run_by(log: Path) -> set:
    """The trial numbers a search process launched, from Hydra's launch lines."""
    return {int(line.rsplit("search.trial=", 1)[1].split()[0]) for line in log.read_text().splitlines()
            if "search.trial=" in line}


def test_a_pruner_stops_trials_at_an_epoch_end_keeping_metrics_and_checkpoint(tmp_path, fmnist_root):
    # No validation accuracy reaches 1.1: the threshold pruner stops every trial after epoch 1.
    code, sweep, out = multirun(tmp_path, fmnist_root, *SEARCH, "hydra.sweeper.n_trials=2", "trainer.epochs=3",
                                "hydra/sweeper/pruner=threshold", "hydra.sweeper.pruner.lower=1.1")
    assert code == 0, out
    first = out.splitlines()[0]
    assert "maximize val_acc on a validation split of 0.1 of the training set" in first and "unset" in first
    found = study(sweep)
    assert states(found.trials) == ["PRUNED", "PRUNED"]
    for trial in found.trials:
        run_dir = sweep / str(trial.number)
        rows = metrics(run_dir)
        assert [r["epoch"] for r in rows] == [1] and "val_acc" in rows[0]
        assert trial.intermediate_values == {1: rows[0]["val_acc"]}
        assert (run_dir / "status").read_text() == "pruned\n"
        assert (run_dir / "checkpoints" / "last.pt").is_file() and not (run_dir / "model.pt").exists()
        run = read_run(run_dir)
        assert run.run.run_group == "resnet_lab" and run.config["search"]["trial"] == trial.number
        assert run.summary["trial_state"] == "pruned" and run.summary["pruned_at_epoch"] == 1
        assert run.exit_code == 0
    assert "pruned: 0 at epoch 1, 1 at epoch 1; pruning saved 4 of 6 planned epochs" in out
    assert "best trial: none has finished" in out


def test_a_search_killed_mid_trial_resumes_it_from_its_checkpoint(tmp_path, fmnist_root, caplog):
    args = ["hydra.sweeper.n_trials=2", "trainer.epochs=2", "trainer.checkpoint_every_steps=3"]
    proc = search_process(tmp_path, fmnist_root, "first", *args)
    try:
        assert freeze_at(proc, tmp_path / "sweep" / "0", (1, 3)) >= (1, 3)
    finally:
        proc.kill()
        proc.wait()
    again = search_process(tmp_path, fmnist_root, "again", *args)
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()
    sweep = tmp_path / "sweep"
    trials = study(sweep).trials
    # Trial 0 died and was failed by the rerun, which queued it again as trial 2 in folder 0.
    assert states(trials) == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[2].user_attrs == {"folder": "0", "retry_of": 0} and trials[2].params == trials[0].params
    assert "trial 0: its process died" in (tmp_path / "again.log").read_text()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == ["0", "1"]
    log = (sweep / "0" / "train.log").read_text()
    assert "resuming from" in log and "at epoch 1 step 3" in log
    assert [r["epoch"] for r in metrics(sweep / "0")] == [1, 2]
    # A run with a validation split returns its best epoch's validation accuracy.
    assert trials[2].value == max(r["val_acc"] for r in metrics(sweep / "0"))
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_trial"] in (1, 2) and best["best_value"] == max(t.value for t in trials[1:])
    # On demand, as at the end: the best trial and the plots.
    for name in ("optimization_history", "param_importances", "intermediate_values"):
        (sweep / f"{name}.png").unlink()
    with caplog.at_level(logging.INFO, logger="resnet_lab"):
        results.main([str(sweep)])
    assert f"best trial {best['best_trial']}: value {best['best_value']:.4f}, test acc " in caplog.text
    for name in ("optimization_history", "param_importances", "intermediate_values"):
        assert (sweep / f"{name}.png").stat().st_size > 1000


def two_at_once(tmp_path, fmnist_root, *args):
    procs = [search_process(tmp_path, fmnist_root, name, "hydra.sweeper.n_trials=2", "trainer.epochs=1", *args)
             for name in ("a", "b")]
    for proc, name in zip(procs, "ab"):
        assert proc.wait(timeout=300) == 0, (tmp_path / f"{name}.log").read_text()
    ran = [trials_run_by(tmp_path / f"{name}.log") for name in "ab"]
    assert not ran[0] & ran[1] and ran[0] | ran[1] == {0, 1}
    for number in range(2):
        assert (tmp_path / "sweep" / str(number) / "status").read_text() == "finished\n"


def test_a_trial_is_told_before_its_claim_is_released(tmp_path, fmnist_root, monkeypatch):
    # Released first, another process sharing the study could fail the finished trial as dead.
    from resnet_lab.sweeps.search import OptunaSearch

    held_when_told = []
    tell = OptunaSearch._tell

    def recording(self, study, trial, ret):
        held_when_told.append(trial.number in self.claims.held)
        tell(self, study, trial, ret)

    monkeypatch.setattr(OptunaSearch, "_tell", recording)
    code, sweep, out = multirun(tmp_path, fmnist_root, *SEARCH, "hydra.sweeper.n_trials=2")
    assert code == 0, out
    assert held_when_told == [True, True]
    assert states(study(sweep).trials) == ["COMPLETE", "COMPLETE"]


def test_two_search_processes_share_the_default_study(tmp_path, fmnist_root):
    two_at_once(tmp_path, fmnist_root)
    assert states(study(tmp_path / "sweep").trials) == ["COMPLETE"] * 2


def _pg_bin():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    """A PostgreSQL server of this machine's binaries in a temporary folder, on a free loopback
    port, run as the `postgres` user (the server refuses root); its URL."""
    bin_dir = _pg_bin()
    if bin_dir is None or shutil.which("runuser") is None:
        pytest.skip("no PostgreSQL binaries under /usr/lib/postgresql/*/bin (or no runuser)")
    pytest.importorskip("psycopg")
    folder = Path(tempfile.mkdtemp(prefix="pg_"))
    shutil.chown(folder, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def as_postgres(*cmd):
        subprocess.run(["runuser", "-u", "postgres", "--", *map(str, cmd)], check=True, capture_output=True)

    data = folder / "data"
    as_postgres(bin_dir / "initdb", "-D", data, "--auth=trust", "-U", "postgres")
    as_postgres(bin_dir / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "start",
                "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1")
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        as_postgres(bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def test_two_search_processes_share_a_study_on_postgresql(tmp_path, fmnist_root, postgres):
    two_at_once(tmp_path, fmnist_root, f"hydra.sweeper.storage={postgres}")
    assert states(study(tmp_path / "sweep", postgres).trials) == ["COMPLETE"] * 2
    assert not (tmp_path / "sweep" / "optuna.journal").exists()


def _made_study(sweep: Path, direction: str, space: dict):
    import optuna

    from resnet_lab.studies import default_url, open_storage

    sweep.mkdir(parents=True)
    made = optuna.create_study(study_name="resnet_lab", storage=open_storage(default_url(sweep)), direction=direction)
    made.set_user_attr("space", space)


LR_SPACE = {"optim.lr": '{"name": "FloatDistribution", "attributes": {"step": null, "low": 0.001, "high": 0.01, '
                        '"log": true}}'}


@pytest.mark.parametrize("args, study_made, line", [
    # Up to grid: where hydra-optuna-sweeper is still installed, its motpe and nsgaii follow.
    (["hydra/sweeper/sampler=tpee"], None, "hydra/sweeper/sampler=tpee: no such option (did you mean tpe?); "
                                           "choose from: cmaes, gp, grid"),
    (["hydra/sweeper/pruner=medain"], None, "hydra/sweeper/pruner=medain: no such option (did you mean median?)"),
    (["hydra.sweeper.storage=postgresql+psycopg://nobody@127.0.0.1:9/none"], None,
     "hydra.sweeper.storage=postgresql+psycopg://nobody@127.0.0.1:9/none: Optuna cannot open it: "),
    (["optim.lrr=interval(0.1, 1)"], None, "optim.lrr: no such key (did you mean lr?)"),
    (["optim.lr=interval(0.1, 0.01)"], None, "optim.lr=interval(0.1, 0.01): the interval is empty or inverted"),
    (["optim.lr=interval(0.1, 0.1)"], None, "optim.lr=interval(0.1, 0.1): the interval is empty or inverted"),
    (["optim.lr=tag(log, interval(0, 0.1))"], None, "a log interval needs low > 0"),
    (["trainer.batch_size=choice(32, 0)"], None, "trainer.batch_size=0: must be >= 1 (in the search space"),
    (["hydra/sweeper/sampler=grid"], None, "hydra/sweeper/sampler=grid: optim.lr is continuous"),
    ([], ("minimize", LR_SPACE), "hydra.sweeper.direction=maximize: study resnet_lab in "),
    (["optim.lr=interval(0.001, 0.1)"], ("maximize", LR_SPACE),
     "was created with another search space (differing: optim.lr)"),
])
def test_bad_search_input_is_one_line_before_any_trial(args, study_made, line, tmp_path, fmnist_root, capsys):
    if study_made:
        _made_study(tmp_path / "sweep", *study_made)
    code, sweep, out = multirun(tmp_path, fmnist_root, *SEARCH, "logger=none", *args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("error: ") and line in err.splitlines()[-1]
    assert not (sweep / "0").exists() and "Launching" not in out


def test_the_pruning_benchmark_runs_the_same_seeded_search_with_and_without_a_pruner(fmnist_root, tmp_path):
    import json
    import math

    import optuna

    from resnet_lab.studies import open_storage

    out, report = tmp_path / "out", tmp_path / "search.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "search.py"),
                           "--root", str(fmnist_root), "--trials", "3", "--epochs", "2", "--train-batches", "2",
                           "--eval-batches", "1", "--width", "4", "--device", "cpu", "--json", str(report),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, env=fresh_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(report.read_text())
    plain, pruned = result["searches"]["unpruned"], result["searches"]["median"]
    assert plain["trials"] == pruned["trials"] == 3 and plain["epochs"] == 6 and plain["pruned"] == 0
    assert pruned["epochs"] <= 6 and math.isclose(result["epoch_share"], pruned["epochs"] / 6)
    assert math.isclose(result["best_val_gap"], plain["best_val_acc"] - pruned["best_val_acc"])
    assert 0 < plain["best_trial_test_acc"] <= 1 and "of the unpruned search's epochs" in proc.stdout
    # One seeded search: the same parameters trial by trial, whatever the pruner stopped.
    params = []
    for name in ("unpruned", "median"):
        record = yaml.safe_load((out / name / results.RECORD).read_text())
        trials = optuna.load_study(study_name=record["study_name"], storage=open_storage(record["storage"])).trials
        params.append([t.params for t in trials])
    assert params[0] == params[1] and len({str(p) for p in params[0]}) == 3
