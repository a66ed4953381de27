"""The report's sections past the bench: the Triton repository and how to serve it, what the served stage measured,
the tuned config and the Kubernetes deployment (report.py assembles them with the sections before)."""

from __future__ import annotations

from pathlib import Path

from cnnpack.client import PROTOCOL_NAMES
from cnnpack.errors import ratio, shell
from cnnpack.report_render import Block, Literal, num, pct
from cnnpack.rundir import Run
from cnnpack.triton_config import ENSEMBLE, PREPROCESS
from cnnpack.triton_dist import docker_line


def _tree(root: Path, named: str = "", limit: int = 60) -> str:
    """The repository's files, the model the report names (with its ensemble's folders) first, cut at `limit` lines
    with a line that says how many more: a repository of 7 formats with their ensembles (105 entries) showed 60, cut
    without a word before the model named above it."""
    def key(p: Path) -> tuple:
        top = p.relative_to(root).parts[0]
        return (top not in {named, named + ENSEMBLE, named + PREPROCESS}, p.relative_to(root).parts)

    lines = [f"{root}/"]
    paths = sorted((p for p in root.rglob("*") if not any(part.startswith(".") or part == "__pycache__"
                                                          for part in p.relative_to(root).parts)), key=key)
    for path in paths[:limit]:
        depth = len(path.relative_to(root).parts)
        lines.append("  " * depth + path.name + ("/" if path.is_dir() else ""))
    if len(paths) > limit:
        lines.append(f"  … {len(paths) - limit} more (`find {shell(str(root))}` lists them)")
    return "\n".join(lines)


def triton_section(m: dict, run: Run) -> list[Block]:
    t = m.get("stages", {}).get("triton")
    if not t or t.get("status") != "ok":  # a failed layout records only its error (the pipeline's summary says it)
        return []
    repo = Path(t["repository"])
    repo = repo if repo.is_absolute() else Path.cwd() / repo
    serve = f"cnnpack serve --repository {shell(t['repository'])}"
    docker = docker_line(repo.resolve())
    out = [Block("h2", "Triton model repository"),
           Block("p", f"Model `{t['name']}` version {t['version']} ({t['format']}) in `{t['repository']}`:"),
           Block("code", _tree(repo, t["name"]) if repo.is_dir() else str(repo)),
           Block("p", "Serve it locally (real Triton server from the nvidia-pytriton wheel):"), Block("code", serve),
           Block("p", f"or with the NGC container ({_release_note(repo)}):"), Block("code", docker)]
    return out


def _release_note(repo: Path) -> str:
    """Which NGC release the docker line names, and why."""
    from cnnpack.triton_release import read_configs, release_for

    release, why = release_for(repo)
    note = (f"release {release}, which serves every model here" if not why else
            f"release {release} or newer: " + "; ".join(f"`{m}`: {w}" for m, w in why.items()))
    python = sorted(name for name, mc in read_configs(repo).items() if mc.backend == "python")
    if python:  # the image ensemble's preprocessing decodes with Pillow, which the NGC image's Python lacks
        note += (f"; {', '.join(f'`{m}`' for m in python)} runs in its Python backend and imports Pillow, which the "
                 f"stock image lacks: build `FROM nvcr.io/nvidia/tritonserver:{release}-py3` with `RUN pip install "
                 "pillow` (`cnnpack deploy` writes that Dockerfile)")
    return note


def latest_on_disk(repository: str | None, model: str) -> str | None:
    """The highest version folder of `model` in the repository now (what Triton serves by default); None if none."""
    from cnnpack.triton_publish import versions

    held = versions(Path(repository, model)) if repository else []
    return str(held[-1]) if held else None


def row_version(row: dict, served: dict) -> str | None:
    """The version of its model a served row measured: the one the server answered with (recorded since), else the
    pipeline's served stage's record of it."""
    versions = (row.get("info") or {}).get("versions")
    if versions:
        return str(versions[-1])
    v = (served.get("versions") or {}).get(row.get("format", "").removeprefix("triton:"))
    return None if v is None else str(v)


