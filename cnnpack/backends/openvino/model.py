"""A small OpenVINO backend for Triton, written as a Triton *Python-based backend*.

`cnnpack serve` copies this file to `<backend-dir>/openvino/model.py` (with `cnnpack_batching.py`
beside it). For a model whose config says `backend: "openvino"`, Triton looks for
`libtriton_openvino.so` and, when that native backend is absent, runs this file with the Python
backend instead. So the same model repository runs unchanged here and in the NGC container, whose
native OpenVINO backend reads the same files and parameters.

What it honours from config.pbtxt, as Triton's OpenVINO backend names it:
- `default_model_filename` (default `model.xml`, with its `.bin` beside it) in the version folder;
- `parameters` `INFERENCE_NUM_THREADS`, `NUM_STREAMS`, `PERFORMANCE_HINT` (LATENCY | THROUGHPUT),
  `HINT_BF16` (YES: bf16 inference precision where the CPU has it);
- input/output names and data types; `max_batch_size`.
All requests of one `execute` call run as **one** batch. It depends on numpy and openvino only.
"""

import json
import os

import triton_python_backend_utils as pb_utils
from cnnpack_batching import io_spec, run_batched


def _param(config, key):
    return config.get("parameters", {}).get(key, {}).get("string_value", "").strip()


def compile_config(config):
    out = {"PERFORMANCE_HINT": _param(config, "PERFORMANCE_HINT") or "LATENCY"}
    for key in ("INFERENCE_NUM_THREADS", "NUM_STREAMS"):
        if _param(config, key):
            out[key] = _param(config, key)
    out["INFERENCE_PRECISION_HINT"] = "bf16" if _param(config, "HINT_BF16").upper() == "YES" else "f32"
    return out


class TritonPythonModel:
    def initialize(self, args):
        import openvino as ov

        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"],
                            config.get("default_model_filename") or "model.xml")
        for f in (path, os.path.splitext(path)[0] + ".bin"):
            if not os.path.isfile(f):
                raise pb_utils.TritonModelException(f"{f} not found (version folder {args['model_version']})")
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(path), "CPU", compile_config(config))
        self.request = self.compiled.create_infer_request()
        self.inputs, self.outputs = io_spec(config, "input"), io_spec(config, "output")
        names = {n for port in self.compiled.inputs for n in port.get_names()}
        missing = [n for n, _ in self.inputs if n not in names]
        if missing:
            raise pb_utils.TritonModelException(
                f"config.pbtxt inputs {missing} are not inputs of {path} (it has {sorted(names)})")
        self.batching = config.get("max_batch_size", 0) > 0
        pb_utils.Logger.log_info(f"cnnpack openvino backend: {path} on CPU, "
                                 f"{json.dumps(compile_config(config))}")

    def infer(self, feeds):
        result = self.request.infer(feeds)
        return [result[self.compiled.output(name)] for name, _ in self.outputs]

    def execute(self, requests):
        return run_batched(requests, self.inputs, self.outputs, self.batching, self.infer)

    def finalize(self):
        self.request = self.compiled = None
