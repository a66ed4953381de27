"""`cnnpack triton`: a versioned Triton model repository from a run's exported artifact.

    model_repository/
      <name>/config.pbtxt          ModelConfig printed with protobuf text_format (triton_config.py)
      <name>/labels.txt            class names, one per line (label_filename of the output)
      <name>/cnnpack-model.json    what the model is and where each version came from
      <name>/<version>/model.onnx | model.pt2 | model.pt | model.xml + model.bin
      <name>_preprocess/…          with --ensemble: Python backend, image bytes -> pixels
      <name>_image/…               with --ensemble: ensemble preprocess -> <name>

This module checks the run's artifact against its manifest and the model spec, and drafts the
model folders; triton_config.py builds their config.pbtxt, triton_publish.py writes them (new
versions only, each published atomically). Everything is checked before anything is written:
names, class names, the artifact's own graph or metadata against the manifest, batch limits, the
device a pt2 package was compiled for, and that the name is not taken by another model.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

from cnnpack import user_model
from cnnpack.atomic import atomic_write_bytes, sigint_deferred
from cnnpack.errors import CnnpackError, UserInputError, first_few, shell
from cnnpack.rundir import Run, check_makeable, sha256
from cnnpack.spec import check_class_names
from cnnpack.triton_config import (  # noqa: F401 - re-exported: `from cnnpack.triton_repo import ...` keeps working
    ENSEMBLE_IO,
    LABELS,
    MODEL_FILES,
    ONNX_FORMATS,
    OPENVINO_FORMATS,
    PLATFORMS,
    PT2_FORMATS,
    TRITON_DTYPES,
    ModelIO,
    Tensor,
    TritonConfig,
    check_name,
    classifier_config,
    ensemble_config,
    ensemble_parts,
    preprocess_config,
    render,
    tune_records,
    tuned_in_place,
)
from cnnpack.triton_publish import (  # noqa: F401
    Draft,
    Published,
    cleared,
    conflict,
    latest_from,
    model_dir,
    preprocess_source,
    publish,
    put_back,
    read_sidecar,
    same_as_latest,
    stale_preprocessing,
    stray_folders,
    versions,
)


def check_classes(classes: list[str]) -> list[str]:
    """Class names become lines of labels.txt and labels of `score:index:label`: spec's one rule."""
    return check_class_names(classes, where=lambda i, c: f"class {i} {c!r} of the run's model.classes",
                             fix="fix `model.classes` in the run's cnnpack.json (and retrain with renamed folders)")


def repository_root(path: str | Path) -> Path:
    if not str(path).strip():  # Path("") is the working folder: every model would land among its files
        raise UserInputError("--repository is empty; name the folder to lay the models out in (e.g. model_repository)")
    root = Path(path)
    check_makeable(root, "--repository")  # found now, not after the work
    if (root / "config.pbtxt").is_file() or (root / "cnnpack-model.json").is_file():  # models would nest in a model
        raise UserInputError(f"--repository {root} is a model folder; pass the repository that holds it, "
                             f"{root.parent}")
    if (root / "cnnpack.json").is_file():  # the models would sit among the run's files, which serve refuses
        raise UserInputError(f"--repository {root} is a run directory; lay the models out in a folder of their own "
                             "(e.g. model_repository)")
    # `cnnpack serve` would refuse it, after the work that laid the models out (a link is left to the name checks)
    if strays := [f for f in stray_folders(root) if not (root / f).is_symlink()]:
        shown = first_few(strays, 3)
        raise UserInputError(f"--repository {root} holds {shown}, not model folders (no config.pbtxt, no version "
                             "folder): Triton cannot serve a repository with them in it; lay the models out in a "
                             "folder of their own (e.g. model_repository)")
    return root


# -- what the artifact says about itself ------------------------------------------------------
def _tensor(rec: dict) -> Tensor:
    return Tensor(rec["name"], rec["dtype"], tuple(rec["shape"]))


