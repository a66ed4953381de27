"""The pt2 package as cnnpack compiles it now (freezing, OpenMP threads at run time, size-oblivious guards, no lower
bound: cnnpack.pt2.compile_package) against freezing alone (cnnpack's settings before 2026-12-07), on a run's
checkpoint: p50 per call at batch 1, 15 and 32 in interleaved rounds in one process, and the new package's error
against eager. Prints its findings; the record under results/ is this output with the machine named.

    .venv/bin/python benchmarks/pt2_settings.py runs/pipeline-shapes-cnn-64px
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

from cnnpack import pt2
from cnnpack.artifacts import artifact_ref
from cnnpack.rundir import Run
from cnnpack.runtimes import EagerRuntime

ROUNDS = 5
BATCHES = (1, 15, 32)


def p50_ms(model, x: torch.Tensor, calls: int) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[calls // 2]


def main() -> None:
    torch.set_num_threads(2)
    run = Run.open(sys.argv[1])
    model, _, _ = EagerRuntime.build(artifact_ref(run, "checkpoint"))
    size = run.model_spec["image_size"]
    program = pt2.capture(model, torch.rand(2, 3, size, size) * 255, max_batch=64)
    with tempfile.TemporaryDirectory() as tmp:
        before, after = Path(tmp, "before.pt2"), Path(tmp, "after.pt2")
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=str(before),
                                                     inductor_configs={"freezing": True})
        pt2.compile_package(program, after, metadata={})
        packages = {"before": torch._inductor.aoti_load_package(str(before)),
                    "after": torch._inductor.aoti_load_package(str(after))}
        xs = {b: torch.rand(b, 3, size, size) * 255 for b in BATCHES}
        rounds = []
        with torch.inference_mode():
            for _ in range(ROUNDS):
                rounds.append({(n, b): p50_ms(m, xs[b], 300 if b == 1 else 40)
                               for n, m in packages.items() for b in BATCHES})
            for b in BATCHES:
                ratios = sorted(r[("before", b)] / r[("after", b)] for r in rounds)
                err = float((packages["after"](xs[b]) - model(xs[b])).abs().max())
                print(f"batch {b}: before {min(r[('before', b)] for r in rounds):.3f} ms, after "
                      f"{min(r[('after', b)] for r in rounds):.3f} ms (best of {ROUNDS} rounds); before/after per "
                      f"round {[round(x, 2) for x in ratios]}; after vs eager max abs err {err:.1e}")


if __name__ == "__main__":
    main()
