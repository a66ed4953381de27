"""`cnnpack infer`: classify image files through a Triton server, with Triton's classification extension.

The client needs nothing but the server: the model's input name, size and batch limit come from the
served model config. Images are decoded and resized here exactly as cnnpack's data loader does
(RGB, shorter side to the model size, centre crop) and sent as raw 0-255 FP32 NCHW, the exported
model's contract; with `ensemble` the encoded file bytes go to `<model>_image` instead and the
server decodes them. The labels come back from the server (`class_count`: "score:index:label"),
so the client holds no class list either.

Scores are the values of the model's output, i.e. logits, not probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpack.errors import StageFailed, UserInputError, count


@dataclass(frozen=True)
class InferConfig:
    model: str  # the classifier's name; with `ensemble` its `<model>_image` ensemble is called
    url: str | None = None  # default: 127.0.0.1 on Triton's port of the protocol
    protocol: str = "http"
    top_k: int = 1
    ensemble: bool = False
    timeout_s: float = 30.0

    @property
    def target(self) -> str:
        return f"{self.model}_image" if self.ensemble else self.model

    def validate(self) -> None:
        from cnnpack.client import check_protocol

        check_protocol(self.protocol)
        if not self.model:
            raise UserInputError("--model is empty; name the served classifier (e.g. cnn_onnx)")
        if self.top_k < 1:
            raise UserInputError(f"--top-k must be >= 1, got {self.top_k}")


def parse_classification(row) -> list[dict]:
    """One image's classification-extension entries (b"score:index:label") as dicts, best first. An output without a
    label (a model with no labels.txt, or fewer lines in it than outputs) comes as b"score:index": its label is the
    index, as Triton's own image_client prints it."""
    out = []
    for entry in row:
        score, index, *label = (entry.decode() if isinstance(entry, bytes) else str(entry)).split(":", 2)
        out.append({"label": label[0] if label else index, "index": int(index), "score": float(score)})
    return out


def read_pixels(paths: list[Path], size: int) -> tuple[list[Path], np.ndarray, list[dict]]:
    """(readable files, their pixels (N, 3, S, S) float32 0-255, unreadable files with the reason)."""
    from cnnpack.images import DECODE_ERRORS, quiet, read_image  # training's own decode + resize + crop (no torch)

    ok, images, skipped = [], [], []
    with quiet():
        for p in paths:
            if why := _special(p):
                skipped.append({"file": shown_name(p), "reason": why})
                continue
            try:
                images.append(read_image(p, size))
                ok.append(p)
            except DECODE_ERRORS as e:
                skipped.append({"file": shown_name(p), "reason": _why(e)})
    batch = np.stack(images).astype(np.float32) if images else np.zeros((0, 3, size, size), np.float32)
    return ok, batch, skipped


def read_encoded(paths: list[Path]) -> tuple[list[Path], np.ndarray, list[dict]]:
    """(files that decode as images, their bytes as a BYTES batch (N, 1), the others with the reason).

    Each file is decoded once here too, so an unreadable one is skipped instead of failing the request.
    """
    import io

    from PIL import Image

    from cnnpack.images import DECODE_ERRORS, draft, quiet

    ok, blobs, skipped = [], [], []
    with quiet():
        for p in paths:
            if why := _special(p):
                skipped.append({"file": shown_name(p), "reason": why})
                continue
            try:
                data = Path(p).read_bytes()
                with Image.open(io.BytesIO(data)) as img:  # (PIL names the BytesIO in its error: the file is named)
                    draft(img, 64, 64)  # only checked here (the server decodes it): a JPEG at a reduced scale
                    img.load()
                ok.append(p)
                blobs.append(data)
            except DECODE_ERRORS as e:
                skipped.append({"file": shown_name(p), "reason": _why(e)})
    batch = np.empty((len(blobs), 1), dtype=np.object_)
    batch[:, 0] = blobs
    return ok, batch, skipped


def shown_name(path: Path | str) -> str:
    """A file's name as text that prints and encodes anywhere: bytes that are not UTF-8 (a name from another
    system's encoding) as \\xNN escapes, not the lone surrogates Python keeps them as, which strict JSON readers
    and terminals refuse."""
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r")  # one line per image, whatever the name holds


def _special(path: Path) -> str | None:
    """Why a named path that is there is not read: a pipe waits for a writer forever, /dev/zero never ends."""
    p = Path(path)
    return "not a regular file (a pipe, a device or a socket)" if p.exists() and not p.is_file() else None