def _what_was_served(served: dict, triton: dict) -> str:
    """The repository and versions the served stage measured, said apart from one `cnnpack triton` laid out since."""
    repo, versions = served.get("repository"), served.get("versions") or {}
    if not repo:  # recorded before the served stage named its repository
        return "The repository the pipeline laid out"
    shown = ", ".join(f"`{n}` v{v}" for n, v in sorted(versions.items()))
    what = f"`{repo}` ({shown})" if shown else f"`{repo}`"
    same = repo == triton.get("repository") and str(versions.get(triton.get("name"), triton.get("version"))) == str(triton.get("version"))
    newer = {n: latest for n, v in versions.items()
             if (latest := latest_on_disk(repo, n)) and str(v).isdigit() and int(v) < int(latest)}
    if same and newer:  # another model of the repository got a new version since (a new int8 model)
        return (f"The repository above, {what}; laid out again since: "
                f"{', '.join(f'`{n}` is at version {v} now' for n, v in sorted(newer.items()))}")
    if same:
        return f"The repository above, {what}"
    return (f"**Not the repository above**: `cnnpack triton` laid out `{triton.get('name')}` version "
            f"{triton.get('version')} in `{triton.get('repository')}` since; these figures are of {what}")


def served_section(m: dict) -> list[Block]:
    recorded = m.get("stages", {}).get("served") or {}
    served = recorded if recorded.get("status") == "ok" else {}  # a failed serve records only its error
    repo = (m.get("stages", {}).get("triton") or {}).get("repository")
    # every served row bench recorded: the pipeline's load and any `cnnpack bench --triton-url` since
    benched = [r for r in m.get("stages", {}).get("bench", {}).get("results", []) if r.get("runtime") == "triton"]
    load = benched or served.get("load", [])
    if not served and not load:
        return []
    out = [Block("h2", "Served by Triton")]
    if served:
        out.append(Block("p", f"{_what_was_served(served, m['stages'].get('triton', {}))}, served by a real Triton "
                              f"server {served.get('server_version', '')} on loopback during the pipeline: "
                              f"{served.get('summary', '')}."))
    preds = served.get("predictions", [])
    if preds:
        ens = any("ensemble_label" in p for p in preds)
        rows = [["image", "true class", "prediction (classification extension)", "logit"]
                + (["image ensemble (the file's bytes)"] if ens else [])]
        rows += [[Literal(p["image"]), Literal(p["true"]), Literal(p["label"]), f"{p['score']:.2f}"]
                 + ([Literal(p.get("ensemble_label", "–"))] if ens else [])
                 for p in preds]
        out.append(Block("table", rows=rows))
    parity = served.get("parity", {})
    if parity:
        rows = [["served model", "max abs err vs eager", "top-1 agreement", "verdict"]]
        rows += [[f, num(p.get("max_abs_err"), "{:.2e}"), pct(p.get("top1_agreement")),
                  "pass" if p.get("passed") else "FAIL"] for f, p in parity.items()]
        out.append(Block("table", rows=rows))
    if load:
        rows = [["model", "protocol", "images per request", "requests in flight", "p50 ms", "p99 ms", "images/s",
                 "mean batch run by Triton", "queue ms", "compute ms", "errors", "stable", "measured by"]]
        older = {}  # rows of a version the run's repository has since replaced: row index -> (model, measured, now)
        for i, r in enumerate(load):
            name, v = r.get("format", "").removeprefix("triton:"), row_version(r, recorded)
            if v and v.isdigit() and (now := latest_on_disk(repo, name)) and int(v) < int(now):
                older[i] = (name, v, now)
        rows += [[r.get("format", "").removeprefix("triton:") + (f" v{older[i][1]} (older)" if i in older else ""),
                  PROTOCOL_NAMES.get(r.get("protocol"), "HTTP"), str(r.get("batch_size", 1)),
                  str(r["concurrency"]), num(r["latency_ms_p50"], "{:.2f}"), num(r["latency_ms_p99"], "{:.2f}"),
                  num(r["throughput_ips"], "{:,.0f}"), num(r.get("server_batch_mean"), "{:.2f}"),
                  num(r.get("server_queue_ms_mean"), "{:.2f}"), num(r.get("server_compute_ms_mean"), "{:.2f}"),
                  str(r.get("errors", 0)), "yes" if r.get("stable", True) else "**no**",
                  r.get("load_generator") or "cnnpack asyncio client"] for i, r in enumerate(load)]
        wire = " and ".join(sorted({PROTOCOL_NAMES.get(r.get("protocol"), "HTTP") for r in load}))
        urls = sorted({r.get("info", {}).get("url") for r in load} - {None})
        at = f" at {', '.join(f'`{u}`' for u in urls)}" if urls else ""
        sizes = sorted({int(r.get("batch_size", 1)) for r in load})
        per = ("Batch-1 requests" if sizes == [1] else
               f"Requests of {', '.join(map(str, sizes))} images (the images-per-request column)")
        out += [Block("p", f"{per} over {wire}{at}, every served row `cnnpack bench` recorded, from a load "
                           "generator on this machine (closed loop: "
                           "each client sends its next request when the previous one answers): Triton's perf_analyzer "
                           "where it is on PATH, else cnnpack's own client; dynamic batching "
                           "merges concurrent requests into larger batches."), Block("table", rows=rows)]
        if older:
            out.append(Block("p", "**Of an older version**: " + "; ".join(
                f"`{n}` was measured at version {v}, and `{repo}` holds version {now} of it now" for n, v, now
                in sorted(set(older.values()))) + ": those rows are not of the model served from it today (serve it "
                "and measure again: `cnnpack bench --triton-url`, or the pipeline with `--serve yes`)."))
        shaky = [f"{r.get('format', '').removeprefix('triton:')} at {r['concurrency']}"
                 + (f" x {r['batch_size']} images" if r.get("batch_size", 1) != 1 else "") for r in load
                 if not r.get("stable", True)]
        if shaky:
            out.append(Block("p", f"**Unstable**: the measurement windows of {', '.join(shaky)} did not agree "
                                  "before the time limit: quote them with care (other load on this machine, or too "
                                  "short a --max-seconds)."))
    return out


