"""Write Fashion-MNIST out as an image folder of PNGs, once: OUT/train/<label>/<n>.png and
OUT/test/<label>/<n>.png, the 60,000 and 10,000 images in their IDX order, grey 28x28.

    python benchmarks/fashion_mnist_pngs.py --root DATA_ROOT --out OUT

DATA_ROOT holds FashionMNIST/raw/*-ubyte. The labels are the folder names 0-9, which
ImageFolder's sorted classes number as the IDX labels are. A folder already complete (its
marker file written last) is left as it is.
"""

import argparse
import time
from pathlib import Path

MARKER = ".complete"


def write_pngs(root: str, out: Path) -> float:
    """Seconds spent writing; 0 when `out` was already complete."""
    from PIL import Image
    from torchvision.datasets import FashionMNIST

    if (out / MARKER).is_file():
        return 0.0
    began = time.perf_counter()
    for split, train in (("train", True), ("test", False)):
        data = FashionMNIST(root, train=train, download=False)
        for label in range(10):
            (out / split / str(label)).mkdir(parents=True, exist_ok=True)
        for n, (image, label) in enumerate(zip(data.data.numpy(), data.targets.tolist())):
            Image.fromarray(image, "L").save(out / split / str(label) / f"{n:05d}.png")
    (out / MARKER).write_text("")
    return time.perf_counter() - began


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="folder holding FashionMNIST/raw/*-ubyte")
    p.add_argument("--out", required=True, help="where the image folder goes")
    args = p.parse_args()
    seconds = write_pngs(args.root, Path(args.out))
    print(f"wrote {args.out} in {seconds:.0f} s" if seconds else f"{args.out} is already complete")


if __name__ == "__main__":
    main()
