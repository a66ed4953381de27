"""A small PyTorch backend for Triton (TorchScript and AOTInductor `.pt2` packages), written as a Triton
*Python-based backend*.

`cnnpack serve` copies this file to `<backend-dir>/pytorch/model.py` (with `cnnpack_batching.py`
beside it). Triton 2.51 looks for `libtriton_pytorch.so` for a model whose config says
`platform: "pytorch_libtorch"` (or `backend: "pytorch"`); when that native backend is absent it
falls back to `<backend-dir>/pytorch/model.py` and runs it with the Python backend. So the same
model repository runs unchanged here and in the NGC container. (2.51 predates `platform:
"torch_aoti"`: `cnnpack serve` hands it such a model's config without that line, see
cnnpack/triton_release.py; the model file is the same.)

What it honours from config.pbtxt, as the native PyTorch backend names it:
- `default_model_filename` (default `model.pt`, a TorchScript archive; a `.pt2` file is an
  AOTInductor package, run with `torch._inductor.aoti_load_package` on the device it was compiled for);
- `parameters` `INTRA_OP_THREAD_COUNT` / `INTER_OP_THREAD_COUNT` (0 or absent: torch's default);
- the `<name>__<index>` convention: input `INPUT__0` is forward argument 0, output `OUTPUT__1`
  element 1 of the returned tuple (other names: config order);
- `max_batch_size`; a KIND_GPU instance runs on its GPU when torch has CUDA.
All requests of one `execute` call run as **one** batch, as the native backend does with the
dynamic batcher. It depends on numpy and torch only (never on cnnpack).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils
from cnnpack_batching import int_param, io_spec, run_batched


def set_threads(torch, config):
    intra, inter = int_param(config, "INTRA_OP_THREAD_COUNT"), int_param(config, "INTER_OP_THREAD_COUNT")
    if intra > 0:
        torch.set_num_threads(intra)
    if inter > 0:
        try:
            torch.set_num_interop_threads(inter)  # possible only before the first parallel op of the process
        except RuntimeError as e:
            pb_utils.Logger.log_warn(f"INTER_OP_THREAD_COUNT={inter} not applied: {e}")


def load(torch, path, device):
    """A TorchScript archive (torch.jit.load) or an AOTInductor package (.pt2, aoti_load_package)."""
    if path.endswith(".pt2"):
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the package loads on the current CUDA device
        return torch._inductor.aoti_load_package(path)
    return torch.jit.load(path, map_location=device).eval()


class TritonPythonModel:
    def initialize(self, args):
        import torch

        config = json.loads(args["model_config"])
        set_threads(torch, config)
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.pt")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{path} not found (version folder {args['model_version']})")
        gpu = args.get("model_instance_kind") == "GPU" and torch.cuda.is_available()
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.module = load(torch, path, self.device)
        self.torch = torch
        self.inputs = io_spec(config, "input", by_index=True)
        self.outputs = io_spec(config, "output", by_index=True)
        self.batching = config.get("max_batch_size", 0) > 0
        pb_utils.Logger.log_info(f"cnnpack pytorch backend: {path} on {self.device}, {torch.get_num_threads()} threads")

    def infer(self, feeds):
        torch = self.torch
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name, _ in self.inputs]
        with torch.inference_mode():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        if len(out) < len(self.outputs):
            raise ValueError(f"the model returned {len(out)} tensors, config.pbtxt declares {len(self.outputs)} outputs")
        return [t.detach().cpu().numpy() for t in out[: len(self.outputs)]]

    def execute(self, requests):
        # An exception here fails every request of this call with its message; the server lives on.
        return run_batched(requests, self.inputs, self.outputs, self.batching, self.infer)

    def finalize(self):
        self.module = None
