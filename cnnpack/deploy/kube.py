"""The Kubernetes and KServe objects, as plain data (dicts) that a YAML library writes.

The container's arguments come from `serve_config.server_args`, the same function that builds `cnnpack
serve`'s command line. The image's own entrypoint (the NGC image's nvidia_entrypoint.sh) stays and runs
what it sets up before the command, so the arguments start with `tritonserver`, exactly like the
`docker run IMAGE tritonserver --model-repository=/models` line that `triton_dist.docker_line` prints.
"""

from __future__ import annotations

from dataclasses import dataclass

from cnnpack.deploy import store as stores
from cnnpack.deploy.plan import PROBE_PERIOD_S, Plan, needs_pillow, startup_failures
from cnnpack.triton_config import GPU_CONFIG

CONTAINER = "tritonserver"
CONTENT_ANNOTATION = "cnnpack.dev/content-tag"  # on the pod template: changed models roll the pods out
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults, named
APP_PROTOCOL = {"http": "http", "grpc": "kubernetes.io/h2c", "metrics": "http"}  # gRPC is HTTP/2 without TLS
LIVE, READY = "/v2/health/live", "/v2/health/ready"
UID = 1000  # the NGC image's triton-server user
GRACE_S = 30  # terminationGracePeriodSeconds: Triton gets 2/3 of it to finish requests in flight (server_args)
# the HPA's metric: the average queue time per request, from two of Triton's own counters
QUEUE_US, REQUESTS = "nv_inference_queue_duration_us", "nv_inference_request_success"
RATE_WINDOW = "2m"
SHM_LIMIT = "256Mi"  # /dev/shm for the Python backend's tensors (the runtime's default is 64 MiB)


@dataclass(frozen=True)
class Spec:
    """Everything the objects need besides the plan."""

    name: str
    image: str  # what the Deployment runs
    repo_image: str | None  # the image with the repository (image and pvc)
    ngc_image: str
    store: stores.Store
    tag: str  # content tag of the shipped models
    replicas: int
    max_replicas: int
    secret: str | None
    service_account: str | None
    service_monitor: bool
    cpu_config: str | None = None  # the base's --model-config-name (a repository laid out for a GPU)
    base_models: tuple[str, ...] | None = None  # the models the base loads (explicit model control); None: all


def labels(name: str) -> dict:
    return {**selector(name), "app.kubernetes.io/part-of": "cnnpack"}


def selector(name: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference-server"}


def pull_policy(image: str, spec: Spec) -> str:
    """IfNotPresent for an image whose tag is the content tag (or the NGC release): the same tag, the same bytes.
    A tag given with --image stays the same when the models change: each start pulls it, or a node that cached the
    old image would run (or fill the volume with) the old models."""
    return "IfNotPresent" if image == spec.ngc_image or image.endswith(f":{spec.tag}") else "Always"


def meta(name: str, spec: Spec) -> dict:
    return {"name": name, "labels": labels(spec.name)}


def repository_path(spec: Spec) -> str:
    """The repository as Triton in the pod sees it."""
    if spec.store.remote:
        return spec.store.url
    return f"{stores.MOUNT}/{spec.tag}" if spec.store.mode == "pvc" else stores.MOUNT


def container_args(spec: Spec, *, config_name: str | None = None, base: bool = False) -> list[str]:
    """The container's arguments: the base's (`base`: only `spec.base_models` loaded, where set) or the gpu
    overlay's (every model)."""
    from cnnpack.ports import Ports
    from cnnpack.serve_config import server_args

    load = spec.base_models if base else None
    return [CONTAINER, *server_args(repository_path(spec), host="0.0.0.0", ports=Ports(**PORTS),
                                    explicit=load is not None, stop_timeout_s=GRACE_S, config_name=config_name,
                                    load=load or ())]


def resources(plan: Plan, *, gpu: bool = False) -> dict:
    """Requests equal to limits (Guaranteed QoS: whole cores with the static CPU manager, no memory overcommit)."""
    memory = plan.memory_gpu_mib if gpu else plan.memory_mib
    r = {"cpu": str(plan.cpu.value), "memory": f"{memory.value}Mi"}
    if gpu:
        r["nvidia.com/gpu"] = "1"
    return {"requests": dict(r), "limits": dict(r)}


def probe(path: str, *, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 3}


def container_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "allowPrivilegeEscalation": False,
            "privileged": False, "capabilities": {"drop": ["ALL"]}}


