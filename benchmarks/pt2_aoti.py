"""Benchmark: pt2 packages (torch.export + AOTInductor) against eager PyTorch and fp32 ONNX Runtime (issue 20).

Two models: the built-in `cnn` at 64 px trained with `cnnpack train` defaults, and resnet18 @ 224 px with
random weights (`cnnpack export --arch resnet18`, the six shape classes: no downloads here).

1. Compile: `cnnpack export --format pt2` in a fresh process with an empty inductor cache
   (TORCHINDUCTOR_CACHE_DIR; cold: it also precompiles AOTInductor's headers), then once more with that
   cache (warm); compile_s from the manifest. The package's size against the model's weights.
2. Parity: `cnnpack verify --formats pt2` on the validation split (cnn: its own; resnet18: --data shapes,
   the built-in images drawn at 224 px).
3. Settings tried: packages compiled with one setting changed, each in its own process with a time limit
   (no freezing; max_autotune; dynamic OpenMP threads; a channels_last model), and the default package
   loaded with `run_single_threaded=True`.
4. Speed, in one process, --threads threads for every runtime: per model and batch size (1, 32),
   --rounds rounds; each visits eager, ONNX Runtime (cnnpack's fp32 session) and every package in a
   random order, 3 warm-up requests then one window of at least 1.5 s. A ratio is taken within a round
   (the shared host's drift hits both sides), the median over rounds is reported with its range.

Targets: pt2 parity (max abs err <= 1e-4, top-1 agreement 100 %) for both models; resnet18 compiles in
<= 45 s; the package within 10 % of the weights' size. Goals: aoti >= 1.3x eager at batch 1 and >= 0.9x
ONNX Runtime at batch 32 (resnet18).

    .venv/bin/python benchmarks/pt2_aoti.py --threads 2
        # writes benchmarks/results/pt2-aoti-cnn64-resnet18_224-cpu<C>-threads<T>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cnnpack.measure import WindowPolicy, measure
from cnnpack.peak import cpu_info
from cnnpack.rundir import Run, library_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLI, cnnpack, lscpu, save_json, save_md, wait_for_quiet  # noqa: E402

SHAPES = "circle,crescent,cross,square,star,triangle"  # the order of the class folders
POLICY = WindowPolicy(window_s=1.5, max_s=0.0, warmup_s=0.0, min_requests=3, stable_windows=1)
MAX_OTHERS, REDO = 0.10, 3  # a round in which others took more than 10 % of the CPU is measured again (3 times at most)
VARIANT_TIMEOUT_S = 900
# name -> (inductor configs, channels_last model); the first is what `cnnpack export` uses
VARIANTS = {
    "no freezing": ({}, False),
    "freezing + max_autotune": ({"freezing": True, "max_autotune": True}, False),
    "freezing + dynamic OpenMP threads": ({"freezing": True, "cpp.dynamic_threads": True}, False),
    "freezing, no layout optimization (NCHW activations)": ({"freezing": True, "layout_optimization": False}, False),
    "freezing, no oneDNN weight prepacking": ({"freezing": True, "cpp.weight_prepack": False}, False),
    "freezing, channels_last model (input converted per call)": ({"freezing": True}, True),
}
CHANNELS_LAST = "freezing, channels_last model (input converted per call)"
DEFAULT = "aoti (cnnpack: freezing)"
SINGLE = "aoti, run_single_threaded=True"
BOXED = "aoti, loader.boxed_run (no pytree per call)"


def artifacts(run: Path) -> dict:
    return Run.open(run).read().get("stages", {}).get("export", {}).get("artifacts", {}) \
        if (run / "cnnpack.json").is_file() else {}


def prepare(work: Path) -> dict[str, Path]:
    """cnn64 (trained with defaults) and resnet18_224 (random weights), each with its fp32 ONNX file."""
    cnn, r18 = work / "cnn64", work / "resnet18_224"
    if not (cnn / "checkpoint.pt").is_file():
        cnnpack("train", "--run", str(cnn), "--no-progress")
    if "onnx" not in artifacts(cnn):
        cnnpack("export", "--run", str(cnn), "--format", "onnx")
    if "onnx" not in artifacts(r18):
        cnnpack("export", "--arch", "resnet18", "--num-classes", "6", "--classes", SHAPES, "--image-size", "224",
                "--format", "onnx", "--run", str(r18), "--force")
    return {"cnn64": cnn, "resnet18_224": r18}


# -- 1. compile --------------------------------------------------------------------------------------------
def compile_times(run: Path) -> dict:
    """`cnnpack export --format pt2` with an empty inductor cache, then again with the same cache."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        for key in ("cold", "warm"):
            wall = cnnpack("export", "--run", str(run), "--format", "pt2", env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache})
            rec = artifacts(run)["pt2"]
            out[key] = {"compile_s": rec["compile_s"], "capture_s": rec["extra"]["capture_s"],
                        "process_wall_s": round(wall, 1)}
    rec = artifacts(run)["pt2"]
    out.update(package_mb=rec["extra"]["package_mb"], weights_mb=rec["extra"]["weights_mb"],
               package_over_weights=rec["extra"]["package_mb"] / rec["extra"]["weights_mb"],
               cpu_isa=rec["extra"]["cpu_isa"], torch_version=rec["torch_version"])
    return out