def onnx_graph_io(path: Path) -> tuple[Tensor, Tensor, dict]:
    """The single input and output of an ONNX graph (symbolic dims as -1) and its metadata."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in init]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise UserInputError(f"{path} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                             "cnnpack serves single-input, single-output classifiers")

    def tensor(v) -> Tensor:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return Tensor(v.name, tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    return tensor(inputs[0]), tensor(model.graph.output[0]), {p.key: p.value for p in model.metadata_props}


def torchscript_metadata(path: Path) -> dict:
    """The metadata cnnpack stores in a TorchScript file's extra files (read without torch)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/extra/cnnpack.json")), None)
            return json.loads(z.read(name)) if name else {}
    except (zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UserInputError(f"{path} is not a readable TorchScript archive: {e}") from None


def _mismatch(what: str, got, expected, path: Path) -> UserInputError:
    return UserInputError(f"{path}: {what} is {got} but the manifest says {expected}; "
                          "the artifact and cnnpack.json disagree, re-export it")


def cross_check(rec: dict, path: Path, fmt: str, spec: dict) -> tuple[Tensor, Tensor]:
    """Compares the manifest record with the artifact itself and the model spec."""
    inp, out = _tensor(rec["input"]), _tensor(rec["output"])
    if fmt in ONNX_FORMATS:
        g_in, g_out, meta = onnx_graph_io(path)
        for mine, theirs in ((inp, g_in), (out, g_out)):
            for attr in ("name", "dtype", "shape"):
                if getattr(mine, attr) != getattr(theirs, attr):
                    raise _mismatch(f"{theirs.name} {attr}", getattr(theirs, attr), getattr(mine, attr), path)
    elif fmt in OPENVINO_FORMATS:
        from cnnpack import openvino as ov

        meta = ov.metadata(ov.read(path))
    elif fmt in PT2_FORMATS:
        from cnnpack.pt2 import package_metadata

        meta = package_metadata(path)
    else:
        meta = torchscript_metadata(path)
    if "classes" in meta and json.loads(meta["classes"]) != list(spec["classes"]):
        raise _mismatch("the class list", json.loads(meta["classes"]), spec["classes"], path)
    expected = (spec.get("channels", 3), spec["image_size"], spec["image_size"])
    if tuple(inp.shape[1:]) != expected or out.shape[1:] != (spec["num_classes"],):
        raise UserInputError(f"{path}: input {inp.shape} / output {out.shape} do not fit the model spec "
                             f"({expected[0]}x{expected[1]}x{expected[2]} in, {spec['num_classes']} classes out)")
    if inp.dtype not in TRITON_DTYPES or out.dtype not in TRITON_DTYPES:
        raise UserInputError(f"{path}: dtype {inp.dtype}/{out.dtype}; Triton configs here cover "
                             f"{', '.join(TRITON_DTYPES)}")
    return inp, out


def batch_limits(rec: dict, cfg: TritonConfig, path: Path) -> int:
    """The config's max_batch_size: within the artifact's dynamic range, 0 for a static batch."""
    static = rec.get("static_batch")
    if static:
        if cfg.max_batch_size:
            raise UserInputError(f"{path} has a static batch of {static}: Triton must serve it with "
                                 f"max_batch_size 0 and full dims; drop --max-batch-size or re-export "
                                 "without --static-batch to batch dynamically")
        if cfg.preferred_batch_sizes:
            raise UserInputError(f"{path} has a static batch of {static}: no dynamic batching, "
                                 "so --preferred-batch-sizes does not apply")
        return 0
    art_max = int(rec["max_batch_size"])
    mbs = art_max if cfg.max_batch_size is None else cfg.max_batch_size
    if not 1 <= mbs <= art_max:
        raise UserInputError(f"--max-batch-size {mbs}: the {rec['format']} artifact accepts batches of "
                             f"1..{art_max} (set at export with --max-batch-size)")
    bad = [b for b in cfg.preferred_batch_sizes if not 1 <= b <= mbs]
    if bad:
        raise UserInputError(f"--preferred-batch-sizes {bad} outside 1..{mbs} (the max batch size)")
    return mbs


def check_device(rec: dict, cfg: TritonConfig, path: Path, run_path: Path) -> None:
    """A pt2 package runs on the device it was compiled for: KIND_CPU for a CPU package, KIND_GPU for CUDA."""
    if cfg.format not in PT2_FORMATS:
        return
    compiled = rec.get("device", "cpu")
    if (compiled == "cuda") != (cfg.device == "gpu"):
        fix = "--device gpu" if compiled == "cuda" else "--device cpu"
        raise UserInputError(f"{path} is compiled for {compiled} and runs only there: use {fix}, or re-export it "
                             f"with `cnnpack export --run {shell(run_path)} --format pt2 --device "
                             f"{'cpu' if cfg.device == 'cpu' else 'cuda'}`")


def model_io(run: Run, cfg: TritonConfig) -> tuple[ModelIO, Path, dict]:
    """The checked artifact (path, record) and its I/O as the config will declare it."""
    from cnnpack.artifacts import artifact_ref

    ref = artifact_ref(run, cfg.format)  # raises if missing or changed since export
    spec = run.model_spec
    inp, out = cross_check(ref.record, ref.path, cfg.format, spec)
    mbs = batch_limits(ref.record, cfg, ref.path)
    check_device(ref.record, cfg, ref.path, run.path)
    from cnnpack.artifacts import precision_of

    io = ModelIO(inp, out, mbs, ref.record.get("input_kind", "raw"), precision_of(ref.record),
                 ref.record.get("gate", {}).get("max_drop_pt"), ref.record.get("gate", {}).get("min_agreement"))
    return io, ref.path, ref.record


# -- the stage ---------------------------------------------------------------------------------
def _version_files(fmt: str, path: Path) -> dict[str, Path]:
    """What goes into a version folder: the model file (an OpenVINO IR: model.xml and its model.bin)."""
    files = {MODEL_FILES[fmt]: path}
    if fmt in OPENVINO_FORMATS:
        files["model.bin"] = path.with_suffix(".bin")
    return files


def drafts(run: Run, cfg: TritonConfig, name: str) -> tuple[list[Draft], ModelIO]:
    """The model folders this run should produce: the classifier, and with --ensemble two more."""
    spec = run.model_spec
    classes = check_classes(list(spec["classes"]))
    if len(classes) != spec["num_classes"]:
        raise UserInputError(f"the run's model spec names {len(classes)} classes for num_classes {spec['num_classes']}; "
                             "labels.txt needs exactly one name per output")
    io, path, rec = model_io(run, cfg)
    labels = ("\n".join(classes) + "\n").encode()
    # (your own network by its file's name: the same model from a moved folder or a teammate's checkout)
    identity = {"kind": "classifier", "arch": user_model.display(spec["arch"]), "classes": classes, "format": cfg.format,
                "input": asdict(io.input), "output": asdict(io.output), "input_kind": io.input_kind,
                "static_batch": rec.get("static_batch")}
    source = {"run": str(run.path.resolve()), "artifact": rec["path"], "artifact_sha256": rec["sha256"]}
    out = [Draft(name, identity, {"config.pbtxt": render(classifier_config(name, io, cfg)).encode(),
                                  LABELS: labels}, _version_files(cfg.format, path), source)]
    if cfg.ensemble:
        if io.max_batch_size == 0:
            raise UserInputError("--ensemble needs a dynamic-batch export (this artifact has a static batch); "
                                 "re-export without --static-batch")
        pre, ens = ensemble_parts(name)
        check_name(pre)
        check_name(ens)
        pre_id = {"kind": "preprocess", "for": name, "input": asdict(io.input), "input_kind": io.input_kind}
        out.append(Draft(pre, pre_id, {"config.pbtxt": render(preprocess_config(pre, io, spec, cfg)).encode()},
                         {"model.py": preprocess_source()}))
        ens_id = {"kind": "ensemble", "for": name, "classes": classes}
        out.append(Draft(ens, ens_id, {"config.pbtxt": render(ensemble_config(ens, pre, name, io)).encode(),
                                       LABELS: labels}, {}))
    return out, io


def default_repository(run_dir: str | Path) -> str:
    """Where `cnnpack triton` and the pipeline lay a run's models out when no --repository is given: the repository
    its triton stage laid them out in before (so a second call from another folder adds to it, rather than starting
    one there and moving the run's record away from the first), else `model_repository` in the current folder."""
    try:
        return (Run.open(run_dir).read().get("stages", {}).get("triton") or {}).get("repository") or "model_repository"
    except CnnpackError:  # no run there yet (the pipeline makes it), or one the command refuses in its own words
        return "model_repository"


def build(run_dir: str | Path, cfg: TritonConfig = TritonConfig()) -> dict:
    """Lays out (or extends) the Triton model repository for a run; returns `stages.triton`."""
    run = Run.open(run_dir)
    cfg = with_its_ensemble(cfg, run)
    root, name, todo, io = check(run, cfg)
    tuned = tuned_in_place(run.read()["stages"])
    run.check_writable()  # the repository is not touched when the manifest could not record it
    with run.locked():  # published and recorded as one step, or taken back
        before = {d.name: _top_files(model_dir(root, d.name)) for d in todo}
        done: list[Published] = []
        try:
            for d in todo:
                done.append(publish(root, d, force=cfg.force))
            section = _section(root, cfg, name, io, done)
            if tuned and not tuned_in_place(run.read()["stages"]):  # said by the CLI: the tuned config is gone
                section["tune_replaced"] = tuned["config"]
            with sigint_deferred():
                run.set_stage("triton", section)
        except BaseException:  # a model that failed after the first, a Ctrl-C, a manifest that cannot be written
            _withdraw(root, done, before)
            raise
    for p in done:  # recorded: what --force replaced goes
        if p.set_aside is not None:
            cleared(p.set_aside)
    return run.read()["stages"]["triton"]


def _top_files(folder: Path) -> dict[str, bytes] | None:
    """A model folder's own files (config.pbtxt, labels.txt, the sidecar), as they are before a publish; None: no
    folder."""
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} if folder.is_dir() else None