def pod_security() -> dict:
    return {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


# -- the base ----------------------------------------------------------------------------------------------------
def deployment(plan: Plan, spec: Spec) -> dict:
    env, volumes, mounts = stores.credentials(spec.store, spec.secret)
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": SHM_LIMIT}}, *volumes]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts]
    init = []
    if spec.store.mode == "pvc":
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": pvc_name(spec), "readOnly": True}})
        mounts.append({"name": "models", "mountPath": stores.MOUNT, "readOnly": True})
        init = [{"name": "wait-for-models", "image": spec.ngc_image, "imagePullPolicy": "IfNotPresent",
                 "command": ["sh", "-c", f"until [ -d {repository_path(spec)} ]; do echo 'waiting for job/"
                             f"{job_name(spec)} to fill the volume'; sleep 5; done"],
                 "volumeMounts": [{"name": "models", "mountPath": stores.MOUNT, "readOnly": True}],
                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}},
                 "securityContext": container_security()}]
    container = {
        "name": CONTAINER, "image": spec.image, "imagePullPolicy": pull_policy(spec.image, spec),
        "args": container_args(spec, config_name=spec.cpu_config, base=True),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        # the startup probe holds the other two off until every model is loaded, however long that takes
        "startupProbe": probe(READY, period=PROBE_PERIOD_S, failures=startup_failures(plan.startup_s.value)),
        "livenessProbe": probe(LIVE, period=10, failures=3),
        "readinessProbe": probe(READY, period=PROBE_PERIOD_S, failures=3),
        "resources": resources(plan),
        "securityContext": container_security(),
        **({"env": env} if env else {}),
        "volumeMounts": mounts,
    }
    pod = {"securityContext": pod_security(), "automountServiceAccountToken": False,
           **({"serviceAccountName": spec.service_account} if spec.service_account else {}),
           "terminationGracePeriodSeconds": GRACE_S, **({"initContainers": init} if init else {}),
           "containers": [container], "volumes": volumes}
    # no spec.replicas: the HPA owns the count (minReplicas); re-applying the file does not reset it
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(spec.name, spec),
            "spec": {"selector": {"matchLabels": selector(spec.name)},
                     "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                     "template": {"metadata": {"labels": labels(spec.name), "annotations": {
                         "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"]),
                         "prometheus.io/path": "/metrics",
                         CONTENT_ANNOTATION: spec.tag}}, "spec": pod}}}  # changed models: a rollout, whatever the tag


def service(spec: Spec) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta(spec.name, spec),
            "spec": {"type": "ClusterIP", "selector": selector(spec.name),
                     "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP", "appProtocol": APP_PROTOCOL[n]}
                               for n, p in PORTS.items()]}}


def pdb(spec: Spec) -> dict:
    # maxUnavailable, not minAvailable: with one replica a node drain can still proceed
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(spec.name, spec),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(spec.name)}}}


def hpa(plan: Plan, spec: Spec) -> dict:
    return {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(spec.name, spec),
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": spec.name},
                     "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas,
                     "metrics": [{"type": "Pods", "pods": {
                         "metric": {"name": queue_metric(spec.name)},
                         "target": {"type": "AverageValue", "averageValue": str(plan.queue_target_us.value)}}}],
                     "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}}}}


def service_monitor(spec: Spec) -> dict:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor", "metadata": meta(spec.name, spec),
            "spec": {"selector": {"matchLabels": selector(spec.name)},
                     "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s"}]}}


