"""`cnnpack pipeline`'s options, and the config of each stage built from them (`cnnpack.pipeline` runs them)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnpack.errors import UserInputError

SERVE_MODES = ("auto", "yes", "no")
# with no --runtimes: eager, compiled and the runtime of each exported format, in this order (the bench table's)
DEFAULT_RUNTIMES = {"checkpoint": ("eager", "compiled"), "torchscript": ("torchscript",), "onnx": ("onnxruntime",),
                    "pt2": ("aoti",), "openvino": ("openvino",)}


TRAIN_OPTIONS = ("lr", "patience", "amp", "channels_last", "pretrained", "val_fraction", "download")


def _has_split(data: str) -> bool:
    """Whether --data comes with its own train/validation split, where --val-fraction does nothing."""
    from cnnpack.train_resume import _split_given

    try:
        return _split_given(data)
    except OSError:  # a folder that cannot be read: loading the data says so
        return False


@dataclass(frozen=True)
class PipelineConfig:
    """The options of every stage that the pipeline exposes; the rest keep their commands' defaults."""

    data: str = "shapes"
    arch: str = "cnn"
    image_size: int = 64
    epochs: int = 8
    batch_size: int = 64
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    # more of `cnnpack train`'s options (None: train's default, and a run's fingerprint as it was without them)
    lr: float | None = None
    patience: int | None = None
    amp: bool | None = None
    channels_last: bool | None = None
    pretrained: bool | None = None
    val_fraction: float | None = None
    download: bool | None = None
    formats: tuple[str, ...] = ("onnx", "torchscript")
    max_batch_size: int = 64
    int8: bool = True  # the quantize stage: an int8 ONNX model under the accuracy gate
    calibration_images: int | None = None  # None: quantize's default
    max_drop: float = 0.5
    min_agreement: float = 0.99  # int8 vs fp32 (quantize's gate) and vs eager (verify's int8 contract)
    verify_min_agreement: float = 0.999  # verify's top-1 agreement with eager for fp32 (bf16/fp16: at most their own)
    openvino: str = "auto"  # auto: when the openvino extra is installed | yes | no
    pt2: str | None = None  # the pt2 package (torch.export + AOTInductor): auto | yes | no; None: yes when --formats
    # names pt2, else no (opt-in: the 150 s target, README)
    tune_budget_ms: float | None = None  # the tune stage (opt-in): the best served config for this p99 budget
    bench_runtimes: tuple[str, ...] | None = None  # None: DEFAULT_RUNTIMES of the exported formats
    bench_batch_sizes: tuple[int, ...] = (1, 32)
    bench_max_seconds: float = 4.0
    threads: int | None = None
    repository: str | None = None  # None: the one the run laid its models out in, else ./model_repository
    serve: str = "auto"  # auto: when the local Triton server can run here | yes | no
    concurrency: tuple[int, ...] = (1, 4, 16)
    infer_images: int = 8  # validation images sent through the served model

    def validate(self) -> None:
        """Refuses bad options before any stage runs (exit 2, nothing written)."""
        if self.serve not in SERVE_MODES:
            raise UserInputError(f"--serve {self.serve!r}; valid: {', '.join(SERVE_MODES)}")
        if self.openvino not in SERVE_MODES:
            raise UserInputError(f"--openvino {self.openvino!r}; valid: {', '.join(SERVE_MODES)}")
        if self.pt2 is not None and self.pt2 not in SERVE_MODES:
            raise UserInputError(f"--pt2 {self.pt2!r}; valid: {', '.join(SERVE_MODES)}")
        for flag, value in (("--min-agreement", self.min_agreement), ("--verify-min-agreement", self.verify_min_agreement)):
            if not 0 < value <= 1:  # also refuses NaN
                raise UserInputError(f"{flag} is a fraction in (0, 1], got {value}")
        if self.pt2 == "no" and "pt2" in self.formats:
            raise UserInputError("--formats names pt2 and --pt2 is no: drop one of them")
        if self.openvino == "no" and "openvino" in self.formats:
            raise UserInputError("--formats names openvino and --openvino is no: drop one of them")
        self.served_config().validate()
        if not self.formats:
            from cnnpack.export import EXPORTERS

            raise UserInputError(f"--formats names no format; valid: {', '.join(EXPORTERS.names())} (a comma list "
                                 "that includes onnx)")
        self.export_config().validate()  # an unknown format is named as such (before the onnx rule below)
        if "onnx" not in self.formats:
            raise UserInputError("the pipeline serves the ONNX artifact: --formats must include onnx")
        for make in (lambda: self.train_config(normalised=False), self.verify_config, self.bench_config,
                     self.quantize_config):
            make().validate()
        self._check_runtimes()
        if max(self.bench_batch_sizes) > self.max_batch_size:
            raise UserInputError(f"--batch-sizes {max(self.bench_batch_sizes)} is more than the exported models "
                                 f"accept (--max-batch-size {self.max_batch_size})")
        for cfg in self.triton_configs():
            cfg.validate()
        if self.tune_budget_ms is not None:
            if self.serve == "no":
                raise UserInputError("--tune-budget-ms tunes the served models on a local Triton: it needs the served "
                                     "stage; drop --serve no or drop --tune-budget-ms")
            if not 0 < self.tune_budget_ms < 3.6e6:
                raise UserInputError(f"--tune-budget-ms must be > 0 and under an hour, got {self.tune_budget_ms}")
            self.tune_config().validate()

    def runtimes(self) -> tuple[str, ...]:
        """The runtimes the bench stage measures: --runtimes, or DEFAULT_RUNTIMES of the formats exported."""
        if self.bench_runtimes is not None:
            return self.bench_runtimes
        names = [r for fmt, names in DEFAULT_RUNTIMES.items() if fmt == "checkpoint" or fmt in self.formats
                 for r in names]
        if "openvino" in self.formats and self.openvino != "no":
            from cnnpack.errors import RuntimeUnavailable
            from cnnpack.openvino import has_bf16

            try:  # where the CPU computes bf16 itself
                names += ["openvino-bf16"] if has_bf16() else []
            except RuntimeUnavailable:  # not installed: with_openvino and export say so in their words
                pass
        return tuple(names)

    def _check_runtimes(self) -> None:
        """--runtimes that the pipeline gives nothing to run are refused now, not after training (`--formats onnx`
        with torchscript among the runtimes failed at the bench stage, and did again at each rerun)."""
        from cnnpack.bench import check_runtimes
        from cnnpack.runtimes import RUNTIMES, reads

        check_runtimes(self.runtimes())
        made = {"checkpoint", *self.formats, *(["onnx_int8"] if self.int8 else []),
                *(["openvino", "openvino_int8"] if self.openvino != "no" else []),
                *(["pt2"] if self.pt2 in ("auto", "yes") else [])}
        for name in self.runtimes():
            cls = RUNTIMES.get(name)
            if name == "triton":
                raise UserInputError("--runtimes triton: the pipeline's served stage measures the served models; drop "
                                     "it from --runtimes")
            if not any(reads(cls, f) for f in made):
                why = {"openvino": "--openvino no leaves out; drop {}, or drop --openvino no",
                       "pt2": "the pipeline makes only with --pt2 auto|yes; drop {}, or pass --pt2 yes"}.get(cls.format)
                if why:
                    raise UserInputError(f"--runtimes {name} runs the {cls.format} artifact, which {why.format(name)}")
                raise UserInputError(f"--runtimes {name} runs the {cls.format} artifact, which this pipeline does not "
                                     f"make; add {cls.format} to --formats, or drop {name}")

    def check_calibration(self) -> None:
        """--calibration-images past the training split of --data (counted, no image read) is refused (exit 2)."""
        from cnnpack.data import training_images_at_most

        if not self.int8 or self.calibration_images is None:
            return
        n = training_images_at_most(self.data, val_fraction=self.train_config().val_fraction)
        if n and self.calibration_images > n:  # none: loading the data says what is wrong
            raise UserInputError(f"--calibration-images {self.calibration_images} is more than the {n} images of "
                                 f"{self.data}'s training split; use at most {n}")

    # the stage configs, built lazily (their modules import torch)
    def train_config(self, normalised: bool = True):
        from cnnpack.train_config import DEFAULT_LR, TrainConfig

        given = {k: getattr(self, k) for k in TRAIN_OPTIONS if getattr(self, k) is not None}
        # a value the default comes to is the default: given or not, a finished run is the same training (not
        # trained again for `--channels-last` or `--lr 0.01` on a run of the defaults); validated as given
        if normalised and given.get("channels_last") is True:
            given.pop("channels_last")
        if normalised and given.get("lr") == DEFAULT_LR["adamw"]:
            given.pop("lr")
        if normalised and "val_fraction" in given and _has_split(self.data):  # (the built-in data, torchvision's, train/ + val/)
            given.pop("val_fraction")
        return TrainConfig(data=self.data, arch=self.arch, image_size=self.image_size, epochs=self.epochs,
                           batch_size=self.batch_size, seed=self.seed, device=self.device, data_root=self.data_root,
                           **given)

    def export_config(self):
        from cnnpack.export import ExportConfig

        return ExportConfig(formats=self.formats, max_batch_size=self.max_batch_size)

    def quantize_config(self, fmt: str = "onnx_int8"):
        from cnnpack.quantize import QuantizeConfig

        return QuantizeConfig(format=fmt, calibration_images=self.calibration_images, max_drop=self.max_drop,
                              min_agreement=self.min_agreement, seed=self.seed)

    def with_openvino(self) -> PipelineConfig:
        """The config with `openvino` decided (auto: when the extra is installed) and, when on, the IR among the
        exported formats and the openvino runtimes (bf16 where the CPU has it) among the benchmarked ones."""
        from dataclasses import replace

        from cnnpack import openvino as ov

        ok, why = ov.available() if self.openvino != "no" else (False, "--openvino no")
        if self.openvino == "yes" and not ok:
            raise UserInputError(f"--openvino yes, but {why}")
        if not ok:
            return replace(self, openvino="no")
        return replace(self, openvino="yes", formats=tuple(dict.fromkeys([*self.formats, "openvino"])))

    def with_pt2(self) -> PipelineConfig:
        """The config with `pt2` decided (auto: when a C++ compiler is found; --formats naming pt2 means yes unless
        --pt2 no, which validate refuses) and,
        when on, the package among the exported formats and the aoti runtime among the benchmarked ones."""
        from dataclasses import replace

        from cnnpack.pt2 import compiler_available, find_compiler

        asked = self.pt2 or ("yes" if "pt2" in self.formats else "no")
        if asked == "no" or (asked == "auto" and "pt2" not in self.formats and not compiler_available()[0]):
            return replace(self, pt2="no")
        find_compiler()  # yes (or --formats pt2) without one: exit 2 saying what to install, before any work
        return replace(self, pt2="yes", formats=tuple(dict.fromkeys([*self.formats, "pt2"])))

    def verify_config(self):
        from cnnpack.verify import VerifyConfig

        return VerifyConfig(batch_sizes=tuple(b for b in (1, 8, 32) if b <= self.max_batch_size) or (1,),
                            min_agreement=self.verify_min_agreement, int8_min_agreement=self.min_agreement)

    def bench_config(self):
        from cnnpack.bench import BenchConfig

        # the artifacts this pipeline makes, not every one the run holds: formats switched off on a rerun (--formats
        # onnx, --no-int8, --openvino no) were benched from the earlier run's files ("best: onnxruntime int8")
        return BenchConfig(runtimes=self.runtimes(), batch_sizes=self.bench_batch_sizes, threads=self.threads,
                           max_seconds=self.bench_max_seconds, artifacts=("checkpoint", *self.made()))

    def made(self) -> tuple[str, ...]:
        """The artifacts this pipeline exports and quantizes (after `with_openvino` and `with_pt2`)."""
        int8 = ["onnx_int8", *(["openvino_int8"] if "openvino" in self.formats else [])] if self.int8 else []
        return tuple(dict.fromkeys([*self.formats, *int8]))

    def served_config(self):
        from cnnpack.served import ServedConfig

        return ServedConfig(concurrency=self.concurrency, images=self.infer_images, threads=self.threads,
                            max_seconds=self.bench_max_seconds, int8_min_agreement=self.min_agreement)

    def tune_config(self):
        from cnnpack.tune_grid import TuneConfig

        budget = 1.0 if self.tune_budget_ms is None else self.tune_budget_ms  # 0 is a bad budget, not "none"
        return TuneConfig(latency_budget_ms=budget, concurrency=(max(self.concurrency),),
                          max_seconds=min(self.bench_max_seconds, 2.0))

    def triton_configs(self) -> list:
        """TorchScript and int8 first, ONNX (with the image ensemble) last: `stages.triton` describes the ONNX model."""
        from cnnpack.triton_repo import TritonConfig

        return [TritonConfig(repository=self.repository, format=f, ensemble=f == "onnx")
                for f in sorted(self.made(), key=lambda f: f == "onnx")]
