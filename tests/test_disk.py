"""What a run keeps on disk: the weights once, the optimizer state once (issue 15 asked for at
most half of what a run wrote before: last.pt and best.pt as full states, and model.pt)."""

import os
from pathlib import Path

import pytest
import torch

from resnet_lab import rundir
from resnet_lab.training import checkpoint
from resnet_lab.training.train import train
from tests.test_reliability import tiny_cfg


def stored_bytes(folder: Path) -> int:
    """The bytes the folder's files take, each hard-linked file once."""
    seen = {}
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            st = path.stat()
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def test_a_run_keeps_at_most_half_of_what_full_copies_took(fmnist_root, tmp_path):
    train(tiny_cfg(f"dataset.root={fmnist_root}", "model.width=16", "trainer.epochs=1", "trainer.checkpoint_every_steps=2",
                   "trainer.limit_train_batches=4", "logger=none", "dataset.val_fraction=0.2"), tmp_path)
    weights = (tmp_path / "model.pt").stat().st_size
    last = (tmp_path / rundir.CHECKPOINTS / rundir.LAST).stat().st_size
    # Before: last.pt and best.pt each held the weights and Adam's two moments, plus model.pt.
    before = 2 * 3 * weights + weights
    assert stored_bytes(tmp_path) <= before / 2
    # The checkpoint before the last, kept to resume from while the run trains, went at its end.
    assert not (tmp_path / rundir.CHECKPOINTS / rundir.PREVIOUS).exists()
    assert len(list((tmp_path / rundir.CHECKPOINTS).glob(f"{rundir.WEIGHTS_PREFIX}*"))) == 1
    assert last < 2.2 * weights  # Adam's moments, without the weights
    # best.pt (the one epoch is the best on validation) and model.pt are the last checkpoint's weights file.
    state = checkpoint.load(tmp_path / rundir.CHECKPOINTS / rundir.LAST)
    for name in ("model.pt", f"{rundir.CHECKPOINTS}/{rundir.BEST}"):
        assert os.path.samefile(tmp_path / name, state["weights_file"])
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in state["model"].items())


def test_each_checkpoint_replaces_the_weights_file_and_a_missing_one_is_named(tmp_path):
    from resnet_lab.errors import UserError
    from tests.test_trainer import composed, save_checkpoint

    last = save_checkpoint(tmp_path, composed(), epoch=1, step=3)
    first = checkpoint.load(last)["weights_file"]
    orphan = last.parent / f"{rundir.WEIGHTS_PREFIX}left-by-a-kill.pt"  # written, last.pt not yet
    orphan.write_bytes(b"")
    save_checkpoint(tmp_path, composed(), epoch=2, step=0)
    second = checkpoint.load(last)["weights_file"]
    assert second != first and [p.name for p in last.parent.glob(f"{rundir.WEIGHTS_PREFIX}*")] == [second.name]
    second.unlink()
    with pytest.raises(UserError, match=f"checkpoint {last} keeps its weights in {second}, which is missing"):
        checkpoint.load(last)
