"""Models built elsewhere through the same loop: any timm model by name (model=timm) and any
nn.Module class by its dotted path (model=target) train, resume, evaluate and export as
resnet_lab's own do, with the data set's classes and channels; their mistakes are one line."""

import sys

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch import nn

from resnet_lab.trained import evaluate, export
from resnet_lab.__main__ import main
from resnet_lab.config import EXTERNAL_MODELS
from resnet_lab.errors import UserError
from resnet_lab.models import build_model, check_config, head_prefix
from tests import runs
from tests.test_after_training import command


class TinyNet(nn.Module):
    """A user's own network, as model=target finds it: by its dotted path."""

    def __init__(self, num_classes: int, in_channels: int = 3, hidden: int = 4):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, hidden, 3, 2, 1), nn.BatchNorm2d(hidden), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


class NoClasses(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.fc = nn.Linear(width, 10)


DATA = ["dataset=synthetic", "dataset.train_size=64", "dataset.test_size=32", "dataset.image_size=32",
        "trainer.batch_size=16", "logger=none"]
TINY = [o for o in runs.TINY if not o.startswith("model.width=")]  # resnet_lab's own knob
KINDS = {
    # timm's resnet50d at 1/8 width (its channels and stem_width arguments), on grey images, 5 classes.
    "timm_resnet50d": ["model=timm", "model.name=resnet50d", "+model.channels=[8,16,32,64]", "+model.stem_width=4",
                       "dataset.channels=1", "dataset.num_classes=5"],
    "timm_convnext": ["model=timm", "model.name=test_convnext"],
    "target": ["model=target", f"model._target_={__name__}.TinyNet", "+model.hidden=6"],
}


def cli(args, monkeypatch, capsys):
    """`python -m resnet_lab args` in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["resnet_lab", *runs.for_kind(args)])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("kind", KINDS)
def test_trains_resumes_evaluates_and_exports(kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*TINY, *DATA, *KINDS[kind], f"hydra.run.dir={run_dir}"]
    assert cli([*args, "trainer.epochs=1"], monkeypatch, capsys) == (0, "")
    first, = runs.metrics(run_dir)
    weights_1 = torch.load(run_dir / "model.pt", weights_only=True)
    # More epochs in the same folder: it continues from the checkpoint.
    assert cli([*args, "trainer.epochs=2"], monkeypatch, capsys) == (0, "")
    assert runs.epochs(run_dir) == [1, 2] and runs.metrics(run_dir)[0] == first
    weights_2 = torch.load(run_dir / "model.pt", weights_only=True)
    assert weights_2.keys() == weights_1.keys() and any(not torch.equal(weights_2[k], weights_1[k]) for k in weights_1)
    # The data set's channels and classes reached the model.
    stem = next(v for v in weights_2.values() if v.dim() == 4)
    classes = 5 if kind == "timm_resnet50d" else 10
    assert stem.shape[1] == (1 if kind == "timm_resnet50d" else 3)
    code, out, err = command(evaluate, [run_dir], monkeypatch, capsys)
    assert code == 0, err
    assert f"accuracy {runs.metrics(run_dir)[-1]['test_acc']:.4f}" in out
    out_file = tmp_path / "model.pt2"
    code, said, err = command(export, [run_dir, "--format", "pt2", "--out", out_file], monkeypatch, capsys)
    assert code == 0, err
    assert said.startswith(f"wrote {out_file} (pt2): uint8 images N x {stem.shape[1]} x 32 x 32 in, "
                           f"{classes} logits out")


def model_cfg(kind: str, **keys):
    """The model group's option `kind` with keys set or added, as overrides (+model.key=) do."""
    cfg = OmegaConf.structured(EXTERNAL_MODELS[kind])
    with open_dict(cfg):
        return OmegaConf.merge(cfg, keys)


def test_timm_gets_the_classes_channels_and_keyword_arguments():
    vit = build_model(model_cfg("timm", name="test_vit", img_size=32), in_channels=1, num_classes=7)
    assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    assert head_prefix(vit) == "head."  # timm's classifier, the part backbone_lr_scale and model.init set apart


@pytest.mark.parametrize("kind, keys, words", [
    ("timm", {"name": "resnet50dd"}, ["model.name=resnet50dd: not a timm model", "did you mean resnet50d"]),
    ("timm", {}, ["model=timm: give the timm model", "model.name="]),
    ("timm", {"name": "resnet18", "depthh": 3}, ["model=timm model.name=resnet18", "depthh"]),
    ("target", {"_target_": "nopkg.nets.Net"}, ["model._target_=nopkg.nets.Net: no module of it can be imported"]),
    ("target", {"_target_": f"{__name__}.Nope"}, [f"model._target_={__name__}.Nope", "has no Nope"]),
    ("target", {"_target_": f"{__name__}.NoClasses"}, ["NoClasses does not take num_classes"]),
    ("target", {"_target_": "math.pi"}, ["math.pi: not an nn.Module class"]),
    ("target", {"_target_": f"{__name__}.TinyNet", "hiden": 3}, ["TypeError", "hiden"]),
])
def test_a_bad_model_is_one_line(kind, keys, words):
    with pytest.raises(UserError) as error:
        cfg = model_cfg(kind, **keys)
        check_config(cfg)
        build_model(cfg, in_channels=3, num_classes=10)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_without_timm_model_timm_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(UserError, match=r"^model=timm needs the package timm: pip install timm"):
        check_config(model_cfg("timm", name="resnet18"))
