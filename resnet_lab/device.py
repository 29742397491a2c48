"""Where and how the model runs: device, precision, memory format, compilation."""

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from resnet_lab.distributed import Ranks
from resnet_lab.errors import UserError

# Defaults for settings left null, per device, chosen from measurements (docs/devices.md).
# CPU: channels_last helps or is neutral, except on networks whose convolutions crash oneDNN
# (`channels_last_hazard`); bf16 autocast is the fastest precision where oneDNN runs the CPU's
# bf16 instructions and slower than fp32 where it emulates them (see `defaults`).
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
    channels_last_asked: bool = False  # set by the user, not by the defaults
    layout_hazard: bool = False  # prepare() found a convolution channels_last would crash

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
        if not self.compile:
            return model
        if not self.layout_hazard:
            return torch.compile(model, mode=self.compile_mode, dynamic=False)
        # Inductor turns convolutions channels_last by itself: the crash prepare() steered clear of.
        from torch._inductor import list_mode_options

        options = {**list_mode_options(self.compile_mode), "layout_optimization": False}
        return torch.compile(model, options=options, dynamic=False)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on the device, in channels_last where that is chosen and safe: a default
        channels_last is dropped on a network with a convolution that crashes oneDNN, an
        asked-for one is a UserError naming it."""
        hazard = channels_last_hazard(model) if self.device.type == "cpu" else None
        self.layout_hazard = hazard is not None
        if hazard and self.channels_last and self.channels_last_asked:
            raise UserError(f"device.channels_last=true: {hazard}; leave device.channels_last unset (null) or "
                            "set it to false")
        self.channels_last = self.channels_last and not hazard
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format


def device_name(kind: str) -> str:
    """The GPU's name, or the CPU's model, cores and the widest instruction set torch dispatches to."""
    if kind == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                 platform.processor())
    return f"{model}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def resolved(runtime: Runtime) -> Dict:
    """What the run's config left to the machine (device.type auto, precision and channels_last
    null), as this machine settled it, and what runs the kernels: for the run's record."""
    cudnn = torch.backends.cudnn.version() if runtime.device.type == "cuda" else None
    return {"device": runtime.device.type, "device_name": device_name(runtime.device.type),
            "precision": runtime.precision, "memory_format": "channels_last" if runtime.channels_last else "contiguous",
            "compile": runtime.compile_mode if runtime.compile else False,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn,
            "cpu_isa": torch.backends.cpu.get_cpu_capability(), "onednn_isa": onednn_isa(),
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version()}


def _cpu_supports(feature: str) -> bool:
    """A CPU feature (avx2, avx512, avx512_bf16) as the hardware reports it; torch has no public
    check, so the private ones."""
    check = getattr(torch.cpu, f"_is_{feature}_supported", None)
    return bool(check and check())


# oneDNN's ISA names, lowest first, as ONEDNN_MAX_CPU_ISA takes them (its cpu_isa_traits).
ISA_ORDER = ("sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni",
             "avx512_core_bf16", "avx10_1_512", "avx512_core_fp16", "avx10_1_512_amx", "avx512_core_amx",
             "avx10_1_512_amx_fp16", "avx512_core_amx_fp16")


def onednn_isa() -> str:
    """The widest instruction set oneDNN's CPU kernels will use here: the hardware's, capped by
    ONEDNN_MAX_CPU_ISA (or its older name DNNL_MAX_CPU_ISA)."""
    hardware = ("avx512_core_bf16" if _cpu_supports("avx512_bf16") else "avx512_core" if _cpu_supports("avx512")
                else "avx2" if _cpu_supports("avx2") else "sse41")
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "all").lower()
    if cap in ISA_ORDER and ISA_ORDER.index(cap) < ISA_ORDER.index(hardware):
        return cap
    return hardware


def onednn_runs_avx512() -> bool:
    return ISA_ORDER.index(onednn_isa()) >= ISA_ORDER.index("avx512_core")


def channels_last_hazard(model: torch.nn.Module) -> Optional[str]:
    """Why channels_last would crash this model on this CPU, or None. oneDNN's backward of a
    strided 1x1 convolution with fewer input channels than one vector register holds fp32s (8
    with AVX2, 16 with AVX-512) corrupts memory in channels_last: SIGSEGV, SIGBUS, `double free`,
    or a hang with 2 threads (torch 2.14.1; with AVX-512 only at inputs of 56x56 and more, which
    a convolution's place in the network does not tell, so any size counts).
    benchmarks/onednn_channels_last_repro.py finds the cases; docs/devices.md lists them."""
    lanes = 16 if onednn_runs_avx512() else 8
    for name, conv in model.named_modules():
        if (isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and max(conv.stride) > 1
                and conv.in_channels < lanes):
            return (f"the {conv.in_channels}-channel strided 1x1 convolution {name} crashes oneDNN's "
                    f"{'AVX-512' if lanes == 16 else 'AVX2'} kernels in channels_last")
    return None


def defaults(kind: str) -> dict:
    """The measured defaults for a device kind, adjusted to this machine's bf16 support: bf16
    only where oneDNN runs bf16 instructions and ATen's kernels are AVX-512 (emulated, or in
    AVX2 elementwise kernels, it is slower than fp32)."""
    if kind == "cpu" and onednn_isa() == "avx512_core_bf16" and torch.backends.cpu.get_cpu_capability() == "AVX512":
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
    return Runtime(torch.device(kind), precision, channels_last, cfg.compile, cfg.compile_mode,
                   channels_last_asked=cfg.channels_last is not None)
