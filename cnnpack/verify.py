"""`cnnpack verify`: proof that every exported artifact computes what the eager PyTorch model computes.

Written once against the runtime registry (DESIGN §3). Each artifact runs in every runtime that
reads its format (ONNX in ONNX Runtime's CPU, CUDA and TensorRT providers; TorchScript in libtorch);
each such *target* is compared with the eager checkpoint on exactly the same inputs:

1. Tensor parity: seeded random raw-pixel batches (0-255, FP32) at each batch size plus the real
   validation images. Max / mean / p99 absolute error, max relative error, the lowest per-image
   cosine similarity, NaN/Inf, and (as Polygraphy reports them) the smallest atol that would pass
   with rtol fixed and the smallest rtol that would pass with atol fixed. An element passes if
   |a - b| <= atol or |a - b| <= rtol * |b|, b being eager's value.
2. Task parity: over the whole validation set, each target's top-1 accuracy, its delta to eager and
   the share of images whose predicted class equals eager's (gated by `min_agreement`; a difference on a
   tie, where eager's two classes lie within one step of the target's precision, is reported and not
   counted: `contracts.task_stats`).

A target needs nothing but `predict`, so a served model is checked by the same code: pass it in
`targets`. GPU runtimes run in exact fp32 (no TF32, no fp16 engines): the contract is fp32 parity.
Each target is held to the contract of its precision (`tolerances`, DESIGN §2): fp32 to the tensor
tolerances; fp16 (`export --half`) and bf16 (the `openvino-bf16` runtime) to relative ones; int8
(`cnnpack quantize`) to task parity only: top-1 agreement with eager and a top-1 drop within the
gate it was quantized under, its tensor error reported beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from cnnpack.artifacts import other_source, precision_of
from cnnpack.atomic import atomic_write_json
from cnnpack.contracts import (  # noqa: F401 - re-exported
    BF16_ATOL,
    BF16_MIN_AGREEMENT,
    BF16_RTOL,
    FP16_ATOL,
    FP16_MIN_AGREEMENT,
    FP16_RTOL,
    INT8_MAX_DROP_PT,
    INT8_MIN_AGREEMENT,
    Tolerance,
    by_format,
    contract_line,
    failures,
    task_stats,
    tensor_stats,
    tolerances,
)
from cnnpack.errors import ParityError, RuntimeUnavailable, StageFailed, UserInputError, first_few, shell
from cnnpack.host import check_device, exact_fp32
from cnnpack.rundir import Run, artifact_digest, library_versions, now, sha256, weights_digest
from cnnpack.runtimes import fit_batch_sizes
from cnnpack.verify_kept import keep_earlier

DEFAULT_BATCH_SIZES = (1, 8, 32)
VAL_BATCH = 64  # batch size for the validation set (within each artifact's limits)
OUTPUT = "verify.json"


@dataclass(frozen=True)
class VerifyConfig:
    formats: tuple[str, ...] | None = None  # None: every exported format; (): none (only `targets`)
    batch_sizes: tuple[int, ...] | None = None  # None: 1, 8, 32 within what each artifact accepts
    samples: int = 32  # random images per batch size, rounded up to whole batches
    atol: float = 1e-4
    rtol: float = 1e-3
    min_agreement: float = 0.999  # top-1 agreement with eager over the validation set
    int8_min_agreement: float | None = None  # the same, for int8 artifacts; None: each one's quantize gate's
    device: str = "cpu"  # where eager and TorchScript run; an ONNX Runtime provider decides its own
    data: str | None = None  # default: the validation split the run was trained on
    seed: int = 0

    def validate(self) -> None:
        if self.batch_sizes is not None and (not self.batch_sizes or min(self.batch_sizes) < 1):
            raise UserInputError(f"--batch-sizes must be integers >= 1, got {list(self.batch_sizes or [])}")
        if not 1 <= self.samples <= MAX_SAMPLES:  # held in memory at once: 100,000,000 was the kernel's OOM kill
            raise UserInputError(f"--samples must be in 1..{MAX_SAMPLES}, got {self.samples}")
        if self.seed < 0:
            raise UserInputError(f"--seed must be >= 0, got {self.seed}")
        for flag, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if not value > 0:  # also refuses NaN
                raise UserInputError(f"{flag} must be > 0, got {value}")
        if not 0 < self.min_agreement <= 1:
            raise UserInputError(f"--min-agreement is a fraction in (0, 1], got {self.min_agreement}")
        if self.int8_min_agreement is not None and not 0 < self.int8_min_agreement <= 1:
            raise UserInputError(f"--int8-min-agreement is a fraction in (0, 1], got {self.int8_min_agreement}")
        check_device(self.device)


MAX_SAMPLES = 4096  # random images per batch size: 2.4 GB of float32 at 224 px


@dataclass(frozen=True)
class Target:
    """One thing checked against eager: an artifact in one runtime, or a served model."""

    format: str  # the manifest key its figures go under
    runtime: str
    load: Callable[[], object]  # -> a loaded runtime; raises RuntimeUnavailable when it cannot run here
    source: str  # what is checked, for messages: a file in the run, a URL
    max_batch_size: int | None = None
    static_batch: int | None = None
    dtype: str = "float32"  # its input/output dtype: float16 selects fp16 tolerances
    precision: str = "fp32"  # fp32 | fp16 | bf16 | int8: the contract it is held to
    max_drop_pt: float | None = None  # int8: the quantize gate it was made under (default INT8_MAX_DROP_PT)
    weight_type: str | None = None  # onnx_int8: int8 | uint8 weights (None: recorded before the choice, int8)
    artifact_precision: str | None = None  # the artifact's own, where the runtime computes in another (openvino-bf16)
    gate_agreement: float | None = None  # int8: that gate's top-1 agreement (default INT8_MIN_AGREEMENT)

    @property
    def label(self) -> str:
        return f"{self.format} ({self.runtime})"


class VerifyFailed(ParityError):
    """A parity check failed; `result` is what verify.json holds."""

    def __init__(self, message: str, result: dict) -> None:
        super().__init__(message)
        self.result = result


# -- what to check -----------------------------------------------------------------------------
def file_targets(run: Run, formats: list[str], device: str) -> list[Target]:
    """Every (artifact, runtime) pair: each exported format in every registered runtime that reads it."""
    from cnnpack.artifacts import artifact_ref
    from cnnpack.runtimes import RUNTIMES, reads

    targets = []
    for fmt in formats:
        ref = artifact_ref(run, fmt)  # refuses a missing file or one changed since export
        names = [n for n in RUNTIMES if reads(RUNTIMES.get(n), fmt)]
        if not names:
            raise RuntimeUnavailable(f"no registered runtime reads {fmt} artifacts")
        targets += [Target(fmt, name, functools.partial(_load_file, name, ref, device), ref.record["path"],
                           ref.max_batch_size, ref.record.get("static_batch"),
                           ref.record.get("input", {}).get("dtype", "float32"),
                           getattr(RUNTIMES.get(name), "precision", None) or precision_of(ref.record),
                           ref.record.get("gate", {}).get("max_drop_pt"),
                           ref.record.get("weight_type", "int8") if fmt == "onnx_int8" else None,
                           precision_of(ref.record), ref.record.get("gate", {}).get("min_agreement"))
                    for name in names]
    return targets


def served_target(run_dir: str | Path, url: str | None, model: str, protocol: str = "http",
                  timeout_s: float | None = None) -> Target:
    """`model` on the Triton server at `url` as one more target; its figures go under `triton:<model>`.

    Connects now, so an unreachable server or a model that does not fit the run is refused before
    anything is computed.
    """
    from cnnpack.runtimes import RUNTIMES, _Normalizing, served_ref

    run = Run.open(run_dir)
    rt = RUNTIMES.get("triton").load(served_ref(run, url, model, protocol, timeout_s))
    m, source = rt.model, f"{rt.client.url} model {rt.model.name}"
    if m.parameters.get("input_kind") == "normalized":  # as for a file exported with --input normalized
        spec = run.model_spec
        rt = _Normalizing(rt, spec["mean"], spec["std"])
    precision = m.parameters.get("precision", "fp32")
    max_drop, agreement = m.parameters.get("max_drop_pt"), m.parameters.get("min_agreement")
    return Target(f"triton:{m.name}", "triton", lambda: rt, source, m.max_batch_size or None, m.static_batch,
                  precision=precision, max_drop_pt=float(max_drop) if max_drop else None,
                  gate_agreement=float(agreement) if agreement else None)

def _load_file(name: str, ref, device: str):
    from cnnpack.runtimes import RUNTIMES, raw_pixel_input

    return raw_pixel_input(RUNTIMES.get(name).load(ref, device, exact=True), ref)


def _formats(run: Run, export: dict, cfg: VerifyConfig) -> list[str]:
    from cnnpack.artifacts import remake_command
    from cnnpack.runtimes import FORMAT_RUNTIME

    arts = export.get("artifacts", {})
    wanted = list(cfg.formats or arts)
    known = [f for f in FORMAT_RUNTIME if f != "checkpoint"]
    for fmt in (f for f in wanted if f not in arts):
        if fmt not in known:
            raise UserInputError(f"unknown format {fmt!r}; valid: {', '.join(known)}")
        raise UserInputError(f"{run.path} has no {fmt} artifact (has: {', '.join(arts) or 'none'}); "
                             f"run `{remake_command(run, fmt)}` first")
    if not wanted:
        raise UserInputError(f"{run.path} records no artifacts; run `cnnpack export --run {shell(run.path)}` first")
    return wanted


def _check_checkpoint(run: Run, export: dict, loaded: str | None = None) -> None:
    """Artifacts exported from an older checkpoint would fail for a reason verify should name; `loaded`: the sha256
    of the bytes the eager reference was loaded from (the file may be replaced between the check and the load)."""
    src = export.get("source", {})
    ckpt = run.file(src.get("checkpoint", "checkpoint.pt"))
    now = loaded or (sha256(ckpt) if ckpt.is_file() else None)
    if src.get("sha256") and now and now != src["sha256"]:
        if not loaded:  # an unreadable file (truncated): exporting again cannot mend that, restoring it can
            from cnnpack.train import load_checkpoint

            load_checkpoint(run)
        raise UserInputError(f"{ckpt} changed since the artifacts were exported from it (sha256 differs from "
                             f"stages.export.source); re-run `cnnpack export --run {shell(run.path)}` first")


def _check_sources(run: Run, formats: list[str], loaded: str) -> None:
    """Each artifact was made from the checkpoint bytes eager was loaded from (its own record says which; a run
    recorded before artifacts kept it: the export's one source): an artifact of older weights fails for a reason
    verify names instead of a parity failure."""
    export = run.read().get("stages", {}).get("export", {})
    arts = export.get("artifacts", {})
    for fmt in formats:
        if fmt in arts and (why := other_source(run, fmt, arts[fmt], loaded)):
            raise UserInputError(why)
    if any(fmt in arts and not arts[fmt].get("checkpoint_sha256") for fmt in formats):
        _check_checkpoint(run, export, loaded)


def batch_plan(target: Target, requested: tuple[int, ...] | None) -> list[int]:
    """The batch sizes to feed `target`: the requested ones if it accepts them, else a usage error."""
    fixed, cap = target.static_batch, target.max_batch_size
    if fixed:
        if requested and set(requested) != {fixed}:
            raise UserInputError(f"--batch-sizes {','.join(map(str, requested))}: {target.format} ({target.source}) "
                                 f"was exported with a static batch of {fixed}; use --batch-sizes {fixed}")
        return [fixed]
    if requested is None:
        return fit_batch_sizes(DEFAULT_BATCH_SIZES, cap=cap)
    if cap and max(requested) > cap and target.runtime == "triton":  # its config.pbtxt's, not the export's
        raise UserInputError(f"--batch-sizes {max(requested)} exceeds the max batch size {cap} that {target.format} "
                             f"({target.source}) is served with (its config.pbtxt); use sizes <= {cap} or lay it out "
                             f"again with `cnnpack triton --max-batch-size {max(requested)}` and restart the server")
    if cap and max(requested) > cap:
        raise UserInputError(f"--batch-sizes {max(requested)} exceeds the max batch size {cap} that {target.format} "
                             f"({target.source}) was exported with; use sizes <= {cap} or re-export with "
                             f"--max-batch-size {max(requested)}")
    return sorted(set(requested))


def _plan(run: Run, cfg: VerifyConfig, extra: tuple[Target, ...]) -> list[tuple[Target, list[int]]]:
    """Every bad-input check, before any model runs."""
    targets = []
    if cfg.formats != ():
        export = run.stage("export", required_by="verify", hint=f"`cnnpack export --run {shell(run.path)}`")
        _check_checkpoint(run, export)
        targets += file_targets(run, _formats(run, export, cfg), cfg.device)
    targets += extra
    if not targets:
        raise UserInputError("nothing to verify: no formats and no served model given")
    return [(t, batch_plan(t, cfg.batch_sizes)) for t in targets]


# -- running the checks --------------------------------------------------------------------------
@dataclass
class Validation:
    images: np.ndarray  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,)
    source: str
    eager_logits: np.ndarray  # (N, K)


class Reference:
    """Eager's outputs, computed once per input batch and shared by every target."""

    def __init__(self, eager, shape: tuple[int, ...], cfg: VerifyConfig) -> None:
        self.eager, self.shape, self.cfg = eager, shape, cfg
        self._random: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    def random_batches(self, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Seeded raw-pixel batches (inputs, eager logits) of size `batch`: `samples` images, rounded up."""
        if batch not in self._random:
            rng = np.random.default_rng([self.cfg.seed, batch])
            xs = [rng.uniform(0, 255, (batch, *self.shape)).astype(np.float32)
                  for _ in range(-(-self.cfg.samples // batch))]
            self._random[batch] = [(x, self.eager.predict(x)) for x in xs]
        return self._random[batch]

    def spread(self, val: Validation | None) -> tuple[float, int]:
        """(the largest range of any logit over every input eager was given, how many inputs): ~0 when eager answers
        the same whatever the input (an untrained network whose logits are all 0, a collapsed one)."""
        outs = [y for batches in self._random.values() for _, y in batches] + ([val.eager_logits] if val else [])
        if not outs:
            return float("inf"), 0
        logits = np.concatenate([o.reshape(len(o), -1) for o in outs]).astype(np.float64)
        finite = logits[np.isfinite(logits).all(axis=1)]
        return (float(np.ptp(finite, axis=0).max()) if len(finite) > 1 else float("inf")), len(logits)


def _validation(run: Run, cfg: VerifyConfig, eager) -> Validation | None:
    """The run's validation split with eager's logits, or None for a run without data (export --arch)."""
    from cnnpack.evaluate import dataset_of
    from cnnpack.runtimes import predict_split

    if not (cfg.data or run.trained_on):
        return None
    from cnnpack.data import nfc

    d = dataset_of(run, cfg.data)
    if [nfc(c) for c in d.classes] != [nfc(c) for c in run.model_spec["classes"]]:  # as they read (NFD from macOS)
        raise UserInputError(f"--data classes ({first_few(d.classes, 8)}) differ from the model's "
                             f"({first_few(list(run.model_spec['classes']), 8)})")
    images = d.val.images.numpy()
    return Validation(images, d.val.labels.numpy(), d.source, predict_split(eager, images, VAL_BATCH))


def _outputs(target: Target, rt, sizes: list[int], ref: Reference, val: Validation | None,
             say: Callable[[str], None]) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(target output, eager output) pairs per input set: random batches of each size, then the validation set."""
    from cnnpack.runtimes import predict_split

    out = {}
    for b in sizes:
        say(f"{target.label}: random batches of {b}")
        out[f"random_b{b}"] = [(rt.predict(x), y) for x, y in ref.random_batches(b)]
    if val is not None:
        say(f"{target.label}: {len(val.labels)} validation images")
        batch, static = (target.static_batch, True) if target.static_batch else (
            min(VAL_BATCH, target.max_batch_size or VAL_BATCH), False)
        out["val"] = [(predict_split(rt, val.images, batch, static=static), val.eager_logits)]
    return out


def check_target(target: Target, rt, sizes: list[int], ref: Reference, val: Validation | None,
                 cfg: VerifyConfig, say: Callable[[str], None]) -> dict:
    """Both checks for one target; the result records its figures, failures and verdict."""
    by_input = _outputs(target, rt, sizes, ref, val, say)
    pairs = [p for v in by_input.values() for p in v]
    result = {"format": target.format, "runtime": target.runtime, "source": target.source,
              "precision": target.precision, "artifact_precision": target.artifact_precision or target.precision,
              "info": getattr(rt, "info", {}), "batch_sizes": sizes, "tensor": None, "task": None}
    bad = next(((g.shape, w.shape) for g, w in pairs if g.shape != w.shape), None)
    if bad:
        result["failures"] = [f"{target.label}: output shape {list(bad[0])} != eager's {list(bad[1])} (shape check)"]
    else:
        want = np.concatenate([w for _, w in pairs])
        tol = tolerances(cfg, target.dtype, want, target.precision, target.max_drop_pt, target.gate_agreement)
        result["tolerance"] = asdict(tol)
        result["tensor"] = tensor_stats(np.concatenate([g for g, _ in pairs]), want, atol=tol.atol, rtol=tol.rtol)
        result["tensor"]["max_abs_err_by_input"] = {
            k: max(float(np.abs(g.astype(np.float64) - w).max(initial=0.0)) for g, w in v) for k, v in by_input.items()}
        if val is not None:
            result["task"] = task_stats(by_input["val"][0][0], val.eager_logits, val.labels, tol.tie_eps)
        result["failures"] = failures(target.label, result["tensor"], result["task"], tol)
        if result["failures"] and target.weight_type == "int8" and target.runtime == "onnxruntime":
            result["failures"][-1] += _saturation_hint()
    result["passed"] = not result["failures"]
    return result


def _saturation_hint() -> str:
    """Where ONNX Runtime's u8 x s8 kernels saturate (x86 without VNNI), why an int8-weight model may fail here."""
    from cnnpack.int8_ort import weight_type

    if weight_type("auto")[0] != "uint8":
        return ""
    return (" (its weights are int8 and this CPU has no VNNI, where ONNX Runtime's u8 x s8 kernels saturate: "
            "re-quantize it here with `cnnpack quantize --weight-type uint8`)")


def _load_targets(plan, say) -> tuple[list[tuple[Target, object, list[int]]], list[dict]]:
    loaded, skipped = [], []
    for target, sizes in plan:
        say(f"loading {target.label}")
        try:
            loaded.append((target, target.load(), sizes))
        except RuntimeUnavailable as e:
            skipped.append({"format": target.format, "runtime": target.runtime, "reason": str(e)})
    if not loaded:
        raise RuntimeUnavailable("nothing could be verified here: " + "; ".join(s["reason"] for s in skipped))
    return loaded, skipped


# -- the stage -------------------------------------------------------------------------------
def _record(run: Run, cfg: VerifyConfig, result: dict) -> dict:
    """verify.json and `stages.verify` as one step (`Run.commit`: a disk that fills on the record puts the old
    verify.json back), refused where an artifact was exported again while verify ran: the digests it records are
    the manifest's when it began, the files it loaded (an `export` that finished meanwhile had its new file's
    digest recorded as verified)."""
    section = {"status": "ok" if result["passed"] else "failed", "passed": result["passed"],
               "formats": by_format(result["results"]), "skipped": result["skipped"],
               "failures": result["failures"], "reference": result["reference"], "data": result["data"],
               "artifacts": result["artifacts"], "config": result["config"]}

    def record(m: dict) -> None:
        now_arts = m.get("stages", {}).get("export", {}).get("artifacts", {})
        if moved := [a["path"] for f, a in result["artifacts"].items()  # an IR's weights too (its .xml may be the same)
                     if f not in now_arts or artifact_digest(now_arts[f]) != artifact_digest(a)]:
            raise StageFailed(f"{', '.join(moved)} changed while verify ran (exported again?); nothing was recorded: "
                              f"run `cnnpack verify --run {shell(run.path)}` again")
        m.setdefault("stages", {})["verify"] = {"updated": now(), **section}

    with run.staged_outputs(OUTPUT) as staged:
        atomic_write_json(staged[OUTPUT], result)
        section["outputs"] = {"verify_json": {"path": OUTPUT, "sha256": sha256(staged[OUTPUT])}}
        run.commit([(staged[OUTPUT], run.file(OUTPUT))], record)
    return section


def verify(run_dir: str | Path, cfg: VerifyConfig = VerifyConfig(), *, targets: tuple[Target, ...] = (),
           progress: Callable[[str], None] = lambda _: None) -> dict:
    """Checks every exported artifact (and any extra `targets`) against eager PyTorch.

    Writes `verify.json` and `stages.verify` whatever the verdict, and returns verify.json's content.

    Raises:
        VerifyFailed (a ParityError, exit 1): a check failed; the message names each target, check and figure.
        UserInputError / MissingStageError / RuntimeUnavailable (exit 2): nothing could be checked.
    """

    cfg.validate()
    run = Run.open(run_dir)
    run.check_writable()  # a run it cannot write to fails now, not after the work
    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})  # what is loaded: recorded as such
    plan = _plan(run, cfg, tuple(targets))
    results, skipped, eager, val, spread = _check_plan(run, cfg, plan, progress)
    result = _result(run, cfg, results, skipped, eager, val, spread, arts)
    if cfg.formats:  # a subset: the other formats keep their earlier verdicts
        result = keep_earlier(run, result, OUTPUT)
    _record(run, cfg, result)
    if not result["passed"]:
        raise VerifyFailed(f"parity check failed: {'; '.join(result['failures'])} (details: {run.file(OUTPUT)})",
                           result)
    return result


