"""Data loading from real image files written by the tests: layouts, bad files, colour modes, shapes."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import broken_chunk_png

from cnnpack import shapes
from cnnpack.data import class_names, load_data, load_image_folder
from cnnpack.data_change import changed_since
from cnnpack.errors import UserInputError
from cnnpack.images import read_image

SIZE = 16
COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 60), "red": (220, 30, 30)}


def _write(folder: Path, n: int, rgb: tuple[int, int, int], *, start: int = 0, fmt: str = "png") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        Image.new("RGB", (24, 20), rgb).save(folder / f"img{i}.{fmt}")


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        _write(root / cls, n, COLOURS[cls])
    return root


def _mean_rgb(split, label: int) -> np.ndarray:
    return split.images[split.labels == label].float().mean(dim=(0, 2, 3)).numpy()


def test_train_val_layout(tmp_path):
    for split, n in (("train", 5), ("val", 2)):
        _folder(tmp_path / split, {"red": n, "blue": n, "green": n})
    d = load_image_folder(tmp_path, SIZE)
    assert d.classes == ["blue", "green", "red"]  # sorted folder names
    assert (len(d.train), len(d.val)) == (15, 6)
    assert d.train.images.shape == (15, 3, SIZE, SIZE) and d.train.images.dtype == torch.uint8
    assert torch.bincount(d.val.labels).tolist() == [2, 2, 2]
    # each label carries its own folder's pixels (non-square images resized + centre-cropped)
    for label, cls in enumerate(d.classes):
        np.testing.assert_allclose(_mean_rgb(d.train, label), COLOURS[cls], atol=1)
    assert d.skipped == []


@pytest.mark.parametrize("train, val", [("Train", "Val"), ("training", "validation"), ("TRAIN", "valid"),
                                        ("train", "test")])
def test_split_folders_are_known_by_their_usual_names_in_any_case(tmp_path, train, val):
    """`Train/` and `Val/` were read as two classes named Train and Val (exit 0)."""
    for split, n in ((train, 3), (val, 1)):
        _folder(tmp_path / split, {"red": n, "blue": n})
    d = load_image_folder(tmp_path, SIZE)
    assert d.classes == ["blue", "red"] and (len(d.train), len(d.val)) == (6, 2)


def test_classes_named_like_splits_stay_classes(tmp_path):
    """`valid/` and `invalid/` are two classes: a folder named as a split is one only where all of them are."""
    _write(tmp_path / "valid", 4, COLOURS["green"])
    _write(tmp_path / "invalid", 4, COLOURS["red"])
    assert load_image_folder(tmp_path, SIZE).classes == ["invalid", "valid"]
    _write(tmp_path / "train", 4, COLOURS["blue"])  # images in it: a class named train (a vehicle data set's)
    assert load_image_folder(tmp_path, SIZE).classes == ["invalid", "train", "valid"]
    assert class_names(str(tmp_path)) == ["invalid", "train", "valid"]
    shutil.rmtree(tmp_path / "train")
    _folder(tmp_path / "train", {"red": 2, "blue": 2})  # class folders in it: a split whose val/ is missing
    (tmp_path / "train" / "labels.csv").write_text("a file beside the class folders: still a split")
    with pytest.raises(UserInputError, match="has train/ but no val/"):
        load_image_folder(tmp_path, SIZE)
    assert class_names(str(tmp_path)) is None


def test_linked_folders_and_files_are_read_and_a_dangling_link_is_counted(tmp_path):
    """A class folder or a sub-folder that is a link is read (a linked sub-folder's images were dropped without a
    word); a link to nothing is an unreadable file; a link loop ends."""
    elsewhere = _folder(tmp_path / "elsewhere", {"red": 3, "blue": 2})
    root = tmp_path / "data"
    (root / "blue").mkdir(parents=True)
    (root / "red").symlink_to(elsewhere / "red")
    (root / "blue" / "more").symlink_to(elsewhere / "blue")
    (root / "blue" / "loop").symlink_to(root / "blue")
    _write(root / "blue", 1, COLOURS["blue"], start=10)
    (root / "blue" / "gone.png").symlink_to(tmp_path / "nothing.png")
    (root / "blue" / "up").symlink_to("..")  # a link up: the other classes' images read as blue's
    os.mkfifo(tmp_path / "fifo")
    (root / "blue" / "pipe.png").symlink_to(tmp_path / "fifo")  # opening it waited for a writer forever
    d = load_image_folder(root, SIZE, val_fraction=0.2, seed=0)
    assert len(d.train) + len(d.val) == 6 and len(d.skipped) == 2 and "gone.png" in d.skipped[0]
    assert d.skipped[1].endswith("pipe.png: not a regular file (a pipe, a device or a socket)")
    assert [a + b for a, b in zip(d.summary()["train_per_class"], d.summary()["val_per_class"])] == [3, 3]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder whatever its mode")
def test_a_class_folder_that_cannot_be_listed_is_said_so(tmp_path):
    """It was "class folder red has no files; remove it or add images"."""
    root = _folder(tmp_path / "data", {"red": 3, "blue": 3})
    (root / "red").chmod(0)
    try:
        with pytest.raises(PermissionError) as e:
            load_image_folder(root, SIZE)
        assert e.value.filename == str(root / "red")
    finally:
        (root / "red").chmod(0o755)


def test_a_folder_read_again_in_one_process_is_not_decoded_again_unless_a_file_changed(tmp_path, monkeypatch):
    """A pipeline reads its data folder five times; the second read reuses the decoded pixels, a rewritten file is
    decoded again, and what one caller does to its split never reaches the next."""
    import os

    from cnnpack import data

    _folder(tmp_path, {"red": 4, "blue": 4})
    decoded = []
    real = data.read_image
    monkeypatch.setattr(data, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    first = load_image_folder(tmp_path, SIZE)
    assert len(decoded) == 8
    first.train.images.zero_()  # a caller scribbling on its copy
    again = load_image_folder(tmp_path, SIZE)
    assert len(decoded) == 8  # nothing decoded again
    np.testing.assert_allclose(_mean_rgb(again.train, 1), COLOURS["red"], atol=1)
    changed = tmp_path / "red" / "img0.png"
    Image.new("RGB", (24, 20), COLOURS["green"]).save(changed)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a coarse clock must not hide the change
    third = load_image_folder(tmp_path, SIZE)
    assert [Path(p).name for p in decoded[8:]] == ["img0.png"]
    pixels = {Path(f).name: img for f, img, lab in zip(third.train.files + third.val.files,
                                                       torch.cat([third.train.images, third.val.images]),
                                                       torch.cat([third.train.labels, third.val.labels]))
              if lab == 1}
    np.testing.assert_allclose(pixels["img0.png"].float().mean(dim=(1, 2)).numpy(), COLOURS["green"], atol=1)


def test_single_folder_is_split_with_the_seed(tmp_path):
    _folder(tmp_path, {"red": 10, "blue": 10})
    a = load_image_folder(tmp_path, SIZE, val_fraction=0.2, seed=1)
    b = load_image_folder(tmp_path, SIZE, val_fraction=0.2, seed=1)
    c = load_image_folder(tmp_path, SIZE, val_fraction=0.2, seed=2)
    assert (len(a.train), len(a.val)) == (16, 4)
    assert torch.bincount(a.val.labels).tolist() == [2, 2]  # stratified
    assert a.val.files == b.val.files  # same seed, same split
    assert a.val.files != c.val.files
    assert not set(a.train.files) & set(a.val.files)
    assert len(set(a.train.files) | set(a.val.files)) == 20


def test_a_large_val_fraction_leaves_every_class_an_image_to_train_and_hidden_folders_are_not_read(tmp_path):
    import shutil

    _folder(tmp_path, {"red": 3, "blue": 3})
    d = load_image_folder(tmp_path, SIZE, val_fraction=0.95)  # round(3 * 0.95) = 3 of 3 went to validation
    assert torch.bincount(d.train.labels).tolist() == [1, 1] and len(d.val) == 4
    hidden = tmp_path / "red" / ".ipynb_checkpoints"
    hidden.mkdir()
    shutil.copy(tmp_path / "red" / "img0.png", hidden / "img0-checkpoint.png")  # a copy: a train/val leak if read
    d = load_image_folder(tmp_path, SIZE)
    assert not [f for f in d.train.files + d.val.files if ".ipynb_checkpoints" in f] and len(d.train) + len(d.val) == 6
    one = tmp_path / "one"
    _folder(one, {"red": 1, "blue": 1})
    with pytest.raises(UserInputError, match="too few images to hold out a validation split|needs at least 2"):
        load_image_folder(one, SIZE)


def test_bad_files_are_skipped_and_counted(tmp_path):
    root = _folder(tmp_path, {"red": 4, "blue": 4})
    good = (root / "red" / "img0.png").read_bytes()
    (root / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "red" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (root / "blue" / "notes.txt").write_text("not an image\n")
    (root / "blue" / "empty.jpg").write_bytes(b"")
    buf = Path(tmp_path / "tmp.jpg")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, quality=90)
    (root / "blue" / "truncated.jpg").write_bytes(buf.read_bytes()[:300])
    buf.unlink()
    (root / "blue" / "badchunk.png").write_bytes(broken_chunk_png())  # Pillow raises SyntaxError for it
    d = load_image_folder(root, SIZE, val_fraction=0.25, seed=0)
    assert len(d.train) + len(d.val) == 8
    assert len(d.skipped) == 6
    named = " ".join(d.skipped)
    for name in ("truncated.png", "corrupt.png", "notes.txt", "empty.jpg", "truncated.jpg", "badchunk.png"):
        assert name in named
    assert d.summary()["skipped_files"] == 6


def test_a_phone_photo_is_read_upright_and_a_thin_image_without_gigabytes(tmp_path):
    """EXIF orientation 6 (a phone held upright) is applied, as a viewer shows the photo. A 1 x 200,000 image
    was resized whole before its crop (64 x 12.8 million pixels, 4.3 GB)."""
    import subprocess
    import sys

    from PIL import ImageOps

    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (220, 30, 30)  # left half red, right half blue, as stored
    pixels[:, 20:] = (30, 30, 220)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = ImageOps.exif_transpose(Image.open(tmp_path / "phone.jpg"))
    upright.save(tmp_path / "upright.png")
    assert upright.size == (20, 40)
    np.testing.assert_array_equal(read_image(tmp_path / "phone.jpg", 16), read_image(tmp_path / "upright.png", 16))
    ramp = np.linspace(0, 255, 200_000).astype(np.uint8)[:, None, None].repeat(3, 2)  # (200000, 1, 3)
    Image.fromarray(ramp).save(tmp_path / "thin.png")
    code = ("import resource; from cnnpack.images import read_image"
            f"; x = read_image({str(tmp_path / 'thin.png')!r}, 64)"
            "; assert x.shape == (3, 64, 64) and abs(int(x[0, 32, 32]) - 127) <= 2, x[0, :, 32]"
            "; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peak_mib = int(subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True,
                                  text=True).stdout) / 1024
    assert peak_mib < 1500, peak_mib  # the import of torch and numpy: about 400 MiB


def test_a_class_with_only_unreadable_files_is_an_error(tmp_path):
    root = _folder(tmp_path, {"red": 3})
    (root / "blue").mkdir()
    (root / "blue" / "a.png").write_bytes(b"garbage")
    (root / "blue" / "b.jpg").write_text("also garbage")
    # the reason in words, not only its type's name ("UnidentifiedImageError")
    with pytest.raises(UserInputError, match=r"blue has no readable images \(2 unreadable files, e\.g\. .*a\.png: "
                                             r"UnidentifiedImageError \(cannot identify image file\)\)"):
        load_image_folder(root, SIZE)


def test_nothing_readable_is_an_error(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserInputError, match="no readable images"):
        load_image_folder(tmp_path, SIZE)


def _save(img: Image.Image, path: Path) -> Path:
    img.save(path)
    return path


def test_colour_modes_become_rgb(tmp_path):
    gray = _save(Image.new("L", (20, 20), 100), tmp_path / "gray.png")
    gray16 = _save(Image.fromarray(np.full((20, 20), 40000, np.uint16)), tmp_path / "gray16.png")  # 61 % grey
    rgba = Image.new("RGBA", (20, 20), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 20, 10))  # top half fully transparent: composited over white
    rgba = _save(rgba, tmp_path / "rgba.png")
    pal = Image.new("P", (20, 20), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal = _save(pal, tmp_path / "palette.png")
    gif = _save(Image.new("RGB", (20, 20), (250, 250, 0)).convert("P"), tmp_path / "anim.gif")
    cmyk = _save(Image.new("CMYK", (20, 20), (255, 0, 0, 0)), tmp_path / "cmyk.jpg")  # pure cyan
    la = _save(Image.new("LA", (20, 20), (50, 0)), tmp_path / "la.png")  # transparent grey: white
    keyed = Image.new("L", (20, 20), 0)
    keyed.paste(200, (0, 10, 20, 20))
    keyed_l = tmp_path / "keyed_l.png"
    keyed.save(keyed_l, transparency=0)  # a tRNS colour key: black is transparent (it stayed black)
    keyed_rgb = tmp_path / "keyed_rgb.png"
    keyed.convert("RGB").save(keyed_rgb, transparency=(0, 0, 0))
    keyed_16 = tmp_path / "keyed_16.png"  # the key on the 16-bit values: 1 is opaque, though 8 bits make it 0 too
    Image.fromarray(np.array([[0] * 20] * 10 + [[1] * 10 + [51400] * 10] * 10, np.uint16)).save(keyed_16,
                                                                                                 transparency=0)
    keyed_1 = tmp_path / "keyed_1.png"
    Image.fromarray(np.array([[True] * 20] * 10 + [[False] * 20] * 10)).save(keyed_1, transparency=1)

    def px(path):
        arr = read_image(path, 8)
        assert arr.shape == (3, 8, 8) and arr.dtype == np.uint8
        return arr

    assert (px(gray) == 100).all()
    assert np.allclose(px(gray16), 40000 / 257, atol=1)  # scaled to 8 bits, not clipped to white
    top, bottom = px(rgba)[:, 1, 4], px(rgba)[:, 6, 4]
    assert top.tolist() == [255, 255, 255] and bottom.tolist() == [255, 0, 0]
    assert px(pal)[:, 4, 4].tolist() == [10, 200, 30]
    assert np.allclose(px(gif)[:, 4, 4], [250, 250, 0], atol=8)
    r, g, b = px(cmyk)[:, 4, 4].astype(int)
    assert r < 40 and g > 215 and b > 215  # cyan, not garbage from reading CMYK bytes as RGB
    assert (px(la) == 255).all()
    for keyed in (keyed_l, keyed_rgb):
        assert px(keyed)[:, 1, 4].tolist() == [255, 255, 255] and px(keyed)[:, 6, 4].tolist() == [200, 200, 200]
    assert px(keyed_16)[:, 1, 4].tolist() == [255] * 3 and px(keyed_16)[:, 6, 1].tolist() == [0] * 3
    assert px(keyed_16)[:, 6, 6].tolist() == [200] * 3
    assert px(keyed_1)[:, 1, 4].tolist() == [255] * 3 and px(keyed_1)[:, 6, 4].tolist() == [0] * 3
    unit = _save(Image.fromarray(np.full((20, 20), 0.5, np.float32)), tmp_path / "unit.tif")  # float in 0-1
    bytes32 = _save(Image.fromarray(np.full((20, 20), 200, np.int32)), tmp_path / "i32.tif")  # 32-bit holding 0-255
    assert (px(unit) == 128).all() and (px(bytes32) == 200).all()  # they were near black


def test_mixed_modes_load_through_the_folder_loader(tmp_path):
    root = _folder(tmp_path, {"red": 2, "blue": 2})
    Image.new("L", (20, 20), 90).save(root / "red" / "g.png")
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(root / "red" / "c.jpg")
    Image.new("RGBA", (20, 20), (200, 0, 0, 128)).save(root / "blue" / "a.png")
    d = load_image_folder(root, SIZE, val_fraction=0.2, seed=0)
    assert len(d.train) + len(d.val) == 7 and d.skipped == []


def _one_class(p: Path) -> Path:
    _write(p / "only", 3, (1, 2, 3))
    return p


def _empty_class(p: Path) -> Path:
    _folder(p, {"red": 2})
    (p / "blue").mkdir()
    return p


def _a_file(p: Path) -> Path:
    (p / "f.png").write_bytes(b"x")
    return p / "f.png"


def _train_only(p: Path) -> Path:
    _folder(p / "train", {"red": 2, "blue": 2})
    return p


def _empty_val(p: Path) -> Path:
    (p / "val").mkdir()
    return _train_only(p)


def _val_extra_class(p: Path) -> Path:
    _folder(p / "val", {"green": 1})
    return _train_only(p)


BAD_FOLDERS = {
    "missing": (lambda p: p / "missing", "data folder not found"),
    "empty": (lambda p: p, "has no class folders"),
    "one-class": (_one_class, r"only one class \(only\)"),
    "empty-class": (_empty_class, "blue has no files"),
    "file": (_a_file, "is a file"),
    "no-val": (_train_only, "has train/ but no val/"),
    "empty-val": (_empty_val, "val has no class folders"),
    "val-extra-class": (_val_extra_class, "classes not in train: green"),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folders_say_what_is_wrong(tmp_path, case):
    make, message = BAD_FOLDERS[case]
    root = make(tmp_path)
    with pytest.raises(UserInputError, match=message) as e:
        load_data(str(root), SIZE)
    assert "\n" not in str(e.value)


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_shapes_are_deterministic_and_diverse(tmp_path, monkeypatch):
    kw = dict(image_size=24, seed=3, train_per_class=4, val_per_class=2)
    monkeypatch.setenv("CNNPACK_CACHE", str(tmp_path / "a"))
    a = shapes.materialise(**kw)
    monkeypatch.setenv("CNNPACK_CACHE", str(tmp_path / "b"))
    b = shapes.materialise(**kw)
    assert a != b and _tree_digest(a) == _tree_digest(b)  # same seed, same bytes (drawn independently)
    monkeypatch.setenv("CNNPACK_CACHE", str(tmp_path / "c"))
    assert _tree_digest(shapes.materialise(**{**kw, "seed": 4})) != _tree_digest(a)

    d = load_image_folder(a, 24)
    assert len(d.classes) >= 6 and d.classes == sorted(shapes.CLASSES)
    # the same files in another cache (another $HOME), named "shapes" as load_data names them: the same data
    d.source, other = "shapes", load_image_folder(b, 24)
    other.source = "shapes"
    digests = [{k: v for k, v in x.summary().items() if k.endswith("_files_sha256")} for x in (d, other)]
    assert digests[0] == digests[1] and len(digests[0]) == 2
    assert (len(d.train), len(d.val)) == (4 * len(d.classes), 2 * len(d.classes))
    imgs = d.train.images.float()
    assert imgs.std(dim=(1, 2, 3)).min() > 10  # not flat
    assert (imgs[:, None] - imgs[None]).abs().mean(dim=(2, 3, 4)).add(torch.eye(len(imgs)) * 1e9).min() > 5  # no duplicates
    assert not list(tmp_path.glob("*/.shapes-*")), "temp folder left behind"


def test_shapes_is_materialised_once_and_sized_on_request(tiny_data):
    d = load_image_folder(tiny_data, 32)
    assert d.train.images.shape[1:] == (3, 32, 32)
    first = (tiny_data / ".complete").stat().st_mtime_ns
    assert shapes.materialise(image_size=32, seed=1, train_per_class=60, val_per_class=15) == tiny_data
    assert (tiny_data / ".complete").stat().st_mtime_ns == first  # reused, not redrawn
    with Image.open(next((tiny_data / "val" / "star").iterdir())) as img:
        assert img.mode == "RGB" and img.size == (32, 32)


def test_the_training_split_is_counted_before_any_image_is_read(tmp_path):
    """The pipeline refuses --calibration-images past it before training: the count must be the loader's own."""
    from PIL import Image

    from cnnpack.data import load_data, training_images_at_most

    for cls, n in (("a", 7), ("b", 2), ("c", 1)):
        (tmp_path / "flat" / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(tmp_path / "flat" / cls / f"{i}.png")
    assert training_images_at_most(str(tmp_path / "flat")) == len(load_data(str(tmp_path / "flat"), 12).train) == 8
    (tmp_path / "split" / "val" / "a").mkdir(parents=True)
    (tmp_path / "flat").rename(tmp_path / "split" / "train")
    assert training_images_at_most(str(tmp_path / "split")) == 10
    assert training_images_at_most("torchvision:MNIST") is None


def test_a_file_swapped_or_renamed_at_the_same_counts_is_a_change_of_the_data(tmp_path, monkeypatch):
    """The counts stayed the same, the seeded split moved (a validation image may now be one the model trained on):
    verify, evaluate and `train --resume` said nothing."""
    root = _folder(tmp_path / "data", {"red": 6, "blue": 6})
    then = load_image_folder(root, SIZE).summary()
    assert changed_since(then, load_image_folder(root, SIZE).summary()) is None
    monkeypatch.chdir(tmp_path)  # the same files named from elsewhere (the built-in data's are under $HOME): no change
    assert changed_since(then, load_image_folder(Path("data"), SIZE).summary()) is None
    first = sorted((root / "red").iterdir())[0]
    first.rename(first.with_name("zz_renamed.png"))
    now = load_image_folder(root, SIZE).summary()
    assert now["val_per_class"] == then["val_per_class"] and now["train_per_class"] == then["train_per_class"]
    said = changed_since(then, now)
    assert said and said.startswith("2 classes, 10 + 2 images then and now, but other files in ") and "renamed" in said
    older = {k: v for k, v in then.items() if not k.endswith("_files_sha256")}  # a run recorded before: no verdict
    assert changed_since(older, now) is None


def test_a_large_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    """A phone's photo for a small model was decoded whole (four 8000x8000 photos read at once: 2.5 GB)."""
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (1200, 1600, 3), dtype=np.uint8)).save(path)
    from PIL import ImageFile

    sizes = []
    real = ImageFile.ImageFile.load

    def load(img):
        sizes.append(img.size)  # the size it decodes at
        return real(img)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    assert read_image(path, 64).shape == (3, 64, 64)
    assert sizes and max(sizes[0]) == 200  # 1/8 of 1600: still twice 64 on the short side (150)
    mpo = tmp_path / "phone.mpo"  # a JPEG with a multi-picture block, as many phones write: Pillow's "MPO"
    with Image.open(path) as first:
        first.save(mpo, "MPO", save_all=True, append_images=[first.copy()])
    assert Image.open(mpo).format == "MPO"
    sizes.clear()
    assert read_image(mpo, 64).shape == (3, 64, 64) and max(sizes[0]) == 200