def tune_section(m: dict, run: Run) -> list[Block]:
    """Recommended serving config: the tune stage's winner, its plot and the commands that serve it."""
    t = m.get("stages", {}).get("tune")
    if not t or not t.get("config"):
        return []
    if not t.get("winner"):
        return _none_chosen(m, run)
    from cnnpack.tune_outputs import describe

    w, repo = t["winner"], (m["stages"].get("triton") or {}).get("repository")  # none after a failed layout
    return [Block("h2", "Recommended serving config"),
            Block("p", f"{len(t['points'])} configurations measured on one local Triton (no restart), p99 budget "
                       f"{t['config']['latency_budget_ms']:g} ms. {describe(t)}.{_measured_apart(m['stages'], t)}"),
            *_points_table(t), Block("img", text="images/s against p99 per served config", path="tune.png"),
            *([Block("code", text=f"cnnpack serve --repository {shell(repo)}\n{docker_line(repo)}")] if repo else []),
            Block("p", _tuned_state(m["stages"], w, run))]


def _measured_apart(stages: dict, t: dict) -> str:
    """Where the sweep's own measurement of the served model as laid out, at the winner's concurrency, and the served
    stage's differ by more than the noise: said, with when each was taken. A reader saw cnn_onnx at 2,410 images/s
    under "Served by Triton" and the winner as "1.02x cnn_onnx as served today" at 3,866, the sweep having measured
    the same config at 3,774 three minutes later. Only the one config.pbtxt measured twice is put down to the host:
    a sweep of another one (a 20 ms queue delay laid out between the two, the layout put back since) is said as such."""
    from cnnpack.served import LOAD_PROTOCOL, layout_changed

    served, model, w = stages.get("served") or {}, (stages.get("triton") or {}).get("name"), t["winner"]
    if served.get("status") != "ok" or layout_changed(stages) or t["config"].get("protocol") != LOAD_PROTOCOL:
        return ""  # another layout, or another protocol: not the same measurement
    row = next((r for r in served.get("load") or [] if r.get("format") == f"triton:{model}"
                and r.get("concurrency") == w["concurrency"]), None)
    own = next((p for p in t["points"] if p["default"] and p["model"] == model
                and p["concurrency"] == w["concurrency"]), None)
    laid = (served.get("triton_files") or {}).get("config.pbtxt")
    if not row or not own or not row.get("throughput_ips") or not own.get("throughput_ips"):
        return ""
    if not own.get("config_sha256") or not laid:
        return ""  # recorded before tune kept which config.pbtxt it measured: not known to be one config
    a, b = own["throughput_ips"], row["throughput_ips"]
    if max(a, b) / min(a, b) - 1 <= max(0.1, own.get("noise") or 0):
        return ""
    if own["config_sha256"] != laid:
        return (f" `{model}` ran {a:,.0f} images/s at concurrency {w['concurrency']} in this sweep and {b:,.0f} in the "
                f"served stage above, as two configs: the sweep measured the config.pbtxt it held then"
                f"{_settings(own)}, not the one the served stage measured (laid out again or tuned in between); the "
                "gains here compare points of this sweep only.")
    when = lambda section: str(section.get("updated", ""))[11:16] or "?"  # noqa: E731 - HH:MM (UTC)
    by = ("" if own.get("load_generator") == row.get("load_generator") else
          f", measured by {own.get('load_generator')} and by {row.get('load_generator')}")
    return (f" `{model}` as laid out ran {a:,.0f} images/s at concurrency {w['concurrency']} in this sweep "
            f"(ended {when(t)} UTC) and {b:,.0f} in the served stage above ({when(served)} UTC), "
            f"{ratio(max(a, b) / min(a, b))} apart{by}: one config measured at two times on a host whose speed varies; "
            "the gains here compare points of this sweep only.")


