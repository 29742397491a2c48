"""Where and how the model runs: device, precision, memory format, compilation."""

import contextlib
from dataclasses import dataclass

import torch

from resnet_lab.distributed import Ranks
from resnet_lab.errors import UserError

# Defaults for settings left null, per device, chosen from measurements (README, "Speed").
# CPU: channels_last helps or is neutral; bf16 autocast is the fastest precision where the CPU
# has bf16 instructions and slower than fp32 where it emulates them (see `defaults`).
# CUDA: bf16 autocast and channels_last feed the tensor cores.
DEFAULTS = {
    "cpu": {"precision": "fp32", "channels_last": True},
    "cuda": {"precision": "bf16", "channels_last": True},
    "mps": {"precision": "fp32", "channels_last": False},
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    precision: str
    channels_last: bool
    compile: bool
    compile_mode: str

    def autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        # Only fp16 needs loss scaling; a disabled scaler passes everything through.
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model compiled when asked, else itself. Static shapes: with automatic dynamic
        shapes, the short last batch of an epoch would switch every later full batch to a slower
        dynamic-shape graph; a graph per batch shape (train, last, eval) stays well in the cache."""
        return torch.compile(model, mode=self.compile_mode, dynamic=False) if self.compile else model

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model


def cpu_has_bf16() -> bool:
    """AVX512-BF16 (also on every AMX CPU); torch has no public check, so the private one."""
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def defaults(kind: str) -> dict:
    """The measured defaults for a device kind, adjusted to this machine's bf16 support."""
    if kind == "cpu" and cpu_has_bf16():
        return {**DEFAULTS["cpu"], "precision": "bf16"}
    if kind == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return {**DEFAULTS["cuda"], "precision": "fp16"}  # before Ampere: fp16 tensor cores only
    return DEFAULTS[kind]


def _available(kind: str) -> bool:
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


def resolve(cfg, ranks: Ranks = Ranks()) -> Runtime:
    """Where and how this rank runs; a UserError for a device, precision or rank setting this
    machine cannot give."""
    kind = cfg.type
    if kind == "auto":
        kind = next(k for k in ("cuda", "mps", "cpu") if _available(k))
    elif not _available(kind):
        raise UserError(f"device={kind}: no {kind} device is available here; use device=auto or device=cpu")
    chosen = defaults(kind)
    precision = cfg.precision or chosen["precision"]
    # Pre-Ampere GPUs can hold bf16 tensors but only emulate its arithmetic, slowly.
    if precision == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("device.precision=bf16: this GPU has no bf16 support; use fp16 or fp32")
    if kind == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
    if cfg.get("sync_bn") and kind != "cuda":
        raise UserError(f"device.sync_bn=true: torch's SyncBatchNorm runs on CUDA only and this run is on "
                        f"{kind}; set device=cuda, or leave device.sync_bn=false")
    if kind == "cuda" and ranks.local_rank >= torch.cuda.device_count():
        raise UserError(f"{ranks.world_size} ranks: local rank {ranks.local_rank} has no GPU of its own, this "
                        f"node has {torch.cuda.device_count()}; start at most that many ranks per node")
    channels_last = chosen["channels_last"] if cfg.channels_last is None else cfg.channels_last
    return Runtime(torch.device(kind), precision, channels_last, cfg.compile, cfg.compile_mode)
