"""The local Triton server's resident memory with each kind of model loaded alone: what `cnnpack deploy` sizes a pod
by when the served stage measured no other layout of the repository (its fallback).

For each model folder of a laid-out repository (an ensemble with the folders it calls), the server is started on a
repository of links to that folder alone, sent requests at batch 1 and at the model's max batch size (so each
backend's arena is touched), and its process group's peak resident memory read (VmHWM summed, as the served stage
reads it).

    .venv/bin/python benchmarks/served_memory.py --repository runs/.../model_repository [--requests 20]
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lscpu, machine, save_json, save_md, simd  # noqa: E402


def _folders(repository: Path) -> dict[str, list[Path]]:
    from cnnpack.triton_release import read_configs

    groups: dict[str, list[Path]] = {}
    for name, mc in sorted(read_configs(repository).items()):
        steps = [s.model_name for s in mc.ensemble_scheduling.step] if mc.platform == "ensemble" else []
        groups[name] = [repository / name, *(repository / n for n in steps)]
    groups["(every model)"] = [repository / name for name in sorted(groups)]
    return groups


def _load(server, names: list[str], requests: int) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http_address)
    for name in names:
        _load_one(client, name, requests)


def _load_one(client, name: str, requests: int) -> None:
    import tritonclient.http as http

    meta, config = client.get_model_metadata(name), client.get_model_config(name)
    inp = meta["inputs"][0]
    for batch in (1, int(config.get("max_batch_size") or 1)):
        shape = [batch, *[int(d) for d in inp["shape"][1:]]]
        data = _data(inp["datatype"], shape)
        for _ in range(requests):
            i = http.InferInput(inp["name"], shape, inp["datatype"])
            i.set_data_from_numpy(data)
            client.infer(name, [i])


def _data(datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
        return np.array([buf.getvalue()] * shape[0], dtype=object).reshape(shape)
    dtype = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16}[datatype]
    return np.random.default_rng(0).random(shape).astype(dtype) * (255 if dtype == np.uint8 else 1)


def _copy(folder: Path, dest: Path, instances: int) -> None:
    """The model folder with `instances` instances in each instance group (links where it is 1)."""
    if instances == 1:
        dest.symlink_to(folder.resolve())
        return
    shutil.copytree(folder, dest)
    config = dest / "config.pbtxt"
    config.write_text(re.sub(r"(instance_group\s*\[?\s*\{[^}]*?count:\s*)\d+", rf"\g<1>{instances}", config.read_text()))


def measure(repository: Path, requests: int, instances: int) -> list[dict]:
    from cnnpack.serve import TritonServer

    rows = []
    for name, folders in _folders(repository).items():
        with tempfile.TemporaryDirectory(prefix="served-memory-") as tmp:
            repo = Path(tmp) / "repo"
            repo.mkdir()
            for f in folders:
                _copy(f, repo / f.name, instances)
            t = time.perf_counter()
            with TritonServer(repo) as server:
                started = server.peak_rss_bytes()
                _load(server, [name] if folders[0].name == name else [f.name for f in folders], requests)
                peak = server.peak_rss_bytes()
                backends = sorted({m.backend for m in server.models}) if server.models else []
            rows.append({"model": name, "instances": instances, "models_loaded": [f.name for f in folders], "backends": backends,
                         "rss_after_load_mib": round(started / 2**20, 1) if started else None,
                         "peak_rss_mib": round(peak / 2**20, 1) if peak else None,
                         "model_files_mib": round(sum(p.stat().st_size for f in folders for p in f.rglob("*")
                                                      if p.is_file()) / 2**20, 2),
                         "wall_s": round(time.perf_counter() - t, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repository", required=True, type=Path)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--instances", type=int, default=1, help="instances per model (copies with count: N)")
    ap.add_argument("--out", default="served-memory-cpu2")
    args = ap.parse_args()
    rows = measure(args.repository, args.requests, args.instances)
    lines = ["# The local Triton server's peak resident memory, one model (or ensemble) at a time", "",
             "| model | instances | backends | model files MiB | RSS once loaded MiB | peak RSS after the requests MiB |", "|---|--:|---|--:|--:|--:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['instances']} | {', '.join(b for b in r['backends'] if b) or '-'} | {r['model_files_mib']:.2f} | "
                     f"{r['rss_after_load_mib']} | {r['peak_rss_mib']} |")
    cpu, m = lscpu(), machine([])
    lines += ["", f"Machine: {m['cpu']} (flags: {simd(cpu['flags'])}), {cpu['cpus']} CPUs, torch {m['torch']}, "
              f"cnnpack {m['commit']}; the server: the `serve` extra's Triton.", "",
              f"Reproduce: `.venv/bin/python benchmarks/served_memory.py --repository REPO --requests {args.requests}`"]
    save_json(args.out, {"rows": rows, "machine": m, "requests": args.requests})
    save_md(args.out, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
