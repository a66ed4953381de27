"""The int8 accuracy gate, shared by every quantizer: its config, its data, the ranked fallback, the time limit.

A quantizer (cnnpack/int8_ort.py, cnnpack/int8_openvino.py) supplies a `Candidate`: it can build the
int8 model with some compute nodes kept in float, and say what such a model computes. The gate does
the rest, the same way for every backend:

1. the plain int8 model (every quantizable node in int8) against the fp32 artifact's top-1 on the
   validation split: a drop of at most `max_drop` points and an agreement of at least `min_agreement`;
2. when it misses, every node is ranked once by the error (against fp32's logits, on the first
   `rank_images` validation images, fewer where that would leave the fallback steps less than half the
   time left) of a model where that node alone runs in int8;
3. the most harmful nodes are kept in float, one more per step, until the gate holds or `max_steps`
   are spent. An attempt that keeps every convolution and matmul in float is no int8 model and never passes.

Everything runs under a deadline (`time_limit_s`, the whole quantize call, reading the images included): each model
build and each evaluation is checked against it, progress lines carry an estimate of what is left,
and at the limit the gate stops with the best attempt's figures (exit 1, nothing recorded).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from cnnpack.contracts import drop_within
from cnnpack.errors import ParityError, UserInputError, first_few
from cnnpack.registry import Registry
from cnnpack.rundir import Run, weights_digest

QUANTIZERS: Registry = Registry("quantizer")
METHODS = ("minmax", "entropy", "percentile")
WEIGHT_TYPES = ("auto", "int8", "uint8")  # ONNX Runtime's weights: cnnpack/int8_ort.py weight_type()
CALIBRATION_BATCH = 16
CALIBRATION_IMAGES = 256  # the default: a training split smaller than this is calibrated on whole
DEFAULT_TIME_LIMIT_S = 110.0  # the whole call: resnet18@224 on 2 cores within 2 minutes, first attempt missing the gate


@dataclass(frozen=True)
class QuantizeConfig:
    format: str = "onnx_int8"  # the quantizer (and the artifact's format key)
    calibration_images: int | None = None  # from the run's training split; None: all of it up to CALIBRATION_IMAGES
    method: str = "minmax"  # minmax | entropy | percentile
    max_drop: float = 0.5  # percentage points of validation top-1, int8 vs the fp32 artifact
    min_agreement: float = 0.99  # top-1 agreement with the fp32 artifact (verify's int8 contract)
    max_steps: int = 8  # fallback steps (one more node kept in float each)
    rank_images: int = 64  # validation images used to rank the nodes (benchmarks/quantize_bounded.py: why 64)
    time_limit_s: float = DEFAULT_TIME_LIMIT_S  # the whole quantize call; at the limit: exit 1, nothing recorded
    seed: int = 0
    data: str | None = None  # default: the data the run was trained on
    weight_type: str = "auto"  # ONNX Runtime only: int8 | uint8 | auto (uint8 on an x86 CPU without VNNI)

    def validate(self) -> None:
        QUANTIZERS.get(self.format)
        if self.method not in METHODS:
            raise UserInputError(f"--method {self.method!r}; valid: {', '.join(METHODS)}")
        if not 0 <= self.max_drop <= 100:  # also refuses NaN; over 100 points no model can miss (a fraction meant?)
            raise UserInputError(f"--max-drop is in percentage points of top-1 and must be >= 0 and <= 100, got "
                                 f"{self.max_drop}")
        if not 0 < self.min_agreement <= 1:
            raise UserInputError(f"--min-agreement is a fraction in (0, 1], got {self.min_agreement}")
        if self.calibration_images is not None and self.calibration_images < 1:
            raise UserInputError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.max_steps < 0:
            raise UserInputError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.seed < 0:  # numpy's generators take none below 0
            raise UserInputError(f"--seed must be >= 0, got {self.seed}")
        if self.rank_images < 1:
            raise UserInputError(f"--rank-images must be >= 1, got {self.rank_images}")
        if not self.time_limit_s > 0:
            raise UserInputError(f"--time-limit is in seconds and must be > 0, got {self.time_limit_s}")
        if self.weight_type not in WEIGHT_TYPES:
            raise UserInputError(f"--weight-type {self.weight_type!r}; valid: {', '.join(WEIGHT_TYPES)}")
        if self.weight_type != "auto" and self.format != "onnx_int8":
            raise UserInputError(f"--weight-type {self.weight_type} is ONNX Runtime's choice; the openvino backend "
                                 "takes only auto (NNCF chooses its own int8 weights)")
        if self.method != "minmax" and self.format != "onnx_int8":  # it was recorded, and NNCF did the same
            raise UserInputError(f"--method {self.method} is ONNX Runtime's calibration; the openvino backend "
                                 "calibrates with NNCF's own range estimators: drop --method")


# -- data --------------------------------------------------------------------------------------------
@dataclass
class QuantData:
    calibration: np.ndarray  # (N, 3, S, S) float32 from the training split, as the artifact takes them (model_input)
    val_images: np.ndarray  # (M, 3, S, S) raw uint8 pixels, or float32 normalised ones (model_input)
    val_labels: np.ndarray  # (M,)
    source: str
    train_images: int


def _other_classes(source: str, have: list[str], want: list[str]) -> UserInputError:
    """--data whose classes are not the model's, said by what differs, a few names each (a folder of 400 folders
    was listed whole on the one line)."""
    missing, extra = [c for c in want if c not in have], [c for c in have if c not in want]
    said = [f"lacks the model's {first_few(missing)}"] if missing else []
    said += [f"has {first_few(extra)}, which the model does not classify"] if extra else []
    said = said or [f"has the model's classes in another order ({first_few(have)})"]
    return UserInputError(f"--data {source} {' and '.join(said)}; calibrate on the data the model classifies")


def load_quant_data(run: Run, cfg: QuantizeConfig) -> QuantData:
    """The run's own training split (calibration) and validation split (the gate), through its own loader."""
    from cnnpack.evaluate import dataset_of

    if not (cfg.data or run.trained_on):
        raise UserInputError(f"{run.path} has no training data to calibrate on (made by `cnnpack export --arch`); "
                             "name it with --data PATH|shapes")
    from cnnpack.data import class_names, nfc

    spec = run.model_spec
    model = [nfc(c) for c in spec["classes"]]  # as they read: a class folder copied from macOS (NFD) is the same
    if (cfg.data and (known := class_names(cfg.data)) is not None and [nfc(c) for c in known] != model):
        raise _other_classes(cfg.data, known, list(spec["classes"]))  # said before its images are read
    d = dataset_of(run, cfg.data)
    if [nfc(c) for c in d.classes] != model:
        raise _other_classes(d.source, d.classes, list(spec["classes"]))
    n = len(d.train)
    if cfg.calibration_images is not None and cfg.calibration_images > n:
        raise UserInputError(f"--calibration-images {cfg.calibration_images} is more than the {n} images of "
                             f"{d.source}'s training split; use at most {n}")
    k = min(CALIBRATION_IMAGES, n) if cfg.calibration_images is None else cfg.calibration_images
    idx = np.random.default_rng(cfg.seed).permutation(n)[:k]
    images = d.train.images.numpy()[np.sort(idx)].astype(np.float32)
    return QuantData(images, d.val.images.numpy(), d.val.labels.numpy(), d.source, n)


