"""image_folder's decoded cache: built once and reused, rebuilt when a file changes, bad files named
while building it, the same pixels as decoding while training; and the streaming loader."""

import json
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageOps
from torchvision.transforms.v2 import functional as TF

from resnet_lab.data import build_data, cache
from resnet_lab.data.images import GREY_MODES, decode, headers
from resnet_lab.data.loader import DeviceLoader, HostLoader
from resnet_lab.errors import UserError
from resnet_lab.training.train import train
from tests.test_bad_input import DAMAGE, assert_names
from tests.test_reliability import assert_same_outcome, outcome
from tests.test_train import tiny_cfg


def write_folder(root: Path, mode: str = "L", per_class: int = 12) -> Path:
    """root/train and root/test, two classes of 10x10 noise PNGs."""
    rng = np.random.default_rng(0)
    shape = (10, 10) if mode == "L" else (10, 10, 3)
    for split, n in (("train", per_class), ("test", 3)):
        for c in ("c0", "c1"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")
    return root


def data_of(images: Path, *extra, workers: int = 0):
    cfg = tiny_cfg(images, "dataset=image_folder", f"dataset.num_workers={workers}", "trainer.batch_size=8",
                   *extra)
    return build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), cfg.seed)


def index_file(images: Path) -> Path:
    found = list((images / cache.FOLDER).glob("*.json"))
    assert len(found) == 1
    return found[0]


@pytest.fixture
def images(tmp_path) -> Path:
    return write_folder(tmp_path / "images")


@pytest.fixture
def decodes(monkeypatch):
    """The paths the cache decodes, in order."""
    seen = []
    original = cache.decode

    def counted(path, *args):
        seen.append(path)
        return original(path, *args)

    monkeypatch.setattr(cache, "decode", counted)
    return seen


def test_cache_is_built_once_then_mapped(images, decodes):
    data = data_of(images)
    assert isinstance(data.train, DeviceLoader) and len(decodes) == 30 and data.in_channels == 1
    stamp = index_file(images).stat().st_mtime_ns
    decodes.clear()
    again = data_of(images)
    assert decodes == [] and index_file(images).stat().st_mtime_ns == stamp
    assert torch.equal(again.train.images, data.train.images)
    # The second run maps the array from disk rather than holding a copy.
    assert isinstance(np.load(next((images / cache.FOLDER).glob("*.train.npy")), mmap_mode="r"), np.memmap)


@pytest.mark.parametrize("change", ["changed", "added", "removed"])
def test_a_changed_file_rebuilds_the_cache(change, images, decodes):
    before = data_of(images)
    path = images / "train" / "c1" / "2.png"
    if change == "changed":
        Image.fromarray(np.full((10, 10), 7, dtype=np.uint8)).save(path)
        os.utime(path, ns=(1, 1))  # a new mtime, whatever the file system's clock resolution
    elif change == "added":
        Image.fromarray(np.full((10, 10), 7, dtype=np.uint8)).save(path.with_name("new.png"))
    else:
        path.unlink()
    decodes.clear()
    after = data_of(images)
    assert len(decodes) == {"changed": 30, "added": 31, "removed": 29}[change]
    assert len(after.train.images) == len(before.train.images) + {"changed": 0, "added": 1, "removed": -1}[change]
    if change == "changed":
        # c1/2.png: the 12 of c0, then c1's 0, 1, 10, 11, 2 in ImageFolder's (sorted) order.
        assert (after.train.images[16] == 7).all() and not (before.train.images[16] == 7).all()
    files = json.loads(index_file(images).read_text())["files"]["train"]
    assert any(row[0] == "train/c1/new.png" for row in files) == (change == "added")


@pytest.mark.parametrize("kind", ["truncated png", "not an image", "empty"])
def test_a_bad_file_is_named_while_building_the_cache(kind, images, monkeypatch):
    suffix, damage, words = DAMAGE[kind]
    bad = images / "test" / "c1" / f"1{suffix}"
    (images / "test" / "c1" / "1.png").rename(bad)
    damage(bad)
    with pytest.raises(UserError) as raised:
        data_of(images)
    assert_names(str(raised.value), bad, words)
    assert "\n" not in str(raised.value)
    assert not list((images / cache.FOLDER).glob("*.npy")) and not list((images / cache.FOLDER).glob(".*tmp*"))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_cached_batches_equal_streamed_ones(mode, tmp_path):
    images = write_folder(tmp_path / "images", mode)
    extra = ["dataset.augment=flip_crop", "dataset.resize=8"]
    cached = data_of(images, *extra, "dataset.cache=true")
    streamed = data_of(images, *extra, "dataset.cache=false", workers=1)
    assert isinstance(cached.train, DeviceLoader) and isinstance(streamed.train, HostLoader)
    assert cached.in_channels == streamed.in_channels == {"L": 1, "RGB": 3}[mode]
    for loader in ("train", "test"):
        a, b = getattr(cached, loader), getattr(streamed, loader)
        assert torch.equal(next(a.raw_batches(1, 0))[0], next(b.raw_batches(1, 0))[0])  # the same pixels
        for (xa, ya), (xb, yb) in zip(a.batches(2), b.batches(2)):  # normalised and augmented alike
            assert xa.shape[1:] == (cached.in_channels, 8, 8)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_streaming_keeps_its_workers_and_skips_the_header_check(images, monkeypatch):
    data_of(images, "dataset.cache=false")  # writes the index: the files are checked once
    from resnet_lab.data import sources

    monkeypatch.setattr(sources, "headers", lambda paths: pytest.fail("headers read again"))
    data = data_of(images, "dataset.cache=false", workers=1)
    assert isinstance(data.train, HostLoader) and not list((images / cache.FOLDER).glob("*.npy"))
    pids = []
    for epoch in (1, 2):
        assert sum(len(y) for _, y in data.train.batches(epoch)) == 24
        pids.append([w.pid for w in data.train.loader._iterator._workers])
    assert pids[0] == pids[1]
    data.train.close()
    assert data.train.loader._iterator is None