# -- 2. parity ---------------------------------------------------------------------------------------------
def parity(run: Path, data: str | None) -> dict:
    args = ["verify", "--run", str(run), "--formats", "pt2", "--json", "--no-progress"]
    proc = subprocess.run(CLI + args + (["--data", data] if data else []), capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(proc.stderr)
    (r,) = json.loads(proc.stdout)["results"]
    return {"max_abs_err": r["tensor"]["max_abs_err"], "top1_agreement": r["task"]["top1_agreement"],
            "images": r["task"]["images"], "passed": r["passed"], "batch_sizes": r["batch_sizes"]}


# -- 3. settings tried -------------------------------------------------------------------------------------
def compile_variant(run_dir: str, name: str, dest: str) -> None:
    """Child process: the run's model compiled with variant `name`; prints {compile_s} as JSON."""
    import torch

    from cnnpack import pt2
    from cnnpack.runtimes import ArtifactRef, EagerRuntime

    configs, channels_last = VARIANTS[name]
    run = Run.open(run_dir)
    model, _, _ = EagerRuntime.build(ArtifactRef(run, "checkpoint"), "cpu")
    size = run.model_spec["image_size"]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    program = pt2.capture(model, x, max_batch=64)
    seconds = pt2.compile_package(program, Path(dest), metadata={"variant": name}, configs=configs)
    print(json.dumps({"compile_s": round(seconds, 1)}))


def variants(run: Path, out: Path) -> dict[str, dict]:
    """Each variant's package (or why there is none): {name: {path, compile_s} | {error}}."""
    res = {}
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(VARIANTS):
        dest = out / f"variant{i}.pt2"
        print(f"  compiling {run.name}: {name}", flush=True)
        try:
            proc = subprocess.run([sys.executable, __file__, "--compile-variant", str(run), name, str(dest)],
                                  capture_output=True, text=True, timeout=VARIANT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            res[name] = {"error": f"not compiled within {VARIANT_TIMEOUT_S} s"}
            continue
        if proc.returncode:
            res[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
            continue
        res[name] = {"path": str(dest), **json.loads(proc.stdout.strip().splitlines()[-1])}
    return res


# -- 4. speed ------------------------------------------------------------------------------------------------
def _ticks() -> tuple[int, int, int]:
    cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(cpu) - cpu[3] - cpu[4], sum(cpu), int(own[11]) + int(own[12])


def others_share(a, b) -> float:
    return max(0.0, ((b[0] - a[0]) - (b[2] - a[2])) / max(1, b[1] - a[1]))


def runners(run: Path, packages: dict[str, dict], threads: int) -> dict:
    """name -> predict(x) for eager, ONNX Runtime, the cnnpack package and each variant package."""
    import torch

    from cnnpack.runtimes import load_runtime

    r = Run.open(run)
    fns = {"eager": load_runtime(r, "eager").predict,
           "onnxruntime (fp32)": load_runtime(r, "onnxruntime", threads=threads).predict,
           DEFAULT: load_runtime(r, "aoti").predict}
    default = str(run / "export/model.pt2")
    packages = {BOXED: torch._inductor.aoti_load_package(default),
                SINGLE: torch._inductor.aoti_load_package(default, run_single_threaded=True),
                **{n: torch._inductor.aoti_load_package(v["path"]) for n, v in packages.items() if "path" in v}}
    for name, compiled in packages.items():
        def predict(x, c=compiled, name=name):
            t = torch.from_numpy(x)
            with torch.inference_mode():
                if name == BOXED:
                    return c.loader.boxed_run([t])[0].numpy()
                if name == CHANNELS_LAST:  # compiled for channels_last strides: a client's NCHW batch converted
                    t = t.contiguous(memory_format=torch.channels_last)
                return c(t).numpy()
        fns[name] = predict
    return fns


def one_round(fns: dict, x: np.ndarray, rng: random.Random) -> tuple[dict[str, float], float]:
    """Median latency (ms) of each runner, visited in a random order; others' CPU share meanwhile."""
    order, t0, out = list(fns), _ticks(), {}
    rng.shuffle(order)
    for name in order:
        m = measure(lambda f=fns[name]: f(x), POLICY)
        out[name] = 1e3 * float(np.median(m.windows[-1].latencies_s))
    return out, others_share(t0, _ticks())


def rounds(fns: dict, x: np.ndarray, n: int, seed: int) -> tuple[dict[str, list[float]], list[float], int, dict]:
    """`n` rounds; a round during which other processes took more than MAX_OTHERS of the CPU is measured again
    (after waiting for idle cores, at most REDO times per round). Returns the kept rounds' latencies and
    others' shares, the number redone, and each runner's max abs err against eager."""
    ref = fns["eager"](x)
    err = {k: float(np.abs(f(x) - ref).max()) for k, f in fns.items()}  # also the first call: compiles, warms up
    lat: dict[str, list[float]] = {k: [] for k in fns}
    rng, shares, redone = random.Random(seed), [], 0
    for i in range(n):
        for attempt in range(REDO + 1):
            ms, share = one_round(fns, x, rng)
            if share <= MAX_OTHERS or attempt == REDO:
                break
            redone += 1
            print(f"    round {i + 1}: others took {100 * share:.0f} % of the CPU, measuring it again", flush=True)
            wait_for_quiet(sorted(os.sched_getaffinity(0)), time.monotonic() + 120)
        for k, v in ms.items():
            lat[k].append(v)
        shares.append(share)
        print(f"    round {i + 1}/{n}", flush=True)
    return lat, shares, redone, err


def ratios(lat: dict[str, list[float]], base: str) -> dict[str, dict]:
    out = {}
    for name, ms in lat.items():
        q = np.array(lat[base]) / np.array(ms)  # > 1: faster than the base, paired within each round
        out[name] = {"median": float(np.median(q)), "min": float(q.min()), "max": float(q.max())}
    return out


def speed(run: Path, packages: dict, threads: int, n: int, max_wait_s: float) -> dict:
    size = Run.open(run).model_spec["image_size"]
    fns = runners(run, packages, threads)
    out = {}
    for b in (1, 32):
        waited = wait_for_quiet(sorted(os.sched_getaffinity(0)), time.monotonic() + max_wait_s)
        print(f"  {run.name} batch {b} (waited {waited:.0f} s for idle cores)", flush=True)
        x = np.random.default_rng(b).integers(0, 256, (b, 3, size, size)).astype(np.float32)
        lat, shares, redone, err = rounds(fns, x, n, seed=b)
        out[str(b)] = {"latency_ms": lat, "p50_ms": {k: float(np.median(v)) for k, v in lat.items()},
                       "vs_eager": ratios(lat, "eager"), "vs_onnxruntime": ratios(lat, "onnxruntime (fp32)"),
                       "others_cpu_share": float(np.mean(shares)), "others_cpu_share_per_round": shares,
                       "rounds_redone": redone, "max_abs_err_vs_eager": err, "waited_for_quiet_s": waited}
    return out


# -- the report ----------------------------------------------------------------------------------------------
def lscpu_flags() -> dict:
    """This record's own flag list (with f16c; of AMX only amx_tile), present and absent, from lscpu: its records
    have listed these from the first, so it keeps them rather than take common.SIMD_FLAGS."""
    flags = set(lscpu()["flags"].split())
    keys = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return {"present": [k for k in keys if k in flags], "absent": [k for k in keys if k not in flags]}


def targets(report: dict) -> list[dict]:
    out = []
    for model, m in report["models"].items():
        p = m["parity"]
        out.append({"target": f"{model}: pt2 vs eager max abs err <= 1e-4 and top-1 agreement 100 % "
                              f"({p['images']} validation images)",
                    "value": f"{p['max_abs_err']:.1e}, {100 * p['top1_agreement']:.2f} %",
                    "met": p["max_abs_err"] <= 1e-4 and p["top1_agreement"] == 1.0})
    r18 = report["models"]["resnet18_224"]
    c = r18["compile"]
    out.append({"target": "resnet18_224 compiles in <= 45 s on 2 cores (cold / warm inductor cache)",
                "value": f"{c['cold']['compile_s']:.1f} s / {c['warm']['compile_s']:.1f} s",
                "met": c["cold"]["compile_s"] <= 45})
    out.append({"target": "resnet18_224 package within 10 % of the weights' size",
                "value": f"{c['package_mb']:.1f} MB vs {c['weights_mb']:.1f} MB ({c['package_over_weights']:.3f}x)",
                "met": abs(c["package_over_weights"] - 1) <= 0.10})
    s = r18["speed"]
    for b, key, goal, label in (("1", "vs_eager", 1.3, "eager"), ("32", "vs_onnxruntime", 0.9, "fp32 ONNX Runtime")):
        q = s[b][key][DEFAULT]
        out.append({"target": f"goal: resnet18_224 aoti >= {goal}x {label} at batch {b}",
                    "value": f"{q['median']:.2f}x ({q['min']:.2f}..{q['max']:.2f})", "met": q["median"] >= goal})
    return out


def markdown(report: dict) -> str:
    m, f = report["machine"], report["machine"]["lscpu_flags"]
    lines = [f"# pt2 (torch.export + AOTInductor): {report['name']}", "",
             f"{report['date']}. {m['cpu']}, {m['cpus_usable']} cores (lscpu flags: {', '.join(f['present'])}; "
             f"no {', '.join(f['absent'])}), {report['threads']} threads for every runtime; torch "
             f"{report['libraries'].get('torch')}, onnxruntime "
             f"{report['libraries'].get('onnxruntime-gpu') or report['libraries'].get('onnxruntime')}. "
             f"The machine is shared with other engineers' work: 1-min load average {report['load_avg_start']:.1f} "
             f"at the start, {report['load_avg_end']:.1f} at the end. Speed is compared by ratios within each "
             f"interleaved round ({report['rounds']} rounds), not by absolute times; a round during which other "
             f"processes took more than {100 * MAX_OTHERS:.0f} % of the CPU was measured again (at most {REDO} "
             "times), and each table says how disturbed the kept rounds were.",
             f"Command: `{report['command']}`", "", "## Targets", "", "| target | measured | met |", "|---|---|:-:|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    for model, r in report["models"].items():
        c = r["compile"]
        lines += ["", f"## {model}", "",
                  f"Compile (`cnnpack export --format pt2`, {c['cpu_isa']} kernels, torch {c['torch_version']}): "
                  f"{c['cold']['compile_s']:.1f} s with an empty inductor cache, {c['warm']['compile_s']:.1f} s with "
                  f"it warm (capture {c['cold']['capture_s']:.1f} s; whole process {c['cold']['process_wall_s']:.0f} / "
                  f"{c['warm']['process_wall_s']:.0f} s). Package {c['package_mb']:.2f} MB, weights "
                  f"{c['weights_mb']:.2f} MB. Parity on {r['parity']['images']} validation images and random "
                  f"batches of {', '.join(map(str, r['parity']['batch_sizes']))}: max abs err "
                  f"{r['parity']['max_abs_err']:.1e}, top-1 agreement {100 * r['parity']['top1_agreement']:.2f} %.", "",
                  "Settings tried (compile time in its own process): " + "; ".join(
                      f"{n}: {v['compile_s']:.0f} s" if "compile_s" in v else f"{n}: {v['error']}"
                      for n, v in r["variants"].items()) + ".", ""]
        for b, s in r["speed"].items():
            lines += [f"### batch {b} (others' CPU share in the kept rounds: {100 * s['others_cpu_share']:.0f} % on "
                      f"average, at most {100 * max(s['others_cpu_share_per_round']):.0f} %; {s['rounds_redone']} "
                      "disturbed round(s) measured again)", "",
                      "| runtime | p50 ms (median of rounds) | x eager | x fp32 ONNX Runtime | max abs err vs eager |",
                      "|---|--:|--:|--:|--:|"]
            for name, ms in s["p50_ms"].items():
                e, o = s["vs_eager"][name], s["vs_onnxruntime"][name]
                lines.append(f"| {name} | {ms:.2f} | {e['median']:.2f} ({e['min']:.2f}..{e['max']:.2f}) | "
                             f"{o['median']:.2f} ({o['min']:.2f}..{o['max']:.2f}) | "
                             f"{s['max_abs_err_vs_eager'][name]:.1e} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/pt2-aoti"), help="Where the two runs live.")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--models", default="cnn64,resnet18_224")
    p.add_argument("--max-wait", type=float, default=600, help="Seconds to wait for idle cores before each speed table.")
    p.add_argument("--compile-variant", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.compile_variant:
        return compile_variant(*args.compile_variant)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    models = {}
    for name, run in prepare(args.work).items():
        if name not in args.models.split(","):
            continue
        print(f"== {name}", flush=True)
        compiled = compile_times(run)
        checked = parity(run, None if name == "cnn64" else "shapes")
        tried = variants(run, args.work / f"{name}-variants")
        models[name] = {"compile": compiled, "parity": checked, "variants": tried,
                        "speed": speed(run, tried, args.threads, args.rounds, args.max_wait)}
    info = cpu_info()
    name = f"pt2-aoti-{'-'.join(models)}-cpu{len(os.sched_getaffinity(0))}-threads{args.threads}"
    report = {"name": name, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/pt2_aoti.py"] + sys.argv[1:]),
              "machine": {"cpu": info["model"], "cpus_usable": len(os.sched_getaffinity(0)), "lscpu_flags": lscpu_flags()},
              "threads": args.threads, "rounds": args.rounds, "libraries": library_versions(),
              "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0], "models": models}
    if {"cnn64", "resnet18_224"} <= set(models):
        report["targets"] = targets(report)
    else:
        report["targets"] = []
    save_json(name, report)
    save_md(name, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
