"""Decode an offline W&B run from its run-*.wandb file (resnet_lab.training.wandb_records reads
the records with wandb's own protobufs)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from resnet_lab.training.wandb_records import item_key, records

if TYPE_CHECKING:
    from wandb.proto import wandb_internal_pb2 as pb


@dataclass
class WandbRun:
    run: pb.RunRecord
    config: Dict[str, object]
    history: List[Dict[str, object]] = field(default_factory=list)
    summary: Dict[str, object] = field(default_factory=dict)
    exit_code: Optional[int] = None
    artifacts: List[pb.ArtifactRecord] = field(default_factory=list)


def values(items) -> Dict[str, object]:
    return {item_key(i): json.loads(i.value_json) for i in items}


def history(path: Path) -> List[Dict[str, object]]:
    """The history rows of one run-*.wandb file (one part of a resumed run, a killed one too)."""
    return [values(r.history.item) for r in records(path) if r.WhichOneof("record_type") == "history"]


def read_run(run_dir: Path, timeout: float = 30) -> WandbRun:
    """The one W&B run under run_dir, read once its exit record is in the file."""
    deadline = time.monotonic() + timeout
    while True:
        files = list(Path(run_dir).glob("wandb/*run-*/run-*.wandb"))
        assert len(files) <= 1, files
        found = records(files[0]) if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            break
        assert time.monotonic() < deadline, f"no W&B exit record under {run_dir} after {timeout} s"
        time.sleep(0.1)
    run = next(r.run for r in found if r.WhichOneof("record_type") == "run")
    out = WandbRun(run, {u.key: json.loads(u.value_json) for u in run.config.update})
    for r in found:
        kind = r.WhichOneof("record_type")
        if kind == "history":
            out.history.append(values(r.history.item))
        elif kind == "summary":
            out.summary.update(values(r.summary.update))
        elif kind == "config":
            out.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "artifact":
            out.artifacts.append(r.artifact)
        elif kind == "exit":
            out.exit_code = r.exit.exit_code
    return out
