"""The deployment's non-YAML files: file headers, the Dockerfile, and its README of exact commands."""

from __future__ import annotations

import os
import re
from pathlib import Path

from cnnpack.deploy import kube
from cnnpack.deploy import store as stores
from cnnpack.deploy.plan import needs_pillow
from cnnpack.errors import shell
from cnnpack.triton_publish import STAGING_PREFIX


def header(plan, spec) -> str:
    return (f"Written by `cnnpack deploy` from run {plan.run}.\n"
            f"Models: {', '.join(plan.models)} (content tag {spec.tag}). Regenerate rather than edit; "
            "override with kustomize patches in an overlay of your own.")


def adapter_header(head: str, spec) -> str:
    return (f"{head}\nValues for the prometheus-adapter Helm chart (prometheus-community/prometheus-adapter): "
            f"exposes {kube.queue_metric(spec.name)}\n(average queue time per request, us) on the custom metrics API "
            "for the HPA. Set prometheus.url to your Prometheus.\nThe adapter has one list of rules for the whole "
            "cluster: where it serves others (another\ndeployment's), add this rule to them; these values alone "
            "replace them.")


def dockerfile(plan, spec) -> str:
    """FROM the NGC image; each shipped model folder copied to /models (the build context is the repository)."""
    lines = ["# syntax=docker/dockerfile:1", *(f"# {ln}" for ln in header(plan, spec).splitlines()),
             "# Build context: the model repository (see ../README.md for the exact command).",
             f"FROM {spec.ngc_image}",
             *(_pillow_lines(spec.ngc_image) if needs_pillow(plan.models) else []),
             # owned by the user Triton runs as: a repository written under umask 077 (0600 files) stays readable
             *(f"COPY --chown={kube.UID}:{kube.UID} {m} {stores.MOUNT}/{m}" for m in plan.models),
             f"USER {kube.UID}:{kube.UID}",
             f'CMD ["tritonserver", "--model-repository={stores.MOUNT}"]', ""]
    return "\n".join(lines)


# The NGC Triton image's Python, by release (each release's notes, "Contents of the Triton Inference Server
# container"): Ubuntu 22.04 with Python 3.10 up to 24.10 (LOCAL_RELEASE); Ubuntu 24.04 with Python 3.12 from 24.11
# (the release whose build.py moved to ubuntu:24.04; 24.12's notes list it), which includes 26.06 (FIRST_RELEASE).
NGC_PYTHON = (("24.11", "3.12"), ("0", "3.10"))  # (first release, its Python), newest first
# The newest Pillow release whose Requires-Python admits that Python, with manylinux wheels (x86_64 and aarch64).
# Not the Pillow installed here: 13 needs Python >= 3.11, so the 24.10 image's pip cannot install it.
PILLOW = {"3.10": "12.3.0", "3.12": "13.0.0"}


def ngc_python(image: str) -> str:
    """The Python of an nvcr.io/nvidia/tritonserver:<YY.MM>-py3 image."""
    release = tuple(int(p) for p in re.findall(r"\d+", image.rsplit(":", 1)[-1])[:2])
    return next(py for first, py in NGC_PYTHON if release >= tuple(int(p) for p in first.split(".")))


def _pillow_lines(ngc_image: str) -> list[str]:
    py = ngc_python(ngc_image)
    return [f"# the image ensemble's preprocessing (Python backend) decodes with Pillow, which {ngc_image} lacks;",
            f"# its Python is {py}: Pillow {PILLOW[py]} is the newest release that installs there",
            f"RUN python3 -m pip install --no-cache-dir pillow=={PILLOW[py]}"]


def dockerignore(plan) -> str:
    """Sends only the shipped folders as the build context (BuildKit reads <Dockerfile>.dockerignore), without the
    bytecode a local server's Python stub left in them, nor a folder a killed `cnnpack triton` left."""
    return "\n".join(["*", *(f"!{m}" for m in plan.models), "**/__pycache__", "**/*.pyc", f"**/{STAGING_PREFIX}*", ""])


