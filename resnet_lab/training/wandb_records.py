"""What a W&B run's part wrote down: the records of its run-<id>.wandb file, decoded with wandb's
own protobufs.

A part killed outright (SIGKILL, the OOM killer) can lose records that W&B's service had not yet
written to this file; what the file holds is what `wandb sync` can upload of that part.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of chunks, each a 7-byte header (CRC-32C, length, type) and a slice of one Record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, List, Set

if TYPE_CHECKING:  # wandb is imported only to decode a file: machines without it import this module
    from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> List[pb.Record]:
    """The whole records of the file, in order; a tail its writer had not finished (or a kill
    cut short) ends them, and a file that is missing or not such a log has none."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    if data[:4] != b":W&B" or data[4:6] != struct.pack("<H", 0xBEE1):
        return []
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
            try:
                record.ParseFromString(pending)
            except DecodeError:
                break
            out.append(record)
    return out


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def logged_epochs(path: Path) -> Set[int]:
    """The epochs whose rows (Tracker.epoch) the file's history holds."""
    return {json.loads(item.value_json) for record in records(path) if record.WhichOneof("record_type") == "history"
            for item in record.history.item if item_key(item) == "epoch"}