def _settings(point: dict) -> str:
    """A default point's settings as the server loaded them (" (x1 1t batching 20000 us)"); "" where not recorded."""
    if "instances" not in point:
        return ""
    batching = f"batching {point['queue_delay_us']} us" if point.get("dynamic_batching") else "no batching"
    return f" (x{point['instances']} {point['threads']}t {batching})"


def _points_table(t: dict) -> list[Block]:
    """The ten fastest points, and the winner and the defaults it was compared with wherever they rank: ★ marks the
    winner (where the default was kept, the best point is "not adopted" and the default "kept"); a point past the
    budget, or not steady, says so (the table read as ten candidates alike); one measured twice gives both figures."""
    budget, w = t["config"]["latency_budget_ms"], t.get("winner") or {}
    key = lambda p: (p.get("label"), p.get("concurrency"))  # noqa: E731
    compared = {key(p) for p in t["points"] if w and (key(p) == key(w) or (p["default"] and p["concurrency"] ==
                                                                              w["concurrency"]))}
    ranked = sorted(t["points"], key=lambda p: -p["throughput_ips"])
    shown = [p for i, p in enumerate(ranked) if i < 10 or key(p) in compared]
    rows = [["config", "precision", "concurrency", "images/s", "p50 ms", "p99 ms", "within budget", "steady",
             "mean batch"]]
    from cnnpack.tune_outputs import figure, role, within_budget

    for p in shown:
        fits = ("yes" if within_budget(p, budget) else "**no**" if p["latency_ms_p99"] > budget
                else "no (bf16 computed in f32)")
        said = role(t, p)  # a default kept as good: the faster point is not starred as the winner
        label = f"★ {p['label']}" if said == "winner" else f"{p['label']} ({said})" if said else p["label"]
        rows.append([label, p.get("precision", "fp32"),
                     str(p["concurrency"]), figure(p, "throughput_ips", "{:,.0f}"), num(p["latency_ms_p50"], "{:.2f}"),
                     figure(p, "latency_ms_p99", "{:.2f}"),
                     fits,
                     "–" if "stable" not in p else "yes" if p["stable"] else "**no**",
                     num(p.get("server_batch_mean"), "{:.2f}")])
    more = len(ranked) - len(shown)
    return [Block("table", rows=rows), *([Block("p", f"{more} more points (not shown) are in tune.json.")] if more else [])]


