"""Dataset registry entries: each reads its files once and returns the train and test splits
and the class names.

The small datasets come back as uint8 tensors (TensorSplit), to live on the training device;
image_folder too when its decoded cache is used, else as datasets of files that DataLoader
workers decode.
"""

import contextlib
import io
import logging
import math
import os
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torchvision import datasets
from torchvision.datasets.utils import check_integrity

from resnet_lab import locks
from resnet_lab.data.cache import FolderCache, fingerprint
from resnet_lab.data.images import FileSplit, Sample, has_images, headers, list_classes
from resnet_lab.data.loader import TensorSplit
from resnet_lab.errors import UserError
from resnet_lab.registry import Registry

log = logging.getLogger("resnet_lab")

DATASETS = Registry("dataset")

IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # by the IDX type code


def _expected_files(cls, root: str) -> Tuple[str, list]:
    if hasattr(cls, "resources"):  # MNIST family: the raw IDX files, stored uncompressed
        folder = os.path.join(root, cls.__name__, "raw")
        return folder, [os.path.basename(url).removesuffix(".gz") for url, _ in cls.resources]
    folder = os.path.join(root, cls.base_folder)  # CIFAR: the pickled batches
    return folder, [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _present(folder: str, files: list) -> bool:
    return all(os.path.isfile(os.path.join(folder, f)) for f in files)


def _fetch(cls, cfg, folder: str, files: list) -> None:
    """Download the missing files if allowed, else say where to put them."""
    reason = "dataset.download=false"
    if cfg.download:
        try:
            # Parallel jobs and ranks start at once: one downloads, the others wait and find the files.
            os.makedirs(cfg.root, exist_ok=True)
            with locks.held(Path(cfg.root) / f".{cls.__name__}.download.lock"), \
                    contextlib.redirect_stdout(io.StringIO()):  # torchvision prints every failed mirror
                if not _present(folder, files):
                    cls(cfg.root, train=True, download=True)
            return
        except Exception as e:  # noqa: BLE001  (any network failure means the same to the user)
            detail = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
            reason = f"the download failed ({detail[:200] or type(e).__name__})"
    raise UserError(
        f"dataset {cfg.name}: files not found in {folder} ({', '.join(files)}) and {reason}; "
        f"place those files there, or set dataset.root to the folder that holds "
        f"{os.path.relpath(folder, cfg.root)}"
    )


def _idx_problem(path: str) -> Optional[str]:
    """What is wrong with an IDX file, or None: its header gives the item type and the sizes,
    and with them the length the file must have."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_ITEM_BYTES or not 1 <= magic[3] <= 4:
            return "not an IDX file"
        sizes = f.read(4 * magic[3])
    if len(sizes) < 4 * magic[3]:
        return "truncated in its header"
    expected = 4 + len(sizes) + math.prod(struct.unpack(f">{magic[3]}I", sizes)) * IDX_ITEM_BYTES[magic[2]]
    actual = os.path.getsize(path)
    if actual != expected:
        what = "truncated" if actual < expected else "too long"
        return f"{what}: {actual:,} bytes, its header says {expected:,}"
    return None


def _damaged(cls, folder: str, files: list) -> List[str]:
    """The files that fail a check: the MNIST family's IDX layout, CIFAR's published checksums."""
    if hasattr(cls, "resources"):
        problems = {name: _idx_problem(os.path.join(folder, name)) for name in files}
    else:
        sums = dict(cls.train_list + cls.test_list + [(cls.meta["filename"], cls.meta["md5"])])
        problems = {name: None if check_integrity(os.path.join(folder, name), sums[name])
                    else "wrong checksum" for name in files}
    return [f"{name} ({problem})" for name, problem in problems.items() if problem]


def _load(cls, cfg, train: bool) -> Tuple[TensorSplit, List[str]]:
    """One split as uint8 N x C x H x W, and the class names."""
    folder, files = _expected_files(cls, cfg.root)
    if not _present(folder, files):
        _fetch(cls, cfg, folder, files)
    try:
        ds = cls(cfg.root, train=train, download=False)
        images = torch.as_tensor(ds.data)
        labels = torch.as_tensor(ds.targets, dtype=torch.long)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
    except Exception as e:  # noqa: BLE001  (a parser or checksum failing on bad bytes)
        damaged = _damaged(cls, folder, files)
        if damaged:
            raise UserError(f"dataset {cfg.name}: damaged files in {folder}: {', '.join(damaged)}; "
                            f"delete them and download (or copy) them again") from e
        raise UserError(
            f"dataset {cfg.name}: could not read the files in {folder} ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); they may be truncated or corrupt: delete them "
            f"and download again"
        ) from e
    _check_labels(cfg.name, folder, "train" if train else "test", labels, len(ds.classes))
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    return TensorSplit(images.contiguous(), labels), list(ds.classes)


def _check_labels(name: str, folder: str, split: str, labels: torch.Tensor, classes: int) -> None:
    """Every label a class index: the loss would otherwise fail on the first batch holding a bad
    one, for the test split only after a whole epoch of training."""
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise UserError(f"dataset {name}: a {split} label is {bad[0].item()} ({len(bad)} of the {len(labels)} "
                        f"{split} labels in {folder} are out of range), but the data set has {classes} classes "
                        f"(labels 0 to {classes - 1}); its label file is damaged or from another data set: "
                        f"delete it and download (or copy) it again")


def _torchvision(name: str, cls):
    def load(cfg):
        (train, classes), (test, _) = _load(cls, cfg, True), _load(cls, cfg, False)
        return train, test, classes

    DATASETS.register(name)(load)


for _name, _cls in [("fashion_mnist", datasets.FashionMNIST), ("mnist", datasets.MNIST),
                    ("kmnist", datasets.KMNIST), ("cifar10", datasets.CIFAR10),
                    ("cifar100", datasets.CIFAR100)]:
    _torchvision(_name, _cls)


@DATASETS.register()
def synthetic(cfg):
    """Random images and labels of any shape: a full code path with no data on disk."""
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorSplit:
        images = torch.randint(0, 256, (n, cfg.channels, cfg.image_size, cfg.image_size),
                               dtype=torch.uint8, generator=gen)
        return TensorSplit(images, torch.randint(0, cfg.num_classes, (n,), generator=gen))

    return split(cfg.train_size), split(cfg.test_size), [str(i) for i in range(cfg.num_classes)]


def _split_samples(root: Path) -> Tuple[List[str], Dict[str, List[Sample]]]:
    """The classes, and the train and test splits' files: root/train beside root/test (or
    root/val), or root alone with a fixed 10% held out."""
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    train_dir = root / "train" if test_dir is not None and (root / "train").is_dir() else root
    if not has_images(train_dir):
        raise UserError(f"dataset image_folder: no images under {train_dir} "
                        f"(expected {train_dir}/<class>/<image>.png)")
    classes, train = list_classes(train_dir)
    if len(classes) < 2:
        # Most often a root one level too high (root/all/<class>/...): every image is one class.
        below = sorted(p.name for p in (train_dir / classes[0]).iterdir() if p.is_dir())
        hint = f" (it holds {', '.join(below[:5])}: should dataset.root be {train_dir / classes[0]}?)" if below else ""
        raise UserError(f"dataset image_folder: {train_dir} has one class folder, {classes[0]}{hint}; "
                        f"a classifier needs at least two (<root>/<class>/<image>)")
    if test_dir is None:
        # No test split on disk: hold out a fixed 10% (at least one image), the same every run.
        n_test = max(1, len(train) // 10)
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
        return classes, {"train": [train[i] for i in perm[n_test:]], "test": [train[i] for i in perm[:n_test]]}
    test_classes, test = list_classes(test_dir)
    if test_classes != classes:
        raise UserError(f"dataset image_folder: {test_dir} has classes {test_classes}, "
                        f"{train_dir} has {classes}; they must match")
    return classes, {"train": train, "test": test}


def _checked(cfg, samples: Dict[str, List[Sample]]) -> Dict:
    """The header check's findings, for the index: the channels and size the images decode to."""
    sizes, channels = headers([path for split in samples.values() for path, _ in split])
    if cfg.resize is None and len(sizes) > 1:
        shown = ", ".join(f"{w}x{h} ({os.path.basename(p)})" for (w, h), p in list(sizes.items())[:3])
        raise UserError(f"dataset image_folder: images of different sizes: {shown}; "
                        f"set dataset.resize=<pixels> to resize them all to one square size")
    (width, height), = sizes if cfg.resize is None else [(cfg.resize, cfg.resize)]
    return {"channels": channels, "size": [height, width]}


