"""cnnpack deploy, verified without a cluster.

- Every overlay of every way the repository reaches the pod builds with `kubectl kustomize` (skipped,
  saying why, where kubectl is absent) and every built-in object validates strictly with the
  `kubernetes-validate` package against Kubernetes 1.30 and the newest version it bundles.
- The custom resources (ServiceMonitor, InferenceService) are checked against their CRD's
  openAPIV3Schema, made strict the way the API server's strict field validation is (an unknown field
  is an error). The CRDs are the upstream files, unmodified:
      prometheus-operator v0.93.0  example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
      kserve v0.20.0               config/crd/full/serving.kserve.io_inferenceservices.yaml
  They are not vendored here; the test reads them from $CNNPACK_CRDS, else from `crds/` in the
  project's shared folder beside the repository (../shared/crds), and skips naming them when absent.
- The Deployment's exact arguments start the local real tritonserver over the same repository: the
  probe paths answer on the ports the manifest names, and every metric the HPA and the adapter rule
  use is on the server's /metrics.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import need_triton, record_new_weights

from cnnpack.deploy import plan as plans
from cnnpack.errors import MissingStageError, UserInputError
from cnnpack.serve import http_get
from cnnpack.triton_publish import STAGING_PREFIX

ROOT = Path(__file__).resolve().parent.parent
CRDS = {  # kind: (file, version served, where it comes from)
    "ServiceMonitor": ("monitoring.coreos.com_servicemonitors.yaml", "v1",
                       "prometheus-operator v0.93.0 example/prometheus-operator-crd/"),
    "InferenceService": ("serving.kserve.io_inferenceservices.yaml", "v1beta1", "kserve v0.20.0 config/crd/full/"),
}
STORES = {  # a deployment per way the repository reaches the pod
    "image": dict(service_monitor=True),
    "pvc": dict(model_store="pvc"),
    "s3": dict(model_store="s3://models-bucket/cnn", credentials_secret="triton-s3"),
    "gs": dict(model_store="gs://models-bucket/cnn", service_account="triton-reader"),
    "as": dict(model_store="as://account/container/cnn", credentials_secret="triton-azure"),
}


def _cnnpack(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnpack", *args], capture_output=True, text=True, timeout=120)


def _yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # libyaml: 2 MB CRDs


def _manifest(run: Path, fn) -> None:
    """Edits a copied run's manifest as an earlier stage would have written it."""
    m = json.loads((run / "cnnpack.json").read_text())
    fn(m)
    (run / "cnnpack.json").write_text(json.dumps(m))


def _own_copy(laid_out: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the run with its own copy of the repository (to damage), as (run, repository)."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    shutil.copytree(json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["repository"], repo)
    _manifest(run, lambda m: m["stages"]["triton"].update(repository=str(repo)))
    return run, repo


# -- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def laid_out(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run: ONNX exported, verified, laid out with its image ensemble."""
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    root = tmp_path_factory.mktemp("deploy")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    export(run, ExportConfig(formats=("onnx",), max_batch_size=16))
    verify(run, VerifyConfig(batch_sizes=(1,)))
    build(run, TritonConfig(repository=str(root / "repo"), threads=1, ensemble=True))
    return run


@pytest.fixture(scope="module")
def deployed(laid_out, tmp_path_factory) -> dict[str, Path]:
    """One deployment folder per way the repository reaches the pod (the shared output of this module)."""
    from cnnpack.deploy import DeployConfig, deploy

    root = tmp_path_factory.mktemp("out")
    return {k: Path(deploy(laid_out, DeployConfig(out=str(root / k), **cfg))["out"]) for k, cfg in STORES.items()}


@pytest.fixture(scope="module")
def built(deployed) -> dict[tuple[str, str], list[dict]]:
    """`kubectl kustomize` of every overlay of every deployment: (store, overlay) -> objects."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: the overlays cannot be built here (install kubectl to run this check)")
    out = {}
    for store, folder in deployed.items():
        for overlay in sorted(p.name for p in (folder / "kubernetes" / "overlays").iterdir()):
            proc = subprocess.run(["kubectl", "kustomize", str(folder / "kubernetes" / "overlays" / overlay)],
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{store}/{overlay}: {proc.stderr}"
            out[store, overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


@pytest.fixture(scope="module")
def base(deployed) -> dict[str, list[dict]]:
    """The base's objects as written (what the cpu overlay applies; no kubectl needed): store -> objects."""
    out = {}
    for store, folder in deployed.items():
        names = _yaml(folder / "kubernetes" / "base" / "kustomization.yaml")["resources"]
        out[store] = [_yaml(folder / "kubernetes" / "base" / n) for n in names]
    return out


def _of(objects: list[dict], kind: str) -> dict:
    return next(o for o in objects if o["kind"] == kind)


def _container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# -- schemas ---------------------------------------------------------------------------------------------------
def _validate_strictly(objects: list[dict]) -> set[str]:
    """kubernetes-validate, strict (an unknown field is an error), on 1.30 and the newest bundled version."""
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    checked, kinds = set(), set()
    for obj in objects:
        key = json.dumps(obj, sort_keys=True)
        if obj["kind"] in CRDS or key in checked:  # deployments share most objects: each distinct one once
            continue
        for v in ("1.30", latest_version()):
            kubernetes_validate.validate(obj, v, strict=True)  # raises on any schema error
        checked.add(key)
        kinds.add(obj["kind"])
    return kinds


def test_every_object_validates_strictly_on_1_30_and_the_newest(base, deployed):
    import kubernetes_validate

    for store, objects in base.items():
        kinds = {o["kind"] for o in objects}
        assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"} <= kinds, store
        assert ("ServiceMonitor" in kinds) == STORES[store].get("service_monitor", False)  # behind its flag
    accounts = [_yaml(p) for folder in deployed.values() for p in (folder / "kserve").glob("serviceaccount.yaml")]
    kinds = _validate_strictly([o for objects in base.values() for o in objects] + accounts)
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
                     "PersistentVolumeClaim", "Job", "ServiceAccount"}
    # the validator is strict: one unknown field is an error (so the passes above mean something)
    bad = json.loads(json.dumps(_of(base["image"], "Deployment")))
    _container(bad)["startupprobe"] = _container(bad)["startupProbe"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, "1.30", strict=True)


def test_every_overlay_builds_with_kubectl_kustomize_into_valid_objects(built, base):
    for (store, overlay), objects in built.items():
        if overlay == "cpu":  # the cpu overlay is the base
            same = [sorted(json.dumps(o, sort_keys=True) for o in objs) for objs in (objects, base[store])]
            assert same[0] == same[1], store
    # the gpu overlay: the base with the patch merged (its args replace the list, its resources add the GPU)
    _validate_strictly([o for (_, overlay), objects in built.items() if overlay == "gpu" for o in objects])
    cpu, gpu = (_container(_of(built["image", o], "Deployment")) for o in ("cpu", "gpu"))
    assert gpu["args"] == [*cpu["args"], "--model-config-name=gpu"] and gpu["image"] == cpu["image"]
    # host memory for CUDA in the one backend the gpu overlay puts on the GPU (onnxruntime; the preprocess stays on CPU)
    mib = int(cpu["resources"]["limits"]["memory"].removesuffix("Mi"))
    assert gpu["resources"]["limits"] == {**cpu["resources"]["limits"], "memory": f"{mib + 1024}Mi", "nvidia.com/gpu": "1"}
    assert gpu["resources"]["requests"] == gpu["resources"]["limits"]
    assert {("image", "gpu"), ("pvc", "gpu"), ("s3", "gpu")} <= set(built)


def _crd_dir() -> Path | None:
    for d in filter(None, [os.environ.get("CNNPACK_CRDS"), ROOT.parent / "shared" / "crds"]):
        if all((Path(d) / f).is_file() for f, _, _ in CRDS.values()):
            return Path(d)
    return None