def _none_chosen(m: dict, run: Run) -> list[Block]:
    """The last tune chose nothing (no point within its budget, a server that died, nothing measured) and changed no
    config: said with why (the section was left out, and an earlier tune's result with it), and the config an
    earlier tune wrote where it is still served."""
    t = m["stages"]["tune"]
    points, sweep = t.get("points") or [], t.get("sweep") or {}
    if sweep.get("error") and not sweep.get("server_alive", True):
        why = f"the Triton server died during the sweep ({sweep['error']})"
    elif not points:
        why = "no point could be measured" + (f" (the last error: {sweep['errors'][-1]})" if sweep.get("errors") else "")
    else:
        low = min(points, key=lambda p: p["latency_ms_p99"])
        why = (f"no point met its p99 budget of {t['config']['latency_budget_ms']:g} ms (the lowest p99 seen was "
               f"{low['latency_ms_p99']:.2f} ms, {low['label']} at concurrency {low['concurrency']})")
    last = f"The last `cnnpack tune` ({len(points)} configurations measured) chose none: {why}; it changed no config."
    out = [Block("h2", "Recommended serving config"), Block("p", last)]
    if (t.get("kept") or {}).get("winner"):
        out += _kept_section(m, run)
    if points:
        out += [*_points_table(t), Block("img", text="images/s against p99 per served config", path="tune.png")]
    return out


def _kept_section(m: dict, run: Run) -> list[Block]:
    """Where the last tune chose nothing: the config an earlier tune wrote, while still served, is the recommended
    config (deploy sizes by it); no longer served, it is named with why."""
    from cnnpack.triton_config import served_winner
    from cnnpack.tune_outputs import undone_note

    w = served_winner(m["stages"])
    if not w and (note := undone_note(m["stages"]["tune"])):
        return [Block("p", f"{note[0].upper()}{note[1:]}.")]
    if not w:
        kept = m["stages"]["tune"]["kept"]["winner"]
        return [Block("p", f"The config an earlier tune wrote, {kept['label']} at concurrency {kept['concurrency']}, "
                           "is no longer served (laid out again by `cnnpack triton`, or edited).")]
    return [Block("p", f"The config an earlier tune wrote is still served: {w['label']} at concurrency "
                       f"{w['concurrency']}, {w['throughput_ips']:,.0f} images/s, p99 {w['latency_ms_p99']:.2f} ms "
                       f"(`cnnpack tune --run {shell(run.path)} --undo` restores the one before it).")]


def deploy_section(m: dict, run: Run) -> list[Block]:
    """Where `cnnpack deploy` wrote the cluster's files, what the pods are sized to, and whether it is stale."""
    d = m.get("stages", {}).get("deploy")
    if not d or d.get("status") != "ok":
        return []
    from cnnpack.deploy import command
    from cnnpack.deploy.plan import content_tag

    f = {k: v["value"] for k, v in d["figures"].items()}
    store = {"image": "the repository image", "pvc": "a volume filled from the repository image"}.get(
        d["model_store"], f"object storage ({d['model_store']})")
    text = (f"`{d['out']}`: `{d['name']}` serves {', '.join(f'`{x}`' for x in d['models'])} from {store}, image "
            f"`{d['image']}`, overlays {', '.join(d['overlays'])}. Each pod requests {f['cpu']} CPU and "
            f"{f['memory_mib']} MiB" + (f" ({f['memory_gpu_mib']} MiB in the gpu overlay)" if "memory_gpu_mib" in f
                                       else "")
            + f"; its startup probe allows {f['startup_s']} s; the HPA adds replicas above "
            f"{f['queue_target_us'] / 1000:g} ms of queue time per request. Its README.md has the commands that build "
            "and apply it.")
    repo = Path(d["repository"])
    try:
        now = content_tag(repo, d["models"]) if all((repo / x).is_dir() for x in d["models"]) else None
    except OSError:
        now = None
    if now != d["content_tag"]:
        text += (f" **The repository changed since** (its models no longer match content tag {d['content_tag']}): "
                 f"`{command(run.path, {**d.get('config', {}), 'out': d['out']})}` writes it again.")
    out = [Block("h2", "Deployment (Kubernetes)"), Block("p", text)]
    # how each figure was reached (a fallback where nothing was measured), then deploy's own notes, as it printed them
    said = {"cpu": "CPU", "memory_mib": "memory", "memory_gpu_mib": "memory on a GPU", "startup_s": "startup probe",
            "startup_gpu_s": "startup probe on a GPU", "queue_target_us": "HPA queue target"}
    out += [Block("p", "How each figure was reached: " + "; ".join(
        f"{said.get(k, k)}: {v['source']}" for k, v in d["figures"].items() if v.get("source")) + ".")]
    out += [Block("p", f"**Note**: {n}.") for n in d.get("notes") or []]
    return out


