"""Talking to a served model: Triton's own clients (HTTP or gRPC) with timeouts and one-line errors.

    client = Client("127.0.0.1:8001", "grpc")       # or Client(None, "http"): 127.0.0.1:8000
    model = client.model("cnn_onnx")                 # what the server's config says: input, size, batching
    logits = client.infer(model, batch)              # (N, C, H, W) raw pixels -> (N, K)
    top = client.infer(model, batch, class_count=3)  # classification extension: (N, 3) b"score:index:label"

`cnnpack infer`, the `triton` runtime (so verify and bench) and bench's load generator all go through
here, so an absent, dead or stuck server reads the same everywhere: one line naming the URL, what
failed and what to do, within the client timeout; never a hang, never a traceback.
An unreachable server at the start is a usage error (wrong --url, nothing serving: exit 2); a
server that fails later is a failed stage (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import time
import urllib.parse
from dataclasses import dataclass, field

import numpy as np

from cnnpack.errors import StageFailed, UserInputError

PROTOCOLS = ("http", "grpc")
PROTOCOL_NAMES = {"http": "HTTP", "grpc": "gRPC"}  # as a sentence names them
DEFAULT_PORTS = {"http": 8000, "grpc": 8001}  # Triton's defaults, and `cnnpack serve`'s
MAX_TIMEOUT_S = 1_000_000  # 11.6 days; gRPC's deadline overflowed past ~1e9 s and every call failed at once
DEFAULT_TIMEOUT_S = 30.0
NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "BYTES": np.object_}


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise UserInputError(f"--protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def address(url: str | None, protocol: str, flag: str = "--url") -> str:
    """`host:port` as tritonclient wants it, from `host`, `host:port` or `http://host:port` / `grpc://…`.

    No URL: 127.0.0.1 on Triton's default port of the protocol (HTTP 8000, gRPC 8001). `flag` is the option
    that gave the URL, as the errors name it.
    """
    check_protocol(protocol)
    text = (url or "").strip() or "127.0.0.1"
    scheme, sep, rest = text.partition("://")
    if sep:
        if scheme not in PROTOCOLS:
            raise UserInputError(f"{flag} {url!r}: scheme {scheme!r}; use http://HOST:PORT or grpc://HOST:PORT")
        if scheme != protocol:
            raise UserInputError(f"{flag} {url!r} is a {scheme} URL but --protocol is {protocol}; "
                                 f"pass --protocol {scheme} or a {protocol} address")
        text = rest
    try:
        parts = urllib.parse.urlsplit("//" + text.rstrip("/"))
    except ValueError as e:  # `http://[::1`: an IPv6 address without its bracket closed
        raise UserInputError(f"{flag} {url!r}: not a HOST:PORT address ({e}); an IPv6 host goes in brackets, "
                             "[::1]:8000") from None
    try:
        port = parts.port
    except ValueError:
        raise UserInputError(f"{flag} {url!r}: the port is not a number in 1-65535") from None
    if port == 0 or (port is None and text.rstrip("/").endswith(":")):  # not quietly the default port
        raise UserInputError(f"{flag} {url!r}: the port is not a number in 1-65535")
    port = port or DEFAULT_PORTS[protocol]
    if not parts.hostname or parts.path or parts.query or parts.fragment or "#" in text:
        raise UserInputError(f"{flag} {url!r} is not HOST[:PORT] (e.g. 127.0.0.1:{DEFAULT_PORTS[protocol]})")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def host_and_port(address: str) -> tuple[str, int]:
    """The host (IPv6 without its brackets) and port of an `address` result."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _quiet_gevent_interrupts() -> None:
    """tritonclient.http runs its calls in gevent, whose hub prints a Ctrl-C that lands in one of its greenlets (a
    traceback's last line and a timestamp, above cnnpack's "error: interrupted") before raising it in the caller as
    it should: it is not printed (it is still raised)."""
    with contextlib.suppress(Exception):  # another gevent: it prints, nothing worse
        import gevent

        hub = gevent.get_hub()
        if not issubclass(KeyboardInterrupt, hub.NOT_ERROR):
            hub.NOT_ERROR = (*hub.NOT_ERROR, KeyboardInterrupt)