def test_auto_caches_what_fits_cache_max_gb(images, tmp_path):
    # 30 images of 1 x 10 x 10 bytes: 3,000 bytes decoded.
    assert isinstance(data_of(images, "dataset.cache_max_gb=2.9e-6").train, HostLoader)
    assert isinstance(data_of(images, "dataset.cache_max_gb=3e-6").train, DeviceLoader)
    assert isinstance(data_of(images, "dataset.cache_max_gb=0", "dataset.cache=true").train, DeviceLoader)
    elsewhere = tmp_path / "elsewhere"
    data_of(images, f"dataset.cache_dir={elsewhere}")
    assert len(list(elsewhere.glob("*.train.npy"))) == 1


def test_a_read_only_root_caches_in_the_user_cache_folder(images, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    writable = cache._writable
    monkeypatch.setattr(cache, "_writable", lambda folder: not str(folder).startswith(str(images))
                        and writable(folder))
    assert isinstance(data_of(images).train, DeviceLoader)
    assert not (images / cache.FOLDER).exists()
    assert len(list((tmp_path / "user" / "resnet_lab").glob("*.npy"))) == 2


@pytest.mark.parametrize("value, ok", [("auto", True), ("true", True), ("False", True), ("yes", False)])
def test_cache_setting_is_checked(value, ok, images):
    from resnet_lab.config import validate

    cfg = tiny_cfg(images, "dataset=image_folder", f"dataset.cache={value}")
    if ok:
        validate(cfg)
    else:
        with pytest.raises(UserError, match="dataset.cache=yes: must be one of auto, true, false"):
            validate(cfg)


def test_a_cached_run_resumes_exactly_while_streaming(images, tmp_path, caplog):
    args = ["trainer.deterministic=true", "device.precision=fp32", "logger=none", "trainer.batch_size=8",
            "dataset.augment=flip_crop"]
    runs = {name: tmp_path / name for name in ("whole", "resumed")}
    for run_dir in runs.values():
        run_dir.mkdir()
    train(tiny_cfg(images, "dataset=image_folder", *args, "trainer.epochs=2"), runs["whole"])
    train(tiny_cfg(images, "dataset=image_folder", *args, "trainer.epochs=1"), runs["resumed"])
    train(tiny_cfg(images, "dataset=image_folder", *args, "trainer.epochs=2", "dataset.cache=false",
                   "dataset.num_workers=1"), runs["resumed"])
    assert "dataset.cache=False (checkpoint: auto)" in caplog.text
    assert_same_outcome(outcome(runs["resumed"]), outcome(runs["whole"]))


@pytest.mark.parametrize("mode", ["true", "false"])
def test_two_ranks_take_the_halves_of_each_batch(mode, images):
    cfg = tiny_cfg(images, "dataset=image_folder", "dataset.num_workers=0", "trainer.batch_size=8",
                   f"dataset.cache={mode}")
    whole = build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), cfg.seed)
    ranks = [build_data(cfg.dataset, cfg.trainer, torch.device("cpu"), cfg.seed, rank=r, world_size=2)
             for r in (0, 1)]
    batches = [list(data.train.raw_batches(1, 0)) for data in ranks]
    expected = list(whole.train.raw_batches(1, 0))
    assert len(expected) == 3 and [len(b) for b in batches] == [3, 3]
    for i, (images_i, labels_i) in enumerate(expected):
        assert [len(b[i][1]) for b in batches] == [4, 4]
        assert torch.equal(torch.cat([b[i][0] for b in batches]), images_i)
        assert torch.equal(torch.cat([b[i][1] for b in batches]), labels_i)