def _check_plan(run: Run, cfg: VerifyConfig, plan, progress: Callable[[str], None]):
    """(results, skipped, eager, validation, eager's logit spread) of the targets of `plan` against eager PyTorch."""
    from cnnpack.artifacts import artifact_ref
    from cnnpack.runtimes import RUNTIMES

    with exact_fp32(cfg.device):
        progress("loading eager reference")
        eager = RUNTIMES.get("eager").load(artifact_ref(run, "checkpoint"), cfg.device)
        _check_sources(run, [t.format for t, _ in plan], eager.info["checkpoint_sha256"])
        loaded, skipped = _load_targets(plan, progress)
        val = _validation(run, cfg, eager)
        spec = run.model_spec
        ref = Reference(eager, (spec["channels"], spec["image_size"], spec["image_size"]), cfg)
        results = [check_target(t, rt, sizes, ref, val, cfg, progress) for t, rt, sizes in loaded]
    return results, skipped, eager, val, ref.spread(val)


def check(run: Run, cfg: VerifyConfig, targets: tuple[Target, ...]) -> list[dict]:
    """The results of `targets` alone against eager, each under its precision's contract, recording nothing
    (`cnnpack tune` checks a config it is about to measure this way)."""
    cfg = replace(cfg, formats=())
    cfg.validate()
    return _check_plan(run, cfg, _plan(run, cfg, tuple(targets)), lambda _: None)[0]