def test_a_lone_train_folder_of_images_says_they_need_class_folders(tmp_path):
    """train/ of images and no val/: the message said only to add val/, which led to "train has no class folders";
    and class_names called it one class named train, so quantize's data check spoke of a class mismatch."""
    _write(tmp_path / "train", 3, COLOURS["red"])
    with pytest.raises(UserInputError, match=r"has train/ but no val/ \(train/ holds images, not class folders: put "
                                             r"them in .*train/<class>/\)"):
        load_image_folder(tmp_path, SIZE)
    assert class_names(str(tmp_path)) is None


def test_folders_of_nas_boxes_and_mac_zips_are_neither_classes_nor_images(tmp_path):
    """A Synology share's @eaDir thumbnails became a class and three more images of each class, on both sides of the
    split (exit 0); __MACOSX beside train/ and test/ was "train/ but no val/"."""
    flat = _folder(tmp_path / "flat", {"red": 5, "blue": 5})
    for cls in ("red", "blue"):
        _write(flat / cls / "@eaDir" / "img0.png", 3, COLOURS[cls])  # SYNOFILE_THUMB_* of each image
    _write(flat / "@eaDir" / "red", 1, COLOURS["red"])
    _write(flat / "__MACOSX" / "red", 1, COLOURS["red"], fmt="png")
    (flat / "lost+found").mkdir()
    d = load_image_folder(flat, SIZE)
    assert d.classes == ["blue", "red"] and len(d.train) + len(d.val) == 10
    assert class_names(str(flat)) == ["blue", "red"]
    split = tmp_path / "split"
    for part, n in (("train", 3), ("test", 1)):
        _folder(split / part, {"red": n, "blue": n})
    _write(split / "__MACOSX" / "train" / "red", 1, COLOURS["red"])
    assert (len(load_image_folder(split, SIZE).train), class_names(str(split))) == (6, ["blue", "red"])