def readme(plan, spec, *, gpu: bool, out: Path) -> str:
    name = spec.name
    repo = os.path.relpath(plan.repository, out.resolve())
    wait_s = int(max(plan.startup_s.value, plan.startup_gpu_s.value if gpu else 0)) + 120
    parts = [f"# {name}: Triton on Kubernetes", "",
             f"Written by `cnnpack deploy` from `{plan.run}`: models {', '.join(f'`{m}`' for m in plan.models)} "
             f"from `{plan.repository}`, served by `{spec.ngc_image}`.", "",
             "Run every command from this folder.", ""]
    n = 1
    if spec.repo_image:
        always = kube.pull_policy(spec.repo_image, spec) == "Always"
        parts += [f"## {n}. The repository image", "", "```bash",
                  f"docker build -f image/Dockerfile -t {spec.repo_image} {shell(repo)}",
                  *([f"docker push {spec.repo_image}          # to a registry the cluster pulls from"] if always else
                    [f"docker push {spec.repo_image}          # to a registry the cluster pulls from, or for a local "
                     "cluster:", f"# kind load docker-image {spec.repo_image}   |   minikube image load "
                     f"{spec.repo_image}"]),
                  "```", ""]
        if always:
            parts += [f"The tag of `{spec.repo_image}` is yours and stays the same when the models change: build and "
                      "push it again after each `cnnpack deploy`. The pods pull it at each start (imagePullPolicy "
                      f"Always), and a change of models (annotation `{kube.CONTENT_ANNOTATION}`) rolls them out. So "
                      "an image loaded into a local cluster (`kind load`, `minikube image load`) is not used: they "
                      "pull from the registry; for such a cluster, deploy without `--image` (its content tag is "
                      "pulled only where missing).", ""]
        n += 1
    if spec.store.remote:
        lines = stores.upload_lines(spec.store, repo, plan.models)
        creds = (f"Triton reads the Secret `{spec.secret}` ({_secret_keys(spec.store)})" if spec.secret else
                 f"Triton authenticates as the ServiceAccount `{spec.service_account}` (workload identity)"
                 if spec.service_account else "Triton reads the bucket without credentials (public, or the node's identity)")
        parts += [f"## {n}. Upload the models", "", "```bash", *lines, "```", "", f"{creds}.", ""]
        if spec.store.mode == "as":  # upload-batch has no exclusion (aws and gcloud lines exclude them)
            parts += ["`az storage blob upload-batch` uploads every file in the folders: remove the `__pycache__` "
                      f"folders a local Triton wrote and any `{STAGING_PREFIX}*` folder first; they are not "
                      "part of the models. It overwrites but deletes nothing: remove a version you dropped "
                      "from the container too.", ""]
        n += 1
    parts += [f"## {n}. Apply", "", "```bash", "kubectl apply -k kubernetes/overlays/cpu" + (
        "        # or kubernetes/overlays/gpu: one GPU per pod, KIND_GPU instance groups" if gpu else "")]
    if spec.store.mode == "pvc":
        parts.append(f"kubectl wait --for=condition=complete job/{kube.job_name(spec)} --timeout=15m")
    parts += [f"kubectl rollout status deployment/{name} --timeout={wait_s}s", "```", ""]
    if gpu:
        parts += ["A rollout starts each new pod before it stops an old one (maxSurge 1, maxUnavailable 0: no gap "
                  "in serving). With the gpu overlay that new pod needs a GPU of its own: where every GPU is taken, "
                  "it stays Pending and the rollout waits; patch the Deployment's strategy to maxSurge 0, "
                  "maxUnavailable 1 there (each pod replaced in place, one fewer serving meanwhile).", ""]
    n += 1
    parts += [f"## {n}. Check it", "", "```bash",
              f"kubectl port-forward service/{name} 8000:8000 8001:8001 &",
              "curl -fsS localhost:8000/v2/health/ready && echo ready",
              f"cnnpack infer IMAGE.png --model {plan.served_model} --url localhost:8001 --protocol grpc", "```", ""]
    n += 1
    parts += [f"## {n}. Autoscaling", "",
              f"The HPA scales on `{kube.queue_metric(name)}` (average queue time per request, target "
              f"{plan.queue_target_us.value} us), which prometheus-adapter computes from Triton's "
              f"`{kube.QUEUE_US}` and `{kube.REQUESTS}`. Prometheus must scrape the pods with `namespace` and `pod` "
              "labels (the ServiceMonitor of `cnnpack deploy --service-monitor` does). prometheus-adapter has one "
              "list of rules for the whole cluster: where it already serves rules (another deployment's), add this "
              "one to its values rather than installing these alone, which replace them.", "", "```bash",
              "helm upgrade --install prometheus-adapter prometheus-community/prometheus-adapter -n monitoring \\",
              "  -f kubernetes/prometheus-adapter/values.yaml --set prometheus.url=http://prometheus-operated.monitoring.svc",
              "NS=$(kubectl config view --minify -o jsonpath='{..namespace}'); NS=${NS:-default}  # where it runs",
              f'kubectl get --raw "/apis/custom.metrics.k8s.io/v1beta1/namespaces/$NS/pods/*/{kube.queue_metric(name)}"',
              f"kubectl get hpa {name}", "```", "",
              "kube-prometheus-stack's Prometheus picks up only the ServiceMonitors that carry its Helm release's "
              "label (`release: <its release name>`) unless installed with "
              "`prometheus.prometheusSpec.serviceMonitorSelectorNilUsesHelmValues=false`: add that label in an overlay "
              "if yours is such.", ""]
    n += 1
    model = kube.inference_service(plan, spec)["spec"]["predictor"]["model"]
    parts += [f"## {n}. KServe instead", "", "```bash", "kubectl apply -f kserve/", "```", "",
              "Instead of the Deployment above, not beside it in one namespace: both are named "
              f"`{spec.name}`, and KServe in Serverless mode takes over a Service of its InferenceService's name."
              + (" `kserve/` holds the volume claim and the Job that fills it as well (the same objects as the "
                 "base's)." if spec.store.mode == "pvc" else ""), "",
              f"It serves {', '.join(f'`{m}`' for m in plan.models)} from storageUri `{model['storageUri']}`"
              + (" (a modelcar: needs `storageInitializer.enableModelcar: true` in KServe's config)"
                 if spec.store.mode == "image" else "")
              + (f", in the repository image `{model['image']}` in place of KServe's Triton runtime image: "
                 "the image ensemble's preprocessing needs Pillow, which the stock NGC image lacks"
                 if "image" in model else "") + ".", ""]
    if spec.store.mode == "s3" and model["storageUri"] != spec.store.url:  # an endpoint of its own (MinIO, Ceph...)
        parts += ["KServe's storage initializer takes an S3 endpoint of your own from annotations on the Secret of "
                  "its ServiceAccount (`serving.kserve.io/s3-endpoint`, `serving.kserve.io/s3-usehttps`), not from the "
                  "URL: add them to that Secret.", ""]
    parts += [*(f"Note: {n}." for n in plan.notes), *([""] if plan.notes else []),
              "## Sizes and where they come from", "",
              f"- CPU {plan.cpu.value}: {plan.cpu.source}.",
              f"- memory {plan.memory_mib.value} MiB: {plan.memory_mib.source}.",
              *([f"- memory in the gpu overlay {plan.memory_gpu_mib.value} MiB: {plan.memory_gpu_mib.source}."]
                if gpu and plan.memory_gpu_mib.value != plan.memory_mib.value else []),
              f"- startup window {plan.startup_s.value} s" + (f" (gpu overlay {plan.startup_gpu_s.value} s)" if gpu else "")
              + f": {plan.startup_s.source}.",
              f"- HPA target {plan.queue_target_us.value} us: {plan.queue_target_us.source}.", ""]
    return "\n".join(parts)


def _secret_keys(store) -> str:
    if store.mode == "gs":
        return f"key `{stores.GCS_KEY}`: a service-account key file"
    keys = stores.SECRET_ENV[store.mode].values()
    return "keys " + ", ".join(f"`{k}`" + (" (optional)" if k in stores.OPTIONAL_KEYS else "") for k in keys)