def _tuned_state(stages: dict, winner: dict, run: Run) -> str:
    """Whether the winner's config.pbtxt is what the repository serves now, and how to change that; what an undo
    since took out, named (it read "no longer holds it" of an earlier tune's winner the section never named)."""
    from cnnpack.triton_config import tuned_in_place
    from cnnpack.tune_outputs import undone, undone_note

    t = stages["tune"]
    if t.get("written") and tuned_in_place(stages):  # (not a `kept` earlier winner: this tune's own config)
        return (f"`{winner['model']}`'s config.pbtxt holds it; `cnnpack tune --run {shell(run.path)} --undo` restores "
                "the previous one.")
    again = f"`cnnpack tune --run {shell(run.path)}` measures and writes it again."
    own, earlier, others = undone(t)
    if own:
        also = f", and the ones an earlier tune wrote for {', '.join(f'`{m}`' for m in others)}" if others else ""
        return (f"`{winner['model']}`'s config.pbtxt no longer holds it: `cnnpack tune --undo` put back the one from "
                f"before any tune{also}; {again}")
    if t.get("written"):
        return (f"`{winner['model']}`'s config.pbtxt no longer holds it (laid out again by `cnnpack triton`, or "
                f"edited); {again}")
    note = undone_note(t)
    return _unwritten(t, winner) + (f" {note[0].upper()}{note[1:]}." if note else "")


def _unwritten(t: dict, winner: dict) -> str:
    """Why this tune changed no config.pbtxt."""
    if (v := t.get("verdict") or {}).get("as_good"):
        beat = (f"p99 {v['p99_gain']:.2f}x lower" if v.get("objective") == "latency" and v.get("p99_gain")
                else f"{v['gain']:.2f}x the images/s")  # the figure it was chosen on
        why = ("the measurements were unsteady" if v.get("unsteady") else
               f"the winner's gain over it, {beat}, is within the noise ({100 * v['noise']:.0f} %)")
        said = f"No config.pbtxt was changed: `{winner['model']}`'s own config.pbtxt was kept ({why})."
        today = v.get("vs_served_default")
        if today and today["model"] != winner["model"] and v.get("default_throughput_ips"):
            gain, noise = v["default_throughput_ips"] / today["throughput_ips"], max(v["noise"], today.get("noise") or 0)
            said += (f" As laid out, `{winner['model']}` is {ratio(gain)} `{today['model']}`, the model the run serves "
                     "by default" + (f": clients get that by requesting `{winner['model']}`." if gain - 1 > noise else
                                     f", within the noise ({100 * noise:.0f} %)." if abs(gain - 1) <= noise else
                                     ": slower."))
        return said
    if winner.get("default") and not [p for p in t["points"] if not p["default"]]:
        return "No config.pbtxt was changed: no other config could be measured, so none was compared with it."
    return "No config.pbtxt was changed: no other config measured beat the model's own config.pbtxt."
