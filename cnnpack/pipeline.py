"""`cnnpack pipeline`: train -> export -> verify -> bench -> triton -> served, then the report.

Each stage is the same library call its own command makes. Before running one, the pipeline
fingerprints the stage's inputs (its options plus the sha256 of every file it reads); the
fingerprint is stored in the stage's manifest section. A re-run skips a stage whose fingerprint
is unchanged, whose last run succeeded and whose outputs are still there, and says so; `force`
redoes every stage. A failed stage stops the pipeline (StageFailed, exit 1) with a pointer to
the file that shows what went wrong.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from cnnpack import user_model
from cnnpack.data_change import data_identity, listing
from cnnpack.errors import CnnpackError, UserInputError, shell
from cnnpack.pipeline_config import SERVE_MODES, PipelineConfig  # noqa: F401 - re-exported
from cnnpack.pipeline_rundir import check_foreign_models, check_run_dir, default_run_dir, record
from cnnpack.pipeline_stage import Interrupted, Outcome, Stage, again_hint, fingerprint, run_stage, stage_section
from cnnpack.pipeline_summary import best_runtime, summary
from cnnpack.rundir import LAST, MANIFEST, Run, artifact_digest, identity, sha256


def _earlier_models(run: Run, repository: Path, laid: list[str]) -> list[str]:
    """The model folders of `repository` laid out from `run` that this pipeline did not lay out now."""
    from cnnpack.triton_config import classifier_of
    from cnnpack.triton_repo import laid_out_from

    here = str(run.path.resolve())
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and classifier_of(p.name) not in laid and here in laid_out_from(p))


# the settings of a triton stage's config that the pipeline sets its own way (each a `cnnpack triton` option)
_TRITON_SETTINGS = ("device", "instances", "max_batch_size", "preferred_batch_sizes", "max_queue_delay_us",
                    "dynamic_batching", "threads", "tensorrt", "tensorrt_fp16", "warmup")


def _settings_replaced(run: Run, before: dict, sections: list[dict]) -> str:
    """A note where the pipeline laid out again a model that `cnnpack triton` had laid out since with other settings
    (--threads 4): they are replaced by the pipeline's, which the stage would not say otherwise. Judged by the
    options as given (the pipeline's own earlier layout gives none of them; a max batch size it did not set is the
    export's), each as recorded (a setting an older cnnpack did not record is not one the user gave)."""
    new = next((s for s in sections if s.get("name") == before.get("name")
                and s.get("repository") == before.get("repository")), None)
    if new is None or before.get("status") != "ok":
        return ""
    old, mine = (json.loads(json.dumps({k: (sec.get("config") or {}).get(k) for k in _TRITON_SETTINGS}))
                 for sec in (before, new))  # tuples as lists: a section just built and one read back compare equal
    if not (changed := [k for k in _TRITON_SETTINGS if old[k] is not None and old[k] != mine[k]]):
        return ""
    from cnnpack.triton_config import option

    options = " ".join(option(k, old[k]) for k in changed)
    again = (f"cnnpack triton --run {shell(run.path)} --repository {shell(new['repository'])} --format "
             f"{new['format']}{' --ensemble' if 'ensemble' in new else ''} {options}")
    return (f"; {new['name']} had {options} from `cnnpack triton`, now the pipeline's settings (`{again}` sets "
            "them again)")


# -- the stages -------------------------------------------------------------------------------------
def _artifacts(run: Run) -> dict:
    return {f: artifact_digest(a) for f, a in stage_section(run, "export").get("artifacts", {}).items()}


def _int8_gates_kept(run: Run, section: dict) -> bool:
    """verify held each int8 artifact to the drop its gate allows now: a quantize under another --max-drop may write
    the same bytes, and verify.json would keep the old gate."""
    gates = {f: a["gate"].get("max_drop_pt") for f, a in stage_section(run, "export").get("artifacts", {}).items()
             if isinstance(a, dict) and isinstance(a.get("gate"), dict)}
    if not gates:
        return True
    try:
        results = json.loads(run.file("verify.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return False
    return all(r.get("tolerance", {}).get("max_drop_pt") == gates[r["format"]] for r in results
               if r.get("format") in gates)


def _checkpoint(run: Run) -> str | None:
    path = run.file("checkpoint.pt")
    return sha256(path) if path.is_file() else None


def _trained_by(cfg) -> dict:
    """A training's config as far as it shapes the training: --download (whether torchvision may fetch the data)
    does not; given once, a later run without it trained again."""
    return {**(cfg if isinstance(cfg, dict) else asdict(cfg)), "download": False}


class Stages:
    """The pipeline's stages for one config; each `run_*` is the matching command's library call."""

    def __init__(self, cfg: PipelineConfig, *, progress: bool, say: Callable[[str], None]) -> None:
        self.cfg, self.progress, self.say = cfg, progress, say
        self.on_run: Callable[[Run], None] = lambda _run: None  # once training has made (or opened) the run
        self._warming, self.forced = False, False  # inductor's header build started (warm_compiler); --force given

    def quantize_inputs(self, fmt: str = "onnx_int8") -> dict:
        """The quantize config as its stage's fingerprint, with the default calibration count resolved: the same
        images fingerprint the same whether the count was given or defaulted (and as runs recorded it before the
        default became `None`)."""
        from cnnpack.int8_gate import CALIBRATION_IMAGES

        config = asdict(self.cfg.quantize_config(fmt))
        if config["calibration_images"] is None:
            config["calibration_images"] = CALIBRATION_IMAGES
        return config

    def all(self, serve: bool) -> list[Stage]:
        stages = [
            Stage("train", self.train_inputs, self.run_train, lambda r: str(r.file(MANIFEST)),
                  earlier=self.train_inputs_before),
            Stage("export", lambda r: {"config": asdict(self.cfg.export_config()), "checkpoint": _checkpoint(r)},
                  self.run_export, lambda r: str(r.file(MANIFEST))),
            *([Stage("quantize", lambda r: {"config": self.quantize_inputs(), "onnx": _artifacts(r).get("onnx")},
                     self.run_quantize, lambda r: str(r.file(MANIFEST)))] if self.cfg.int8 else []),
            *([Stage("quantize_openvino", lambda r: {"config": self.quantize_inputs("openvino_int8"),
                                                     "openvino": _artifacts(r).get("openvino")},
                     self.run_quantize_openvino, lambda r: str(r.file(MANIFEST)))]
              if self.cfg.int8 and "openvino" in self.cfg.formats else []),
            Stage("verify", lambda r: {"config": asdict(self.cfg.verify_config()), "checkpoint": _checkpoint(r),
                                       "artifacts": _artifacts(r)},
                  self.run_verify, lambda r: str(r.file("verify.json")), _int8_gates_kept),
            Stage("bench", lambda r: {"config": asdict(self.cfg.bench_config()), "artifacts": _artifacts(r)},
                  self.run_bench, lambda r: str(r.file(MANIFEST))),
            Stage("triton", lambda r: {"configs": [{**asdict(c), "repository": str(Path(c.repository).resolve())}
                                                   for c in self.cfg.triton_configs()],  # the folder, from anywhere
                                       "artifacts": _artifacts(r)},
                  self.run_triton, lambda r: str(Path(self.cfg.repository)), self.repository_intact),
        ]
        if serve:
            stages.append(Stage("served", self.served_inputs, self.run_served, self.served_output,
                                self.served_rows_kept))
        if serve and self.cfg.tune_budget_ms is not None:
            stages.append(Stage("tune", lambda r: {**self.served_inputs(r), "tune": asdict(self.cfg.tune_config()),
                                                   "verify": stage_section(r, "verify").get("formats")},
                                self.run_tune, lambda r: str(r.file("tune.json")), _tuned_config_kept))
        return stages

    def run_tune(self, run: Run) -> str:
        from cnnpack.tune import tune
        from cnnpack.tune_outputs import describe

        section = tune(run.path, self.cfg.tune_config(), progress=lambda text: self.say(f"[tune] {text}"))
        return describe(section)

    # - train -
    def train_inputs(self, run: Run) -> dict:
        from cnnpack.data import recorded_source  # `dss`, `./dss` and `/abs/dss` are one folder: not a new training

        root = self.cfg.data_root and str(Path(self.cfg.data_root).resolve())  # tv and /abs/tv: one root
        inputs = {"config": {**_trained_by(self.cfg.train_config()), "data": recorded_source(self.cfg.data),
                             "data_root": root, "arch": user_model.recorded(self.cfg.arch)},
                  "data": data_identity(self.cfg.data, self.cfg.data_root)}
        if user_model.is_user_arch(self.cfg.arch):  # your own network: trained again when its file changes
            inputs["arch_source"] = user_model.source_record(self.cfg.arch)["sha256"]
        return inputs

    def train_inputs_before(self, run: Run) -> dict:
        """`train_inputs` as earlier cnnpack versions fingerprinted them (mtimes in whole seconds, a torchvision data
        set by its name alone): a finished run of unchanged data is not trained again after an update."""
        from cnnpack.data import recorded_source

        data, path = self.cfg.data, Path(self.cfg.data)
        same = data == "shapes" or data.startswith("torchvision:") or not path.exists()
        return {"config": {**asdict(self.cfg.train_config()), "data": recorded_source(data)},
                "data": {"data": data} if same else {"data": str(path.resolve()),
                                                     "files_sha256": listing(path, ns=False)}}

    def _same_code(self, run: Run) -> bool:
        """Whether your own network's code (its file and the files it imports) is as the run recorded it (always,
        for the built-in and torchvision networks)."""
        was = ((run.model_spec.get("arch_source") or {}).get("sha256") if run.manifest_path.exists() else None)
        return was is None or not user_model.is_user_arch(self.cfg.arch) or \
            was == user_model.source_record(self.cfg.arch)["sha256"]  # (not train_inputs: it walks the data folder)

    def run_train(self, run: Run) -> str:
        from cnnpack.train import train
        from cnnpack.train_resume import as_recorded

        cfg, last = self.cfg.train_config(), stage_section(run, "train")
        # an interrupted training with these options continues from its last finished epoch
        resume = (run.file(LAST).is_file() and last.get("status") != "ok"  # (as recorded: absolute paths)
                  and _trained_by(last.get("config") or {}) == _trained_by(as_recorded(cfg))
                  and self._same_code(run))  # your own network edited since: trained again, not resumed
        if resume:
            self.say("[train] resuming the interrupted training from last.pt")
        elif run.manifest_path.exists() and last.get("status") is not None:
            was, now = _trained_by(last.get("config") or {}), _trained_by(as_recorded(cfg))
            changed = ", ".join(f"{k} {was.get(k)!r} -> {now[k]!r}" for k in now if was.get(k) != now[k])
            if last.get("status") == "ok":  # (train sets the old run aside until the new one keeps an epoch)
                source = (run.model_spec.get("arch_source") or {}) if run.manifest_path.exists() else {}
                why = ("--force" if self.forced else f"the run was trained with other options ({changed})" if changed else
                       f"its network's code ({source.get('path')} or a file it imports) changed since it was trained"
                       if not self._same_code(run) else
                       "the run's files are gone or changed" if last.get("inputs_sha256") in (
                           fingerprint(self.train_inputs(run)), fingerprint(self.train_inputs_before(run)))
                       else "the run's data changed since it was trained")
                self.say(f"[train] {why}: training again; its outputs are replaced once the first epoch is kept (a "
                         "failure or Ctrl-C before that keeps them)")
            elif run.file(LAST).is_file():
                self.say(f"[train] the interrupted training had other options ({changed or 'not recorded'}): "
                         "training again from the start (the pipeline with its options as before continues it)"
                         if changed or self._same_code(run) else "[train] the network's code changed since the "
                         "interrupted training: training again from the start")

        def last_epoch_done(epoch: int, _: dict) -> None:
            if epoch >= cfg.epochs:
                self.warm_compiler()

        def hold(trained: Run) -> None:  # the run --force made is the pipeline's own from here on
            run.opened_as = trained.opened_as
            self.on_run(run)

        section = train(run.path, cfg, force=run.manifest_path.exists() and not resume, resume=resume,
                        progress=self.progress, on_epoch_end=last_epoch_done, on_run=hold)
        m = section["metrics"]
        return (f"best val top-1 {100 * m['best_val_acc']:.2f}% (epoch {m['best_epoch']}/{m['epochs']}), "
                f"{m['train_images_per_s']:.0f} images/s")

    # - export -
    def run_export(self, run: Run) -> str:
        from cnnpack.export import export

        self.warm_compiler()
        with self._status("exporting") as st:
            section = export(run.path, self.cfg.export_config(), progress=st)
        return ", ".join(f"{f} {section['artifacts'][f]['path']}" for f in self.cfg.formats)

    def warm_compiler(self) -> None:
        """The bench compiles the checkpoint (its `compiled` runtime on the CPU), and the first torch.compile in a new
        venv builds inductor's precompiled header, 5.4 s of one core. It is built from the end of the last epoch, when
        training draws its figures and export runs, both on one core most of the time (after an early stop, from the
        start of export): started with export, it overlapped verify too, which slowed by 2 s on 2 Zen 4 cores."""
        bench = self.cfg.bench_config()
        from cnnpack.host import compiler_missing, prepare_inductor, start_header_build

        if not self._warming and "compiled" in (bench.runtimes or ()) and bench.device == "cpu" \
                and not compiler_missing():
            self._warming = True

            prepare_inductor()
            start_header_build()

    # - quantize -
    def run_quantize(self, run: Run) -> str:
        with self._status("quantizing") as st:
            return self._quantized(run, "onnx_int8", st)

    def run_quantize_openvino(self, run: Run) -> str:
        with self._status("quantizing with NNCF") as st:
            return self._quantized(run, "openvino_int8", st)

    def _quantized(self, run: Run, fmt: str, progress: Callable[[str], None]) -> str:
        """One quantize stage. A refusal's advice may name options only `cnnpack quantize` has (--max-steps,
        --rank-images, --time-limit): the line says so, with the command that takes them."""
        from cnnpack.int8_gate import GateMissed
        from cnnpack.quantize import command, describe, quantize

        cfg = self.cfg.quantize_config(fmt)
        try:
            section = quantize(run.path, cfg, progress=progress)
        except GateMissed as e:
            e.args = (f"{e}; --max-steps, --rank-images and --time-limit are `cnnpack quantize`'s options: "
                      f"`{command(run, cfg)}` with them changed, then this pipeline again",)
            raise
        return f"{section['outputs'][fmt]['path']}: {describe(section)}"

    # - verify -
    def run_verify(self, run: Run) -> str:
        from cnnpack.verify import verify

        with self._status("verifying") as st:
            result = verify(run.path, self.cfg.verify_config(), progress=st)
        worst = max(r["tensor"]["max_abs_err"] for r in result["results"] if r["tensor"] and r["precision"] == "fp32")
        text = f"{len(result['results'])} artifact x runtime pairs match eager (fp32 max abs err {worst:.1e})"
        int8 = [r for r in result["results"] if r["precision"] == "int8" and r["task"]]
        return text + "".join(f"; {r['format']} top-1 agreement {100 * r['task']['top1_agreement']:.2f}%" for r in int8)

    # - bench -
    def run_bench(self, run: Run) -> str:
        from cnnpack.bench import bench

        with self._status("measuring") as st:
            section = bench(run.path, self.cfg.bench_config(), progress=st)
        best = best_runtime(section)
        # a runtime that cannot run here (torch.compile without a C++ compiler) is said, not only left out
        skipped = "".join(f"; skipped {k}: {v}" for k, v in section.get("skipped", {}).items())
        if best is None:
            ran = list(dict.fromkeys(r["runtime"] for r in section.get("results", [])))
            if "eager" in ran or not ran:
                return "no runtime besides eager measured" + skipped
            return f"measured {', '.join(ran)}; no speedup figure without eager among --runtimes" + skipped
        from cnnpack.bench import series

        return (f"best: {series(best)} at batch {best['batch_size']}, {best['speedup_vs_eager']:.2f}x eager "
                f"({best['latency_ms_p50']:.2f} ms p50)" + skipped)

    # - triton -
    def run_triton(self, run: Run) -> str:
        from cnnpack.triton_repo import build, check

        configs = [self._over_its_own(run, cfg) for cfg in self.cfg.triton_configs()]
        for cfg in configs:  # every model refused before any is laid out
            check(run, cfg)
        before = stage_section(run, "triton")  # `cnnpack triton`'s, where one laid a model out since
        names, replaced, sections = [], [], []
        for cfg in configs:
            section = build(run.path, cfg)
            sections.append(section)
            names += [section["name"]] + ([section["ensemble"]["name"]] if "ensemble" in section else [])
            replaced += [section["tune_replaced"]] if section.get("tune_replaced") else []
        run.update(lambda m: m["stages"]["triton"].update(models=names))
        note = "".join(f"; {c} now holds triton's settings, not the tuned ones (`cnnpack tune --run {shell(run.path)}` "
                       "tunes it again)" for c in replaced)
        note += _settings_replaced(run, before, sections)
        if earlier := _earlier_models(run, Path(section["repository"]), names):  # formats switched off since
            note += (f"; the repository also holds {', '.join(earlier)}, laid out from this run before and not by this "
                     "pipeline: `cnnpack serve` and `cnnpack deploy` take them too (remove their folders to leave "
                     "them out)")
        return f"{', '.join(names)} in {section['repository']}{note}"

    def _over_its_own(self, run: Run, cfg):
        """`cfg` with force where the folders it would write hold a model this run laid out before (options changed
        since: another image size, --no-int8): this pipeline's to replace. A model of another run, or not of
        cnnpack, is refused in one line that names --repository (it said to pass --name, which the pipeline lacks, or
        --force, which trains again and fails the same way)."""
        from cnnpack.triton_repo import clashes, laid_out_from, repository_root

        name, why = clashes(run, cfg)
        if not why:
            return cfg
        if str(run.path.resolve()) in laid_out_from(repository_root(cfg.repository) / name):
            return replace(cfg, force=True)
        raise UserInputError(f"--repository {cfg.repository}: {why[0]}, laid out by another run or by hand; give this "
                             "run a repository of its own (--repository), or remove that model folder")

    def repository_intact(self, run: Run, section: dict) -> bool:
        """The repository still holds what the stage laid out, byte for byte (a file edited or deleted by hand, or
        the whole repository, is laid out again)."""
        from cnnpack.triton_repo import laid_out

        return all(laid_out(run, cfg) for cfg in self.cfg.triton_configs())

    # - served -
    def served_inputs(self, run: Run) -> dict:
        return {"repository": {k: v.get("sha256") for k, v in stage_section(run, "triton").get("files", {}).items()},
                "models": stage_section(run, "triton").get("models"), "config": asdict(self.cfg.served_config()),
                "checkpoint": _checkpoint(run)}

    def served_rows_kept(self, run: Run, section: dict) -> bool:
        """The served rows are still in verify and bench (a rerun of verify drops them; bench keeps them), and each
        model's latest version is still the one served (Triton serves the latest: one laid out since is served anew)."""
        from cnnpack.served import layout_changed

        formats = set(stage_section(run, "verify").get("formats", {}))
        rows = {r.get("format") for r in stage_section(run, "bench").get("results", [])}
        # (the repository named in the record: an older one without it is served anew)
        current = bool(section.get("repository")) and not layout_changed(run.read()["stages"])
        return current and set(section.get("parity", {})) <= formats and any(f and f.startswith("triton:") for f in rows)

    def served_output(self, run: Run) -> str:
        return str(run.file("served/server.log"))

    def run_served(self, run: Run) -> str:
        from cnnpack.served import served

        kept = {s: stage_section(run, s).get("inputs_sha256") for s in ("verify", "bench")}
        def keep(m):  # served rows were added to verify and bench (also by a served stage cut short): their own
            # inputs did not change (after a Ctrl-C here the next pipeline verified again, "its inputs changed")
            for s, fp in kept.items():
                if fp and s in m["stages"]:
                    m["stages"][s]["inputs_sha256"] = fp

        try:
            section = served(run.path, self.cfg.served_config(), progress=self.say)
        except BaseException:
            with contextlib.suppress(CnnpackError, OSError):  # (the stage's own error is what to say)
                run.update(keep)
            raise
        run.update(keep)
        return section["summary"]

    def _status(self, verb: str):
        """A live one-line status on stderr while a stage works (nothing when progress is off)."""

        if not self.progress:
            return contextlib.nullcontext(lambda _: None)
        from rich.console import Console

        @contextlib.contextmanager
        def ctx():
            with Console(stderr=True).status(verb) as st:
                yield lambda text: st.update(f"{verb} {text}")

        return ctx()


# -- the whole -----------------------------------------------------------------------------------------
def serve_available() -> tuple[bool, str]:
    """Whether the local Triton server can run here (the serve extra, on Linux)."""
    try:
        from cnnpack.triton_dist import locate

        locate()
    except CnnpackError as e:
        return False, str(e)
    return True, ""


def pipeline(run_dir: str | Path | None = None, cfg: PipelineConfig = PipelineConfig(), *, force: bool = False,
             progress: bool = True, say: Callable[[str], None] = print) -> dict:
    """Runs every stage in order (skipping up-to-date ones), writes the report, returns the summary.

    Raises:
        UserInputError (exit 2): bad options or run directory; nothing is run.
        StageFailed (exit 1): a stage failed; the message says which and where its output is.
    """
    cfg.validate()
    if cfg.repository is None:  # a run laid out before stays where it was (the pipeline run again from elsewhere)
        from cnnpack.triton_repo import default_repository

        cfg = replace(cfg, repository=default_repository(run_dir or default_run_dir(cfg)))
    asked, cfg = cfg, cfg.with_openvino().with_pt2()
    if asked.pt2 == "auto" and cfg.pt2 == "no":
        say("[export] pt2 off: no C++ compiler found (`apt-get install g++` or set CXX); --pt2 yes to require it")
    from cnnpack.data import check_data, check_outside, check_torchvision_options, check_val_fraction
    from cnnpack.triton_repo import repository_root

    check_data(cfg.data, cfg.image_size)  # a missing folder or a name Triton cannot carry fails now, not in train
    check_torchvision_options(cfg.data, cfg.data_root, bool(cfg.download))
    if cfg.val_fraction is not None:
        check_val_fraction(cfg.data)
    _check_training_options(cfg)
    cfg.check_calibration()  # past the training split: fails now, not in quantize after training
    repository_root(cfg.repository)  # a file there fails now, not after train, export and bench
    check_foreign_models(cfg)
    run = Run(run_dir or default_run_dir(cfg))
    for what, path in (("--run", run.path), ("--repository", cfg.repository)):
        check_outside(cfg.data, path, what)
    check_run_dir(run, force, cfg.data)
    if run.manifest_path.is_file():  # its records go to this run only, not to one another command's --force made
        run.opened_as = identity(run.read())
    serve_ok, why = serve_available() if cfg.serve != "no" else (False, "--serve no")
    if cfg.serve == "yes" and not serve_ok:
        raise UserInputError(f"--serve yes, but the local Triton server cannot run here: {why}")
    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    at_work = Stages(cfg, progress=progress, say=say)
    at_work.forced = force  # (the train stage says --force as its reason, not a guess from the run's files)
    at_work.on_run = lambda trained: record(trained, cfg, outcomes, t0, status="running")
    stages = at_work.all(serve_ok)
    try:
        for stage in stages:
            outcomes.append(run_stage(run, stage, force=force, say=say))
            record(run, cfg, outcomes, t0, status="running")
        if not serve_ok:
            outcomes.append(Outcome("served", "off", summary=why))
            say(f"[served] off: {why}")
        from cnnpack.report import write_report

        record(run, cfg, outcomes, t0, status="ok")  # before the report, which says whether the pipeline finished
        report = write_report(run.path)
    except KeyboardInterrupt:  # between stages or in the report: the run stays the pipeline's to continue
        record(run, cfg, outcomes, t0, status="interrupted")
        raise Interrupted(f"pipeline interrupted; {again_hint(force)}") from None
    except CnnpackError as e:
        record(run, cfg, outcomes, t0, status="interrupted" if e.exit_code == 130 else "failed")
        raise
    except Exception:  # a bug of ours (a traceback): the run stays the pipeline's, so the same command continues
        record(run, cfg, outcomes, t0, status="failed")
        raise
    return summary(run, outcomes, report, time.perf_counter() - t0)


def _check_training_options(cfg: PipelineConfig) -> None:
    """What train refuses before it writes, refused before the pipeline writes (its record, the train stage's):
    `--device cuda` without a GPU, `--pretrained` of a network that has none. Refused by the train stage, they
    marked a finished training "failed", and the next run said it resumed an interrupted one."""
    from cnnpack.models import no_pretrained_weights
    from cnnpack.train import resolve_device

    resolve_device(cfg.device)
    if cfg.pretrained and (why := no_pretrained_weights(cfg.arch)):
        raise UserInputError(why)


def _tuned_config_kept(run: Run, section: dict) -> bool:
    """The config.pbtxt tune wrote is still served (a triton stage that laid the repository out again replaced it)."""
    from cnnpack.triton_config import tuned_in_place

    return not section.get("written") or tuned_in_place(run.read()["stages"]) is not None
