"""The Hydra behaviours resnet_lab builds on where Hydra has no mechanism for what it needs. Each
test names the code that relies on it: a Hydra upgrade that changes one fails here, by name,
rather than somewhere downstream."""

import os
import subprocess
import sys

import cloudpickle
import hydra
import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.experimental.callback import Callback

from resnet_lab.errors import HeldBack

CALLS = []


class Recorder(Callback):
    def on_multirun_start(self, config, **kwargs) -> None:
        CALLS.append("on_multirun_start")

    def on_multirun_end(self, config, **kwargs) -> None:
        CALLS.append("on_multirun_end")


@hydra.main(version_base="1.3", config_path=None, config_name=None)
def task(cfg) -> float:
    out = HydraConfig.get().runtime.output_dir
    CALLS.append(("job", cfg.job, os.path.exists(os.path.join(out, ".hydra", "overrides.yaml")),
                  cloudpickle.dumps(Singleton.get_state())))
    if cfg.job == 0:
        raise ValueError("job 0 fails")
    return 1.0


def run(tmp_path, monkeypatch, *args, multirun=False):
    CALLS.clear()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["app", *(["-m"] if multirun else []), f"hydra.run.dir={tmp_path / 'run'}",
                                      f"hydra.sweep.dir={tmp_path / 'sweep'}", *args])
    task()


def test_full_error_re_raises_and_a_single_run_writes_one_error_line_first(tmp_path, monkeypatch, capsys):
    # resnet_lab.__main__ sets HYDRA_FULL_ERROR=1 to get the error itself, and HeldBack holds back
    # the one line Hydra writes above it; the overrides come from sys.argv (one_run_folder).
    with pytest.raises(ValueError, match="job 0 fails"):
        run(tmp_path, monkeypatch, "+job=0")
    lines = capsys.readouterr().err.splitlines()
    assert [line for line in lines if line.startswith(HeldBack.PREFIX)] == [f"{HeldBack.PREFIX} ['+job=0']"]


def test_hydra_writes_its_record_before_the_job_runs(tmp_path, monkeypatch):
    # resnet_lab.training.rundir.hydra_record_kept puts back the record a job that trained nothing overwrote.
    run(tmp_path, monkeypatch, "+job=1")
    assert CALLS[0][:3] == ("job", 1, True)


def test_the_basic_sweeper_raises_a_failed_job_after_the_last_without_on_multirun_end(tmp_path, monkeypatch):
    # resnet_lab.__main__: it prints the sweep's table itself when on_multirun_end is skipped.
    with pytest.raises(ValueError, match="job 0 fails"):
        run(tmp_path, monkeypatch, "+job=0,1", f"+hydra.callbacks.recorder._target_={__name__}.Recorder",
            multirun=True)
    assert [c if isinstance(c, str) else c[:2] for c in CALLS] == ["on_multirun_start", ("job", 0), ("job", 1)]


def test_hydra_state_pickled_restores_the_job_in_a_fresh_process(tmp_path, monkeypatch):
    # resnet_lab.training.train.launch hands a job's Hydra state to its spawned ranks (spawned_rank).
    run(tmp_path, monkeypatch, "+job=1")
    code = ("import pickle, sys; from hydra.core.singleton import Singleton; "
            "from hydra.core.hydra_config import HydraConfig; "
            "Singleton.set_state(pickle.loads(sys.stdin.buffer.read())); "
            "print(HydraConfig.get().runtime.output_dir)")
    out = subprocess.run([sys.executable, "-c", code], input=CALLS[0][3], capture_output=True, check=True).stdout
    assert out.decode().strip() == str(tmp_path / "run")
