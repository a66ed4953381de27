"""The `cnnpack` command line: parse options, build a config, call one library function, print.

Heavy libraries (torch, onnxruntime, tritonclient) are imported inside the commands, so
`cnnpack --help` answers at once. What the commands share is in `cnnpack.cli.common`.
"""

from __future__ import annotations

import sys

# Each command lives in its own module and registers itself on `app` when imported.
from cnnpack.cli import (  # noqa: F401,I001,E501
    bench_cmd,
    deploy_cmd,
    export_cmd,
    infer_cmd,
    pipeline_cmd,
    quantize_cmd,
    report_cmd,
    serve_cmd,
    train_cmd,
    triton_cmd,
    tune_cmd,
    verify_cmd,
)
from cnnpack.cli.common import app, print_error


def repeated_option(argv: list[str]) -> str | None:
    """The first long option given twice before `--`, or None: click keeps the last value of a repeated option and
    drops the others without a word (`export --format onnx --format torchscript` exported TorchScript alone)."""
    seen: set[str] = set()
    for token in argv:
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            name = token.split("=", 1)[0]
            if name in seen:
                return name
            seen.add(name)
    return None


def main() -> None:
    """Console-script entry point."""
    if name := repeated_option(sys.argv[1:]):
        print_error(f"{name} is given more than once: give it once (where it takes a list, as one comma list)")
        sys.exit(2)
    # No global warning filter: PYTHONWARNINGS set here would come too late for this process (Python reads
    # it at start-up) and would only silence tritonserver's Python backends; the few noisy library calls
    # (TorchScript/ONNX export, torch.jit.load) filter their own warnings where they are made.
    try:
        app()
    except BrokenPipeError:  # `cnnpack ... | head`
        sys.exit(0)
