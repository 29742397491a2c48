"""Whether a run starts fresh, continues a checkpoint, has finished, or is refused: one plan made
from the run folder, the checkpoint trainer.resume names and the config, before anything is built.

The lists of settings that may or may not differ between a checkpoint and the run that resumes
it are here and nowhere else.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from resnet_lab import rundir
from resnet_lab.errors import UserError
from resnet_lab.rundir import read_status
from resnet_lab.training import checkpoint

log = logging.getLogger("resnet_lab")

# Overrides that say where a run reads or how it logs or is swept, not what it trains: left out
# of W&B run names and of `compare`'s columns, and free to differ when a finished run is asked for.
NOISE_KEYS = ("hydra", "logger", "hparams_search", "search", "trainer.progress", "dataset.root",
              "dataset.download", "dataset.num_workers", "dataset.cache", "dataset.cache_dir",
              "dataset.cache_max_gb")
# Settings that change how a run executes, not what it learns (besides NOISE_KEYS;
# trainer.epochs: a finished run is past any smaller count).
UNTRAINED = ("device", "trainer.epochs", "trainer.checkpoint_every_steps", "trainer.save_weights",
             "trainer.eval_batch_size")
# Choices whose saved state another choice cannot take over (the parameter groups, for
# no_decay_norm_bias), with the value a checkpoint from before the key existed had.
MUST_MATCH = {"optim.name": None, "sched.name": None, "optim.no_decay_norm_bias": False}
# The keys that set how many updates a run has, over which its schedule is laid, with the value
# a checkpoint from before the key existed had; only a run without a schedule (sched=none) may
# change them.
SCHEDULE_LENGTH = {"trainer.epochs": None, "trainer.batch_size": None, "trainer.limit_train_batches": None,
                   "trainer.accumulate": 1, "dataset.val_fraction": 0.0}
# The optimizer settings a resumed run takes from its own config over the checkpoint's state
# (its schedule rescaled to the new learning rate: docs/runs.md).
APPLIED = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.momentum", "optim.nesterov",
           "optim.backbone_lr_scale", "optim.bias_lr_scale")
# The rate scales that, at 1 and at any other value, make different parameter groups.
GROUP_SCALES = ("backbone_lr_scale", "bias_lr_scale")
# Any other setting may differ on resume: the run goes on with the new value, and says so.


@dataclass
class Plan:
    action: str  # fresh, continue (from `checkpoint`) or finished (nothing to train)
    checkpoint: Optional[Path] = None
    state: Optional[Dict] = None  # the checkpoint, loaded
    own: bool = False  # the run folder's own last.pt: its W&B run goes on
    changes: List[str] = field(default_factory=list)  # settings that differ from the checkpoint's


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def meaningful(overrides: Sequence[str], also: Sequence[str] = ()) -> List[str]:
    """The overrides that change what a run trains, in their order (a later one wins); `also`:
    more keys (or groups of keys) to leave out beside NOISE_KEYS."""
    keep = []
    for override in overrides:
        key = override_key(override)
        if not any(key == noise or key.startswith(noise + ".") for noise in (*NOISE_KEYS, *also)):
            keep.append(override)
    return keep


def flat(node, prefix: str = "") -> Dict:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in flat(child, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def config_changes(saved_cfg: Dict, cfg, shared_only: bool = False) -> List[str]:
    """`key=now (checkpoint: then)` for each setting that differs from the checkpoint's; with
    shared_only, among the keys both have (a checkpoint from before a key existed lacks it)."""
    now, then = flat(OmegaConf.to_container(cfg, resolve=True)), flat(saved_cfg)
    keys = now.keys() & then.keys() if shared_only else now.keys() | then.keys()
    return [f"{k}={now.get(k)} (checkpoint: {then.get(k)})" for k in sorted(keys)
            if k != "trainer.resume" and now.get(k) != then.get(k)]


def applied(changes: Sequence[str]) -> List[str]:
    """Those of config_changes' lines that are optimizer settings the resumed run applies."""
    return [change for change in changes if override_key(change) in APPLIED]


def to_resume(resume: str, run_dir: Path) -> Optional[Path]:
    """The checkpoint that trainer.resume names for this run folder, or None to start afresh."""
    last = rundir.last(run_dir)
    if resume == "auto":
        return last if last.exists() else None
    if resume == "none":
        if last.exists():
            raise UserError(f"trainer.resume=none: {run_dir} already holds a run ({rundir.CHECKPOINTS}/"
                            f"{rundir.LAST}) that a fresh start would overwrite; set hydra.run.dir to "
                            f"another folder, or continue it with trainer.resume=auto")
        return None
    return Path(resume).expanduser()