def _strict(schema: dict) -> dict:
    """The openAPIV3Schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    import jsonschema

    folder = _crd_dir()
    if folder is None:
        files = "; ".join(f"{src}{f}" for f, _, src in CRDS.values())
        pytest.skip(f"the CRDs are not here: put the upstream files ({files}) in $CNNPACK_CRDS or ../shared/crds")
    out = {}
    for kind, (file, version, _) in CRDS.items():
        crd = _yaml(folder / file)
        assert crd["spec"]["names"]["kind"] == kind
        schema = next(v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version)
        out[kind] = (f"{crd['spec']['group']}/{version}", jsonschema.Draft7Validator(_strict(schema)))
    return out


def test_custom_resources_match_their_crd_schema(deployed, crd_validators):
    import kubernetes_validate

    checked = []
    for store, folder in deployed.items():
        files = [folder / "kserve" / "inferenceservice.yaml"]
        files += [folder / "kubernetes" / "base" / "servicemonitor.yaml"] * (store == "image")
        for path in files:
            obj = _yaml(path)
            api_version, validator = crd_validators[obj["kind"]]
            assert obj["apiVersion"] == api_version
            errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
            assert not errors, f"{path}: {errors}"
            # the CRDs leave metadata to the API server: it is an ObjectMeta
            meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]}
            kubernetes_validate.validate(meta, "1.30", strict=True)
            checked.append(obj["kind"])
        for path in (folder / "kserve").glob("serviceaccount.yaml"):
            kubernetes_validate.validate(_yaml(path), "1.30", strict=True)
    assert sorted(set(checked)) == ["InferenceService", "ServiceMonitor"]
    # a misspelt field fails against the same schema (the check can fail)
    bad = _yaml(deployed["image"] / "kserve" / "inferenceservice.yaml")
    bad["spec"]["predictor"]["model"]["storageURI"] = bad["spec"]["predictor"]["model"].pop("storageUri")
    assert list(crd_validators["InferenceService"][1].iter_errors(bad))


# -- what the manifests say -----------------------------------------------------------------------------------
def test_the_cpu_overlay_runs_the_serve_flags_securely_with_probes_and_named_ports(base, deployed):
    dep = _of(base["image"], "Deployment")
    c = _container(dep)
    assert c["args"][0] == "tritonserver" and "command" not in c  # the NGC image's entrypoint stays
    assert {"--model-repository=/models", "--model-control-mode=none", "--strict-readiness=true",
            "--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(c["args"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert c["readinessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    sc, pod = c["securityContext"], dep["spec"]["template"]["spec"]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["runAsNonRoot"] is True and pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert c["resources"]["requests"] == c["resources"]["limits"] and set(c["resources"]["limits"]) == {"cpu", "memory"}
    service = _of(base["image"], "Service")
    assert service["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]}["grpc"] == "kubernetes.io/h2c"
    hpa = _of(base["image"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    image = (deployed["image"] / "image" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\S+$", image, re.M)
    assert "python3 -m pip install --no-cache-dir pillow==" in image  # the ensemble's preprocessing needs it
    # owned by the user Triton runs as (a repository written under umask 077 was unreadable to it)
    assert "COPY --chown=1000:1000 cnn_onnx /models/cnn_onnx" in image.splitlines() and "USER 1000:1000" in image
    assert c["image"] in (deployed["image"] / "README.md").read_text()  # the build line tags what the pod runs


def test_the_gpu_overlay_adds_one_gpu_and_kind_gpu_configs_without_touching_config_pbtxt(base, deployed, laid_out):
    from cnnpack.rundir import sha256

    cpu = _container(_of(base["image"], "Deployment"))
    gpu = _container(_yaml(deployed["image"] / "kubernetes" / "overlays" / "gpu" / "gpu.yaml"))  # the patch
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu["resources"]["limits"]
    assert gpu["args"] == [*cpu["args"], "--model-config-name=gpu"]
    repo = Path(json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]["repository"])
    text = (repo / "cnn_onnx" / "configs" / "gpu.pbtxt").read_text()
    assert "KIND_GPU" in text and "KIND_CPU" not in text
    assert "KIND_CPU" in (repo / "cnn_onnx" / "config.pbtxt").read_text()
    record = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())
    assert record["repository_files_added"] == ["cnn_onnx/configs/gpu.pbtxt"]
    triton = json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]
    assert sha256(repo / "cnn_onnx" / "config.pbtxt") == triton["files"]["config.pbtxt"]["sha256"]


def test_a_gpu_config_of_the_users_own_in_the_repository_is_refused_and_kept_unless_force(laid_out, deployed,
                                                                                          tmp_path):
    """deploy wrote its configs/gpu.pbtxt over one the user had tuned by hand, without a word."""
    from cnnpack.deploy import DeployConfig, deploy

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    shutil.copytree(json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["repository"], repo)
    _manifest(run, lambda m: m["stages"]["triton"].update(repository=str(repo)))
    mine = repo / "cnn_onnx" / "configs" / "gpu.pbtxt"
    mine.write_text(mine.read_text().replace("count: 1", "count: 4") + "# tuned by hand\n")  # edited since
    proc = _cnnpack("deploy", "--run", str(run), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stderr == (
        f"error: {mine} is not a config a deploy wrote (yours, or edited since), and the gpu overlay needs its own "
        "there; move it, or pass --force to replace it\n")
    assert mine.read_text().endswith("# tuned by hand\n") and not (tmp_path / "out").exists()
    record = deploy(run, DeployConfig(out=str(tmp_path / "out"), force=True))
    assert "# tuned by hand" not in mine.read_text() and any(n.startswith(f"replaced (--force): {mine}, a config of "
                                                                          "yours") for n in record["notes"])
    assert deploy(run, DeployConfig(out=str(tmp_path / "out"), force=True))["notes"] == [  # its own now: no note
        n for n in record["notes"] if not n.startswith("replaced (--force)")]


def test_a_config_an_earlier_deploy_wrote_is_its_own_after_the_run_is_trained_again(laid_out, tmp_path):
    """`train --force` keeps deploy/ but drops the run's record of the configs deploy wrote: deploy again, after a
    layout with other threads, refused its own configs/gpu.pbtxt as "yours"."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.rundir import sha256
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = _own_copy(laid_out, tmp_path)
    out, gpu = tmp_path / "out", repo / "cnn_onnx" / "configs" / "gpu.pbtxt"
    deploy(run, DeployConfig(out=str(out)))
    written, marker = gpu.read_text(), json.loads((out / "cnnpack-deploy.json").read_text())
    _manifest(run, lambda m: m["stages"].pop("deploy"))  # as `cnnpack train --force` leaves the new run
    build(run, TritonConfig(repository=str(repo), threads=2, ensemble=True))  # (a gpu config that differs now)
    for damaged in ({**marker, "repository_sha256": {}},  # an older cnnpack's marker: no digest to tell an edit by
                    {**marker, "repository": str(tmp_path / "other")}):  # another repository's configs
        (out / "cnnpack-deploy.json").write_text(json.dumps(damaged))
        with pytest.raises(UserInputError, match=f"{re.escape(str(gpu))} is not a config a deploy wrote"):
            deploy(run, DeployConfig(out=str(out)))
        assert gpu.read_text() == written
    (out / "cnnpack-deploy.json").write_text(json.dumps(marker))
    again = deploy(run, DeployConfig(out=str(out)))  # its own, as the deployment's marker records it
    assert gpu.read_text() != written  # the gpu overlay's config of the model laid out now
    assert not any(n.startswith("replaced (--force)") for n in again["notes"])
    recorded = json.loads((run / "cnnpack.json").read_text())["stages"]["deploy"]["repository_files"]
    assert recorded == again["repository_sha256"] == {"cnn_onnx/configs/gpu.pbtxt": sha256(gpu)}
    # a deploy without the gpu overlay leaves the earlier one's config in place: its marker names it still
    assert deploy(run, DeployConfig(out=str(out), gpu="no"))["repository_sha256"] == recorded
    _manifest(run, lambda m: m["stages"].pop("deploy"))
    build(run, TritonConfig(repository=str(repo), threads=1, ensemble=True))
    deploy(run, DeployConfig(out=str(out)))
    gpu.write_text(gpu.read_text() + "# tuned by hand\n")  # edited since: the user's, recorded or not
    _manifest(run, lambda m: m["stages"].pop("deploy"))
    build(run, TritonConfig(repository=str(repo), threads=1, ensemble=True))
    with pytest.raises(UserInputError, match=f"{re.escape(str(gpu))} is not a config a deploy wrote"):
        deploy(run, DeployConfig(out=str(out)))


def test_object_storage_is_triton_s_repository_with_credentials_only_by_reference(base, deployed):
    s3 = _container(_of(base["s3"], "Deployment"))
    assert "--model-repository=s3://models-bucket/cnn" in s3["args"]
    assert all("valueFrom" in e and e["valueFrom"]["secretKeyRef"]["name"] == "triton-s3" for e in s3["env"])
    assert {e["name"] for e in s3["env"]} >= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    gs = _of(base["gs"], "Deployment")["spec"]["template"]["spec"]
    assert gs["serviceAccountName"] == "triton-reader" and "env" not in gs["containers"][0]
    azure = _container(_of(base["as"], "Deployment"))
    assert {e["name"] for e in azure["env"]} == {"AZURE_STORAGE_ACCOUNT", "AZURE_STORAGE_KEY"}
    # KServe's Azure Secret has no account key (Triton takes it from the URL): one Secret serves both
    assert {e["name"]: e["valueFrom"]["secretKeyRef"].get("optional", False) for e in azure["env"]} == {
        "AZURE_STORAGE_ACCOUNT": True, "AZURE_STORAGE_KEY": False}
    isvc = _yaml(deployed["as"] / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]
    assert isvc["model"]["storageUri"] == "https://account.blob.core.windows.net/container/cnn"
    assert isvc["serviceAccountName"] == "cnn-onnx-storage"  # lists the Secret: KServe's way to reference it
    assert _yaml(deployed["as"] / "kserve" / "serviceaccount.yaml")["secrets"] == [{"name": "triton-azure"}]
    # the stock NGC image serves it: the image ensemble (Pillow) stays behind, and says so
    record = json.loads((deployed["s3"] / "cnnpack-deploy.json").read_text())
    assert record["models"] == ["cnn_onnx"] and "cnn_onnx_image" in record["notes"][0]
    assert "aws s3 sync" in (deployed["s3"] / "README.md").read_text()


def test_the_startup_window_said_is_the_one_the_probe_allows(deployed):
    """With object storage the terminal and the README said 66 s (the fallback + the download) and the probe allowed
    70 s (whole 5 s periods)."""
    for store, folder in deployed.items():
        record = json.loads((folder / "cnnpack-deploy.json").read_text())
        said = {k: record["figures"][k]["value"] for k in ("startup_s", "startup_gpu_s")}
        probes = {"startup_s": _container(_of(_base_objects(folder), "Deployment"))["startupProbe"],
                  "startup_gpu_s": _container(_yaml(folder / "kubernetes/overlays/gpu/gpu.yaml"))["startupProbe"]}
        assert {k: p["failureThreshold"] * p["periodSeconds"] for k, p in probes.items()} == said, store
        assert f"- startup window {said['startup_s']} s (gpu overlay {said['startup_gpu_s']} s)" in (
            folder / "README.md").read_text()
    s3 = json.loads((deployed["s3"] / "cnnpack-deploy.json").read_text())["figures"]["startup_s"]
    assert "to download the repository" in s3["source"] and s3["source"].endswith("up to whole 5 s probe periods")


def _base_objects(folder: Path) -> list[dict]:
    names = _yaml(folder / "kubernetes" / "base" / "kustomization.yaml")["resources"]
    return [_yaml(folder / "kubernetes" / "base" / n) for n in names]


