"""How many of bf16's top-1 disagreements with eager are ties: images where eager's two classes lie within one bf16
step (2^-7 x the image's largest |logit|), so rounding decides which wins (cnnpack.contracts.TIE_EPS).

For each run given (default: a fresh `cnnpack pipeline --epochs E` of the built-in data for each E in --epochs), the
run's OpenVINO IR in the openvino-bf16 runtime against eager over its validation split: the disagreements, those on
ties, the eager margin of each, and the agreement with and without the ties. Needs a CPU with native bf16 and the
openvino extra. Without run directories, each epoch count gets `cnnpack train --epochs E` and `cnnpack export
--format onnx,openvino` of the built-in data.

    .venv/bin/python benchmarks/bf16_ties.py --epochs 2 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def measure(run_dir: str) -> dict:
    from cnnpack.contracts import TIE_EPS, task_stats
    from cnnpack.host import exact_fp32
    from cnnpack.rundir import Run
    from cnnpack.runtimes import RUNTIMES, artifact_ref, predict_split
    from cnnpack.verify import VerifyConfig, _load_file, _validation

    run = Run.open(run_dir)
    with exact_fp32("cpu"):
        eager = RUNTIMES.get("eager").load(artifact_ref(run, "checkpoint"), "cpu")
        val = _validation(run, VerifyConfig(), eager)
        got = predict_split(_load_file("openvino-bf16", artifact_ref(run, "openvino"), "cpu"), val.images, 64)
    w, g = val.eager_logits.astype(np.float64), got.astype(np.float64)
    pred, ref, rows = g.argmax(1), w.argmax(1), np.arange(len(w))
    scale = np.abs(w).max(1)
    top2 = np.sort(w, 1)[:, -2:]
    task = task_stats(got, val.eager_logits, val.labels, TIE_EPS["bf16"])
    return {"run": run_dir, "eager_accuracy": task["eager_accuracy"], "images": task["images"],
            "max_abs_err": float(np.abs(g - w).max()),
            "disagreements": task["top1_disagreements"], "on_ties": task["top1_tie_disagreements"],
            "tied_images": int((top2[:, 1] - top2[:, 0] < TIE_EPS["bf16"] * scale).sum()),
            "agreement": task["top1_agreement"], "agreement_gated": task["top1_agreement_gated"],
            "margins_in_steps": sorted(round(float((w[i, ref[i]] - w[i, pred[i]]) / (TIE_EPS["bf16"] * scale[i])), 3)
                                       for i in rows[pred != ref])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="*", help="run directories with an openvino export (default: fresh runs, --epochs)")
    ap.add_argument("--epochs", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--out", help="output path without .md/.json (default: results/bf16-ties-<the host's ISA>)")
    a = ap.parse_args()
    from cnnpack.host import cpu_name
    from cnnpack.openvino import has_bf16
    from cnnpack.peak import cpu_info, isa_tag

    if not has_bf16():
        sys.exit("this CPU has no native bf16 (AVX-512 BF16 or AMX): the openvino-bf16 runtime does not run here")
    runs, tmp = list(a.runs), tempfile.mkdtemp(prefix="bf16-ties-")
    for e in [] if runs else a.epochs:
        run = f"{tmp}/shapes-{e}-epochs"
        for cmd in (["train", "--epochs", str(e)], ["export", "--format", "onnx,openvino"]):
            subprocess.run([sys.executable, "-m", "cnnpack", *cmd, "--run", run], check=True, capture_output=True)
        runs.append(run)
    out = [measure(r) for r in runs]
    lines = ["# bf16's top-1 disagreements with eager, and how many are ties", "",
             "A tie: eager's two classes lie within one bf16 step (2^-7 x the image's largest |eager logit|); the "
             "agreement gate does not count a disagreement there (`cnnpack.contracts.TIE_EPS`).", "",
             "| run | eager top-1 | max abs err | differ | of them ties | tied images | agreement | gated | "
             "margins of those that differ (bf16 steps) |", "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    lines += [f"| {Path(r['run']).name} | {100 * r['eager_accuracy']:.2f}% | {r['max_abs_err']:.2e} | "
              f"{r['disagreements']} of {r['images']} | {r['on_ties']} | {r['tied_images']} | "
              f"{100 * r['agreement']:.2f}% | {100 * r['agreement_gated']:.2f}% | "
              f"{', '.join(f'{m:g}' for m in r['margins_in_steps']) or '–'} |" for r in out]
    flags = [f for f in cpu_info()["flags"] if f.startswith(("avx512_bf16", "avx512_vnni", "amx"))]
    lines += ["", f"Machine: {cpu_name()} (flags: {', '.join(flags)}).", "", "Reproduce: `.venv/bin/python benchmarks/bf16_ties.py "
              f"{'--epochs ' + ' '.join(map(str, a.epochs)) if not a.runs else ' '.join(a.runs)}`"]
    a.out = a.out or str(HERE / "results" / f"bf16-ties-{isa_tag()}")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    Path(a.out + ".json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