def _client_errors() -> tuple[type[BaseException], ...]:
    """What tritonclient raises for a failed call: its own exception, socket errors, aiohttp's."""
    from tritonclient.utils import InferenceServerException

    errors: list[type[BaseException]] = [InferenceServerException, OSError, EOFError, asyncio.TimeoutError]
    for module, name in (("aiohttp", "ClientError"), ("geventhttpclient.response", "HTTPParseError"),
                         ("gevent", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def timed_out(e: BaseException) -> bool:
    return isinstance(e, (TimeoutError, asyncio.TimeoutError)) or "Deadline Exceeded" in str(e) or \
        type(e).__name__ == "Timeout"  # gevent's


def reason(e: BaseException) -> str:
    """An exception from a client call as one short line."""
    text = str(e).strip() or type(e).__name__
    if timed_out(e):
        return "no answer before the client timeout"
    if isinstance(e, OSError) and e.strerror:
        text = e.strerror
    line = " ".join(text.split())
    return line if len(line) <= 240 else line[:237] + "..."


def _gone(e: BaseException) -> bool:
    """Whether a failed call means the server is not (or no longer) there, rather than a rejected request.

    Decided by the exception's type where the transport has one (a refused, reset or closed connection,
    a broken pipe, a request body that could not be written, an early EOF all look different depending
    on the moment the server died), by gRPC's UNAVAILABLE status, and by the words of the rest.
    """
    gone_types: list[type[BaseException]] = [ConnectionError, EOFError]
    for module, name in (("aiohttp", "ClientConnectionError"), ("aiohttp", "ClientPayloadError"),
                         ("geventhttpclient.response", "HTTPConnectionClosed")):
        try:
            gone_types.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    if isinstance(e, tuple(gone_types)):
        return True
    if isinstance(e, OSError) and e.errno is not None:
        import errno

        return e.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                           errno.ENOTCONN, errno.ESHUTDOWN)
    status = getattr(e, "status", lambda: None)
    if callable(status) and str(status() or "").endswith("UNAVAILABLE"):
        return True
    keys = ("UNAVAILABLE", "connect", "Connection", "reset", "refused", "closed", "Broken pipe",
            "Socket closed", "Server disconnected", "EOF", "Can not write")
    return any(k in str(e) for k in keys)


# -- what the server says about a model ------------------------------------------------------------
@dataclass(frozen=True)
class ServedModel:
    """One model as the server's config describes it (the config is the single source of its size)."""

    name: str
    platform: str  # onnxruntime_onnx | pytorch_libtorch | ensemble | python | ...
    input: str
    input_dtype: str  # Triton's name: FP32 | FP16 | BYTES
    input_shape: tuple[int, ...]  # one sample, without the batch dim: (C, H, W) for a classifier
    output: str
    num_classes: int
    max_batch_size: int  # 0: no batch dim in the config (a static batch)
    static_batch: int | None = None  # with max_batch_size 0: the fixed batch of the config's dims
    dynamic_batching: bool = False
    max_queue_delay_us: int = 0
    parameters: dict = field(default_factory=dict)
    instances: int = 1  # model instances across its instance groups

    @property
    def takes_images(self) -> bool:
        """An ensemble (or any model) fed encoded image bytes rather than pixels."""
        return self.input_dtype == "BYTES"

    def as_input(self, batch: np.ndarray) -> np.ndarray:
        """`batch` as the request carries it: contiguous, in the input's dtype (pixels) or as objects (encoded bytes)."""
        return np.ascontiguousarray(batch, dtype=NUMPY_DTYPES.get(self.input_dtype, np.float32))

    @property
    def image_size(self) -> int:
        """The square side the pixels must have; UserInputError for anything else."""
        shape = self.input_shape
        if self.takes_images or len(shape) != 3 or shape[1] != shape[2] or shape[1] < 1:
            # (max_batch_size 0: its dims hold the batch too, said as its config says them)
            dims = list(shape) if self.static_batch is None else [self.static_batch, *shape]
            raise UserInputError(f"model {self.name} takes {self.input_dtype} {dims}"
                                 f"{'' if self.static_batch is None else ' (max_batch_size 0: its batch included)'}, "
                                 "not square (C, H, W) pixels; cnnpack classifiers take (3, S, S)")
        return shape[1]

    @classmethod
    def from_config(cls, config: dict) -> ServedModel:
        """From the config as JSON (HTTP's dict, or gRPC's `as_json` dict with int64 as strings)."""
        ins, outs = config.get("input", []), config.get("output", [])
        if len(ins) != 1 or len(outs) != 1:
            raise UserInputError(f"model {config.get('name')} has {len(ins)} inputs and {len(outs)} outputs; "
                                 "cnnpack talks to single-input, single-output classifiers")
        mbs = int(config.get("max_batch_size", 0))
        dims = tuple(int(d) for d in ins[0].get("dims", []))
        out_dims = [int(d) for d in outs[0].get("dims", [])]
        static = None
        if mbs == 0:  # the dims hold the batch
            static, dims, out_dims = (dims[0] if dims else None), dims[1:], out_dims[1:]
        dyn = config.get("dynamic_batching")
        return cls(name=config.get("name", ""), platform=config.get("platform") or config.get("backend", ""),
                   input=ins[0]["name"], input_dtype=ins[0].get("data_type", "TYPE_FP32").removeprefix("TYPE_")
                   .replace("STRING", "BYTES"), input_shape=dims, output=outs[0]["name"],
                   num_classes=out_dims[-1] if out_dims else 0, max_batch_size=mbs, static_batch=static,
                   dynamic_batching=dyn is not None,
                   max_queue_delay_us=int((dyn or {}).get("max_queue_delay_microseconds", 0) or 0),
                   parameters={k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()},
                   instances=sum(int(g.get("count", 1) or 1) for g in config.get("instance_group", [])) or 1)

    def describe(self) -> dict:
        """What a result file records about the served model."""
        return {"model": self.name, "platform": self.platform, "input": self.input,
                "input_shape": list(self.input_shape), "max_batch_size": self.max_batch_size,
                "dynamic_batching": self.dynamic_batching, "max_queue_delay_us": self.max_queue_delay_us}


# -- the synchronous client -----------------------------------------------------------------------
class Client:
    """tritonclient.http or .grpc against one server, every call bounded by `timeout_s`."""

    def __init__(self, url: str | None = None, protocol: str = "http", *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, url_flag: str = "--url") -> None:
        if not 0 < timeout_s <= MAX_TIMEOUT_S:  # gRPC's deadline overflows past ~1e9 s: "no answer" at once
            raise UserInputError(f"--timeout must be > 0 and at most {MAX_TIMEOUT_S:,} seconds, got {timeout_s}")
        self.protocol, self.address, self.timeout_s = protocol, address(url, protocol, url_flag), timeout_s
        self.url_flag = url_flag
        self.lib = importlib.import_module(f"tritonclient.{protocol}")
        if protocol == "http":
            self._client = self.lib.InferenceServerClient(self.address, connection_timeout=timeout_s,
                                                          network_timeout=timeout_s)
            _quiet_gevent_interrupts()
            self._timeout: dict = {}
        else:
            self._client = self.lib.InferenceServerClient(self.address)
            self._timeout = {"client_timeout": timeout_s}
        self.errors = _client_errors()

    @property
    def url(self) -> str:
        return f"{self.protocol}://{self.address}"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def failure(self, what: str, e: BaseException) -> StageFailed:
        """A call that failed once the server had answered before: StageFailed naming the server."""
        if timed_out(e):
            why, hint = f"no answer within {self.timeout_s:g} s", " (--timeout); is the server stuck or overloaded?"
        else:
            why = reason(e)
            hint = "; is the server still running? (`cnnpack serve`)" if _gone(e) else ""
        return StageFailed(f"Triton at {self.url}: {what} failed: {why}{hint}")

    def _call(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs, **self._timeout)
        except self.errors as e:
            raise self.failure(what, e) from None

    def check_ready(self) -> Client:
        """Raises UserInputError (exit 2) when nothing answers at the URL or the server is not ready."""
        try:
            ready = self._client.is_server_ready(**self._timeout)
        except self.errors as e:
            if self.protocol == "http" and "Expected HTTP/" in str(e):
                raise UserInputError(f"{self.address} answered, but not in HTTP: is it Triton's gRPC port? Pass "
                                     f"--protocol grpc, or the HTTP port (default {DEFAULT_PORTS['http']})") from None
            if self.protocol == "grpc" and "Socket closed" in str(e):
                raise UserInputError(f"{self.address} closed the gRPC connection: is it Triton's HTTP port? Pass "
                                     f"--protocol http, or the gRPC port (default {DEFAULT_PORTS['grpc']})") from None
            raise UserInputError(f"cannot reach Triton at {self.url}: {reason(e)}; start it with `cnnpack serve`, "
                                 f"or point {self.url_flag} at it (defaults: HTTP {DEFAULT_PORTS['http']}, gRPC "
                                 f"{DEFAULT_PORTS['grpc']}, with --protocol)") from None
        if self.protocol == "http":  # Triton's metrics port also answers 200 (empty) to the readiness probe, and
            try:                     # another web server 404: neither names a server in its metadata
                named = self._client.get_server_metadata(**self._timeout).get("name")
            except (ValueError, AttributeError, *self.errors):
                named = None
            if not named:
                raise UserInputError(f"{self.address} answered, but not as Triton's HTTP API: is it the metrics "
                                     f"port, or another server? Point {self.url_flag} at Triton's HTTP port "
                                     f"(default {DEFAULT_PORTS['http']})")
        if not ready:
            raise UserInputError(f"Triton at {self.url} is up but not ready (models still loading?); retry shortly")
        return self

    def model_index(self) -> dict[str, tuple[str, str]]:
        """Every model of the server's repository -> (its state, why): ("READY", ""); ("UNAVAILABLE", the load
        error); ("", "") for a folder the server has not loaded (laid out after it started, or left out under
        explicit model control: Triton's index gives such a model no state)."""
        index = self._call("listing the repository", self._client.get_model_repository_index,
                           **({"as_json": True} if self.protocol == "grpc" else {}))
        rows = index.get("models", []) if isinstance(index, dict) else index
        states: dict[str, tuple[str, str]] = {}
        for m in rows:  # one row per version: a model is ready where any version is
            if states.get(m["name"], ("",))[0] != "READY":
                states[m["name"]] = (m.get("state", ""), m.get("reason", ""))
        return states

    def model_names(self) -> list[str]:
        """The models the server has loaded (ready)."""
        return sorted(n for n, (state, _) in self.model_index().items() if state == "READY")

    def versions(self, name: str) -> list[str]:
        """The versions of model `name` the server has ready (its metadata); a request without a version reaches
        the highest of them."""
        meta = self._call(f"reading the metadata of {name}", self._client.get_model_metadata, name,
                          **({"as_json": True} if self.protocol == "grpc" else {}))
        return sorted(meta.get("versions") or [], key=lambda v: int(v) if str(v).isdigit() else -1)

    def model(self, name: str) -> ServedModel:
        """The model's config as the server reports it; UserInputError naming the served ones if absent."""
        if not name or name in (".", "..") or "/" in name or any(ord(c) < 32 for c in name):  # over HTTP a name is
            raise UserInputError(f"model name {name!r} cannot name a model folder")  # part of the URL: `../m`, `m/x`
        extra = {"as_json": True} if self.protocol == "grpc" else {}
        try:
            config = self._client.get_model_config(name, **extra, **self._timeout)
        except self.errors as e:
            if "unknown model" in str(e).lower() or "not found" in str(e).lower():
                from cnnpack.triton_config import ENSEMBLE, PREPROCESS

                index = self.model_index()
                names = sorted(n for n, (state, _) in index.items() if state == "READY")
                # the classifiers a --model takes; an image ensemble only with --ensemble; its step not at all
                ready = ", ".join(n for n in names if not n.endswith((ENSEMBLE, PREPROCESS))) or "none"
                if ensembles := [n.removesuffix(ENSEMBLE) for n in names if n.endswith(ENSEMBLE)]:
                    ready += f"; with --ensemble: {', '.join(ensembles)}"
                if name in index:  # laid out after the server started, left out (explicit control), or it failed
                    state, why = index[name]
                    said = f"{state}: {why}" if why else state or "laid out after it started, or not loaded"
                    raise UserInputError(f"Triton at {self.url} has {name!r} in its repository but has not loaded it "
                                         f"({said}; ready: {ready}); load it (restart `cnnpack serve`, or "
                                         "--load-model under explicit model control)") from None
                raise UserInputError(f"Triton at {self.url} serves no model {name!r} (ready: {ready}); pass --model"
                                     ) from None
            raise self.failure(f"reading the config of {name}", e) from None
        return ServedModel.from_config(config.get("config", config))

    def inputs(self, model: ServedModel, batch: np.ndarray) -> list:
        """The request's input tensor for `batch` (pixels as the model's dtype, or encoded bytes)."""
        batch = model.as_input(batch)
        tensor = self.lib.InferInput(model.input, list(batch.shape), model.input_dtype)
        tensor.set_data_from_numpy(batch)
        return [tensor]

    def infer(self, model: ServedModel, batch: np.ndarray, *, class_count: int = 0) -> np.ndarray:
        """The output for one batch: logits (N, K), or with `class_count` (N, k) of b"score:index:label"."""
        outputs = [self.lib.InferRequestedOutput(model.output, class_count=class_count)]
        result = self._call(f"inference on {model.name} (batch of {len(batch)})", self._client.infer, model.name,
                            self.inputs(model, batch), outputs=outputs)
        return result.as_numpy(model.output)

    def statistics(self, name: str) -> dict:
        """Server-side counters of a model (all versions summed): requests, executions, queue/compute time."""
        extra = {"as_json": True} if self.protocol == "grpc" else {}
        stats = self._call(f"reading the statistics of {name}", self._client.get_inference_statistics, name, **extra)
        out = {"inference_count": 0, "execution_count": 0, "success": 0, "fail": 0, "queue_ns": 0,
               "compute_infer_ns": 0}
        for m in stats.get("model_stats", []):
            s = m.get("inference_stats", {})
            out["inference_count"] += int(m.get("inference_count", 0))
            out["execution_count"] += int(m.get("execution_count", 0))
            out["success"] += int(s.get("success", {}).get("count", 0))
            out["fail"] += int(s.get("fail", {}).get("count", 0))
            out["queue_ns"] += int(s.get("queue", {}).get("ns", 0))
            out["compute_infer_ns"] += int(s.get("compute_infer", {}).get("ns", 0))
        return out

    def settled_statistics(self, name: str, *, wait_s: float = 1.0) -> dict:
        """`statistics` once its counters stop moving: Triton counts a request after its response has left, so a
        reading taken the moment the last response arrives can miss that request."""
        last, deadline = self.statistics(name), time.monotonic() + wait_s
        while time.monotonic() < deadline:
            time.sleep(0.005)
            now = self.statistics(name)
            if now == last:
                break
            last = now
        return last


def server_side(before: dict, after: dict) -> dict:
    """What the server did between two `statistics` readings: mean executed batch, queue and compute time."""
    d = {k: after[k] - before[k] for k in before}
    requests = max(d["success"] + d["fail"], 1)
    return {"server_requests": d["success"], "server_failures": d["fail"],
            "server_executions": d["execution_count"],
            "server_batch_mean": d["inference_count"] / d["execution_count"] if d["execution_count"] else None,
            "server_queue_ms_mean": d["queue_ns"] / requests / 1e6,
            "server_compute_ms_mean": d["compute_infer_ns"] / requests / 1e6}
