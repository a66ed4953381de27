"""Decoding one image file the way training does: upright, RGB, the shorter side resized and the centre cropped.

PIL and numpy only (no torch): `cnnpack infer` decodes with it without loading PyTorch.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# what Pillow raises for a file it cannot decode: besides OSError and ValueError, a PNG with a damaged chunk raises
# SyntaxError and the AVIF plugin RuntimeError
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError, UnidentifiedImageError, Image.DecompressionBombError)
THIN = 16  # resized whole, an image more than this many times as long as the crop is wide takes gigabytes (1 x 200,000)


def gray8(img):
    """16-bit, 32-bit and float grayscale as 8 bits (Pillow's convert() clips at 255: a 16-bit photo turned white,
    and a float one in 0-1 black): 16 bits scaled by 1/257; a 32-bit image holding 0-255 kept, more scaled as 16
    bits; a float image in 0-1 scaled by 255, else kept. The image ensemble's preprocessing does the same."""
    x = np.asarray(img, dtype=np.float64)
    top = float(x.max()) if x.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
        x = x / 257.0
    elif img.mode == "F" and top <= 1.0:
        x = x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """Grayscale (8/16 bit), RGBA, palette and CMYK images become RGB (alpha over white)."""
    if img.mode == "RGB" and "transparency" not in img.info:  # a tRNS colour key is transparency too
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer and float grayscale (PNG, TIFF)
        key = img.info.get("transparency")  # a 16-bit PNG's tRNS key: matched on the 16-bit values, not the 8
        gray = Image.fromarray(gray8(img), "L")
        img = (Image.merge("LA", (gray, Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))))
               if isinstance(key, int) else gray)
    if img.mode == "P" or (img.mode in ("1", "L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
        return bg
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resizes the shorter side to `size`, then crops the centre square. A very thin image has only the part that is
    kept resampled (the same sampling, within 1 of 255), not all of it first."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    big_w, big_h = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (big_w - size) // 2, (big_h - size) // 2
    if big_w * big_h > THIN * size * size:
        sx, sy = w / big_w, h / big_h
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return img.resize((size, size), Image.BILINEAR, box=box)
    return img.resize((big_w, big_h), Image.BILINEAR).crop((left, top, left + size, top + size))


def read_image(path: str | Path, size: int) -> np.ndarray:
    """One image file as a (3, S, S) uint8 array, turned upright by its EXIF orientation (a phone's photo);
    raises one of DECODE_ERRORS if unreadable."""
    with Image.open(path) as img:
        draft(img, size, size)
        img.load()
        rgb = resize_center_crop(to_rgb(upright(img)), size)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def draft(img: Image.Image, width: int, height: int) -> None:
    """A JPEG is decoded at 1/2, 1/4 or 1/8 of its size where that still leaves twice the size it is resized to
    (libjpeg's DCT scaling): a phone's 4000x3000 photo for a 64 px model was decoded whole, 36 MB of pixels and
    most of the read's time, and four 8000x8000 photos read at once took 2.5 GB. The Triton ensemble's
    preprocessing does the same (backends/preprocess/model.py), so served and local pixels stay equal."""
    if img.format in ("JPEG", "MPO"):  # MPO: a JPEG with a multi-picture block (many phones' photos)
        img.draft(img.mode, (2 * width, 2 * height))


def upright(img: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation says; as it is where the EXIF block is damaged (the pixels are
    fine: the image is not refused for it)."""
    from PIL import ImageOps

    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - whatever a damaged EXIF block makes Pillow raise
        return img


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Pillow's warnings about one file, while files are decoded: an image past its warning size (89 million
    pixels) is read all the same, a damaged EXIF block is left out; neither is worth a raw Python warning on stderr
    (an image past twice that size is refused, DecompressionBombError, and skipped as unreadable with its reason).
    Entered by the thread that decodes, or that waits for the threads that do."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        yield