def plan(run_dir: Path, cfg: DictConfig) -> Plan:
    """What to do in run_dir with cfg; a UserError saying why, for a run that must be refused."""
    path = to_resume(cfg.trainer.resume, run_dir)
    if path is None:
        return Plan("fresh")
    own = path.resolve() == (rundir.last(run_dir)).resolve()
    state, path = checkpoint.load_good(path)
    if _finished(state, path, own, run_dir, cfg):
        return Plan("finished", path, state, own)
    _check_carries_over(state["config"], cfg, path)
    return Plan("continue", path, state, own, config_changes(state["config"], cfg))


def _finished(state: Dict, path: Path, own: bool, run_dir: Path, cfg: DictConfig) -> bool:
    """Whether the run of checkpoint `state` has nothing left to train and has ended.

    In its own folder (the same command again, a requeued sweep job) such a run is left as it
    is: its weights, metrics, status, checkpoints and W&B run. One killed after its last
    checkpoint, before it wrote model.pt and closed its W&B run, is not finished: it goes on to
    do that. Into a new folder there is nothing to train: a mistake. So is a finished run asked
    for with other settings: its result is not theirs (a sweep rerun into the same folder with
    new values would hand the old accuracies to its sweeper).
    """
    done, epochs = state["epoch"] - 1, cfg.trainer.epochs
    if done < epochs:
        return False
    further = (f"set trainer.epochs above {done} to train it further" if cfg.sched.name == "none" else
               f"its sched={cfg.sched.name} spans those {done} epochs: a longer run starts afresh")
    if state["step"]:
        raise UserError(f"{path} is at step {state['step']} of epoch {done + 1}, past trainer.epochs={epochs}; "
                        f"resume with trainer.epochs={state['config']['trainer']['epochs']}, as it was saved")
    if not own:
        raise UserError(f"trainer.resume={path}: that run has trained {done} epochs and trainer.epochs={epochs} "
                        f"leaves nothing to train; {further}")
    if read_status(run_dir) != "finished":
        return False
    # What the run trained must match; where it runs, how it logs and checkpoints need not, and
    # the epoch count may shrink (the run is past it).
    changes = meaningful(config_changes(state["config"], cfg, shared_only=True), also=UNTRAINED)
    if changes:
        raise UserError(f"{run_dir} holds a run that finished with other settings ({'; '.join(changes)}); "
                        f"train these in a new folder (hydra.run.dir, or hydra.sweep.dir for -m)")
    log.info(f"this run has finished its {done} epochs, final test acc {state['metrics']['test_acc']:.4f}: "
             f"nothing to train ({further})")
    return True


def _saved(saved_cfg: Dict, key: str, default):
    group, name = key.split(".")
    return saved_cfg[group].get(name, default)


def _check_carries_over(saved_cfg: Dict, cfg: DictConfig, path: Path) -> None:
    """The checkpoint's optimizer and schedule states fit this run's."""
    for key, default in MUST_MATCH.items():
        then, now = _saved(saved_cfg, key, default), OmegaConf.select(cfg, key)
        if then != now:
            # A group's choice is shown as the command line makes it: optim=adam.
            shown = key.removesuffix(".name")
            raise UserError(f"checkpoint {path} was saved with {shown}={then}, this run has "
                            f"{shown}={now}; its state cannot carry over: resume with {shown}={then}, "
                            f"or start afresh with trainer.resume=none")
    # One parameter group, or the backbone's and the head's, the biases' and the weights': the
    # saved state has as many.
    for key in GROUP_SCALES:
        then, now = saved_cfg["optim"].get(key, 1.0), cfg.optim[key]
        if (then != 1) != (now != 1):
            raise UserError(f"optim.{key}={now}: checkpoint {path} was saved with optim.{key}={then}, and 1 "
                            f"and other values keep different optimizer states; resume with it, or start "
                            f"afresh with trainer.resume=none")
    sched = cfg.sched.name
    stretched = [f"{k}={OmegaConf.select(cfg, k)} (checkpoint: {_saved(saved_cfg, k, default)})"
                 for k, default in SCHEDULE_LENGTH.items() if OmegaConf.select(cfg, k) != _saved(saved_cfg, k, default)]
    if stretched and sched != "none":
        # The restored schedule keeps its old length: cosine would rise again, onecycle fail.
        raise UserError(f"{'; '.join(stretched)}: checkpoint {path} was saved by a run whose sched={sched} "
                        f"spans its steps; resume with the checkpoint's values (only a sched=none run can "
                        f"change its length)")
