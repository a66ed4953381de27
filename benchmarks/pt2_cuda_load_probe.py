"""Where AOTInductor for CUDA crashes, in plain torch (no cnnpack): export resnet18 with a dynamic batch, compile
it with `aoti_compile_and_package`, load it with `aoti_load_package`, run it; each phase printed as it ends.

Usage: python benchmarks/pt2_cuda_load_probe.py VARIANT OUT_DIR   (VARIANT: any name; containing "freeze": inductor
freezing on; "bytes": the package written to a BytesIO, as cnnpack does; "vecisa": cnnpack's prepare_inductor setting).
DEV=cpu runs it on the CPU. On the H200 of results/gpu-check-h200.md (torch 2.11) both variants tried compiled, then
crashed with SIGSEGV in aoti_load_package.
"""

import faulthandler
import io
import os
import sys
import time

import torch
import torchvision


def say(variant: str, *what) -> None:
    print(f"[{variant} {time.strftime('%T')}]", *what, flush=True)


def main(variant: str, out: str) -> None:
    faulthandler.enable()
    dev = os.environ.get("DEV", "cuda")
    model = torchvision.models.resnet18(num_classes=6).eval().to(dev)
    x = torch.rand(2, 3, 224, 224, device=dev)
    batch = torch.export.Dim("batch", min=1, max=64)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    say(variant, "exported")
    if "vecisa" in variant:
        from torch._inductor import config

        config.cpp.vec_isa_ok = True
    path = os.path.join(out, f"{variant}.pt2")
    target = io.BytesIO() if "bytes" in variant else path
    t0 = time.time()
    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(program, package_path=target,
                                                 inductor_configs={"freezing": True} if "freeze" in variant else {})
    say(variant, f"compiled in {time.time() - t0:.1f} s")
    if isinstance(target, io.BytesIO):
        with open(path, "wb") as f:
            f.write(target.getvalue())
    runner = torch._inductor.aoti_load_package(path)
    say(variant, "loaded")
    with torch.inference_mode():
        y = runner(x)
        say(variant, "ran", tuple(y.shape), "max abs err vs eager", float((y - model(x)).abs().max()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
