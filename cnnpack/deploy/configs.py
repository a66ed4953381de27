"""The configs `cnnpack deploy` writes into the model repository (Triton's custom model configurations):
`<model>/configs/gpu.pbtxt`, the gpu overlay's (KIND_GPU), and `configs/cpu.pbtxt`, the base's, of a model laid out
for a GPU. config.pbtxt, which `cnnpack serve` uses, is never touched. The run records what deploy wrote (and so does
the deployment's marker, with each one's sha256: `cnnpack train --force` keeps it), so that a later deploy tells its
own configs from a user's (which it does not write over without --force), and removes its own once they no longer
fit their model.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpack.atomic import atomic_write_bytes
from cnnpack.deploy.plan import read_config
from cnnpack.errors import UserInputError
from cnnpack.rundir import sha256
from cnnpack.triton_config import CPU_CONFIG, GPU_CONFIG

if TYPE_CHECKING:
    from collections.abc import Callable

    from cnnpack.deploy.plan import Plan


def wanted(plan, gpu: bool) -> dict[str, bytes]:
    """`<model>/configs/gpu.pbtxt` (relative to the repository) -> its text, for each GPU-capable model where the
    gpu overlay is written, and `configs/cpu.pbtxt` for each model laid out for a GPU (the base's)."""
    cpu = {f"{m}/configs/{CPU_CONFIG}.pbtxt": cpu_config(plan.repository / m) for m in plan.gpu_laid
           if m not in plan.cuda_only}  # a CUDA pt2 package has no CPU variant: the base does not load it
    return cpu | ({f"{m}/configs/{GPU_CONFIG}.pbtxt": gpu_config(plan.repository / m) for m in plan.gpu_models}
                  if gpu else {})


def cpu_config(folder: Path) -> bytes:
    """The config.pbtxt of a model laid out for a GPU, as Triton's custom config for a pod without one: KIND_CPU
    instance groups (same counts, no GPU ids), no GPU execution accelerator (TensorRT)."""
    from tritonclient.grpc import model_config_pb2 as pb

    from cnnpack.triton_repo import render

    mc = read_config(folder)
    for g in mc.instance_group:
        g.kind = pb.ModelInstanceGroup.KIND_CPU
        del g.gpus[:]
    mc.optimization.execution_accelerators.ClearField("gpu_execution_accelerator")
    return render(mc).encode()


def gpu_config(folder: Path) -> bytes:
    """The model's config.pbtxt with KIND_GPU instance groups (same counts), as Triton's custom config."""
    from tritonclient.grpc import model_config_pb2 as pb

    from cnnpack.triton_repo import render

    mc = read_config(folder)
    if not mc.instance_group:
        raise UserInputError(f"{folder / 'config.pbtxt'} has no instance_group to put on the GPU")
    for g in mc.instance_group:
        g.kind = pb.ModelInstanceGroup.KIND_GPU
    return render(mc).encode()


def users_configs(plan, configs: dict[str, bytes]) -> list[str]:
    """The configs deploy would write over that it did not write (a user's hand-tuned configs/gpu.pbtxt), or that
    were edited since it did: the repository is the user's too, and the bytes are theirs."""
    return sorted(rel for rel, data in configs.items() if (path := plan.repository / rel).is_file()
                  and path.read_bytes() != data and plan.deployed_files.get(rel) != sha256(path))


def stale_configs(plan: Plan) -> set[str]:
    """The configs/cpu.pbtxt and configs/gpu.pbtxt an earlier deploy wrote (unchanged since) that no longer fit their
    model: a cpu.pbtxt where config.pbtxt is no longer laid out for a GPU (a tune's winner, which is a CPU config,
    replaced it), a gpu.pbtxt of a model that cannot run on one. Triton would serve them over config.pbtxt (the
    base's --model-config-name=cpu, the gpu overlay's =gpu), with the instances and threads from before."""
    fits = {f"{m}/configs/{CPU_CONFIG}.pbtxt" for m in plan.gpu_laid if m not in plan.cuda_only} | {
        f"{m}/configs/{GPU_CONFIG}.pbtxt" for m in plan.gpu_models}
    ours = {f"configs/{CPU_CONFIG}.pbtxt", f"configs/{GPU_CONFIG}.pbtxt"}  # a record names nothing else (nor `..`)
    return {rel for rel, digest in plan.deployed_files.items() if rel not in fits
            and len(Path(rel).parts) == 3 and Path(rel).parts[0] not in ("..", ".")
            and "/".join(Path(rel).parts[1:]) in ours
            and (plan.repository / rel).is_file() and sha256(plan.repository / rel) == digest}


def write(plan, configs: dict[str, bytes]) -> Callable[[], None]:
    """Writes the configs into the repository, all or none; returns what takes them back."""
    done: list[tuple[Path, bytes | None, bool]] = []  # (path, its bytes before or None, its folder made here)

    def undo() -> None:
        for path, before, made in reversed(done):
            with contextlib.suppress(OSError):
                if before is None:
                    path.unlink()
                    if made:
                        path.parent.rmdir()
                else:
                    atomic_write_bytes(path, before)

    try:
        for rel, data in configs.items():
            path = plan.repository / rel
            before = path.read_bytes() if path.is_file() else None
            if before != data:  # unchanged: left alone (a polling Triton reloads a model whose files were rewritten)
                made = not path.parent.exists()
                atomic_write_bytes(path, data)
                done.append((path, before, made))
    except BaseException:  # all or nothing: the configs written before the failure are taken back
        undo()
        raise
    return undo


def remove_stale(plan, stale: set[str]) -> None:
    """Removes the configs an earlier deploy wrote that no longer fit their model (`stale_configs`), and the
    `configs/` folder they leave empty (a config of the user's own there stays)."""
    for rel in sorted(stale):
        path = plan.repository / rel
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()


def repository_files(plan, gpu_configs: dict[str, bytes], stale: set[str]) -> dict[str, str]:
    """The configs deploys of this run wrote into the repository and that are there as written, path -> sha256:
    this one's, and an earlier one's still in place (a later deploy removes the ones that no longer fit)."""
    kept = {rel: d for rel, d in plan.deployed_files.items() if rel not in stale and rel not in gpu_configs
            and (plan.repository / rel).is_file() and sha256(plan.repository / rel) == d}
    return kept | {rel: hashlib.sha256(data).hexdigest() for rel, data in gpu_configs.items()}
