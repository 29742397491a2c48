"""`python -m resnet_lab.evaluate RUN_DIR [checkpoint=last|best|ema|PATH] [name=NAME] [overrides]`:
a trained run measured again, on its test split or another data set with its classes.

Writes into RUN_DIR/eval/: <name>.json (accuracy, loss, top-5 accuracy where there are more than
5 classes, per-class precision, recall and accuracy, the confusion matrix), the matrix as
<name>_confusion.csv and as a heat map <name>_confusion.png, <name>_wrong.png (the most
confidently wrong images, with their true and predicted classes) and <name>_predictions.csv (one
row per image). With logger=wandb the same go to a W&B run with job_type=eval.
"""

import argparse
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from resnet_lab import rundir
from resnet_lab.errors import UserError
from resnet_lab.trained import load as trained
from resnet_lab.training import confusion
from resnet_lab.training.engine import evaluate
from resnet_lab.training.tracking import log_evaluation

OPTIONS = {"checkpoint": "last", "name": "", "wrong": "16"}


@dataclass
class Kept:
    """engine.evaluate's `keep`: the confusion matrix, each image's prediction and confidence,
    top-5 hits, and the `wrong` most confidently wrong images (inputs as the model saw them)."""

    num_classes: int
    device: torch.device
    wrong: int
    preds: List[torch.Tensor] = field(default_factory=list)
    confidences: List[torch.Tensor] = field(default_factory=list)
    labels: List[torch.Tensor] = field(default_factory=list)
    top5: int = 0  # images whose class is among the 5 likeliest (a device tensor once counted)

    def __post_init__(self):
        self.confusion = confusion.Confusion(self.num_classes, self.device)
        self.worst: Optional[Dict[str, torch.Tensor]] = None

    def __call__(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.confusion.add(x, logits, y)
        confidence, pred = logits.float().softmax(1).max(1)
        self.preds.append(pred)
        self.confidences.append(confidence)
        self.labels.append(y)
        if self.num_classes > 5:
            self.top5 = self.top5 + (logits.topk(5, 1).indices == y[:, None]).any(1).sum()
        wrong = pred != y
        batch = {"confidence": confidence[wrong], "x": x[wrong].float(), "y": y[wrong], "pred": pred[wrong]}
        if self.worst is not None:
            batch = {k: torch.cat([self.worst[k], v]) for k, v in batch.items()}
        order = batch["confidence"].argsort(descending=True)[:self.wrong]
        self.worst = {k: v[order] for k, v in batch.items()}


def image_files(loader) -> Optional[List[str]]:
    """The test images' files, in the loader's order (image_folder, cached or not), or None."""
    if getattr(loader, "files", None) is not None:
        return loader.files
    dataset = getattr(loader, "dataset", None)
    return [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else None


def predictions_csv(kept: Kept, classes: List[str], files: Optional[List[str]]) -> str:
    preds, labels = torch.cat(kept.preds).tolist(), torch.cat(kept.labels).tolist()
    confidences = torch.cat(kept.confidences).tolist()
    lines = ["index,file,true,predicted,confidence"]
    for i, (y, p, c) in enumerate(zip(labels, preds, confidences)):
        name = files[i] if files else ""
        lines.append(f"{i},{_csv_field(name)},{_csv_field(classes[y])},{_csv_field(classes[p])},{c:.6f}")
    return "\n".join(lines) + "\n"


def _csv_field(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(ch in text for ch in ',"\n') else text


def shown_images(kept: Kept, normalizer) -> List[torch.Tensor]:
    """The kept wrong images as H x W x C floats in [0, 1], their normalisation undone."""
    if kept.worst is None:
        return []
    x = kept.worst["x"] / normalizer.scale + normalizer.shift
    return list((x / 255).clamp(0, 1).permute(0, 2, 3, 1).cpu())


def wrong_grid_png(images: List[torch.Tensor], kept: Kept, classes: List[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(1, min(8, len(images)))
    rows = max(1, -(-len(images) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2 * cols, 2.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, y, p, c in zip(axes.flat, images, kept.worst["y"].tolist() if images else [],
                                  kept.worst["pred"].tolist() if images else [],
                                  kept.worst["confidence"].tolist() if images else []):
        ax.imshow((image.squeeze(-1) if image.shape[-1] == 1 else image).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"true {classes[y]}\npred {classes[p]} {c:.2f}", fontsize=8)
    if not images:
        fig.text(0.5, 0.5, "no wrong predictions", ha="center")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def measure(run: trained.Trained, wrong: int = 16):
    """The run's model over its test loader, with the run's test-time augmentation (as its
    test_acc was measured; trainer.tta=false measures without): (metrics, Kept)."""
    kept = Kept(run.data.num_classes, run.runtime.device, wrong)
    metrics = evaluate(run.model, run.data.test, run.runtime, keep=kept, tta=run.cfg.trainer.tta,
                       tta_shift=run.cfg.trainer.tta_shift)
    return metrics, kept


def result(run: trained.Trained, metrics: Dict, kept: Kept) -> Dict:
    classes = run.data.classes
    out = {"run": str(run.run_dir), "weights": str(run.weights), "dataset": run.cfg.dataset.name,
           "images": sum(len(p) for p in kept.preds), "accuracy": metrics["test_acc"], "loss": metrics["test_loss"]}
    if run.data.num_classes > 5:
        out["top5_accuracy"] = int(kept.top5) / out["images"]
    return {**out, **confusion.report(kept.confusion.matrix(), classes)}


def default_name(run: trained.Trained, choice: str) -> str:
    label = choice if choice in trained.CHECKPOINTS else Path(choice).stem
    return f"{run.cfg.dataset.name}-{label}"


def main(args: Sequence[str]) -> Dict:
    parser = argparse.ArgumentParser(prog="python -m resnet_lab.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the folder of a training run")
    parser.add_argument("settings", nargs="*", help="checkpoint=last|best|ema|PATH (default last), name=NAME "
                        "(default <dataset>-<checkpoint>), wrong=N (default 16), and config overrides, "
                        "e.g. dataset=mnist dataset.root=data logger=wandb")
    ns = parser.parse_args(args)
    options, overrides = trained.split_args(ns.settings, OPTIONS)
    if not options["wrong"].isdigit():
        raise UserError(f"wrong={options['wrong']}: must be a whole number of images (0 for none)")
    run = trained.load(Path(ns.run_dir), options["checkpoint"], overrides)
    metrics, kept = measure(run, int(options["wrong"]))
    report = result(run, metrics, kept)
    name = options["name"] or default_name(run, options["checkpoint"])
    images = shown_images(kept, run.data.normalizer)
    grid = wrong_grid_png(images, kept, run.data.classes)
    table = predictions_csv(kept, run.data.classes, image_files(run.data.test))
    folder = run.run_dir / rundir.EVAL
    written = confusion.write_all(folder, name, report, f"{run.cfg.model.name} on {run.cfg.dataset.name}")
    for file, data in ((f"{name}_wrong.png", grid), (f"{name}_predictions.csv", table.encode())):
        rundir.write_file(folder / file, lambda f, data=data: f.write(data))
    top5 = f", top-5 {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""
    print(f"{run.weights}: accuracy {report['accuracy']:.4f}, loss {report['loss']:.4f}{top5} on "
          f"{report['images']} {run.cfg.dataset.name} images; wrote {folder}/{name}.json and "
          f"{len(written) + 1} more")
    if run.cfg.logger.name == "wandb":
        wrong = [[(image * 255).round().byte().squeeze(-1).numpy(), run.data.classes[y], run.data.classes[p], c]
                 for image, y, p, c in zip(images, *(kept.worst[k].tolist() for k in ("y", "pred", "confidence")))]
        log_evaluation(run.cfg, run.run_dir, name, report, wrong)
    return report


if __name__ == "__main__":
    trained.main(main)