def pvc_name(spec: Spec) -> str:
    return f"{spec.name}-models"


def job_name(spec: Spec) -> str:
    """Named after the content: a Job's pod template is immutable, so new models make a new Job."""
    return f"{spec.name}-fill-{spec.tag[:8]}"


def pvc(plan: Plan, spec: Spec) -> dict:
    # room for this content, the two earlier ones the fill Job keeps, and a copy under way (`stores.fill_script`)
    gib = max(1, -(-plan.repository_bytes * (stores.EARLIER_KEPT + 2) // (1 << 30)))
    # ReadWriteMany: the fill Job writes it, and every replica mounts it (read-only) on whichever node it runs: up to
    # maxReplicas, plus the rollout's surge. ReadWriteOnce attaches to one node (the others' pods would not start), and
    # a ReadOnlyMany claim could not be filled by the Job. The README says which StorageClasses offer it.
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta(pvc_name(spec), spec),
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": f"{gib}Gi"}}}}


def fill_job(spec: Spec) -> dict:
    """One-shot: copies the repository image's /models into <volume>/<content tag>, once, after removing all but the
    newest earlier contents (`stores.fill_script`)."""
    job_labels = {"app.kubernetes.io/name": spec.name, "app.kubernetes.io/component": "fill-models",
                  "app.kubernetes.io/part-of": "cnnpack"}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": job_name(spec), "labels": job_labels},
            "spec": {"backoffLimit": 3, "ttlSecondsAfterFinished": 86400, "template": {
                "metadata": {"labels": job_labels},
                "spec": {"restartPolicy": "OnFailure", "securityContext": pod_security(),
                         "automountServiceAccountToken": False,
                         "containers": [{"name": "fill", "image": spec.repo_image,
                                         "imagePullPolicy": pull_policy(spec.repo_image, spec),
                                         "command": ["sh", "-ec", stores.fill_script(spec.tag)],
                                         "volumeMounts": [{"name": "models", "mountPath": "/target"}],
                                         "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                                                       "limits": {"cpu": "1", "memory": "256Mi"}},
                                         "securityContext": container_security()}],
                         "volumes": [{"name": "models", "persistentVolumeClaim": {"claimName": pvc_name(spec)}}]}}}}


def kustomization(resources: list[str], patches: list[str] = ()) -> dict:
    out = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(resources)}
    if patches:
        out["patches"] = [{"path": p} for p in patches]
    return out


def gpu_patch(plan: Plan, spec: Spec) -> dict:
    """Strategic-merge patch: one GPU, KIND_GPU configs (--model-config-name), a longer start-up window."""
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": spec.name},
            "spec": {"template": {"spec": {
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "containers": [{"name": CONTAINER, "args": container_args(spec, config_name=GPU_CONFIG),
                                "resources": resources(plan, gpu=True),
                                "startupProbe": probe(READY, period=PROBE_PERIOD_S,
                                                      failures=startup_failures(plan.startup_gpu_s.value))}]}}}}


def queue_metric(name: str) -> str:
    """The HPA's metric, one per deployment: prometheus-adapter's rules are the whole cluster's, and each
    deployment's counts its own classifiers (`classifiers_only`), which another deployment's rule would not."""
    return f"triton_queue_us_per_request_{name.replace('-', '_')}"


def classifiers_only(plan) -> str:
    """A label matcher for the series of the shipped classifiers alone, by name (not by a pattern of the names
    cnnpack gives an ensemble and its preprocessing: a classifier named `shapes_image` matched it, and the HPA's
    metric had no series). A model name's one regex character is `.`."""
    names = [m for m, _ in plan.classifiers if m in plan.models]
    return f',model=~"{"|".join(n.replace(".", "[.]") for n in names)}"'


