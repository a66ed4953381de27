"""How often the CPU's bf16 weight gradient of a convolution is not finite, by the shape of its input map.

One Conv2d at a time, a batch of 65 random images per step, the forward in bf16 autocast (as `cnnpack train` runs on
a CPU with native bf16), the loss in fp32; a step counts when any entry of the weight's gradient is NaN or infinite. The
case that made resnet18 at 16 px diverge (its layer4.0.conv1: 3x3, stride 2, padding 1 over a 1x1 map) beside the
same convolution over larger maps, at stride 1, in fp32 and with no padding: which cnnpack.models.
strided_convs_on_one_pixel names, and which it does not. The cases take turns, --rounds times: how often it
happens varies from one process and allocation history to the next (a NaN gradient where the input is padding
looks like memory read uninitialized), so one count alone says little. --busy N runs N busy loops beside it, as
a loaded CI host does: on a Zen 4 the NaN came only then.

    .venv/bin/python benchmarks/bf16_conv_grad.py --steps 300 --rounds 3 [--alone] [--busy 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
# (input map, kernel, stride, padding, bf16, channels in, out)
CASES = [(1, 3, 2, 1, True, 256, 512), (1, 3, 2, 1, True, 512, 512), (1, 5, 2, 2, True, 256, 512),
         (1, 3, 1, 1, True, 256, 512), (1, 1, 2, 0, True, 256, 512), (1, 3, 2, 1, False, 256, 512),
         (2, 3, 2, 1, True, 256, 512), (4, 3, 2, 1, True, 256, 512), (8, 3, 2, 1, True, 256, 512)]


def trial(hw: int, k: int, stride: int, pad: int, bf16: bool, cin: int, cout: int, steps: int) -> int:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=False)
    bad = 0
    for _ in range(steps):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(torch.randn(65, cin, hw, hw))
        y.float().sum().backward()
        bad += not bool(conv.weight.grad.isfinite().all())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300, help="steps per case and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--alone", action="store_true", help="only resnet18's case (the first), every round: no other "
                    "case's allocations between its steps")
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes to run beside it (a loaded host)")
    ap.add_argument("--out", help="output path without .md/.json (default: results/bf16-conv-grad-<the host's ISA>)")
    a = ap.parse_args()
    from cnnpack.host import cpu_name
    from cnnpack.peak import cpu_info, isa_tag

    rows = [{"map": f"{hw}x{hw}", "conv": f"Conv2d({cin}, {cout}, {k}, stride={s}, padding={p})",
             "precision": "bf16 autocast" if bf16 else "fp32", "steps": a.steps, "not_finite": []}
            for hw, k, s, p, bf16, cin, cout in CASES[:1 if a.alone else None]]
    busy = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(a.busy)]
    try:
        for r in range(a.rounds):
            for case, row in zip(CASES, rows):  # (only the first with --alone)
                row["not_finite"].append(trial(*case, a.steps))
                print(r + 1, row, flush=True)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    lines = ["# The CPU's bf16 weight gradient of a convolution, by its input map", "",
             "Steps whose weight gradient held a NaN or infinite entry (batch 65, random inputs; the forward in bf16 "
             "autocast as `cnnpack train` runs on a CPU with native bf16).", "",
             f"| input map | convolution | precision | steps per round | not finite, each of {a.rounds} rounds | all |",
             "|---|---|---|--:|--:|--:|"]
    lines += [f"| {r['map']} | {r['conv']} | {r['precision']} | {r['steps']} | {', '.join(map(str, r['not_finite']))} "
              f"| **{sum(r['not_finite'])} of {r['steps'] * a.rounds}** |" for r in rows]
    flags = [f for f in cpu_info()["flags"] if f.startswith(("avx512_bf16", "avx512_vnni", "amx"))]
    lines += ["", f"Machine: {cpu_name()} (flags: {', '.join(flags) or 'none of avx512_bf16, avx512_vnni, amx'}), "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads"
              + (f", {a.busy} busy-loop processes beside it (a loaded host)." if a.busy else ", the host quiet."), "",
              f"Reproduce: `.venv/bin/python benchmarks/bf16_conv_grad.py --steps {a.steps} --rounds {a.rounds}"
              f"{' --alone' if a.alone else ''}{f' --busy {a.busy}' if a.busy else ''}`"]
    a.out = a.out or str(HERE / "results" / f"bf16-conv-grad-{isa_tag()}{'-alone' if a.alone else ''}{f'-busy{a.busy}' if a.busy else ''}")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    Path(a.out + ".json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