def _result(run: Run, cfg: VerifyConfig, results: list[dict], skipped: list[dict], eager,
            val: Validation | None, spread: tuple[float, int] = (float("inf"), 0), arts: dict | None = None) -> dict:
    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {}) if arts is None else arts
    eager_acc = float((val.eager_logits.argmax(1) == val.labels).mean()) if val is not None else None
    notes = [] if val is not None else ["no validation data (a run made by `cnnpack export --arch`): tensor parity on "
                                        "random inputs only; pass --data to check task parity too"]
    if spread[0] <= cfg.atol:  # within atol, an artifact that answered a constant would pass too
        notes.append(f"eager's logits hardly change with the input (no logit moves more than {spread[0]:.1e} over "
                     f"{spread[1]} inputs, within atol {cfg.atol:g}): the passes say little; check a trained model, or "
                     "export --arch with --pretrained or --weights")
    return {
        "passed": all(r["passed"] for r in results),
        "failures": [f for r in results for f in r["failures"]],
        "config": asdict(cfg),
        "reference": {"runtime": "eager", "device": eager.info.get("device"), "accuracy": eager_acc},
        "data": {"source": val.source, "images": int(len(val.labels))} if val is not None else None,
        "note": "; ".join(notes) or None,
        "reference_spread": None if spread[1] == 0 or not np.isfinite(spread[0]) else spread[0],
        "artifacts": {r["format"]: {"path": arts[r["format"]]["path"], "sha256": arts[r["format"]]["sha256"],
                                    **weights_digest(arts[r["format"]])}
                      for r in results if r["format"] in arts},
        "results": results,
        "skipped": skipped,
        "libraries": library_versions(),
    }
