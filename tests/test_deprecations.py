"""The suite's warning filter (pyproject.toml): a deprecation that resnet_lab's own code sets off
fails the test that sets it off, and so do the deprecated paths resnet_lab moved off."""

import io
import warnings

import pytest
import torch
from PIL import Image


def library_call(category) -> None:
    """A library's deprecated function: it warns at its caller's line, as most do."""
    warnings.warn("library_call is deprecated", category, stacklevel=2)


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
@pytest.mark.parametrize("module", ["resnet_lab", "resnet_lab.data.images", "resnet_lab.trained.export"])
def test_a_deprecation_at_a_call_in_resnet_lab_is_an_error(module, category):
    # The warning is attributed to the module of the frame it names: here, code run as `module`.
    code = compile("library_call(category)", f"<{module}>", "exec")
    with pytest.raises(category, match="library_call is deprecated"):
        exec(code, {"__name__": module, "library_call": library_call, "category": category})


def test_decoding_with_torchvision_io_is_an_error():
    from torchvision.io import decode_image

    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    with pytest.raises(DeprecationWarning, match="image decoding and encoding capabilities of TorchVision"):
        decode_image(torch.frombuffer(bytearray(png.getvalue()), dtype=torch.uint8))


def test_torchscript_is_an_error():
    with pytest.raises(FutureWarning, match="torch.jit.trace"):
        torch.jit.trace(torch.nn.Linear(2, 2), torch.zeros(1, 2))