def _withdraw(root: Path, done: list[Published], before: dict[str, dict[str, bytes] | None]) -> None:
    """Takes a publish back: Triton serves the latest version, and one the manifest does not record is one verify,
    tune and deploy know nothing of. A model made now goes whole; another gets its new version removed and its own
    files back as they were, also the model whose publish failed part way (its config may be written already); a
    model --force replaced gets its versions back."""
    published = {p.name: p for p in done}
    for name, files in before.items():
        p, folder = published.get(name), model_dir(root, name)
        if files is None and (p is None or p.created):  # no folder before: whatever stands there now is this publish's
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if p is not None and p.created:
            shutil.rmtree(folder / str(p.version), ignore_errors=True)
        if p is not None and p.set_aside is not None:
            put_back(folder, p.set_aside)
        try:  # the error on its way out is the one to report; each model gets its own files back, as far as it can
            for file, data in (files or {}).items():  # config.pbtxt and labels.txt, as the old versions fit them
                with contextlib.suppress(OSError):
                    if (folder / file).read_bytes() == data:  # untouched (a read-only repository): nothing to put back
                        continue
                atomic_write_bytes(folder / file, data)
        except OSError as e:
            sys.stderr.write(f"warning: could not put back {folder}'s own files: {e}\n")


def laid_out(run: Run, cfg: TritonConfig) -> bool:
    """Whether the repository still holds what `build` lays out for this run, unchanged: each model folder's
    config.pbtxt (or the one `cnnpack tune` wrote in its place) and labels.txt as drafted, and a version holding this
    run's files byte for byte as the latest (a file edited, truncated or deleted by hand is laid out again, as a new
    version; so is a model another run sharing the repository laid out since, as `cnnpack triton` would)."""
    try:
        root, _, todo, _ = check(run, cfg)
    except CnnpackError:  # a folder that holds another model: `build` says so
        return False
    tuned = _tuned_configs(run.read()["stages"])
    for d in todo:
        folder = model_dir(root, d.name)
        for n, data in d.top.items():
            path = folder / n
            if path.resolve() in tuned:
                continue
            if not path.is_file() or path.read_bytes() != data:
                return False
        if not folder.is_dir() or same_as_latest(folder, d.version) is None:  # Triton serves the latest
            return False
    return True


