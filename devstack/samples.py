"""Sample images for the quick start and the tests, taken from installed packages.

scikit-image ships ~25 real photographs and test images (BSD licensed); they are copied, never
committed. :func:`derived_image_set` adds seeded variants (flips, crops, rotations) when a test
needs more distinct images than that.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from pathlib import Path

from PIL import Image, ImageEnhance, ImageOps

# Files of skimage.data that are not ordinary single images, or duplicate another one's pixels.
_SKIP = {"chessboard_GRAY.png", "multipage.tif", "multipage_rgb.tif", "lfw_subset.npy"}
_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".tif"}


def skimage_images() -> list[Path]:
    """The image files bundled with scikit-image.

    Raises:
        ModuleNotFoundError: scikit-image is not installed (it comes with the ``dev`` extra).
    """
    import skimage.data  # noqa: PLC0415 (a dev-only dependency, imported on use)

    folder = Path(skimage.data.__file__).parent
    return sorted(
        p for p in folder.iterdir() if p.suffix.lower() in _SUFFIXES and p.name not in _SKIP
    )


def copy_samples(target: Path) -> list[Path]:
    """Copy the scikit-image samples into ``target``; return the copies."""
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for source in skimage_images():
        copy = target / source.name
        if not copy.exists():
            shutil.copyfile(source, copy)
        copies.append(copy)
    return copies


def derived_image_set(target: Path, count: int, *, seed: int = 7) -> list[Path]:
    """Write ``count`` pairwise-distinct JPEG images derived from the samples; return them.

    Variants are deterministic for a seed: originals first, then flips, crops, rotations and
    colour changes. Duplicates of pixel content are dropped, so every image has a unique
    nearest neighbour: itself.
    """
    target.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    bases = [Image.open(path).convert("RGB") for path in skimage_images()]
    seen: set[str] = set()
    written: list[Path] = []
    variant = 0
    while len(written) < count:
        for index, base in enumerate(bases):
            if len(written) >= count:
                break
            image = _variant(base, variant, rng)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            digest = hashlib.sha256(image.tobytes()).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            path = target / f"img_{variant:02d}_{index:02d}.jpg"
            path.write_bytes(buffer.getvalue())
            written.append(path)
        variant += 1
    return written


def _variant(image: Image.Image, variant: int, rng: random.Random) -> Image.Image:
    if variant == 0:
        return image
    kind = variant % 4
    if kind == 1:
        image = ImageOps.mirror(image)
    elif kind == 2:
        width, height = image.size
        left, top = rng.randint(0, width // 5), rng.randint(0, height // 5)
        image = image.crop((left, top, left + width * 3 // 4, top + height * 3 // 4))
    elif kind == 3:
        image = image.rotate(90, expand=True)
    else:
        image = ImageOps.flip(image)
    return ImageEnhance.Color(image).enhance(0.6 + 0.1 * (variant // 4))
