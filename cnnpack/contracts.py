"""The contract each precision is held to, the statistics verify compares a target with eager by, and the per-format
summary of the verdicts (`stages.verify.formats`) that tune, deploy and the report read.

fp32: the configured tolerances; fp16 and bf16: relative floors that grow with the logits' size;
int8: task parity only (top-1 agreement and drop), its tensor error reported beside it (DESIGN §2).
An element passes if |a - b| <= atol or |a - b| <= rtol * |b|, b being eager's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from cnnpack.errors import UserInputError

if TYPE_CHECKING:
    from cnnpack.verify import VerifyConfig

# fp16 artifacts: a 10-bit mantissa (relative step ~1e-3) rounded through every layer; the absolute error of a
# logit grows with the logits' size, so atol is FP16_ATOL x the largest |eager logit| (at least FP16_ATOL)
FP16_ATOL, FP16_RTOL, FP16_MIN_AGREEMENT = 1e-2, 1e-2, 0.995
# bf16 inference (8 significant bits, rounding step 2^-8 relative, fp32 accumulation in OpenVINO's kernels): the
# error of a logit grows with the logits' size and the depth; atol BF16_ATOL x max |eager logit|, rtol BF16_RTOL,
# agreement as for fp16. Measured on the built-in cnn@32: max abs err 0.2 % of the largest logit (2.4e-2 of 12).
BF16_ATOL, BF16_RTOL, BF16_MIN_AGREEMENT = 2e-2, 5e-2, 0.995
# int8 artifacts: task parity (DESIGN §2); their tensor error is reported, not gated
INT8_MIN_AGREEMENT, INT8_MAX_DROP_PT = 0.99, 0.5
# A tie: an image whose eager logits for two classes lie closer than one step of the target's precision at that image's
# scale (machine epsilon x its largest |eager logit|). A number format cannot order two values that close: which of the
# two wins there is rounding, not the model. A disagreement on such a tie is reported, not counted against the agreement
# gate (measured: a 2-epoch built-in cnn, top-1 52 %, in OpenVINO bf16: 6 of 900 images differ, 5 of them within one
# bf16 step; 11 of the 900 are ties at all; benchmarks/results/bf16-ties-avx512.md). int8 keeps the quantize gate's
# count.
TIE_EPS = {"fp32": 2.0 ** -23, "fp16": 2.0 ** -10, "bf16": 2.0 ** -7}


@dataclass(frozen=True)
class Tolerance:
    """What one target is held to."""

    atol: float
    rtol: float
    min_agreement: float
    basis: str  # why these values, for verify.json
    contract: str = "fp32"  # the precision contract applied
    tensor_gated: bool = True  # int8: tensor error reported, not a failure
    max_drop_pt: float | None = None  # int8: the largest top-1 drop against eager, percentage points
    tie_eps: float | None = None  # a disagreement within this x the image's largest |logit| is a tie (TIE_EPS)


def gate_damage(max_drop_pt, gate_agreement) -> str | None:
    """What is wrong with a recorded quantize gate's figures (not numbers, negative, an agreement above 1), or None.
    A drop above 100 points is no damage: quantize took any drop >= 0 before it capped --max-drop at 100."""
    for key, value, high in (("max_drop_pt", max_drop_pt, float("inf")), ("min_agreement", gate_agreement, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= high):
            return f"{key} {value!r}, expected a number from 0" + ("" if high == float("inf") else f" to {high}")
    return None


def int8_contract(given: float | None, max_drop_pt: float | None, gate_agreement: float | None) -> tuple[float, float, str]:
    """(top-1 agreement, top-1 drop in pt, whence the agreement) an int8 model is held to: the agreement `given`
    (--int8-min-agreement) where there is one, else its quantize gate's, else INT8_MIN_AGREEMENT; the gate's drop,
    else INT8_MAX_DROP_PT. Verify judges by it, and keeps an earlier int8 verdict only under it."""
    if why := gate_damage(max_drop_pt, gate_agreement):  # a manifest edited by hand: said, not a traceback
        raise UserInputError(f"the int8 artifact's recorded quantize gate is damaged ({why}); quantize it again "
                             "(`cnnpack quantize`)")
    drop = INT8_MAX_DROP_PT if max_drop_pt is None else max_drop_pt
    if given is not None:
        return given, drop, "as given"
    return (INT8_MIN_AGREEMENT, drop, "the default") if gate_agreement is None else (gate_agreement, drop,
                                                                                      "the quantize gate")


def tolerances(cfg: VerifyConfig, dtype: str, reference: np.ndarray, precision: str = "fp32",
               max_drop_pt: float | None = None, gate_agreement: float | None = None) -> Tolerance:
    """The contract of the target's precision. fp32: the config's tolerances. fp16: the fp16 floor (never
    tighter than the config): atol FP16_ATOL x max(1, max |eager logit|), rtol FP16_RTOL, top-1 agreement
    >= FP16_MIN_AGREEMENT. int8: task parity, top-1 agreement >= INT8_MIN_AGREEMENT and a top-1 drop
    against eager of at most the quantize gate; the tensor error is reported beside it. The int8 agreement is
    `cfg.int8_min_agreement` where given, else the artifact's quantize gate's (`gate_agreement`), else
    INT8_MIN_AGREEMENT: an int8 model is held to the gate it was made under, its drop and its agreement alike."""
    if precision == "int8":
        agree, drop, whence = int8_contract(cfg.int8_min_agreement, max_drop_pt, gate_agreement)
        return Tolerance(cfg.atol, cfg.rtol, agree,
                         f"int8 artifact: task parity, top-1 agreement >= {100 * agree:g}% ({whence}) and top-1 drop "
                         f"<= {drop:g} pt (the quantize gate); tensor error reported, not gated", "int8",
                         tensor_gated=False, max_drop_pt=drop)
    if precision == "bf16":
        scale = max(1.0, float(np.abs(reference[np.isfinite(reference)]).max(initial=0.0)))
        return Tolerance(max(cfg.atol, BF16_ATOL * scale), max(cfg.rtol, BF16_RTOL),
                         min(cfg.min_agreement, BF16_MIN_AGREEMENT),
                         f"bf16 inference: atol {BF16_ATOL:g} x max |eager logit| {scale:.3g}, rtol {BF16_RTOL:g}, "
                         f"top-1 agreement >= {BF16_MIN_AGREEMENT:.1%} (ties within one bf16 step not counted)", "bf16",
                         tie_eps=TIE_EPS["bf16"])
    if dtype != "float16" and precision != "fp16":
        return Tolerance(cfg.atol, cfg.rtol, cfg.min_agreement, "as configured (fp32)", tie_eps=TIE_EPS["fp32"])
    scale = max(1.0, float(np.abs(reference[np.isfinite(reference)]).max(initial=0.0)))
    return Tolerance(max(cfg.atol, FP16_ATOL * scale), max(cfg.rtol, FP16_RTOL),
                     min(cfg.min_agreement, FP16_MIN_AGREEMENT),
                     f"fp16 artifact: atol {FP16_ATOL:g} x max |eager logit| {scale:.3g}, rtol {FP16_RTOL:g}, "
                     f"top-1 agreement >= {FP16_MIN_AGREEMENT:.1%} (or the configured values where looser; ties within "
                     "one fp16 step not counted)", "fp16", tie_eps=TIE_EPS["fp16"])


# -- statistics ------------------------------------------------------------------------------
def tensor_stats(got: np.ndarray, want: np.ndarray, *, atol: float, rtol: float) -> dict:
    """Error statistics of outputs `got` against the reference `want`, both (N, K)."""
    g, w = got.astype(np.float64), want.astype(np.float64)
    nonfinite = int((~np.isfinite(g)).sum())
    both = np.isfinite(g) & np.isfinite(w)
    diff, mag = np.abs(g - w)[both], np.abs(w)[both]
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / mag)  # inf where eager is exactly 0 and the target is not
    outside = ~((diff <= atol) | (diff <= rtol * mag))
    return {
        "elements": int(g.size),
        "max_abs_err": float(diff.max(initial=0.0)),
        "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
        "p99_abs_err": float(np.percentile(diff, 99)) if diff.size else 0.0,
        "max_rel_err": _finite(rel.max(initial=0.0)),
        "cosine_sim_min": _cosine_min(g, w),
        "min_atol_to_pass": float(diff[rel > rtol].max(initial=0.0)),  # with rtol fixed
        "min_rtol_to_pass": _finite(rel[diff > atol].max(initial=0.0)),  # with atol fixed
        "outside_tolerance": int(outside.sum()) + nonfinite,
        "nonfinite": nonfinite,
    }


def _finite(x: float) -> float | None:
    """JSON has no Infinity: an infinite figure (relative to an exact zero) is recorded as null."""
    return float(x) if np.isfinite(x) else None


def _cosine_min(g: np.ndarray, w: np.ndarray) -> float | None:
    """The lowest cosine similarity between a target's and eager's logits for one image."""
    ok = np.isfinite(g).all(1) & np.isfinite(w).all(1)
    g, w = g[ok], w[ok]
    if not len(g):
        return None
    den = np.linalg.norm(g, axis=1) * np.linalg.norm(w, axis=1)
    cos = np.where(den > 0, (g * w).sum(1) / np.where(den > 0, den, 1.0), 1.0)
    return float(cos.min())


def task_stats(got: np.ndarray, want: np.ndarray, labels: np.ndarray, tie_eps: float | None = None) -> dict:
    """Top-1 accuracy of logits `got`, its delta to eager's `want`, and their top-1 agreement.

    With `tie_eps` (TIE_EPS of the target's precision), a disagreement where eager's logits for its class and the
    target's lie within tie_eps x the image's largest |eager logit| is a tie: `top1_agreement` counts it (the plain
    figure), `top1_agreement_gated` does not (what the agreement gate reads)."""
    pred, ref = got.argmax(1), want.argmax(1)
    acc, eager_acc = float((pred == labels).mean()), float((ref == labels).mean())
    differ = pred != ref
    out = {"images": int(len(labels)), "accuracy": acc, "eager_accuracy": eager_acc,
           "accuracy_delta": acc - eager_acc, "top1_agreement": float((~differ).mean()),
           "top1_disagreements": int(differ.sum())}
    if tie_eps is not None and len(labels):
        w = want.astype(np.float64)
        rows = np.arange(len(w))
        step = tie_eps * np.abs(np.where(np.isfinite(w), w, 0.0)).max(1)
        tied = differ & (w[rows, ref] - w[rows, pred] < step) & np.isfinite(got).all(1)  # NaN is never a tie
        out.update(top1_tie_disagreements=int(tied.sum()),
                   top1_agreement_gated=float(1 - (differ & ~tied).sum() / len(labels)))
    return out


def gated_agreement(task: dict) -> float:
    """The agreement the gate reads: without the disagreements on ties (task_stats), where they were told apart."""
    return task.get("top1_agreement_gated", task["top1_agreement"])


def _tol(x: float) -> str:
    return f"{x:.0e}" if float(f"{x:.0e}") == x else f"{x:.2e}"


def drop_within(drop_pt: float, max_drop_pt: float) -> bool:
    """Whether a top-1 drop holds a --max-drop: one equal to it does (1 image in 200 reads 0.5000000000000004 pt).
    verify's int8 contract and quantize's gate both judge by it."""
    return drop_pt <= max_drop_pt + 1e-9


def at_least(x: float) -> str:
    """`x` in two significant digits, rounded up: a tolerance printed as enough must be enough (1.24e-02 is 1.3e-02;
    rounded to nearest, 1.2e-02 still failed)."""
    import math

    if not x or not math.isfinite(x):
        return f"{x:.1e}"
    exp = math.floor(math.log10(abs(x)))
    mant = math.ceil(round(x / 10 ** (exp - 1), 9)) / 10  # round() drops float noise (1.2000000001 stays 1.2)
    if mant >= 10:
        mant, exp = mant / 10, exp + 1
    return f"{mant:.1f}e{exp:+03d}"


def failures(label: str, tensor: dict, task: dict | None, cfg: Tolerance | VerifyConfig) -> list[str]:
    """One line per failed check, naming the target, the check and the figure."""
    out = []
    if tensor["nonfinite"]:
        out.append(f"{label}: {tensor['nonfinite']} of {tensor['elements']} outputs are NaN/Inf (finite check)")
    if tensor["outside_tolerance"] > tensor["nonfinite"] and getattr(cfg, "tensor_gated", True):
        rtol_needed = tensor["min_rtol_to_pass"]
        out.append(f"{label}: max_abs_err {tensor['max_abs_err']:.1e} > atol {_tol(cfg.atol)} (tensor parity: "
                   f"{tensor['outside_tolerance']} of {tensor['elements']} logits outside atol {_tol(cfg.atol)} "
                   f"/ rtol {_tol(cfg.rtol)}; would pass with atol {at_least(tensor['min_atol_to_pass'])} or rtol "
                   f"{'inf' if rtol_needed is None else at_least(rtol_needed)})")
    if task and gated_agreement(task) < cfg.min_agreement:
        ties = task.get("top1_tie_disagreements", 0)
        tied = (f", {ties} more on ties within one {getattr(cfg, 'contract', 'fp32')} step (not counted)"
                if ties else "")
        out.append(f"{label}: top1_agreement {100 * gated_agreement(task):.2f}% < {100 * cfg.min_agreement:.2f}% "
                   f"(task parity: {task['top1_disagreements'] - ties} of {task['images']} validation images "
                   f"classified differently from eager{tied}; accuracy {100 * task['accuracy']:.2f}% vs eager "
                   f"{100 * task['eager_accuracy']:.2f}%)")
    drop = getattr(cfg, "max_drop_pt", None)
    if drop is not None and not task:  # an int8 contract is task parity: without labelled images nothing holds it
        out.append(f"{label}: the int8 contract is task parity, and there is no validation data to check it on "
                   "(a run made by `export --arch`): pass --data PATH|shapes")
    if task and drop is not None and not drop_within(-100 * task["accuracy_delta"], drop):
        out.append(f"{label}: top-1 drop {-100 * task['accuracy_delta']:.2f} pt > {drop:g} pt (int8 contract: "
                   f"accuracy {100 * task['accuracy']:.2f}% vs eager {100 * task['eager_accuracy']:.2f}%)")
    return out


def contract_line(tol: dict | None) -> str | None:
    """A target's contract in a few words, for tables (verify.json keeps the full basis)."""
    if not tol:
        return None
    agree = f"agreement >= {100 * tol['min_agreement']:g}%"
    if not tol.get("tensor_gated", True):
        return f"{tol.get('contract', 'int8')}: {agree}, top-1 drop <= {tol['max_drop_pt']:g} pt (tensor error reported)"
    # the tolerances as set (1e-04), or to two figures where scaled to the logits (bf16: 0.02 x the largest, 0.32)
    return f"{tol.get('contract', 'fp32')}: atol {_short(tol['atol'])}, rtol {_short(tol['rtol'])}, {agree}"


def _short(x: float) -> str:
    return f"{x:.0e}" if float(f"{x:.0e}") == x else f"{x:.2g}"


def by_format(results: list[dict]) -> dict:
    """`stages.verify.formats`: per format, `passed` over every runtime that ran it, and the worst figures of the
    runtimes of the artifact's own precision (none where only another precision's ran); a runtime of another
    precision (openvino-bf16 of an fp32 IR) only under `by_runtime`, so an fp32 line never carries bf16 figures."""
    out: dict[str, dict] = {}
    for fmt in dict.fromkeys(r["format"] for r in results):
        rows = [r for r in results if r["format"] == fmt]
        precision = rows[0].get("artifact_precision", rows[0].get("precision", "fp32"))
        own = [r for r in rows if r.get("precision", "fp32") == precision]
        tasks = [r["task"] for r in own if r["task"]]
        out[fmt] = {"max_abs_err": None if not own or any(r["tensor"] is None for r in own) else
                    max(r["tensor"]["max_abs_err"] for r in own),
                    **{k: min((t[k] for t in tasks), default=None) for k in ("top1_agreement", "accuracy")},
                    # an artifact no runtime of its own precision checked is not verified (tune and deploy read this)
                    "passed": bool(own) and all(r["passed"] for r in rows), "runtimes": [r["runtime"] for r in rows],
                    "precision": precision, "contract": next((contract_line(r.get("tolerance")) for r in own), None),
                    "by_runtime": {r["runtime"]: {
                        "precision": r.get("precision", "fp32"), "contract": contract_line(r.get("tolerance")),
                        "passed": r["passed"], "max_abs_err": r["tensor"]["max_abs_err"] if r["tensor"] else None,
                        **{k: (r["task"] or {}).get(k) for k in ("accuracy", "top1_agreement", "top1_tie_disagreements",
                                                                 "top1_agreement_gated")}} for r in rows}}
    return out