def adapter_values(plan, spec: Spec) -> dict:
    """prometheus-adapter (Helm chart prometheus-community/prometheus-adapter) values: the HPA's metric.

    Per pod: rate of queue microseconds over every model the pod serves / rate of requests served, counted at the
    classifiers: one request through the image ensemble is a success of the ensemble, its preprocessing step and
    the classifier, and counting all three would read the queue time up to 3x low (the HPA scaling late), while
    the preprocessing step's own queue time is load the HPA must see.
    The labels `namespace` and `pod` are the ones a ServiceMonitor (and kube-prometheus) put on each series. The
    metric is the deployment's own (`queue_metric`), its HPA's query naming its pods: not a pattern of pod names,
    which a long --name (the pod name cut to 63 characters) or an overlay's namePrefix would no longer match.
    """
    def rate(metric: str, matchers: str = "") -> str:
        return f"sum by (<<.GroupBy>>) (rate({metric}{{<<.LabelMatchers>>{matchers}}}[{RATE_WINDOW}]))"

    return {"rules": {"custom": [{
        "seriesQuery": f'{QUEUE_US}{{namespace!="",pod!=""}}',  # the HPA's query names its own pods
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_US}$", "as": queue_metric(spec.name)},
        # no requests in the window: 0 us, not a division by zero (the adapter drops NaN and the HPA stalls)
        "metricsQuery": f"{rate(QUEUE_US)} / clamp_min({rate(REQUESTS, classifiers_only(plan))}, 0.001)",
    }]}}


# -- KServe -------------------------------------------------------------------------------------------------------
def storage_account(spec: Spec) -> dict:
    """KServe reads storage credentials from the Secrets its ServiceAccount lists: a reference, not a copy."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(f"{spec.name}-storage", spec),
            "secrets": [{"name": spec.secret}]}


def inference_service(plan: Plan, spec: Spec) -> dict:
    account = spec.service_account or (f"{spec.name}-storage" if spec.secret and spec.store.remote else None)
    image = runtime_image(plan, spec)
    model = {"modelFormat": {"name": "triton"}, "protocolVersion": "v2", **image,
             # a tag of your own stays the same when the models change: each start pulls it (as the Deployment's)
             **({"imagePullPolicy": pull_policy(image["image"], spec)} if "image" in image else {}),
             "storageUri": stores.kserve_uri(spec.store, image=spec.repo_image or "", pvc=pvc_name(spec), tag=spec.tag),
             # it serves config.pbtxt as laid out (KServe's runtime sets the args): a GPU where that puts models
             "resources": resources(plan, gpu=bool(plan.gpu_laid)), "securityContext": container_security()}
    # its own component label: KServe copies an InferenceService's labels onto its predictor pods, which the
    # Deployment's Service, PodDisruptionBudget and HPA would otherwise select as theirs
    metadata = {"name": spec.name, "labels": {**labels(spec.name), "app.kubernetes.io/component": "kserve-predictor"}}
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            # the content tag: changed models are a new revision, also where storageUri and image read the same
            "spec": {"predictor": {"annotations": {CONTENT_ANNOTATION: spec.tag},
                                   "minReplicas": spec.replicas, "maxReplicas": spec.max_replicas,
                                   **({"serviceAccountName": account} if account else {}), "model": model}}}


def runtime_image(plan: Plan, spec: Spec) -> dict:
    """The predictor's image: KServe's Triton runtime (the stock NGC image, at our release), or the repository image
    where a shipped model needs Pillow (the image ensemble's preprocessing), which the stock image lacks: without it
    that model fails to load and Triton exits. KServe merges `image` into its runtime's container (its args stay);
    `runtimeVersion` would re-tag that image, so it is left out then."""
    if needs_pillow(plan.models) and spec.repo_image:
        return {"image": spec.repo_image}
    return {"runtimeVersion": spec.ngc_image.rsplit(":", 1)[1]}
