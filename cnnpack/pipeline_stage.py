"""The pipeline's stage runner: a stage is skipped when the fingerprint of its inputs (its options plus the sha256
of every file it reads) is the one its last successful run recorded and its outputs are still there; otherwise it
runs, and a failure or Ctrl-C is recorded in its manifest section and said as the pipeline's own error."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnpack.errors import CnnpackError, RunReplaced, StageFailed, UserInputError, file_error
from cnnpack.rundir import Run, sha256


class Interrupted(CnnpackError):
    """Ctrl-C during a stage (exit 130)."""

    exit_code = 130


@dataclass
class Stage:
    name: str
    inputs: Callable[[Run], dict]  # what the stage reads; a change means it must run again
    run: Callable[[Run], str]  # does the work; returns a one-line summary
    output: Callable[[Run], str]  # where to look when it fails
    outputs_exist: Callable[[Run, dict], bool] = lambda run, section: True
    # the inputs as an earlier cnnpack fingerprinted them: still "unchanged" (an update that identifies the data
    # more closely does not train every finished run again)
    earlier: Callable[[Run], dict] | None = None


@dataclass
class Outcome:
    name: str
    status: str  # ran | skipped | failed | off
    seconds: float = 0.0
    summary: str = ""


def fingerprint(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_section(run: Run, name: str) -> dict:
    return run.read().get("stages", {}).get(name, {}) if run.manifest_path.is_file() else {}


def _files_exist(run: Run, section: dict) -> bool:
    """Every `{path, sha256}` the stage recorded under outputs/artifacts is still there, unchanged."""
    records = [*section.get("outputs", {}).values(), *section.get("artifacts", {}).values()]
    records += [r["weights"] for r in section.get("artifacts", {}).values() if isinstance(r, dict) and "weights" in r]
    return all(run.file(r["path"]).is_file() and sha256(run.file(r["path"])) == r["sha256"]
               for r in records if isinstance(r, dict) and "path" in r and "sha256" in r)


def why_run(run: Run, stage: Stage, inputs: str) -> str | None:
    """Why the stage runs: None where it last succeeded on exactly these inputs (a fingerprint) and what it wrote is
    still there."""
    section = stage_section(run, stage.name)
    if section.get("status") is None:
        return ""
    if section.get("status") != "ok":
        return f"its last run {section['status']}" if isinstance(section["status"], str) else ""
    recorded = section.get("inputs_sha256")  # (the earlier fingerprint only where this one differs: it walks the data)
    if recorded != inputs and (stage.earlier is None or recorded != fingerprint(stage.earlier(run))):
        return "its inputs changed since its last successful run"
    if not (_files_exist(run, section) and stage.outputs_exist(run, section)):
        return "what it wrote is gone or changed"
    return None


def again_hint(force: bool) -> str:
    """How to continue an interrupted pipeline: the same command, less --force (which would start it over)."""
    return ("run the same `cnnpack pipeline` command again" + (" without --force" if force else "") + " to continue")


def run_stage(run: Run, stage: Stage, *, force: bool, say: Callable[[str], None]) -> Outcome:
    run.check_not_replaced()  # a `train --force` since the last stage: no stage runs on (or lays out) the new run
    inputs = fingerprint(stage.inputs(run))
    why = "--force" if force else why_run(run, stage, inputs)
    if why is None:
        say(f"[{stage.name}] skipped: inputs unchanged since its last successful run")
        return Outcome(stage.name, "skipped", summary="inputs unchanged")
    say(f"[{stage.name}] running" + (f" ({why})" if why else ""))
    t0 = time.perf_counter()
    before = stage_section(run, stage.name)
    try:
        summary = stage.run(run)
    except KeyboardInterrupt:  # Ctrl-C outside a training epoch (which train turns into its own Interrupted)
        # an earlier training's record stays while this one has not begun (nothing stale is resumed); any other
        # stage that began may have rewritten some of its outputs (the served stage: verify's served rows, its log)
        if stage.name != "train" or stage_section(run, stage.name).get("status") in (None, "running"):
            _mark_failed(run, stage.name, "interrupted", status="interrupted")
        raise Interrupted(f"pipeline interrupted in stage {stage.name}; {again_hint(force)}") from None
    except CnnpackError as e:
        # a training refused before it began (bad input: torchvision's weights not to be had) leaves the last one's
        # record: "failed" made export warn that it had not finished, and the next run "resume" it
        if not (stage.name == "train" and isinstance(e, UserInputError) and stage_section(run, stage.name) == before):
            _mark_failed(run, stage.name, str(e), status="interrupted" if e.exit_code == 130 else "failed")
        if e.exit_code == 130:  # Ctrl-C during training: the next pipeline run resumes it
            said = re.split(r"; (?:continue with|start again with) `cnnpack train", str(e))[0]  # train's own advice
            raise Interrupted(f"pipeline interrupted in stage {stage.name}: {said}; {again_hint(force)}") from None
        pointer = stage.output(run)
        named = re.search(re.escape(str(pointer)) + r"(?![\w/.-])", str(e))  # verify's names verify.json itself
        see = f" (see {pointer})" if Path(pointer).exists() and not named else ""  # no manifest: train failed first
        stopped = StageFailed(f"pipeline stopped: stage {stage.name} failed: {e}{see}")
        stopped.exit_code = e.exit_code  # bad input stays exit 2 (an empty class folder), as from the command itself
        raise stopped from None
    except OSError as e:  # a full disk, a folder that cannot be written: the stage is marked failed like any other
        _mark_failed(run, stage.name, file_error(e))
        raise StageFailed(f"pipeline stopped: stage {stage.name} failed: {file_error(e)}") from None
    run.update(lambda m: m["stages"][stage.name].update(inputs_sha256=inputs))
    out = Outcome(stage.name, "ran", round(time.perf_counter() - t0, 1), summary)
    say(f"[{stage.name}] done in {out.seconds:.1f} s: {summary}")
    return out


def _mark_failed(run: Run, name: str, error: str, status: str = "failed") -> None:
    """Records the failure in the manifest (a stage that failed before writing its section gets one)."""
    if not run.manifest_path.is_file():
        return

    def mark(m: dict) -> None:
        section = m.setdefault("stages", {}).setdefault(name, {})
        section.update(status=status, error=error)
        section.pop("inputs_sha256", None)

    with contextlib.suppress(RunReplaced):  # the new run is not this pipeline's: its stages are not marked
        run.update(mark)