def _tuned_configs(stages: dict) -> set[Path]:
    """The config.pbtxt files this run's tunes wrote that still hold what they wrote (by the digest each recorded)."""
    return {Path(c).resolve() for c, e in tune_records(stages).items()
            if Path(c).is_file() and ("sha256" not in e or sha256(Path(c)) == e["sha256"])}


def with_its_ensemble(cfg: TritonConfig, run: Run) -> TritonConfig:
    """`cfg` with --ensemble where the repository already holds this model's image ensemble (made by cnnpack for
    it): laid out again with the model, it keeps fitting it (a smaller --max-batch-size alone left an ensemble
    Triton refuses to load)."""
    if cfg.ensemble:
        return cfg
    name, side = cfg.name or default_name(run.model_spec["arch"], cfg.format), {}
    with contextlib.suppress(CnnpackError):  # a bad name or repository: `check` says so
        folder = model_dir(repository_root(cfg.repository), ensemble_parts(name)[1])
        side = read_sidecar(folder) or {}
    if side.get("identity", {}).get("kind") != "ensemble" or side["identity"].get("for") != name:
        return cfg
    record = run.read().get("stages", {}).get("export", {}).get("artifacts", {}).get(cfg.format, {})
    if record.get("static_batch"):  # the user did not ask for --ensemble: its error would not say why
        raise UserInputError(f"{folder} is {name}'s image ensemble, which needs a dynamic-batch export (this one has "
                             f"--static-batch {record['static_batch']}); re-export without --static-batch, or remove "
                             f"{name}_image and {name}_preprocess from the repository to serve {name} without them")
    return replace(cfg, ensemble=True)