def model_input(data: QuantData, record: dict, spec: dict) -> QuantData:
    """`data` as the artifact `record` takes it: raw pixels, or normalised for one exported with `--input normalized`
    (as verify and the servers feed it). Calibrated on raw pixels, its int8 ranges would be 255x too wide, and the
    gate would compare two models fed what neither is ever fed."""
    if record.get("input_kind") != "normalized":
        return data
    from cnnpack.spec import normalizer

    normalize = normalizer(spec["mean"], spec["std"])
    return replace(data, calibration=normalize(data.calibration), val_images=normalize(data.val_images))


def top1(x: np.ndarray, labels: np.ndarray) -> float:
    return float((x.argmax(1) == labels).mean())


# -- time ----------------------------------------------------------------------------------------------
def reading_share(read_s: float, limit_s: float) -> str:
    """Where a tenth or more of the limit went into reading the images (the built-in data is drawn on its first
    use at a size, then cached), the message says so: the next run starts with that time back."""
    return f" (reading the images took {read_s:.0f} s of it)" if read_s >= 0.1 * limit_s else ""


class GateMissed(ParityError):
    """No attempt held the gate; `section` is what the run's manifest records of it (`--json` prints it)."""

    def __init__(self, message: str, section: dict) -> None:
        super().__init__(message)
        self.section = section


