"""The variants named after timm's models are timm's networks: the same parameters under the same
names, timm's state dicts load unchanged, and the logits are equal to the bit in fp32."""

import pytest
import timm
import torch

from resnet_lab.errors import UserError
from resnet_lab.models import MODELS, weights
from tests.test_models import count, on_meta, randomise

# Every resnet_lab variant that timm has under the same name.
TIMM_NAMED = ["resnet18d", "resnet26d", "resnet34d", "resnet50d", "resnet101d", "seresnet50", "seresnext26d_32x4d",
              "seresnext50_32x4d", "ecaresnet50d", "resnetblur18", "resnetblur50", "resnetblur50d"]


def timm_random(name: str, **kw) -> torch.nn.Module:
    """timm's network with random weights and BN statistics, built without its initialisation
    (on the meta device, then filled) except where a blur's constant kernel must be computed."""
    torch.manual_seed(0)
    if MODELS.get(name).architecture.blur:
        model = timm.create_model(name, pretrained=False, **kw)
    else:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kw)
        model = model.to_empty(device="cpu")
    randomise(model)
    return model.eval()


def test_every_timm_named_variant_is_listed():
    assert set(TIMM_NAMED) <= set(timm.list_models())
    assert [n for n in MODELS.names() if "timm's" in MODELS.get(n).__doc__] == sorted(TIMM_NAMED)


@pytest.mark.parametrize("name", TIMM_NAMED)
def test_timm_weights_load_and_give_timms_logits_to_the_bit(name):
    theirs = timm_random(name)
    ours = MODELS.get(name)() if MODELS.get(name).architecture.blur else on_meta(name)
    assert count(ours) == count(theirs)
    state = theirs.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    # strict: the same keys and shapes; assign: share timm's tensors instead of copying.
    ours.load_state_dict(state, strict=True, assign=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected, got = theirs(x), ours.eval()(x)
    assert expected.std() > 0.1
    # The same operations in the same order: fp32 gives the same bits.
    assert torch.equal(got, expected)


def timm_files(tmp_path, name: str) -> dict:
    """One timm model's weights in each file timm writes: a state dict saved by torch.save, the
    hub's .safetensors, and its train.py's checkpoint (options, optimizer and weights), this last
    by timm's own CheckpointSaver."""
    import argparse

    from safetensors.torch import save_file
    from timm.utils import CheckpointSaver

    model = timm_random(name)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saver = CheckpointSaver(model, optimizer, args=argparse.Namespace(model=name, lr=0.1), checkpoint_dir=str(tmp_path))
    saver.save_checkpoint(epoch=0)
    return model, [tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors", tmp_path / "last.pth.tar"]


def test_model_init_takes_each_timm_weights_file_and_gives_timms_logits(tmp_path):
    reference, files = timm_files(tmp_path, "resnet26d")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(x)
    for path in files:
        ours = MODELS.get("resnet26d")()
        weights.init(ours, path)
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), expected), path


def test_timm_weights_on_grey_images_fold_the_deep_stems_first_conv(tmp_path, caplog):
    reference, files = timm_files(tmp_path, "resnet18d")
    grey = MODELS.get("resnet18d")(in_channels=1)
    with caplog.at_level("INFO", logger="resnet_lab"):
        weights.init(grey, files[1])
    assert "has 3 input channels, this run 1: conv1.0's weights summed over the channels" in caplog.text
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(grey.eval()(x), reference(x.repeat(1, 3, 1, 1)), rtol=1e-5, atol=1e-4)
    caplog.clear()
    with caplog.at_level("INFO", logger="resnet_lab"):
        weights.init(MODELS.get("resnet18d")(num_classes=10), files[1])
    assert "has 1000 classes, this run 10: the head (fc) starts afresh" in caplog.text


def test_a_broken_safetensors_file_is_one_line(tmp_path):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError) as error:
        weights.init(MODELS.get("resnet18d")(width=8), broken)
    assert str(error.value).startswith(f"{broken}: not a readable .safetensors file")


def test_the_speed_benchmark_against_timm_reports_both_definitions_and_their_ratio(tmp_path):
    import json
    import math
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "timm.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "timm_models.py"),
                           "--models", "resnet50d", "--batch", "2", "--steps", "1", "--rounds", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    row = result["models"]["resnet50d"]
    assert [len(row["rounds"][k]) for k in ("resnet_lab", "timm")] == [2, 2]
    assert math.isclose(row["ratio"], row["resnet_lab_images_per_s"] / row["timm_images_per_s"])
    assert result["device_name"] in proc.stdout and "resnet50d" in proc.stdout
