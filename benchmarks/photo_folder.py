"""An image folder of real photographs for the studies: one class per photograph, each image a random square crop
of it (side 12-30% of the photograph's shorter side), resized to ``--size`` px. Recognising which photograph a
small crop comes from is a texture-and-colour task on natural image statistics, unlike digits.

The photographs are the ones Python packages ship (scikit-learn's ``china.jpg`` and ``flower.jpg``, matplotlib's
``grace_hopper.jpg``, scikit-image's sample photographs); pass any files::

    pip install --no-deps --target /tmp/skimg scikit-image
    python benchmarks/photo_folder.py /tmp/photos $(python -c "import sklearn.datasets as d, os; \
        print(os.path.dirname(d.__file__))")/images/{china,flower}.jpg /tmp/skimg/skimage/data/{astronaut,chelsea}.png
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from PIL import Image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder to write (one sub-folder per photograph)")
    parser.add_argument("photos", nargs="+", type=Path)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    for photo in args.photos:
        image = Image.open(photo).convert("RGB")
        folder = args.out / photo.stem
        folder.mkdir(parents=True, exist_ok=True)
        short = min(image.size)
        for i in range(args.per_class):
            side = int(short * rng.uniform(0.12, 0.30))
            x, y = rng.randrange(image.width - side), rng.randrange(image.height - side)
            crop = image.crop((x, y, x + side, y + side)).resize((args.size, args.size), Image.BICUBIC)
            crop.save(folder / f"{i:04d}.png")
    print(f"wrote {len(args.photos)} classes x {args.per_class} images of {args.size} px to {args.out}")


if __name__ == "__main__":
    main()
