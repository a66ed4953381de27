"""export/reproduce.sh: the exact command that made each recorded artifact, runnable from any folder.

`cnnpack export` writes it after each artifact, `cnnpack quantize` after each int8 one (a derived artifact records its
own command; an exported one, its config, from which `export_command` says the command).
"""

from __future__ import annotations

import os
import shlex

from cnnpack.rundir import Run, atomic_write_text, identity


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


def write_reproduce(run: Run) -> None:
    """export/reproduce.sh: the command that made each recorded artifact (a derived one records its own)."""
    m = run.read()
    if run.opened_as not in (None, identity(m)):  # replaced since the command opened it: not this command's script
        return
    arts = m["stages"]["export"]["artifacts"]
    lines = [f"# {fmt}: {rec['path']} (sha256 {rec['sha256'][:12]}...)\n"
             f"{_on_this_run(rec.get('command') or export_command(run, fmt, rec['config']))}" for fmt, rec in arts.items()]
    script = run.file("export/reproduce.sh")
    atomic_write_text(script, "#!/usr/bin/env bash\n# Re-creates the artifacts of this run exactly as they were made.\n"
                      "set -euo pipefail\n"
                      "RUN=\"$(cd \"$(dirname \"${BASH_SOURCE[0]}\")/..\" && pwd)\"  # the run holding this script, "
                      "from any folder (and in a copy, the copy)\n" + "\n".join(lines) + "\n")
    os.chmod(script, 0o755)
