"""The pod's memory: the local server's measured peak with headroom, or an estimate per model instance.

The estimate's figures are the local Triton's own (benchmarks/results/served-memory-*.md): one model at a time, at 1
and at 3 instances, after requests at batch 1 and at its max batch size. The local server runs cnnpack's Python-based
backends (each instance a stub process that imports its runtime: a TorchScript instance imports torch), which hold
more than the NGC image's native, in-process ones: an upper bound, as the measured peak is. What a model costs grows
with its instances, not once per backend: the 64 px CNN's ONNX Runtime model took 168 MiB at 1 instance and 387 at
3, its TorchScript model 642 and 1,796, and the seven models of the default pipeline's repository 1,201 and 3,416,
within 5 % of the server's base plus each model's per-instance figure. Before that
measurement the estimate was 512 MiB plus 4x the model files: 576 MiB for that repository at 3 instances, a sixth of
its peak, a pod the kernel would have killed.
"""

from __future__ import annotations

from pathlib import Path

MiB = 1 << 20
HEADROOM = 1.5  # over the measured peak, and over the estimate
FLOOR_MIB = 512
SERVER_MIB = 64  # the server and its ensemble scheduler, no model's instance
# per instance of a model, by the backend that runs it (cnnpack's local one, measured with the 64 px CNN at batch 64:
# its arena included; the native backend of the same name holds less);
# each also holds its model file (x FILE_FACTOR: the file, its runtime's copy and its prepacked form) and activations
# for its max batch (x INPUT_FACTOR of the input: the largest activation of a CNN is a few times its input)
INSTANCE_MIB = {"onnxruntime": 112, "openvino": 136, "pytorch": 584, "python": 64, "ensemble": 0}
INSTANCE_OTHER_MIB = 584  # a backend not measured: as much as the largest
FILE_FACTOR = 4
INPUT_FACTOR = 8
# the gpu overlay: host memory of each backend that runs a model on CUDA (the CUDA runtime, cuDNN/cuBLAS handles);
# not measured (no GPU where these figures were taken): an allowance, said so in the deployment's README
CUDA_HOST_MIB = 1024
DTYPE_BYTES = {"TYPE_FP32": 4, "TYPE_FP16": 2, "TYPE_BF16": 2, "TYPE_UINT8": 1, "TYPE_INT8": 1, "TYPE_INT64": 8,
               "TYPE_INT32": 4}


def backend_of(mc) -> str:
    """The Triton backend that runs a model config: onnxruntime, openvino, pytorch, python, ensemble, or its own."""
    if mc.platform == "ensemble":
        return "ensemble"
    if mc.platform in ("onnxruntime_onnx",) or mc.backend == "onnxruntime":
        return "onnxruntime"
    if mc.platform in ("pytorch_libtorch", "torch_aoti") or mc.backend == "pytorch":
        return "pytorch"
    return mc.backend or mc.platform or "unknown"


def instances_of(mc) -> int:
    return sum(max(1, g.count) for g in mc.instance_group) or (0 if mc.platform == "ensemble" else 1)


def input_bytes(mc) -> int:
    """Bytes of the model's inputs at its max batch size (strings, e.g. encoded images, count 0)."""
    from tritonclient.grpc import model_config_pb2 as pb

    total = 0
    for i in mc.input:
        n = DTYPE_BYTES.get(pb.DataType.Name(i.data_type), 0)
        for d in i.dims:
            n *= max(1, d)
        total += n * max(1, mc.max_batch_size)
    return total


def instance_mib(mc, file_bytes: int) -> float:
    """What one instance of the model holds, by the estimate."""
    fixed = INSTANCE_MIB.get(backend_of(mc), INSTANCE_OTHER_MIB)
    return fixed + (FILE_FACTOR * file_bytes + INPUT_FACTOR * input_bytes(mc)) / MiB if fixed else 0.0


def estimate(configs: dict, files: dict[str, int], counts: dict[str, int]) -> tuple[float, str]:
    """MiB the server holds with these models (name: ModelConfig) at these instance counts, and how it was reached."""
    per = {m: instance_mib(mc, files.get(m, 0)) for m, mc in configs.items()}
    mib = SERVER_MIB + sum(per[m] * counts[m] for m in configs)
    parts = ", ".join(f"{m} {counts[m]} x {per[m]:.0f}" for m in configs if per[m])
    return mib, (f"{SERVER_MIB} MiB for the server + per model, instances x MiB each ({parts}): the local server's "
                 "measured memory per instance of each backend (benchmarks/results/served-memory-*.md), plus "
                 f"{FILE_FACTOR}x the model file and {INPUT_FACTOR}x its input at the max batch size")


def rounded(mib: float) -> int:
    return int(-(-mib // 64) * 64)


def gpu_allowance(configs: dict, gpu_models: list[str]) -> tuple[int, list[str]]:
    """MiB the gpu overlay adds: CUDA_HOST_MIB for each backend that runs a model on the GPU, and those backends."""
    backends = sorted({backend_of(configs[m]) for m in gpu_models if m in configs})
    return CUDA_HOST_MIB * len(backends), backends


def model_bytes(repository: Path, model: str, skip) -> int:
    return sum(f.stat().st_size for f in (repository / model).rglob("*")
               if f.is_file() and not skip(f.relative_to(repository)))
