"""A small ONNX Runtime backend for Triton, written as a Triton *Python-based backend*.

`cnnpack serve` copies this file to `<backend-dir>/onnxruntime/model.py` (with
`cnnpack_batching.py` beside it). Triton 2.51 looks for `libtriton_onnxruntime.so` for a model
whose config says `platform: "onnxruntime_onnx"`; when that native backend is absent it falls back
to `<backend-dir>/onnxruntime/model.py` and runs it with the Python backend (the served config then
says `runtime: "model.py"`). So the same model repository runs unchanged here and in the NGC
container, which has the native backend.

What it honours from config.pbtxt, as the native ONNX Runtime backend names it:
- `default_model_filename` (default `model.onnx`) in the version folder;
- `parameters` `intra_op_thread_count` / `inter_op_thread_count` (0 or absent: ORT's default) and
  `execution_mode` (0 sequential, 1 parallel: inter-op threads matter only then);
- input/output names and data types; `max_batch_size`; a KIND_GPU instance runs on CUDA when
  this onnxruntime has it.
All requests of one `execute` call run as **one** batch, as the native backend does with the
dynamic batcher. It depends on numpy and onnxruntime only (never on cnnpack).
"""

import json
import os

import triton_python_backend_utils as pb_utils
from cnnpack_batching import int_param, io_spec, run_batched


def session_options(ort, config):
    opts = ort.SessionOptions()
    intra, inter = int_param(config, "intra_op_thread_count"), int_param(config, "inter_op_thread_count")
    if intra > 0:
        opts.intra_op_num_threads = intra
    if inter > 0:
        opts.inter_op_num_threads = inter
    if int_param(config, "execution_mode") == 1:  # as the native backend: 0 sequential (default), 1 parallel
        opts.execution_mode = ort.ExecutionMode.ORT_PARALLEL
    return opts


def providers(ort, args):
    """CPU, or CUDA on the instance's GPU for a KIND_GPU instance group."""
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.onnx")
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"{path} not found (version folder {args['model_version']})")
        self.session = ort.InferenceSession(path, sess_options=session_options(ort, config),
                                            providers=providers(ort, args))
        self.inputs, self.outputs = io_spec(config, "input"), io_spec(config, "output")
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = [n for n, _ in self.inputs if n not in graph_inputs]
        if missing:
            raise pb_utils.TritonModelException(
                f"config.pbtxt inputs {missing} are not inputs of {path} (it has {sorted(graph_inputs)})")
        self.output_names = [n for n, _ in self.outputs]
        self.batching = config.get("max_batch_size", 0) > 0
        opts = self.session.get_session_options()
        pb_utils.Logger.log_info(f"cnnpack onnxruntime backend: {path} on {self.session.get_providers()[0]}, "
                                 f"intra_op_threads={opts.intra_op_num_threads or 'default'}, "
                                 f"inter_op_threads={opts.inter_op_num_threads or 'default'}")

    def infer(self, feeds):
        return self.session.run(self.output_names, feeds)

    def execute(self, requests):
        # An exception here fails every request of this call with its message; the server lives on.
        return run_batched(requests, self.inputs, self.outputs, self.batching, self.infer)

    def finalize(self):
        self.session = None
