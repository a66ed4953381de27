"""The pipeline's `served` stage: the run's Triton repository under a real server, used as a client would.

Starts the local Triton server on free loopback ports over the repository of the run's `triton`
stage, then
  1. classifies a few validation images through it: their pixels to the classifier (Triton's
     classification extension) and, when they are files, their encoded bytes to the image ensemble;
  2. verifies every served classifier against eager (`verify` with the served models as targets);
  3. benchmarks the served ONNX model under concurrent load (`bench --triton-url`);
and stops the server. Figures go to `served.json` and `stages.served`; the served rows also join
`verify.json`/`stages.verify` and `bench.json`/`stages.bench`, as the commands would add them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnpack.atomic import atomic_write_json
from cnnpack.client import PROTOCOL_NAMES
from cnnpack.errors import StageFailed, UserInputError, ratio
from cnnpack.loadclient import check_concurrency
from cnnpack.rundir import Run, now, sha256

OUTPUT = "served.json"
PROTOCOL = "grpc"  # classification and parity through the server
LOAD_PROTOCOL = "http"  # the load: cnnpack's client costs the server least over HTTP (benchmarks/results/served-loadgen-*)


def layout_changed(stages: dict) -> str:
    """Why the served stage's figures are not of the repository as the triton stage laid it out now ("" where they
    are): `cnnpack triton` since laid it out elsewhere, in other files (--instances 4), or a newer model version. A
    tune's config since is not a new layout (the triton stage's files stay): deploy scales by its instance count."""
    from cnnpack.triton_publish import versions

    served, triton = stages.get("served") or {}, stages.get("triton") or {}
    repo = served.get("repository")
    if repo and Path(repo).resolve() != Path(triton.get("repository", "")).resolve():
        return f"the served stage measured {repo}, not the repository shipped"
    laid = {k: v.get("sha256") for k, v in triton.get("files", {}).items()}
    newer = [n for n, v in (served.get("versions") or {}).items()
             if repo and str(max(versions(Path(repo, n)), default=0)) != str(v)]
    if ("triton_files" in served and served["triton_files"] != laid) or newer:
        return "`cnnpack triton` laid the repository out again since the served stage measured it"
    return ""


@dataclass(frozen=True)
class ServedConfig:
    concurrency: tuple[int, ...] = (1, 4, 16)
    images: int = 8  # validation images classified through the server
    threads: int | None = None  # client-side threads for the matmul reference of the served bench
    max_seconds: float = 4.0  # per concurrency level
    timeout_s: float = 30.0
    int8_min_agreement: float | None = None  # verify's int8 contract for a served int8 model (None: its gate's)

    def validate(self) -> None:
        if self.images < 1:
            raise UserInputError(f"--infer-images must be >= 1, got {self.images}")
        check_concurrency(self.concurrency)


def pick_images(run: Run, n: int) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """`n` validation images spread over the classes: (pixels uint8 NCHW, labels, files or [], class names)."""
    from cnnpack.data import load_data

    t = run.stage("train", required_by="pipeline (served)")["config"]
    data = load_data(t["data"], run.model_spec["image_size"], seed=t["seed"], val_fraction=t["val_fraction"],
                     data_root=t.get("data_root"))
    labels = data.val.labels.numpy()
    rank = np.zeros(len(labels), int)  # round-robin over the classes: each one's first image, then second, ...
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rank[idx] = np.arange(len(idx))
    pick = np.lexsort((labels, rank))[:n]
    files = [data.val.files[i] for i in pick] if data.val.files else []
    return data.val.images[pick].numpy(), labels[pick], files, data.classes


def _classify(server, name: str, images: np.ndarray, labels: np.ndarray, files: list[str],
              classes: list[str], timeout_s: float) -> list[dict]:
    from cnnpack.client import Client
    from cnnpack.infer import InferConfig, classify, infer

    with Client(server.grpc_address, PROTOCOL, timeout_s=timeout_s) as client:
        tops = classify(client, client.model(name), images.astype(np.float32), 1)
    # the file by its folders under the ones they share (its class folder, in an ImageFolder; class/sub/img.png
    # where it lies deeper): img0.png alone named a file of every class
    base = os.path.commonpath(files) if len(files) > 1 else str(Path(files[0]).parent.parent) if files else ""
    rows = [{"image": os.path.relpath(files[i], base) if files else f"val[{i}]", "true": classes[labels[i]],
             "label": top[0]["label"], "score": top[0]["score"]} for i, top in enumerate(tops)]
    if files:  # the same images as encoded bytes through the ensemble (decoded and resized on the server)
        res = infer(files, InferConfig(model=name, url=server.grpc_address, protocol=PROTOCOL, ensemble=True,
                                       timeout_s=timeout_s))
        for row, r in zip(rows, res["results"]):
            row["ensemble_label"] = r["top"][0]["label"]
    return rows


def served(run_dir: str | Path, cfg: ServedConfig = ServedConfig(), *,
           progress: Callable[[str], None] = lambda _: None) -> dict:
    """Serves the run's repository, classifies, verifies and benchmarks through it; returns `stages.served`.

    Raises StageFailed (exit 1) when a served model does not load, a request fails, or the served
    outputs differ from eager (the message names the check; details in verify.json).
    """
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig as LoadConfig
    from cnnpack.bench_served import bench_served
    from cnnpack.serve import ServeConfig, TritonServer
    from cnnpack.verify import VerifyConfig, VerifyFailed, served_target, verify

    cfg.validate()
    run = Run.open(run_dir)
    t = run.stage("triton", required_by="pipeline (served)")
    classifiers = [m for m in t.get("models", [t["name"]]) if not m.endswith(("_image", "_preprocess"))]
    images, labels, files, classes = pick_images(run, cfg.images)
    log = run.file("served/server.log")
    log.parent.mkdir(exist_ok=True)
    progress(f"[served] starting Triton on {t['repository']} (log: {log})")
    with TritonServer(ServeConfig(repository=t["repository"], log_file=str(log))) as server:
        progress(f"[served] Triton {server.version} ready: " + ", ".join(f"{m.name} ({m.served_by})"
                                                                          for m in server.models))
        preds = _classify(server, t["name"], images, labels, files, classes, cfg.timeout_s)
        right = sum(p["label"] == p["true"] for p in preds)
        progress(f"[served] classified {len(preds)} validation images through {t['name']}: {right} right")
        targets = tuple(served_target(run.path, server.grpc_address, m, PROTOCOL, cfg.timeout_s) for m in classifiers)
        try:
            checked = verify(run.path, VerifyConfig(int8_min_agreement=cfg.int8_min_agreement), targets=targets)
        except VerifyFailed as e:
            raise StageFailed(str(e)) from None
        parity = {r["format"]: {"max_abs_err": r["tensor"]["max_abs_err"] if r["tensor"] else None,
                                "top1_agreement": (r["task"] or {}).get("top1_agreement"), "passed": r["passed"],
                                "precision": r.get("precision", "fp32")}
                  for r in checked["results"] if r["runtime"] == "triton"}
        progress("[served] parity: " + ", ".join(f"{f} max abs err {p['max_abs_err']:.1e}" for f, p in parity.items()))
        load = LoadConfig(url=server.http_address, model=t["name"], protocol=LOAD_PROTOCOL, concurrency=cfg.concurrency,
                          timeout_s=cfg.timeout_s)
        int8 = next((m for m in classifiers if m.endswith("_int8")), None)
        fp32_bench = BenchConfig(batch_sizes=(1,), threads=cfg.threads, max_seconds=cfg.max_seconds,
                                 plot=int8 is None)  # bench.png drawn once, with every row
        section = bench_served(run.path, load, fp32_bench, parity=False)
        rows = [r for r in section["results"] if r.get("format") == f"triton:{t['name']}" and r.get("protocol") == LOAD_PROTOCOL]
        if int8:  # the int8 model at the highest concurrency, beside the fp32 one
            progress(f"[served] load on {int8} at concurrency {max(cfg.concurrency)}")
            section = bench_served(run.path, LoadConfig(url=server.http_address, model=int8, protocol=LOAD_PROTOCOL,
                                                        concurrency=(max(cfg.concurrency),), timeout_s=cfg.timeout_s),
                                   BenchConfig(batch_sizes=(1,), threads=cfg.threads, max_seconds=cfg.max_seconds),
                                   parity=False)
            rows += [r for r in section["results"] if r.get("format") == f"triton:{int8}" and r.get("protocol") == LOAD_PROTOCOL]
        # what `cnnpack deploy` sizes the pod from: the start-up (every model loaded) and the memory after the load
        server_info = {"version": server.version, "urls": server.urls, "load_s": server.load_s,
                       "peak_rss_bytes": server.peak_rss_bytes(), "models": [asdict(m) for m in server.models]}
    throughput = {r["concurrency"]: r for r in rows if r["format"] == f"triton:{t['name']}"}
    c_lo, c_hi = min(throughput), max(throughput)
    gain = throughput[c_hi]["throughput_ips"] / throughput[c_lo]["throughput_ips"]
    fp32 = [p["max_abs_err"] or 0 for p in parity.values() if p.get("precision", "fp32") == "fp32"]
    summary = (f"{right}/{len(preds)} validation images right through Triton; served fp32 logits match eager "
               f"(max abs err {max(fp32, default=0):.1e}); {t['name']} over {PROTOCOL_NAMES[LOAD_PROTOCOL]}: "
               f"{throughput[c_lo]['latency_ms_p50']:.2f} ms p50 at concurrency {c_lo}, "
               f"{throughput[c_hi]['throughput_ips']:,.0f} images/s at {c_hi}{_unstable(throughput[c_hi])} "
               f"({ratio(gain)} its rate at {c_lo}, measured by "
               f"{throughput[c_hi].get('load_generator', 'cnnpack client')})")
    int8_row = next((r for r in rows if r["format"] != f"triton:{t['name']}"), None)
    if int8_row:
        f = int8_row["format"].removeprefix("triton:")
        summary += (f"; {f}: top-1 agreement {100 * parity[int8_row['format']]['top1_agreement']:.1f}%, "
                    f"{int8_row['throughput_ips']:,.0f} images/s at {c_hi}{_unstable(int8_row)} "
                    f"({int8_row['throughput_ips'] / throughput[c_hi]['throughput_ips']:.2f}x fp32)")
    result = {"summary": summary, "server": server_info, "predictions": preds, "parity": parity,
              "load": [{k: r.get(k) for k in ("format", "concurrency", "latency_ms_p50", "latency_ms_p99", "throughput_ips",
                                             "server_batch_mean", "server_queue_ms_mean",
                                             "server_compute_ms_mean", "errors", "load_generator", "stable")}
                       for r in rows],
              "config": asdict(cfg)}
    section = {"status": "ok", **{k: v for k, v in result.items() if k != "server"},
               "server_version": server_info["version"], "server_load_s": server_info["load_s"],
               "server_peak_rss_bytes": server_info["peak_rss_bytes"],
               # what was served: the report tells it apart from a repository laid out since
               "repository": t["repository"], "versions": {m["name"]: m["version"] for m in server_info["models"]},
               # the layout it measured: deploy sizes a pod by these figures only while the repository is this one
               "triton_files": {k: v.get("sha256") for k, v in t.get("files", {}).items()}}
    with run.staged_outputs(OUTPUT) as staged:  # served.json and its record as one step (a full disk: the old back)
        atomic_write_json(staged[OUTPUT], result)
        section["outputs"] = {"served_json": {"path": OUTPUT, "sha256": sha256(staged[OUTPUT])}}
        run.commit([(staged[OUTPUT], run.file(OUTPUT))],
                   lambda m: m.setdefault("stages", {}).__setitem__("served", {"updated": now(), **section}))
    return run.read()["stages"]["served"]


def _unstable(row: dict) -> str:
    """Said beside a quoted figure whose measurement windows did not agree (bench.json marks it `stable: false`)."""
    return "" if row.get("stable", True) else " (unstable: its windows did not agree)"