def test_a_class_copied_from_macos_is_the_class_of_the_same_name():
    """`café` in val/ copied from a Mac (NFD) was "classes not in train: café" beside train/'s `café` (NFC)."""
    import tempfile
    import unicodedata

    from cnnpack.data import read_class_folders

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
        _write(root / "train" / nfc, 3, COLOURS["red"])
        _write(root / "train" / "blue", 3, COLOURS["blue"])
        _write(root / "val" / nfd, 2, COLOURS["red"])
        _write(root / "val" / "blue", 1, COLOURS["blue"])
        d = load_image_folder(root, SIZE)
        assert d.classes == ["blue", nfc] and torch.bincount(d.val.labels).tolist() == [1, 2]
        s, _ = read_class_folders(root / "val", ["blue", nfc], SIZE)  # evaluate --data of other images
        assert torch.bincount(s.labels).tolist() == [1, 2]


def test_folders_that_are_none_of_the_models_classes_are_all_named_and_the_list_of_classes_is_bounded(tmp_path):
    from cnnpack.data import read_class_folders

    classes = [f"c{i:03d}" for i in range(300)]
    _write(tmp_path / "c001", 1, COLOURS["red"])
    _write(tmp_path / "dog", 1, COLOURS["red"])
    _write(tmp_path / "cat", 1, COLOURS["red"])
    with pytest.raises(UserInputError, match=r"^class folders cat, dog in .* are not among the model's classes "
                                             r"\(c000, .*, c007 and 292 more\); rename or remove them$"):
        read_class_folders(tmp_path, classes, SIZE)
    shutil.rmtree(tmp_path / "cat"), shutil.rmtree(tmp_path / "dog"), shutil.rmtree(tmp_path / "c001")
    _write(tmp_path / "test" / "c001", 1, COLOURS["red"])  # evaluate --data of a folder holding test/ alone
    with pytest.raises(UserInputError, match=r"test holds class folders: pass it as --data$"):
        read_class_folders(tmp_path, classes, SIZE)


