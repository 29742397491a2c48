"""`python -m resnet_lab -m ...` inside the test process, so the basic launcher runs every job here."""

import contextlib
import io
import sys

import pytest

from resnet_lab.__main__ import main
from tests import runs

TINY = [*runs.TINY, "trainer.epochs=1", "trainer.batch_size=64", "trainer.save_weights=false",
        "logger.mode=offline", "logger.log_every_steps=2"]


def multirun(where, fmnist_root, *args):
    """(exit code, sweep folder, stdout) of a tiny multirun on the fmnist fixture, in `where`."""
    sweep = where / "sweep"
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.chdir(where)
        patch.setenv("HYDRA_FULL_ERROR", "0")
        patch.setattr(sys, "argv", ["resnet_lab", "-m", f"hydra.sweep.dir={sweep}",
                                    f"dataset.root={fmnist_root}", *TINY, *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code
    return code, sweep, out.getvalue()


LRS = ("0.001", "0.002", "0.003")
