"""Weights from a file into a model: a run's own (evaluate, predict, export), or a starting point
for training (`model.init=PATH`: a torchvision or timm state dict, a checkpoint of timm's
train.py, another run's folder or model.pt).

A starting point may differ from the model where fine-tuning expects it to: another class count
(the head starts afresh) and grey against colour input (the first conv's input channels are
folded or spread). Any other difference is an error naming the keys.
"""

import argparse
import logging
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from resnet_lab import rundir
from resnet_lab.errors import UserError

log = logging.getLogger("resnet_lab")

SHOWN = 3  # keys named in a message
FIXES = ("give the weights of a run of this model, or choose the model they were saved from "
         "(model=<its name> and its model.* settings)")


def find(path: Path) -> Path:
    """The weights file `path` names: the file itself, or a run folder's model.pt (else the weights
    of its last checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for candidate in (path / rundir.MODEL, path / rundir.CHECKPOINTS / rundir.LAST):
            if candidate.is_file():
                return candidate
        raise UserError(f"{path}: no weights there (neither model.pt nor {rundir.CHECKPOINTS}/{rundir.LAST}); "
                        f"train the run to the end of an epoch first, or give the path of a weights file")
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder; give a weights file (model.pt, "
                        f"{rundir.CHECKPOINTS}/{rundir.BEST}, a torchvision state dict) or a run folder")
    return path


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise UserError(f"{path}: reading .safetensors files needs the package safetensors: "
                        f"pip install safetensors (timm brings it)") from e
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001  (a truncated or foreign file: safetensors' own errors)
        raise UserError(f"{path}: not a readable .safetensors file ({type(e).__name__})") from e


def read(path: Path) -> Dict[str, torch.Tensor]:
    """The state dict of a weights file (torch.save's, or .safetensors as timm's hub files are),
    of a resnet_lab checkpoint (its model's weights) or of a checkpoint of timm's train.py (its
    model's own weights, not their EMA)."""
    path = find(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    damaged = rundir.damage(path)
    if damaged:
        raise UserError(f"{path} is damaged ({damaged}); train again, or give another weights file")
    try:
        # timm's train.py saves its argparse options beside the weights.
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (zip, pickle and EOF errors all mean a file we cannot read)
        raise UserError(f"{path}: not a readable weights file ({type(e).__name__}); give a state dict "
                        f"saved with torch.save, a run's model.pt or one of its checkpoints") from e
    if isinstance(state, dict) and "optimizer" in state and "model" in state:
        # A checkpoint: it names the file that holds its weights (older ones hold them).
        return read(path.parent / state["model"]) if isinstance(state["model"], str) else state["model"]
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict (a dict of tensors); save one with "
                        f"torch.save(model.state_dict(), path)")
    return state


def _some(keys: List[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def differences(model: nn.Module, state: Dict[str, torch.Tensor]) -> List[str]:
    """What keeps `state` from loading into model: the keys whose shapes differ, that are missing
    or that are not the model's, a few of each."""
    own = model.state_dict()
    shapes = [f"{k} {list(state[k].shape)} there, {list(v.shape)} here" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    return [f"{label}: {_some(keys)}" for label, keys in
            (("shapes differ", shapes), ("missing", missing), ("unexpected", unexpected)) if keys]


def check_fits(model: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> None:
    problems = differences(model, state)
    if problems:
        raise UserError(f"{path} does not fit this model ({'; '.join(problems)}); {FIXES}")


def load(model: nn.Module, path: Path) -> None:
    """A run's own weights, exactly: any difference is an error."""
    state = read(path)
    check_fits(model, state, path)
    model.load_state_dict(state)


def _new_head(own: Dict, state: Dict, path: Path, head: str) -> Tuple[Dict, List[str]]:
    """Without the head's weights where the class counts differ: the model's own head stays.
    Also what it changed, to say."""
    weight = head + "weight"
    if weight not in state or weight not in own or state[weight].shape[0] == own[weight].shape[0]:
        return state, []
    said = (f"{path} has {state[weight].shape[0]} classes, this run {own[weight].shape[0]}: the head "
            f"({head.rstrip('.')}) starts afresh")
    return {k: v for k, v in state.items() if not k.startswith(head)}, [said]


def _fold_stem(own: Dict, state: Dict, path: Path) -> Tuple[Dict, List[str]]:
    """The first conv's weights (the model's first 4-d tensor: conv1.weight, the deep stem's
    conv1.0.weight, a timm model's stem) for this run's input channels: colour weights on grey
    images sum over their input channels (a grey image copied to R, G and B gives the same
    output); grey weights on colour images are spread over the channels, a third each (the same
    output for a grey image in colour)."""
    stem = next((k for k, v in own.items() if v.dim() == 4), None)
    if stem not in state:
        return state, []
    there, here = state[stem].shape[1], own[stem].shape[1]
    if there == here or state[stem].shape[0] != own[stem].shape[0]:
        return state, []
    if here == 1:
        folded = state[stem].sum(1, keepdim=True)
    elif there == 1:
        folded = state[stem].repeat(1, here, 1, 1) / here
    else:
        return state, []
    said = (f"{path} has {there} input channels, this run {here}: {stem.removesuffix('.weight')}'s weights "
            f"{'summed over' if here == 1 else 'spread over'} the channels")
    return {**state, stem: folded}, [said]


def init(model: nn.Module, path: Path) -> None:
    """Start from the weights at path (model.init), adapted to another class count and to grey
    or colour input; saying what it changed."""
    from resnet_lab.models import head_prefix

    own = model.state_dict()
    prefix = head_prefix(model)
    state, head = _new_head(own, read(path), path, prefix)
    state, stem = _fold_stem(own, state, path)
    kept_head = {k: v for k, v in own.items() if k.startswith(prefix) and k not in state}
    check_fits(model, {**state, **kept_head}, path)
    model.load_state_dict(state, strict=False)
    for said in [*head, *stem, f"weights from {find(path)}"]:
        log.info(f"model.init: {said}")
