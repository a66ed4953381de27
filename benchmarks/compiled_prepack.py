"""Probe: torch.compile (inductor, freezing) with and without the convolution weights' pre-pack, in a fresh process.

Freezing pre-packs convolution weights as mkldnn tensors, which inductor's FX graph cache cannot pickle ("Bypassing FX
Graph Cache because 'mkldnn tensors unpickleable'"), so every process compiles the frozen graph again: most of the
compiled runtime's share of `cnnpack bench`. This prints, for one variant, the first call at batch 1 and 32 (compile
included), the best mean latency of 7 x 30 calls after 20 warm-up calls, and inductor's cache counters:

    prepack     freezing as the compiled runtime uses it (cnnpack.runtimes.CompiledRuntime)
    noprepack   freezing with cpp.weight_prepack off (cacheable)
    nofreeze    no freezing (cacheable)

Run each variant in turn, twice (the second round reads the first's cache), as recorded in
results/compiled-prepack-cpu2-amx-emerald-rapids.md:

    for r in 1 2; do for m in prepack noprepack nofreeze; do .venv/bin/python benchmarks/compiled_prepack.py $m [r18]; done; done
"""

import sys
import time

import torch

from cnnpack.host import prepare_inductor
from cnnpack.models import CompactCNN

MODES = ("prepack", "noprepack", "nofreeze")


def main() -> None:
    prepare_inductor()
    from torch._dynamo.utils import counters
    from torch._inductor import config

    args = sys.argv[1:]
    if not args or args[0] not in MODES or args[1:] not in ([], ["r18"]):
        sys.exit(f"usage: compiled_prepack.py {{{'|'.join(MODES)}}} [r18]")
    mode, r18 = args[0], args[1:] == ["r18"]
    torch.set_num_threads(2)
    torch.manual_seed(0)
    if r18:
        import torchvision

        model, size = torchvision.models.resnet18(num_classes=6).eval(), 224
    else:
        model, size = CompactCNN(6).eval(), 64
    compiled = torch.compile(model, dynamic=False)
    patch = {"freezing": mode != "nofreeze"}
    if mode == "noprepack":
        patch["cpp.weight_prepack"] = False
    out = []
    for b in (1, 32):
        x = torch.randn(b, 3, size, size)
        t = time.perf_counter()
        with torch.inference_mode(), config.patch(patch):
            compiled(x)
        first = time.perf_counter() - t
        with torch.inference_mode():
            for _ in range(20):
                compiled(x)
            best = 1e9
            for _ in range(7):
                t = time.perf_counter()
                for _ in range(30):
                    compiled(x)
                best = min(best, (time.perf_counter() - t) / 30)
        out.append(f"b{b}: first {first:.2f}s, {best * 1e3:.3f} ms")
    print(mode, out, {k: v for k, v in counters["inductor"].items() if "cache" in k})


if __name__ == "__main__":
    main()
