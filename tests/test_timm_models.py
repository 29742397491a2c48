"""The variants named after timm's models are timm's networks: the same parameters under the same
names, timm's state dicts load unchanged, and the logits are equal to the bit in fp32."""

import pytest
import timm
import torch

from resnet_lab.models import MODELS
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
