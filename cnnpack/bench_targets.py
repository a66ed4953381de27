"""What a bench measures: the model's cost in FLOPs, and the (runtime, artifact) pairs it runs at which batch sizes:
with no runtimes named, every runtime of the run's artifacts that can run here, the others skipped with why."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnpack import user_model
from cnnpack.errors import MissingStageError, RuntimeUnavailable, UserInputError, shell
from cnnpack.rundir import Run

if TYPE_CHECKING:
    from cnnpack.bench import BenchConfig


# -- the model's cost ---------------------------------------------------------------------------------
def count_flops(run: Run) -> int:
    """FLOPs of one image through the eager model (convolutions and matmuls, 2 per multiply-add); where the model
    cannot be built (your own network's file gone), the figure export recorded beside its artifacts."""
    from cnnpack.artifacts import ArtifactRef
    from cnnpack.models import flops_per_image
    from cnnpack.runtimes import EagerRuntime

    spec = run.model_spec
    try:
        model, _, _ = EagerRuntime.build(ArtifactRef(run, "checkpoint"), "cpu")
    except UserInputError:
        arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
        counted = [a["flops_per_image"] for _, a in sorted(arts.items(), key=lambda kv: kv[0] != "onnx")
                   if a.get("flops_per_image")]
        if counted:
            return int(counted[0])
        raise
    return flops_per_image(model, spec["channels"], spec["image_size"])


def unbuildable_reason(run: Run) -> str | None:
    """Why the run's eager model cannot be built here (your own network whose code is not where the run recorded
    it), or None: eager and compiled build it; the exported artifacts do not need it."""
    arch = run.model_spec["arch"]
    if not user_model.is_user_arch(arch):
        return None
    try:
        user_model.source_record(arch)
    except UserInputError as e:
        return f"{str(e).removeprefix(f'--arch {arch}: ')}: the eager model is built from the network's code"
    return None


# -- runtimes -----------------------------------------------------------------------------------------
def unusable_reason(name: str) -> str | None:
    """Why an installed runtime cannot run here (cheap checks only), or None."""
    from cnnpack.runtimes import RUNTIMES

    cls = RUNTIMES.get(name)
    provider = getattr(cls, "provider", None)
    try:
        if provider:
            import onnxruntime as ort

            if provider not in ort.get_available_providers():
                return f"this onnxruntime build has no {provider}"
        precheck = getattr(cls, "precheck", None)
        if precheck:
            precheck()
    except RuntimeUnavailable as e:
        return str(e).removeprefix(f"{name}: ")
    return None


def check_runtimes(names: tuple[str, ...]) -> None:
    """Refuses an unknown runtime, listing the valid ones and why any installed one is unusable here."""
    from cnnpack.runtimes import RUNTIMES

    unknown = [n for n in names if n not in RUNTIMES]
    if not unknown:
        return
    reasons = {n: unusable_reason(n) for n in RUNTIMES}
    usable = [n for n, r in reasons.items() if r is None]
    msg = f"unknown runtime {unknown[0]!r}; valid: {', '.join(usable)}"
    skipped = [f"{n} ({r})" for n, r in reasons.items() if r]
    if skipped:
        msg += f"; installed but unusable here: {'; '.join(skipped)}"
    raise UserInputError(msg)


def _artifact(run: Run, name: str, fmt: str | None = None):
    from cnnpack.artifacts import artifact_ref
    from cnnpack.runtimes import RUNTIMES

    fmt = fmt or RUNTIMES.get(name).format
    try:
        return artifact_ref(run, fmt)
    except MissingStageError:
        raise MissingStageError(f"{run.path} has no exports, which runtime {name} needs; run "
                                f"`cnnpack export --run {shell(run.path)}` first (or bench only --runtimes eager,compiled)"
                                ) from None


def _recorded(run: Run) -> set[str]:
    return set(run.read().get("stages", {}).get("export", {}).get("artifacts", {}))


def default_runtimes(run: Run) -> tuple[tuple[str, ...], dict[str, str]]:
    """With no --runtimes: every registered runtime of a run's artifacts (its own format or another it reads)
    that the run has and that can run here, and {runtime: why not} for the others. Runtimes of a served model
    (no format a run records) are neither."""
    from cnnpack.runtimes import FORMAT_RUNTIME, RUNTIMES, reads

    recorded, chosen, skipped = _recorded(run) | {"checkpoint"}, [], {}
    for name in RUNTIMES:
        cls = RUNTIMES.get(name)
        if cls.format not in FORMAT_RUNTIME:
            continue
        why = unusable_reason(name) or (unbuildable_reason(run) if cls.format == "checkpoint" else None)
        if why is None and not any(reads(cls, f) for f in recorded):
            why = (f"the run has no {cls.format} artifact; `cnnpack export --run {shell(run.path)} --format {cls.format}` "
                   "makes one")
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return tuple(chosen), skipped


def targets(run: Run, cfg: BenchConfig) -> list[tuple[str, object]]:
    """(runtime, artifact) pairs: each runtime on its own format and on every other recorded format it reads
    (onnxruntime on onnx and onnx_int8), or on the formats `cfg.artifacts` names. With no runtimes named
    (`cfg.runtimes` None), the runtimes of `default_runtimes` on the recorded formats they read."""
    from cnnpack.runtimes import RUNTIMES, reads

    recorded = _recorded(run)
    named = cfg.runtimes is not None
    runtimes = cfg.runtimes if named else default_runtimes(run)[0]
    if cfg.artifacts:
        unknown = [f for f in cfg.artifacts if f not in recorded and f != "checkpoint"]
        if unknown:
            raise UserInputError(f"--artifacts {unknown[0]!r} is not recorded in {run.path} "
                                 f"(has: {', '.join(sorted(recorded)) or 'none'})")
    pairs = []
    for name in runtimes:
        cls = RUNTIMES.get(name)
        formats = [cls.format] + sorted(f for f in recorded if f != cls.format and reads(cls, f))
        if not named:  # a default runtime runs what the run has (openvino on an int8 IR alone)
            formats = [f for f in formats if f in recorded | {"checkpoint"}]
        if cfg.artifacts:
            formats = [f for f in formats if f in cfg.artifacts]
        pairs += [(name, _artifact(run, name, f)) for f in formats]
    if not pairs:
        raise UserInputError(f"no runtime of --runtimes {','.join(runtimes)} reads --artifacts "
                             f"{','.join(cfg.artifacts or ())}")
    return pairs


def fitted_batch_sizes(ref, batch_sizes: tuple[int, ...]) -> tuple[int, ...]:
    """Default batch sizes within what the artifact takes (`runtimes.fit_batch_sizes` on its record)."""
    from cnnpack.runtimes import fit_batch_sizes

    return tuple(fit_batch_sizes(batch_sizes, cap=ref.max_batch_size, static=ref.record.get("static_batch")))


def check_batch_sizes(ref, name: str, batch_sizes: tuple[int, ...]) -> None:
    """Refuses a batch size the artifact cannot take (beyond its max, or not its static batch)."""
    static = ref.record.get("static_batch")
    for b in batch_sizes:
        if static and b != static:
            raise UserInputError(f"batch size {b}: {ref.path} ({name}) was exported with a static batch of "
                                 f"{static}; bench --batch-sizes {static}, or re-export without --static-batch")
        if ref.max_batch_size and b > ref.max_batch_size:
            fp32 = ref.format.removesuffix("_int8")  # an int8 model is quantized from the fp32 export
            again = " (then `cnnpack quantize` again)" if fp32 != ref.format else ""
            raise UserInputError(f"batch size {b} exceeds the max batch size {ref.max_batch_size} of {ref.path} "
                                 f"({name}); re-export with `cnnpack export --run {shell(ref.run.path)} --format {fp32} "
                                 f"--max-batch-size {b}`{again} or bench smaller")
