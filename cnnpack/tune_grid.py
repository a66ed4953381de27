"""What `cnnpack tune` sweeps: its options, one served configuration (`Setting`), the grid of them the options
span on this machine's cores, how long it takes, and the model config each setting is loaded with."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from cnnpack.errors import UserInputError
from cnnpack.loadclient import check_concurrency
from cnnpack.peak import usable_cores
from cnnpack.rundir import Run

OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class TuneConfig:
    latency_budget_ms: float = 50.0
    objective: str = "throughput"  # throughput: most images/s within the budget | latency: lowest p99
    concurrency: tuple[int, ...] = (16,)
    instances: tuple[int, ...] = (1, 2)
    threads: tuple[int, ...] = (1, 2)  # backend threads per instance
    queue_delays_us: tuple[int, ...] = (0, 500, 2000)  # dynamic batching on, at each delay (off is always tried)
    models: tuple[str, ...] | None = None  # served model names (default: every verified servable one)
    max_seconds: float = 2.0  # measurement per point (after a warm-up)
    time_limit_s: float = 300.0
    oversubscribe: bool = False  # allow instances x threads above the cores
    protocol: str = "http"
    timeout_s: float = 30.0
    load_generator: str = "auto"  # perf_analyzer (when on PATH under auto) | cnnpack, as `bench --triton-url`
    bf16: str = "auto"  # OpenVINO models with the bf16 inference hint as candidates: auto (where the CPU computes
    # bf16 natively) | yes (also elsewhere: OpenVINO takes the hint and computes f32; measured, never the winner) | no

    def validate(self) -> None:
        from cnnpack.loadgen import resolve

        resolve(self.load_generator)
        if self.bf16 not in ("auto", "yes", "no"):
            raise UserInputError(f"--bf16 {self.bf16!r}; valid: auto, yes, no")
        if not 0 < self.latency_budget_ms < 3.6e6:  # nan and inf too: the budget is written to JSON and compared
            raise UserInputError(f"--latency-budget-ms must be > 0 and under an hour, got {self.latency_budget_ms}")
        if self.objective not in OBJECTIVES:
            raise UserInputError(f"--objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        check_concurrency(self.concurrency)
        for flag, values in (("--instances", self.instances), ("--threads", self.threads)):
            if not values or min(values) < 1:
                raise UserInputError(f"{flag} must be integers >= 1, got {list(values)}")
            if max(values) > 1024:  # as `cnnpack triton` bounds them (99999999999: a protobuf traceback)
                raise UserInputError(f"{flag} must be at most 1024, got {max(values)}")
        if self.queue_delays_us and not 0 <= min(self.queue_delays_us) <= max(self.queue_delays_us) <= 60_000_000:
            raise UserInputError(f"--queue-delays-us must be in 0..60,000,000 (a minute; `cnnpack triton "
                                 f"--max-queue-delay-us` takes the same), got {list(self.queue_delays_us)}")
        if not (0 < self.max_seconds < float("inf") and 0 < self.time_limit_s < float("inf")):  # nan too
            raise UserInputError("--max-seconds and --time-limit must be > 0")
        cores = usable_cores()
        if not self.oversubscribe and min(self.instances) * min(self.threads) > cores:
            raise UserInputError(f"--instances x --threads is at least {min(self.instances) * min(self.threads)}, "
                                 f"more than the {cores} cores here; pass --oversubscribe to measure it anyway")


@dataclass(frozen=True)
class Setting:
    """One served configuration of one model; `default` means its config.pbtxt as it is."""

    model: str
    format: str
    instances: int = 1
    threads: int = 0
    dynamic_batching: bool = True
    queue_delay_us: int = 0
    default: bool = False
    bf16: bool = False  # an OpenVINO model served with the bf16 inference hint

    @property
    def label(self) -> str:
        if self.default:
            return f"{self.model} (its config.pbtxt)"
        batching = f"batching {self.queue_delay_us} us" if self.dynamic_batching else "no batching"
        return f"{self.model}{' bf16' if self.bf16 else ''} x{self.instances} {self.threads}t {batching}"

    @property
    def precision(self) -> str:
        from cnnpack.artifacts import precision_of

        return "bf16" if self.bf16 else "int8" if self.format.endswith("_int8") else precision_of({})


# -- what to sweep -------------------------------------------------------------------------------------
def native_bf16() -> bool:
    from cnnpack import openvino as ov

    return ov.has_bf16()


def bf16_offered(cfg: TuneConfig) -> bool:
    """Whether the OpenVINO models are also tried with the bf16 inference hint (auto: where the CPU computes bf16)."""
    return cfg.bf16 == "yes" or (cfg.bf16 == "auto" and native_bf16())


def past_the_cores(cfg: TuneConfig) -> str:
    """The --instances and --threads values no setting of the grid uses (each, with every value of the other, past
    the cores), as the options would name them; "" when there are none."""
    cores = usable_cores()
    if cfg.oversubscribe:
        return ""
    out = [f"{flag} {','.join(map(str, unused))}" for flag, values, other in
           (("--instances", cfg.instances, min(cfg.threads)), ("--threads", cfg.threads, min(cfg.instances)))
           if (unused := [v for v in values if v * other > cores])]
    return " and ".join(out)


def grid(models: list[tuple[str, str]], cfg: TuneConfig, delays: tuple[int, ...]) -> list[Setting]:
    """Each model's own config, then every instances x threads x batching setting; an fp32 OpenVINO IR also with
    the bf16 inference hint where `bf16_offered`. The models take turns (one setting of each, then the next), so a
    sweep cut by --time-limit has measured every model about as far, not the first ones only."""
    cores = usable_cores()
    bf16 = bf16_offered(cfg)
    own: list[list[Setting]] = []
    for m, f in models:
        own.append([])
        for n, t in itertools.product(cfg.instances, cfg.threads):
            if n * t > cores and not cfg.oversubscribe:
                continue
            for half in (False, True) if bf16 and f == "openvino" else (False,):
                own[-1].append(Setting(m, f, n, t, dynamic_batching=False, bf16=half))
                own[-1] += [Setting(m, f, n, t, True, d, bf16=half) for d in delays]
    turns = [s for turn in itertools.zip_longest(*own) for s in turn if s is not None]
    return [Setting(m, f, default=True) for m, f in models] + turns


POINT_OVERHEAD_S = 2.5  # per point beyond --max-seconds: the reload, the warm-up, the statistics (the default
# pipeline's 71 points at --max-seconds 2 took 307 s on 2 cores: 4.3 s each; 1.5 s had chosen the grid, cut at 300 s)
BF16_CHECK_S = 3.0  # per bf16 setting: the served model held to the bf16 contract before it is measured


def estimate_s(settings: list[Setting], cfg: TuneConfig) -> float:
    """Seconds a sweep of `settings` at every concurrency should take (to choose between grid and coarse-to-fine)."""
    return sum((cfg.max_seconds + POINT_OVERHEAD_S) * len(cfg.concurrency) + (BF16_CHECK_S if s.bf16 else 0.0)
               for s in settings)


def laid_out_settings(repository: str, model: str) -> dict:
    """What tune does not vary, as the model's config.pbtxt in the repository has it (TritonConfig fields): the batch
    cap, the preferred batch sizes, warm-up. Tune built its configs from the defaults and dropped
    `--max-batch-size 4` and `--warmup` from the points it measured and from the winner it wrote."""
    if (mc := _config_pbtxt(repository, model)) is None:
        return {}  # no readable config: `cnnpack triton`'s defaults, as before
    out: dict = {"warmup": bool(mc.model_warmup),
                 "preferred_batch_sizes": tuple(mc.dynamic_batching.preferred_batch_size)}
    if mc.max_batch_size > 0:
        out["max_batch_size"] = mc.max_batch_size
    return out  # the instance kind is not carried: tune measures CPU configs (a GPU layout's TensorRT is not read)


def own_config_json(repository: str, model: str) -> str | None:
    """The model's config.pbtxt in the repository, as the JSON Triton's load API takes; None where it cannot be read
    (Triton's plain load then says why), in the form the local server reads (`local_config`). A default point loads
    this, not nothing: a plain load of a model an earlier point loaded with its own config keeps that config (Triton
    2.51 reloads what it holds, the repository being unchanged), and a default measured again after the sweep was
    measured as the last point's 500 us batching."""
    from google.protobuf import json_format

    from cnnpack.triton_release import local_config

    mc = _config_pbtxt(repository, model)
    return None if mc is None else json_format.MessageToJson(local_config(mc), preserving_proto_field_name=True)


def _config_pbtxt(repository: str, model: str):
    """The model's config.pbtxt in the repository, parsed (a ModelConfig); None where it cannot be read or parsed."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    try:
        return text_format.Parse(Path(repository, model, "config.pbtxt").read_text(encoding="utf-8"), pb.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError):
        return None


def model_config_json(run: Run, s: Setting, repository: str, *, local: bool = False) -> str:
    """The ModelConfig of a setting, as the JSON Triton's load API takes (snake_case field names); with `local`,
    as the local Triton 2.51 reads it (a pt2 model without `platform: "torch_aoti"`, see triton_release.py)."""
    from google.protobuf import json_format

    from cnnpack.triton_release import local_config
    from cnnpack.triton_repo import TritonConfig, classifier_config, model_io

    kept = laid_out_settings(repository, s.model)
    if not s.dynamic_batching:
        kept.pop("preferred_batch_sizes", None)
    tc = TritonConfig(repository=repository, name=s.model, format=s.format, instances=s.instances, threads=s.threads,
                      dynamic_batching=s.dynamic_batching, max_queue_delay_us=s.queue_delay_us, **kept)
    io, _, _ = model_io(run, tc)
    mc = classifier_config(s.model, io, tc)
    if s.bf16:  # the OpenVINO backends read HINT_BF16; verify holds a model whose precision says bf16 to that contract
        for key, value in (("HINT_BF16", "YES"), ("precision", "bf16")):
            mc.parameters[key].string_value = value
    return json_format.MessageToJson(local_config(mc) if local else mc, preserving_proto_field_name=True)