def _why(e: BaseException) -> str:
    import re

    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).split("\n")[0] or type(e).__name__
    # the file is named by the caller: not again as Pillow quotes it, nor as a buffer's repr
    text = re.sub(r"^(cannot identify image file) .*$", r"\1", text)
    return shown_name(re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", text))


def expand_folders(paths: list[str | Path], left_out: list[Path] | None = None) -> list[Path]:
    """The paths, each folder replaced by the image files under it (by suffix, sorted, hidden ones left out); a file
    named on its own is kept whatever its suffix, to be read or skipped with its reason. A folder's files of other
    suffixes go to `left_out` (training tries every file, and reads an image without a suffix: said, not silent)."""
    from PIL import Image

    from cnnpack.folders import walk_files

    suffixes = set(Image.registered_extensions()) & set(FOLDER_SUFFIXES)
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            files.append(p)
            continue
        every = walk_files(p)  # linked folders followed
        found = [f for f in every if f.suffix.lower() in suffixes]
        if left_out is not None:
            left_out += [f for f in every if f.suffix.lower() not in suffixes]
        if not found:
            raise UserInputError(f"{p} is a folder with no image files (.bmp, .jpeg, .jpg, .png, .webp, ...) in it")
        files += found
    return files


# raster formats Pillow reads itself (its registry also names formats it only writes, like .pdf, and stubs that need
# other software, like .eps or .h5): a folder's other files are left out, not tried and reported as skipped
FOLDER_SUFFIXES = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".gif", ".webp", ".tif", ".tiff", ".ppm",
                   ".pgm", ".pbm", ".pnm", ".tga", ".avif", ".qoi")


CHUNK_FILES = 64  # images read, sent and answered at a time: 300 phone photos held at once took 2.2 GB


def files_to_classify(paths: list[str | Path]) -> tuple[list[Path], list[Path]]:
    """(the files named and those under the folders named, the folders' files left out for their suffix); none
    there is an error."""
    left_out: list[Path] = []
    files = expand_folders(paths, left_out)
    missing = [f for f in files if not f.exists()]
    if missing and len(missing) == len(files):
        more = f" (and {count(len(missing) - 1, 'other')})" if len(missing) > 1 else ""
        raise UserInputError(f"no such file: {missing[0]}{more}; nothing was classified")
    return files, left_out


def none_read(n: int, skipped: list[dict], tail: str = "") -> UserInputError:
    """The error where none of `n` images could be read: the first reasons."""
    return UserInputError(f"{'the image could not' if n == 1 else f'none of the {n} images could'} be read ("
                          + "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
                          + ("; ..." if len(skipped) > 3 else "") + f"){tail}")


def infer(paths: list[str | Path], cfg: InferConfig, *,
          on_results: Callable[[list[dict], list[dict]], None] | None = None) -> dict:
    """Top-k labels of each readable image from the served model; unreadable images are listed as skipped.

    The images are read and sent CHUNK_FILES at a time; `on_results` is given
    each chunk's results and skipped files as they come.

    Raises:
        UserInputError (exit 2): the server is unreachable, the model unknown, or no image is readable.
        StageFailed (exit 1): the server failed a request.
    """
    from cnnpack.client import Client

    cfg.validate()
    files, left_out = files_to_classify(paths)  # before the server: a wrong path is said as such, whether or not one serves
    from cnnpack.triton_config import PREPROCESS, classifier_of

    if cfg.ensemble and cfg.model.endswith(PREPROCESS):  # a step of an ensemble: the classifier names it
        raise UserInputError(f"{cfg.model} is the image ensemble's preprocessing step, not a classifier: pass "
                             f"--ensemble --model {classifier_of(cfg.model)}")
    with Client(cfg.url, cfg.protocol, timeout_s=cfg.timeout_s) as client:
        client.check_ready()
        target, names = cfg.target, client.model_names() if cfg.ensemble else []
        if cfg.ensemble and cfg.model.endswith("_image") and target not in names:
            target = cfg.model  # `--model cnn_onnx_image --ensemble`: the ensemble named as served
        if cfg.ensemble and target != cfg.model and target not in names and cfg.model in names:
            raise UserInputError(f"{cfg.model} has no image ensemble on this server ({target} is not served): lay "
                                 f"it out with `cnnpack triton --ensemble`, or drop --ensemble to send pixels")
        model = client.model(target)
        _check_model(model, cfg)
        k = min(cfg.top_k, model.num_classes)
        results: list[dict] = []
        skipped: list[dict] = []
        for i in range(0, len(files), CHUNK_FILES):  # (classify sends each within the model's batch limit)
            part = files[i:i + CHUNK_FILES]
            ok, batch, bad = read_encoded(part) if cfg.ensemble else read_pixels(part, model.image_size)
            ok, tops, refused = _classify_encoded(client, model, ok, batch, k) if cfg.ensemble else (
                ok, classify(client, model, batch, k) if ok else [], [])
            bad += refused
            rows = [{"file": shown_name(p), "top": top} for p, top in zip(ok, tops)]
            results += rows
            skipped += bad
            if on_results is not None:
                on_results(rows, bad)
        if not results:
            raise none_read(len(files), skipped, "; nothing was sent")
    return {"model": target, "url": client.url, "top_k": k, "score": "logit", "results": results, "skipped": skipped,
            "left_out": [shown_name(f) for f in left_out]}


