"""`python -m resnet_lab.export RUN_DIR --format torchscript|onnx|pt2 [--out PATH]
[checkpoint=last|best|ema|PATH] [overrides]`: a trained run's model for serving, checked against
eager PyTorch.

The exported model takes what the run's data set gives before normalisation, uint8 images
N x C x H x W at the run's size, and returns logits: the run's normalisation (per-channel mean
and std of its training images) is folded in, so a server needs no constants of its own. It is
exported on the CPU in fp32, in eval mode; its outputs on a batch of test images are compared with
the eager model's, and the largest absolute difference printed. Nothing is left at --out unless
that check passes.
"""

import argparse
import os
import warnings
from pathlib import Path
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from resnet_lab.errors import UserError
from resnet_lab.trained import load as trained

OPTIONS = {"checkpoint": "last"}
SUFFIXES = {"torchscript": ".torchscript.pt", "onnx": ".onnx", "pt2": ".pt2"}
CPU_FP32 = ["device=cpu", "device.precision=fp32", "device.channels_last=false", "device.compile=false"]
TOLERANCE = 1e-4  # of the largest absolute difference, relative to the largest logit (at least 1)
CHECK_IMAGES = 8


class Deployed(nn.Module):
    """uint8 images in, logits out: the run's normalisation, then its model."""

    def __init__(self, model: nn.Module, normalizer):
        super().__init__()
        self.model = model
        self.register_buffer("shift", normalizer.shift.cpu())
        self.register_buffer("scale", normalizer.scale.cpu())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # As resnet_lab.data.loader.Normalizer computes it, to the bit.
        return self.model((images.float() - self.shift) * self.scale)


def torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    torch.jit.save(torch.jit.trace(module, example), str(path))
    return torch.jit.load(str(path))


def pt2(module: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    batch = torch.export.Dim("batch", min=1)
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: batch},)), str(path))
    return torch.export.load(str(path)).module()


def onnx(module: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    try:
        import onnx as _  # noqa: F401  (the exporter needs it; onnxruntime runs the check)
        import onnxruntime
    except ImportError as e:
        raise UserError(f"--format onnx needs the packages onnx and onnxruntime ({e.name} is missing): "
                        f"pip install 'resnet_lab[onnx]'") from e
    with warnings.catch_warnings():
        # The TorchScript-based exporter needs no onnxscript; torch warns that it is not the default.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


FORMATS: Dict[str, Callable] = {"torchscript": torchscript, "onnx": onnx, "pt2": pt2}


def export(run: trained.Trained, fmt: str, out: Path) -> float:
    """Write the run's model as `fmt` to `out`; the largest absolute difference from eager."""
    module = Deployed(run.model, run.data.normalizer).eval()
    images = trained.sample_images(run.data, CHECK_IMAGES)
    tmp = out.with_name(f".tmp-{out.name}")  # the suffix kept: torch.export.load reads it
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            loaded = FORMATS[fmt](module, images[:2], tmp)
            eager, exported = module(images), loaded(images)
        diff = (eager - exported).abs().max().item()
        allowed = TOLERANCE * max(1.0, eager.abs().max().item())
        if not diff <= allowed:
            raise UserError(f"the {fmt} export of {run.weights} differs from eager PyTorch by {diff:.3g} "
                            f"(allowed {allowed:.3g}); nothing was written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def main(args: Sequence[str]) -> Path:
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the folder of a training run")
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--out", help="the file to write (default: RUN_DIR/export/model<suffix of the format>)")
    parser.add_argument("settings", nargs="*", help="checkpoint=last|best|ema|PATH, and config overrides")
    ns = parser.parse_args(args)
    options, overrides = trained.split_args(ns.settings, OPTIONS)
    run = trained.load(Path(ns.run_dir), options["checkpoint"], [*overrides, *CPU_FP32])
    out = Path(ns.out) if ns.out else run.run_dir / "export" / f"model{SUFFIXES[ns.format]}"
    diff = export(run, ns.format, out)
    shape = list(trained.sample_images(run.data, 1).shape[1:])
    print(f"wrote {out} ({ns.format}): uint8 images N x {' x '.join(map(str, shape))} in, "
          f"{run.data.num_classes} logits out; max abs difference from eager PyTorch on "
          f"{CHECK_IMAGES} test images: {diff:.3g}")
    return out


if __name__ == "__main__":
    trained.main(main)
