"""Shared fixtures: small data sets in the real on-disk formats, and an offline environment."""

import os
import pickle
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

# Tests never reach the network and never log to a W&B server.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
# One thread per process, here and in every process the tests start: the runs are tiny, and on a
# 2-core machine two OpenMP threads per run spin against the other runs and train 10-20x slower.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)
# torch.compile's kernel cache is keyed without ATen's and oneDNN's instruction-set caps: a kernel
# cached by a run without them crashes a run under ATEN_CPU_CAPABILITY=avx2 (as CI on an AVX2
# machine is reproduced here), so each combination of caps gets a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "torchinductor_tests_" + "_".join(
        os.environ.get(k, "all").lower() for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA"))))


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format torchvision's MNIST parser reads: magic, big-endian sizes, raw bytes."""
    kind = {1: 0x801, 3: 0x803}[array.ndim]
    with open(path, "wb") as f:
        f.write(struct.pack(">I", kind))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_images(n: int, classes: int, shape, seed: int):
    """Noise plus a class-dependent brightness, so a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 128, (n, *shape)) + (labels * 12).reshape(-1, *[1] * len(shape))
    return images.clip(0, 255).astype(np.uint8), labels.astype(np.uint8)


def write_mnist_like(root: Path, folder: str = "FashionMNIST", n_train: int = 320, n_test: int = 80) -> Path:
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 1), ("t10k", n_test, 2)):
        images, labels = make_images(n, 10, (28, 28), seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


def write_cifar_like(root: Path, classes: int = 10, n_per_batch: int = 40) -> Path:
    """torchvision's CIFAR layout: pickled dicts of flat uint8 rows (N x 3072) and labels."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if classes == 10 else torchvision.datasets.CIFAR100
    folder = root / cls.base_folder
    folder.mkdir(parents=True, exist_ok=True)
    label_key = "labels" if classes == 10 else "fine_labels"
    for i, (name, _) in enumerate(cls.train_list + cls.test_list):
        images, labels = make_images(n_per_batch, classes, (3, 32, 32), seed=10 + i)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(n_per_batch, -1), label_key: labels.tolist()}, f)
    names_key = cls.meta["key"]
    with open(folder / cls.meta["filename"], "wb") as f:
        pickle.dump({names_key: [f"class{i}" for i in range(classes)]}, f)
    return root


@pytest.fixture(scope="session")
def fmnist_root(tmp_path_factory) -> Path:
    return write_mnist_like(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def grid_sweep(tmp_path_factory, fmnist_root):
    """Three tiny jobs over optim.lr, W&B offline, an interpolation and tags: (sweep folder,
    stdout), shared by the sweep and compare tests."""
    from tests.launch import LRS, multirun

    code, sweep, out = multirun(tmp_path_factory.mktemp("grid"), fmnist_root, f"optim.lr={','.join(LRS)}",
                                "trainer.eval_batch_size=${trainer.batch_size}", "logger.tags=[ci,tiny]")
    assert code == 0
    return sweep, out


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """mount(tmpfs of `size` bytes) -> its folder; skips where this process cannot mount one."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.fixture(autouse=True)
def fresh_hydra():
    """Hydra keeps its config and search path in process-wide singletons, and its job logging
    replaces the root logger's handlers, and an in-process run leaves them so: a later test in the
    same process would read another run's half-filled config, and log to a stream pytest has
    closed ("--- Logging error ---" in its stderr)."""
    import logging

    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    handlers = logging.root.handlers[:]
    yield
    HydraConfig.instance().cfg = None
    GlobalHydra.instance().clear()
    for handler in logging.root.handlers:
        if handler not in handlers:
            handler.close()
    logging.root.handlers[:] = handlers
