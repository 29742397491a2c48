"""A confusion matrix counted on the device while a model is evaluated, what it says per class,
and its forms for people: JSON, CSV, a PNG heat map and W&B charts."""

import csv
import io
import json
from pathlib import Path
from typing import Dict, List

import torch

from resnet_lab import distributed
from resnet_lab.rundir import write_file


class Confusion:
    """Counts (true class, predicted class) pairs on the device: one bincount per batch, no sync."""

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        self.counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)

    def add(self, x: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """engine.evaluate's `keep` (the inputs are not needed)."""
        pairs = y * self.num_classes + logits.argmax(1)
        self.counts += torch.bincount(pairs, minlength=self.counts.numel())

    def matrix(self) -> List[List[int]]:
        """Rows: true classes, columns: predicted ones; summed over the ranks (all must ask)."""
        counts = distributed.all_reduce(self.counts.clone())
        return counts.view(self.num_classes, self.num_classes).tolist()


def per_class(matrix: List[List[int]], classes: List[str]) -> Dict[str, Dict[str, float]]:
    """For each class: its images (`count`), `precision` (of the images predicted as it, the
    share that are), `recall` (of its images, the share predicted as it), and `accuracy`, the
    accuracy on its images (as torchmetrics' per-class accuracy; equal to recall)."""
    m = torch.tensor(matrix, dtype=torch.float64)
    hits, truths, predicted = m.diag(), m.sum(1), m.sum(0)
    recall = torch.where(truths > 0, hits / truths.clamp_min(1), torch.nan)
    precision = torch.where(predicted > 0, hits / predicted.clamp_min(1), torch.nan)
    return {name: {"count": int(truths[i]), "precision": _number(precision[i]), "recall": _number(recall[i]),
                   "accuracy": _number(recall[i])} for i, name in enumerate(classes)}


def _number(x: torch.Tensor):
    """A float for JSON, or None where it is undefined (a class with no images or predictions)."""
    return None if torch.isnan(x) else float(x)


def report(matrix: List[List[int]], classes: List[str]) -> Dict:
    return {"classes": classes, "confusion_matrix": matrix, "per_class": per_class(matrix, classes)}


def csv_text(matrix: List[List[int]], classes: List[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["true \\ predicted", *classes])
    for name, row in zip(classes, matrix):
        writer.writerow([name, *row])
    return out.getvalue()


def heatmap_png(matrix: List[List[int]], classes: List[str], title: str) -> bytes:
    """The matrix as a heat map with class names on both axes (matplotlib's Agg: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    size = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 20:  # the counts stay readable
        top = max(max(row) for row in matrix) or 1
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                ax.text(j, i, count, ha="center", va="center", fontsize=8,
                        color="white" if count > top / 2 else "black")
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def json_bytes(obj: Dict) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_all(folder: Path, name: str, result: Dict, title: str) -> List[Path]:
    """<name>.json, <name>_confusion.csv and <name>_confusion.png in folder, each whole or not
    at all."""
    matrix, classes = result["confusion_matrix"], result["classes"]
    files = {f"{name}.json": json_bytes(result), f"{name}_confusion.csv": csv_text(matrix, classes).encode(),
             f"{name}_confusion.png": heatmap_png(matrix, classes, title)}
    for file, data in files.items():
        write_file(folder / file, lambda f, data=data: f.write(data))
    return [folder / file for file in files]


def wandb_charts(matrix: List[List[int]], classes: List[str], prefix: str) -> Dict:
    """W&B's confusion-matrix chart and a bar chart of the per-class accuracy, to wandb.log."""
    import wandb

    truths = [i for i, row in enumerate(matrix) for j, count in enumerate(row) for _ in range(count)]
    preds = [j for row in matrix for j, count in enumerate(row) for _ in range(count)]
    rows = [[name, stats["accuracy"]] for name, stats in per_class(matrix, classes).items()]
    accuracy = wandb.Table(data=rows, columns=["class", "accuracy"])
    return {f"{prefix}/confusion_matrix": wandb.plot.confusion_matrix(y_true=truths, preds=preds,
                                                                     class_names=list(classes)),
            f"{prefix}/per_class_accuracy": wandb.plot.bar(accuracy, "class", "accuracy",
                                                           title="accuracy per class")}
