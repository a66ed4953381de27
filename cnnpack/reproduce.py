"""export/reproduce.sh: the exact command that made each recorded artifact, runnable from any folder.

`cnnpack export` writes it after each artifact, `cnnpack quantize` after each int8 one (a derived artifact records its
own command; an exported one, its config, from which `export_command` says the command).
"""

from __future__ import annotations

import os
import shlex

from cnnpack.atomic import atomic_write_text
from cnnpack.rundir import Run, identity


def export_command(run: Run, fmt: str, cfg: dict) -> str:
    """The exact `cnnpack export` command that re-creates one artifact from its recorded config."""
    args = ["cnnpack", "export", "--run", str(run.path), "--format", fmt, "--exporter", cfg["exporter"],
            "--opset", str(cfg["opset"]), "--max-batch-size", str(cfg["max_batch_size"]),
            "--torchscript-mode", cfg["torchscript_mode"], "--input", cfg["input"], "--device", cfg["device"]]
    args += ["--static-batch", str(cfg["static_batch"])] if cfg.get("static_batch") else []
    args += ["--simplify"] if cfg.get("simplify") else []
    args += ["--half"] if cfg.get("half") else []
    return " ".join(shlex.quote(a) for a in args)


def _on_this_run(command: str) -> str:
    """A recorded command with its `--run PATH` (as typed, maybe relative) replaced by the script's "$RUN"."""
    args: list[str | None] = list(shlex.split(command))
    if "--run" in args:
        args[args.index("--run") + 1] = None
    return " ".join('"$RUN"' if a is None else shlex.quote(a) for a in args)


def _same_bytes(path: str, digest: str) -> str:
    """A script line that stops it where a re-created source is not the file a derived artifact was made from (the
    IR's recorded options are its own command's: an earlier ONNX export with another --opset is not re-created)."""
    return (f'[ "$(sha256sum "$RUN"/{shlex.quote(path)} | cut -d" " -f1)" = {digest} ] || {{ echo "reproduce.sh: '
            f'{path} came back with other bytes than the file the artifacts below were made from (sha256 {digest[:12]}'
            f'...): its options are not recorded; stopping" >&2; exit 1; }}')


def write_reproduce_or_warn(run: Run) -> None:
    """`write_reproduce` after an artifact was put in place and recorded: a script that cannot be written (a folder
    in its place, a full disk) is a warning, not the command's failure (it said exit 2 over a recorded model)."""
    import logging

    from cnnpack.errors import file_error

    try:
        write_reproduce(run)
    except OSError as e:
        logging.getLogger("cnnpack").warning(
            f"warning: {file_error(e) if e.filename else e}: export/reproduce.sh was not updated (what is written and "
            "recorded stands; the next export or quantize writes it again)")


def write_reproduce(run: Run) -> None:
    """export/reproduce.sh: the command that made each recorded artifact (a derived one records its own).

    A derived artifact (the OpenVINO IR, an int8 model) is made from the file its `source` names as it was then.
    Where that file was exported again since (`--input normalized`, a static batch), the script runs the
    derived one's commands first: the IR's after re-creating its ONNX source with the IR's own export options;
    an int8 model, whose source's options are not recorded, is named as not re-creatable here rather than
    quantized from another file (the script stopped at the IR's line, or quantized the new ONNX file)."""
    m = run.read()
    if run.opened_as not in (None, identity(m)):  # replaced since the command opened it: not this command's script
        return
    arts = m["stages"]["export"]["artifacts"]

    def made(fmt: str, rec: dict) -> str:
        return _on_this_run(rec.get("command") or export_command(run, fmt, rec["config"]))

    def head(fmt: str, rec: dict) -> str:
        return f"# {fmt}: {rec['path']} (sha256 {rec['sha256'][:12]}...)" + (
            ": the same model, not the same bytes (torch writes a random serialization id and generated kernel "
            "names into a package; `cnnpack verify` checks what it computes)" if fmt == "pt2" else "")

    def stale(rec: dict) -> dict:  # the source a derived artifact was made from, where it is no longer that file
        src = rec.get("source") or {}
        return src if src and (arts.get(src.get("format")) or {}).get("sha256") != src.get("sha256") else {}

    first: dict[str, list[str]] = {}  # an earlier source re-created (by its sha256): the lines made from it
    for fmt, rec in arts.items():
        src = stale(rec)
        if fmt == "openvino" and src.get("format") in arts and rec.get("config") and not rec.get("command"):
            first.setdefault(src.get("sha256"), []).append(
                f"{head(fmt, rec)}, converted from an earlier {src['format']} export (sha256 "
                f"{src.get('sha256', '')[:12]}...), re-created first with the IR's own options\n"
                f"{_on_this_run(export_command(run, src['format'], rec['config']))}\n"
                f"{_same_bytes(arts[src['format']]['path'], src.get('sha256', ''))}\n{made(fmt, rec)}")
    lines = []
    for fmt, rec in arts.items():
        src = stale(rec)
        if not src:
            lines.append(f"{head(fmt, rec)}\n{made(fmt, rec)}")
        elif src.get("sha256") in first and fmt != "openvino":  # made from the file the IR's block re-creates
            first[src["sha256"]].append(f"{head(fmt, rec)}, from that earlier {src['format']} export\n{made(fmt, rec)}")
        elif fmt != "openvino" or src.get("sha256") not in first:
            lines.append(f"{head(fmt, rec)}\n# made from an earlier {src.get('path') or src.get('format')} (sha256 "
                         f"{src.get('sha256', '')[:12]}...), exported again since with options this run does not "
                         f"record: not re-created here")
    first_lines = [line for block in first.values() for line in block]
    script = run.file("export/reproduce.sh")
    atomic_write_text(script, "#!/usr/bin/env bash\n# Re-creates the artifacts of this run exactly as they were made.\n"
                      "set -euo pipefail\n"
                      "RUN=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")/..\" && pwd)\"  # the run holding this script, "
                      "from any folder (and in a copy, the copy)\n" + "\n".join(first_lines + lines) + "\n")
    os.chmod(script, 0o755)
