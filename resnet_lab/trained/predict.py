"""`python -m resnet_lab.predict RUN_DIR IMAGES... [--out predictions.csv] [--top-k 5]
[checkpoint=last|best|ema|PATH] [overrides]`: a trained run's classes for image files, or for every
image under folders.

Each image is prepared as the run's data set prepared its images: grey or colour as the run's
input channels, decoded and resized to the run's image size where it differs as image_folder
decodes and resizes, normalised with the run's mean and std; with the run's test-time
augmentation (trainer.tta, trainer.tta_shift; override them to predict without).
"""

import argparse
from pathlib import Path
from typing import List, Sequence

import torch

from resnet_lab import rundir
from resnet_lab.data.images import IMAGE_SUFFIXES, decode
from resnet_lab.errors import UserError
from resnet_lab.trained import load as trained
from resnet_lab.training.engine import predict

OPTIONS = {"checkpoint": "last"}


def image_paths(paths: Sequence[str]) -> List[Path]:
    """The files given, and the images under the folders given (sorted), in the order given."""
    found = []
    for name in paths:
        path = Path(name).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not inside:
                raise UserError(f"{path}: no images in this folder (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.exists():
            found.append(path)
        else:
            raise UserError(f"{path}: no such file or folder; give image files or folders of images")
    return found


def probabilities(run: trained.Trained, paths: List[Path]) -> torch.Tensor:
    """Each image's class probabilities (N x classes), batch by batch."""
    size = trained.sample_images(run.data, 1).shape[-2:]
    batch_size = run.cfg.trainer.eval_batch_size
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            images = torch.stack([decode(str(p), run.data.in_channels, what="predict", size=size) for p in paths[start:start + batch_size]])
            x = run.data.normalizer(images.to(run.runtime.device), None, slice(None), len(images))
            with run.runtime.autocast():
                logits = predict(run.model, x, run.cfg.trainer.tta, run.cfg.trainer.tta_shift)
            out.append(logits.float().softmax(1).cpu())
    return torch.cat(out)


def table(paths: List[Path], probs: torch.Tensor, classes: List[str], k: int) -> List[List]:
    """Rows of file, then class and probability for the k likeliest classes."""
    top = probs.topk(min(k, probs.shape[1]), 1)
    return [[str(path), *[x for c, p in zip(idx.tolist(), val.tolist()) for x in (classes[c], p)]]
            for path, idx, val in zip(paths, top.indices, top.values)]


def csv_bytes(rows: List[List], k: int) -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["file", *[x for i in range(1, k + 1) for x in (f"class_{i}", f"probability_{i}")]])
    writer.writerows([[row[0], *[f"{x:.6f}" if isinstance(x, float) else x for x in row[1:]]] for row in rows])
    return out.getvalue().encode()


def parse(args: Sequence[str]):
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the folder of a training run")
    parser.add_argument("images", nargs="+", help="image files or folders; key=value: checkpoint= or a config override")
    parser.add_argument("--out", help="write the predictions to this CSV file")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    ns = parser.parse_args(args)
    words = [w for w in ns.images if "=" in w and not Path(w).exists()]
    options, overrides = trained.split_args(words, OPTIONS)
    return ns, options, overrides, [w for w in ns.images if w not in words]


def main(args: Sequence[str]) -> List[List]:
    ns, options, overrides, images = parse(args)
    if ns.top_k < 1:
        raise UserError(f"--top-k={ns.top_k}: must be at least 1")
    paths = image_paths(images)
    run = trained.load(Path(ns.run_dir), options["checkpoint"], overrides)
    rows = table(paths, probabilities(run, paths), run.data.classes, ns.top_k)
    if ns.out:
        out = Path(ns.out)
        rundir.write_file(out, lambda f: f.write(csv_bytes(rows, min(ns.top_k, run.data.num_classes))))
        print(f"{len(rows)} images: wrote {out}")
    else:
        for row in rows:
            print(f"{row[0]}: " + ", ".join(f"{c} {p:.4f}" for c, p in zip(row[1::2], row[2::2])))
    return rows


if __name__ == "__main__":
    trained.main(main)