def test_split_names_among_classes_and_split_folders_of_images_are_said_as_such(tmp_path):
    """train/ and val/ of images had no hint where the images go (beside other folders too: a class named `val` is
    rarer than a split whose images are not in class folders yet); a lone train/ of folders among classes names the
    other reading."""
    flat_split = tmp_path / "flat_split"
    _write(flat_split / "train", 4, COLOURS["red"])
    _write(flat_split / "val", 2, COLOURS["red"])
    _write(flat_split / "samples", 1, COLOURS["red"])
    with pytest.raises(UserInputError, match=r"train has no class folders; .*\(train/ holds images, not class "
                                             r"folders: put them in .*train/<class>/\)$"):
        load_image_folder(flat_split, SIZE)
    nested = tmp_path / "nested"
    _write(nested / "bus", 4, COLOURS["blue"])
    _write(nested / "train" / "steam", 4, COLOURS["red"])
    with pytest.raises(UserInputError, match=r"has train/ but no val/; .* \(if train is a class whose images lie in "
                                             r"subfolders, move them up into .*train/\)$"):
        load_image_folder(nested, SIZE)


def test_images_that_cannot_fit_in_memory_are_refused_before_decoding_and_nothing_is_written(tmp_path, monkeypatch):
    """Every image is held decoded: 100,000 photos at 224 px are 15 GiB, and the kernel's out-of-memory kill came
    minutes into the decoding without a word. A container's cgroup limit counts too."""
    from typer.testing import CliRunner

    from cnnpack import host
    from cnnpack.cli import app

    data = _folder(tmp_path / "d", {"blue": 6, "red": 6})
    free = host.available_memory()
    assert free is None or free > 0  # (this machine's kernel says; None: it says nothing, not Linux)
    monkeypatch.setattr(host, "available_memory", lambda: 12 * 3 * 64 * 64)  # a little more than 12 images at 32 px
    load_data(str(data), 32)
    with pytest.raises(UserInputError, match=r"--data .*d: 12 images at 64 px need 0.0 GiB of memory as cnnpack "
                                             r"holds them \(decoded, uint8, and a second copy while a split is "
                                             r"assembled\), and 0.0 GiB is available"):
        load_data(str(data), 64)
    out = CliRunner().invoke(app, ["train", "--data", str(data), "--image-size", "64", "--run", str(tmp_path / "r")])
    assert out.exit_code == 2 and "use a smaller --image-size" in out.stderr and not (tmp_path / "r").exists()


