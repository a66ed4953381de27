"""The README's install step, several ways, interleaved: which one a new user should copy.

Half of the README's main command on 2 cores is `pip install -e '.[serve]'` into a new venv (90-123 s on AMD EPYC
hosts), and its pip is the one `python3 -m venv` bundles (pip 23.2 with Python 3.11). Each round makes a new venv
at a path never used before for each variant, one after another, and times:

- `bundled`:  pip install -e '.[serve]'                                    (the venv's own pip)
- `upgraded`: pip install -U pip && pip install -e '.[serve]'              (pip from PyPI first)
- `no-compile`: pip install -U pip && pip install --no-compile -e '.[serve]' (no .pyc written at install), plus what
  that defers: the first import of what `cnnpack pipeline` imports, which then compiles those modules (timed as
  `first_import_s`, beside a second import as the warm reference).
- `parallel-compile`: the same install, then `python -m compileall -qq -j 0 .venv/lib` (the README's command since
  the record install-time-cpu2-avx512-parallel-compile): pip compiles on one core, compileall on every core, and the
  first import finds every module compiled. `--variants` picks some of them.

pip's log splits each install into resolving (index pages, downloads; up to "Created wheel for cnnpack") and
installing (unpacking and, unless --no-compile, byte-compiling). This user's caches are kept as they are, as on a
machine where pip ran before; PYTHONDONTWRITEBYTECODE is unset for the import timings (a new user's shell).

    .venv/bin/python benchmarks/install_time.py               # 2 rounds -> results/install-time-cpu2-<isa>.{json,md}
    .venv/bin/python benchmarks/install_time.py --variants upgraded,parallel-compile
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, pin_cores, save_json, save_md, timed, wait_for_quiet  # noqa: E402

from cnnpack.peak import cpu_info, isa_tag  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {
    "bundled": ("", "pip install -e '.[serve]'"),
    "upgraded": ("pip install -q -U pip", "pip install -e '.[serve]'"),
    "no-compile": ("pip install -q -U pip", "pip install --no-compile -e '.[serve]'"),
    # pip byte-compiles on one core; compileall on every core. Not `&&`: compileall exits 1 on a file this Python
    # cannot compile (torch ships one written for 3.12), which pip's own byte-compiling skips the same way
    "parallel-compile": ("pip install -q -U pip",
                         "pip install --no-compile -e '.[serve]' && { python -m compileall -qq -j 0 .venv/lib; true; }"),
}
# what `cnnpack pipeline` imports on its way (train, export, compile, quantize, serve's client)
IMPORTS = ("import torch, torchvision, onnx, onnxruntime, onnxscript, torch.onnx, torch._dynamo, "
           "torch._inductor.compile_fx, tritonclient.grpc, tritonclient.http, matplotlib.pyplot, "
           "cnnpack.cli, cnnpack.pipeline")
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d),(\d{3}) ")


def stamp(line: str) -> float:
    m = STAMP.match(line)
    return dt.datetime.fromisoformat(f"{m.group(1)}.{m.group(2)}").timestamp() if m else float("nan")


def phases(log: Path) -> dict:
    """Resolve (start to cnnpack's editable wheel built) and install (to "Successfully installed") from pip's log."""
    lines = log.read_text(errors="replace").splitlines()
    start = stamp(lines[0])
    built = next(stamp(x) for x in lines if "Created wheel for cnnpack" in x)
    done = next(stamp(x) for x in reversed(lines) if "Successfully installed" in x)
    return {"resolve_s": round(built - start, 1), "unpack_s": round(done - built, 1)}


def one(variant: str, cores: list[int]) -> dict:
    pre, install = VARIANTS[variant]
    work = Path(tempfile.mkdtemp(prefix=f"cnnpack-install-{variant}-"))
    try:
        clone = work / "cnnpack"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(ROOT)))
        venv = timed(["python3", "-m", "venv", ".venv"], cwd=clone, env=env, cores=cores)
        act = ". .venv/bin/activate && "
        pip_s = timed(["bash", "-c", act + pre], cwd=clone, env=env, cores=cores)["wall_s"] if pre else 0.0
        log = work / "pip.log"
        res = timed(["bash", "-c", act + install.replace("pip install", f"pip install --log {log}", 1)],
                    cwd=clone, env=env, cores=cores)
        pip_version = subprocess.run([str(clone / ".venv/bin/pip"), "--version"], capture_output=True,
                                     text=True).stdout.split()[1]
        row = {"variant": variant, "command": " && ".join(x for x in (pre.replace(" -q", ""), install) if x),
               "pip": pip_version, "venv_s": venv["wall_s"], "pip_upgrade_s": pip_s, "install_s": res["wall_s"],
               **phases(log), "others_cpu_s": res["others_cpu_s"]}
        imports = [timed([str(clone / ".venv/bin/python"), "-c", IMPORTS], cwd=clone, env=env, cores=cores)["wall_s"]
                   for _ in range(2)]
        row.update(first_import_s=imports[0], warm_import_s=imports[1])
        # what the user waits for before `cnnpack pipeline` runs warm: install, and what the first run compiles
        row["total_s"] = round(row["venv_s"] + pip_s + res["wall_s"] + imports[0] - imports[1], 1)
        return row
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write(result: dict) -> None:
    save_json(result["benchmark"], result)
    m = result["machine"]
    lines = [f"# The README's install step, {len(set(r['variant'] for r in result['rows']))} ways, {result['rounds_n']} "
             "interleaved rounds", "",
             "Each variant in a new venv at a path never used before, this user's pip cache as it was; "
             "`total` = venv + pip upgrade + install + (first import - warm import): what is paid before the "
             "pipeline's imports run warm.", "",
             "| round | variant | pip | pip upgrade (s) | install (s) | of it resolve | of it unpack (+ compile) | "
             "first import (s) | warm import (s) | total (s) | others' CPU (s) |",
             "|--:|--|--|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in result["rows"]:
        lines.append(f"| {r['round']} | {r['variant']} | {r['pip']} | {r['pip_upgrade_s']} | {r['install_s']} | "
                     f"{r['resolve_s']} | {r['unpack_s']} | {r['first_import_s']} | {r['warm_import_s']} | "
                     f"**{r['total_s']}** | {r['others_cpu_s']} |")
    shown = dict.fromkeys(r["variant"] for r in result["rows"])
    lines += ["", "Commands:", ""] + [f"- `{k}`: `{' && '.join(x for x in VARIANTS[k] if x)}`" for k in shown]
    lines += ["", f"Machine: {m['cpu']} (flags: {', '.join(result['flags'])}), {m['cores_visible']} cores, "
                  f"Python {result['python']}. {result['date']}; waited {result['waited_for_quiet_s']} s for quiet "
                  "cores first.", "", f"Reproduce: `{result['reproduce']}`", ""]
    save_md(result["benchmark"], "\n".join(lines))


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        sys.exit(f"--variants: choose from {', '.join(VARIANTS)}, got {args.variants!r}")
    if args.rounds < 1:
        sys.exit(f"--rounds must be >= 1, got {args.rounds}")
    if shutil.disk_usage(tempfile.gettempdir()).free < 10 * 2**30:
        sys.exit(f"less than 10 GiB free in {tempfile.gettempdir()}: a venv takes about 6 GiB")
    cores = pin_cores()
    waited = wait_for_quiet(cores, time.monotonic() + 600)
    rows = []
    for i in range(args.rounds):
        order = variants if i % 2 == 0 else list(reversed(variants))
        for v in order:
            rows.append({"round": i + 1, **one(v, cores)})
            r = rows[-1]
            print(f"round {i + 1} {v}: install {r['install_s']} s (resolve {r['resolve_s']}, unpack "
                  f"{r['unpack_s']}), first import {r['first_import_s']} s, total {r['total_s']} s", file=sys.stderr)
    write({"benchmark": f"install-time-cpu{len(cores)}-{isa_tag()}", "rounds_n": args.rounds,
           "reproduce": f".venv/bin/python benchmarks/install_time.py --rounds {args.rounds} --variants {','.join(variants)}",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(cores),
           "python": sys.version.split()[0], "flags": cpu_info()["flags"], "waited_for_quiet_s": waited,
           "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
