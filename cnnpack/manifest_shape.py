"""The shape of cnnpack.json that the commands read: a hand-edited or foreign manifest is refused in one line naming
the first key that is wrong (`rundir.Run.read`), not met as a traceback in whichever command reads that key first.

A shape is a type (`str`, `int`, `NUM`, `bool`, `dict`, `list`), a dict of key -> shape (a key ending in "?" may
be absent), `Each(shape)` (an object whose every value has that shape), `[shape]` (a list whose every item has it),
`Nullable(shape)`, `OneOf(values)`, `OneOfTypes(types)` or `Check(shape, predicate, says)`. Only what some command reads is described; other
keys are free. A stage's own keys are required only while its status is "ok": a stage that failed, or that a Ctrl-C
or a crash stopped ("running", "interrupted"), records less, and its readers only look at what is there; what it
does record (an artifact, a bench row) is whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cnnpack.spec import MIN_IMAGE_SIZE


class NUM:  # an int or a float, not a bool
    pass


@dataclass(frozen=True)
class Each:
    shape: Any


@dataclass(frozen=True)
class Nullable:
    shape: Any


@dataclass(frozen=True)
class OneOf:
    values: tuple


@dataclass(frozen=True)
class Check:
    shape: Any
    ok: Callable[[Any], bool]
    says: str


@dataclass(frozen=True)
class OneOfTypes:
    kinds: tuple


@dataclass(frozen=True)
class Stage:
    """A stage section: `keys` are required (those ending in "?" excepted) when its status is "ok"."""

    keys: dict


STATUSES = ("ok", "failed", "running", "interrupted")
_NAMES = {str: "a string", int: "an integer", NUM: "a number", bool: "true or false", dict: "an object",
          list: "a list"}


def _is(value: Any, kind: type) -> bool:
    if kind is NUM:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _at(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else key


def problem(value: Any, shape: Any, path: str = "") -> str | None:
    """What is wrong with `value` at `path` against `shape`, or None."""
    if isinstance(shape, Nullable):
        return None if value is None else problem(value, shape.shape, path)
    if isinstance(shape, type):
        return None if _is(value, shape) else f"`{path}` is not {_NAMES[shape]}"
    if isinstance(shape, OneOfTypes):
        return None if any(_is(value, k) for k in shape.kinds) else (
            f"`{path}` is not {' or '.join(_NAMES[k] for k in shape.kinds)}")
    if isinstance(shape, OneOf):
        return None if value in shape.values else f"`{path}` is not one of {', '.join(map(str, shape.values))}"
    if isinstance(shape, Check):
        return problem(value, shape.shape, path) or (None if shape.ok(value) else f"`{path}` {shape.says}")
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"`{path}` is not a list"
        return next((p for i, v in enumerate(value) if (p := problem(v, shape[0], _at(path, i)))), None)
    if isinstance(shape, Each):
        if not isinstance(value, dict):
            return f"`{path}` is not an object"
        return next((p for k, v in value.items() if (p := problem(v, shape.shape, _at(path, k)))), None)
    if isinstance(shape, Stage):
        if not isinstance(value, dict):
            return f"`{path}` is not an object"
        if "status" in value and value["status"] not in STATUSES:
            return f"`{_at(path, 'status')}` is not one of {', '.join(STATUSES)}"
        return _keys(value, shape.keys, path, required=value.get("status") == "ok")
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"`{path}` is not an object"
        return _keys(value, shape, path, required=True)
    raise TypeError(f"not a shape: {shape!r}")


def _keys(value: dict, shape: dict, path: str, *, required: bool) -> str | None:
    for key, sub in shape.items():
        name, optional = key.rstrip("?"), key.endswith("?")
        if name not in value:
            if required and not optional:
                return f"`{_at(path, name)}` is missing"
            continue
        if p := problem(value[name], sub, _at(path, name)):  # what is there is whole, in any stage
            return p
    return None


# -- what the commands read --------------------------------------------------------------------------------------
POSITIVE = Check(int, lambda v: v >= 1, "is not an integer >= 1")
FORMATS = ("onnx", "onnx_int8", "pt2", "torchscript", "openvino", "openvino_int8")  # runtimes.FORMAT_RUNTIME's
FILE = {"path": str, "sha256": str}
TENSOR = {"name": str, "dtype": str, "shape": [int]}
PRECISION = OneOf(("fp32", "fp16", "bf16", "int8"))

ARTIFACT = {
    "path": str, "sha256": str, "input": TENSOR, "output": TENSOR,
    "max_batch_size": POSITIVE, "static_batch?": Nullable(POSITIVE), "precision?": PRECISION,
    "format?": str, "exporter?": str, "input_kind?": str, "size_mb?": NUM, "extra?": dict, "source?": dict,
    "config?": dict, "weights?": FILE, "gate?": {"max_drop_pt?": NUM}, "checkpoint_sha256?": Nullable(str),  # null: made from a record older than it
    "compile_s?": Nullable(NUM), "export_s?": Nullable(NUM), "device?": Nullable(str), "torch_version?": Nullable(str),
}
GATE = {"max_drop_pt": NUM, "min_agreement?": NUM, "drop_pt": NUM, "top1_agreement_vs_fp32": NUM, "steps": int}
QUANTIZE = Stage({"gate": GATE, "calibration": {"images": int, "method": str, "seed": int},
                  "kept_float?": [str], "outputs?": Each(FILE)})
# a served model's precision comes from its config.pbtxt: any name
VERIFIED = {"precision?": str, "contract?": Nullable(str), "passed?": bool, "max_abs_err?": Nullable(NUM),
            "top1_agreement?": Nullable(NUM), "accuracy?": Nullable(NUM), "top1_tie_disagreements?": Nullable(int),
            "top1_agreement_gated?": Nullable(NUM)}
_SERVED_ROW = {"concurrency": POSITIVE, "latency_ms_p50": NUM, "latency_ms_p99": NUM, "throughput_ips": NUM,
               "format?": str, "protocol?": Nullable(str), "load_generator?": Nullable(str), "info?": dict,
               **dict.fromkeys(("server_batch_mean?", "server_queue_ms_mean?", "server_compute_ms_mean?"),
                               Nullable(NUM))}
BENCH_ROW = {
    "runtime": str, "format": str, "batch_size": POSITIVE, "latency_ms_p50": NUM, "latency_ms_p99": NUM,
    "throughput_ips": NUM, "precision?": str, "artifact?": str, "cpu_others?": Nullable(NUM),
    "load_s?": Nullable(NUM), "first_call_s?": Nullable(NUM), "speedup_vs_eager?": Nullable(NUM),
    "matmul_share?": Nullable(NUM), "gflops?": Nullable(NUM), "stable?": bool, "concurrency?": Nullable(int),
    "matmul_before_gflops?": NUM, "matmul_after_gflops?": NUM, "matmul_best_gflops?": NUM,
}
BENCH_ROW = Check(BENCH_ROW, lambda r: r.get("runtime") != "triton" or problem(r, _SERVED_ROW) is None,
                  "is a served row without its concurrency")  # bench --triton-url's rows: one per concurrency
VERDICT = {"gain?": Nullable(NUM), "noise?": Nullable(NUM), "p99_gain?": Nullable(NUM), "default?": Nullable(str),
           "objective?": str, "as_good?": bool, "vs_served_default?": Nullable({"model": str, "gain": NUM, "noise?": Nullable(NUM)})}
POINT = {"label": str, "model": str, "concurrency": POSITIVE, "instances": POSITIVE, "threads": Check(int, lambda v: v >= 0, "is negative"),
         "throughput_ips": NUM, "latency_ms_p50": NUM, "latency_ms_p99": NUM, "default?": bool,
         "server_batch_mean?": Nullable(NUM)}  # one served config at one concurrency (cnnpack tune); threads 0: default
CEILING = {"gflops": NUM, "best": str, "matrix_engine?": str,
           "theoretical_gflops?": Nullable({"gflops": NUM, "mhz": NUM, "assumes": str, "note?": Nullable(str)})}

MODEL = {"arch": str, "num_classes": POSITIVE, "classes": Check([str], lambda v: len(v) >= 1, "is empty"),
         "image_size": Check(int, lambda v: v >= MIN_IMAGE_SIZE, f"is not an integer >= {MIN_IMAGE_SIZE}"),
         "channels?": POSITIVE, "input_layout?": str, "arch_kwargs?": dict,
         "arch_source?": {"path": str, "sha256": str, "imports?": [str]},
         "mean?": [NUM], "std?": Check([NUM], lambda v: all(x != 0 for x in v), "holds a 0 (it divides)")}
# mean/std absent: ImageNet's (spec.ModelSpec.from_dict); their length is checked against channels below

MANIFEST = {
    "model": MODEL,
    "tool": {"name": str, "version": str},
    "machine": {"cpu_count?": Nullable(int), "processor?": Nullable(str), "platform?": Nullable(str)},
    "libraries": Each(Nullable(str)),
    "stages?": Check({
        "train?": Stage({"config": {"data?": Nullable(str), "seed?": int, "data_root?": Nullable(str),
                                    "val_fraction?": Check(NUM, lambda v: 0 < v < 1, "is not in (0, 1)")}, "metrics": {"best_val_acc": NUM, "best_epoch?": int,
                                                                         "epochs?": int, "wall_s?": NUM},
                         "data?": {"classes?": [str], "source?": str}, "outputs?": Each(FILE)}),
        "model?": Stage({"source?": dict}),  # a run made by `export --arch` (no training)
        "export?": Stage({"artifacts": Check(Each(ARTIFACT), lambda a: set(a) <= set(FORMATS),
                                             f"names a format that is none of {', '.join(FORMATS)}"),
                          "source?": dict}),
        "quantize?": QUANTIZE,
        "quantize_openvino?": QUANTIZE,
        "verify?": Stage({"passed": bool, "formats": Each({**VERIFIED, "runtimes?": [str],
                                                           "by_runtime?": Each(VERIFIED)}),
                          "artifacts?": Each({"path?": str, "sha256?": str, "weights_sha256?": Nullable(str)}),
                          "outputs?": Each(FILE)}),
        "bench?": Stage({"results": [BENCH_ROW], "ceilings?": Each(CEILING), "inputs?": Each(str),
                         "over_ceiling?": [str], "outputs?": Each(FILE), "machine_peak_gflops?": Nullable(NUM), "skipped?": Each(str),
                         "config?": {"stability?": NUM}, "matmul?": {"spread?": NUM, "samples_gflops?": [NUM]}}),
        "triton?": Stage({"repository": Check(str, bool, "is empty"), "name": str, "version": int, "format": str,
                          "models?": list, "files?": Each(FILE),
                          "config?": {"instances?": Nullable(POSITIVE),
                                      "threads?": Nullable(Check(int, lambda v: v >= 0, "is negative"))}}),
        "served?": Stage({"repository?": str, "outputs?": Each(FILE), "load?": [_SERVED_ROW],
                          "server_peak_rss_bytes?": Nullable(NUM), "server_load_s?": Nullable(NUM),
                          "predictions?": [{"image": str, "true": str, "label": str, "score": NUM,
                                            "ensemble_label?": str}],
                          "parity?": Each(VERIFIED), "versions?": Each(OneOfTypes((str, int)))}),
        "tune?": Stage({"points": [POINT], "config": {"latency_budget_ms": NUM}, "verdict": Nullable(VERDICT),
                        "winner": Nullable(POINT), "outputs?": Each(FILE),
                        "tuned?": Each({"previous?": str, "sha256?": str}),
                        "written?": Nullable({"config": str, "previous?": str, "sha256?": str}), "sweep?": {"truncated?": bool}}),
        "deploy?": Stage({"figures": {k: {"value": NUM, "source?": str} for k in (
                              "cpu", "memory_mib", "startup_s", "queue_target_us")},
                          **dict.fromkeys(("out", "name", "image", "model_store", "repository", "content_tag"), str),
                          "models": [str], "overlays": [str], "config?": dict}),
    }, lambda v: all(isinstance(x, dict) for x in v.values()), "is not an object of objects"),
}


def manifest_problem(manifest: Any) -> str | None:
    """The first key of `manifest` that is not as the commands read it, or None."""
    if p := problem(manifest, MANIFEST):
        return p
    model = manifest["model"]
    for key in ("mean", "std"):  # one per input channel: the image ensemble normalizes each channel by them
        if key in model and len(model[key]) != model.get("channels", 3):
            return f"`model.{key}` holds {len(model[key])} numbers for {model.get('channels', 3)} channels"
    if len(model["classes"]) != model["num_classes"]:
        return (f"`model.classes` names {len(model['classes'])} classes, `model.num_classes` says "
                f"{model['num_classes']}")
    return None