def test_a_container_s_memory_limit_counts_its_droppable_page_cache_as_free(tmp_path, monkeypatch):
    """cgroup v2 and v1: memory.current (usage_in_bytes) holds the page cache of a data set just read, which the
    kernel drops on demand; counted as used, it refused data sets that fit."""
    from pathlib import Path as P

    from cnnpack import host

    gib = 1 << 30
    files = {"/proc/meminfo": "MemAvailable:   41943040 kB\n",  # 40 GiB on the host
             "/sys/fs/cgroup/memory.max": f"{8 * gib}\n", "/sys/fs/cgroup/memory.current": f"{7 * gib}\n",
             "/sys/fs/cgroup/memory.stat": f"anon {gib}\ninactive_file {5 * gib}\n"}
    real = P.read_text
    monkeypatch.setattr(P, "read_text", lambda self, *a, **k: files[str(self)] if str(self) in files
                        else (_ for _ in ()).throw(FileNotFoundError(str(self))))
    assert host.available_memory() == 6 * gib  # 8 - (7 - 5): not 1
    files.pop("/sys/fs/cgroup/memory.max")  # v1: its own files
    files.update({"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{4 * gib}\n",
                  "/sys/fs/cgroup/memory/memory.usage_in_bytes": f"{3 * gib}\n",
                  "/sys/fs/cgroup/memory/memory.stat": f"cache {2 * gib}\ntotal_inactive_file {2 * gib}\n"})
    assert host.available_memory() == 3 * gib
    files["/sys/fs/cgroup/memory/memory.limit_in_bytes"] = "9223372036854771712\n"  # v1's "unlimited"
    assert host.available_memory() == 40 * gib
    monkeypatch.setattr(P, "read_text", real)