def _use_cache(cfg, index: Dict) -> bool:
    """dataset.cache: true, false, or auto: whether the decoded images fit dataset.cache_max_gb."""
    mode = str(cfg.cache).lower()
    if mode != "auto":
        return mode == "true"
    images = sum(len(files) for files in index["files"].values())
    gb = images * index["channels"] * math.prod(index["size"]) / 1e9
    if gb <= cfg.cache_max_gb:
        return True
    log.info(f"image_folder: the {images:,} images decoded take {gb:.1f} GB, over dataset.cache_max_gb="
             f"{cfg.cache_max_gb}: decoding them while training")
    return False


@DATASETS.register()
def image_folder(cfg):
    """root/class/*.png, or root/train/class/... with root/test (or root/val) beside it: decoded
    once into the cache (resnet_lab.data.cache), or by the loader's workers while training."""
    root = Path(cfg.root)
    classes, samples = _split_samples(root)
    cache = FolderCache(root, cfg.resize, cfg.cache_dir)
    with cache.locked():
        files = {name: fingerprint(root, split) for name, split in samples.items()}
        index = cache.index(files)
        if index is None:  # the files are new or changed: check them, and vouch for them from now on
            index = {"files": files, **_checked(cfg, samples)}
            cache.vouch(index)
        if _use_cache(cfg, index):
            decoded = cache.splits(index, samples, cfg.num_workers)
            return decoded["train"], decoded["test"], classes
    return (FileSplit(samples["train"], index["channels"], cfg.resize),
            FileSplit(samples["test"], index["channels"], cfg.resize), classes)
