"""Image files: a folder of classes listed as ImageFolder lists it, their headers checked, each
decoded to a uint8 tensor; a file that cannot be read stops the run with one line naming it."""

import contextlib
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torchcodec.decoders import decode_gif, decode_jpeg, decode_png, decode_webp
from torchvision import datasets
from torchvision.transforms.v2 import functional as TF

from resnet_lab.errors import UserError

IMAGE_SUFFIXES = set(datasets.folder.IMG_EXTENSIONS)  # the files ImageFolder reads
# TorchCodec decodes these in one call on the raw bytes, faster than PIL (docs/image_folder.md),
# each format's decoder chosen by the file's ending (its sniffing of the bytes costs a fifth of a
# small PNG's decode); PIL decodes the rest, and files that are not what their ending says, and
# says what is wrong with a bad file.
CODECS = {".png": decode_png, ".jpg": decode_jpeg, ".jpeg": decode_jpeg, ".webp": decode_webp, ".gif": decode_gif}
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}  # PIL's modes of one-channel images

Sample = Tuple[str, int]  # (path, class index)


def has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.rglob("*"))


def list_classes(folder: Path) -> Tuple[List[str], List[Sample]]:
    """ImageFolder's classes and (path, class) samples, sorted; hidden folders (a cache's among
    them) are not classes."""
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    try:
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {folder}.")
        samples = datasets.folder.make_dataset(str(folder), {c: i for i, c in enumerate(classes)},
                                               extensions=tuple(IMAGE_SUFFIXES))
    except FileNotFoundError as e:  # no class folders, or one without images: torchvision says which
        raise UserError(f"dataset image_folder: {e} (in {folder}); it must hold <class>/<image> files, "
                        f"each class folder at least one image") from e
    return classes, samples


@contextlib.contextmanager
def reading(path: str, what: str = "dataset image_folder"):
    """Turns a failure to read an image file into one line: which file, what is wrong with it;
    `what`: who was reading it."""
    from PIL import UnidentifiedImageError

    try:
        yield
    except Exception as e:  # noqa: BLE001  (PIL raises OSError, SyntaxError, ValueError... on bad bytes)
        fix = "replace it with a good copy or delete it"
        if isinstance(e, PermissionError):
            problem, fix = "no permission to read it", "make it readable (chmod a+r) or delete it"
        elif isinstance(e, OSError) and e.strerror:  # open() failed: a broken link, a folder, ...
            problem = e.strerror
        elif os.path.getsize(path) == 0:
            problem = "the file is empty (0 bytes)"
        elif isinstance(e, UnidentifiedImageError):
            problem = "not an image file (PIL cannot identify it)"
        else:  # the decoder ran out of bytes, or met bad ones
            problem = f"truncated or corrupt ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        raise UserError(f"{what}: cannot read {path}: {problem}; {fix}") from e


def headers(paths: List[str]) -> Tuple[Dict[Tuple[int, int], str], int]:
    """Each image size found, upright (with a file of that size), and the channels to decode to:
    1 when every image is grey, else 3. Opening every file's header (about 20 us a file here,
    where decoding a 500x375 JPEG takes 0.6 ms) finds empty, non-image and unreadable files before
    training does; truncated ones are found when decoded."""
    from PIL import ExifTags, Image

    sizes, grey = {}, True
    for path in paths:
        with reading(path), Image.open(path) as im:
            # Orientations 5-8 turn the image a quarter; only files with EXIF data pay for reading it.
            turned = "exif" in im.info and im.getexif().get(ExifTags.Base.Orientation, 1) > 4
            sizes.setdefault(im.size[::-1] if turned else im.size, path)
            grey = grey and im.mode in GREY_MODES
    return sizes, 1 if grey else 3


def decode(path: str, channels: int, resize: Optional[int] = None, what: str = "dataset image_folder",
           size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The image as uint8 channels x H x W, upright as its EXIF orientation says (resize x resize
    when resize is set, else `size` where it differs), the first frame of an animation; `what`:
    who reads it, for the line naming a file that cannot be read."""
    codec = CODECS.get(os.path.splitext(path)[1].lower())
    image = None
    if codec is not None:
        try:
            # The bytes as a tensor: given bytes or a path, TorchCodec wraps them in a warnings
            # context, 7 us a call here, a sixth of decoding a 28x28 PNG. "auto": 16-bit PNGs
            # come as uint16, to keep their top 8 bits (rather than TorchCodec's rounding of x/257).
            image = codec(torch.from_numpy(np.fromfile(path, dtype=np.uint8)),
                          mode="GRAY" if channels == 1 else "RGB", output_dtype="auto")
        except (OSError, RuntimeError, ValueError):
            pass  # PIL reads it again: it decodes some files TorchCodec does not, or names the fault
    if image is None:
        from PIL import Image, ImageOps

        with reading(path, what), Image.open(path) as im:
            if channels == 1:
                im.draft("L", im.size)  # a JPEG turns grey in libjpeg, as TorchCodec turns it; others ignore it
            image = TF.pil_to_tensor(ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB"))
    elif image.ndim == 4:
        image = image[0]
    if image.dtype != torch.uint8:
        image = TF.to_dtype(image, torch.uint8, scale=True)
    size = [resize, resize] if resize else size and list(size)
    if size and list(image.shape[-2:]) != size:
        image = TF.resize(image, size, antialias=True)
    return image


class FileSplit(torch.utils.data.Dataset):
    """Image files decoded when read (in DataLoader workers): (uint8 image, class index)."""

    def __init__(self, samples: List[Sample], channels: int, resize: Optional[int]):
        self.samples, self.channels, self.resize = samples, channels, resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return decode(path, self.channels, self.resize), label
