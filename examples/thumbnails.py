"""Thumbnails for every image in a folder, on every core, with a progress bar.

    python examples/thumbnails.py                  # makes sample images in a temp folder
    python examples/thumbnails.py ~/Pictures -o /tmp/thumbs --size 128

Needs Pillow: ``pip install parmap[examples]``.

Each task receives a path and returns a path, never pixels: images are decoded
and encoded inside the workers, so the only thing crossing the process
boundary is a short string each way.
"""

import argparse
import random
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

import parmap

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def make_thumbnail(path: Path, out_dir: Path, size: int) -> Path:
    target = out_dir / f"{path.stem}.thumb.png"
    with Image.open(path) as image:
        image.thumbnail((size, size))
        image.save(target)
    return target


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def make_samples(folder: Path, count: int, seed: int = 7) -> list[Path]:
    """Draw ``count`` sample pictures (random rectangles), so the demo needs no data."""
    rng = random.Random(seed)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (800, 600), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
        draw = ImageDraw.Draw(image)
        for _ in range(20):
            x, y = rng.randrange(700), rng.randrange(500)
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            draw.rectangle((x, y, x + rng.randrange(20, 100), y + rng.randrange(20, 100)), fill=colour)
        path = folder / f"sample_{i:03d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path, help="images to shrink (default: generated samples)")
    parser.add_argument("-o", "--out", type=Path, help="where thumbnails go (default: a temp folder)")
    parser.add_argument("--size", type=int, default=128, help="longest side of a thumbnail in pixels")
    parser.add_argument("--count", type=int, default=24, help="how many sample images to generate")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="parmap-thumbs-") as scratch:
        scratch_dir = Path(scratch)
        if args.folder is None:
            sources_dir = scratch_dir / "images"
            sources_dir.mkdir()
            paths = make_samples(sources_dir, args.count)
            print(f"generated {len(paths)} sample images in {sources_dir}")
        else:
            paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in EXTENSIONS)
        out_dir = args.out or scratch_dir / "thumbs"
        out_dir.mkdir(parents=True, exist_ok=True)

        # A lambda is fine as fn: parmap ships it to the workers with cloudpickle.
        thumbs = parmap.map(
            lambda p: make_thumbnail(p, out_dir, args.size),
            paths,
            workers=args.workers,
            progress={"desc": "thumbnails", "unit": "img"},
        )
        width, height = max((image_size(t) for t in thumbs), default=(0, 0))
        print(f"made {len(thumbs)} thumbnails in {out_dir} (largest {width}x{height})")


if __name__ == "__main__":
    main()