class TimeLimitReached(GateMissed):
    """The gate ran out of time; `section` holds the attempts so far (nothing is recorded)."""


@dataclass
class Clock:
    """The deadline of one quantize call, and the progress lines with an estimate of what is left."""

    limit_s: float
    say: Callable[[str], None]
    t0: float = field(default_factory=time.perf_counter)
    stopped: str | None = None  # what was running when the limit was reached
    read_s: float = 0.0  # reading the images (drawing the built-in ones, on their first use at a size)
    staged: list = field(default_factory=list)  # the artifact written beside its place (atomic.staged_beside), as
    # soon as it exists: quantize puts it in place as it records it, or removes it whatever stopped it

    def read(self, run: Run, cfg: QuantizeConfig) -> QuantData:
        """`load_quant_data`, with its progress line and its time kept for the messages."""
        if cfg.data is not None:  # a wrong --data is its one-line error, with no progress line before it
            from cnnpack.data import check_data

            check_data(cfg.data, run.model_spec["image_size"])
        self.note("reading the calibration and validation images")
        t = time.perf_counter()
        data = load_quant_data(run, cfg)
        self.read_s = time.perf_counter() - t
        self.require("reading the images")  # not said as the phase after it (the fp32 reference)
        return data

    def require(self, doing: str) -> None:
        """Raises TimeLimitReached when the deadline passed during `doing`, before any int8 attempt."""
        if self.over(doing):
            raise TimeLimitReached(f"no int8 model: the time limit of {self.limit_s:g} s was reached during {doing}, "
                                   f"before any int8 attempt{reading_share(self.read_s, self.limit_s)}; "
                                   "raise --time-limit", {})

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.limit_s - self.elapsed()

    def over(self, doing: str) -> bool:
        """True (and remembers `doing`) once the deadline has passed."""
        if self.left() <= 0 and self.stopped is None:
            self.stopped = doing
        return self.stopped is not None

    def note(self, text: str) -> None:
        self.say(f"[{self.elapsed():5.1f}s] {text} (limit {self.limit_s:g} s)")

    def step(self, text: str, done: int, total: int, since: float) -> None:
        """A progress line: `text`, with the estimate of the remaining `total - done` items of this phase."""
        eta = ""
        if done:
            per = (time.perf_counter() - since) / done
            eta = f", about {per * (total - done):.0f} s left of this phase"
        self.note(f"{text}{eta}")


# -- the gate and its fallback ------------------------------------------------------------------------------
class Candidate(Protocol):
    """What a backend gives the gate: its quantizable compute nodes and models built on one calibration."""

    nodes: list[str]  # the nodes of the plain int8 model that run in int8: what the fallback keeps in float
    compute: list[str]  # those of them that make it an int8 model (convolutions, matmuls): all in float, it is not

    def build(self, kept_float: list[str]) -> object:
        """The int8 model with `kept_float` in float (ranges from the one calibration)."""

    def alone(self, node: str) -> object:
        """A model where only `node` runs in int8."""

    def runner(self, model: object) -> Callable[[np.ndarray], np.ndarray]:
        """`model` loaded once: raw-pixel uint8/float images (N, C, H, W) -> (N, K) float32 logits."""


