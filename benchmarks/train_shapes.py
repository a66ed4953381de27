"""Benchmark: `cnnpack train` with no options, on the CPU, against the issue's target.

Target: >= 98 % validation top-1 on the built-in shapes data in <= 60 s wall for the whole
process on 2 CPU cores, with the dataset already in the cache. First-run dataset generation
is timed on its own, into a fresh temporary cache.

Each timed run is a fresh `cnnpack train` process (no options) started in an empty folder,
pinned to 2 cores and kept off any GPU; the clock covers the whole process (interpreter
start, imports, data loading, training, plots). Before each measurement the script waits (up
to --max-wait s in all) until the two cores are idle, and it records how much CPU time other
processes took on those cores while it measured: a run with other work on its cores is
marked as contended, because CPU training slows down far more than the stolen share.

    .venv/bin/python benchmarks/train_shapes.py            # writes benchmarks/results/train_shapes-cnn-64px-cpu2.*
    .venv/bin/python benchmarks/train_shapes.py --compare-amp --repeats 2
        # `cnnpack train` (bf16 autocast where the CPU has native bf16) against `cnnpack train --no-amp` (fp32), alternated
        # round by round: writes benchmarks/results/train-amp-cnn-64px-cpu2-<isa>.*
    .venv/bin/python benchmarks/train_shapes.py --compare-amp --force-bf16 --repeats 2
        # the same where the CPU has no AMX (AVX-512 BF16, AVX2): the amp run is told the CPU has amx_bf16, so it
        # trains in bf16 autocast as cnnpack would there: writes ...-<isa>-forced-bf16.*
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORES, child_env, cnnpack_cmd, machine, pin_cores, save_json, save_md, timed, wait_for_quiet  # noqa: E402

TARGET_ACC = 0.98
TARGET_WALL_S = 60.0
NAME = f"train_shapes-cnn-64px-cpu{CORES}"


def generation(tmp: Path, cores: list[int]) -> dict:
    """First run: drawing the dataset into an empty cache (the shapes code alone, no training)."""
    cache = tmp / "fresh-cache"
    code = "from cnnpack import shapes; print(shapes.materialise())"
    res = timed([sys.executable, "-c", code], cwd=tmp, env=child_env(str(cache)), cores=cores)
    root = Path(res.pop("stdout_tail")[0])
    files = list(root.rglob("*.png"))
    res.update(images=len(files), megabytes=round(sum(f.stat().st_size for f in files) / 2**20, 1),
               folder=root.name)
    shutil.rmtree(cache)
    return res


# `cnnpack` in a process whose CPU flag probe adds amx_bf16: training takes bf16 autocast as on an AMX host
FORCED_BF16 = ("import sys, cnnpack.host as h; probe = h.cpu_flags; "
               "h.cpu_flags = lambda cpuinfo=None: probe(cpuinfo) | {'amx_bf16'}; "
               "from cnnpack.cli import main; sys.argv[0] = 'cnnpack'; sys.exit(main())")


def train_run(tmp: Path, i: int, cores: list[int], extra: tuple[str, ...] = (), force_bf16: bool = False) -> dict:
    """`cnnpack train` with no options (but `extra`), from an empty folder (it creates runs/train-1 there);
    `force_bf16`: in a process that believes the CPU has amx_bf16."""
    cwd = tmp / f"run{i}"
    cwd.mkdir()
    cmd = [sys.executable, "-c", FORCED_BF16] if force_bf16 else cnnpack_cmd()
    res = timed(cmd + ["train", *extra], cwd=cwd, env=child_env(None), cores=cores)
    manifest = json.loads((cwd / "runs" / "train-1" / "cnnpack.json").read_text())
    t = manifest["stages"]["train"]
    res.update(best_val_acc=t["metrics"]["best_val_acc"], best_epoch=t["metrics"]["best_epoch"],
               epochs=t["metrics"]["epochs"], in_process_wall_s=t["metrics"]["wall_s"],
               train_images_per_s=t["metrics"]["train_images_per_s"], device=t["device"],
               autocast=t.get("autocast"),
               command=" ".join(["cnnpack train", *extra]) + (" (told the CPU has amx_bf16)" if force_bf16 else ""),
               val_images=t["data"]["val_images"], train_images=t["data"]["train_images"])
    res["passed"] = res["best_val_acc"] >= TARGET_ACC and res["wall_s"] <= TARGET_WALL_S
    del res["stdout_tail"]
    shutil.rmtree(cwd)
    return res


def write(result: dict) -> None:
    save_json(NAME, result)
    runs, gen, s, m = result["runs"], result["generation"], result["summary"], result["machine"]
    verdict = "met" if s["passed"] else "NOT met"
    lines = [
        f"# `cnnpack train` (no options) on {CORES} CPU cores",
        "",
        f"Target: val top-1 >= {100 * TARGET_ACC:.0f} % and <= {TARGET_WALL_S:.0f} s wall for the whole process, "
        f"dataset already cached. **{verdict}** (median wall {s['wall_s_median']} s, worst {s['wall_s_max']} s; "
        f"top-1 {100 * s['best_val_acc_min']:.2f} %).",
        "",
        "| run | wall (s) | CPU (s) | val top-1 | best epoch / epochs | train img/s | other processes' CPU (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(runs, 1):
        lines.append(f"| {i} | {r['wall_s']} | {r['cpu_s']} | {100 * r['best_val_acc']:.2f} % | "
                     f"{r['best_epoch']} / {r['epochs']} | {r['train_images_per_s']:.0f} | "
                     f"{r['others_cpu_s']}{' (contended)' if r['contended'] else ''} |")
    lines += [
        "",
        f"First-run dataset generation (fresh cache, {gen['images']} PNGs, {gen['megabytes']} MB): "
        f"**{gen['wall_s']} s** wall ({gen['cpu_s']} s CPU{', contended' if gen['contended'] else ''}), "
        "paid once per cache.",
        "",
    ]
    if result["contended_attempts"]:
        lines += [f"Attempts redone because other processes used the same cores: {len(result['contended_attempts'])} "
                  "(kept in the JSON as `contended_attempts`).", ""]
    if s["contended_runs"]:
        lines += [f"**{s['contended_runs']} of {len(runs)} runs shared their cores with other processes** "
                  f"(waited {result['waited_for_quiet_s']} s for idle cores, then measured anyway): "
                  "those times are not representative.", ""]
    lines += [
        f"Machine: {m['cpu']}, cores {m['cores_used']} of {m['cores_visible']}, torch {m['torch']}, "
        f"cnnpack {m['commit']}; 1-min load average {result['load_1min_start']} at start, "
        f"{result['load_1min_end']} at end. {result['date']}.",
        "",
        f"Measured command: `{result['command']}` (in an empty folder). Reproduce: `{result['reproduce']}`",
        "",
    ]
    save_md(NAME, "\n".join(lines))


def write_amp(result: dict) -> None:
    """The --compare-amp record: each round's two trainings, and the ratio of their medians."""
    save_json(result["benchmark"], result)
    s, m = result["summary"], result["machine"]
    amp = ("bf16 autocast, forced: the process is told the CPU has amx_bf16" if result.get("forced_bf16")
           else "bf16 autocast where the CPU has native bf16: AMX or AVX-512 BF16")
    lines = [f"# `cnnpack train` (amp: {amp}) against `cnnpack train --no-amp` "
             f"(fp32), {CORES} CPU cores", "",
             f"Alternated round by round, each a fresh process in an empty folder, the dataset cached. Median wall "
             f"**{s['amp']['wall_s_median']} s** against **{s['no-amp']['wall_s_median']} s** "
             f"(**{s['wall_ratio']}x** as fast); training images/s {s['amp']['images_per_s_median']:.0f} against "
             f"{s['no-amp']['images_per_s_median']:.0f} (**{s['images_per_s_ratio']}x**); lowest top-1 "
             f"{100 * s['amp']['best_val_acc_min']:.2f} % against {100 * s['no-amp']['best_val_acc_min']:.2f} %.", "",
             "| round | command | autocast | wall (s) | CPU (s) | val top-1 | best epoch / epochs | train img/s | "
             "other processes' CPU (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['round']} | `{r['command']}` | {r['autocast'] or 'none (fp32)'} | {r['wall_s']} | "
                     f"{r['cpu_s']} | {100 * r['best_val_acc']:.2f} % | {r['best_epoch']} / {r['epochs']} | "
                     f"{r['train_images_per_s']:.0f} | {r['others_cpu_s']}{' (contended)' if r['contended'] else ''} |")
    lines += ["", f"Machine: {m['cpu']} (flags: {', '.join(m['flags'])}), cores {m['cores_used']} of "
              f"{m['cores_visible']}, torch {m['torch']}, cnnpack {m['commit']}; 1-min load average "
              f"{result['load_1min_start']} at start, {result['load_1min_end']} at end; waited "
              f"{result['waited_for_quiet_s']} s for quiet cores. {result['date']}.", "",
              f"Reproduce: `{result['reproduce']}`", ""]
    save_md(result["benchmark"], "\n".join(lines))


