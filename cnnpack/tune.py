"""`cnnpack tune`: measure served configurations on a local Triton and hand over the best one for a budget.

What Model Analyzer answers with Docker and perf_analyzer, in minutes and on the run's own repository:
one local Triton in explicit model-control mode; for every candidate (model x settings) the model is
(re)loaded with a config override (`POST /v2/repository/models/<name>/load` with the config as JSON,
built by `triton_repo.classifier_config` like the ones `cnnpack triton` writes), so the server is never
restarted between points; then the closed-loop load generator (`loadclient.Load`) drives it at each
concurrency and Triton's own statistics say what it batched, queued and computed.

Candidates: every servable model of the run that passed verify (fp32 ONNX, TorchScript, the int8 and
OpenVINO ones when they exist), crossed with dynamic batching off / on at several queue delays,
instance counts and backend thread counts (instances x threads <= cores unless `oversubscribe`),
plus each model's current config.pbtxt as it is (the default, measured in the same sweep).

Search: the full grid when it fits the time limit, otherwise coarse-to-fine (one queue delay first,
then every delay for the best coarse setting). The winner (most images/s with p99 within the budget,
or the lowest p99 with `objective="latency"`) is written as its model's config.pbtxt, the previous one
kept beside it as config.pbtxt.prev (`undo` restores it); when its gain over the default is within the
measured noise, the default is kept and the result says so.

Beside it: `tune_grid` (the options and the configurations they span), `tune_handover` (the winner's config.pbtxt
written, `--undo`), `tune_outputs` (the Pareto front, tune.png, the winner's one-line description).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np

from cnnpack import tune_grid
from cnnpack.atomic import atomic_write_bytes, atomic_write_json
from cnnpack.errors import CnnpackError, ParityError, StageFailed, UserInputError, shell
from cnnpack.peak import usable_cores
from cnnpack.rundir import Run, sha256
from cnnpack.servable import not_laid_out, servable
from cnnpack.triton_config import served_budget, served_winner, tuned_in_place
from cnnpack.triton_publish import PREVIOUS
from cnnpack.tune_grid import Setting, TuneConfig, estimate_s, grid, model_config_json, native_bf16, past_the_cores
from cnnpack.tune_handover import config_of, undoable, write_winner
from cnnpack.tune_outputs import adopted, pareto, plot, within_budget

OUTPUT, PLOT = "tune.json", "tune.png"
log = logging.getLogger("cnnpack")
# -- measuring one point ----------------------------------------------------------------------------------
def measure_point(run: Run, server, s: Setting, concurrency: int, cfg: TuneConfig, repository: str, *,
                  deadline: float | None = None) -> dict:
    """Loads the model with the setting's config (no restart), puts it under load, returns the point; one that
    perf_analyzer could not measure in its windows is measured again only where that ends by `deadline`
    (time.monotonic(): the end of --time-limit)."""
    from cnnpack.client import Client, server_side
    from cnnpack.loadgen import load, resolve
    from cnnpack.measure import WindowPolicy

    url = server.grpc_address if cfg.protocol == "grpc" else server.http_address
    with Client(url, cfg.protocol, timeout_s=cfg.timeout_s) as client:
        config = (tune_grid.own_config_json(repository, s.model) if s.default
                  else model_config_json(run, s, repository, local=True))
        own = Path(repository, s.model, "config.pbtxt")
        digest = sha256(own) if s.default and own.is_file() else None  # which config.pbtxt "as laid out" was
        try:
            client._client.load_model(s.model, **({"config": config} if config else {}))
        except client.errors as e:
            raise client.failure(f"loading {s.label}", e) from None
        model = client.model(s.model)
        spec = run.model_spec
        x = np.random.default_rng(0).integers(0, 256, (1, spec["channels"], spec["image_size"],
                                                       spec["image_size"])).astype(np.float32)
        if s.bf16:  # a bf16 config is served only after it holds the bf16 contract, like any served model
            check_served(run, url, s, cfg)
        before = client.statistics(s.model)
        policy = WindowPolicy(window_s=max(0.2, cfg.max_seconds / 4), max_s=cfg.max_seconds, warmup_s=0.3,
                              deadline=deadline)
        generator = resolve(cfg.load_generator)
        figures = load(generator, client, model, x, concurrency, policy)
        after = client.settled_statistics(s.model)
    row = {**asdict(s), "label": s.label, "precision": s.precision, "concurrency": concurrency, **figures,
           **server_side(before, after)}
    if s.default:  # its config.pbtxt's own settings, as the server loaded them, and its digest: the report compares
        # this figure with the served stage's only where both measured one config.pbtxt (a 20 ms queue delay laid out
        # between them read as "one config measured at two times", 18x apart)
        row.update(instances=model.instances, threads=_threads_of(model, s.format),
                   dynamic_batching=model.dynamic_batching, queue_delay_us=model.max_queue_delay_us,
                   config_sha256=digest)
    if s.bf16 and not native_bf16():  # --bf16 yes: OpenVINO took the hint and computed f32
        row["computed"] = "fp32"
    ips = row["window_throughput_ips"]
    row["noise"] = max(ips) / min(ips) - 1 if ips and min(ips) > 0 else None
    return row


def _threads_of(model, fmt: str) -> int:
    """The CPU threads per instance a served config sets (0: the runtime's default)."""
    from cnnpack.triton_config import threads_in

    return threads_in(model.parameters, fmt)


def check_served(run: Run, url: str, s: Setting, cfg: TuneConfig) -> None:
    """Holds the served model, as loaded now, to the contract of its precision against eager (ParityError if not),
    with the tolerances and agreement the run's verify stage held its artifacts to (a run verified with a lower
    --min-agreement had every bf16 point refused here at the default)."""
    from cnnpack.verify import check, served_target

    target = served_target(run.path, url, s.model, cfg.protocol, cfg.timeout_s)
    results = check(run, verify_config(run), (target,))
    failures = [f for r in results for f in r["failures"]]
    if failures:
        raise ParityError(f"{s.label} fails the {s.precision} contract: {'; '.join(failures)}")


def verify_config(run: Run):
    """The run's recorded verify contract (its defaults where it recorded none) at batch sizes 1 and 8, on the run's
    own validation split (a --data verify was given may be a path relative to another folder)."""
    from cnnpack.verify import VerifyConfig

    recorded = run.read().get("stages", {}).get("verify", {}).get("config") or {}
    keep = ("atol", "rtol", "min_agreement", "int8_min_agreement")
    return VerifyConfig(batch_sizes=(1, 8), **{k: recorded[k] for k in keep if recorded.get(k) is not None})


# -- the choice ---------------------------------------------------------------------------------------------
def choose(points: list[dict], cfg: TuneConfig) -> dict | None:
    """The best point within the budget; never a bf16 config this CPU computed in f32 (its bf16 was not measured)."""
    ok = [p for p in points if within_budget(p, cfg.latency_budget_ms)]
    if not ok:
        return None
    if cfg.objective == "latency":
        return min(ok, key=lambda p: (p["latency_ms_p99"], -p["throughput_ips"]))
    return max(ok, key=lambda p: (p["throughput_ips"], -p["latency_ms_p99"]))


def verdict(winner: dict, points: list[dict], served: str | None, cfg: TuneConfig) -> dict:
    """The winner against the default config of its model (same concurrency), with the measured noise, and
    against the default of the model the run serves today (`served`, the triton stage's model).

    `as_good` (the default is kept, nothing written) only where the default itself could have won (within the
    budget) and the winner beats it by no more than the noise on the objective: images/s, or p99 for latency."""
    def default_of(model):
        return next((p for p in points if p["default"] and p["model"] == model
                     and p["concurrency"] == winner["concurrency"]), None)

    default, today = default_of(winner["model"]), default_of(served)
    out = {"vs_served_default": today and {"model": served, "throughput_ips": today["throughput_ips"],
                                           "gain": winner["throughput_ips"] / today["throughput_ips"],
                                           "noise": today.get("noise")}}  # (the served default's own)
    if default is None:
        return {**out, "default": None, "gain": None, "noise": None, "as_good": False}
    gain = winner["throughput_ips"] / default["throughput_ips"]
    p99_gain = default["latency_ms_p99"] / winner["latency_ms_p99"]  # how much lower the winner's p99 is
    noise = max(winner.get("noise") or 0.0, default.get("noise") or 0.0, 0.05)
    better = (p99_gain if cfg.objective == "latency" else gain) - 1
    # its windows did not agree (a busy machine), measured again by `_settle` where there was time: the noise is then
    # the machine's, and the verdict says so rather than that the default is as good
    unsteady = list(dict.fromkeys(p["label"] for p in (default, winner) if not p.get("stable", True)))
    return {**out, "default": default["label"], "default_throughput_ips": default["throughput_ips"], "gain": gain,
            "p99_gain": p99_gain, "objective": cfg.objective, "noise": noise, "unsteady": unsteady,
            "as_good": not winner["default"] and within_budget(default, cfg.latency_budget_ms) and better <= noise}


# -- the stage ----------------------------------------------------------------------------------------------
MIN_MEASURE_S = 0.5  # the shortest measurement of a point: what a point started near the limit gets


def measure_s(cfg: TuneConfig, s: Setting, left_s: float) -> float | None:
    """Seconds of measurement for a point of `s` that ends by the limit, `left_s` away (--max-seconds at most); None
    where less than `MIN_MEASURE_S` fits beside its reload, warm-up and statistics (`POINT_OVERHEAD_S`, and a bf16
    setting's contract check): a point started then ended past the limit (the cnn's default sweep: 303.5 s of 300)."""
    fits = left_s - tune_grid.POINT_OVERHEAD_S - (tune_grid.BF16_CHECK_S if s.bf16 else 0.0)
    return max(MIN_MEASURE_S, min(cfg.max_seconds, fits)) if fits >= MIN_MEASURE_S else None


def sweep(run: Run, cfg: TuneConfig, settings: list[Setting], repository: str, say: Callable[[str], None],
          server, first_anyway: bool = True) -> tuple[list[dict], dict]:
    """Measures every setting at every concurrency on `server` (explicit model control) within the time limit, each
    point ending by it; (points, how the sweep went). With `first_anyway`, the first point is measured (for
    `MIN_MEASURE_S`) whatever the limit."""
    points: list[dict] = []
    t0 = time.monotonic()
    info: dict = {"search": "grid", "truncated": False, "error": None, "errors": [], "server_pid": server.pid}
    plan = [(s, c) for s in settings for c in cfg.concurrency]
    info["planned"] = len(plan)
    for i, (s, c) in enumerate(plan):
        seconds = measure_s(cfg, s, cfg.time_limit_s - (time.monotonic() - t0))
        if seconds is None and (i or not first_anyway):
            info["truncated"] = True
            say(f"time limit {cfg.time_limit_s:g} s reached after {len(points)} points")
            break
        say(f"point {i + 1}/{len(plan)}: {s.label} at concurrency {c}")
        try:
            within = replace(cfg, max_seconds=seconds or MIN_MEASURE_S)
            points.append(measure_point(run, server, s, c, within, repository,
                                        deadline=t0 + cfg.time_limit_s if seconds else None))
            p = points[-1]
            say(f"measured {s.label} at concurrency {c}: {p['throughput_ips']:,.0f} images/s, p99 "
                f"{p['latency_ms_p99']:.2f} ms ({p['load_generator']})")
        except CnnpackError as e:  # a server that died or a config it refused: keep what was measured
            info["error"] = f"{s.label} at concurrency {c}: {e}"
            info["errors"].append(info["error"])
            say(f"not measured: {info['error']}")
            if not server.alive():
                break
    info["server_alive"] = server.alive()
    info["wall_s"] = round(time.monotonic() - t0, 1)
    return points, info


def tune(run_dir: str | Path, cfg: TuneConfig, *, progress: Callable[[str], None] = lambda _: None) -> dict:
    """Sweeps the run's served models on a local Triton; writes tune.json, tune.png, the winner's config.pbtxt.

    Raises:
        UserInputError (exit 2): bad options, no repository, no verified servable model.
        ParityError (exit 1): no point met the budget (the points are kept; no config is changed).
        StageFailed (exit 1): the server died mid-sweep (the points so far are kept; no config is changed).
    """
    cfg.validate()
    run = Run.open(run_dir)
    with run.only_one("tune"):
        return _tune(run, cfg, progress)


def _tune(run: Run, cfg: TuneConfig, progress: Callable[[str], None]) -> dict:
    repository = run.stage("triton", required_by="tune", hint=f"`cnnpack triton --run {shell(run.path)}`")["repository"]
    models = servable(run, cfg.models)
    _check_current(run, models)
    _say_not_laid_out(run, cfg, models)
    run.check_writable(*(Path(repository) / m for m, _ in models))  # where a winner is written: now, not after the sweep
    full = grid(models, cfg, cfg.queue_delays_us)
    # said as warnings, which stay on a terminal (a progress line is overwritten by the next)
    if left_out := past_the_cores(cfg):  # the grid leaves them out: said, not dropped unsaid
        log.warning(f"warning: tune: {left_out} left out: with any value of the other option it needs more than the "
                    f"{usable_cores()} cores here (--oversubscribe measures it)")
    if any(s.bf16 for s in full) and not native_bf16():
        log.warning("warning: tune: this CPU has no native bf16 (AVX-512 BF16 or AMX): OpenVINO computes the bf16-hint "
                    "configs in f32 here, so they are measured and shown but none can be the winner")
    coarse = estimate_s(full, cfg) > cfg.time_limit_s and len(cfg.queue_delays_us) > 1
    settings = grid(models, cfg, cfg.queue_delays_us[len(cfg.queue_delays_us) // 2:][:1]) if coarse else full
    from cnnpack.serve import ServeConfig, TritonServer

    server_log = run.file("tune/server.log")
    with TritonServer(ServeConfig(repository=repository, explicit=True, log_file=str(server_log))) as server:
        points, info = _sweeps(run, cfg, settings, coarse, repository, progress, server)
        _settle(run, cfg, points, info, repository, progress, server)
    info["server_starts"] = (server_log.read_text(errors="replace").count("Started GRPCInferenceService")
                             if server_log.is_file() else None)
    return finish(run, cfg, points, info)


def _say_not_laid_out(run: Run, cfg: TuneConfig, models: list[tuple[str, str]]) -> None:
    """A verified model whose folder is gone from the repository is left out of a default sweep: said, as a warning
    (a progress line is overwritten by the next); named in --models, `servable` refuses it."""
    if not cfg.models and (gone := not_laid_out(run, models)):
        log.warning(f"warning: tune: not swept, verified but not in the repository: {'; '.join(gone)}")


def _check_current(run: Run, models: list[tuple[str, str]]) -> None:
    """The configs tune loads are built from the run's artifact records (its max batch, its I/O): the served file
    must be the one exported now. After an export since `cnnpack verify`, the repository still serves the file verify
    checked, and every config built from the new record (another --max-batch-size) failed to load, unsaid."""
    stages = run.read()["stages"]
    arts, checked = stages["export"].get("artifacts", {}), stages.get("verify", {}).get("artifacts", {})
    for name, fmt in models:
        if fmt in arts and fmt in checked and arts[fmt].get("sha256") != checked[fmt].get("sha256"):
            raise UserInputError(f"{name} serves the {fmt} artifact `cnnpack verify` checked, and the run's {fmt} "
                                 f"artifact was exported again since: run `cnnpack verify --run {shell(run.path)}`, "
                                 f"then `cnnpack triton --run {shell(run.path)} --repository "
                                 f"{shell(stages['triton']['repository'])} --format {fmt}`, to tune the new one")


def _settle(run: Run, cfg: TuneConfig, points: list[dict], info: dict, repository: str,
            say: Callable[[str], None], server) -> None:
    """Where the winner or its model's default was unsteady (its windows did not agree within --max-seconds: a busy
    machine), that point is measured once more, and the steadier of its two measurements stands: the verdict rested
    on one stalled window (windows of 4,693, 888 and 46 images/s made the default's "noise" 10,000 %, and a winner
    with a tenth of its p99 was "within the noise"). A winner that changes with the new figures is judged again (each
    point measured again once at most). Still unsteady, the verdict says so (`verdict`)."""
    t0, names, again_done = time.monotonic(), {f.name for f in fields(Setting)}, set()
    key = lambda p: (p["label"], p["concurrency"])  # noqa: E731
    left = lambda: cfg.time_limit_s - (info["wall_s"] + time.monotonic() - t0)  # noqa: E731 - of --time-limit
    while True:
        winner = choose(points, cfg)
        default = winner and next((p for p in points if p["default"] and p["model"] == winner["model"]
                                   and p["concurrency"] == winner["concurrency"]), None)
        shaky = [p for p in (default, winner) if default and not winner["default"] and not p.get("stable", True)
                 and key(p) not in again_done]
        if not shaky:
            break
        if not server.alive() or any(measure_s(cfg, Setting(**{k: v for k, v in p.items() if k in names}), left())
                                     is None for p in shaky):
            info.setdefault("settle", {})["skipped"] = ("the time limit was reached" if server.alive()
                                                        else "the server is gone")
            break
        settle = info.setdefault("settle", {"points": []})
        for p in shaky:
            again_done.add(key(p))
            say(f"measuring {p['label']} at concurrency {p['concurrency']} again: {unsteady_why(p)}")
            s = Setting(**{k: v for k, v in p.items() if k in names})  # a default: its config.pbtxt, whatever it holds
            if (seconds := measure_s(cfg, s, left())) is None:  # the one before took what was left
                settle["skipped"] = "the time limit was reached"
                break
            try:  # within what is left of --time-limit, as a sweep's point is
                again = measure_point(run, server, s, p["concurrency"], replace(cfg, max_seconds=seconds), repository,
                                      deadline=time.monotonic() + left())
            except CnnpackError as e:  # the first figures stand
                settle["error"] = f"{p['label']}: {e}"
                break
            settle["points"].append(f"{p['label']} c{p['concurrency']}")
            first = {k: p.get(k) for k in ("throughput_ips", "latency_ms_p99", "window_throughput_ips", "noise",
                                           "stable")}
            steadier = again.get("stable") or (again.get("noise") or float("inf")) < (p.get("noise") or float("inf"))
            points[points.index(p)] = ({**again, "first_measure": first} if steadier else
                                       {**p, "second_measure": {k: again.get(k) for k in first}})
        if "error" in settle or "skipped" in settle:
            break
    info["wall_s"] = round(info["wall_s"] + time.monotonic() - t0, 1)


def unsteady_why(p: dict) -> str:
    """Which figure of an unsteady point's windows broke the stability rule (images/s and latency must each agree
    within its tolerance, as `measure.agree` and perf_analyzer judge), with those windows: "its windows did not agree
    (1,164, 1,244, 1,199 images/s)" listed rates within 7 % of each other, the latency having varied."""
    j = p.get("judged_windows")
    if not j:  # recorded before the judged windows were: their images/s, as they were said
        windows = ", ".join(f"{w:,.0f}" for w in p.get("window_throughput_ips") or [])
        return "its windows did not agree" + (f" ({windows} images/s)" if windows else "")
    tol, said, shown = j["tolerance"], [], []
    for key, name, fmt, unit in (("throughput_ips", "images/s", "{:,.0f}", ""), ("latency_ms", "latency", "{:.2f}",
                                                                                  " ms")):
        v = [x for x in j.get(key) or [] if x is not None]  # (a failed window has no latency; its rate is 0)
        shown.append(f"{name} ({', '.join(fmt.format(x) for x in v)}{unit})")
        if v and (min(v) <= 0 or max(v) > (1 + tol) * min(v)):
            said.append(shown[-1])
    if said:
        return f"its windows' {' and '.join(said)} did not agree within {100 * tol:g} %"
    if (n := len(j.get("throughput_ips") or [])) < 3:  # both generators judge the last 3 windows
        return f"only {n} of its windows fit in --max-seconds, and 3 in a row must agree within {100 * tol:g} %"
    return f"its windows did not agree within {100 * tol:g} % on images/s or latency ({' and '.join(shown)})"


def _sweeps(run: Run, cfg: TuneConfig, settings: list[Setting], coarse: bool, repository: str,
            progress: Callable[[str], None], server) -> tuple[list[dict], dict]:
    """The sweep of `settings`, then, when it was the coarse one, every delay for its best setting on the same
    server, within what is left of --time-limit."""
    points, info = sweep(run, cfg, settings, repository, progress, server)
    if not coarse:
        return points, info
    info["search"] = "coarse-to-fine"
    left = cfg.time_limit_s - info["wall_s"]  # the refine gets what the coarse sweep left of --time-limit
    if info["truncated"] or left <= 0:
        info["refine"] = {"skipped": "the time limit was reached in the coarse sweep"}
    elif info.get("server_alive") and points:  # refine: every delay for the best coarse setting
        tried = [p for p in points if not p["default"]]  # a default is its config.pbtxt: no delay of ours to vary
        best = tried and (choose(tried, cfg) or max(tried, key=lambda p: p["throughput_ips"]))
        refine = [replace(s, queue_delay_us=d) for s in settings if best and s.label == best["label"]
                  and s.dynamic_batching for d in cfg.queue_delays_us if d != s.queue_delay_us]
        if refine:
            more, info2 = sweep(run, replace(cfg, time_limit_s=left), refine, repository, progress, server,
                                first_anyway=False)
            points += more
            info["refine"] = info2
            info["server_alive"] = info2["server_alive"]
            info["errors"] += info2["errors"]
            info["planned"] = info.get("planned", 0) + info2.get("planned", 0)  # "N of planned could not be measured" counts the refine's too
            info["error"] = info2["error"] or info["error"]
            info["wall_s"] = round(info["wall_s"] + info2["wall_s"], 1)
    return points, info


def _as_they_are(config: Path) -> Callable[[], None]:
    """What puts `config` and its config.pbtxt.prev back as they are now (the .prev removed if there is none now)."""
    prev = config.with_name(PREVIOUS)
    files = {p: p.read_bytes() if p.is_file() else None for p in (config, prev)}

    def back() -> None:
        for p, data in files.items():
            if data is None:
                p.unlink(missing_ok=True)
            else:
                atomic_write_bytes(p, data)
    return back


def finish(run: Run, cfg: TuneConfig, points: list[dict], info: dict) -> dict:
    died = bool(info["error"]) and not info.get("server_alive", True)
    winner = None if died else choose(points, cfg)  # a config the server refused is a lost point, not a lost sweep
    with run.committing():  # the config written, tune.json and their record as one step, after any other command's
        stages = run.read()["stages"]
        tuned = undoable(stages)  # configs earlier tunes wrote, still served: their undo must survive
        earlier = served_winner(stages)  # still served where this tune writes nothing: deploy and the report size by it
        kept = {"winner": earlier, "written": tuned_in_place(stages),
                "latency_budget_ms": served_budget(stages)} if earlier else None
        result = {"config": asdict(cfg), "points": points,
                  "pareto": [p["label"] + f" c{p['concurrency']}" for p in pareto(points)], "sweep": info, "winner": winner, "written": None,
                  "verdict": verdict(winner, points, run.stage("triton")["name"], cfg) if winner else None}
        # tune.json and tune.png staged, put in place with their record (a failure after the plot left a new
        # tune.png beside the old tune.json and record: the report's plot contradicted its table)
        taken_back = None
        try:
            with run.staged_outputs(OUTPUT, PLOT) as staged:
                plot(points, winner, cfg.latency_budget_ms, staged[PLOT], is_adopted=adopted(winner, result["verdict"]))
                if winner and not result["verdict"]["as_good"] and not winner["default"]:
                    taken_back = _as_they_are(Path(config_of(run, winner["model"])))
                    w = result["written"] = write_winner(run, winner["model"], winner_config(run, winner),
                                                         keep_previous=config_of(run, winner["model"]) in tuned)
                    tuned[w["config"]] = {"previous": w["previous"], "sha256": w["sha256"]}
                status = "ok" if winner else "failed"
                # a config written but not recorded is one `tune --undo` cannot find: it goes back if the record fails
                atomic_write_json(staged[OUTPUT], result)
                run.commit_stage("tune", {
                    "status": status, "config": asdict(cfg), "points": points, "winner": winner,
                    "verdict": result["verdict"], "written": result["written"], "tuned": tuned, "sweep": info,
                    **({"kept": kept} if kept and not result["written"] else {})}, staged)
        except BaseException:
            if taken_back:
                taken_back()
            raise
    if died:
        raise StageFailed(f"the Triton server died during the sweep ({info['error']}); the {len(points)} points "
                          f"measured are in {run.file(OUTPUT)}, no config was changed")
    if winner is None and not points and info["errors"]:  # nothing measured: the budget is not the reason
        raise StageFailed(f"no point could be measured: {len(info['errors'])} failed, the last: {info['errors'][-1]} "
                          f"(all in {run.file(OUTPUT)}); no config was changed")
    if winner is None:
        fastest = min(points, key=lambda p: p["latency_ms_p99"], default=None)
        seen = f"; the lowest p99 seen was {fastest['latency_ms_p99']:.2f} ms ({fastest['label']}, concurrency " \
               f"{fastest['concurrency']})" if fastest else ""
        raise ParityError(f"no served config meets p99 <= {cfg.latency_budget_ms:g} ms{seen}; raise "
                          f"--latency-budget-ms or lower --concurrency (points: {run.file(OUTPUT)})")
    return run.read()["stages"]["tune"]


def winner_config(run: Run, winner: dict) -> str:
    """The winner's config.pbtxt, rendered as `cnnpack triton` renders its own."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2 as pb

    from cnnpack.triton_repo import render

    s = Setting(**{k: winner[k] for k in Setting.__dataclass_fields__})
    return render(json_format.Parse(model_config_json(run, s, run.stage("triton")["repository"]), pb.ModelConfig()))
