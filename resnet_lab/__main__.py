"""`python -m resnet_lab [overrides]`: Hydra's command line, with one-line errors.

Under torchrun every rank runs this: rank 0 names the run folder for all of them, and the other
ranks write none of Hydra's files.
"""

import contextlib
import os
import sys
import time

from resnet_lab.errors import HeldBack, UserError, describe


def one_run_folder(argv, ranks):
    """argv with the run folder rank 0 chose (Hydra's own default would be named by each rank's
    start time), and Hydra's output and logs off on the other ranks."""
    from resnet_lab import distributed

    args = argv[1:]
    if {"-m", "--multirun"} & set(args):
        raise UserError("-m (multirun) under torchrun: each rank would run the whole sweep; sweep "
                        "with device.world_size=N, or hydra/launcher=submitit_slurm with "
                        "hydra.launcher.tasks_per_node=N")
    if not any(a.startswith("hydra.run.dir=") for a in args):
        # Hydra's default pattern (conf/config.yaml), at rank 0's time.
        folder = distributed.broadcast(time.strftime("outputs/runs/%Y-%m-%d/%H-%M-%S"))
        args.append(f"hydra.run.dir={folder}")
    if not ranks.is_main:
        # No .hydra folder, no log file, only errors on the console.
        args += ["hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]",
                 "hydra.job_logging.root.level=ERROR", "hydra/hydra_logging=disabled"]
    return [argv[0], *args]


@contextlib.contextmanager
def full_hydra_errors():
    """Hydra prints its errors over several lines; under HYDRA_FULL_ERROR=1 it lets them propagate,
    so that one line can be printed here. Set for this command alone: a later command in the same
    process reads the user's own setting. Relies on: under HYDRA_FULL_ERROR=1, hydra.main re-raises
    the task's error (tests/test_hydra_contract.py)."""
    before = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HYDRA_FULL_ERROR"]
        else:
            os.environ["HYDRA_FULL_ERROR"] = before


def main() -> None:
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    from resnet_lab import distributed
    from resnet_lab.sweeps.compare import SweepSummary
    from resnet_lab.training.train import run

    ranks = distributed.from_env()
    stderr = HeldBack(sys.stderr)
    try:
        with full_hydra_errors(), distributed.process_group(ranks), contextlib.redirect_stderr(stderr):
            if ranks.world_size > 1:
                # Relies on: hydra.main reads its overrides from sys.argv (tests/test_hydra_contract.py).
                sys.argv = one_run_folder(sys.argv, ranks)
            run()
    except KeyboardInterrupt:
        print("error: interrupted; the run folder's checkpoints/last.pt, if any, holds the last "
              "checkpoint written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001
        # Hydra's basic sweeper raises a failed job's error after the last job, skipping
        # on_multirun_end and so the summary. Relies on that skip (tests/test_hydra_contract.py).
        if stderr.sweep is not None:
            SweepSummary.summarise(stderr.sweep)
        message = describe(e)
        if stderr.line and (message is None or full_error):
            sys.stderr.write(stderr.line)
        if message is None or full_error:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
