"""What pruning saves a search, side by side: the same seeded TPE search on Fashion-MNIST with and
without a pruner, the same number of trials, one after the other in one invocation.

    python benchmarks/search.py --root DIR [--trials 12] [--epochs 6] [--pruner median|hyperband]
        [--device auto|cpu|cuda] [--json FILE] [--out DIR] [OVERRIDE ...]

Each search is `python -m resnet_lab hparams_search=optuna` over the learning rate and weight
decay of Adam (TPE, seed 0, 4 startup trials), choosing on a validation split of 0.1 of the
training set. To fit a CPU, each epoch is cut to --train-batches batches of 128 and each
evaluation to --eval-batches batches of 500 (of the validation and of the test split), and the
ResNet-18 is --width wide. Further OVERRIDEs go to both searches as they are. The median pruner
waits for 2 finished trials (Optuna's default, 5, would leave almost half of 12 trials unpruned)
and may stop a trial from its first epoch on; hyperband runs from 1 epoch to --epochs, halving by 3.

Reported for each: the epochs trained in all, the wall seconds, the best validation accuracy,
the best trial's test accuracy at its best validation epoch, and the trials pruned; then the
pruned search's share of the unpruned one's epochs and its best validation accuracy's distance
from the unpruned one's (the target: within 0.005 in at most half the epochs).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
from omegaconf import OmegaConf
from optuna.trial import TrialState

from resnet_lab.device import device_name
from resnet_lab.sweeps import results
from resnet_lab.studies import open_storage

def pruner(name: str, epochs: int) -> list:
    if name == "hyperband":
        return ["hydra/sweeper/pruner=hyperband", "hydra.sweeper.pruner.min_resource=1",
                f"hydra.sweeper.pruner.max_resource={epochs}", "hydra.sweeper.pruner.reduction_factor=3"]
    return ["hydra/sweeper/pruner=median", "hydra.sweeper.pruner.n_startup_trials=2",
            "hydra.sweeper.pruner.n_warmup_steps=1"]


def search(args, name: str, pruning: list, out: Path) -> dict:
    sweep = out / name
    command = [sys.executable, "-m", "resnet_lab", "hparams_search=optuna", f"hydra.sweep.dir={sweep}",
               f"hydra.sweeper.study_name={name}", f"hydra.sweeper.n_trials={args.trials}",
               "hydra.sweeper.sampler.seed=0", "hydra.sweeper.sampler.n_startup_trials=4",
               # The search space: these two; the default space's model and batch size fixed.
               "optim.lr=tag(log, interval(1e-4, 3e-2))", "optim.weight_decay=tag(log, interval(1e-6, 1e-2))",
               "model=resnet18",
               f"dataset.root={args.root}", "dataset.download=false", "dataset.val_fraction=0.1",
               f"device={args.device}", f"model.width={args.width}", f"trainer.epochs={args.epochs}",
               "trainer.batch_size=128",
               f"trainer.limit_train_batches={args.train_batches}",
               "trainer.eval_batch_size=500", f"trainer.limit_eval_batches={args.eval_batches}",
               "trainer.progress=false", "trainer.save_weights=false",
               *pruning, *args.overrides]
    start = time.monotonic()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"error: the {name} search failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    record = OmegaConf.load(sweep / results.RECORD)
    study = optuna.load_study(study_name=record.study_name, storage=open_storage(record.storage))
    trials = study.get_trials(deepcopy=False)
    best = study.best_trial
    return {"wall_s": wall, "trials": len(trials),
            "epochs": sum(len(t.intermediate_values) for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "best_val_acc": best.value, "best_trial": best.number, "best_params": best.params,
            "best_trial_test_acc": results.test_at_best_epoch(sweep / best.user_attrs["folder"], "val_acc")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="the folder that holds FashionMNIST/raw")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--pruner", choices=["hyperband", "median"], default="median")
    parser.add_argument("--train-batches", type=int, default=40)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--out", type=Path, help="where the two sweep folders go (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if not (Path(args.root) / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        sys.exit(f"error: {args.root}/FashionMNIST/raw/train-images-idx3-ubyte not found; --root is the "
                 f"folder that holds FashionMNIST/raw")
    out = args.out or Path(tempfile.mkdtemp(prefix="search_bench_"))
    load = os.getloadavg()[0]
    runs = {"unpruned": search(args, "unpruned", ["hydra/sweeper/pruner=none"], out),
            args.pruner: search(args, args.pruner, pruner(args.pruner, args.epochs), out)}
    plain, pruned = runs["unpruned"], runs[args.pruner]
    kind = "cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu"
    result = {"device_name": device_name(kind), "trials": args.trials, "epochs": args.epochs,
              "train_batches": args.train_batches, "eval_batches": args.eval_batches, "width": args.width,
              "loadavg_start": load, "loadavg_end": os.getloadavg()[0], "searches": runs,
              "epoch_share": pruned["epochs"] / plain["epochs"],
              "best_val_gap": plain["best_val_acc"] - pruned["best_val_acc"]}
    print(f"{result['device_name']}; {args.trials} trials of up to {args.epochs} epochs "
          f"({args.train_batches} batches of 128 each)")
    print(f"{'search':<12}{'epochs':>8}{'wall s':>9}{'pruned':>8}{'best val':>10}{'its test':>10}")
    for name, r in runs.items():
        test = f"{r['best_trial_test_acc']:.4f}" if r["best_trial_test_acc"] is not None else "-"
        print(f"{name:<12}{r['epochs']:>8}{r['wall_s']:>9.0f}{r['pruned']:>8}{r['best_val_acc']:>10.4f}{test:>10}")
    print(f"{args.pruner}: {result['epoch_share']:.0%} of the unpruned search's epochs, its best validation "
          f"accuracy {pruned['best_val_acc']:.4f} against {plain['best_val_acc']:.4f} "
          f"({-result['best_val_gap']:+.4f}; the target: within 0.005 in at most 50% of the epochs)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
