"""`cnnpack deploy`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, handles_errors
from cnnpack.errors import shell


@app.command()
@handles_errors
def deploy(
    run: Path = typer.Option(..., help="Run directory with verified models laid out by `cnnpack triton`."),
    out: Optional[Path] = typer.Option(None, help="Folder to write (default: <run>/deploy)."),
    name: Optional[str] = typer.Option(None, help="Name of the Kubernetes objects, a DNS-1123 label "
                                                  "(default: the served model's, e.g. cnn-onnx)."),
    model_store: str = typer.Option("image", help="How the repository reaches the pod: image (baked into an image "
                                                  "FROM the NGC one) | pvc (a volume a Job fills) | s3://... | gs://... "
                                                  "| as://... (Triton reads it)."),
    image: Optional[str] = typer.Option(None, help="The repository image to build and run (image, pvc; default "
                                                   "cnnpack/<name>:<content tag>)."),
    credentials_secret: Optional[str] = typer.Option(None, help="Object storage: the Secret holding the credentials "
                                                                "(its name only)."),
    service_account: Optional[str] = typer.Option(None, help="Object storage (s3, gs): a ServiceAccount bound to "
                                                             "a cloud identity (workload identity); instead of "
                                                             "--credentials-secret."),
    replicas: int = typer.Option(1, help="Replicas at least (the HPA's minimum)."),
    max_replicas: int = typer.Option(4, help="Replicas at most (the HPA's maximum)."),
    gpu: str = typer.Option("auto", help="The gpu overlay: auto (when a model can run on a GPU) | yes | no."),
    service_monitor: bool = typer.Option(False, help="Add a ServiceMonitor (monitoring.coreos.com/v1; needs the "
                                                     "Prometheus Operator)."),
    queue_target_ms: Optional[float] = typer.Option(None, help="Average queue time per request above which the HPA "
                                                               "adds replicas (default: from the run's tune budget, "
                                                               "else 5 ms)."),
    force: bool = typer.Option(False, help="Replace an --out that holds a different deployment, and overwrite what deploy would otherwise keep: files you edited in --out, and configs/gpu.pbtxt files of your own in the model repository."),
    as_json: bool = typer.Option(False, "--json", help="Print what cnnpack-deploy.json records."),
):
    """Write what a Kubernetes cluster needs to serve the run's verified Triton repository.

    A kustomize base with cpu and gpu overlays (Deployment of the NGC Triton image with the same flags as `cnnpack serve`, Service, PodDisruptionBudget, HPA on Triton's queue time), the prometheus-adapter rule for that metric, a KServe InferenceService, and the Dockerfile or volume or object-store wiring that brings the repository to the pod. Nothing is applied: the folder's README.md has the exact commands.

    Example: cnnpack deploy --run runs/demo --image registry.example.com/ml/cnn, then the steps in runs/demo/deploy/README.md (build and push the image, kubectl apply -k runs/demo/deploy/kubernetes/overlays/cpu)

    Example (object storage, credentials by reference): cnnpack deploy --run runs/demo --model-store s3://bucket/models --credentials-secret triton-s3
    """
    from cnnpack.deploy import DeployConfig
    from cnnpack.deploy import deploy as do_deploy

    cfg = DeployConfig(out=str(out) if out else None, name=name, model_store=model_store, image=image,
                       credentials_secret=credentials_secret, service_account=service_account, replicas=replicas,
                       max_replicas=max_replicas, gpu=gpu, service_monitor=service_monitor,
                       queue_target_ms=queue_target_ms, force=force)
    record = do_deploy(run, cfg)
    emit(record, as_json)
    if not as_json:
        _report(record)
    if record.get("recorded"):  # the folder is complete; only the run's report will not show it
        typer.echo(f"note: the deployment is not recorded in the run ({record['recorded']}); its report will not "
                   "show it", err=True)


def _report(r: dict) -> None:
    out, f = Path(r["out"]), r["figures"]
    typer.echo(f"{out}  {r['name']}: {', '.join(r['models'])}"
               + (" (replaced the earlier deployment there)" if r.get("replaced") else "")
               + (" (unchanged: the folder holds this deployment already, not rewritten)" if r.get("unchanged") else ""))
    if r.get("removed"):
        typer.echo(f"  removed  {', '.join(r['removed'])} (not part of this deployment)")
    if r.get("kept") and not r.get("unchanged"):  # (nothing was written around them)
        typer.echo(f"  kept     {', '.join(r['kept'])} (yours: not written by cnnpack, or edited since)")
    if r.get("overwritten"):
        typer.echo(f"  replaced {', '.join(r['overwritten'])} (your own, with --force)")
    build = f"(build: {out / 'README.md'})"
    same = r["repository_image"] == r["image"]  # --model-store image: the served image carries the repository
    typer.echo(f"  image    {r['image']}" + (f" {build}" if same else ""))
    if r["repository_image"] and not same:  # --model-store pvc: a job copies it from this image to the volume
        typer.echo(f"  build    {r['repository_image']}, the image the volume is filled from {build}")
    gpu_mib = f" ({f['memory_gpu_mib']['value']} MiB in the gpu overlay)" if "memory_gpu_mib" in f else ""
    typer.echo(f"  pod      {f['cpu']['value']} CPU, {f['memory_mib']['value']} MiB{gpu_mib}, startup window "
               f"{f['startup_s']['value']} s; HPA on queue time > {f['queue_target_us']['value']} us per request")
    for overlay in r["overlays"]:
        typer.echo(f"  apply    kubectl apply -k {shell(out / 'kubernetes' / 'overlays' / overlay)}")
    typer.echo(f"  kserve   kubectl apply -f {shell(out / 'kserve')}")
    for path in r["repository_files_added"]:
        gpu = path.endswith("/gpu.pbtxt")
        typer.echo(f"  {'gpu' if gpu else 'cpu'} cfg  {Path(r['repository']) / path} ("
                   + ("the gpu overlay's KIND_GPU config)" if gpu else "the base's KIND_CPU config of a model laid "
                      "out for a GPU)"))
    for path in r["repository_files_removed"]:
        typer.echo(f"  removed  {Path(r['repository']) / path} (an earlier deploy's, no longer fits its model)")
    for note in r["notes"]:
        typer.echo(f"note: {note}", err=True)