@dataclass
class Attempt:  # noqa: D101 - one quantized model and its figures on the validation split
    kept_float: list[str]
    accuracy: float
    drop_pt: float  # fp32 top-1 minus int8 top-1, percentage points
    agreement: float  # top-1 agreement with the fp32 artifact
    model: object = None
    all_float: bool = False  # every compute node kept in float: not an int8 model
    images: int = 0  # validation images it was evaluated on (fewer: given up once it could not pass)
    fp32_accuracy: float = 0.0  # fp32's top-1 on those images

    by: str = ""  # "" for the gate's own attempts (plain, then the ranked fallback); else what made it

    def holds(self, cfg: QuantizeConfig) -> bool:
        return drop_within(self.drop_pt, cfg.max_drop) and self.agreement >= cfg.min_agreement - 1e-12 and not self.all_float

    def record(self) -> dict:
        return {"kept_float": self.kept_float, "accuracy": self.accuracy, "drop_pt": round(self.drop_pt, 4),
                "top1_agreement_vs_fp32": self.agreement, "all_float": self.all_float, "images": self.images,
                "fp32_accuracy": self.fp32_accuracy, **({"by": self.by} if self.by else {})}


def evaluate(c: Candidate, model, kept: list[str], ref: np.ndarray, data: QuantData,
             cfg: QuantizeConfig | None = None) -> Attempt:
    """The attempt's figures on the validation split. With `cfg`, it is evaluated in chunks and given up as
    soon as more images disagree with fp32 than `min_agreement` allows over the whole split: it cannot pass
    any more, and the figures recorded are those of the images seen (`images`)."""
    run, n = c.runner(model), len(data.val_images)
    allowed = n if cfg is None else int(np.floor((1 - cfg.min_agreement) * n + 1e-9))
    got, disagree, chunk = [], 0, max(64, n // 8)
    for i in range(0, n, chunk):
        got.append(run(data.val_images[i:i + chunk]))
        disagree += int((got[-1].argmax(1) != ref[i:i + chunk].argmax(1)).sum())
        if disagree > allowed:
            break
    out = np.concatenate(got)
    seen, labels = len(out), data.val_labels[:len(out)]
    acc32, acc8 = top1(ref[:seen], labels), top1(out, labels)
    a = Attempt(list(kept), acc8, 100 * (acc32 - acc8), float((out.argmax(1) == ref[:seen].argmax(1)).mean()), model,
                all_float=set(c.compute) <= set(kept))  # none at all: not int8 either
    a.images, a.fp32_accuracy = seen, acc32
    return a


@dataclass
class GateResult:
    passed: Attempt | None
    attempts: list[Attempt]
    ranking: list[dict]
    ranked_images: int = 0
    ranking_s: float = 0.0
    stopped: str | None = None  # set when the time limit stopped the gate
    harmful: int = 0  # ranked nodes whose int8 changes the logits (the fallback's candidates)

    @property
    def steps(self) -> int:
        """The ranked fallback steps tried (not the plain attempt, nor one another method made: NNCF's)."""
        return sum(1 for a in self.attempts[1:] if not a.by)


RANKING_SHARE = 0.5  # of the time left when the ranking starts; the rest is for the fallback steps
MIN_RANK_IMAGES = 8


def rank_nodes(c: Candidate, ref: np.ndarray, data: QuantData, cfg: QuantizeConfig, clock: Clock) -> tuple[list[dict], int]:
    """Each quantized node's harm: the error (mean squared, against fp32's logits, on the ranking images)
    of a model where that node alone runs in int8, its inputs and outputs quantized; most harmful first.
    Also returns on how many images every node was ranked.

    Quantizing one node at a time (rather than keeping one in float) also exposes a harmful tensor that
    two nodes share (a producer's output and its consumer's input): both rank high, and keeping both in
    float removes its quantization.

    The first node is timed (its model build and its images apart): where ranking every node on
    `rank_images` would take more than RANKING_SHARE of the time left, the rest are ranked on as many of
    the same first images as fit (at least MIN_RANK_IMAGES), and the first node's error is taken on those
    too, so that every node is ranked on the same images and the fallback steps keep their share.
    """
    n = min(cfg.rank_images, len(data.val_images))
    images, want = data.val_images[:n], ref[:n]
    out, t0, total = [], time.perf_counter(), len(c.nodes)
    for i, node in enumerate(c.nodes):
        if clock.over(f"ranking node {i + 1} of {total}"):
            break
        clock.step(f"ranking node {i + 1}/{total}: {node}", i, total, t0)
        t_build = time.perf_counter()
        model = c.alone(node)
        t_run = time.perf_counter()
        got = c.runner(model)(images[:n])
        if i == 0:
            build_s, per_image_s = t_run - t_build, (time.perf_counter() - t_run) / n
            budget = RANKING_SHARE * clock.left() / total
            fit = int((budget - build_s) / per_image_s) if per_image_s > 0 else n
            if fit < n:
                n = max(min(fit, n), min(MIN_RANK_IMAGES, n))
                clock.note(f"ranking {total} nodes on {n} of --rank-images {cfg.rank_images} images, so that it "
                           f"takes about half the time left ({build_s:.2f} s per model, "
                           f"{1e3 * per_image_s:.1f} ms per image)")
            got = got[:n]
        out.append({"node": node, "mse_alone_in_int8": float(np.mean((got - want[:n]) ** 2))})
    return sorted(out, key=lambda r: -r["mse_alone_in_int8"]), n


def run_gate(c: Candidate, first: Attempt, ref: np.ndarray, data: QuantData, cfg: QuantizeConfig,
             clock: Clock) -> GateResult:
    """The plain attempt `first`, then (when it misses) the ranking and the fallback steps."""
    res = GateResult(first if first.holds(cfg) else None, [first], [])
    if res.passed or cfg.max_steps == 0 or clock.over("ranking"):
        res.stopped = clock.stopped
        return res
    t0 = time.perf_counter()
    res.ranking, res.ranked_images = rank_nodes(c, ref, data, cfg, clock)
    res.ranking_s = time.perf_counter() - t0
    harmful = [r["node"] for r in res.ranking if r["mse_alone_in_int8"] > 0]
    res.harmful = len(harmful)
    steps, t1 = min(cfg.max_steps, len(harmful)), time.perf_counter()
    for k in range(1, steps + 1):
        if clock.over(f"fallback step {k} of {steps}"):
            break
        clock.step(f"fallback step {k}/{steps}: keeping the {k} most harmful node(s) in float", k - 1, steps, t1)
        res.attempts.append(evaluate(c, c.build(harmful[:k]), harmful[:k], ref, data, cfg))
        if res.attempts[-1].holds(cfg):
            res.passed = res.attempts[-1]
            break
    res.stopped = clock.stopped
    return res


def best_of(attempts: list[Attempt], cfg: QuantizeConfig) -> Attempt:
    """The attempt closest to the gate (int8 models before all-float ones)."""
    return min(attempts, key=lambda a: (a.all_float, max(a.drop_pt - cfg.max_drop, 0), -a.agreement))


def _loosen(section: dict, cfg: QuantizeConfig) -> str:
    """The gate option that the best attempt missed, as advice: raising --max-drop does not help an attempt whose
    drop already held (a negative one) and only missed --min-agreement."""
    g = section["gate"]
    drop, agreement = g.get("drop_pt"), g.get("top1_agreement_vs_fp32")
    missed = (["raise --max-drop"] if drop is not None and not drop_within(drop, cfg.max_drop) else []) + (
        ["lower --min-agreement"] if agreement is not None and agreement < cfg.min_agreement - 1e-12 else [])
    return " or ".join(missed) or "loosen the gate (--max-drop, --min-agreement)"


def why_refused(section: dict, cfg: QuantizeConfig) -> str:
    """The real reason no int8 model was kept, in words a user can act on."""
    n_nodes, steps = section.get("quantizable_nodes", 0), section["gate"]["steps"]
    if section.get("stopped"):
        what = section["stopped"]
        fewer = ("or rank on fewer images (--rank-images)" if what.startswith("ranking") else
                 "or calibrate on fewer images (--calibration-images)" if what.startswith("calibrat") else "")
        return (f"the time limit of {cfg.time_limit_s:g} s was reached during {what}"
                f"{reading_share(section.get('read_s', 0.0), cfg.time_limit_s)}; raise --time-limit"
                + (f", {fewer}" if fewer else ""))
    if any(a.get("all_float") for a in section.get("attempts", [])):
        return ("every layer had to stay in float to hold the gate: there is no int8 model of it; "
                + _loosen(section, cfg))
    if steps == 0 and cfg.max_steps == 0:
        return "the plain int8 model misses the gate and --max-steps 0 allows no fallback; raise --max-steps"
    harmful = section.get("harmful_nodes", n_nodes)
    if section.get("ranking") and harmful == 0:
        return ("no single node's int8 changed the logits on the ranking images, so there was no node to keep in "
                f"float; {_loosen(section, cfg)}, or rank on more images (--rank-images)")
    if steps >= harmful:  # a larger --max-steps would try nothing more
        return (f"keeping in float, one more per step, every one of the {steps} node(s) the ranking found harmful "
                f"never held the gate; {_loosen(section, cfg)}")
    ranked = [a for a in section.get("attempts", [])[1:] if not a.get("by")]
    last = len(ranked[-1].get("kept_float", [])) if ranked else steps
    return (f"--max-steps {cfg.max_steps} was spent (the last step kept the {last} most harmful of {n_nodes} node(s) in "
            f"float); raise --max-steps, {_loosen(section, cfg)}, or calibrate on more images")


def refusal(section: dict, cfg: QuantizeConfig, stage: str, manifest: Path) -> str:
    g = section["gate"]
    seen = "" if g["int8_images"] == g["val_images"] else f", given up after {g['int8_images']} of {g['val_images']} images"
    also = f"; {section['note']}" if section.get("note") else ""  # what another method (NNCF's) made of it
    # at the time limit nothing is recorded: no manifest section to point at
    details = "" if section.get("stopped") else f"; details: stages.{stage} in {manifest}"
    return (f"no int8 model within --max-drop {cfg.max_drop:g} pt and --min-agreement {100 * cfg.min_agreement:g}%: "
            f"{why_refused(section, cfg)} (the best int8 attempt{seen}: drop {g['drop_pt']:.2f} pt, top-1 "
            f"{100 * g['int8_accuracy']:.2f}% vs fp32 {100 * g['fp32_accuracy_on_those']:.2f}%, "
            f"{100 * g['top1_agreement_vs_fp32']:.2f}% agreement with {len(section['kept_float'])} node(s) in float; "
            f"{g['steps']} fallback step(s) tried{also}{details})")


def section(cfg: QuantizeConfig, ref_record: dict, ref_format: str, data: QuantData, ref_logits: np.ndarray,
            res: GateResult, nodes: list[str], wall_s: float, calibrated_s: float | None) -> dict:
    """The stage section: the gate's figures, every attempt, the ranking, where the time went."""
    chosen = res.passed or best_of(res.attempts, cfg)
    return {
        "status": "ok" if res.passed else "failed", "passed": res.passed is not None, "config": asdict(cfg),
        "calibration": {"images": len(data.calibration), "of_train_images": data.train_images, "split": "train",
                        "method": cfg.method if cfg.format == "onnx_int8" else "nncf", "seed": cfg.seed,
                        "source": data.source,
                        "calibration_s": round(calibrated_s or 0.0, 2)},
        "gate": {"max_drop_pt": cfg.max_drop, "min_agreement": cfg.min_agreement,
                 "fp32_accuracy": top1(ref_logits, data.val_labels), "int8_accuracy": chosen.accuracy, "int8_images": chosen.images,
                 "fp32_accuracy_on_those": chosen.fp32_accuracy,
                 "drop_pt": round(chosen.drop_pt, 4), "top1_agreement_vs_fp32": chosen.agreement,
                 "val_images": int(len(data.val_labels)), "steps": res.steps},
        "attempts": [a.record() for a in res.attempts], "ranking": res.ranking[:32],
        "ranking_images": res.ranked_images, "ranking_s": round(res.ranking_s, 1),
        "quantizable_nodes": len(nodes), "harmful_nodes": res.harmful, "kept_float": chosen.kept_float, "wall_s": round(wall_s, 1),
        # of them (OpenVINO's kept_float also names layers NNCF left float, which are not among `nodes`)
        "kept_float_quantizable": len(set(chosen.kept_float) & set(nodes)),
        "stopped": None if res.passed else res.stopped, "input": {"format": ref_format, "sha256": ref_record["sha256"],
                                                                  **weights_digest(ref_record)},
    }

