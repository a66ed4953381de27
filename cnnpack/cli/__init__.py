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
    """What to say of the first option given twice before `--` (under either of its names, or as both halves of an
    on/off pair), or None: click keeps the last value of a repeated option and drops the others without a word
    (`export --format onnx --format torchscript` exported TorchScript alone; `train --force --no-force` did not
    replace the run; `--run a --run-dir b` trained into b)."""
    names = _option_names(argv)
    seen: dict[str, str] = {}
    for token in argv:
        if token == "--":
            break
        if token.startswith("--") and len(token) > 2:
            given = token.split("=", 1)[0]
            key = names.get(given, given)
            if key not in seen:
                seen[key] = given
            elif seen[key] == given:
                return f"{given} is given more than once: give it once (where it takes a list, as one comma list)"
            else:
                return f"{seen[key]} and {given} set one option: give one of them"
    return None


def _option_names(argv: list[str]) -> dict[str, str]:
    """Each long name of the command's options (`--run` and `--run-dir`, `--force` and `--no-force`) -> its option."""
    import typer

    group = typer.main.get_command(app)
    command = next((group.commands.get(t) for t in argv if not t.startswith("-")), None)
    if command is None:
        return {}
    return {name: param.name for param in command.params for name in (*param.opts, *param.secondary_opts)}


def main() -> None:
    """Console-script entry point."""
    if said := repeated_option(sys.argv[1:]):
        print_error(said)
        sys.exit(2)
    # No global warning filter: PYTHONWARNINGS set here would come too late for this process (Python reads
    # it at start-up) and would only silence tritonserver's Python backends; the few noisy library calls
    # (TorchScript/ONNX export, torch.jit.load) filter their own warnings where they are made.
    try:
        app()
    except BrokenPipeError:  # `cnnpack ... | head`
        sys.exit(0)