def _planned(run: Run, cfg: TritonConfig) -> tuple[Path, str, list[Draft], ModelIO, list[tuple[Draft, str]]]:
    """(repository, model name, model folders to write, I/O, (folder, why) for each that holds a different model)
    of `build` with `cfg` (with the model's image ensemble where the repository holds one, as `build` lays it out)."""
    cfg.validate()
    cfg = with_its_ensemble(cfg, run)
    root = repository_root(cfg.repository)
    name = cfg.name or default_name(run.model_spec["arch"], cfg.format)
    todo, io = drafts(run, cfg, name)
    return root, name, todo, io, [(d, why) for d in todo if (why := conflict(model_dir(root, d.name), d))]


def clashes(run: Run, cfg: TritonConfig) -> tuple[str, list[str]]:
    """(model name, why each folder `build` would write holds a different model): empty where none does."""
    root, name, _, _, found = _planned(run, cfg)
    return name, [f"{root / d.name}: {why}" for d, why in found]


def laid_out_from(folder: Path) -> set[str]:
    """The runs (resolved paths) whose models a model folder's versions are, as its cnnpack-model.json records."""
    return {str(v["run"]) for v in ((read_sidecar(folder) or {}).get("versions") or {}).values()
            if isinstance(v, dict) and v.get("run")}


def check(run: Run, cfg: TritonConfig) -> tuple[Path, str, list[Draft], ModelIO]:
    """(repository, model name, model folders to write, I/O) of `build`, refusing before anything is written: a
    bad option, an artifact that cannot be served, a folder that holds a different model (`_planned`)."""
    root, name, todo, io, found = _planned(run, cfg)
    if found and not cfg.force:
        d, why = found[0]
        raise UserInputError(f"{root / d.name} exists and {why}; choose another --name or pass --force "
                             "to replace it (its versions are removed)")
    return root, name, todo, io


