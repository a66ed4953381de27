"""`--data torchvision:NAME` from a local root, on small data sets written in torchvision's own file formats (nothing
can be downloaded here): MNIST's idx files, QMNIST's 8-column label table, USPS's bz2 lines without class names."""

from __future__ import annotations

import bz2
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cnnpack.data import load_data
from cnnpack.errors import UserInputError

N_TRAIN, N_TEST = 40, 12


def _digits(rng, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
    for image, label in zip(images, labels):  # a bright band whose row says the class
        image[label * size // 10] = 255
    return images, labels


def _idx(path: Path, arr: np.ndarray, kind: int = 0x08, dtype: str = ">u1") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">I", kind << 8 | arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
                     + arr.astype(dtype).tobytes())


@pytest.fixture(scope="module")
def tv_root(tmp_path_factory) -> Path:
    root, rng = tmp_path_factory.mktemp("tv"), np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        images, labels = _digits(rng, n, 28)
        _idx(root / "MNIST" / "raw" / f"{split}-images-idx3-ubyte", images)
        _idx(root / "MNIST" / "raw" / f"{split}-labels-idx1-ubyte", labels)
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        images, labels = _digits(rng, n, 28)
        table = np.zeros((n, 8), np.int32)
        table[:, 0], table[:, 5] = labels, 1000 + np.arange(n)  # the class, and a writer id
        _idx(root / "QMNIST" / "raw" / f"qmnist-{split}-images-idx3-ubyte", images)
        _idx(root / "QMNIST" / "raw" / f"qmnist-{split}-labels-idx2-int", table, kind=0x0C, dtype=">i4")
    for name, n in (("usps.bz2", N_TRAIN), ("usps.t.bz2", N_TEST)):
        images, labels = _digits(rng, n, 16)
        with bz2.open(root / name, "wt") as f:
            for label, row in zip(labels, images.reshape(n, -1) / 127.5 - 1):
                f.write(f"{label + 1} " + " ".join(f"{j + 1}:{v:.4f}" for j, v in enumerate(row)) + "\n")
    return root


def test_mnist_is_read_as_torchvision_splits_it_gray_images_as_rgb(tv_root):
    d = load_data("torchvision:MNIST", 32, data_root=str(tv_root))
    assert d.classes[:2] == ["0 - zero", "1 - one"] and len(d.classes) == 10
    assert (len(d.train), len(d.val)) == (N_TRAIN, N_TEST)
    assert tuple(d.train.images.shape) == (N_TRAIN, 3, 32, 32)
    assert (d.train.images[:, 0] == d.train.images[:, 2]).all()  # gray: the same in every channel
    assert d.train.labels.tolist() == [i % 10 for i in range(N_TRAIN)]


def test_qmnist_s_class_is_the_first_column_of_its_label_table(tv_root):
    """Its labels are an (N, 8) table: taken whole, every command failed with a traceback (bincount, broadcast)."""
    d = load_data("torchvision:QMNIST", 28, data_root=str(tv_root))
    assert d.train.labels.tolist() == [i % 10 for i in range(N_TRAIN)]
    assert d.summary()["train_per_class"] == [N_TRAIN // 10] * 10


def test_usps_without_class_names_has_its_digits_as_classes(tv_root):
    """USPS has no `classes`: an AttributeError traceback before."""
    d = load_data("torchvision:USPS", 16, data_root=str(tv_root))
    assert d.classes == [str(i) for i in range(10)] and (len(d.train), len(d.val)) == (N_TRAIN, N_TEST)


def test_the_record_changes_with_the_content_under_the_same_name_and_counts(tv_root, tmp_path):
    """A torchvision data set has no files for the record's digests (the digest of no names): data replaced at the
    same counts went unseen by --resume and evaluate."""
    from cnnpack.data_change import changed_since

    then = load_data("torchvision:MNIST", 28, data_root=str(tv_root)).summary()
    other = shutil.copytree(tv_root / "MNIST", tmp_path / "MNIST")
    images, labels = _digits(np.random.default_rng(7), N_TRAIN, 28)
    _idx(other / "raw" / "train-images-idx3-ubyte", images)
    now = load_data("torchvision:MNIST", 28, data_root=str(tmp_path)).summary()
    assert then["train_per_class"] == now["train_per_class"]
    assert changed_since(then, now) == f"10 classes, {N_TRAIN} + {N_TEST} images then and now, but other images or " \
                                       "labels in train"
    assert then == load_data("torchvision:MNIST", 28, data_root=str(tv_root)).summary()  # read again: the same
    before = {k: v for k, v in then.items() if "_content_" not in k}  # a record made before the content digests
    assert changed_since(before, now) is None  # (--resume of such a run was refused as "other files")


def _damage(tv_root: Path, tmp_path: Path, file: str, how) -> Path:
    root = tmp_path / "damaged"
    shutil.copytree(tv_root / "MNIST", root / "MNIST")
    path = root / "MNIST" / "raw" / file
    path.write_bytes(how(path.read_bytes()))
    return root


DAMAGE = {  # file, what is done to it, what the error says
    "emptied": ("train-images-idx3-ubyte", lambda b: b"", "could not be read (ValueError: "),
    "bad-header": ("train-images-idx3-ubyte", lambda b: b"\xff" * 4 + b[4:], "could not be read (AssertionError"),
    "wrong-type": ("train-labels-idx1-ubyte", lambda b: b[:2] + b"\x09" + b[3:], "could not be read (TypeError"),
    "truncated": ("train-images-idx3-ubyte", lambda b: b[:1000], "could not be read (RuntimeError: shape"),
    "labels-out-of-range": ("train-labels-idx1-ubyte", lambda b: b[:8] + b"\xc8" * (len(b) - 8),
                            "its train split has labels 200..200 for 10 classes"),
    "fewer-labels": ("t10k-labels-idx1-ubyte", lambda b: b[:7] + bytes([N_TEST - 2]) + b[8:-2],
                     f"its test split has {N_TEST} images and {N_TEST - 2} labels"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_file_is_one_line_saying_so(tv_root, tmp_path, case):
    """Tracebacks (ValueError, AssertionError), "not found" for a truncated file, "no train/test split" for a wrong
    type byte, and labels out of range crashed training mid-epoch, leaving the run "running"."""
    file, how, said = DAMAGE[case]
    root = _damage(tv_root, tmp_path, file, how)
    with pytest.raises(UserInputError) as e:
        load_data("torchvision:MNIST", 28, data_root=str(root))
    message = str(e.value)
    assert message.startswith(f"torchvision:MNIST under {root}") and said in message, message
    assert "damaged or not torchvision's; remove them and fetch them again with --download" in message, message


def test_labels_and_images_a_cast_would_change_are_refused(tv_root, monkeypatch):
    """Float labels were truncated (1.7 -> 1) and 16-bit or float images wrapped or zeroed by a cast to 8 bits."""
    import functools

    import torchvision.datasets as tvd

    real = tvd.MNIST.__init__

    @functools.wraps(real)  # (its signature: cnnpack reads train= in it)
    def floats(self, *a, **k):
        real(self, *a, **k)
        self.targets = self.targets.float() + 0.7

    monkeypatch.setattr(tvd.MNIST, "__init__", floats)
    with pytest.raises(UserInputError, match=r"^torchvision:MNIST's labels are not one class index per image \("
                                             r"float32, shape \[40\]\); export it as an ImageFolder$"):
        load_data("torchvision:MNIST", 28, data_root=str(tv_root))

    @functools.wraps(real)
    def wide(self, *a, **k):
        real(self, *a, **k)
        self.data = self.data.int() * 300

    monkeypatch.setattr(tvd.MNIST, "__init__", wide)
    with pytest.raises(UserInputError, match=r"^torchvision:MNIST holds int32 images, not 8-bit ones"):
        load_data("torchvision:MNIST", 28, data_root=str(tv_root))


def test_a_root_that_is_a_file_is_said_as_such(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserInputError, match=r"^--data-root \S+afile is a file, not the folder torchvision:MNIST lies "
                                             r"in$"):
        load_data("torchvision:MNIST", 28, data_root=str(tmp_path / "afile"))


def test_the_pipeline_fingerprints_its_own_data_set_not_the_others_beside_it(tv_root, tmp_path):
    """The whole root was fingerprinted: another data set downloaded beside it trained a finished run again."""
    from cnnpack.data_change import data_identity

    root = shutil.copytree(tv_root, tmp_path / "tv")
    before = {name: data_identity(f"torchvision:{name}", str(root)) for name in ("MNIST", "USPS")}
    (root / "cifar-10-batches-py").mkdir()
    (root / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"another set")
    assert {name: data_identity(f"torchvision:{name}", str(root)) for name in ("MNIST", "USPS")} == before
    (root / "usps.t.bz2").write_bytes((root / "usps.t.bz2").read_bytes() + b"\n")
    assert data_identity("torchvision:USPS", str(root)) != before["USPS"]
    assert data_identity("torchvision:MNIST", str(root)) == before["MNIST"]


def test_names_that_are_no_classification_split_are_refused_by_name(tv_root):
    with pytest.raises(UserInputError, match=r"^torchvision has no dataset 'mnist'; did you mean MNIST\? \(names are "
                                             r"case-sensitive\)$"):
        load_data("torchvision:mnist", 28, data_root=str(tv_root))
    with pytest.raises(UserInputError, match=r"^torchvision:EMNIST needs split= beside its train/test split "
                                             r"\(train=True/False\); export it as an ImageFolder$"):
        load_data("torchvision:EMNIST", 28, data_root=str(tv_root))
    with pytest.raises(UserInputError, match=r"^torchvision:SVHN takes split=, not train=True/False, which cnnpack "
                                             r"reads its train/test split by; export it as an ImageFolder$"):
        load_data("torchvision:SVHN", 28, data_root=str(tv_root))
    with pytest.raises(UserInputError, match=r"^torchvision has no dataset 'utils'"):
        load_data("torchvision:utils", 28, data_root=str(tv_root))


def test_the_pipeline_retrains_on_other_files_under_the_root_not_on_its_other_spelling(tv_root, tmp_path,
                                                                                        monkeypatch):
    """The pipeline fingerprinted a torchvision data set by its name (files replaced: every stage skipped as
    unchanged) and its root as typed (`tv` and `/abs/tv`: trained again)."""
    from cnnpack.pipeline import Stages
    from cnnpack.pipeline_config import PipelineConfig

    root = shutil.copytree(tv_root, tmp_path / "tv")
    monkeypatch.chdir(tmp_path)

    def inputs(data_root: str) -> dict:
        cfg = PipelineConfig(data="torchvision:MNIST", data_root=data_root)
        return Stages(cfg, progress=False, say=print).train_inputs(None)

    before = inputs("tv")
    assert inputs(str(root)) == before
    images, _ = _digits(np.random.default_rng(3), N_TRAIN, 28)
    _idx(root / "MNIST" / "raw" / "train-images-idx3-ubyte", images)
    assert inputs("tv")["data"] != before["data"]


def test_evaluate_on_the_same_name_under_another_root_is_other_data(tv_root, tmp_path):
    """Its result replaced the run's own eval-checkpoint.json (a score on other images), with a warning about a
    held-out split that torchvision's fixed test split does not have."""
    from cnnpack.evaluate import evaluate
    from cnnpack.train import TrainConfig, train

    run = tmp_path / "run"
    train(run, TrainConfig(data="torchvision:MNIST", data_root=str(tv_root), image_size=28, epochs=1, batch_size=16),
          progress=False)
    own = evaluate(run)
    assert Path(own["output"]).name == "eval-checkpoint.json" and own["images"] == N_TEST
    other = shutil.copytree(tv_root / "MNIST", tmp_path / "tv2" / "MNIST")
    images, labels = _digits(np.random.default_rng(5), 30, 28)
    _idx(other / "raw" / "t10k-images-idx3-ubyte", images)
    _idx(other / "raw" / "t10k-labels-idx1-ubyte", labels)
    elsewhere = evaluate(run, data="torchvision:MNIST", data_root=str(tmp_path / "tv2"))
    assert Path(elsewhere["output"]).name != "eval-checkpoint.json" and elsewhere["images"] == 30
    root_alone = evaluate(run, data_root=str(tmp_path / "tv2"))  # the run's own data set, from another root
    assert root_alone["output"] == elsewhere["output"] and root_alone["images"] == 30
    assert evaluate(run, data="torchvision:MNIST", data_root=str(tv_root))["output"] == own["output"]
