"""`python -m resnet_lab.export RUN_DIR --format pt2|onnx [--out PATH]
[checkpoint=last|best|ema|PATH] [overrides]`: a trained run's model for serving, checked against
eager PyTorch.

The exported model takes what the run's data set gives before normalisation, uint8 images
N x C x H x W at the run's size, and returns logits: the run's normalisation (per-channel mean
and std of its training images) is folded in, so a server needs no constants of its own. It is
exported on the CPU in fp32, in eval mode; its outputs on a batch of test images are compared with
the eager model's, and the largest absolute difference printed. Nothing is left at --out unless
that check passes. Both formats come from torch.export; TorchScript, which torch deprecates, is
not offered.
"""

import argparse
import io
from pathlib import Path
from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import nn

from resnet_lab import rundir
from resnet_lab.errors import UserError
from resnet_lab.trained import load as trained

OPTIONS = {"checkpoint": "last"}
SUFFIXES = {"onnx": ".onnx", "pt2": ".pt2"}
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


def dynamic_batch() -> tuple:
    """torch.export's dynamic_shapes for the one input: any batch size."""
    return ({0: torch.export.Dim("batch", min=1)},)


# Each format: the exported file's bytes, and the model read back from them (for the check).
# Exported in memory, so that the file is written as every other output is (rundir.write_file).
def pt2(module: nn.Module, example: torch.Tensor) -> Tuple[bytes, Callable]:
    data = io.BytesIO()
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=dynamic_batch()), data)
    return data.getvalue(), torch.export.load(io.BytesIO(data.getvalue())).module()


def onnx(module: nn.Module, example: torch.Tensor) -> Tuple[bytes, Callable]:
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; onnxruntime runs the check)
        import onnxruntime
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise UserError(f"--format onnx needs the packages onnx, onnxscript and onnxruntime ({e.name} is "
                        f"missing): pip install 'resnet_lab[onnx]'") from e
    # The weights inside the one file: they are far below ONNX's 2 GB limit.
    program = torch.onnx.export(module, (example,), input_names=["images"], output_names=["logits"],
                                dynamic_shapes=dynamic_batch(), dynamo=True, verbose=False)
    data = program.model_proto.SerializeToString()
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return data, lambda images: torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


FORMATS: Dict[str, Callable] = {"onnx": onnx, "pt2": pt2}


def export(run: trained.Trained, fmt: str, out: Path) -> float:
    """Write the run's model as `fmt` to `out`; the largest absolute difference from eager."""
    module = Deployed(run.model, run.data.normalizer).eval()
    images = trained.sample_images(run.data, CHECK_IMAGES)
    with torch.no_grad():
        data, loaded = FORMATS[fmt](module, images[:2])
        eager, exported = module(images), loaded(images)
    diff = (eager - exported).abs().max().item()
    allowed = TOLERANCE * max(1.0, eager.abs().max().item())
    if not diff <= allowed:
        raise UserError(f"the {fmt} export of {run.weights} differs from eager PyTorch by {diff:.3g} "
                        f"(allowed {allowed:.3g}); nothing was written")
    rundir.write_file(out, lambda f: f.write(data), after=", or give --out a file elsewhere")
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
