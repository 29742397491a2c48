"""Checkpoints: all a run needs to continue exactly where it stopped, written atomically.

A checkpoint holds the position (`epoch` and `step`: the next batch to train), the model,
optimizer, scheduler and grad-scaler states, the epoch's running totals, the objective's best value
so far and its epoch (whose weights best.pt holds), the last epoch's metrics, every rank's RNG
states, the resolved config, the data's class names, the W&B run id, and the state of each
training feature (an EMA's weights, say) under `features`.
The loaders need no state of their own: each batch is a function of (seed, epoch, batch index).

The weights are not inside last.pt: each checkpoint writes them to a file of their own,
`weights-<tag>.pt` beside it (a state dict of CPU tensors), and last.pt names that file. A new
name every time makes the pair safe against a kill between the two writes (last.pt names the old
file until it is replaced, and the old file goes only after), and lets `best.pt` and the run's
`model.pt` be hard links to the same bytes rather than copies: a run keeps its weights once and
the optimizer state once, and while it trains once more for the checkpoint before the last:
replacing last.pt keeps the old one as previous.pt (a hard link), with its weights file, to resume
from should last.pt fail its check. A finished run removes that one.
"""

import json
import logging
import os
import random
import secrets
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from omegaconf import OmegaConf

from resnet_lab.errors import UserError
from resnet_lab.models.weights import differences
from resnet_lab.rundir import (BEST, CHECKPOINTS, EMA, LAST, PREVIOUS, WEIGHTS_PREFIX, atomic_write, damage,
                               keep_hydra_record, temporary, write_file)

log = logging.getLogger("resnet_lab")

KEYS = ("epoch", "step", "model", "optimizer", "scheduler", "scaler", "totals", "best_acc",
        "metrics", "rng", "config", "wandb_run_id")
# and "elapsed", "features", "best_epoch" and "classes", which older ones lack


