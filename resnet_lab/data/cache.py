"""An image folder's decoded cache: every image decoded once, at the run's size, into one uint8
array per split on disk, which later runs map into memory instead of decoding again.

An index beside the arrays vouches for them: every file (path, size, modification time, class),
the decode settings, and what the header check found. A run whose files and settings match the
index skips the header check, and maps the arrays if the index has them; any changed, added or
removed file makes a new index, and new arrays. Streaming runs keep an index without arrays, so
that they too start without opening every file.
"""

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from resnet_lab import locks, rundir
from resnet_lab.data.images import Sample, decode, reading
from resnet_lab.data.loader import TensorSplit
from resnet_lab.errors import UserError
from resnet_lab.progress import ProgressBar

log = logging.getLogger("resnet_lab")

VERSION = 2  # of the index and the decoding (2: EXIF orientation applied); another version is rebuilt
FOLDER = ".resnet_lab_cache"  # under the data root; hidden, so never taken for a class
CHUNK = 256  # images decoded (by the threads) between writes


def user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "resnet_lab"


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def cache_folder(root: Path, cache_dir: Optional[str]) -> Optional[Path]:
    """dataset.cache_dir, else a folder under the data root, else the user's cache folder: the
    first writable one (None: none is)."""
    if cache_dir is not None:
        if not _writable(Path(cache_dir)):
            raise UserError(f"dataset.cache_dir={cache_dir}: cannot create or write that folder; "
                            f"give a writable one")
        return Path(cache_dir)
    return next((f for f in (root / FOLDER, user_cache_dir()) if _writable(f)), None)


def fingerprint(root: Path, samples: List[Sample]) -> List[list]:
    """[path under root, size, modification time in ns, class] of each file, in order."""
    rows = []
    for path, label in samples:
        with reading(path):  # a broken link
            st = os.stat(path)
        rows.append([os.path.relpath(path, root), st.st_size, st.st_mtime_ns, label])
    return rows


class FolderCache:
    """The cache of the image folder at `root` decoded at `resize`: <key>.json (the index),
    <key>.<split>.npy (the arrays), <key>.lock (held while checking or building)."""

    def __init__(self, root: Path, resize: Optional[int], cache_dir: Optional[str]):
        self.root, self.resize = root, resize
        self.folder = cache_folder(root, cache_dir)
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
        self.key = f"{digest}-{resize or 'native'}"

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.key}.{suffix}"

    @contextlib.contextmanager
    def locked(self):
        """One process at a time (the ranks of a run, or runs sharing the folder) checks or
        builds the cache; the others then find it built."""
        if self.folder is None:
            yield
            return
        with locks.held(self.path("lock")):
            yield

    def index(self, files: Dict[str, List[list]]) -> Optional[dict]:
        """The stored index, if it vouches for exactly these files at these settings."""
        if self.folder is None or not self.path("json").is_file():
            return None
        try:
            index = json.loads(self.path("json").read_text())
        except (OSError, ValueError):
            return None  # torn by hand or by another program: it is rebuilt
        if index.get("version") != VERSION or index.get("resize") != self.resize or index.get("files") != files:
            return None
        # Arrays deleted by hand: decoded again when wanted.
        return {**index, "arrays": index.get("arrays", False) and all(self.path(f"{name}.npy").is_file()
                                                                      for name in files)}

    def vouch(self, index: dict) -> None:
        """Save a new index without arrays; a failure to write it costs only the next start's
        header check, so it is a warning."""
        try:
            self.save_index(index)
        except UserError as e:
            log.warning(f"{e}; the next run checks the files again")

    def save_index(self, index: dict) -> None:
        if self.folder is not None:
            text = json.dumps({**index, "version": VERSION, "resize": self.resize}).encode()
            rundir.write_file(self.path("json"), lambda f: f.write(text))

    def splits(self, index: dict, samples: Dict[str, List[Sample]], workers: int) -> Dict[str, TensorSplit]:
        """Each split's images, mapped from its array; decoded into one first if the index has none."""
        if self.folder is None:
            raise UserError(f"dataset.cache=true: no writable cache folder ({self.root / FOLDER} nor "
                            f"{user_cache_dir()}); set dataset.cache_dir to one")
        shape = (index["channels"], *index["size"])
        if not index.get("arrays"):
            counts = ", ".join(f"{len(split):,} {name}" for name, split in samples.items())
            log.info(f"image_folder: decoding the images ({counts}) into {self.folder}, once")
            began = time.perf_counter()
            done = {}  # the temporary files, renamed once every split is decoded
            try:
                for name, split in samples.items():
                    done[name] = self._decode(name, split, shape, workers)
                for name, tmp in done.items():
                    os.replace(tmp, self.path(f"{name}.npy"))
            finally:
                for tmp in done.values():
                    tmp.unlink(missing_ok=True)
            index = {**index, "arrays": True}
            self.save_index(index)
            log.info(f"image_folder: decoded in {time.perf_counter() - began:.1f} s")
        else:
            log.info(f"image_folder: the decoded images from {self.folder}")
        out = {}
        for name in samples:
            images = torch.from_numpy(np.load(self.path(f"{name}.npy"), mmap_mode="c"))
            labels = torch.tensor([row[3] for row in index["files"][name]], dtype=torch.long)
            out[name] = TensorSplit(images, labels, [path for path, _ in samples[name]])
        return out

    def _decode(self, name: str, samples: List[Sample], shape: tuple, workers: int) -> Path:
        """Decode the split into a temporary file beside its array's place; that file."""
        path = self.path(f"{name}.npy")
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        channels, resize = shape[0], self.resize
        try:
            with open(tmp, "wb") as f, ThreadPoolExecutor(max(1, workers)) as pool, \
                    ProgressBar(True, f"decoding {name}", len(samples)) as bar:
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(samples), *shape)}
                _write(path, lambda: np.lib.format.write_array_header_1_0(f, header))
                for start in range(0, len(samples), CHUNK):
                    chunk = samples[start:start + CHUNK]
                    images = list(pool.map(lambda s: decode(s[0], channels, resize), chunk))
                    _write(path, lambda: f.write(torch.stack(images).numpy().tobytes()))
                    bar.advance(len(chunk))
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp


def _write(path: Path, write) -> None:
    """write(), a failed write (a full disk) as one line; decoding errors pass as they are."""
    try:
        write()
    except OSError as e:
        raise UserError(f"could not write the image cache {path} ({e.strerror or e}); free some space, "
                        f"set dataset.cache_dir to a folder with room, or dataset.cache=false to "
                        f"decode while training") from e
