"""Decode an offline W&B run from its run-*.wandb file with wandb's own protobuf records.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of chunks, each a 7-byte header (CRC-32C, length, type) and a slice of one Record.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:  # wandb itself is imported only to decode a run (see records)
    from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> List[pb.Record]:
    # Imported here: modules that import this one (for their run helpers) also run on GPU
    # machines without wandb (benchmarks/gpu_check.sh).
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1, path
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:  # the writer is mid-chunk
            break
        pos += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


@dataclass
class WandbRun:
    run: pb.RunRecord
    config: Dict[str, object]
    history: List[Dict[str, object]] = field(default_factory=list)
    summary: Dict[str, object] = field(default_factory=dict)
    exit_code: Optional[int] = None
    artifacts: List[pb.ArtifactRecord] = field(default_factory=list)


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
            out.history.append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out.summary.update({_key(i): json.loads(i.value_json) for i in r.summary.update})
        elif kind == "config":
            out.config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "artifact":
            out.artifacts.append(r.artifact)
        elif kind == "exit":
            out.exit_code = r.exit.exit_code
    return out