def compare_amp(args, cores: list[int], deadline: float) -> int:
    from cnnpack import shapes
    from cnnpack.peak import cpu_info, isa_tag

    info = cpu_info()
    variants = (("amp", ()), ("no-amp", ("--no-amp",)))
    waited, load_start, runs = 0.0, round(os.getloadavg()[0], 2), []
    with tempfile.TemporaryDirectory(prefix="cnnpack-bench-") as tmp:
        shapes.materialise()
        for rnd in range(1, args.repeats + 1):
            for name, extra in (variants if rnd % 2 else variants[::-1]):  # each goes first in every other round
                waited += wait_for_quiet(cores, deadline)
                forced = args.force_bf16 and name == "amp"
                r = train_run(Path(tmp), len(runs), cores, extra, forced) | {"round": rnd, "variant": name}
                if forced and r["autocast"] != "bf16":
                    sys.exit(f"the forced amp run trained with autocast {r['autocast']}, not bf16")
                print(f"round {rnd} {name}: {r['wall_s']} s, {r['train_images_per_s']:.0f} img/s, top-1 "
                      f"{100 * r['best_val_acc']:.2f} %, others' CPU {r['others_cpu_s']} s", file=sys.stderr)
                runs.append(r)
    by = {name: [r for r in runs if r["variant"] == name] for name, _ in variants}
    med = {name: {"wall_s_median": round(statistics.median(r["wall_s"] for r in rs), 2),
                  "images_per_s_median": statistics.median(r["train_images_per_s"] for r in rs),
                  "best_val_acc_min": min(r["best_val_acc"] for r in rs)} for name, rs in by.items()}
    summary = {**med, "wall_ratio": round(med["no-amp"]["wall_s_median"] / med["amp"]["wall_s_median"], 2),
               "images_per_s_ratio": round(med["amp"]["images_per_s_median"] / med["no-amp"]["images_per_s_median"],
                                           2)}
    forced = "-forced-bf16" if args.force_bf16 else ""
    write_amp({"benchmark": f"train-amp-cnn-64px-cpu{CORES}-{isa_tag(info)}{forced}",
               "reproduce": f".venv/bin/python benchmarks/train_shapes.py --compare-amp"
                            f"{' --force-bf16' if forced else ''} --repeats {args.repeats}",
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "forced_bf16": bool(forced),
               "machine": machine(cores) | {"flags": info["flags"]}, "waited_for_quiet_s": round(waited, 1),
               "load_1min_start": load_start, "load_1min_end": round(os.getloadavg()[0], 2), "runs": runs,
               "summary": summary})
    print(json.dumps(summary), file=sys.stderr)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed training runs (fresh processes)")
    ap.add_argument("--max-wait", type=float, default=600, help="seconds to wait in all for idle cores")
    ap.add_argument("--compare-amp", action="store_true",
                    help="alternate `cnnpack train` and `cnnpack train --no-amp` (--repeats rounds of both)")
    ap.add_argument("--force-bf16", action="store_true",
                    help="with --compare-amp: the amp run trains in bf16 autocast whatever the CPU (it is told the "
                         "CPU has amx_bf16), to measure bf16 where cnnpack trains in fp32")
    args = ap.parse_args()
    cores = pin_cores()
    deadline = time.monotonic() + args.max_wait
    if args.force_bf16 and not args.compare_amp:
        ap.error("--force-bf16 goes with --compare-amp")
    if args.compare_amp:
        return compare_amp(args, cores, deadline)

    from cnnpack import shapes  # numpy + PIL only

    waited = 0.0
    load_start = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="cnnpack-bench-") as tmp:
        tmp = Path(tmp)
        waited += wait_for_quiet(cores, deadline)
        gen = generation(tmp, cores)
        print(f"dataset generation: {gen['wall_s']} s", file=sys.stderr)
        shapes.materialise()  # the default cache, as a user's second run finds it (untimed)
        runs, contended = [], []
        while len(runs) < args.repeats:
            waited += wait_for_quiet(cores, deadline)
            r = train_run(tmp, len(runs) + len(contended), cores)
            print(f"run: {r['wall_s']} s, top-1 {100 * r['best_val_acc']:.2f} %, "
                  f"others' CPU {r['others_cpu_s']} s", file=sys.stderr)
            # a run that shared its cores is kept aside and redone while there is time to wait
            (contended if r["contended"] and time.monotonic() < deadline else runs).append(r)
    walls = [r["wall_s"] for r in runs]
    summary = {"passed": all(r["passed"] for r in runs), "wall_s_median": round(statistics.median(walls), 2),
               "wall_s_max": max(walls), "best_val_acc_min": min(r["best_val_acc"] for r in runs),
               "contended_runs": sum(r["contended"] for r in runs)}
    write({"benchmark": NAME, "target": {"best_val_acc_min": TARGET_ACC, "wall_s_max": TARGET_WALL_S, "cores": CORES},
           "command": "cnnpack train", "reproduce": ".venv/bin/python benchmarks/train_shapes.py",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(cores), "waited_for_quiet_s": round(waited, 1),
           "load_1min_start": load_start, "load_1min_end": round(os.getloadavg()[0], 2),
           "generation": gen, "runs": runs, "contended_attempts": contended, "summary": summary})
    print(json.dumps(summary), file=sys.stderr)
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
