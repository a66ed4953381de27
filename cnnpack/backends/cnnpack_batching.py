"""What cnnpack's two Python-based Triton backends share: config reading and one-batch execution.

`cnnpack serve` copies this file next to each backend's `model.py` (`<backend-dir>/onnxruntime/`,
`<backend-dir>/pytorch/`); Triton puts a Python-based backend's folder on `sys.path`, so the
backends import it by its (deliberately unique) module name. Depends only on numpy and
triton_python_backend_utils, never on cnnpack.
"""

import re

import numpy as np
import triton_python_backend_utils as pb_utils

INDEXED = re.compile(r".+__(\d+)$")


def int_param(config, key):
    """An integer `parameters` entry of config.pbtxt; 0 when absent or empty."""
    value = config.get("parameters", {}).get(key, {}).get("string_value", "")
    try:
        return int(value) if value else 0
    except ValueError:
        raise pb_utils.TritonModelException(f"parameter {key}={value!r} is not an integer") from None


def io_spec(config, key, *, by_index=False):
    """[(name, numpy dtype)] of the config's "input" or "output" list, in config order.

    With `by_index`, names following the `<name>__<index>` convention (INPUT__0, OUTPUT__1) are
    ordered by that index, as the libtorch backend maps them to forward arguments / results.
    """
    specs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config[key]]
    found = [INDEXED.fullmatch(name) for name, _ in specs]
    if by_index and all(found):
        return [s for _, s in sorted(zip((int(m.group(1)) for m in found), specs), key=lambda t: t[0])]
    return specs


def run_batched(requests, inputs, outputs, batching, infer):
    """Runs all requests of one execute call as one batch: concatenate on dim 0, one `infer`, split back.

    `infer(feeds: dict[str, ndarray]) -> list[ndarray]` in the order of `outputs`. Without
    batching (max_batch_size 0: no batch dim) each request runs alone.
    """
    if not batching:
        return [_respond(outputs, infer(_feeds(r, inputs))) for r in requests]
    per_request = [_feeds(r, inputs) for r in requests]
    sizes = [next(iter(f.values())).shape[0] for f in per_request]
    feeds = {name: np.concatenate([f[name] for f in per_request]) if len(per_request) > 1 else per_request[0][name]
             for name, _ in inputs}
    results = infer(feeds)  # each (sum(sizes), ...)
    cuts = np.cumsum(sizes)[:-1]
    split = [np.split(r, cuts) for r in results]  # per output: one slice per request
    return [_respond(outputs, [s[i] for s in split]) for i in range(len(requests))]


def _feeds(request, inputs):
    return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name, _ in inputs}


def _respond(outputs, arrays):
    tensors = [pb_utils.Tensor(name, np.ascontiguousarray(a, dtype=dtype)) for (name, dtype), a in zip(outputs, arrays)]
    return pb_utils.InferenceResponse(output_tensors=tensors)
