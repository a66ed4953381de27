"""cnnpack tune against a real local Triton in explicit model-control mode: points, winner, undo, bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from support import need_triton

from cnnpack.errors import MissingStageError, ParityError, UserInputError
from cnnpack.rundir import Run

pytestmark = pytest.mark.triton
serve = pytest.importorskip("cnnpack.serve")

SMALL = dict(instances=(1,), threads=(1,), queue_delays_us=(500,), concurrency=(4,), max_seconds=0.6)


@pytest.fixture(scope="module")
def laid_out(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run, exported, verified and laid out for Triton (ONNX only, to keep it short)."""
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    need_triton()
    root = tmp_path_factory.mktemp("tune")
    run = root / "run"
    shutil.copytree(tiny_run, run)
    export(run, ExportConfig(formats=("onnx",), max_batch_size=16))
    verify(run, VerifyConfig(batch_sizes=(1,)))
    build(run, TritonConfig(repository=str(root / "repo"), threads=1))
    return run


def _copy(laid_out: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The run and its repository, copied; the manifest's repository path follows the copy."""
    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(laid_out, run)
    old = json.loads((run / "cnnpack.json").read_text())
    shutil.copytree(old["stages"]["triton"]["repository"], repo)
    old["stages"]["triton"]["repository"] = str(repo)
    (run / "cnnpack.json").write_text(json.dumps(old))
    return run, repo


@pytest.mark.slow
def test_a_sweep_measures_every_point_on_one_server_and_writes_the_winner(laid_out, tmp_path):
    from cnnpack.triton_publish import PREVIOUS
    from cnnpack.tune import TuneConfig, tune
    from cnnpack.tune_handover import undo

    run, repo = _copy(laid_out, tmp_path)
    before = (repo / "cnn_onnx" / "config.pbtxt").read_text()
    section = tune(run, TuneConfig(latency_budget_ms=10_000, **SMALL))
    labels = [p["label"] for p in section["points"]]
    assert labels == ["cnn_onnx (its config.pbtxt)", "cnn_onnx x1 1t no batching", "cnn_onnx x1 1t batching 500 us"]
    assert section["sweep"]["server_starts"] == 1 and section["sweep"]["search"] == "grid"  # no restart
    default, no_batching = section["points"][0], section["points"][1]
    # the default point records its config.pbtxt's own settings (triton's defaults: 100 us, 1 thread), not ours
    assert (default["queue_delay_us"], default["threads"], default["instances"]) == (100, 1, 1)
    assert no_batching["server_batch_mean"] == 1 and all(p["server_failures"] == 0 for p in section["points"])
    for p in section["points"]:
        assert 0 < p["latency_ms_p50"] <= p["latency_ms_p99"] and p["throughput_ips"] > 0
    w, v = section["winner"], section["verdict"]
    assert w["throughput_ips"] == max(p["throughput_ips"] for p in section["points"])
    assert (tmp_path / "run" / "tune.png").read_bytes()[:4] == b"\x89PNG"
    if w["default"] or v["as_good"]:  # the default kept: nothing written
        assert section["written"] is None and (repo / "cnn_onnx" / "config.pbtxt").read_text() == before
        return
    assert (repo / "cnn_onnx" / PREVIOUS).read_text() == before
    written = (repo / "cnn_onnx" / "config.pbtxt").read_text()
    assert written != before and ("dynamic_batching" in written) == w["dynamic_batching"]
    assert {p.name for p in (repo / "cnn_onnx").iterdir()} >= {"1", "config.pbtxt", PREVIOUS}  # versions untouched
    undo(run)
    assert (repo / "cnn_onnx" / "config.pbtxt").read_text() == before and not (repo / "cnn_onnx" / PREVIOUS).exists()


@pytest.mark.slow
def test_a_budget_no_point_meets_is_exit_1_naming_the_lowest_p99_and_changes_nothing(laid_out, tmp_path):
    from cnnpack.tune import TuneConfig, tune

    run, repo = _copy(laid_out, tmp_path)
    before = (repo / "cnn_onnx" / "config.pbtxt").read_text()
    with pytest.raises(ParityError, match=r"no served config meets p99 <= 0.001 ms; the lowest p99 seen was [\d.]+ ms"):
        tune(run, TuneConfig(latency_budget_ms=0.001, **SMALL))
    assert (repo / "cnn_onnx" / "config.pbtxt").read_text() == before
    section = json.loads((run / "cnnpack.json").read_text())["stages"]["tune"]
    assert section["status"] == "failed" and len(section["points"]) == 3  # the points are kept


@pytest.mark.parametrize(("cfg", "message"), [
    (dict(instances=(4,), threads=(4,)), "more than the .* cores here; pass --oversubscribe"),
    (dict(latency_budget_ms=0), "--latency-budget-ms must be > 0"),
    (dict(objective="cost"), "--objective 'cost'; valid: throughput, latency"),
    (dict(models=("nope",)), "--models 'nope' is not a verified model"),
])
def test_bad_input(laid_out, cfg, message):
    from cnnpack.tune import TuneConfig, tune

    with pytest.raises(UserInputError, match=message):
        tune(laid_out, TuneConfig(**{**SMALL, **cfg}))


def test_the_configs_tune_measures_and_writes_keep_what_the_layout_chose_and_tune_does_not_vary(laid_out, tmp_path):
    """`cnnpack triton --max-batch-size 4 --warmup --preferred-batch-sizes 2,4`: tune's points and its winner were
    built from the defaults, so the winner written over config.pbtxt had max_batch_size 16 and no warm-up."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as pb

    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.tune_grid import Setting, model_config_json

    run, repo = _copy(laid_out, tmp_path)
    build(run, TritonConfig(repository=str(repo), threads=1, max_batch_size=4, warmup=True, preferred_batch_sizes=(2, 4)))
    s = Setting("cnn_onnx", "onnx", instances=2, threads=1, queue_delay_us=300)
    mc = json_format.Parse(model_config_json(Run.open(run), s, str(repo)), pb.ModelConfig())
    assert mc.max_batch_size == 4 and len(mc.model_warmup) > 0
    assert list(mc.dynamic_batching.preferred_batch_size) == [2, 4]
    assert mc.dynamic_batching.max_queue_delay_microseconds == 300 and mc.instance_group[0].count == 2  # varied
    unbatched = json_format.Parse(model_config_json(Run.open(run), Setting("cnn_onnx", "onnx", dynamic_batching=False),
                                                    str(repo)), pb.ModelConfig())
    assert unbatched.max_batch_size == 4 and not unbatched.HasField("dynamic_batching")


def test_a_run_without_a_repository_is_refused(tiny_run):
    from cnnpack.tune import TuneConfig, tune

    with pytest.raises(MissingStageError, match="cnnpack triton --run"):
        tune(tiny_run, TuneConfig())


def test_a_second_tune_on_a_run_is_refused_while_one_runs(tiny_run, tmp_path):
    """Two tunes at once each wrote config.pbtxt from their own sweep; the one recorded last then said another
    config was served than the one on disk."""
    import fcntl

    from cnnpack.tune import TuneConfig, tune
    from cnnpack.tune_handover import undo

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    held = os.open(run, os.O_RDONLY)  # as the first tune holds it
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserInputError, match=rf"another `cnnpack tune` is running on {run}; wait for it"):
            tune(run, TuneConfig())
        with pytest.raises(UserInputError, match="another `cnnpack tune` is running"):  # --undo under its sweep too
            undo(run)
    finally:
        os.close(held)
    with pytest.raises(MissingStageError):  # the first one done: this one goes on (to its own reason here)
        tune(run, TuneConfig())


def test_a_server_that_dies_mid_sweep_keeps_the_points_and_changes_nothing(laid_out, tmp_path):
    import os
    import signal
    import time

    from cnnpack.errors import StageFailed
    from cnnpack.tune import TuneConfig, tune

    run, repo = _copy(laid_out, tmp_path)
    before = (repo / "cnn_onnx" / "config.pbtxt").read_text()

    lines, killed = [], []

    def kill_the_server(line: str) -> None:  # as the second point starts: one measured, the server gone for good
        lines.append(line)
        if not line.startswith("point 2/"):
            return
        pids = [int(pid) for pid in os.listdir("/proc") if pid.isdigit()
                and b"tritonserver" in _cmdline(pid) and str(repo).encode() in _cmdline(pid)]
        assert len(pids) == 1, pids
        os.kill(pids[0], signal.SIGKILL)
        killed.append(pids[0])
        deadline = time.monotonic() + 10
        while _state(pids[0]) not in ("", "Z") and time.monotonic() < deadline:
            time.sleep(0.01)  # gone, or a zombie its parent has not reaped yet

    try:
        tune(run, TuneConfig(latency_budget_ms=10_000, **{**SMALL, "max_seconds": 1.5}), progress=kill_the_server)
    except StageFailed as e:
        assert "the Triton server died during the sweep" in str(e), e
    else:  # what the sweep saw, should it ever end without noticing
        sweep = json.loads((run / "tune.json").read_text())["sweep"]
        pytest.fail(f"tune ended normally; killed {killed}, progress {lines}, sweep {sweep}")
    assert (repo / "cnn_onnx" / "config.pbtxt").read_text() == before
    kept = json.loads((run / "tune.json").read_text())
    assert len(kept["points"]) == 1 and kept["winner"] is None


def _point(label_settings: dict, ips: float, p99: float) -> dict:
    from dataclasses import asdict

    from cnnpack.tune_grid import Setting

    s = Setting(model="cnn_onnx", format="onnx", **label_settings)
    return {**asdict(s), "label": s.label, "precision": "fp32", "concurrency": 4, "throughput_ips": ips,
            "latency_ms_p50": p99 / 2, "latency_ms_p99": p99, "noise": 0.01}


def test_a_winner_whose_record_fails_is_taken_back(laid_out, tmp_path, monkeypatch):
    """A config.pbtxt written but not recorded is one `tune --undo` cannot find: a full disk at the record puts the
    served config (and its missing .prev) back as they were; tune.json and tune.png stay as they were too (a new
    tune.png stood beside the old tune.json and record)."""
    import errno

    from cnnpack.rundir import Run
    from cnnpack.triton_publish import PREVIOUS
    from cnnpack.tune import TuneConfig, finish

    run_dir, repo = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    config = repo / "cnn_onnx" / "config.pbtxt"
    original = config.read_bytes()
    (run_dir / "tune.png").write_bytes(b"the earlier plot")
    real = Run.update

    def full(self, change):
        probe = {"stages": {}}
        change(probe)
        if "tune" in probe["stages"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest_path))
        return real(self, change)

    monkeypatch.setattr(Run, "update", full)
    tuned = {"instances": 1, "threads": 1, "dynamic_batching": True, "queue_delay_us": 500}
    with pytest.raises(OSError, match="No space left"):
        finish(run, TuneConfig(), [_point({"default": True}, 1000, 120), _point(tuned, 980, 40)],
               {"error": None, "server_alive": True})
    assert config.read_bytes() == original and not (repo / "cnn_onnx" / PREVIOUS).exists()
    assert (run_dir / "tune.png").read_bytes() == b"the earlier plot" and not (run_dir / "tune.json").exists()
    assert not [f for f in run_dir.iterdir() if f.name.startswith(".tune")]  # nothing staged left


def test_a_model_exported_again_since_verify_is_refused_before_any_server(laid_out, tmp_path, monkeypatch):
    """`export --max-batch-size 8` after `triton`: the repository serves the verified file (max batch 16), but tune
    built each config from the new record, every one failed to load, and the sweep ended with the default alone."""
    from cnnpack.errors import UserInputError
    from cnnpack.export import ExportConfig, export
    from cnnpack.tune import TuneConfig, tune

    run, repo = _copy(laid_out, tmp_path)
    export(run, ExportConfig(formats=("onnx",), max_batch_size=8))
    monkeypatch.setattr(serve, "TritonServer", None)  # refused before a server is started
    with pytest.raises(UserInputError, match=rf"cnn_onnx serves the onnx artifact `cnnpack verify` checked, and the "
                                             rf"run's onnx artifact was exported again since: run `cnnpack verify "
                                             rf"--run {run}`, then `cnnpack triton --run {run} --repository {repo} "
                                             rf"--format onnx`, to tune the new one"):
        tune(run, TuneConfig())


def test_a_verified_model_gone_from_the_repository_is_said_not_swept(laid_out, tmp_path, caplog):
    """With `model_repository/cnn_onnx_int8` moved away, a default tune swept the others without a word (named in
    --models, it is exit 2). Planted: a second format that passed verify, with no folder in the repository."""
    import logging

    from cnnpack.servable import servable
    from cnnpack.triton_repo import default_name
    from cnnpack.tune import TuneConfig, _say_not_laid_out

    run_dir, repo = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    run.update(lambda m: m["stages"]["verify"]["formats"].__setitem__("torchscript", {"passed": True}))
    gone = default_name(run.model_spec["arch"], "torchscript")
    with caplog.at_level(logging.WARNING, logger="cnnpack"):
        _say_not_laid_out(run, TuneConfig(), servable(run))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith(f"warning: tune: not swept, verified but not in the repository: {gone} "
                                                 f"({repo / gone / 'config.pbtxt'} is missing: `cnnpack triton --run ")
    assert said[0].endswith("--format torchscript` lays it out)")
    caplog.clear()
    onnx = default_name(run.model_spec["arch"], "onnx")
    _say_not_laid_out(run, TuneConfig(models=(onnx,)), servable(run, (onnx,)))  # what was asked for: nothing to say
    assert not caplog.records
    with pytest.raises(UserInputError, match=f"--models '{gone}' is not a verified model"):
        servable(run, (gone,))


def test_a_repository_it_cannot_write_is_refused_before_the_sweep(laid_out, tmp_path, monkeypatch):
    """A read-only repository: the whole sweep ran, then the winner's config.pbtxt.prev could not be written."""
    from support import unwritable

    from cnnpack.tune import TuneConfig, tune

    run, repo = _copy(laid_out, tmp_path)
    unwritable(monkeypatch, repo / "cnn_onnx", OSError(30, "Read-only file system"))
    monkeypatch.setattr(serve, "TritonServer", None)  # refused before a server is started
    with pytest.raises(OSError, match="Read-only file system") as e:
        tune(run, TuneConfig())
    assert e.value.filename == str(repo / "cnn_onnx")


def _tuned_copy(laid_out: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A copy of the run whose cnn_onnx config a tune (`finish` on planted points) replaced: (run, that config.pbtxt,
    its text before)."""
    from cnnpack.rundir import Run
    from cnnpack.tune import TuneConfig, finish

    run_dir, repo = _copy(laid_out, tmp_path)
    config = repo / "cnn_onnx" / "config.pbtxt"
    original = config.read_text()
    tuned = {"instances": 1, "threads": 1, "dynamic_batching": True, "queue_delay_us": 500}
    assert finish(Run.open(run_dir), TuneConfig(), [_point({"default": True}, 1000, 120), _point(tuned, 980, 40)],
                  {"error": None, "server_alive": True})["written"]
    return run_dir, config, original


def test_undo_with_json_prints_json(laid_out, tmp_path):
    """`tune --undo --json` printed the text lines."""
    from typer.testing import CliRunner

    from cnnpack.cli.common import app

    run_dir, config, original = _tuned_copy(laid_out, tmp_path)
    r = CliRunner().invoke(app, ["tune", "--run", str(run_dir), "--undo", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == {"restored": [
        {"config": str(config), "previous": str(config.with_name("config.pbtxt.prev"))}]}, r.output
    assert config.read_text() == original


def test_points_that_could_not_be_measured_are_said_and_no_comparison_is_claimed(laid_out, tmp_path):
    """Every config but the default failed to load: tune said only "it is its model's own config.pbtxt" (the
    reason was in a progress line a terminal overwrites) and the report "the served config is as good as the tuned
    one", though nothing was compared."""
    from cnnpack.report_serving import tune_section
    from cnnpack.rundir import Run
    from cnnpack.tune import TuneConfig, finish
    from cnnpack.tune_outputs import describe

    run_dir, _ = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    errors = [f"cnn_onnx x1 1t no batching at concurrency 4: could not load it ({i})" for i in (1, 2)]
    section = finish(run, TuneConfig(), [_point({"default": True}, 1000, 10)],
                     {"error": errors[-1], "errors": errors, "server_alive": True, "planned": 3})
    assert section["winner"]["default"] and "2 of 3 planned points could not be measured (the first: cnn_onnx x1 " \
        "1t no batching at concurrency 4: could not load it (1); all in tune.json)" in describe(section)
    said = [b.text for b in tune_section(run.read(), run)]
    assert "2 of 3 planned points could not be measured" in said[1]
    assert said[-1] == "No config.pbtxt was changed: no other config could be measured, so none was compared with it."


def test_the_report_marks_the_winner_and_the_budget_and_a_tune_that_chose_none_says_why(laid_out, tmp_path):
    """The report's table was the ten fastest points alike (one past the budget beside the winner, unmarked); a tune
    that met no budget left the section out, and the earlier tune's result with it, saying nothing."""
    from cnnpack.errors import ParityError
    from cnnpack.report_serving import tune_section
    from cnnpack.rundir import Run
    from cnnpack.tune import TuneConfig, finish

    run_dir, _ = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    fast = [_point({"instances": 1, "threads": 1, "queue_delay_us": d}, 3000 - d, 60) for d in range(12)]  # past 50
    points = [_point({"default": True}, 900, 10), _point({"instances": 1, "threads": 2}, 1000, 9), *fast]
    finish(run, TuneConfig(), points, {"error": None, "server_alive": True})
    blocks = tune_section(run.read(), run)
    rows = next(b.rows for b in blocks if b.kind == "table")
    assert rows[0] == ["config", "precision", "concurrency", "images/s", "p50 ms", "p99 ms", "within budget", "steady",
                       "mean batch"]
    assert len(rows) == 1 + 10 + 2  # the ten fastest, then the winner and the default it beat, wherever they rank
    assert rows[1][6] == "**no**" and rows[-2][0] == "★ cnn_onnx x1 2t batching 0 us" and rows[-2][6] == "yes"
    assert rows[-1][0] == "cnn_onnx (its config.pbtxt)" and "2 more points (not shown) are in tune.json." in [b.text for b in blocks]
    with pytest.raises(ParityError):
        finish(run, TuneConfig(latency_budget_ms=1), points, {"error": None, "server_alive": True})
    said = [b.text for b in tune_section(run.read(), run)]
    assert said[1] == ("The last `cnnpack tune` (14 configurations measured) chose none: no point met its p99 budget "
                       "of 1 ms (the lowest p99 seen was 9.00 ms, cnn_onnx x1 2t batching 0 us at concurrency 4); it "
                       "changed no config.")
    assert "The config an earlier tune wrote is still served: cnn_onnx x1 2t batching 0 us" in said[2]


def test_the_verdict_keeps_a_default_only_where_it_could_have_won_and_undo_survives_a_second_tune(laid_out, tmp_path):
    """No sweep: `finish` on planted points. A default outside the budget, or slower on the latency objective,
    is not 'as good'; after a second tune that writes over the first one's config, or keeps it, `--undo` still
    goes back to the config.pbtxt from before any tune, and to another model's too."""
    from cnnpack.rundir import Run
    from cnnpack.triton_config import tuned_in_place
    from cnnpack.triton_publish import PREVIOUS
    from cnnpack.tune import TuneConfig, finish
    from cnnpack.tune_handover import undo

    run_dir, repo = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    config = repo / "cnn_onnx" / "config.pbtxt"
    original = config.read_text()
    info = {"error": None, "server_alive": True}
    default = {"default": True}
    tuned = {"instances": 1, "threads": 1, "dynamic_batching": True, "queue_delay_us": 500}
    # the default 2 % faster but past the 50 ms budget: the tuned config wins and is written
    first = finish(run, TuneConfig(), [_point(default, 1000, 120), _point(tuned, 980, 40)], dict(info))
    assert not first["verdict"]["as_good"] and first["written"] and config.read_text() != original
    written_once = config.read_text()
    assert (repo / "cnn_onnx" / PREVIOUS).read_text() == original
    # another model a tune wrote earlier, still served (planted in the record as a tune leaves it)
    other = repo / "other" / "config.pbtxt"
    other.parent.mkdir()
    other.write_text("tuned other")
    (other.parent / PREVIOUS).write_text("other as laid out")
    from cnnpack.rundir import sha256

    run.update(lambda m: m["stages"]["tune"]["tuned"].update(
        {str(other): {"previous": str(other.parent / PREVIOUS), "sha256": sha256(other)}}))
    # latency objective: the default (now the first tune's config) within the noise on images/s, 9x the p99
    lat = finish(run, TuneConfig(objective="latency"), [_point(default, 1000, 45), _point(tuned | {"queue_delay_us": 0},
                                                                                        990, 5)], dict(info))
    assert not lat["verdict"]["as_good"] and config.read_text() != written_once
    assert (repo / "cnn_onnx" / PREVIOUS).read_text() == original  # the config from before any tune, kept
    # a tune that keeps what is served (as good) writes nothing, says so, and the undo survives it
    kept = finish(run, TuneConfig(), [_point(default, 1000, 10), _point(tuned, 1010, 9)], dict(info))
    assert kept["verdict"]["as_good"] and kept["written"] is None
    # the config the latency tune wrote is still what is served: kept on record, deploy sizes by it
    assert tuned_in_place(run.read()["stages"]) == lat["written"] and kept["kept"]["winner"] == lat["winner"]
    from cnnpack.report_serving import tune_section

    said = tune_section(run.read(), run)[-1].text  # this tune wrote nothing: not "its config.pbtxt holds it"
    assert said == ("No config.pbtxt was changed: `cnn_onnx`'s own config.pbtxt was kept (the winner's gain over it, "
                    "1.01x the images/s, is within the noise (5 %)).")
    latency = {**run.read(), "stages": {**run.read()["stages"], "tune": {**kept, "verdict": {
        **kept["verdict"], "objective": "latency", "gain": 0.8, "p99_gain": 1.03}}}}
    assert "(the winner's gain over it, p99 1.03x lower, is within the noise (5 %))" in tune_section(latency, run)[-1].text
    assert set(kept["tuned"]) == {str(config), str(other)}
    texts = {f: f.read_text() for f in (config, other)}
    for f in texts:  # both edited by hand since: undo would overwrite someone's work, and says why it does not
        f.write_text(texts[f] + "# edited\n")
    with pytest.raises(UserInputError, match=r"changed since `cnnpack tune` wrote it \(edited by hand"):
        undo(run_dir)
    for f, text in texts.items():
        f.write_text(text)
    prevs = [f.parent / PREVIOUS for f in texts]
    for prev in prevs:  # the configs from before the tune deleted: nothing to go back to
        prev.rename(prev.with_suffix(".aside"))
    with pytest.raises(UserInputError, match=r"the config from before the tune, is gone: nothing to undo it to"):
        undo(run_dir)
    for prev in prevs:
        prev.with_suffix(".aside").rename(prev)
    restored = undo(run_dir)
    assert {r["config"] for r in restored} == {str(config), str(other)}
    assert config.read_text() == original and not (repo / "cnn_onnx" / PREVIOUS).exists()
    assert other.read_text() == "other as laid out"
    with pytest.raises(UserInputError, match="no config written by `cnnpack tune` to undo"):
        undo(run_dir)


def test_a_tune_that_chooses_nothing_keeps_the_earlier_winner_that_is_still_served_on_record(laid_out, tmp_path):
    """A second tune whose budget nothing meets changes no config, but its record replaced the first one's winner:
    deploy then sized the pods by the untuned layout and the report dropped the recommended config, while the
    repository still served the first tune's. No sweep: `finish` on planted points."""
    from cnnpack.deploy.plan import _winner, queue_target
    from cnnpack.report_serving import tune_section
    from cnnpack.rundir import Run
    from cnnpack.triton_config import served_winner, tuned_in_place
    from cnnpack.tune import TuneConfig, finish

    run_dir, repo = _copy(laid_out, tmp_path)
    run = Run.open(run_dir)
    info = {"error": None, "server_alive": True, "errors": []}
    tuned = {"instances": 1, "threads": 1, "dynamic_batching": True, "queue_delay_us": 500}
    first = finish(run, TuneConfig(), [_point({"default": True}, 1000, 120), _point(tuned, 980, 40)], dict(info))
    assert first["written"]
    with pytest.raises(ParityError, match="no served config meets p99 <= 1 ms"):
        finish(run, TuneConfig(latency_budget_ms=1), [_point({"default": True}, 900, 30), _point(tuned, 950, 20)],
               dict(info))
    stages = run.read()["stages"]
    assert stages["tune"]["status"] == "failed" and stages["tune"]["winner"] is None
    assert tuned_in_place(stages) == first["written"] and served_winner(stages) == first["winner"]
    assert _winner(stages) == first["winner"]  # deploy sizes by it, and its HPA target by its own budget (50 ms)
    assert "left under the p99 budget (50 ms - 40.00 ms)" in queue_target(stages, repo, [], None).source
    text = " ".join(b.text or "" for b in tune_section(run.read(), run))
    assert "chose none: no point met its p99 budget of 1 ms" in text and "still served: cnn_onnx x1 1t batching 500 us" in text
    (repo / "cnn_onnx" / "config.pbtxt").write_text("laid out again")  # `cnnpack triton` put the defaults back
    assert served_winner(run.read()["stages"]) is None and _winner(run.read()["stages"]) is None


def test_the_refine_gets_only_what_the_coarse_sweep_left_of_the_time_limit(laid_out, tmp_path, monkeypatch):
    """The sweeps are planted (one real server starts, measuring nothing). A coarse sweep cut at the limit is not
    refined; one that left time is refined within what is left (it had the whole --time-limit again, up to twice
    the limit in all), on the same server."""
    from dataclasses import asdict

    import cnnpack.tune as t

    run_dir, _ = _copy(laid_out, tmp_path)
    limits: list[float] = []

    def planted(wall_s: float, truncated: bool):
        def sweep(run, cfg, settings, repository, say, server, first_anyway=True):
            limits.append(cfg.time_limit_s)
            points = [{**asdict(s), "label": s.label, "precision": "fp32", "concurrency": 4, "latency_ms_p50": 2.0,
                       "latency_ms_p99": 5.0, "throughput_ips": 1000.0 + s.queue_delay_us, "noise": 0.01} for s in settings]
            return points, {"search": "grid", "truncated": truncated, "error": None, "errors": [],
                            "server_alive": True, "wall_s": wall_s}
        return sweep

    cfg = t.TuneConfig(latency_budget_ms=50, instances=(1,), threads=(1,), queue_delays_us=(0, 100, 500),
                       concurrency=(4,), max_seconds=1.0, time_limit_s=5)
    monkeypatch.setattr(t, "sweep", planted(5.2, True))
    cut = t.tune(run_dir, cfg)
    assert limits == [5] and cut["sweep"]["refine"] == {"skipped": "the time limit was reached in the coarse sweep"}
    limits.clear()
    monkeypatch.setattr(t, "sweep", planted(3.0, False))
    refined = t.tune(run_dir, cfg)
    assert limits == [5, pytest.approx(2.0)] and refined["sweep"]["search"] == "coarse-to-fine"
    assert refined["sweep"]["server_starts"] == 1  # the refine measures on the coarse sweep's server


def test_a_sweep_starts_no_point_it_cannot_end_by_the_time_limit(monkeypatch):
    """The cnn's default sweep took 303.5 s of its 300: a point started 0.1 s before the limit was measured for 0.5 s
    and reloaded, warmed and read for 2.5 s more. Each point now gets the measurement that ends by the limit beside
    that overhead, and none starts where 0.5 s does not fit (the clock and the points are planted)."""
    from types import SimpleNamespace

    import cnnpack.tune as t

    clock, measured, deadlines = [0.0], [], []

    def point(run, server, s, c, cfg, repository, deadline=None):
        measured.append(cfg.max_seconds)
        deadlines.append(deadline)
        clock[0] += cfg.max_seconds + t.tune_grid.POINT_OVERHEAD_S
        return {"label": s.label, "throughput_ips": 100.0, "latency_ms_p99": 5.0, "load_generator": "planted"}

    monkeypatch.setattr(t, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(t, "measure_point", point)
    server = SimpleNamespace(pid=1, alive=lambda: True)
    settings = [t.Setting("cnn_onnx", "onnx", 1, 1, True, d) for d in range(10)]
    for limit, first_anyway, seconds, max_s in ((21.0, True, [2.0] * 4 + [0.5], 2.0), (1.0, True, [0.5], 2.0),
                                                (1.0, False, [], 2.0), (300, True, [0.5] * 10, 0.2)):
        clock[0], measured[:], deadlines[:] = 0.0, [], []
        points, info = t.sweep(None, t.TuneConfig(max_seconds=max_s, time_limit_s=limit), settings, "repo",
                               lambda _: None, server, first_anyway=first_anyway)
        assert measured == seconds and len(points) == len(seconds) and info["truncated"] == (limit < 300)
        # a point's measurement again (perf_analyzer's longer windows) ends by the limit too; the first one measured
        # whatever the limit has none
        assert deadlines == [None if limit == 1.0 else limit] * len(seconds)
        assert clock[0] <= limit or len(seconds) == 1  # (--max-seconds under 0.5 s: each point 0.5 s, as before)


def _cmdline(pid) -> bytes:
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return b""


def _state(pid) -> str:
    """A process's state letter (Z: a zombie), "" once it is gone."""
    try:
        return open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()[0].decode()
    except (OSError, IndexError):
        return ""


def test_bf16_candidates_are_offered_only_where_the_cpu_computes_bf16():
    from cnnpack.openvino import has_bf16
    from cnnpack.tune import TuneConfig, grid

    models = [("cnn_openvino", "openvino"), ("cnn_onnx", "onnx")]
    forced = grid(models, TuneConfig(bf16="yes", **SMALL), (500,))
    assert [s.label for s in forced if s.bf16] == ["cnn_openvino bf16 x1 1t no batching",
                                                    "cnn_openvino bf16 x1 1t batching 500 us"]
    assert {s.precision for s in forced if s.bf16} == {"bf16"} and not any(s.bf16 for s in forced if s.format == "onnx")
    assert [s.model for s in forced] == ["cnn_openvino", "cnn_onnx"] * 3 + ["cnn_openvino"] * 2  # models take turns:
    # a sweep cut by --time-limit has measured each about as far
    auto = grid(models, TuneConfig(**SMALL), (500,))
    assert any(s.bf16 for s in auto) == has_bf16()
    assert not any(s.bf16 for s in grid(models, TuneConfig(bf16="no", **SMALL), (500,)))


def test_served_models_are_held_to_the_contract_the_runs_verify_used(tiny_run, tmp_path):
    from cnnpack.rundir import Run
    from cnnpack.tune import verify_config

    run = Run(shutil.copytree(tiny_run, tmp_path / "run"))
    assert verify_config(run).min_agreement == 0.999 and verify_config(run).batch_sizes == (1, 8)  # not verified yet
    run.update(lambda m: m["stages"].setdefault("verify", {}).update(
        config={"min_agreement": 0.9, "atol": 1e-3, "int8_min_agreement": None, "batch_sizes": [1, 8, 32],
                "data": "./elsewhere", "samples": 4096}))
    cfg = verify_config(run)
    assert (cfg.min_agreement, cfg.atol, cfg.int8_min_agreement, cfg.batch_sizes) == (0.9, 1e-3, None, (1, 8))
    assert (cfg.data, cfg.samples) == (None, 32)  # the contract, not a relative path or a slow sample count


@pytest.mark.slow
def test_a_forced_bf16_config_is_verified_measured_and_logged_a_line_per_point(laid_out, tmp_path):
    """`--bf16 yes` serves the OpenVINO IR with the bf16 hint (on a CPU without bf16 OpenVINO computes f32, so the
    bf16 contract holds trivially here; where bf16 is native the same path is the one `auto` takes)."""
    import subprocess
    import sys

    pytest.importorskip("openvino")
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    run, repo = _copy(laid_out, tmp_path)
    export(run, ExportConfig(formats=("onnx", "openvino"), max_batch_size=16))
    # the contract tune holds served models to is the run's: one bf16 flip in 90 barely trained images is 98.9 %
    verify(run, VerifyConfig(batch_sizes=(1,), min_agreement=0.9))
    build(run, TritonConfig(repository=str(repo), format="openvino", threads=1))
    out = subprocess.run([sys.executable, "-m", "cnnpack", "tune", "--run", str(run), "--models", "cnn_openvino",
                          "--bf16", "yes", "--instances", "1", "--threads", "1", "--queue-delays-us", "500",
                          "--concurrency", "4", "--max-seconds", "0.6", "--latency-budget-ms", "10000",
                          "--load-generator", "cnnpack", "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    points = {p["label"]: p for p in json.loads(out.stdout)["points"]}
    bf16 = points["cnn_openvino bf16 x1 1t batching 500 us"]
    assert bf16["precision"] == "bf16" and bf16["throughput_ips"] > 0 and points["cnn_openvino x1 1t no batching"]["precision"] == "fp32"
    assert bf16["load_generator"] == "cnnpack client"
    from cnnpack.openvino import has_bf16

    if not has_bf16():  # measured and shown as computed in f32, never chosen: its bf16 behaviour was not measured
        assert bf16["computed"] == "fp32" and "(fp32 here)" not in out.stdout  # (--json: the table is not printed)
        assert "no native bf16" in out.stderr and "bf16" not in (json.loads(out.stdout)["winner"] or {}).get("label", "")
    measured = [line for line in out.stderr.splitlines() if line.startswith("tune: measured ")]
    assert len(measured) == len(points) == 5  # its config.pbtxt, fp32 and bf16 without and with batching


def test_an_unsteady_winner_or_default_is_measured_again_on_the_same_server(laid_out, tmp_path, monkeypatch):
    """One stalled window (4,693, 888 and 46 images/s) made the default's noise 10,000 %, and a winner with a tenth of
    its p99 was "within the noise". The sweep is planted; the second measurements are real."""
    import cnnpack.tune as t

    run_dir, _ = _copy(laid_out, tmp_path)
    default = {**_point({"default": True}, 1736.0, 23.9), "stable": False, "window_throughput_ips": [4693, 888, 46],
               "noise": 101.0}
    winner = {**_point({"instances": 1, "threads": 1}, 1980.0, 2.2), "stable": True,
              "window_throughput_ips": [1990, 1970, 1980]}
    monkeypatch.setattr(t, "sweep", lambda run, cfg, settings, repository, say, server: (
        [dict(default), dict(winner)], {"search": "grid", "truncated": False, "error": None, "errors": [],
                                        "server_alive": True, "wall_s": 1.0}))
    said: list[str] = []
    cfg = t.TuneConfig(latency_budget_ms=500, instances=(1,), threads=(1,), queue_delays_us=(0,), concurrency=(4,),
                       max_seconds=1.0, time_limit_s=60)
    section = t.tune(run_dir, cfg, progress=said.append)
    measured_again = [line for line in said if line.startswith("measuring ")]
    assert measured_again[0] == (f"measuring {default['label']} at concurrency 4 again: its windows did not agree "
                                 "(4,693, 888, 46 images/s)")  # the steady winner is not measured again for it
    assert section["sweep"]["settle"]["points"][0] == f"{default['label']} c4" and len(measured_again) <= 2
    again = {p["label"]: p for p in section["points"]}
    # the steadier measurement stands (the real one, over a noise of 10,000 %), the planted one kept beside it
    assert again[default["label"]]["first_measure"]["window_throughput_ips"] == default["window_throughput_ips"]
    assert again[default["label"]]["load_generator"] and again[default["label"]]["noise"] < default["noise"]
    if len(measured_again) == 1:  # the winner stood (steady): its figures are the planted ones
        assert again[winner["label"]]["throughput_ips"] == winner["throughput_ips"]


def test_a_default_measured_after_another_point_is_its_config_pbtxt_not_the_last_config_loaded(laid_out, tmp_path):
    """Triton reloads what it holds on a plain load of a model loaded with an override: the default, measured again
    by settling after the 500 us point, was that point (its row read "queue_delay_us": 500, config.pbtxt has 100)."""
    import cnnpack.tune as t
    from cnnpack.serve import ServeConfig, TritonServer

    run_dir, repo = _copy(laid_out, tmp_path)
    cfg = t.TuneConfig(concurrency=(1,), max_seconds=0.5)
    run = Run.open(run_dir)
    with TritonServer(ServeConfig(repository=str(repo), explicit=True)) as server:
        other = t.measure_point(run, server, t.Setting("cnn_onnx", "onnx", 1, 1, True, 500), 1, cfg, str(repo))
        default = t.measure_point(run, server, t.Setting("cnn_onnx", "onnx", default=True), 1, cfg, str(repo))
    assert other["queue_delay_us"] == 500 and other["threads"] == 1
    assert (default["queue_delay_us"], default["threads"], default["dynamic_batching"]) == (100, 1, True)
    from cnnpack.rundir import sha256  # which config.pbtxt it measured: the report compares only that one's figures

    assert default["config_sha256"] == sha256(repo / "cnn_onnx" / "config.pbtxt") and "config_sha256" not in other


def test_a_default_loads_its_config_pbtxt_as_the_local_server_reads_it(tmp_path):
    """A pt2 model's config.pbtxt names `platform: "torch_aoti"`, which the local Triton 2.51 refuses: the default
    point loads it without that line (as `cnnpack serve` gives it), everything else as written; no readable config
    is None (Triton's plain load then says why)."""
    from cnnpack.tune_grid import own_config_json

    (tmp_path / "cnn_pt2").mkdir()
    (tmp_path / "cnn_pt2" / "config.pbtxt").write_text(
        'name: "cnn_pt2"\nplatform: "torch_aoti"\nbackend: "pytorch"\ndefault_model_filename: "model.pt2"\n'
        "max_batch_size: 8\ndynamic_batching { max_queue_delay_microseconds: 100 }\n")
    got = json.loads(own_config_json(str(tmp_path), "cnn_pt2"))
    assert got == {"name": "cnn_pt2", "backend": "pytorch", "default_model_filename": "model.pt2", "max_batch_size": 8,
                   "dynamic_batching": {"max_queue_delay_microseconds": "100"}}
    assert own_config_json(str(tmp_path), "missing") is None
    (tmp_path / "cnn_pt2" / "config.pbtxt").write_text("max_batch_size: {")
    assert own_config_json(str(tmp_path), "cnn_pt2") is None


def test_settling_keeps_the_steadier_measurement_and_judges_a_new_winner_again(monkeypatch):
    """The step measured a steady winner again for its default's sake and replaced its steady figure by an unsteady
    one; the winner that then came first had been measured once and decided the verdict. Measurements planted."""
    from types import SimpleNamespace

    import cnnpack.tune as t

    default = {**_point({"default": True}, 900.0, 20), "stable": False, "noise": 1.0}
    a = {**_point({"instances": 1, "threads": 1}, 3363.0, 8), "stable": False, "noise": 0.5}
    b = {**_point({"instances": 1, "threads": 2}, 3196.0, 9), "stable": False, "noise": 0.3}
    second = {a["label"]: {**a, "throughput_ips": 2009.0, "noise": 0.9},  # worse: the first stands
              default["label"]: {**default, "throughput_ips": 2902.0, "noise": 0.006, "stable": True},
              b["label"]: {**b, "throughput_ips": 3100.0, "noise": 0.02, "stable": True}}
    measured: list[str] = []
    monkeypatch.setattr(t, "measure_point", lambda run, server, s, c, cfg, repo, deadline: (
        measured.append(s.label) or dict(second[s.label])))
    points, info = [dict(default), dict(a), dict(b)], {"wall_s": 0.0}
    t._settle(None, t.TuneConfig(latency_budget_ms=50), points, info, "", lambda _: None,
              SimpleNamespace(alive=lambda: True))
    by = {p["label"]: p for p in points}
    assert measured == [default["label"], a["label"]]  # a stays first (its first figure), so b is never needed
    assert by[a["label"]]["throughput_ips"] == 3363.0 and by[a["label"]]["second_measure"]["throughput_ips"] == 2009.0
    assert by[default["label"]]["throughput_ips"] == 2902.0 and by[default["label"]]["first_measure"]["noise"] == 1.0
    assert info["settle"]["points"] == [f"{default['label']} c4", f"{a['label']} c4"]
    # a measured steadier and slower: b leads now, measured once and unsteady, so it is measured again too
    second[a["label"]] = {**a, "throughput_ips": 2009.0, "noise": 0.02, "stable": True}
    measured.clear()
    points, info = [dict(default), dict(a), dict(b)], {"wall_s": 0.0}
    t._settle(None, t.TuneConfig(latency_budget_ms=50), points, info, "", lambda _: None,
              SimpleNamespace(alive=lambda: True))
    assert measured == [default["label"], a["label"], b["label"]] and t.choose(points, t.TuneConfig())["label"] == \
        b["label"] and all(p["stable"] for p in points)


def test_the_verdict_line_gives_the_figure_the_winner_was_chosen_on_and_says_when_the_sweep_was_cut():
    """--objective latency chose on p99 but the line gave the throughput ratio (1.12x, a gain below the noise read as
    applied anyway); a sweep cut by --time-limit read as complete."""
    from cnnpack.tune_outputs import describe

    winner = {"label": "cnn_onnx x1 2t batching 0 us", "model": "cnn_onnx", "concurrency": 1, "throughput_ips": 560.0,
              "latency_ms_p99": 1.79}
    verdict = {"default": "cnn_onnx (its config.pbtxt)", "gain": 1.12, "p99_gain": 2.81 / 1.79, "noise": 0.16,
               "objective": "latency", "as_good": False}
    section = {"winner": winner, "verdict": verdict, "points": [{}] * 6, "written": None,
               "sweep": {"truncated": True, "planned": 14}}
    line = describe(section)
    assert "p99 1.57x lower than the default's (cnn_onnx (its config.pbtxt), noise 16 %)" in line
    assert "1.12x" not in line
    assert "cut at --time-limit after 6 of 14 planned points, so not every config was tried" in line
    throughput = describe({**section, "verdict": {**verdict, "objective": "throughput"}, "sweep": {}})
    assert "; 1.12x the default (cnn_onnx (its config.pbtxt), noise 16 %)" in throughput and "cut" not in throughput
    own = {**winner, "label": "cnn_onnx (its config.pbtxt)", "default": True}  # it read 'p99 1.00x lower than
    # the default's (cnn_onnx (its config.pbtxt) ...)': itself
    line = describe({**section, "winner": own, "verdict": {**verdict, "p99_gain": 1.0}, "sweep": {}})
    assert "; it is its model's own config.pbtxt (no config to write)" in line and "lower than" not in line
    shaky = describe({**section, "verdict": {**verdict, "as_good": True, "unsteady": ["cnn_onnx (its config.pbtxt)"]},
                      "sweep": {"settle": {"points": ["cnn_onnx (its config.pbtxt) c1", "b"]}}})
    assert shaky.endswith("; unsteady even measured twice (cnn_onnx (its config.pbtxt): its windows of load did not "
                          "agree, the machine being busy), so no figure tells the two apart: the default config was "
                          "kept; tune again on a quieter machine or with a longer --max-seconds")
    assert "within the noise" not in shaky
    failed = describe({**section, "verdict": {**verdict, "as_good": True, "unsteady": ["a"]},
                       "sweep": {"settle": {"points": ["a", "b"], "error": "a: the server died"}}})
    assert "; unsteady (a: its windows" in failed  # measured once: not "even measured twice"


def _kept_unsteady() -> dict:
    """A tune that kept the default: its best point unsteady even measured twice (1,155 first, 826 again, below the
    default's 902), as `tune --models cnn_onnx --instances 1,2 --concurrency 4` recorded it."""
    default = {**_point({"default": True}, 902.0, 9.0), "stable": True}
    best = {**_point({"instances": 1, "threads": 1, "queue_delay_us": 0}, 1155.0, 8.0), "stable": False,
            "second_measure": {"throughput_ips": 826.0, "latency_ms_p99": 12.5, "stable": False}}
    other = {**_point({"instances": 2, "threads": 1, "queue_delay_us": 0}, 700.0, 11.0), "stable": True}
    verdict = {"default": default["label"], "gain": 1155 / 902, "noise": 0.3, "objective": "throughput",
               "as_good": True, "unsteady": [best["label"]]}
    return {"status": "ok", "config": {"latency_budget_ms": 50.0}, "points": [default, best, other], "winner": best,
            "verdict": verdict, "written": None, "sweep": {"search": "grid", "wall_s": 9.0, "server_starts": 1,
                                                           "settle": {"points": [f"{best['label']} c4"]}}}


def test_a_config_not_adopted_is_not_called_the_winner_and_shows_both_its_measurements(capsys, tmp_path, monkeypatch):
    """The default was kept ("unsteady even measured twice"), yet the table starred the faster config, tune.png's
    legend said "winner: ..." and the report starred it too, showing 1,155 images/s alone: measured again, 826."""
    from matplotlib.figure import Figure

    from cnnpack.cli.tune_cmd import _table
    from cnnpack.report_serving import _points_table
    from cnnpack.tune_outputs import describe, plot

    section = _kept_unsteady()
    best = section["winner"]["label"]
    assert describe(section).startswith(f"best measured, not adopted: {best} at concurrency 4: 1,155 images/s")
    _table(section)
    printed = capsys.readouterr().out
    assert "★" not in printed and "winner" not in printed and "not adopted" in printed and "(kept)" in printed
    assert "1,155 (again 826)" in printed and "8.00 (again 12.50)" in printed
    rows = _points_table(section)[0].rows
    assert [r[0] for r in rows[1:]] == [f"{best} (best measured, not adopted)", "cnn_onnx (its config.pbtxt) (kept)",
                                        "cnn_onnx x2 1t batching 0 us"]
    assert rows[1][3] == "1,155 (again 826)" and rows[2][3] == "902"
    legends: list[list[str]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    plot(section["points"], section["winner"], 50.0, tmp_path / "tune.png", is_adopted=False)
    assert f"best measured, not adopted: {best}" in legends[0] and not any("winner" in t for t in legends[0])
    adopted = {**section, "verdict": {**section["verdict"], "as_good": False, "unsteady": []}}
    assert describe(adopted).startswith(f"winner: {best}")
    assert _points_table(adopted)[0].rows[1][0] == f"★ {best}"


def test_tune_png_lists_a_pareto_front_only_where_one_is_drawn(tmp_path, monkeypatch):
    """One point beats every other on both images/s and p99: the front is that point, no line is drawn, and the
    legend listed "Pareto front" all the same."""
    from matplotlib.figure import Figure

    from cnnpack.tune_outputs import plot

    legends: list[list[str]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.append(
        [t.get_text() for t in fig.axes[0].get_legend().get_texts()]))
    one = [_point({"default": True}, 900.0, 9.0), _point({"instances": 1, "threads": 1}, 1200.0, 5.0)]
    two = [_point({"default": True}, 900.0, 4.0), _point({"instances": 1, "threads": 1}, 1200.0, 5.0)]
    for points in (one, two):
        plot(points, points[1], 50.0, tmp_path / "tune.png")
    assert "Pareto front" not in legends[0] and "Pareto front" in legends[1]


def test_measuring_again_says_which_figure_of_its_windows_disagreed():
    """"its windows did not agree (1,164, 1,244, 1,199 images/s)": those agree within 7 %; the rule (perf_analyzer's
    and measure.agree alike) also holds each window's latency to 10 %, and that is what disagreed."""
    from cnnpack.tune import unsteady_why

    p = {"window_throughput_ips": [1164.0, 1244.0, 1199.0],
         "judged_windows": {"throughput_ips": [1164.0, 1244.0, 1199.0], "latency_ms": [3.1, 4.52, 3.3],
                            "tolerance": 0.1}}
    assert unsteady_why(p) == "its windows' latency (3.10, 4.52, 3.30 ms) did not agree within 10 %"
    both = {"judged_windows": {"throughput_ips": [4693.0, 888.0, 0.0], "latency_ms": [1.0, 5.0, None],
                               "tolerance": 0.1}}
    assert unsteady_why(both) == ("its windows' images/s (4,693, 888, 0) and latency (1.00, 5.00 ms) did not agree "
                                  "within 10 %")
    short = {"judged_windows": {"throughput_ips": [1000.0, 1010.0], "latency_ms": [1.0, 1.0], "tolerance": 0.1}}
    assert unsteady_why(short) == "only 2 of its windows fit in --max-seconds, and 3 in a row must agree within 10 %"
    assert unsteady_why({"window_throughput_ips": [4693, 888, 46]}) == (
        "its windows did not agree (4,693, 888, 46 images/s)")  # recorded before the judged windows


def test_instances_or_threads_past_the_cores_are_said_to_be_left_out(monkeypatch):
    """--instances 1,3 --threads 1 on 2 cores measured 1 alone without a word; the defaults (1,2 and 1,2) on one core
    must still run (a refusal would stop plain `cnnpack tune` there)."""
    import cnnpack.tune_grid as t

    monkeypatch.setattr(t, "usable_cores", lambda: 2)
    assert t.past_the_cores(t.TuneConfig(instances=(1, 3), threads=(1,))) == "--instances 3"
    assert t.past_the_cores(t.TuneConfig(instances=(1, 2), threads=(1, 2))) == ""
    assert t.past_the_cores(t.TuneConfig(instances=(1, 3), threads=(1, 3), oversubscribe=True)) == ""
    monkeypatch.setattr(t, "usable_cores", lambda: 1)
    t.TuneConfig().validate()
    assert t.past_the_cores(t.TuneConfig()) == "--instances 2 and --threads 2"


def test_the_report_says_where_the_sweep_and_the_served_stage_measured_the_same_config_apart():
    """"Served by Triton" showed cnn_onnx at 2,410 images/s at 16 and the tune paragraph "1.02x cnn_onnx as served
    today" for a winner at 3,866: the sweep had measured the same config at 3,774. Said, with when; not within the
    noise, over another protocol, or where the served stage measured another layout."""
    from cnnpack.report_serving import _measured_apart

    served = {"status": "ok", "updated": "2026-12-06T16:36:37+00:00", "triton_files": {"config.pbtxt": "a1"}, "load": [
        {"format": "triton:cnn_onnx", "concurrency": 16, "throughput_ips": 2410.0, "load_generator": "cnnpack client"}]}
    stages = {"triton": {"name": "cnn_onnx", "files": {"config.pbtxt": {"sha256": "a1"}}}, "served": served}
    own = {"default": True, "model": "cnn_onnx", "concurrency": 16, "throughput_ips": 3774.0, "noise": 0.08,
           "load_generator": "cnnpack client", "config_sha256": "a1"}
    t = {"config": {"protocol": "http"}, "updated": "2026-12-06T16:39:46+00:00", "winner": {"concurrency": 16},
         "points": [own]}
    assert _measured_apart(stages, t) == (
        " `cnn_onnx` as laid out ran 3,774 images/s at concurrency 16 in this sweep (ended 16:39 UTC) and 2,410 in the "
        "served stage above (16:36 UTC), 1.57x apart: one config measured at two times on a host whose speed varies; "
        "the gains here compare points of this sweep only.")
    assert _measured_apart(stages, {**t, "points": [{**own, "throughput_ips": 2600.0}]}) == ""  # within 10 %
    assert _measured_apart(stages, {**t, "points": [{**own, "throughput_ips": 2900.0, "noise": 0.3}]}) == ""
    assert _measured_apart(stages, {**t, "config": {"protocol": "grpc"}}) == ""  # the served load is HTTP
    assert _measured_apart(stages, {**t, "winner": {"concurrency": 4}}) == ""  # no served row at 4
    moved = {**stages, "served": {**served, "repository": "/elsewhere"}, "triton": {"name": "cnn_onnx",
                                                                                   "repository": "/here"}}
    assert _measured_apart(moved, t) == ""  # the served stage measured another repository


def test_the_report_does_not_put_two_configs_measured_apart_down_to_the_host():
    """`cnnpack triton --max-queue-delay-us 20000`, a tune, then the pipeline laying the 100 us config out again: the
    report read "46 ... and 832 in the served stage above, 18.04x apart: one config measured at two times on a host
    whose speed varies". The sweep's default had measured the 20 ms config, whose digest it records."""
    from cnnpack.report_serving import _measured_apart

    served = {"status": "ok", "updated": "2026-12-07T18:52:17+00:00", "triton_files": {"config.pbtxt": "100us"},
              "load": [{"format": "triton:cnn_onnx", "concurrency": 1, "throughput_ips": 832.0}]}
    stages = {"triton": {"name": "cnn_onnx", "files": {"config.pbtxt": {"sha256": "100us"}}}, "served": served}
    own = {"default": True, "model": "cnn_onnx", "concurrency": 1, "throughput_ips": 46.0, "noise": 0.02,
           "instances": 1, "threads": 0, "dynamic_batching": True, "queue_delay_us": 20000, "config_sha256": "20ms"}
    t = {"config": {"protocol": "http"}, "winner": {"concurrency": 1}, "points": [own]}
    said = _measured_apart(stages, t)
    assert said == (" `cnn_onnx` ran 46 images/s at concurrency 1 in this sweep and 832 in the served stage above, as "
                    "two configs: the sweep measured the config.pbtxt it held then (x1 0t batching 20000 us), not the "
                    "one the served stage measured (laid out again or tuned in between); the gains here compare "
                    "points of this sweep only.")
    assert "host" not in said
    unknown = {k: v for k, v in own.items() if k != "config_sha256"}  # a tune recorded before the digest: not known
    assert _measured_apart(stages, {**t, "points": [unknown]}) == ""


def test_the_report_names_the_winner_an_undo_took_out():
    """After `cnnpack tune --undo` the report said "`cnn_onnx`'s config.pbtxt no longer holds it" of an earlier tune's
    winner it never named (this tune had kept the default, writing nothing). Recorded sections, no sweep."""
    from types import SimpleNamespace

    from cnnpack.report_serving import _kept_section, _tuned_state

    run = SimpleNamespace(path=Path("/r"))
    earlier = {**_point({"instances": 2, "threads": 1, "queue_delay_us": 500}, 1500.0, 9.0)}
    mine = _point({"instances": 1, "threads": 1}, 1010.0, 9.0)
    undone = [{"config": "/repo/cnn_onnx/config.pbtxt", "previous": "/repo/cnn_onnx/config.pbtxt.prev"}]
    kept = {"status": "ok", "winner": mine, "written": None, "points": [mine], "undone": undone,
            "verdict": {"as_good": True, "gain": 1.01, "noise": 0.05}, "kept": {"winner": earlier}}
    said = _tuned_state({"tune": kept}, mine, run)
    assert said == ("No config.pbtxt was changed: `cnn_onnx`'s own config.pbtxt was kept (the winner's gain over it, "
                    "1.01x the images/s, is within the noise (5 %)). The config an earlier tune wrote, cnn_onnx x2 1t "
                    "batching 500 us at concurrency 4 (1,500 images/s), was undone since (`cnnpack tune --undo`).")
    own = {**kept, "verdict": {"as_good": False, "gain": 1.4, "noise": 0.05}, "kept": None}  # this tune's, undone
    assert _tuned_state({"tune": own}, mine, run) == (
        "`cnn_onnx`'s config.pbtxt no longer holds it: `cnnpack tune --undo` put back the one from before any tune; "
        "`cnnpack tune --run /r` measures and writes it again.")
    failed = {"status": "failed", "winner": None, "undone": undone, "kept": {"winner": earlier}}
    assert _kept_section({"stages": {"tune": failed}}, run)[0].text == (
        "The config an earlier tune wrote, cnn_onnx x2 1t batching 500 us at concurrency 4 (1,500 images/s), was "
        "undone since (`cnnpack tune --undo`).")


def test_an_undo_killed_before_its_record_is_finished_and_one_whose_record_fails_puts_the_tuned_config_back(
        laid_out, tmp_path, monkeypatch):
    """`tune --undo` wrote each config and deleted its .prev before the record: killed in between, the next undo
    refused ("changed since `cnnpack tune` wrote it (edited by hand ...)") and the record named the tuned config."""
    from cnnpack.rundir import Run
    from cnnpack.triton_publish import PREVIOUS
    from cnnpack.tune_handover import undo

    run_dir, config, original = _tuned_copy(laid_out, tmp_path)
    written = config.read_text()

    def record_fails(self, fn):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Run, "update", record_fails)
    with pytest.raises(OSError):
        undo(run_dir)
    monkeypatch.undo()
    assert config.read_text() == written and (config.parent / PREVIOUS).read_text() == original
    config.write_text(original)  # killed after the config was put back, before the record
    assert [r["config"] for r in undo(run_dir)] == [str(config)]
    assert config.read_text() == original and not (config.parent / PREVIOUS).exists()
    assert Run.open(run_dir).read()["stages"]["tune"]["tuned"] == {}