def default_name(arch: str, fmt: str) -> str:
    return check_name(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{user_model.label(arch)}_{fmt}"))


def _section(root: Path, cfg: TritonConfig, name: str, io: ModelIO, done: list[Published]) -> dict:
    main = done[0]
    folder = root / name
    files = {n: {"path": f"{name}/{n}", "sha256": sha256(folder / n)} for n in ("config.pbtxt", LABELS)}
    model = f"{name}/{main.version}/{MODEL_FILES[cfg.format]}"
    files["model"] = {"path": model, "sha256": sha256(root / model)}
    section = {"status": "ok", "repository": str(root.resolve()), "name": name, "version": main.version,
               "format": cfg.format, "platform": PLATFORMS[cfg.format], "new_version": main.created,
               "replaced": main.replaced, "versions": versions(folder), "max_batch_size": io.max_batch_size,
               "input": asdict(io.input), "output": asdict(io.output), "files": files, "config": asdict(cfg)}
    if cfg.ensemble:
        pre, ens = done[1], done[2]
        section["ensemble"] = {"name": ens.name, "version": ens.version, "preprocess": pre.name,
                               "preprocess_version": pre.version, "input": ENSEMBLE_IO[0],
                               "output": ENSEMBLE_IO[1]}
    return section


# -- what serves from it ---------------------------------------------------------------------------
def check_laid_out(run: Run) -> None:
    """The repository the triton stage laid out is there, each verified model in it with a version: said as such
    (before `servable` takes a missing folder for an unverified model, and a missing version for version 0)."""
    manifest = run.read()
    stages = manifest.get("stages", {})
    triton = stages.get("triton") or {}
    if triton.get("status") != "ok":
        return  # servable says which stage to run
    root = Path(triton["repository"])
    if not root.is_dir():
        raise UserInputError(f"the run's model repository {root} is missing (moved or deleted since `cnnpack triton` "
                             f"laid it out); move it back, or lay it out again with "
                             f"{lay_out(run.path, triton, triton.get('name', ''), [])}")
    # what the run laid out: the pipeline's models, or the one `cnnpack triton` laid out last (and its ensemble)
    laid = {*triton.get("models", []), triton.get("name"), (triton.get("ensemble") or {}).get("name")}
    for fmt, v in stages.get("verify", {}).get("formats", {}).items():
        if not v.get("passed") or fmt not in PLATFORMS:
            continue
        folder = root / default_name(manifest["model"]["arch"], fmt)
        classifier = [(folder.name, fmt)]
        if (folder / "config.pbtxt").is_file() and not versions(folder):
            raise UserInputError(f"{folder} has no version folder (changed since `cnnpack triton` laid it out), so "
                                 f"Triton has nothing to serve; lay it out again with "
                                 f"{lay_out(run.path, triton, folder.name, classifier)}")
        # what the run laid out and is gone: serving the others instead would change the model without a word, and
        # an image ensemble without its preprocessing model keeps Triton from ever being ready
        pre, ens = ensemble_parts(folder.name)
        ensemble = [pre, ens] if ens in laid else []
        for m in ([folder.name] if folder.name in laid else []) + ensemble:
            if not (root / m / "config.pbtxt").is_file():
                raise UserInputError(f"{root / m / 'config.pbtxt'} is missing (deleted since `cnnpack triton` laid "
                                     f"{m} out); lay it out again with {lay_out(run.path, triton, m, classifier)}")


def lay_out(run_path: Path, triton: dict, model: str, classifiers: list[tuple[str, str]]) -> str:
    """The `cnnpack triton` command that lays `model` (a classifier, or its ensemble's part) out again; `triton`:
    the run's triton stage (its format and ensemble, for a model `classifiers` does not name)."""
    base = {m: m for m, _ in classifiers} | {part: m for m, _ in classifiers for part in ensemble_parts(m)}
    classifier = base.get(model, triton.get("name", ""))
    fmt = dict(classifiers).get(classifier) or triton.get("format")
    ensemble = model != classifier or (fmt == triton.get("format") and bool(triton.get("ensemble")))
    return (f"`cnnpack triton --run {shell(run_path)} --repository {shell(triton['repository'])}"
            + (f" --format {fmt}" if fmt else "") + (" --ensemble" if ensemble else "") + "`")