def test_runs_starting_together_decode_once(images, decodes):
    cfg = tiny_cfg(images, "dataset=image_folder", "dataset.num_workers=0", "trainer.batch_size=8")
    built = []
    threads = [threading.Thread(target=lambda: built.append(build_data(cfg.dataset, cfg.trainer,
                                                                       torch.device("cpu"), cfg.seed)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 2 and len(decodes) == 30
    assert torch.equal(built[0].train.images, built[1].train.images)


def test_a_full_disk_while_decoding_is_one_line(images, tiny_tmpfs):
    cache_dir = tiny_tmpfs(32 * 1024)  # the index fits; 30 images at 64 x 64 do not
    with pytest.raises(UserError) as raised:
        data_of(images, "dataset.resize=64", f"dataset.cache_dir={cache_dir}", "dataset.cache=true")
    message = str(raised.value)
    assert message.startswith(f"could not write the image cache {cache_dir}/") and "No space left" in message
    assert "dataset.cache=false" in message
    assert sorted(p.suffix for p in cache_dir.iterdir()) == [".json", ".lock"]  # no partial array


def png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit RGB PNG (which PIL does not write) of H x W x 3 uint16 pixels."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    height, width, _ = pixels.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def write_kind(kind: str, path: Path) -> Path:
    """An image file of that kind, 10 wide and 8 high, of noise."""
    rng = np.random.default_rng(0)
    noise = lambda *channels, top=256: rng.integers(0, top, (8, 10, *channels)).astype(np.uint16 if top > 256 else np.uint8)
    suffix = {"jpeg": ".jpg", "webp": ".webp", "bmp": ".bmp"}.get(kind.split()[-1], ".png")
    path = path.with_suffix(suffix)
    if kind == "16-bit colour png":
        png16(path, noise(3, top=65536))
        return path
    image = {"grey": lambda: Image.fromarray(noise(), "L"), "grey+alpha": lambda: Image.fromarray(noise(2), "LA"),
             "1-bit": lambda: Image.fromarray(noise() > 127), "16-bit": lambda: Image.fromarray(noise(top=65536)),
             "colour": lambda: Image.fromarray(noise(3), "RGB"), "rgba": lambda: Image.fromarray(noise(4), "RGBA"),
             "palette": lambda: Image.fromarray(noise(3), "RGB").quantize(16),
             "cmyk": lambda: Image.fromarray(noise(4), "CMYK"), "animated": lambda: Image.fromarray(noise(3), "RGB"),
             "turned": lambda: Image.fromarray(noise(3), "RGB")}[kind.split()[0]]()
    options = {".jpg": {"quality": 90}, ".webp": {"lossless": True}}.get(suffix, {})
    if kind.startswith("palette") and "transparent" in kind:
        options["transparency"] = 3
    if kind.startswith("animated"):
        options.update(save_all=True, append_images=[Image.fromarray(noise(3), "RGB")])
    if kind.startswith("turned"):
        exif = Image.Exif()
        exif[ExifTags.Base.Orientation] = 6  # a quarter turn clockwise to view
        options["exif"] = exif
    image.save(path, **options)
    return path


def pil_decoded(path: Path, channels: int) -> torch.Tensor:
    """What PIL makes of the file, upright: 16-bit grey keeps its top 8 bits (PIL's own
    conversion would clip at 255), a colour JPEG turns grey as libjpeg does it."""
    with Image.open(path) as im:
        if im.mode == "I;16":
            return torch.from_numpy((np.asarray(im) >> 8).astype(np.uint8)).expand(channels, -1, -1)
        if channels == 1:
            im.draft("L", im.size)
        return TF.pil_to_tensor(ImageOps.exif_transpose(im).convert("L" if channels == 1 else "RGB"))


KINDS = ["grey png", "grey+alpha png", "1-bit png", "16-bit png", "16-bit colour png", "colour png", "rgba png",
         "palette png", "palette transparent png", "grey jpeg", "colour jpeg", "cmyk jpeg", "colour webp",
         "rgba webp", "animated webp", "turned jpeg", "turned png", "colour bmp"]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_image_decodes_as_pil_decodes_it(kind, channels, tmp_path):
    path = write_kind(kind, tmp_path / "image")
    image = decode(str(path), channels)
    expected = pil_decoded(path, channels)
    (width, height), = headers([str(path)])[0]
    assert image.dtype == torch.uint8 and image.shape == expected.shape == (channels, height, width)
    with Image.open(path) as im:
        # libpng's and libwebp's luma of a colour image rounds within 1 of PIL's
        colour_to_grey = channels == 1 and im.mode not in GREY_MODES and im.format != "JPEG"
    assert (image.int() - expected.int()).abs().max() <= (1 if colour_to_grey else 0)
    if kind.startswith("turned"):
        assert image.shape[1:] == (10, 8)


def test_a_file_that_is_not_what_its_ending_says_decodes_as_pil_decodes_it(tmp_path):
    misnamed = write_kind("colour jpeg", tmp_path / "image").rename(tmp_path / "image.png")
    for channels in (1, 3):
        assert torch.equal(decode(str(misnamed), channels), pil_decoded(misnamed, channels))


def test_an_index_that_cannot_be_written_is_a_warning_when_streaming(images, tiny_tmpfs, caplog):
    cache_dir = tiny_tmpfs(4096)
    (cache_dir / "filler").write_bytes(b"\0" * 4096)
    data = data_of(images, f"dataset.cache_dir={cache_dir}", "dataset.cache=false")
    assert isinstance(data.train, HostLoader) and len(data.train) == 3
    assert "could not write" in caplog.text and "the next run checks the files again" in caplog.text