def rng_states(device: torch.device) -> Dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, gauss),
              "torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: Dict, device: torch.device) -> None:
    random.setstate(states["python"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


class Damaged(UserError):
    """A checkpoint, or the weights file it names, that fails its check; `reason` says which and how."""

    def __init__(self, reason: str, advice: str):
        super().__init__(f"{reason}; {advice}")
        self.reason = reason


def load(path: Path) -> Dict:
    if not path.is_file():
        raise UserError(f"trainer.resume={path}: no such checkpoint file; give the path of a run's "
                        f"{CHECKPOINTS}/{LAST}, or trainer.resume=none to start afresh")
    damaged = damage(path)
    if damaged:
        raise Damaged(f"checkpoint {path} is damaged ({damaged})", _instead(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle and EOF errors all mean a damaged file)
        detail = " ".join(str(e).split())
        # torch puts what its weights-only unpickler met inside a paragraph on a default that
        # does not apply here.
        detail = detail.partition("WeightsUnpickler error: ")[2].partition(" Check the documentation")[0] or detail
        detail = detail[:160]
        raise Damaged(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {detail})",
                      _instead(path)) from e
    missing = [k for k in KEYS if k not in state] if isinstance(state, dict) else list(KEYS)
    if missing:
        raise UserError(f"{path} is not a resnet_lab checkpoint (it has no {', '.join(missing)}); "
                        f"give the path of a {CHECKPOINTS}/{LAST}")
    if isinstance(state["model"], str):  # the name of its weights file (older checkpoints hold them)
        state["weights_file"] = path.parent / state["model"]
        state["model"] = _load_weights(state["weights_file"], path)
    return state


def load_good(path: Path, use: str = "resuming from") -> Tuple[Dict, Path]:
    """The checkpoint at `path`, and the path it was read from: when `path` is a last.pt that
    fails its check, the checkpoint kept before it (previous.pt) if that one passes, saying so
    (`use`: what the caller does with it)."""
    try:
        return load(path), path
    except Damaged as damaged:
        previous = path.with_name(PREVIOUS)
        if path.name != LAST or not previous.is_file():
            raise
        try:
            state = load(previous)
        except UserError:
            raise damaged from None
        log.warning(f"{damaged.reason}; {use} the checkpoint kept before it, {previous} "
                    f"(epoch {state['epoch']} step {state['step']})")
        return state, previous


def _instead(path: Path) -> str:
    """What to do when checkpoint `path` cannot be read."""
    beside = [path.parent / name for name in (BEST, EMA) if (path.parent / name).is_file()]
    weights = f", or from the weights beside it with model.init={beside[0]}" if beside else ""
    return f"resume from another one with trainer.resume=<path>, start afresh with trainer.resume=none{weights}"


def _load_weights(weights: Path, path: Path) -> Dict:
    damaged = weights.is_file() and damage(weights)
    if damaged:
        raise Damaged(f"checkpoint {path} keeps its weights in {weights}, which is damaged ({damaged})",
                      _instead(path))
    try:
        return torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (missing, zip, pickle and EOF errors: the pair is broken)
        raise Damaged(f"checkpoint {path} keeps its weights in {weights}, which is missing or damaged "
                      f"({type(e).__name__})", "put that file back, or start afresh with trainer.resume=none") from e


def _check_fits(model: torch.nn.Module, saved: Dict, path: Path, saved_cfg: Dict) -> None:
    problems = differences(model, saved)
    if problems:
        raise UserError(f"checkpoint {path} does not fit this model ({'; '.join(problems)}); it was saved "
                        f"by model={saved_cfg['model']['name']} dataset={saved_cfg['dataset']['name']}: "
                        f"resume with those, or start afresh with trainer.resume=none")


def keep_epochs(metrics_file: Path, done: int) -> None:
    """Keep the rows of the epochs up to `done` in metrics.jsonl: a resumed run writes the later
    ones again. A row torn by a kill does not parse and goes too."""
    if not metrics_file.exists():
        return
    lines = metrics_file.read_text().splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            return line.endswith("\n") and json.loads(line)["epoch"] <= done
        except (ValueError, KeyError, TypeError):
            return False

    rows = [line for line in lines if kept(line)]
    if rows != lines:
        atomic_write(metrics_file, lambda f: f.write("".join(rows).encode()))


def _link(source: Path, target: Path) -> bool:
    """Make target a hard link to source, replacing it whole; False where the file system has no
    hard links (the caller then writes a copy)."""
    tmp = temporary(target, "link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, target)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def cpu_weights(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """A state dict of CPU tensors: the weights load anywhere, without a map_location."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


class Checkpointer:
    """Saves one run's training state into <run_dir>/checkpoints and restores it from a file."""

    def __init__(self, run_dir: Path, cfg, model, optimizer, scheduler, scaler, device: torch.device,
                 best_of_ema: bool = False):
        """best_of_ema: best.pt holds the EMA's weights (the objective is the EMA's)."""
        self.folder = run_dir / CHECKPOINTS
        self.cfg, self.device, self.best_of_ema = cfg, device, best_of_ema
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.record_kept = False
        self.weights: Optional[Path] = None  # the weights file of the last checkpoint written or restored
        # Whether the folder's last.pt passed its check (this run wrote it, or resumed from it),
        # and so is kept as previous.pt when the next checkpoint replaces it.
        self.keep_last = False

    def save(self, epoch: int, step: int, *, totals: Optional[Dict], best_acc: float, metrics: Dict,
             wandb_run_id: Optional[str], elapsed: float, rngs: Optional[List[Dict]] = None,
             features: Optional[Dict] = None, best: bool = False, best_epoch: Optional[int] = None,
             classes: Optional[List[str]] = None) -> None:
        """Write last.pt and its weights file (and best.pt) to continue at batch `step` of
        `epoch`; `elapsed`: the run's wall seconds so far, over all its resumed parts; `rngs`:
        every rank's random states, in rank order (default: this process's); `classes`: the
        data's class names, which `evaluate` holds another data set to."""
        rngs = rngs or [rng_states(self.device)]
        weights = cpu_weights(self.model)
        resume_after = ", then run again to resume"
        new = self.folder / f"{WEIGHTS_PREFIX}{secrets.token_hex(6)}.pt"
        write_file(new, lambda f: torch.save(weights, f), after=resume_after)
        state = {
            "epoch": epoch, "step": step,
            "model": new.name, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "totals": totals, "best_acc": best_acc, "best_epoch": best_epoch, "metrics": metrics,
            "rng": rngs[0], "rng_ranks": rngs[1:],
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "wandb_run_id": wandb_run_id, "elapsed": elapsed, "features": features or {}, "classes": classes,
        }
        # A hard link, no copy; where the file system has none, no previous checkpoint is kept.
        if self.keep_last:
            _link(self.folder / LAST, self.folder / PREVIOUS)
        try:
            write_file(self.folder / LAST, lambda f: torch.save(state, f), after=resume_after)
        except BaseException:
            new.unlink(missing_ok=True)
            raise
        # previous.pt names the weights file of the checkpoint before (just linked, or the one
        # this run resumed from after last.pt failed its check).
        kept, self.weights, self.keep_last = self.weights, new, True
        # Only now that last.pt names the new file may the older ones go (a kill in between
        # leaves an extra file, which the next checkpoint removes).
        self._remove_weights_but(new, kept)
        self.repair(state, best)
        if not self.record_kept:  # Hydra's record stays the same while the job runs
            keep_hydra_record(self.folder.parent)
            self.record_kept = True

    def repair(self, state: Dict, best: bool) -> None:
        """The files made from checkpoint `state` after it is written: ema.pt, and best.pt when
        `best` (its epoch is the best one). A run resumed after a kill between them makes them again."""
        after = f"; {LAST} was written: run again to resume"
        if "ema" in state["features"]:
            # The average's weights as a state dict of their own, for evaluate, export and model.init.
            ema = {k: v.detach().cpu() for k, v in state["features"]["ema"]["weights"].items()}
            write_file(self.folder / EMA, lambda f: torch.save(ema, f), after=after)
        if best:
            if self.best_of_ema:
                if not _link(self.folder / EMA, self.folder / BEST):
                    write_file(self.folder / BEST, lambda f: torch.save(ema, f), after=after)
            else:
                self.publish(self.folder / BEST, after=after)

    def drop_previous(self) -> None:
        """Remove previous.pt and its weights file: a finished run resumes no more, and keeps one
        checkpoint's bytes, not two."""
        (self.folder / PREVIOUS).unlink(missing_ok=True)
        if self.weights is not None:  # else which file last.pt names is unknown here: keep them all
            self._remove_weights_but(self.weights)

    def _remove_weights_but(self, *kept: Optional[Path]) -> None:
        names = {Path(path).name for path in kept if path is not None}
        for old in self.folder.glob(f"{WEIGHTS_PREFIX}*.pt"):
            if old.name not in names:
                old.unlink(missing_ok=True)

    def publish(self, target: Path, after: str) -> None:
        """The last checkpoint's weights as `target` (best.pt, model.pt): a hard link to its
        weights file, or a copy where links are not to be had."""
        if self.weights is not None and _link(self.weights, target):
            return
        weights = cpu_weights(self.model)
        write_file(target, lambda f: torch.save(weights, f), after=after)

    def _apply_settings(self, fresh: List[Dict]) -> None:
        """This run's optimizer settings over the restored ones (resume.APPLIED lists them): each
        group's decay, betas and momentum as this config builds them (`fresh`), and its learning
        rate, with the schedule's, rescaled by the new base rate over the saved one, so the
        schedule goes on from where it was at the new scale (a factor of 1 when unchanged)."""
        scales = []
        for group, new in zip(self.optimizer.param_groups, fresh):
            scale = new.get("initial_lr", new["lr"]) / group.get("initial_lr", group["lr"])
            scales.append(scale)
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= scale
            group.update({k: new[k] for k in ("weight_decay", "betas", "momentum", "nesterov") if k in new})
        for scheduler in [self.scheduler, *getattr(self.scheduler, "_schedulers", [])]:
            scheduler.base_lrs = [lr * scale for lr, scale in zip(scheduler.base_lrs, scales)]
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def restore(self, state: Dict, path: Path, rank: int = 0) -> None:
        """Load a checkpoint's states into the parts (resume.plan has checked that its settings
        carry over; here, that its weights fit the model)."""
        _check_fits(self.model, state["model"], path, state["config"])
        self.model.load_state_dict(state["model"])
        self.weights = state.get("weights_file")
        self.keep_last = path.resolve() == (self.folder / LAST).resolve()
        # Fused or not is this device's choice (CUDA fuses), not the saving run's: a fused step
        # under a grad scaler differs from an unfused one, and a state's step counters follow it.
        saved = state["optimizer"]
        fresh = [dict(group, params=None) for group in self.optimizer.param_groups]  # as this config builds them
        groups = [{**group, **{k: now[k] for k in ("fused",) if k in now}}
                  for group, now in zip(saved["param_groups"], self.optimizer.param_groups)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_settings(fresh)
        if state["scaler"]:  # empty when the saving run did not scale (not fp16)
            self.scaler.load_state_dict(state["scaler"])
        # Each rank's own random state (dropout's masks); a rank the saving run did not have keeps
        # the stream its seed gave it.
        others = state.get("rng_ranks", [])
        if rank == 0 or rank <= len(others):
            set_rng_states(state["rng"] if rank == 0 else others[rank - 1], self.device)