def _check_model(model, cfg: InferConfig) -> None:
    if cfg.ensemble and not model.takes_images:
        raise UserInputError(f"{model.name} takes {model.input_dtype} pixels, not encoded images; lay out the "
                             "ensemble with `cnnpack triton --ensemble`, or drop --ensemble")
    if not cfg.ensemble and model.takes_images:
        from cnnpack.triton_config import PREPROCESS, classifier_of

        classifier = classifier_of(model.name)
        what = ("is the image ensemble's preprocessing step, not a classifier"
                if model.name.endswith(PREPROCESS) else "takes encoded image bytes")
        raise UserInputError(f"{model.name} {what}: pass --ensemble --model {classifier}")
    if model.parameters.get("input_kind") == "normalized":
        raise UserInputError(f"{model.name} takes normalised pixels; use --ensemble, which normalises on the server")


DECODE_FAILED = "cannot decode image: "  # the ensemble's preprocessing, failing a request (backends/preprocess)


def _classify_encoded(client, model, ok: list[Path], batch: np.ndarray, k: int) -> tuple[list[Path], list, list]:
    """`classify` of encoded images; where the server cannot decode one that decoded here (its Pillow or libjpeg
    may differ: the NGC container's), that request fails whole, so its images go one at a time and the one the
    server refuses is skipped with its reason instead of ending the command."""
    kept, tops, refused = [], [], []
    for part in _by_bytes(batch):  # a request's images are decoded one after another on the server
        try:
            tops += classify(client, model, batch[part], k)
            kept += ok[part]
        except StageFailed as e:
            if DECODE_FAILED not in str(e):
                raise
            kept_one, tops_one, refused_one = _one_at_a_time(client, model, ok[part], batch[part], k)
            kept, tops, refused = kept + kept_one, tops + tops_one, refused + refused_one
    return kept, tops, refused


ENCODED_REQUEST_BYTES = 16 * 2**20  # 64 6000x4000 PNGs (6.3 MB, 1.4 s each to decode) in one request ran 90 s


def _by_bytes(batch: np.ndarray) -> list[slice]:
    """Slices of a batch of encoded images, each up to ENCODED_REQUEST_BYTES (and one image at least): a request of
    64 large PNGs passed the client's --timeout while the server decoded them."""
    parts, start, size = [], 0, 0
    for i, row in enumerate(batch):
        if i > start and size + len(row[0]) > ENCODED_REQUEST_BYTES:
            parts.append(slice(start, i))
            start, size = i, 0
        size += len(row[0])
    return [*parts, slice(start, len(batch))] if len(batch) else []


def _one_at_a_time(client, model, ok: list[Path], batch: np.ndarray, k: int) -> tuple[list[Path], list, list]:
    kept, tops, refused = [], [], []
    for path, row in zip(ok, batch):
        try:
            tops += classify(client, model, row[None], k)
            kept.append(path)
        except StageFailed as e:
            if DECODE_FAILED not in str(e):
                raise
            why = str(e).split(DECODE_FAILED, 1)[1].split("; is the server")[0].replace(
                "image file the bytes sent", "image file")  # (the preprocessing's name for what Pillow read)
            refused.append({"file": shown_name(path), "reason": f"the server could not decode it ({why})"})
    return kept, tops, refused


def classify(client, model, batch: np.ndarray, k: int) -> list[list[dict]]:
    """Top-k of every row of `batch`, in requests within the model's batch limit (a static batch is padded)."""
    step = model.static_batch or model.max_batch_size or len(batch)
    tops = []
    for i in range(0, len(batch), step):
        chunk = batch[i:i + step]
        n = len(chunk)
        if model.static_batch and n < step:  # pad to the fixed batch; the padding's rows are dropped
            chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), chunk.dtype)])
        if model.static_batch:
            tops += _static_tops(client.infer(model, chunk, class_count=step * model.num_classes), model, n, k)
            continue
        rows = client.infer(model, chunk, class_count=k)[:n]
        tops += [parse_classification(r) for r in rows.reshape(n, -1)]
    return tops


def _static_tops(entries: np.ndarray, model, n: int, k: int) -> list[list[dict]]:
    """Top-k per image of a model without batching (a static batch): Triton's classification extension ranks its
    whole (batch, classes) output as one array, by flat index; every entry asked for, then split by image. Only the
    first image's indices are within labels.txt, so the labels come from there."""
    flat = parse_classification(entries.reshape(-1))
    classes = model.num_classes
    labels = {e["index"]: e["label"] for e in flat if e["index"] < classes}
    tops: list[list[dict]] = [[] for _ in range(n)]
    for e in flat:
        row, index = divmod(e["index"], classes)
        if row < n:  # not a padding row
            tops[row].append({"label": labels.get(index, str(index)), "index": index, "score": e["score"]})
    return [sorted(t, key=lambda e: -e["score"])[:k] for t in tops]