def test_an_image_tag_of_the_users_own_is_pulled_at_each_start_and_changed_models_roll_out(base, deployed, laid_out,
                                                                                          tmp_path):
    """The content tag names the models: a node may keep its copy. A tag given with --image stays when the models
    change: cached, it would serve (or fill the volume with) the old ones, and the unchanged pod template would not
    roll out."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.deploy.kube import CONTENT_ANNOTATION

    tag = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())["content_tag"]
    ours = _of(base["image"], "Deployment")
    assert _container(ours)["imagePullPolicy"] == "IfNotPresent"
    assert ours["spec"]["template"]["metadata"]["annotations"][CONTENT_ANNOTATION] == tag
    assert _of(base["pvc"], "Job")["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] == "IfNotPresent"
    for store in ("image", "pvc"):
        r = deploy(laid_out, DeployConfig(out=str(tmp_path / store), model_store=store, image="reg.example.com/cnn:v1"))
        objects = _base_objects(Path(r["out"]))
        dep, filler = _of(objects, "Deployment"), _of(objects, "Job") if store == "pvc" else None
        assert dep["spec"]["template"]["metadata"]["annotations"][CONTENT_ANNOTATION] == r["content_tag"]
        own = filler["spec"]["template"]["spec"]["containers"][0] if filler else _container(dep)
        assert own["image"] == "reg.example.com/cnn:v1" and own["imagePullPolicy"] == "Always"
        if filler:  # the stock NGC image runs the pod: its release tag is fixed bytes
            assert _container(dep)["imagePullPolicy"] == "IfNotPresent"
        readme = (Path(r["out"]) / "README.md").read_text()
        assert "push it again after each `cnnpack deploy`" in readme
        assert "# kind load" not in readme and "deploy without `--image`" in readme  # a loaded image is not pulled
        # KServe's predictor too: a new revision where storageUri and image read the same, a tag of yours pulled
        isvc = _yaml(Path(r["out"]) / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]
        assert isvc["annotations"][CONTENT_ANNOTATION] == r["content_tag"]
        if store == "image":  # (it runs the repository image where the image ensemble ships: Pillow)
            assert isvc["model"]["image"] == "reg.example.com/cnn:v1" and isvc["model"]["imagePullPolicy"] == "Always"
        assert not any("no --image" in n for n in r["notes"])
    assert "push it again" not in (deployed["image"] / "README.md").read_text()
    assert "# kind load docker-image" in (deployed["image"] / "README.md").read_text()
    default = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())
    assert [n for n in default["notes"] if "no --image" in n and "Docker Hub" in n]  # cnnpack/...: not the user's
    isvc = _yaml(deployed["image"] / "kserve" / "inferenceservice.yaml")
    assert isvc["spec"]["predictor"]["annotations"][CONTENT_ANNOTATION] == tag
    # KServe copies its labels onto its pods: the Deployment's Service, PDB and HPA must not select them
    selector = _of(base["image"], "Service")["spec"]["selector"]
    assert not selector.items() <= isvc["metadata"]["labels"].items()


def test_written_yaml_has_no_anchors_and_the_hpa_metric_counts_each_request_once(deployed):
    """A dict used twice (the Job's labels) is written out twice: an alias (&id001) is hard to review. The adapter's
    query counts requests at the classifiers (a request through the ensemble once) and queue time everywhere."""
    for folder in deployed.values():
        for path in folder.rglob("*.yaml"):
            text = path.read_text()
            assert not re.search(r"[&*]id\d+", text), path
    rule = _yaml(deployed["image"] / "kubernetes" / "prometheus-adapter" / "values.yaml")["rules"]["custom"][0]
    queue, requests = rule["metricsQuery"].split(" / ")
    assert "model=~" not in queue and requests.count(',model=~"cnn_onnx"}') == 1  # the classifier, by name
    # a rule and a metric of the deployment's own (the adapter's rules are the cluster's): its pods, not another's
    name = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())["name"]
    assert 'pod!=""' in rule["seriesQuery"] and "pod=~" not in rule["seriesQuery"]  # any pod name: the HPA names its own
    hpa = _yaml(deployed["image"] / "kubernetes" / "base" / "hpa.yaml")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"] == \
        f"triton_queue_us_per_request_{name.replace('-', '_')}"
    from types import SimpleNamespace

    from cnnpack.deploy.kube import classifiers_only

    plan = SimpleNamespace(classifiers=[("shapes_image", "onnx"), ("a.b", "onnx"), ("off", "onnx")],
                           models=["shapes_image", "a.b", "a.b_image", "a.b_preprocess"])  # `off`: not shipped
    assert classifiers_only(plan) == ',model=~"shapes_image|a[.]b"'  # a pattern took shapes_image for an ensemble


def test_an_out_that_is_a_link_is_written_through(laid_out, tmp_path):
    """A link to a folder (a GitOps checkout) stays a link; the folder it names holds the deployment."""
    from cnnpack.deploy import DeployConfig, deploy

    target, link = tmp_path / "gitops" / "deploy", tmp_path / "link"
    deploy(laid_out, DeployConfig(out=str(target)))
    link.symlink_to(target)
    deploy(laid_out, DeployConfig(out=str(link), replicas=2))
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert _of(_base_objects(target), "HorizontalPodAutoscaler")["spec"]["minReplicas"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gitops", "link"]  # nothing set aside and left


def test_upload_commands_are_quoted_for_the_shell(laid_out, tmp_path):
    import shlex

    from cnnpack.deploy import store as stores

    for url, program in (("s3://bucket/my models", "aws"), ("gs://bucket/my models", "gcloud"),
                         ("as://acct/cont/my models", "az")):
        (line,) = stores.upload_lines(stores.parse(url), "../my repo", ["cnn_onnx"])
        argv = shlex.split(line)
        assert argv[0] == program and "../my repo/cnn_onnx" in argv, line
        assert any(a.endswith("my models/cnn_onnx") or a == "my models/cnn_onnx" for a in argv), line


def test_upload_commands_leave_out_what_the_image_leaves_out():
    """aws and gcloud uploaded a local Triton's __pycache__ and a killed `cnnpack triton`'s staging folder into the
    bucket; their exclusion patterns (aws: fnmatch, `*` across `/`; gcloud: a Python regex from the start of the path
    in the folder) leave out exactly what the image and the content tag do."""
    import fnmatch
    import re
    import shlex
    from pathlib import Path

    from cnnpack.deploy import store as stores
    from cnnpack.deploy.plan import shipped_cache

    inside = ["1/model.onnx", "config.pbtxt", "1/model.py", "1/__pycache__/model.cpython-312.pyc", "1/stray.pyc",
              ".cnnpack-staging-ab12/1/model.onnx", "1/.cnnpack-staging-x/model.py", "labels.txt", "1/pycache.txt"]
    argv = shlex.split(stores.upload_lines(stores.parse("s3://bkt/m"), "repo", ["cnn_onnx"])[0])
    aws = [argv[i + 1] for i, a in enumerate(argv) if a == "--exclude"]
    argv = shlex.split(stores.upload_lines(stores.parse("gs://bkt/m"), "repo", ["cnn_onnx"])[0])
    gcloud = re.compile(argv[argv.index("--exclude") + 1])
    for rel in inside:
        left_out = shipped_cache(Path("cnn_onnx", rel))
        assert any(fnmatch.fnmatchcase(rel, p) for p in aws) == left_out, rel
        assert bool(gcloud.match(rel)) == left_out, rel
    assert sum(shipped_cache(Path("cnn_onnx", rel)) for rel in inside) == 4


def test_the_volume_is_filled_once_by_a_job_from_the_repository_image(base, deployed):
    objects = base["pvc"]
    job, dep = _of(objects, "Job"), _of(objects, "Deployment")
    record = json.loads((deployed["pvc"] / "cnnpack-deploy.json").read_text())
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == record["repository_image"]
    assert _container(dep)["image"] == record["ngc_image"]
    assert f"--model-repository=/models/{record['content_tag']}" in _container(dep)["args"]
    claim = _of(objects, "PersistentVolumeClaim")["metadata"]["name"]
    volumes = dep["spec"]["template"]["spec"]["volumes"]
    assert {"claimName": claim, "readOnly": True} in [v.get("persistentVolumeClaim") for v in volumes]
    # KServe's storageUri names that claim: `kubectl apply -f kserve/` makes it and fills it too
    kserve = deployed["pvc"] / "kserve"
    assert _yaml(kserve / "inferenceservice.yaml")["spec"]["predictor"]["model"]["storageUri"].startswith(
        f"pvc://{claim}/")
    for name in ("pvc.yaml", "fill-job.yaml"):
        assert (kserve / name).read_text() == (deployed["pvc"] / "kubernetes" / "base" / name).read_text()


def test_the_fill_job_keeps_the_current_content_and_two_earlier_ones_and_nothing_else_it_made(tmp_path):
    """The fill Job's own shell, run here on folders standing in for the image's /models and the volume: the volume
    filled up over model updates. Old contents and other contents' unfinished copies are removed, only those, before
    the copy; the copy is writable (an image's read-only folder could not be pruned later)."""
    import os
    import stat
    import subprocess

    from cnnpack.deploy.store import MOUNT, fill_script

    models, target = tmp_path / "models", tmp_path / "target"
    (models / "cnn_onnx" / "1").mkdir(parents=True)
    (models / "cnn_onnx" / "1" / "model.onnx").write_bytes(b"onnx")
    (models / "cnn_onnx" / "1").chmod(0o555)
    olds = [f"{i:012x}" for i in range(1, 5)]
    for age, name in enumerate([*olds, "notes", "0123", "111111111111.partial"]):  # the user's; a failed copy's
        (target / name).mkdir(parents=True)
        os.utime(target / name, (1e9 + age, 1e9 + age))
    script = fill_script("abcdef012345").replace("/target", str(target)).replace(MOUNT, str(models))
    for _ in range(2):  # once more: the content is there, nothing changes
        subprocess.run(["sh", "-ec", script], check=True)
        assert (target / "abcdef012345" / "cnn_onnx" / "1" / "model.onnx").read_bytes() == b"onnx"
        assert sorted(p.name for p in target.iterdir()) == sorted(["abcdef012345", *olds[2:], "notes", "0123"])
    assert (target / "abcdef012345" / "cnn_onnx" / "1").stat().st_mode & stat.S_IWUSR
    # removed before the copy: a copy that fails for want of room leaves the pruned volume for the retry
    script = fill_script("0123456789ab").replace("/target", str(target)).replace(MOUNT, str(tmp_path / "gone"))
    assert subprocess.run(["sh", "-ec", script], capture_output=True).returncode != 0
    assert sorted(p.name for p in target.iterdir()) == sorted(["abcdef012345", olds[3], "notes", "0123"])
    (models / "cnn_onnx" / "1").chmod(0o755)


def test_the_volume_is_mounted_by_every_replica_on_any_node_and_the_readme_says_what_storage_that_needs(base,
                                                                                                     deployed):
    hpa = _of(base["pvc"], "HorizontalPodAutoscaler")
    assert hpa["spec"]["maxReplicas"] > 1  # replicas (and the rollout's surge) land on other nodes
    # ReadWriteOnce attaches to one node only: the other nodes' pods would never start
    assert _of(base["pvc"], "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    readme = (deployed["pvc"] / "README.md").read_text()
    assert "ReadWriteMany" in readme and "StorageClass" in readme
    assert any("ReadWriteMany" in n for n in json.loads((deployed["pvc"] / "cnnpack-deploy.json").read_text())["notes"])


def test_sizes_come_from_the_run_tune_winner_and_measured_load(laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.rundir import sha256
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    shutil.copytree(json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["repository"], repo)
    _manifest(run, lambda m: m["stages"]["triton"].update(repository=str(repo)))
    plain = deploy(run, DeployConfig(out=str(tmp_path / "a")))
    assert plain["figures"]["cpu"]["value"] == 1 and plain["figures"]["startup_s"]["value"] == 300  # the fallback
    assert plain["figures"]["queue_target_us"]["source"] == ("the default 5 ms (no `cnnpack tune` budget in the run; "
                                                            "--queue-target-ms sets it)")
    # a tune that kept the served config (as good as its winner): its budget still sizes the target ("no budget")
    kept_point = {"label": "cnn_onnx (its config.pbtxt)", "model": "cnn_onnx", "default": True, "concurrency": 16,
                  "instances": 1, "threads": 1, "latency_ms_p50": 5.0, "latency_ms_p99": 10.0, "throughput_ips": 900.0}
    _manifest(run, lambda m: m["stages"].__setitem__("tune", {
        "status": "ok", "updated": "9999-01-01T00:00:00+00:00", "config": {"latency_budget_ms": 30.0}, "points": [kept_point], "written": None,
        "winner": {**kept_point, "label": "cnn_onnx x1 1t batching 0 us", "default": False},
        "verdict": {"as_good": True}}))
    kept = deploy(run, DeployConfig(out=str(tmp_path / "a"), force=True))["figures"]["queue_target_us"]
    assert kept["value"] == 10_000 and kept["source"].startswith(
        "half the headroom the served config (as tune measured it) left under the p99 budget (30 ms - 10.00 ms)")
    _manifest(run, lambda m: m["stages"]["tune"].update(updated="1970-01-01T00:00:00+00:00"))  # laid out since
    stale = deploy(run, DeployConfig(out=str(tmp_path / "a"), force=True))["figures"]["queue_target_us"]
    assert stale["value"] == 5000 and "(no tuned config in place;" in stale["source"]
    _manifest(run, lambda m: m["stages"].pop("tune"))
    assert not any("threads at 0" in n for n in plain["notes"])  # laid out with --threads 1
    _manifest(run, lambda m: m["stages"]["triton"]["config"].update(threads=0))  # as `cnnpack triton` lays it out
    unbounded = deploy(run, DeployConfig(out=str(tmp_path / "a"), force=True))["notes"]
    note = next(n for n in unbounded if "as large as the node's cores" in n)
    # the command as it can be pasted: the run, its repository, every setting it was laid out with but the threads
    # (a bare --threads was exit 2; one with --format alone reset the others to the defaults)
    command = re.search(r"bound it with `([^`]+)`", note).group(1)
    assert command.startswith(f"cnnpack triton --run {run} --repository {repo} --format onnx ") and \
        re.search(r" --threads \d+ --ensemble$", command)
    from typer.testing import CliRunner

    from cnnpack.cli.common import app

    laid = json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["config"]
    as_laid = re.sub(r"--threads \d+", "--threads 1", command)  # as its config.pbtxt is (the test sizes by it below)
    assert CliRunner().invoke(app, shlex.split(as_laid)[1:]).exit_code == 0  # it runs, and changes only the threads
    again = json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["config"]
    moved = ("threads", "repository")  # (this copy's repository is recorded in the section, its config the original's)
    assert {k: v for k, v in again.items() if k not in moved} == {k: v for k, v in laid.items() if k not in moved}
    _manifest(run, lambda m: m["stages"]["triton"]["config"].update(threads=1))
    config = repo / "cnn_onnx" / "config.pbtxt"
    config.write_text(config.read_text() + "# written by tune\n")  # (a comment: the same config to Triton)

    def tuned_and_served(m):
        winner = {"label": "cnn_onnx x2 1t batching 500 us", "model": "cnn_onnx", "instances": 2, "threads": 1,
                  "default": False, "concurrency": 16, "throughput_ips": 900.0, "latency_ms_p50": 2.0,
                  "latency_ms_p99": 4.0}
        m["stages"]["tune"] = {"status": "ok", "config": {"latency_budget_ms": 20.0}, "points": [winner],
                               "verdict": {"as_good": False}, "winner": winner,
                               "written": {"model": "cnn_onnx", "config": str(config), "sha256": sha256(config)}}
        m["stages"]["served"] = {"status": "ok", "server_load_s": 30.0, "server_peak_rss_bytes": 600 << 20,
                                 "repository": str(repo), "versions": {"cnn_onnx": m["stages"]["triton"]["version"]},
                                 "triton_files": {k: v["sha256"] for k, v in m["stages"]["triton"]["files"].items()}}

    _manifest(run, tuned_and_served)
    r = deploy(run, DeployConfig(out=str(tmp_path / "b")))
    f = r["figures"]
    assert f["cpu"]["value"] == 2 and "tuned winner" in f["cpu"]["source"]
    assert f["startup_s"]["value"] == 150 and f["queue_target_us"]["value"] == 8000  # 5 x 30 s; (20 - 4) / 2 ms
    assert f["memory_mib"]["value"] == 1856  # 600 MiB x 1.5 x 2 instances / 1 = 1800, up to a multiple of 64
    dep = _yaml(tmp_path / "b" / "kubernetes" / "base" / "deployment.yaml")
    assert _container(dep)["startupProbe"]["failureThreshold"] * _container(dep)["startupProbe"]["periodSeconds"] == 150
    assert _container(dep)["resources"]["limits"] == {"cpu": "2", "memory": "1856Mi"}
    # laid out again: config.pbtxt holds triton's settings, so the pod is sized from those, not the tuned winner's
    section = build(run, TritonConfig(repository=str(repo), threads=1, ensemble=True))
    assert section["tune_replaced"] == str(config) and "# written by tune" not in config.read_text()
    again = deploy(run, DeployConfig(out=str(tmp_path / "c")))["figures"]
    assert again["cpu"]["value"] == 1 and "tuned winner" not in again["cpu"]["source"]
    assert again["memory_mib"]["value"] == 960 and again["startup_s"]["value"] == 150  # the layout served: measured
    # laid out again with other settings, or elsewhere: the served stage's memory and load time are not of it
    build(run, TritonConfig(repository=str(repo), threads=1, instances=4, ensemble=True))
    other = deploy(run, DeployConfig(out=str(tmp_path / "d")))["figures"]
    build(run, TritonConfig(repository=str(tmp_path / "repo2"), threads=1, ensemble=True))
    elsewhere = deploy(run, DeployConfig(out=str(tmp_path / "e")))["figures"]
    for figures, why in ((other, "`cnnpack triton` laid the repository out again since the served stage measured it"),
                         (elsewhere, f"the served stage measured {repo}, not the repository shipped")):
        assert figures["startup_s"]["value"] == 300 and figures["startup_s"]["source"].startswith(
            f"no measured load time ({why}): the fallback")
        assert figures["memory_mib"]["source"].startswith(f"no measured memory ({why}), an estimate of ")
    # the estimate grows with each model's instances (it was 512 MiB + 4x the files, whatever the instances: a pod
    # of 7 models at 3 instances sized at a sixth of its measured peak)
    assert "cnn_onnx 4 x " in other["memory_mib"]["source"] and "cnn_onnx 1 x " in elsewhere["memory_mib"]["source"]
    assert other["memory_mib"]["value"] >= elsewhere["memory_mib"]["value"] + 3 * 112 * 1.5 - 64


# -- bad input: one line, exit 2, nothing written -----------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--name", "Cnn_ONNX"], "is not a valid DNS-1123 label for the objects: lowercase letters, digits and '-'"),
    (["--model-store", "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENG@bucket/models"], "carries credentials"),
    (["--model-store", "gs://bucket/models?X-Goog-Signature=abc"], "carries a signature or key"),
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--gpu", "maybe"], "--gpu 'maybe'; valid: auto, yes, no"),
    (["--model-store", "ftp://host/models"], "use image, pvc, or an object-store URL"),
    (["--credentials-secret", "s3"], "--credentials-secret is for object storage"),
    (["--queue-target-ms", "inf"], "--queue-target-ms must be a finite number, got inf"),
    (["--queue-target-ms", "4e6"], "--queue-target-ms must be > 0 and under an hour, got 4000000.0"),
    (["--queue-target-ms", "0.1"], "--queue-target-ms 0.1 is under 1 ms"),
    (["--replicas", "99999999999999999999"], "--replicas must be <= 2147483647"),
    (["--image", "reg.example.com/x@sha256:" + "0" * 64], "names a digest; deploy writes the command that builds"),
    (["--model-store", "s3://my models/cnn"], "'my models' is not an S3 bucket name (3-255 letters"),
    (["--model-store", "as://acct/c/cnn"], "'c' is not an Azure container name"),
    (["--model-store", "s3://minio:9000/"], "names an endpoint but no bucket: e.g. s3://host:port/bucket/path"),
    (["--model-store", "s3://bkt/m", "--credentials-secret", "a", "--service-account", "b"],
     "--credentials-secret and --service-account are two ways to reach the bucket"),
    (["--model-store", "as://acct/cont/m", "--service-account", "b"], "Triton's Azure client signs in with an account"),
    # a trailing newline passed the `$` of the checks and went into every manifest; a tag Docker refuses
    (["--image", "foo:1\n"], "--image 'foo:1\\n' is not an image reference"),
    (["--image", "foo:t\u00e4g"], "--image 'foo:t\u00e4g' is not an image reference"),
    (["--name", "abc\n"], "is not a valid DNS-1123 label"),
    (["--model-store", "s3://bucket/m\n"], "holds '\\n': a control character"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(laid_out, tmp_path, args, message):
    out = tmp_path / "out"
    proc = _cnnpack("deploy", "--run", str(laid_out), "--out", str(out), *args)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert not out.exists()


def test_an_out_that_is_or_lies_under_a_file_is_refused_and_the_file_kept(laid_out, tmp_path):
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        proc = _cnnpack("deploy", "--run", str(laid_out), "--out", str(out))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.endswith(f"{tmp_path / 'afile'} is a file, not a folder; choose another --out\n")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_bad_name_gets_a_valid_suggestion(laid_out, tmp_path):
    proc = _cnnpack("deploy", "--run", str(laid_out), "--out", str(tmp_path / "o"), "--name", "1st_Model.v2")
    suggestion = re.search(r"e\.g\. --name (\S+)$", proc.stderr.strip()).group(1)
    from cnnpack.deploy import check_name

    assert check_name(suggestion) == "st-model-v2"


def test_a_run_whose_repository_holds_no_verified_model_is_refused_as_tune_does(laid_out, tiny_run, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy

    run = tmp_path / "run"
    shutil.copytree(laid_out, run)
    _manifest(run, lambda m: m["stages"].pop("verify"))
    with pytest.raises(UserInputError, match="holds no model that passed `cnnpack verify`"):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    with pytest.raises(MissingStageError, match=r"`cnnpack deploy` needs a successful `triton` stage in .*; run "
                                                r"`cnnpack export --run .*`, then `cnnpack verify` and `cnnpack "
                                                r"triton` first"):  # (triton alone would fail: nothing exported)
        deploy(tiny_run, DeployConfig(out=str(tmp_path / "out")))
    # verified, then a version verify never saw laid out (a new export): refused, not shipped
    shutil.rmtree(run)
    shutil.copytree(laid_out, run)
    repo = tmp_path / "repo"
    shutil.copytree(json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["repository"], repo)
    _manifest(run, lambda m: m["stages"]["triton"].update(repository=str(repo)))
    shutil.copytree(repo / "cnn_onnx" / "1", repo / "cnn_onnx" / "2")
    with open(repo / "cnn_onnx" / "2" / "model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserInputError, match=r"cnn_onnx/2/model.onnx is not the onnx artifact `cnnpack verify` "
                                             r"checked; run `cnnpack triton --run .* --format onnx` to lay that one out"):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    # the latest version laid out by another run (two runs sharing one repository): said, with what mends it
    side = json.loads((repo / "cnn_onnx" / "cnnpack-model.json").read_text())
    side["versions"]["2"] = {**side["versions"]["1"], "run": str(tmp_path / "another-run")}
    (repo / "cnn_onnx" / "cnnpack-model.json").write_text(json.dumps(side))
    with pytest.raises(UserInputError, match=r"model.onnx is version 2 of cnn_onnx, laid out from another run \(.*"
                                             r"another-run\), and Triton serves the latest version; run `cnnpack "
                                             r"triton --run .* --format onnx` to lay this run's out again"):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_an_out_with_a_different_deployment_is_refused_and_kept_unless_force(deployed, laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy

    out = tmp_path / "out"
    shutil.copytree(deployed["image"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    marker = json.loads((out / "cnnpack-deploy.json").read_text())
    (out / "cnnpack-deploy.json").write_text(json.dumps({**marker, "run": "/elsewhere/run"}))
    with pytest.raises(UserInputError, match=r"holds a different deployment \('cnn-onnx' of run /elsewhere/run\); "
                                             "choose another --out or pass --force to replace it"):
        deploy(laid_out, DeployConfig(out=str(out)))
    (out / "cnnpack-deploy.json").write_text(json.dumps(marker))
    with pytest.raises(UserInputError, match=r"holds this run's deployment 'cnn-onnx', and this one is named 'other' "
                                             r"\(--name\); pass --name cnn-onnx to update"):
        deploy(laid_out, DeployConfig(out=str(out), name="other"))
    before[out / "cnnpack-deploy.json"] = (out / "cnnpack-deploy.json").read_bytes()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("mine")
    for force in (False, True):  # a folder that is not a deployment (a run, a repository) is never replaced
        with pytest.raises(UserInputError, match="holds no cnnpack deployment; choose a new or empty folder"):
            deploy(laid_out, DeployConfig(out=str(tmp_path / "plain"), force=force))
    assert (tmp_path / "plain" / "notes.txt").read_text() == "mine"
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    repo = Path(json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]["repository"])
    gpu_config = repo / "cnn_onnx" / "configs" / "gpu.pbtxt"
    stamp = gpu_config.stat().st_ino, gpu_config.stat().st_mtime_ns  # an atomic rewrite is a new inode
    again = deploy(laid_out, DeployConfig(out=str(out), model_store="pvc"))  # the same deployment again: rewritten
    earlier = set(json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())["files"])
    assert again["replaced"] is True and again["removed"] == sorted(earlier - set(again["files"]))
    assert all(not (out / f).exists() for f in again["removed"])  # gone, and said (the CLI prints them)
    assert (gpu_config.stat().st_ino, gpu_config.stat().st_mtime_ns) == stamp  # not the repository's unchanged file
    assert deploy(laid_out, DeployConfig(out=str(out), name="other", force=True))["name"] == "other"
    assert _yaml(out / "kubernetes" / "base" / "service.yaml")["metadata"]["name"] == "other"


def test_this_runs_deployment_under_another_name_is_named_with_the_option_that_updates_it(deployed, laid_out,
                                                                                          tmp_path):
    """After `cnnpack triton --format torchscript` the run's deployment is named cnn-torchscript: the refusal said
    only "a different deployment" and offered --force, which wrote a second Deployment, Service, HPA and PDB that
    `kubectl apply -k` added beside the first's, still running."""
    from cnnpack.deploy import DeployConfig, deploy

    out = tmp_path / "out"
    shutil.copytree(deployed["pvc"], out)
    marker = json.loads((out / "cnnpack-deploy.json").read_text())
    (out / "cnnpack-deploy.json").write_text(json.dumps({**marker, "name": "cnn-torchscript"}))  # laid out before
    proc = _cnnpack("deploy", "--run", str(laid_out), "--out", str(out))
    assert proc.returncode == 2 and proc.stderr == (
        f"error: --out {out} holds this run's deployment 'cnn-torchscript', and this one is named 'cnn-onnx' (after "
        "cnn_onnx, the model the run serves); pass --name cnn-torchscript to update 'cnn-torchscript', or --force to "
        "write 'cnn-onnx' in its place: applied, its objects run beside those of 'cnn-torchscript', which `kubectl delete "
        "deployment,service,pdb,hpa,pvc,job -l app.kubernetes.io/name=cnn-torchscript` removes\n")
    updated = deploy(laid_out, DeployConfig(out=str(out), name="cnn-torchscript", model_store="pvc"))  # as it says
    assert updated["name"] == "cnn-torchscript" == _yaml(out / "kubernetes/base/deployment.yaml")["metadata"]["name"]


def test_a_rewrite_keeps_the_users_own_files_and_refuses_to_overwrite_one_unless_force(deployed, laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy

    out = tmp_path / "out"
    shutil.copytree(deployed["image"], out)
    mine = {"kubernetes/overlays/prod/kustomization.yaml": "resources: [../cpu]\n", "NOTES.txt": "mine\n"}
    for rel, text in mine.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
    again = deploy(laid_out, DeployConfig(out=str(out), replicas=3))  # the same deployment, rewritten
    assert again["kept"] == sorted(mine) and again["overwritten"] == []
    assert {rel: (out / rel).read_text() for rel in mine} == mine
    assert _yaml(out / "kubernetes" / "base" / "hpa.yaml")["spec"]["minReplicas"] == 3
    # a file of the user's own where this deployment now writes one: refused, everything kept; --force replaces it
    (out / "kubernetes/base/servicemonitor.yaml").unlink(missing_ok=True)
    marker = json.loads((out / "cnnpack-deploy.json").read_text())
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "kubernetes/base/servicemonitor.yaml").write_text("# mine\n")
    before[out / "kubernetes/base/servicemonitor.yaml"] = b"# mine\n"
    assert "kubernetes/base/servicemonitor.yaml" not in marker["files"]
    with pytest.raises(UserInputError, match=r"of yours \(not written by cnnpack, or edited since\) where this deployment writes now "
                                                 r"\(kubernetes/base/servicemonitor"):
        deploy(laid_out, DeployConfig(out=str(out), service_monitor=True))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    forced = deploy(laid_out, DeployConfig(out=str(out), service_monitor=True, force=True))
    assert forced["overwritten"] == ["kubernetes/base/servicemonitor.yaml"] and forced["kept"] == sorted(mine)
    assert _yaml(out / "kubernetes/base/servicemonitor.yaml")["kind"] == "ServiceMonitor"
    # a file deploy wrote and the user edited since: the user's now (it was replaced without a word)
    deploy(laid_out, DeployConfig(out=str(out), service_monitor=True))
    hpa = out / "kubernetes/base/hpa.yaml"
    hpa.write_text(hpa.read_text() + "# tuned by hand\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UserInputError, match=r"1 file\(s\) of yours .* \(kubernetes/base/hpa.yaml\)"):
        deploy(laid_out, DeployConfig(out=str(out), service_monitor=True))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    forced = deploy(laid_out, DeployConfig(out=str(out), service_monitor=True, force=True))
    assert forced["overwritten"] == ["kubernetes/base/hpa.yaml"] and "tuned by hand" not in hpa.read_text()
    monitor = out / "kubernetes/base/servicemonitor.yaml"  # one the new deployment no longer writes is kept
    monitor.write_text(monitor.read_text() + "# tuned by hand\n")
    kept = deploy(laid_out, DeployConfig(out=str(out)))
    assert "kubernetes/base/servicemonitor.yaml" in kept["kept"] and monitor.read_text().endswith("by hand\n")
    assert "kubernetes/base/servicemonitor.yaml" not in kept["removed"]  # (it said both "removed" and "kept")
    deploy(laid_out, DeployConfig(out=str(out), service_monitor=True, force=True))
    # a file of the user's own where the deployment needs a folder: a clash too, said as one
    shutil.rmtree(out / "kubernetes" / "overlays" / "cpu")
    (out / "kubernetes" / "overlays" / "cpu").write_text("mine")
    with pytest.raises(UserInputError, match=r"where this deployment writes now \(kubernetes/overlays/cpu\)"):
        deploy(laid_out, DeployConfig(out=str(out), service_monitor=True))


def test_the_same_deployment_again_is_not_rewritten_and_a_git_checkout_stays_clean(laid_out, tmp_path):
    """Deploying again with the same inputs rewrote the folder, said it replaced the earlier deployment and turned the
    marker's "replaced" true; with --out a git checkout it called every .git file the user's ("kept"), wrote them into
    the marker and copied the whole .git: `git status` showed the marker modified after each deploy."""
    from cnnpack.deploy import DeployConfig, deploy

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(out), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              capture_output=True, text=True, check=True).stdout

    out = tmp_path / "out"
    assert deploy(laid_out, DeployConfig(out=str(out)))["replaced"] is False
    (out / "NOTES.txt").write_text("mine\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "deployed")
    marker = (out / "cnnpack-deploy.json").read_bytes()
    inodes = {p: p.stat().st_ino for p in out.rglob("*") if p.is_file()}  # (`git status` rewrites .git/index)
    deploy(laid_out, DeployConfig(out=str(tmp_path / "other")))  # (the run's deploy stage: another folder's now)
    proc = _cnnpack("deploy", "--run", str(laid_out), "--out", str(out))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{out}  cnn-onnx: cnn_onnx, cnn_onnx_preprocess, "
                                                           "cnn_onnx_image (unchanged: ")
    assert "replaced" not in proc.stdout and "kept" not in proc.stdout and ".git" not in proc.stdout
    assert (out / "cnnpack-deploy.json").read_bytes() == marker and git("status", "--porcelain") == ""
    assert {p: p.stat().st_ino for p in out.rglob("*") if p.is_file() and ".git" not in p.parts} == {
        p: n for p, n in inodes.items() if ".git" not in p.parts}  # not rewritten at all
    stage = json.loads((laid_out / "cnnpack.json").read_text())["stages"]["deploy"]
    assert stage["out"] == str(out.resolve())  # the run's record says where its deployment is
    # another deployment: rewritten around the user's files; .git is none of them, and it is the same .git
    changed = deploy(laid_out, DeployConfig(out=str(out), replicas=2))
    assert changed["replaced"] is True and changed["kept"] == ["NOTES.txt"] and not changed["unchanged"]
    assert {line[:3] for line in git("status", "--porcelain").splitlines()} == {" M "}  # edits, nothing else
    assert ".git" not in (out / "cnnpack-deploy.json").read_text() and (out / ".git" / "refs" / "tags").is_dir()
    objects = [p for p in (out / ".git" / "objects").rglob("*") if p.is_file()]
    assert objects and all(p.stat().st_ino == inodes[p] for p in objects)  # the same files (linked), not copies
    assert git("log", "--format=%s") == "deployed\n"
    again = deploy(laid_out, DeployConfig(out=str(out), replicas=2))
    assert again["unchanged"] and again["replaced"] is False
    assert json.loads((out / "cnnpack-deploy.json").read_text())["replaced"] is True  # the write that made it


@pytest.mark.parametrize("marker", [b"[]", b"\xff\xfe", b'{"files": 5}', b'{"files": [{"a": 1}]}'])
def test_a_damaged_deployment_marker_is_refused_unless_force(deployed, laid_out, tmp_path, marker):
    from cnnpack.deploy import DeployConfig, deploy

    out = tmp_path / "out"
    shutil.copytree(deployed["image"], out)
    (out / "cnnpack-deploy.json").write_bytes(marker)
    with pytest.raises(UserInputError, match="cnnpack-deploy.json is unreadable; pass --force"):
        deploy(laid_out, DeployConfig(out=str(out)))
    assert deploy(laid_out, DeployConfig(out=str(out), force=True))["replaced"] is True


def test_a_deploy_that_cannot_write_its_folder_leaves_the_repository_alone_and_bytecode_is_not_shipped(laid_out,
                                                                                                       tmp_path):
    from cnnpack.deploy import DeployConfig, deploy

    repo = Path(json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]["repository"])
    earlier = {p: p.read_bytes() for p in repo.glob("*/configs/gpu.pbtxt")}  # the fixture's deploy wrote them
    for path in earlier:
        path.unlink()
    try:
        before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        blocked = tmp_path / "blocked"
        blocked.write_text("a file, so no folder can be made under it")
        with pytest.raises((UserInputError, OSError)):
            deploy(laid_out, DeployConfig(out=str(blocked / "out"), gpu="auto"))
        assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before  # no configs/gpu.pbtxt written
        assert not list(repo.glob("*/configs/gpu.pbtxt"))
    finally:
        for path, data in earlier.items():
            path.write_bytes(data)
    tag = deploy(laid_out, DeployConfig(out=str(tmp_path / "a")))["content_tag"]
    model = next(p for p in repo.iterdir() if p.is_dir())
    cache = model / "1" / "__pycache__" / "model.cpython-311.pyc"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(b"bytecode a local server left")
    killed = model / f"{STAGING_PREFIX}x1" / "1" / "model.onnx"  # what a `cnnpack triton` killed mid-publish leaves
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"\0" * 1_000_000)
    try:
        assert deploy(laid_out, DeployConfig(out=str(tmp_path / "b")))["content_tag"] == tag
        ignored = (tmp_path / "b" / "image" / "Dockerfile.dockerignore").read_text().splitlines()
        assert "**/__pycache__" in ignored and f"**/{STAGING_PREFIX}*" in ignored
        assert plans.make(laid_out).repository_bytes < 1_000_000  # the left-behind copy is no model to download
    finally:
        shutil.rmtree(cache.parent)
        shutil.rmtree(killed.parent.parent)


def test_the_deployment_is_a_stage_of_the_run_and_its_report_says_when_the_repository_moved_on(laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.report import write_report

    run = tmp_path / "run"
    shutil.copytree(laid_out, run)  # (the copy shares the fixture's repository)
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), replicas=2, gpu="no"))
    stage = json.loads((run / "cnnpack.json").read_text())["stages"]["deploy"]
    assert r["recorded"] is None and stage["status"] == "ok" and stage["out"] == str((tmp_path / "out").resolve())
    assert stage["content_tag"] == r["content_tag"] and stage["models"] == r["models"]
    write_report(run)
    report = (run / "report.md").read_text()
    assert "## Deployment (Kubernetes)" in report and r["content_tag"] in report and "changed since" not in report
    # deploy's notes and where each figure came from (a fallback where nothing was measured): not hidden in its folder
    assert r["notes"] and all(f"**Note**: {n}." in report for n in r["notes"])  # (a copy: the copied-run note)
    assert f"How each figure was reached: CPU: {r['figures']['cpu']['source']}; memory: " in report
    extra = Path(r["repository"]) / r["models"][0] / "notes.txt"
    extra.write_text("a file added to a shipped model folder")
    try:
        write_report(run)
        report = (run / "report.md").read_text()
        assert "**The repository changed since**" in report
        assert f"`cnnpack deploy --run {run} --out {(tmp_path / 'out').resolve()} --replicas 2 --gpu no`" in report
    finally:
        extra.unlink()


def test_a_verified_model_laid_out_under_a_name_of_its_own_is_shipped(laid_out, tmp_path):
    """`cnnpack triton --name shapes_image`: deploy said the repository held no verified model (or, beside a model of
    the default name, that this one 'did not pass verify'), though it is the very file verify checked."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    build(run, TritonConfig(repository=str(repo), threads=1, name="shapes_image"))
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no"))
    assert r["models"] == ["shapes_image"] and r["served_model"] == "shapes_image"
    build(run, TritonConfig(repository=str(repo), threads=1))  # the default name beside it: both ship
    build(run, TritonConfig(repository=str(repo), threads=1, name="mycnn"))
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no", force=True))
    assert {"cnn_onnx", "mycnn"} <= set(r["models"]) and not any("did not pass" in n for n in r["notes"])
    assert not any("threads" in n for n in r["notes"])
    # a shipped model other than the one the pod is sized for, on every core of the node: said too
    build(run, TritonConfig(repository=str(repo), force=True))
    build(run, TritonConfig(repository=str(repo), threads=1, name="mycnn"))
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no", force=True))
    also = [n for n in r["notes"] if n.startswith("cnn_onnx also leaves the runtime's threads at 0")]
    assert len(also) == 1 and also[0].endswith("--format onnx --threads N` (with the other options it was laid out "
                                                "with)") and also[0].count("other options") == 1, r["notes"]
    # and the pod is sized for the one that asks for the most, not only for the model laid out last
    cores = int(json.loads((run / "cnnpack.json").read_text())["machine"]["cpu_count"])
    assert r["served_model"] == "mycnn" and r["figures"]["cpu"]["value"] == cores
    assert cores == 1 or "of cnn_onnx's config, the most any shipped model asks for (mycnn: 1, 1 instance(s) x 1 " \
        "thread(s) of mycnn's config" in r["figures"]["cpu"]["source"]
    # a tune winner of mycnn sizes the pod while cnn_onnx, laid out last, asks for more: counted (it was skipped as the
    # served model, and mycnn compared with itself)
    from cnnpack.rundir import sha256

    build(run, TritonConfig(repository=str(repo), threads=1, instances=cores + 1, force=True))
    build(run, TritonConfig(repository=str(repo), threads=1, name="mycnn"))  # last: shipped under its own name
    mine = repo / "mycnn" / "config.pbtxt"
    winner = {"label": "mycnn x1 1t no batching", "model": "mycnn", "instances": 1, "threads": 1, "default": False,
              "concurrency": 4, "throughput_ips": 900.0, "latency_ms_p50": 2.0, "latency_ms_p99": 4.0}
    _manifest(run, lambda m: m["stages"].update(tune={
        "status": "ok", "config": {"latency_budget_ms": 50.0}, "points": [winner], "winner": winner,
        "verdict": {"as_good": False}, "written": {"model": "mycnn", "config": str(mine), "sha256": sha256(mine)}}))
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no", force=True))
    assert r["served_model"] == "mycnn" and r["figures"]["cpu"]["value"] == cores + 1
    assert r["figures"]["cpu"]["source"].startswith(f"{cores + 1} instance(s) x 1 thread(s) of cnn_onnx's config, "
                                                    "the most any shipped model asks for (mycnn: 1, 1 instance(s) x "
                                                    "1 thread(s) of the tuned winner")
    # a winner whose model is no longer shipped (another laid out last under its name) does not size the pod
    build(run, TritonConfig(repository=str(repo), threads=1, instances=cores + 1, force=True))
    r = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no", force=True))
    assert "mycnn" not in r["models"] and r["figures"]["cpu"]["source"].startswith(
        f"{cores + 1} instance(s) x 1 thread(s) of cnn_onnx's config ({cores + 1} instance(s), 1 threads)")


def test_a_run_replaced_while_deploy_read_it_gets_no_deployment(laid_out, tmp_path, monkeypatch):
    """`train --force` between deploy's reading of the run and its writing: deploy wrote the old model's deployment
    and recorded it in the new run. Now it writes nothing and records nothing."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.errors import StageFailed
    from cnnpack.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(laid_out, run)
    make = plans.make

    def make_then_replaced(*a, **k):
        plan = make(*a, **k)
        Run.create(run, Run.open(run).model_spec, force=True)
        return plan

    monkeypatch.setattr(plans, "make", make_then_replaced)
    with pytest.raises(StageFailed, match="was replaced by a new run .* nothing was recorded"):
        deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no"))
    assert not (tmp_path / "out").exists() and json.loads((run / "cnnpack.json").read_text())["stages"] == {}


def test_an_out_inside_the_repository_is_refused(laid_out):
    from cnnpack.deploy import DeployConfig, deploy

    repo = Path(json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]["repository"])
    with pytest.raises(UserInputError, match="inside the model repository"):
        deploy(laid_out, DeployConfig(out=str(repo / "deploy")))
    assert not (repo / "deploy").exists()


def test_an_out_that_holds_the_repository_is_refused_and_the_repository_left_alone(laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy

    run, repo = _own_copy(laid_out, tmp_path)
    out = tmp_path / "wrap"
    deploy(run, DeployConfig(out=str(out)))  # a deployment there first: a rewrite would replace the whole folder
    shutil.move(repo, out / "repo")
    (out / "repo" / "cnn_onnx_image" / "2").mkdir()  # an empty version folder: a copy of the files would drop it
    _manifest(run, lambda m: m["stages"]["triton"].update(repository=str(out / "repo")))
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    with pytest.raises(UserInputError, match=r"--out .*wrap holds the model repository .*wrap/repo, and deploy "
                                             r"replaces the whole folder"):
        deploy(run, DeployConfig(out=str(out)))
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    with pytest.raises(UserInputError, match=r"holds the run"):
        deploy(run, DeployConfig(out=str(tmp_path)))


def test_an_unparsable_config_pbtxt_is_one_line_exit_2_naming_the_file(laid_out, tmp_path):
    """The command that lays it out again gave the format alone: pasted, it put a model laid out for a GPU with 2
    instances back on the CPU with 1."""
    from typer.testing import CliRunner

    from cnnpack.cli.common import app
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = _own_copy(laid_out, tmp_path)
    build(run, TritonConfig(repository=str(repo), device="gpu", instances=2, ensemble=True))
    again = (f"cnnpack triton --run {run} --repository {repo} --format onnx --device gpu --instances 2 "
             "--ensemble")
    for model in ("cnn_onnx", "cnn_onnx_preprocess"):  # (the image ensemble's part: laid out by the same command)
        config = repo / model / "config.pbtxt"
        laid = config.read_text()
        with open(config, "a") as f:
            f.write("garbage {\n")
        before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
        for gpu in ("auto", "no"):  # not only for the gpu overlay's config: Triton would not load it either
            proc = _cnnpack("deploy", "--run", str(run), "--out", str(tmp_path / "out"), "--gpu", gpu)
            assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
            assert f"{config} is not a Triton model config" in proc.stderr and proc.stderr.endswith(f"`{again}`\n")
        assert not (tmp_path / "out").exists()
        assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
        assert CliRunner().invoke(app, shlex.split(again)[1:]).exit_code == 0  # pasted: laid out as it was
        assert config.read_text() == laid


def test_a_model_of_weights_older_than_the_runs_is_not_shipped(laid_out, tmp_path):
    """A training since verify (--resume, or trained again): deploy shipped the repository laid out before it, of
    the earlier weights, as verified."""
    import torch

    from cnnpack.deploy import DeployConfig, deploy

    run, _ = _own_copy(laid_out, tmp_path)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["epoch"] = 99
    torch.save(ckpt, run / "checkpoint.pt")
    record_new_weights(run)
    with pytest.raises(UserInputError, match=r"cnn_onnx serves onnx \(export/model.onnx\) was made from another "
                                             r"checkpoint.pt than the run holds now .*then `cnnpack verify`"):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_laid_out_model_without_a_passing_verdict_is_named_as_not_shipped(laid_out, tmp_path):
    """verify --formats onnx dropped the verdicts of artifacts changed since, and deploy shipped the rest, leaving
    those models out without a word (and advised bounding the threads of one it did not ship)."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = _own_copy(laid_out, tmp_path)
    export(run, ExportConfig(formats=("torchscript",), max_batch_size=16))  # exported and laid out, never verified
    build(run, TritonConfig(repository=str(repo), format="torchscript"))
    out = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert "cnn_torchscript" not in out["models"] and out["served_model"] == "cnn_onnx"
    assert ("not shipped: cnn_torchscript (has no verdict of `cnnpack verify` as its artifact is now): laid out in "
            f"{repo}, but only what passed verify ships; `cnnpack verify --run {run}` checks every artifact again"
            ) in out["notes"]
    assert not any("cnn_torchscript" in n or "torchscript --threads" in n for n in out["notes"] if "not shipped" not in n)
    # sized by what ships (cnn_onnx: 1 instance x 1 thread), not by the unshipped model laid out last (threads 0)
    cpu = out["figures"]["cpu"]
    assert cpu["value"] == 1 and "cnn_onnx's config (1 instance(s), 1 threads)" in cpu["source"], cpu


def test_a_copied_run_is_told_its_repository_is_the_original_runs(laid_out, deployed, tmp_path):
    """`cp -a runs/a runs/b`: b's manifest names a's repository, and deploy of b wrote its gpu configs there."""
    from cnnpack.deploy import DeployConfig, deploy

    assert not any("laid out from" in n for n in json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())[
        "notes"])  # the run itself: nothing to say
    copy = tmp_path / "copy"
    shutil.copytree(laid_out, copy)
    notes = deploy(copy, DeployConfig(out=str(tmp_path / "out")))["notes"]
    repo = json.loads((laid_out / "cnnpack.json").read_text())["stages"]["triton"]["repository"]
    assert (f"{repo} was laid out from another run ({laid_out.resolve()}; this run a copy of it?): deploy writes its "
            f"gpu configs there too; `cnnpack triton --run {copy} --repository NEW` gives this run a repository of its "
            "own") in notes


def test_a_missing_repository_or_version_is_said_as_such(laid_out, tmp_path):
    """By deploy and by tune alike (tune said 'holds no model that passed `cnnpack verify`')."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.rundir import Run
    from cnnpack.servable import servable

    run, repo = _own_copy(laid_out, tmp_path)
    repo.rename(tmp_path / "moved")
    missing = (rf"the run's model repository {repo} is missing .*; move it back, or lay it out again with `cnnpack "
               rf"triton --run {run} --repository {repo} --format onnx --ensemble`")
    with pytest.raises(UserInputError, match=missing):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    with pytest.raises(UserInputError, match=missing):
        servable(Run.open(run))
    (tmp_path / "moved").rename(repo)
    for gone in ("cnn_onnx", "cnn_onnx_preprocess"):  # not another model served in its place, nor an ensemble that
        (repo / gone).rename(tmp_path / gone)         # Triton cannot load without its preprocessing step
        with pytest.raises(UserInputError, match=rf"{repo / gone / 'config.pbtxt'} is missing \(deleted since `cnnpack "
                                                 rf"triton` laid {gone} out\); lay it out again with `cnnpack triton"):
            deploy(run, DeployConfig(out=str(tmp_path / "out")))
        (tmp_path / gone).rename(repo / gone)
    shutil.rmtree(repo / "cnn_onnx" / "1")
    with pytest.raises(UserInputError, match=rf"{repo / 'cnn_onnx'} has no version folder \(changed since `cnnpack "
                                             r"triton` laid it out\), so Triton has nothing to serve; lay it out again"):
        deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_the_dockerfile_pins_a_pillow_that_the_ngc_image_s_python_installs(deployed):
    from cnnpack.deploy.text import PILLOW, ngc_python

    record = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())
    assert record["ngc_image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"  # Ubuntu 22.04, Python 3.10
    dockerfile = (deployed["image"] / "image" / "Dockerfile").read_text()
    assert "pip install --no-cache-dir pillow==12.3.0\n" in dockerfile  # 13 needs Python >= 3.11
    assert "its Python is 3.10" in dockerfile
    assert ngc_python("nvcr.io/nvidia/tritonserver:26.06-py3") == "3.12" and PILLOW["3.12"] == "13.0.0"  # pt2's


def test_kserve_runs_the_image_ensemble_in_the_repository_image_and_the_stock_runtime_otherwise(deployed):
    record = json.loads((deployed["image"] / "cnnpack-deploy.json").read_text())
    assert "cnn_onnx_preprocess" in record["models"]  # a Python backend model that imports Pillow
    model = _yaml(deployed["image"] / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]["model"]
    # the stock runtime (the NGC image) has no Pillow: the model would fail to load and Triton exit
    assert model["image"] == record["repository_image"] and model["storageUri"] == f"oci://{record['repository_image']}"
    assert "runtimeVersion" not in model  # KServe would re-tag the repository image with it
    readme = (deployed["image"] / "README.md").read_text()
    assert f"in the repository image `{record['repository_image']}` in place of KServe's Triton runtime" in readme
    for store in ("pvc", "s3"):  # no ensemble shipped: KServe's own runtime, at the release that serves the models
        model = _yaml(deployed[store] / "kserve" / "inferenceservice.yaml")["spec"]["predictor"]["model"]
        assert model["runtimeVersion"] == "24.10-py3" and "image" not in model


def test_a_failed_write_keeps_the_old_deployment_and_leaves_no_temp_folder(deployed, laid_out, tmp_path, monkeypatch):
    from cnnpack.deploy import DeployConfig, deploy

    out = tmp_path / "out"
    shutil.copytree(deployed["image"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real, calls = Path.write_bytes, []

    def disk_full_on_the_fifth_file(self, data):
        calls.append(self)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_on_the_fifth_file)
    with pytest.raises(OSError, match="No space left"):
        deploy(laid_out, DeployConfig(out=str(out), replicas=2))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_gpu_yes_is_refused_for_a_repository_whose_models_run_only_on_the_cpu(laid_out, tmp_path):
    pytest.importorskip("openvino")
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    run = tmp_path / "run"
    shutil.copytree(laid_out, run)
    export(run, ExportConfig(formats=("openvino",), max_batch_size=16))
    verify(run, VerifyConfig(batch_sizes=(1,)))
    build(run, TritonConfig(repository=str(tmp_path / "repo"), format="openvino", threads=1))
    with pytest.raises(UserInputError, match="every model of the repository runs only on the CPU"):
        deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="yes"))
    assert not (tmp_path / "out").exists() and not list((tmp_path / "repo").rglob("configs"))
    auto = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert auto["overlays"] == ["cpu"] and not (tmp_path / "out" / "kubernetes" / "overlays" / "gpu").exists()


def test_the_smoke_script_is_valid_shell_and_uses_what_deploy_writes(deployed):
    script = ROOT / "scripts" / "k8s_smoke.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    assert "kubernetes/overlays/cpu" in text and (deployed["image"] / "kubernetes" / "overlays" / "cpu").is_dir()


# -- the Deployment's arguments on the real server ---------------------------------------------------------------
def local_args(container: dict, repository: Path, ports: dict[str, int]) -> list[str]:
    """The container's args as the local server runs them; only these values change, nothing else:
    the in-container repository (/models) -> the local repository the image was built from; each named
    containerPort -> a free local port (the probes and the Service address the ports by name, so the
    mapping is by name); the bind address 0.0.0.0 -> 127.0.0.1 (nothing here may listen beyond loopback)."""
    port_of = {p["containerPort"]: p["name"] for p in container["ports"]}
    mapped = []
    for arg in container["args"][1:]:  # [0] is `tritonserver`, which the image's entrypoint runs
        flag, _, value = arg.partition("=")
        if flag == "--model-repository":
            arg = f"{flag}={repository}"
        elif flag.endswith("-port"):
            arg = f"{flag}={ports[port_of[int(value)]]}"
        elif flag.endswith("-address"):
            assert value == "0.0.0.0"
            arg = f"{flag}=127.0.0.1"
        mapped.append(arg)
    return mapped


def _start(args: list[str], repository: Path, tmp_path: Path):
    from cnnpack import serve

    dist = serve.locate()
    env = serve.server_env(dist)
    serve.check_stub(dist, env)
    # Local only: the wheel's tritonserver has no native ONNX Runtime backend; cnnpack's Python-based one
    # stands in from this folder. The NGC container has the native backends in its default backend
    # directory, which is why the Deployment's args name none.
    backends = serve.build_backend_dir(dist, tmp_path / "backends")
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed by the caller's finalizer
    proc = subprocess.Popen([str(dist.binary), *args, f"--backend-directory={backends}"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, log


def _stop(proc, log) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()
    from support import assert_gone

    assert_gone(proc.pid)


@pytest.mark.triton
@pytest.mark.slow
def test_the_deployment_args_start_the_real_server_probes_answer_and_the_hpa_metrics_exist(deployed, laid_out, tmp_path):
    """Start-up within the startup probe's window, liveness and readiness on the named port, one inference,
    then every metric name of the HPA's adapter rule on /metrics; and the gpu overlay's args are accepted."""
    import numpy as np
    import tritonclient.http as http

    from cnnpack.ports import free_ports

    need_triton()
    folder = deployed["image"]
    record = json.loads((folder / "cnnpack-deploy.json").read_text())
    repository = Path(record["repository"])
    container = _container(_yaml(folder / "kubernetes" / "base" / "deployment.yaml"))
    ports = dict(zip(("http", "grpc", "metrics"), free_ports("127.0.0.1", 3)))
    args = local_args(container, repository, ports)
    changed = [a for a, b in zip(args, container["args"][1:]) if a != b]
    assert len(args) == len(container["args"]) - 1 and len(changed) == 7  # repository, 3 ports, 3 addresses
    url = lambda name, path: f"http://127.0.0.1:{ports[name]}{path}"  # noqa: E731
    startup = container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    proc, log = _start(args, repository, tmp_path)
    try:
        t0 = time.monotonic()
        while http_get(url(startup["httpGet"]["port"], startup["httpGet"]["path"]))[0] != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() - t0 < window, f"not ready within the startup probe's {window} s"
            time.sleep(0.2)
        for probe in ("livenessProbe", "readinessProbe"):
            get = container[probe]["httpGet"]
            assert http_get(url(get["port"], get["path"]))[0] == 200, probe
        index = json.loads(http_get(url("http", "/v2/repository/index"), "POST")[1])
        assert sorted(m["name"] for m in index if m.get("state") == "READY") == sorted(record["models"])
        client = http.InferenceServerClient(f"127.0.0.1:{ports['http']}")
        x = http.InferInput("input", [1, 3, 32, 32], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        client.infer(record["served_model"], [x])  # some metric families appear only once a model has served
        status, body = http_get(url("metrics", "/metrics"))
        metrics = {ln.split("{")[0].split()[0] for ln in body.decode().splitlines() if ln and not ln.startswith("#")}
    finally:
        _stop(proc, log)
    rule = _yaml(folder / "kubernetes" / "prometheus-adapter" / "values.yaml")["rules"]["custom"][0]
    used = set(re.findall(r"\bnv_[a-z_]+", rule["seriesQuery"] + " " + rule["metricsQuery"]))
    assert used == {"nv_inference_queue_duration_us", "nv_inference_request_success"}
    assert status == 200 and not used - metrics, f"missing on /metrics: {sorted(used - metrics)}"
    names = re.search(r'model=~"([^"]+)"', rule["metricsQuery"]).group(1).replace("[.]", ".").split("|")
    counted = set(re.findall(r'^nv_inference_request_success\{model="([^"]+)"', body.decode(), re.M))
    assert set(names) == {record["served_model"]} and set(names) <= counted  # the requests counted exist
    hpa = _yaml(folder / "kubernetes" / "base" / "hpa.yaml")
    assert [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]] == [rule["name"]["as"]]

    # the gpu overlay's args (--model-config-name=gpu): accepted, and each GPU model's configs/gpu.pbtxt chosen
    gpu = _container(next(d for d in yaml.safe_load_all(
        (folder / "kubernetes" / "overlays" / "gpu" / "gpu.yaml").read_text())))
    proc, log = _start(local_args({**container, "args": gpu["args"]}, repository, ports), repository, tmp_path)
    try:
        t0 = time.monotonic()
        while http_get(url("http", "/v2/health/live"))[0] != 200:
            assert proc.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        index = {m["name"]: m for m in json.loads(http_get(url("http", "/v2/repository/index"), "POST")[1])}
        if shutil.which("nvidia-smi") is None:  # no GPU here: Triton says it wanted one for exactly those models
            assert "KIND_GPU but no GPUs are available" in index["cnn_onnx"].get("reason", "")
            assert index["cnn_onnx_preprocess"]["state"] == "READY"  # no gpu.pbtxt: its config.pbtxt
        else:
            assert index["cnn_onnx"]["state"] == "READY"
    finally:
        _stop(proc, log)


def test_a_cpu_config_deploy_wrote_goes_once_a_tune_puts_the_model_back_on_the_cpu(laid_out, tmp_path):
    """A model laid out for a GPU gets configs/cpu.pbtxt (the base's); a tune's winner (a KIND_CPU config) then
    replaced its config.pbtxt. The stale cpu.pbtxt stayed, and where the base runs --model-config-name=cpu Triton
    served it: the instances and threads from before the tune. Now the next deploy removes it (and not one edited
    since, which is the user's), and the image's content tag is the repository's without it."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.deploy.plan import content_tag
    from cnnpack.rundir import Run
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.tune_handover import write_winner

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    build(run, TritonConfig(repository=str(repo), device="gpu"))
    first = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    cpu = repo / "cnn_onnx" / "configs" / "cpu.pbtxt"
    assert "cnn_onnx/configs/cpu.pbtxt" in first["repository_files_added"] and cpu.is_file()
    recorded = Run.open(run).read()["stages"]["deploy"]["repository_files"]
    assert set(recorded) == {"cnn_onnx/configs/cpu.pbtxt", "cnn_onnx/configs/gpu.pbtxt"}

    write_winner(Run.open(run), "cnn_onnx", cpu.read_text().replace("count: 1", "count: 2"))  # as tune writes it
    second = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert not cpu.exists() and second["repository_files_removed"] == ["cnn_onnx/configs/cpu.pbtxt"]
    assert "cnn_onnx/configs/cpu.pbtxt" not in second["repository_files_added"]
    assert (repo / "cnn_onnx" / "configs" / "gpu.pbtxt").is_file()  # the gpu overlay's, which still fits
    assert second["content_tag"] == content_tag(repo, second["models"]) != first["content_tag"]
    base = _container(_yaml(tmp_path / "out" / "kubernetes" / "base" / "deployment.yaml"))
    assert not any(a.startswith("--model-config-name") for a in base["args"])  # no model left on a GPU layout
    assert set(Run.open(run).read()["stages"]["deploy"]["repository_files"]) == {"cnn_onnx/configs/gpu.pbtxt"}

    # one the user wrote (or edited) stays: only what a deploy wrote, unchanged, is removed
    cpu.write_text("# mine\n")
    (repo / "cnn_onnx" / "configs" / "gpu.pbtxt").write_text("# mine too\n")
    third = deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no"))
    assert cpu.read_text() == "# mine\n" and third["repository_files_removed"] == []
    # a record names deploy's own configs only: a path out of the repository is never removed, whatever it holds
    outside = tmp_path / "outside" / "configs" / "cpu.pbtxt"
    outside.parent.mkdir(parents=True)
    outside.write_text("not deploy's")
    from cnnpack.rundir import sha256

    Run.open(run).update(lambda m: m["stages"]["deploy"]["repository_files"].update(
        {"../outside/configs/cpu.pbtxt": sha256(outside)}))
    assert deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no"))["repository_files_removed"] == []
    assert outside.read_text() == "not deploy's"


@pytest.mark.triton
@pytest.mark.slow
def test_a_cuda_pt2_package_stays_out_of_the_base_which_the_real_server_makes_ready(laid_out, tmp_path):
    """A pt2 package compiled for CUDA (`export --format pt2 --device cuda`, laid out with --device gpu) got a
    configs/cpu.pbtxt and the base loaded it on a pod without a GPU: no CPU runs its code, so Triton never became
    ready (--strict-readiness) and no pod of the cpu overlay ever served. The base now loads every other model
    (explicit model control); the gpu overlay loads them all. Planted: no CUDA here to compile such a package."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.rundir import sha256

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    shutil.copytree(json.loads((run / "cnnpack.json").read_text())["stages"]["triton"]["repository"], repo)
    (repo / "cnn_pt2" / "1").mkdir(parents=True)
    package = repo / "cnn_pt2" / "1" / "model.pt2"
    package.write_bytes(b"a package of CUDA kernels")
    (repo / "cnn_pt2" / "config.pbtxt").write_text(
        'name: "cnn_pt2"\nbackend: "pytorch"\nplatform: "torch_aoti"\nmax_batch_size: 16\n'
        'instance_group { count: 1 kind: KIND_GPU }\n')

    def planted(m):
        m["stages"]["triton"]["repository"] = str(repo)
        onnx = m["stages"]["export"]["artifacts"]["onnx"]
        m["stages"]["export"]["artifacts"]["pt2"] = {**onnx, "format": "pt2", "path": "export/model.pt2",
                                                     "sha256": sha256(package), "device": "cuda"}
        m["stages"]["verify"]["formats"]["pt2"] = {**m["stages"]["verify"]["formats"]["onnx"]}
        m["stages"]["verify"]["artifacts"]["pt2"] = {"sha256": sha256(package)}

    _manifest(run, planted)
    r = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert "cnn_pt2" in r["models"] and not (repo / "cnn_pt2" / "configs" / "cpu.pbtxt").exists()
    assert (repo / "cnn_pt2" / "configs" / "gpu.pbtxt").is_file()
    base = _container(_yaml(tmp_path / "out" / "kubernetes" / "base" / "deployment.yaml"))
    loaded = [a.removeprefix("--load-model=") for a in base["args"] if a.startswith("--load-model=")]
    assert "--model-control-mode=explicit" in base["args"] and set(loaded) == set(r["models"]) - {"cnn_pt2"}
    assert not any(a.startswith("--model-config-name") for a in base["args"])  # no other model laid out for a GPU
    assert "--model-control-mode=none" in r["args"]["gpu"] and not any("--load-model" in a for a in r["args"]["gpu"])
    assert any(n.startswith("cnn_pt2: a pt2 package compiled for CUDA") for n in r["notes"]), r["notes"]
    index = _ready_index(base, repo, tmp_path)
    assert index["cnn_onnx"] == "READY" and index.get("cnn_pt2") != "READY"


def test_a_shipped_int8_model_whose_last_quantize_failed_is_noted(laid_out, tmp_path):
    """After a `cnnpack quantize` that missed its gate, deploy ships the earlier int8 model: the note says which and
    under which gate it passed. (The gate here is wide: this test is of the note, not of the kernels' accuracy.)"""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.quantize import QuantizeConfig, quantize
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    run, repo = _own_copy(laid_out, tmp_path)
    quantize(run, QuantizeConfig(max_drop=100, min_agreement=0.01, max_steps=0))
    verify(run, VerifyConfig(batch_sizes=(1,)))
    build(run, TritonConfig(repository=str(repo), format="onnx_int8", threads=1))
    assert not [n for n in deploy(run, DeployConfig(out=str(tmp_path / "out")))["notes"] if "cnnpack quantize" in n]
    _manifest(run, lambda m: m["stages"].update(quantize={"status": "failed", "error": "missed the gate"}))
    notes = deploy(run, DeployConfig(out=str(tmp_path / "out")))["notes"]
    assert ("the last `cnnpack quantize` for onnx_int8 found no model within its gate; cnn_onnx_int8 ships the "
            "earlier onnx_int8 model, which passed `cnnpack verify` under the gate it was made with, not that one"
            ) in notes, notes


def test_gpu_no_is_refused_where_every_model_is_a_cuda_pt2_package(laid_out, tmp_path):
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.deploy.plan import make

    run = tmp_path / "run"
    shutil.copytree(laid_out, run)
    plan = make(run)
    plan.cuda_only = [m for m, _ in plan.classifiers]
    import cnnpack.deploy.plan as plans_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans_mod, "make", lambda *a, **k: plan)
        with pytest.raises(UserInputError, match=r"--gpu no, but every shipped model is a pt2 package compiled for "
                                                 r"CUDA \(cnn_onnx\): the cpu overlay would serve none"):
            deploy(run, DeployConfig(out=str(tmp_path / "out"), gpu="no"))
    assert not (tmp_path / "out").exists()


@pytest.mark.triton
@pytest.mark.slow
def test_a_repository_laid_out_for_a_gpu_gets_a_cpu_config_in_the_base_that_the_real_server_loads(laid_out, tmp_path):
    """`cnnpack triton --device gpu`: the base (cpu overlay) shipped config.pbtxt's KIND_GPU and TensorRT to a pod
    without a GPU, where Triton cannot load the model. Now the base serves configs/cpu.pbtxt, which loads here."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    build(run, TritonConfig(repository=str(repo), device="gpu"))
    laid = (repo / "cnn_onnx" / "config.pbtxt").read_bytes()
    assert b"KIND_GPU" in laid and b"tensorrt" in laid
    r = deploy(run, DeployConfig(out=str(tmp_path / "out")))
    assert (repo / "cnn_onnx" / "config.pbtxt").read_bytes() == laid  # the layout itself is left as it was
    cpu = (repo / "cnn_onnx" / "configs" / "cpu.pbtxt").read_text()
    assert "KIND_CPU" in cpu and "KIND_GPU" not in cpu and "tensorrt" not in cpu
    assert b"tensorrt" in (repo / "cnn_onnx" / "configs" / "gpu.pbtxt").read_bytes()  # the gpu overlay keeps it
    container = _container(_yaml(tmp_path / "out" / "kubernetes" / "base" / "deployment.yaml"))
    assert "--model-config-name=cpu" in container["args"] and "nvidia.com/gpu" not in container["resources"]["limits"]
    assert r["args"]["gpu"][-1] == "--model-config-name=gpu" and any("laid out for a GPU" in n for n in r["notes"])
    assert _ready_index(container, repo, tmp_path)["cnn_onnx"] == "READY"


def _ready_index(container: dict, repo: Path, tmp_path: Path) -> dict[str, str | None]:
    """The real local Triton started with a Deployment container's arguments, once ready (--strict-readiness):
    each model of its repository index -> its state. Skips where no local Triton runs."""
    from cnnpack.ports import free_ports

    need_triton()
    ports = dict(zip(("http", "grpc", "metrics"), free_ports("127.0.0.1", 3)))
    proc, log = _start(local_args(container, repo, ports), repo, tmp_path)
    try:
        t0 = time.monotonic()
        while http_get(f"http://127.0.0.1:{ports['http']}/v2/health/ready")[0] != 200:
            assert proc.poll() is None and time.monotonic() - t0 < 120, (tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.2)
        index = json.loads(http_get(f"http://127.0.0.1:{ports['http']}/v2/repository/index", "POST")[1])
        return {m["name"]: m.get("state") for m in index}
    finally:
        _stop(proc, log)


def test_configs_written_into_the_repository_before_a_failed_one_are_taken_back(tmp_path):
    from types import SimpleNamespace

    from cnnpack.deploy.configs import write

    (tmp_path / "a" / "configs").mkdir(parents=True)
    (tmp_path / "a" / "configs" / "gpu.pbtxt").write_bytes(b"the user's")
    (tmp_path / "b").mkdir()
    (tmp_path / "c").write_text("a file where a model folder would be")  # c/configs/gpu.pbtxt cannot be written
    configs = {"a/configs/gpu.pbtxt": b"new a", "b/configs/gpu.pbtxt": b"new b", "c/configs/gpu.pbtxt": b"new c"}
    with pytest.raises(OSError):
        write(SimpleNamespace(repository=tmp_path), configs)
    assert (tmp_path / "a" / "configs" / "gpu.pbtxt").read_bytes() == b"the user's"  # put back
    assert not (tmp_path / "b" / "configs").exists()  # removed, with the folder it made
    assert (tmp_path / "c").read_text() == "a file where a model folder would be"
    undo = write(SimpleNamespace(repository=tmp_path), {k: v for k, v in configs.items() if k[0] != "c"})
    assert (tmp_path / "b" / "configs" / "gpu.pbtxt").read_bytes() == b"new b"
    undo()  # what deploy calls when a step after the writes fails (removing stale configs, swapping --out in)
    assert (tmp_path / "a" / "configs" / "gpu.pbtxt").read_bytes() == b"the user's"
    assert not (tmp_path / "b" / "configs").exists()


def test_a_preprocessing_model_laid_out_by_another_cnnpack_is_named_with_the_command_that_updates_it(laid_out,
                                                                                                    tmp_path):
    """A layout copies the preprocessing model.py: a repository keeps an older cnnpack's until laid out again."""
    from cnnpack.deploy import DeployConfig, deploy

    run, repo = _own_copy(laid_out, tmp_path)
    with open(repo / "cnn_onnx_preprocess" / "1" / "model.py", "a") as f:
        f.write("# an older cnnpack's preprocessing\n")
    notes = deploy(run, DeployConfig(out=str(tmp_path / "out")))["notes"]
    assert (f"cnn_onnx_preprocess v1 runs the image preprocessing of another cnnpack version (its model.py is not "
            f"this one's); `cnnpack triton --run {run} --repository {repo} --name cnn_onnx --format onnx --ensemble` "
            "lays out the current one as a new version") in notes


def test_a_model_another_run_laid_out_in_the_repository_is_named_as_that_runs(laid_out, tmp_path):
    """deploy said "has no verdict of `cnnpack verify`" and advised verifying this run, which cannot help: the
    model's latest version was another run's."""
    from cnnpack.deploy import DeployConfig, deploy
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build

    run, repo = _own_copy(laid_out, tmp_path)
    other = tmp_path / "other"
    shutil.copytree(laid_out, other)
    export(other, ExportConfig(formats=("torchscript",), max_batch_size=16))
    build(other, TritonConfig(repository=str(repo), format="torchscript"))
    notes = deploy(run, DeployConfig(out=str(tmp_path / "out")))["notes"]
    assert any(f"not shipped: cnn_torchscript (laid out from another run, {other.resolve()}: verify this run's "
               "torchscript artifact and lay it out, or ship that run)" in n for n in notes), notes
