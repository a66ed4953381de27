"""The built-in `shapes` dataset: procedurally drawn, deterministic for a seed.

Each image is a textured, noisy background with one filled shape of a random colour, size,
position and rotation. The images are written once as PNG files into an ImageFolder under
the cache directory and then read through the same loader as a user's folder.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "cross", "crescent", "square", "star", "triangle")
VERSION = 1  # bump when drawing changes, so old caches are not reused
SUPERSAMPLE = 4
TRAIN_PER_CLASS, VAL_PER_CLASS = 600, 150  # the built-in data's split, per class


def cache_root() -> Path:
    return Path(os.environ.get("CNNPACK_CACHE", Path.home() / ".cache" / "cnnpack"))


def _polygon(cx: float, cy: float, radii: list[float], angle: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [
        (cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
        for k, r in enumerate(radii)
    ]


def _cross(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    t = r * 0.34  # half arm thickness
    pts = [(t, r), (t, t), (r, t), (r, -t), (t, -t), (t, -r), (-t, -r), (-t, -t), (-r, -t), (-r, t), (-t, t), (-t, r)]
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _draw_mask(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The shape as an anti-aliased L-mode mask (drawn at SUPERSAMPLE x, then reduced)."""
    big = size * SUPERSAMPLE
    r = rng.uniform(0.2, 0.38) * big
    cx, cy = rng.uniform(r * 0.9, big - r * 0.9, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    if cls == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif cls == "crescent":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
        d.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=0)
    elif cls == "square":
        d.polygon(_polygon(cx, cy, [r * 0.95] * 4, angle), fill=255)
    elif cls == "triangle":
        d.polygon(_polygon(cx, cy, [r] * 3, angle), fill=255)
    elif cls == "star":
        d.polygon(_polygon(cx, cy, [r, r * 0.42] * 5, angle), fill=255)
    elif cls == "cross":
        d.polygon(_cross(cx, cy, r, angle), fill=255)
    else:  # pragma: no cover - CLASSES is closed
        raise ValueError(cls)
    return mask.resize((size, size), Image.BOX)


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, size=3)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient with stripes or blotches: (H, W, 3) float."""
    a, b = _colour(rng), _colour(rng)
    theta = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(np.ptp(t), 1e-6)
    img = a * (1 - t[..., None]) + b * t[..., None]
    if rng.random() < 0.5:  # stripes
        freq = rng.uniform(2, 8)
        phi = rng.uniform(0, 2 * math.pi)
        img += 25 * np.sin(2 * math.pi * freq * (np.cos(phi) * xx + np.sin(phi) * yy))[..., None]
    else:  # smooth blotches
        blot = Image.fromarray(rng.uniform(0, 255, size=(max(size // 8, 2),) * 2).astype(np.uint8))
        blot = np.asarray(blot.resize((size, size), Image.BICUBIC), dtype=np.float64)
        img += (blot[..., None] - 128) * 0.3
    return img


def draw(cls: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class `cls`."""
    bg = _background(size, rng)
    fg = _colour(rng)
    while np.abs(fg - bg.mean(axis=(0, 1))).sum() < 150:  # keep the shape visible
        fg = _colour(rng)
    alpha = np.asarray(_draw_mask(cls, size, rng), dtype=np.float64)[..., None] / 255
    img = bg * (1 - alpha) + fg * alpha
    img += rng.normal(0, rng.uniform(3, 14), size=img.shape)
    out = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:
        out = out.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.8) * size / 64))
    return out


def dataset_dir(*, image_size: int, seed: int, train_per_class: int, val_per_class: int) -> Path:
    name = f"shapes-v{VERSION}-{image_size}px-{train_per_class}x{val_per_class}-seed{seed}"
    return cache_root() / name


def _write_class(args: tuple[Path, int, str, int, int, int, int]) -> None:
    folder, split_id, cls, ci, n, size, seed = args
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, ci, i])
        draw(cls, size, rng).save(folder / f"{cls}_{i:05d}.png", optimize=False)


def materialise(*, image_size: int = 64, seed: int = 0, train_per_class: int = TRAIN_PER_CLASS,
                val_per_class: int = VAL_PER_CLASS) -> Path:
    """Writes the dataset as PNGs (once) and returns its ImageFolder root (`train/`, `val/`).

    Each (split, class) folder is drawn by its own process; every image has its own seeded
    generator, so the bytes do not depend on how many processes drew them.
    """
    from concurrent.futures import ProcessPoolExecutor

    root = dataset_dir(image_size=image_size, seed=seed, train_per_class=train_per_class,
                       val_per_class=val_per_class)
    if (root / ".complete").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    jobs = [(tmp / split / cls, split_id, cls, ci, n, image_size, seed)
            for split_id, (split, n) in enumerate((("train", train_per_class), ("val", val_per_class)))
            for ci, cls in enumerate(CLASSES)]
    try:
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
            list(pool.map(_write_class, jobs))
        (tmp / ".complete").write_text("ok\n")
        if (root / ".complete").exists():  # another process finished first: keep its (identical) copy,
            return root  # never delete a dataset someone may be reading
        if root.exists():  # an incomplete leftover (only an older cnnpack could leave one)
            shutil.rmtree(root)
        os.replace(tmp, root)
    except OSError:
        if (root / ".complete").exists():  # another process finished first
            return root
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
