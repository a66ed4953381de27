"""`cnnpack deploy`: what a cluster needs to serve the run's verified repository, as plain files.

    <out>/                                  (default: <run>/deploy)
      cnnpack-deploy.json                   which run and name, every figure and where it came from
      README.md                             this deployment's exact commands
      kubernetes/base/                      Deployment, Service, PodDisruptionBudget, HPA (autoscaling/v2)
                                            [+ ServiceMonitor] [+ PVC and its fill Job]
      kubernetes/overlays/cpu/              kubectl apply -k <out>/kubernetes/overlays/cpu
      kubernetes/overlays/gpu/              one GPU, KIND_GPU instance groups (--model-config-name=gpu)
      kubernetes/prometheus-adapter/values.yaml   the rule that turns Triton's counters into the HPA's metric
      kserve/inferenceservice.yaml          serving.kserve.io/v1beta1, model format triton, protocol v2
                                            [+ the PVC and its fill Job, as the base's]
      image/Dockerfile                      FROM the NGC Triton image, the shipped models at /models

With the gpu overlay, each GPU-capable model also gets `<model>/configs/gpu.pbtxt` in the repository
(Triton's custom model configuration: its config.pbtxt with KIND_GPU instance groups), and a model laid out for a
GPU gets `configs/cpu.pbtxt`, the base's; config.pbtxt, which `cnnpack serve` uses, is not touched. The run
records what deploy wrote there, and a later deploy removes such a file once it no longer fits its model (a tune
put the model back on the CPU) and was not edited since.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpack.errors import RunReplaced, UserInputError

if TYPE_CHECKING:
    from cnnpack.deploy.plan import Plan
    from cnnpack.rundir import Run

GPU_MODES = ("auto", "yes", "no")
INT32_MAX = 2**31 - 1  # a Kubernetes replica count is an int32
NAME_MAX = 49  # a DNS label is at most 63 characters; "<name>-fill-<8 hex>", the longest derived name, must fit
# pvc: the claim is ReadWriteMany, since the fill Job writes it and every replica, on whatever node the HPA and the
# rollout's surge put it, mounts it (read-only); a ReadWriteOnce volume attaches to one node only
PVC_NOTE = ("the models' volume is a ReadWriteMany claim: the fill Job writes it once and every replica, on any node, "
            "mounts it read-only; it needs a StorageClass that offers ReadWriteMany (NFS, CephFS, EFS, Filestore, Azure "
            "Files). On a single-node cluster whose storage is ReadWriteOnce only (kind's local-path), patch the claim's "
            "accessModes to [ReadWriteOnce] in an overlay. The Job writes as uid 1000 and relies on fsGroup 1000 "
            "for the volume's permissions; storage that ignores fsGroup (many NFS and Azure Files setups) must let "
            "that uid write (its export's or share's own options)")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class DeployConfig:
    out: str | None = None  # default: <run>/deploy
    name: str | None = None  # default: the served model's name as a DNS label (cnn_onnx -> cnn-onnx)
    model_store: str = "image"  # image | pvc | s3://... | gs://... | as://...
    image: str | None = None  # the repository image (image, pvc); default cnnpack/<name>:<content tag>
    credentials_secret: str | None = None  # object storage: a Secret's name, never its contents
    service_account: str | None = None  # object storage: workload identity
    replicas: int = 1  # the HPA's minimum
    max_replicas: int = 4
    gpu: str = "auto"  # the gpu overlay: auto (when a model can run on a GPU) | yes | no
    service_monitor: bool = False  # monitoring.coreos.com/v1 ServiceMonitor (needs the Prometheus Operator)
    queue_target_ms: float | None = None  # the HPA's target queue time per request (default: from the run)
    force: bool = False  # replace an --out that holds a different deployment

    def validate(self) -> None:
        """Everything that needs no run (exit 2, nothing written)."""
        from cnnpack.deploy import store as stores

        if self.name is not None:
            check_name(self.name)
        if self.replicas < 1:
            raise UserInputError(f"--replicas must be >= 1 (the HPA's minimum), got {self.replicas}")
        for flag, n in (("--replicas", self.replicas), ("--max-replicas", self.max_replicas)):
            if n > INT32_MAX:
                raise UserInputError(f"{flag} must be <= {INT32_MAX} (a Kubernetes replica count), got {n}")
        if self.max_replicas < self.replicas:
            raise UserInputError(f"--max-replicas {self.max_replicas} is below --replicas {self.replicas}")
        if self.gpu not in GPU_MODES:
            raise UserInputError(f"--gpu {self.gpu!r}; valid: {', '.join(GPU_MODES)}")
        if self.queue_target_ms is not None and not 0 < self.queue_target_ms < 3.6e6:  # nan, inf: refused too
            raise UserInputError(f"--queue-target-ms must be > 0 and under an hour, got {self.queue_target_ms}")
        s = stores.parse(self.model_store)
        for flag, value in (("--credentials-secret", self.credentials_secret),
                            ("--service-account", self.service_account)):
            if value is None:
                continue
            if not s.remote:
                raise UserInputError(f"{flag} is for object storage (--model-store s3://|gs://|as://); "
                                     f"--model-store {self.model_store} needs no credentials")
            if len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value):
                raise UserInputError(f"{flag} {value!r} is not a Kubernetes object name (lowercase a-z, 0-9, '-', '.')")
        if self.credentials_secret and self.service_account:  # KServe would use the account, Triton the Secret
            raise UserInputError("--credentials-secret and --service-account are two ways to reach the bucket (a "
                                 "Secret Triton reads, or workload identity); give one")
        if self.service_account and s.mode == "as":
            raise UserInputError("--service-account with as://: Triton's Azure client signs in with an account key "
                                 "only (AZURE_STORAGE_KEY), never as a workload identity; give --credentials-secret "
                                 "NAME, or none for a public container")
        if self.image is not None:
            if s.remote:
                raise UserInputError("--image names the repository image (--model-store image or pvc); with object "
                                     "storage the pod runs the NGC image")
            stores.check_image(self.image)
            if "@" in self.image:  # the README's `docker build -t` and `docker push` name it: a digest cannot be a tag
                named = self.image.split("@")[0]
                raise UserInputError(f"--image {self.image!r} names a digest; deploy writes the command that builds and "
                                     "pushes this image (docker build -t), and a digest is what a push yields, not a "
                                     "name a build takes: give a tag, e.g. --image "
                                     + (named if stores.has_tag(named) else f"{named}:1"))


def check_name(name: str) -> str:
    if len(name) <= NAME_MAX and _DNS_LABEL.fullmatch(name):
        return name
    raise UserInputError(f"--name {name!r} is not a valid DNS-1123 label for the objects: lowercase letters, digits "
                         f"and '-', starting with a letter, ending with a letter or digit, at most {NAME_MAX} "
                         f"characters; e.g. --name {suggest_name(name)}")


def suggest_name(text: str) -> str:
    """`cnn_onnx` -> `cnn-onnx`; anything -> a valid label."""
    s = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    s = re.sub(r"-+", "-", s)
    s = re.sub(r"^[^a-z]+", "", s)[:NAME_MAX].strip("-")
    return s or "triton"


def deploy(run_dir: str | Path, cfg: DeployConfig = DeployConfig()) -> dict:
    """Writes the deployment folder for a run and records it as the run's `deploy` stage; returns what
    `cnnpack-deploy.json` records (and `recorded`: None, or why the run's manifest could not take the stage).

    Raises UserInputError (exit 2, nothing written): bad options, a run without a verified and laid-out
    model, a gpu overlay for CPU-only models, an --out that holds a different deployment (without force).
    """
    from cnnpack.deploy import configs, output
    from cnnpack.deploy import plan as plans
    from cnnpack.deploy import store as stores
    from cnnpack.triton_dist import ngc_image

    cfg.validate()
    store = stores.parse(cfg.model_store)
    plan = plans.make(run_dir, queue_target_ms=cfg.queue_target_ms, ensembles=store.mode == "image",
                      remote=store.remote)
    gpu = _want_gpu(cfg, plan)
    if store.mode == "pvc":
        plan.notes.append(PVC_NOTE)
    name = cfg.name or suggest_name(plan.served_model)
    out = Path(cfg.out) if cfg.out else plan.run / "deploy"
    if out.is_symlink():  # a link to the folder (a GitOps checkout): the folder it names is the one replaced
        out = out.resolve()
    if out.resolve().is_relative_to(plan.repository.resolve()):
        raise UserInputError(f"--out {out} is inside the model repository {plan.repository}, where Triton would take "
                             "it for a model; choose a folder outside it")
    for what, folder in (("run", plan.run), ("model repository", plan.repository)):
        if folder.resolve().is_relative_to(out.resolve()):  # the whole --out folder is replaced: a copy in its place
            raise UserInputError(f"--out {out} holds the {what} {folder}, and deploy replaces the whole folder; "
                                 "choose a folder that does not contain it")
    identity = {"kind": "cnnpack-deploy", "run": str(plan.run), "name": name}
    earlier = output.check_out(out, identity, force=cfg.force,
                               named="--name" if cfg.name else f"after {plan.served_model}, the model the run serves")
    # the configs the deployment there wrote are deploy's too, where the run no longer records them (trained again)
    plan.deployed_files = output.repository_files(out, plan.run, plan.repository) | plan.deployed_files
    gpu_configs = configs.wanted(plan, gpu)
    theirs = configs.users_configs(plan, gpu_configs)
    if theirs and not cfg.force:
        raise UserInputError(f"{plan.repository / theirs[0]} is not a config a deploy wrote (yours, or edited since), "
                             f"and the gpu overlay needs its own there{_more(theirs)}; move it, or pass --force to "
                             "replace it")
    if theirs:
        plan.notes.append(f"replaced (--force): {', '.join(str(plan.repository / rel) for rel in theirs)}, a config "
                          "of yours, with the gpu overlay's")
    stale = configs.stale_configs(plan)
    spec = _spec(cfg, plan, store, name, ngc_image(plan.repository), gpu_configs, stale)
    files = _files(plan, spec, gpu=gpu, out=out)
    own = output.own_files(out, earlier)
    clash = output.clashes(own, [*files, output.IDENTITY])
    if clash and not cfg.force:
        raise UserInputError(f"--out {out} has {len(clash)} file(s) of yours (not written by cnnpack, or edited since) "
                             f"where this deployment writes now ({', '.join(clash[:3])}); move them, or pass --force "
                             "to replace them")
    kept = [f for f in own if f not in clash]
    ours = configs.repository_files(plan, gpu_configs, stale)  # the marker's and the run's record of them
    record = {**identity, "config": asdict(cfg), "image": spec.image, "repository_image": spec.repo_image,
              "ngc_image": spec.ngc_image, "content_tag": spec.tag, "repository": str(plan.repository),
              "models": plan.models, "served_model": plan.served_model, "overlays": ["cpu", *(["gpu"] if gpu else [])],
              "repository_files_added": list(gpu_configs), "repository_files_removed": sorted(stale),
              # every config of deploy's in the repository (an earlier deploy's still in place too): a later deploy
              # tells them from a user's where the run's record is gone (trained again), and an edited one
              "repository_sha256": ours,
              "args": _args(spec),
              "figures": {k: asdict(getattr(plan, k)) for k in ("cpu", "memory_mib", "startup_s", "startup_gpu_s",
                                                                 "queue_target_us")}
              # the gpu overlay's memory, where it writes one and asks for more than the base
              | ({"memory_gpu_mib": asdict(plan.memory_gpu_mib)}
                 if gpu and plan.memory_gpu_mib.value != plan.memory_mib.value else {}),
              "notes": [*plan.notes, *([f"no --image: the repository image is named {spec.repo_image}, which a "
                                         "cluster pulls from Docker Hub's `cnnpack` namespace (not yours); give "
                                         "--image REGISTRY/NAME of a registry your cluster pulls from, or load it "
                                         "into a local cluster (kind, minikube)"]
                                        if cfg.image is None and spec.repo_image else [])],
              "out": str(out), "files": sorted([*files, output.IDENTITY]),
              # what this replaced: an earlier deployment in --out, and its files this one no longer writes;
              # files of the user's own there are carried over (kept), or replaced with --force (overwritten)
              "replaced": earlier is not None, "removed": sorted(set(earlier or ()) - {*files, output.IDENTITY, *kept}),  # (edited: kept)
              "kept": kept, "overwritten": clash}
    record["sha256"] = output.digests(files)  # a file edited after this is the user's (`output.edited`)
    same = earlier is not None and output.unchanged(out, files, record)
    record["replaced"] = record["replaced"] and not same  # only a deployment that differs is replaced
    files[output.IDENTITY] = json.dumps(record, indent=2) + "\n"
    # the deployment folder, complete, before anything is changed; none where --out holds it as it is (its marker too)
    stage = None if same else output.stage_tree(out, files, keep=kept, vcs=output.vcs_metadata(out))
    try:
        _opened(plan).check_not_replaced()  # a deployment of the model a `train --force` since replaced: none
        if gpu_configs or stale:  # what it writes into the repository must be recorded (a later deploy removes it)
            _opened(plan).check_writable()
        undo = configs.write(plan, gpu_configs)  # checks are over: from here on, the repository and --out change
        try:
            if stage is not None:
                output.swap_in(stage, out)
        except BaseException:  # the configs just written are taken back: unrecorded, the next deploy called them
            undo()             # the user's own
            raise
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    record["unchanged"] = same  # (not in the marker: it says what the write that made it did)
    record["recorded"] = _record_in_run(_opened(plan), record, ours)
    # the earlier deploy's configs that no longer fit, last: a failure before leaves them where the run's record
    # names them, for the next deploy to remove
    configs.remove_stale(plan, stale)
    return record


def _more(items: list) -> str:
    return f" (and {len(items) - 1} more)" if len(items) > 1 else ""


def _opened(plan: Plan) -> Run:
    """The run as `plan.make` read it: what is recorded goes to that run, not to one replaced since."""
    from cnnpack.rundir import Run

    run = Run(plan.run)
    run.opened_as = plan.opened_as
    return run


def _record_in_run(run: Run, record: dict, repository_files: dict[str, str]) -> str | None:
    """`stages.deploy` in the run's manifest (what the report shows, and the configs deploys wrote into the
    repository); None, or why it could not be written."""
    keep = ("config", "out", "name", "image", "repository_image", "content_tag", "repository", "models",
            "served_model", "overlays", "figures", "notes")
    try:
        run.set_stage("deploy", {"status": "ok", "model_store": record["config"]["model_store"],
                                 **{k: record[k] for k in keep}, "out": str(Path(record["out"]).resolve()),
                                 "repository_files": repository_files})
    except OSError as e:
        return f"{e.filename or run.path}: {e.strerror or e}"
    except RunReplaced:  # replaced between the check before writing and now: the folder stands, the new run is not
        return f"{run.path} was replaced by a new run (trained again with --force) meanwhile"
    return None


def command(run_dir: str | Path, config: dict) -> str:
    """The `cnnpack deploy` command line that writes the same deployment again (its options as recorded)."""
    from dataclasses import fields

    from cnnpack.errors import shell

    parts = ["cnnpack deploy --run", shell(run_dir)]
    for f in fields(DeployConfig):
        value = config.get(f.name, f.default)
        if f.name == "force" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        parts += [flag] if value is True else [flag, shell(str(value))]
    return " ".join(parts)


def _want_gpu(cfg: DeployConfig, plan) -> bool:
    if cfg.gpu == "no" and plan.cuda_only and all(m in plan.cuda_only for m, _ in plan.classifiers):
        raise UserInputError(f"--gpu no, but every shipped model is a pt2 package compiled for CUDA "
                             f"({', '.join(m for m, _ in plan.classifiers)}): the cpu overlay would serve none; "
                             "use --gpu auto, or ship a model the CPU runs (`cnnpack triton --format onnx`)")
    if cfg.gpu == "no":
        return False
    if not plan.gpu_models:
        if cfg.gpu == "yes":
            formats = ", ".join(f"{m} ({f})" for m, f in plan.classifiers)
            raise UserInputError(f"--gpu yes, but every model of the repository runs only on the CPU ({formats}; "
                                 "ONNX and TorchScript models run on a GPU); lay out one with `cnnpack triton`, or "
                                 "use --gpu no")
        return False
    return True


def _spec(cfg: DeployConfig, plan, store, name: str, ngc: str, gpu_configs: dict[str, bytes], stale: set[str]):
    from cnnpack.deploy.kube import Spec
    from cnnpack.deploy.plan import content_tag
    from cnnpack.deploy.store import has_tag
    from cnnpack.triton_config import CPU_CONFIG

    tag = content_tag(plan.repository, plan.models, gpu_configs, stale)  # as the repository will be once written
    repo_image = None
    if not store.remote:
        repo_image = cfg.image or f"cnnpack/{name}:{tag}"
        if not has_tag(repo_image):
            repo_image = f"{repo_image}:{tag}"
    return Spec(name=name, image=repo_image if store.mode == "image" else ngc, repo_image=repo_image, ngc_image=ngc,
                store=store, tag=tag, replicas=cfg.replicas, max_replicas=cfg.max_replicas,
                secret=cfg.credentials_secret, service_account=cfg.service_account,
                service_monitor=cfg.service_monitor,
                cpu_config=CPU_CONFIG if set(plan.gpu_laid) - set(plan.cuda_only) else None,
                base_models=tuple(m for m in plan.models if m not in plan.cuda_only) if plan.cuda_only else None)


def _args(spec) -> dict:
    from cnnpack.deploy.kube import container_args
    from cnnpack.triton_config import GPU_CONFIG

    return {"cpu": container_args(spec, config_name=spec.cpu_config, base=True),
            "gpu": container_args(spec, config_name=GPU_CONFIG)}


def _files(plan, spec, *, gpu: bool, out: Path) -> dict[str, str]:
    """Every file of the deployment folder, by its path inside it."""
    from cnnpack.deploy import kube, text
    from cnnpack.deploy.output import dump

    head = text.header(plan, spec)
    base = {"deployment.yaml": kube.deployment(plan, spec), "service.yaml": kube.service(spec),
            "pdb.yaml": kube.pdb(spec), "hpa.yaml": kube.hpa(plan, spec)}
    if spec.service_monitor:
        base["servicemonitor.yaml"] = kube.service_monitor(spec)
    if spec.store.mode == "pvc":
        base["pvc.yaml"] = kube.pvc(plan, spec)
        base["fill-job.yaml"] = kube.fill_job(spec)
    files = {f"kubernetes/base/{n}": dump(obj, head) for n, obj in base.items()}
    files["kubernetes/base/kustomization.yaml"] = dump(kube.kustomization(list(base)), head)
    files["kubernetes/overlays/cpu/kustomization.yaml"] = dump(kube.kustomization(["../../base"]), head)
    if gpu:
        files["kubernetes/overlays/gpu/kustomization.yaml"] = dump(
            kube.kustomization(["../../base"], ["gpu.yaml"]), head)
        files["kubernetes/overlays/gpu/gpu.yaml"] = dump(kube.gpu_patch(plan, spec), head)
    files["kubernetes/prometheus-adapter/values.yaml"] = dump(kube.adapter_values(plan, spec),
                                                                text.adapter_header(head, spec))
    files["kserve/inferenceservice.yaml"] = dump(kube.inference_service(plan, spec), head)
    if spec.store.mode == "pvc":  # the claim its storageUri names, and the Job that fills it (the base's own objects)
        files["kserve/pvc.yaml"], files["kserve/fill-job.yaml"] = (files["kubernetes/base/pvc.yaml"],
                                                                   files["kubernetes/base/fill-job.yaml"])
    if spec.secret and spec.store.remote:
        files["kserve/serviceaccount.yaml"] = dump(kube.storage_account(spec), head)
    if spec.repo_image:
        files["image/Dockerfile"] = text.dockerfile(plan, spec)
        files["image/Dockerfile.dockerignore"] = text.dockerignore(plan)
    files["README.md"] = text.readme(plan, spec, gpu=gpu, out=out)
    return files
