"""What the run says about serving it on a cluster: which models ship, and the pod's size and patience.

Every figure comes from the run's manifest, and says where it came from:
- the models: those `cnnpack tune` would sweep (laid out and passed verify), with their image
  ensembles (`<model>_preprocess`, `<model>_image`) when the repository has them;
- CPU: the tuned winner's instances x threads when `cnnpack tune` ran, else the served model's
  config (threads 0, the runtime's default of every core, counts the cores the run measured on); more where
  another shipped model's config.pbtxt asks for more;
- memory: the peak resident memory of the local server after the served stage's load test, with
  headroom (an upper bound: cnnpack's Python-based backends hold more than the container's native
  ones); without a served stage of the layout that ships, an estimate per model instance from the
  local server's measured memory per backend (cnnpack.deploy.memory);
- the startup probe's window: the served stage's measured start-up (every model loaded), times a
  margin for a slower node, never under a floor; without one, a documented fallback.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from cnnpack.errors import UserInputError, one_line, shell
from cnnpack.rundir import Run, sha256
from cnnpack.triton_config import CPU_CONFIG, PREPROCESS, PT2_FORMATS, classifier_of, ensemble_parts
from cnnpack.triton_publish import STAGING_PREFIX, stale_preprocessing, versions

MiB = 1 << 20
# startup probe: measured load time x margin, at least the floor; without a measurement, the fallback
STARTUP_MARGIN = 5.0
STARTUP_FLOOR_S = 60
STARTUP_FLOOR_GPU_S = 180  # CUDA context and cuDNN/cuBLAS handles per instance are not in a CPU measurement
STARTUP_FALLBACK_S = 300
PROBE_PERIOD_S = 5
DOWNLOAD_BYTES_PER_S = 20 * MiB  # object storage: Triton copies the repository to local disk first
# HPA: scale on the average queue time per request
QUEUE_TARGET_DEFAULT_MS = 5.0
# formats whose Triton backend runs them on a GPU with KIND_GPU (ONNX Runtime's CUDA provider, LibTorch on CUDA);
# every other one stays on the CPU in the gpu overlay: OpenVINO (TARGET_DEVICE CPU) and any format not listed
GPU_FORMATS = ("onnx", "onnx_int8", "torchscript")


@dataclass(frozen=True)
class Figure:
    """A value for the manifests and the sentence that says where it came from."""

    value: float | int | str
    source: str


@dataclass
class Plan:
    run: Path
    repository: Path
    served_model: str  # the model a client asks for (the triton stage's)
    classifiers: list[tuple[str, str]]  # (name, format): verified and laid out
    models: list[str]  # every folder that ships: classifiers + their ensembles
    gpu_models: list[str]  # classifiers that can run on a GPU
    gpu_laid: list[str]  # models whose config.pbtxt puts them on a GPU (`cnnpack triton --device gpu`)
    cpu: Figure
    memory_mib: Figure
    memory_gpu_mib: Figure
    startup_s: Figure
    startup_gpu_s: Figure
    queue_target_us: Figure
    repository_bytes: int
    notes: list[str] = field(default_factory=list)
    opened_as: tuple | None = None  # the run's identity when read: a run replaced since is not recorded into
    deployed_files: dict[str, str] = field(default_factory=dict)  # configs/*.pbtxt an earlier deploy wrote: sha256
    cuda_only: list[str] = field(default_factory=list)  # CUDA pt2 packages and their ensembles: not in the base


def make(run_dir: str | Path, *, queue_target_ms: float | None = None, ensembles: bool = True,
         remote: bool = False) -> Plan:
    """Reads the run (nothing is written); UserInputError when it holds no verified, laid-out model.

    `ensembles`: ship the image ensembles too. Their preprocessing model decodes images with Pillow, which
    the stock NGC image lacks: only the repository image (which installs it) can serve them.
    `remote`: Triton downloads the repository from object storage before it loads it (a longer start-up).
    """
    from cnnpack.servable import servable, unverified
    from cnnpack.triton_repo import latest_from, lay_out

    # absolute: the commands in its notes go into the deployment's README, whose commands run from --out
    run = Run.open(Path(run_dir).resolve())
    classifiers = servable(run, required_by="deploy")
    manifest = run.read()
    stages = manifest["stages"]
    triton = stages["triton"]
    repository = Path(triton["repository"])
    models = shipped(repository, [m for m, _ in classifiers], ensembles=ensembles)
    configs = {m: read_config(repository / m, fix=relayout(run.path, triton, m)  # Triton would not load it either
                              or lay_out(run.path, triton, m, classifiers)) for m in models}
    gpu_laid = [m for m, mc in configs.items() if on_gpu(mc)]
    arts = stages.get("export", {}).get("artifacts", {})
    cuda = [m for m, fmt in classifiers if fmt in PT2_FORMATS and (arts.get(fmt) or {}).get("device") == "cuda"]
    size = sum(f.stat().st_size for m in models for f in (repository / m).rglob("*")
               if f.is_file() and not shipped_cache(f.relative_to(repository)))
    plan = Plan(run=run.path.resolve(), repository=repository, served_model=triton["name"], classifiers=classifiers,
                models=models, gpu_laid=gpu_laid,
                gpu_models=[m for m, fmt in classifiers if fmt in GPU_FORMATS or m in gpu_laid],
                cpu=Figure(0, ""), memory_mib=Figure(0, ""), memory_gpu_mib=Figure(0, ""), startup_s=Figure(0, ""), startup_gpu_s=Figure(0, ""),
                queue_target_us=Figure(0, ""), repository_bytes=size, opened_as=run.opened_as,
                deployed_files=dict((stages.get("deploy") or {}).get("repository_files") or {}),
                cuda_only=[m for m in models if classifier_of(m) in cuda])
    if foreign := sorted({origin for m, _ in classifiers if (origin := latest_from(repository / m))}
                         - {str(run.path.resolve())}):  # the same bytes verify checked, laid out by another run
        plan.notes.append(f"{repository} was laid out from {'another run' if len(foreign) == 1 else 'other runs'} "
                          f"({', '.join(foreign)}; this run a copy of it?): deploy writes its gpu configs there too; "
                          f"`cnnpack triton --run {shell(run.path)} --repository NEW` gives this run a repository "
                          "of its own")
    if unchecked := unverified(run, classifiers):
        plan.notes.append(f"not shipped: {', '.join(unchecked)}: laid out in {repository}, but only what passed "
                          f"verify ships; `cnnpack verify --run {shell(run.path)}` checks every artifact again")
    left = [e for e in shipped(repository, [m for m, _ in classifiers]) if e not in models]
    if left:
        plan.notes.append(f"not shipped: {', '.join(left)} (the image ensemble's preprocessing needs Pillow, which "
                          "the stock NGC image lacks; --model-store image builds an image with it)")
    plan.notes += stale_preprocessing(repository, [(m, str(v[-1])) for m in models  # the version Triton serves
                                                   if m.endswith(PREPROCESS) and (v := versions(repository / m))], run.path)
    def bounded(model: str, n: int | str, same: str = " (with the other options it was laid out with)") -> str:
        """The command that lays `model` out again, with its threads (`same`: what else it must be given)."""
        return relayout(run.path, triton, model, threads=n) or (lay_out(run.path, triton, model, classifiers)[:-1]
                                                                 + f" --threads {n}`{same}")

    if plan.served_model not in plan.models:  # the triton stage's model did not pass verify (a later verify)
        plan.served_model = classifiers[0][0]
        plan.notes.append(f"the deployment is named after {plan.served_model}, the first verified model "
                          f"({triton['name']}, the one the run's triton stage laid out last, is not shipped)")
    own, instances, threads = cpu(stages, manifest.get("machine", {}))
    sized_by = (_winner(stages) or {}).get("model") or triton["name"]  # the model whose config `own` is of
    if sized_by not in models:  # sized by a model that ships instead: the served one, by its config.pbtxt
        sized_by = plan.served_model
        own, instances, threads = cpu_of(configs[sized_by], dict(classifiers)[sized_by], sized_by,
                                         int(manifest.get("machine", {}).get("cpu_count") or 1))
    plan.cpu = _largest_other(plan, own, sized_by, configs, int(manifest.get("machine", {}).get("cpu_count") or 1))
    if not threads:
        plan.notes.append(f"the served config leaves the runtime's threads at 0 (its default): its thread pool is as "
                          f"large as the node's cores, not the pod's CPU limit ({plan.cpu.value}), and on a larger "
                          f"node the pod is throttled; bound it with {bounded(sized_by, max(1, own.value // instances))}"
                          " or `cnnpack tune`")
    if others := [m for m, fmt in classifiers if m != sized_by and m not in gpu_laid
                  and not _threads(configs[m], fmt)]:
        one = len(others) == 1
        plan.notes.append(f"{', '.join(others)} also {'leaves' if one else 'leave'} the runtime's threads at 0: a "
                          f"request to {'it' if one else 'each'} runs on as many threads as the node has cores, beyond "
                          f"the pod's CPU limit ({plan.cpu.value}); lay {'it' if one else 'each'} out again with its "
                          f"threads bounded: {'; '.join(bounded(m, 'N', same='') for m in others)}"
                          + (" (each with the other options it was laid out with)" if not one
                             else " (with the other options it was laid out with)"))
    plan.memory_mib = memory(stages, repository, {m: configs[m] for m in models}, instances, sized_by)
    plan.memory_gpu_mib = gpu_memory(plan, configs)
    download_s = math.ceil(size / DOWNLOAD_BYTES_PER_S) if remote else 0
    plan.startup_s = startup(stages, floor=STARTUP_FLOOR_S, download_s=download_s)
    plan.startup_gpu_s = startup(stages, floor=STARTUP_FLOOR_GPU_S, download_s=download_s)
    plan.queue_target_us = queue_target(stages, repository, classifiers, queue_target_ms)
    for m, fmt in classifiers:  # AOTInductor's C++ runs only where it was compiled for (cnnpack/pt2.py)
        if fmt == "pt2" and m in models and (rec := arts.get("pt2") or {}).get("device", "cpu") == "cpu":
            isa = (rec.get("extra") or {}).get("cpu_isa") or "the exporting host's instruction set"
            plan.notes.append(f"{m} is a pt2 package compiled for CPUs with {isa} "
                              f"by torch {rec.get('torch_version', '?')}: a node without that instruction set, or "
                              "a Triton whose PyTorch is older, fails to load it; keep the pods on such nodes (a "
                              "nodeSelector on Node Feature Discovery's cpu-cpuid labels) or ship the ONNX model")
    for stage, fmt in (("quantize", "onnx_int8"), ("quantize_openvino", "openvino_int8")):
        if (stages.get(stage) or {}).get("status") == "failed" and (shipped_int8 := [m for m, f in classifiers
                                                                                     if f == fmt and m in models]):
            plan.notes.append(f"the last `cnnpack quantize` for {fmt} found no model within its gate; "
                              f"{', '.join(shipped_int8)} ships the earlier {fmt} model, which passed `cnnpack verify` "
                              "under the gate it was made with, not that one")
    if cuda:
        plan.notes.append(f"{', '.join(cuda)}: a pt2 package compiled for CUDA, which no CPU runs: the base (cpu overlay) "
                          "loads every other model (explicit model control, --load-model for each), not "
                          f"{'them' if len(cuda) > 1 else 'it'} or {'their' if len(cuda) > 1 else 'its'} image "
                          "ensemble; the gpu overlay and the KServe InferenceService serve it"
                          + ("; with no other model, the cpu overlay serves none: apply the gpu overlay"
                             if all(m in cuda for m, _ in classifiers) else ""))
    if laid_cpu := [m for m in gpu_laid if m not in plan.cuda_only]:
        plan.notes.append(f"laid out for a GPU (KIND_GPU): {', '.join(laid_cpu)}; the base (cpu overlay) serves "
                          f"configs/{CPU_CONFIG}.pbtxt of each, on the CPU and without its GPU accelerators, and the "
                          "KServe InferenceService, which serves config.pbtxt, requests a GPU")
    return plan


def _threads(mc, fmt: str) -> int:
    """The threads per instance a model's config.pbtxt gives its runtime; 0: the runtime's default (every core)."""
    from cnnpack.triton_config import threads_in

    return threads_in({k: v.string_value for k, v in mc.parameters.items()}, fmt)


def read_config(folder: Path, *, fix: str = "`cnnpack triton`"):
    """The folder's config.pbtxt as a ModelConfig; UserInputError naming the file when it does not parse."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    path = folder / "config.pbtxt"
    try:
        return text_format.Parse(path.read_text(encoding="utf-8"), pb.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        why = one_line(e).rstrip(".")
        raise UserInputError(f"{path} is not a Triton model config ({why}; edited by hand?); lay the model out "
                             f"again with {fix}") from None


def shipped(repository: Path, classifiers: list[str], *, ensembles: bool = True) -> list[str]:
    """The classifiers and, where the repository has them (and `ensembles`), their image ensembles: the ensemble and
    its preprocessing model together or neither (Triton does not load an ensemble whose step is missing)."""
    out = []
    for m in classifiers:
        out.append(m)
        pair = ensemble_parts(m)
        if ensembles and all((repository / e / "config.pbtxt").is_file() for e in pair):
            out += pair
    return out


def needs_pillow(models: list[str]) -> bool:
    """The image ensemble's preprocessing model (cnnpack/backends/preprocess) imports Pillow."""
    return any(m.endswith(PREPROCESS) for m in models)


def content_tag(repository: Path, models: list[str], extra: dict[str, bytes] | None = None,
                without: set[str] = frozenset()) -> str:
    """12 hex digits over every shipped file's path and bytes: the same models, the same image tag.

    `extra`: files (by path in the repository) as they are about to be written; `without`: files about to be
    removed. Python's bytecode caches (`__pycache__`, written when a server runs a Python model) are not shipped and
    do not count.
    """
    digests = {f.relative_to(repository).as_posix(): sha256(f) for m in models for f in (repository / m).rglob("*")
               if f.is_file() and not shipped_cache(f.relative_to(repository))
               and f.relative_to(repository).as_posix() not in without}
    digests.update({rel: hashlib.sha256(data).hexdigest() for rel, data in (extra or {}).items()})
    h = hashlib.sha256()
    for m in models:
        for rel in sorted((r for r in digests if r.split("/")[0] == m), key=Path):
            h.update(f"{rel}\0{digests[rel]}\n".encode())
    return h.hexdigest()[:12]


def shipped_cache(rel: Path) -> bool:
    """Not part of a model: a Python bytecode cache (Triton's Python stub writes it when the model loads), or the
    hidden folder a `cnnpack triton` killed mid-publish left behind (Triton ignores it, and so does the plan)."""
    return "__pycache__" in rel.parts or rel.suffix == ".pyc" or any(p.startswith(STAGING_PREFIX) for p in rel.parts)


# -- the figures ----------------------------------------------------------------------------------------------
def _winner(stages: dict) -> dict | None:
    """The tuned winner while its config.pbtxt is what the repository serves (not undone, not re-laid out)."""
    from cnnpack.triton_config import served_winner

    w = served_winner(stages)  # a later tune that failed or wrote nothing keeps the earlier winner's config served
    return w if w and not w.get("default") else None


def cpu(stages: dict, machine: dict) -> tuple[Figure, int, int]:
    """(cores the pod requests, model instances, threads per instance: 0 for the runtime's default) from the tuned
    winner or the served model's config."""
    run_cores = int(machine.get("cpu_count") or 1)
    w = _winner(stages)
    if w:
        n, t = int(w["instances"]), int(w["threads"])
        where = f"the tuned winner ({w['label']})"
    else:
        cfg = stages["triton"].get("config", {})
        n, t = int(cfg.get("instances", 1)), int(cfg.get("threads", 0))
        where = f"{stages['triton']['name']}'s config ({n} instance(s), {t or 'default'} threads)"
    return _figure(n, t, where, run_cores)


def cpu_of(mc, fmt: str, name: str, run_cores: int) -> tuple[Figure, int, int]:
    """`cpu` from a model's config.pbtxt (the model the run laid out last is not shipped)."""
    n = sum(int(g.count or 1) for g in mc.instance_group) or 1
    t = _threads(mc, fmt)
    return _figure(n, t, f"{name}'s config ({n} instance(s), {t or 'default'} threads)", run_cores)


def _figure(n: int, t: int, where: str, run_cores: int) -> tuple[Figure, int, int]:
    cores = n * (t or run_cores)
    why = f"{n} instance(s) x {t} thread(s) of {where}" if t else (
        f"{n} instance(s) x {run_cores} cores ({where}: threads 0 is the runtime's default of every core, and the run "
        f"measured on {run_cores}; bound it with `cnnpack triton ... --threads N` or `cnnpack tune`: see the notes)")
    return Figure(cores, why), n, t


def _largest_other(plan: Plan, own: Figure, sized_by: str, configs: dict, run_cores: int) -> Figure:
    """The pod's CPU: `own` (of `sized_by`'s config: the tuned winner's model, else the served model), or more where
    another shipped classifier's config.pbtxt asks for more (its instances x threads): a pod sized for one model
    alone throttles the other's requests. A CUDA pt2 package is not counted: the base does not load it."""
    needs = {}
    for m, fmt in plan.classifiers:
        if m == sized_by or m not in configs or m in plan.cuda_only:
            continue
        mc = configs[m]
        n = sum(g.count or 1 for g in mc.instance_group) or 1
        t = _threads(mc, fmt)
        needs[m] = (n * (t or run_cores), n, t)
    top = max(needs, key=lambda m: needs[m][0], default=None)
    if top is None or needs[top][0] <= own.value:
        return own
    cores, n, t = needs[top]
    return Figure(cores, f"{n} instance(s) x {f'{t} thread(s)' if t else f'{run_cores} cores (threads 0)'} of "
                         f"{top}'s config, the most any shipped model asks for ({sized_by}: {own.value}, "
                         f"{own.source})")


def relayout_command(run_path: Path, config: dict, **changed) -> str:
    """The `cnnpack triton` command that lays a model out again as its recorded TritonConfig has it, with `changed`
    settings (threads=2): each option that differs from the default, so nothing else is reset by pasting it."""
    from dataclasses import fields

    from cnnpack.errors import shell
    from cnnpack.triton_config import TritonConfig, option

    cfg, out = {**config, **changed}, [f"cnnpack triton --run {shell(run_path)}"]
    for f in fields(TritonConfig):
        value = cfg.get(f.name, f.default)
        value = tuple(value) if isinstance(value, list) else value  # (a tuple read back from JSON)
        if f.name == "force" or (value == f.default and f.name not in ("repository", "format", *changed)):
            continue
        if value is not None:
            out.append(option(f.name, value))
    return f"`{' '.join(out)}`"


def relayout(run_path: Path, triton: dict, model: str, **changed) -> str | None:
    """`relayout_command` for `model` with every setting the run's triton stage laid it out with (`changed` ones
    aside), where that stage laid it out (its classifier, or its image ensemble's part); None where none records them
    (a model an earlier `cnnpack triton` laid out): a command with its format alone would reset the rest."""
    if not isinstance(triton.get("config"), dict) or model not in (triton["name"], *ensemble_parts(triton["name"])):
        return None
    parts = {"ensemble": True} if model != triton["name"] else {}  # (the part is laid out with its classifier)
    return relayout_command(run_path, {**triton["config"], "repository": triton["repository"]}, **parts, **changed)


def measured(stages: dict) -> tuple[dict, str]:
    """The served stage's record where it measured the repository deploy ships as it is laid out now ({} otherwise),
    and why not: its memory and load time are not another layout's (a pod sized by them was OOM-killed)."""
    from cnnpack.served import layout_changed

    served = stages.get("served") or {}
    if served.get("status") != "ok":
        return {}, "the served stage did not run"
    why = layout_changed(stages)
    return ({}, why) if why else (served, "")


def memory(stages: dict, repository: Path, configs: dict, instances: int, sized_by: str) -> Figure:
    """MiB for requests and limits (equal: the pod's memory is not overcommitted): the measured peak of the layout
    that ships, or the estimate of cnnpack.deploy.memory for every shipped model (`configs`) at its instances (the
    model the CPU is sized by at `instances`, its tuned count, where more)."""
    from cnnpack.deploy import memory as mem

    served, why_not = measured(stages)
    peak, why_not = served.get("server_peak_rss_bytes"), why_not or "the served stage predates it"
    base_instances = int(stages["triton"].get("config", {}).get("instances", 1)) or 1
    if peak:
        scale = max(1.0, instances / base_instances)
        mib = max(mem.FLOOR_MIB, peak * mem.HEADROOM * scale / MiB)
        why = (f"the local server's peak resident memory after the served stage's load test, {peak / MiB:.0f} MiB, "
               f"x {mem.HEADROOM:g} headroom" + (f" x {scale:g} for the tuned instance count" if scale > 1 else "")
               + f" (at least {mem.FLOOR_MIB} MiB)")
    else:
        counts = {m: mem.instances_of(mc) for m, mc in configs.items()}
        if sized_by in counts:
            counts[sized_by] = max(counts[sized_by], instances)
        files = {m: mem.model_bytes(repository, m, shipped_cache) for m in configs}
        est, how = mem.estimate(configs, files, counts)
        mib = max(mem.FLOOR_MIB, est * mem.HEADROOM)
        why = (f"no measured memory ({why_not}), an estimate of {est:.0f} MiB x {mem.HEADROOM:g} headroom "
               f"(at least {mem.FLOOR_MIB} MiB): {how}")
    return Figure(mem.rounded(mib), why + ", rounded up to a multiple of 64 MiB")


def gpu_memory(plan: Plan, configs: dict) -> Figure:
    """The gpu overlay's memory: the pod's, plus host memory for CUDA in each backend that runs a model on the GPU."""
    from cnnpack.deploy import memory as mem

    extra, backends = mem.gpu_allowance(configs, [m for m in plan.gpu_models if m in plan.models])  # shipped ones
    if not extra:
        return plan.memory_mib
    return Figure(mem.rounded(plan.memory_mib.value + extra),
                  f"the pod's {plan.memory_mib.value} MiB + {len(backends)} x {mem.CUDA_HOST_MIB} MiB of host memory "
                  f"for CUDA (its runtime, cuDNN and cuBLAS), one for each backend that runs a model on the GPU "
                  f"({', '.join(backends)}): an allowance, not measured (the figures above come from a CPU-only server)")


def startup(stages: dict, *, floor: int, download_s: int = 0) -> Figure:
    """Seconds the startup probe waits for every model to be loaded."""
    served, why_not = measured(stages)
    load, why_not = served.get("server_load_s"), why_not or "the served stage predates it"
    download = (f" + {download_s} s to download the repository at {DOWNLOAD_BYTES_PER_S // MiB} MiB/s"
                if download_s else "")
    if load is None:
        s = STARTUP_FALLBACK_S + download_s
        why = f"no measured load time ({why_not}): the fallback of {STARTUP_FALLBACK_S} s{download}"
    else:
        s = max(floor, math.ceil(load * STARTUP_MARGIN)) + download_s
        why = (f"the served stage's start-up with every model loaded, {load:.1f} s, x {STARTUP_MARGIN:g} for a slower "
               f"node (at least {floor} s){download}")
    # the probe allows whole periods (failureThreshold x periodSeconds): the window said is the one it allows
    allowed = startup_failures(s) * PROBE_PERIOD_S
    return Figure(allowed, why + (f", rounded up to whole {PROBE_PERIOD_S} s probe periods" if allowed != s else ""))


def startup_failures(seconds: int) -> int:
    """The startup probe's failureThreshold that allows `seconds`: whole probe periods, rounded up."""
    return -(-int(seconds) // PROBE_PERIOD_S)


def queue_target(stages: dict, repository: Path, classifiers: list[tuple[str, str]],
                 override_ms: float | None) -> Figure:
    """The average queue time per request above which the HPA adds replicas, in microseconds."""
    delay = max((_queue_delay_us(repository / m) for m, _ in classifiers), default=0)
    floor = max(1000, 2 * delay)  # the dynamic batcher's own wait is queue time too: never scale on it alone
    if override_ms is not None:
        if override_ms * 1000 < floor:
            raise UserInputError(f"--queue-target-ms {override_ms:g} is under {floor / 1000:g} ms (1 ms, and twice the "
                                 f"longest dynamic-batcher delay, {delay} us): the HPA would add replicas on the "
                                 "batcher's own wait")
        return Figure(int(round(override_ms * 1000)), f"--queue-target-ms {override_ms:g}")
    from cnnpack.triton_config import served_budget

    w = _winner(stages)
    budget = served_budget(stages)  # the budget the served winner was chosen under (not a later failed tune's)
    what = "the tuned winner"
    if not (w and budget):  # a tune that kept the served config (as good): its own point under that tune's budget
        t = stages.get("tune") or {}
        kept = (t.get("verdict") or {}).get("as_good") or (t.get("winner") or {}).get("default")
        # measured after the layout served now (a `cnnpack triton` since serves another config than it measured)
        kept = kept and t.get("updated", "") > stages["triton"].get("updated", "")
        w = kept and t.get("status") == "ok" and next(
            (p for p in t.get("points", []) if p["default"] and p["model"] == stages["triton"]["name"]
             and p["concurrency"] == t["winner"]["concurrency"]), None)
        budget, what = (t.get("config") or {}).get("latency_budget_ms"), "the served config (as tune measured it)"
    if w and budget and w["latency_ms_p99"] < budget:
        headroom_us = (budget - w["latency_ms_p99"]) * 1000
        us = max(floor, int(headroom_us / 2))
        return Figure(us, f"half the headroom {what} left under the p99 budget ({budget:g} ms - "
                          f"{w['latency_ms_p99']:.2f} ms), at least {floor} us (2 x the batching delay, >= 1 ms)")
    why = "no `cnnpack tune` budget in the run" if not stages.get("tune") else "no tuned config in place"
    us = max(floor, int(QUEUE_TARGET_DEFAULT_MS * 1000))
    return Figure(us, f"the default {QUEUE_TARGET_DEFAULT_MS:g} ms ({why}; --queue-target-ms sets it)")


def _queue_delay_us(folder: Path) -> int:
    text = (folder / "config.pbtxt").read_text() if (folder / "config.pbtxt").is_file() else ""
    m = re.search(r"max_queue_delay_microseconds:\s*(\d+)", text)
    return int(m.group(1)) if m else 0


# -- where a model runs --------------------------------------------------------------------------------------
def on_gpu(mc) -> bool:
    """A model config with an instance group on a GPU (KIND_GPU, or KIND_AUTO given GPUs)."""
    from tritonclient.grpc import model_config_pb2 as pb

    return any(g.kind == pb.ModelInstanceGroup.KIND_GPU or (g.kind == pb.ModelInstanceGroup.KIND_AUTO and g.gpus)
               for g in mc.instance_group)
