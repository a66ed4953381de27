"""`report.md` and a self-contained `report.html` for a run, built from its manifest.

The report is assembled once as a list of blocks (headings, paragraphs, tables, images,
code) and rendered twice: Markdown with image links, HTML with the images inlined.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cnnpack.artifacts import checkpoint_digest, other_source
from cnnpack.atomic import place, scratch_beside, sigint_deferred
from cnnpack.errors import count, one_line, shell
from cnnpack.plots import CONFUSION_NAMED
from cnnpack.report_bench import bench_section
from cnnpack.report_render import Block, Literal, num, pct, times, to_html, to_markdown
from cnnpack.report_serving import deploy_section, served_section, triton_section, tune_section
from cnnpack.rundir import LAST, Run, artifact_changed, sha256
from cnnpack.user_model import display  # (your own network by its file's name: no folder of this machine)


# -- content --------------------------------------------------------------------------------
def _data_and_training(m: dict, run: Run) -> list[Block]:
    t = m.get("stages", {}).get("train")
    if not t:
        made = m.get("stages", {}).get("model", {})
        src = made.get("source", {})
        return [Block("h2", "Model"), Block("p", f"Not trained by cnnpack: `{display(m['model']['arch'])}` with "
                                                f"{src.get('init', 'given')} weights.")] + \
            _checkpoint_note({"outputs": {"checkpoint": made.get("checkpoint") or {}}}, run)
    d, met = t.get("data", {}), t.get("metrics", {})
    classes = d.get("classes", [])
    index = len(classes) > CONFUSION_NAMED  # confusion.png numbers the classes then: the index says which is which
    rows = [["#"] * index + ["class", "train images", "val images"]] + [
        [str(i)] * index + [Literal(c), str(a), str(b)]
        for i, (c, a, b) in enumerate(zip(classes, d.get("train_per_class", []), d.get("val_per_class", [])))]
    out = [Block("h2", "Data"),
           Block("p", f"Source `{d.get('source')}`: {d.get('train_images')} training and {d.get('val_images')} "
                      f"validation images at {m['model']['image_size']} px; {count(d.get('skipped_files', 0), 'unreadable file')} "
                      "skipped."),
           Block("table", rows=rows),
           Block("h2", "Training")]
    if met:
        out.append(Block("p", f"`{display(m['model']['arch'])}`: best validation top-1 **{pct(met.get('best_val_acc'))}** at "
                              f"epoch {met.get('best_epoch')} of {met.get('epochs')}{_paren(stopped_early(t))}, "
                              f"{met.get('wall_s')} s wall on "
                              f"{t.get('device')}{_mixed(t)}{_sessions(t)}, {met.get('train_images_per_s')} training "
                              "images/s "
                              "(median of the epochs)."))
    else:  # interrupted or failed before its first finished training: no figures to give
        out.append(Block("p", f"`{display(m['model']['arch'])}`: training has not finished (status `{t.get('status')}`); "
                              f"{_how_to_go_on(t, run)}."))
    out += [Block("img", text=alt, path=f) for f, alt in
            (("curves.png", "training curves"), ("confusion.png", "confusion matrix"),
             ("samples.png", "validation predictions")) if f in {v["path"] for v in t.get("outputs", {}).values()}]
    return out + _checkpoint_note(t, run)


def _paren(text: str) -> str:
    return f" ({text})" if text else ""


def stopped_early(t: dict) -> str:
    """`stopped early: ...` where --patience ended the training before its --epochs, else ""."""
    asked, ran = (t.get("config") or {}).get("epochs"), (t.get("metrics") or {}).get("epochs")
    if isinstance(asked, int) and isinstance(ran, int) and ran < asked and t.get("status") == "ok":
        patience = (t.get("config") or {}).get("patience")
        return f"stopped early: no validation gain for --patience {patience} epoch{'' if patience == 1 else 's'}, " \
               f"of {asked} asked"
    return ""


def _how_to_go_on(t: dict, run: Run) -> str:
    """What continues an unfinished training: --resume from its last finished epoch, where one finished; else it
    starts again (--force), after a divergence with other options (resuming keeps them)."""
    again = f"`cnnpack train --run {shell(run.path)} --force`"
    if t.get("status") == "failed" and "diverged" in str(t.get("error", "")):
        return f"it diverged: start it again with {again} and a lower --lr"
    if run.file(LAST).is_file():
        return (f"continue it with `cnnpack train --run {shell(run.path)} --resume` (or the same `cnnpack "
                "pipeline`)")
    return f"no epoch finished: start it again with {again} (or run the same `cnnpack pipeline`)"


def _checkpoint_note(t: dict, run: Run) -> list[Block]:
    """A note where the checkpoint training recorded is missing or no longer its bytes (the report said nothing,
    while export, verify and bench refuse such a run)."""
    rec = t.get("outputs", {}).get("checkpoint") or {}
    if not rec.get("path"):
        return []
    path = run.file(rec["path"])
    if path.is_file() and sha256(path) == rec.get("sha256"):
        return []
    what = "is missing" if not path.is_file() else "is not the one training wrote (its sha256 differs)"
    return [Block("p", f"**Checkpoint changed on disk**: `{rec['path']}` {what}: the figures in this report are of "
                       "the model it held; export, verify and bench need it back (restore it, or make the run again "
                       "with --force).")]


def _mixed(t: dict) -> str:
    """The training's mixed precision, where it had one (the weights and the checkpoint are fp32 either way); a run
    resumed on another host may have had it in some sessions only."""
    kinds = [x.get("autocast") for x in t.get("sessions") or [] if x.get("epochs")] or [t.get("autocast")]
    mixed = sorted({k for k in kinds if k})
    if not mixed:
        return ""
    return f" with {'/'.join(mixed)} autocast" + ("" if all(kinds) else " in some of its sessions (fp32 in the others)")


def _sessions(t: dict) -> str:
    """How the training ran, where more than one process or invocation: the wall time is of them all."""
    sessions = t.get("sessions") or []
    if len(sessions) < 2 and not any(x.get("processes", 1) > 1 for x in sessions):
        return ""

    def part(x: dict) -> str:
        e = x.get("epochs") or []
        epochs = "no epoch finished" if not e else f"epoch {e[0]}" if e[0] == e[1] else f"epochs {e[0]}–{e[1]}"
        procs = x.get("processes", 1)
        return f"{epochs} on {procs} process{'es' if procs > 1 else ''}" + (f" ({x['backend']})" if procs > 1 else "")

    return (f" in {count(len(sessions), 'session')}, resumed after a stop: " if len(sessions) > 1 else ", ") + \
        "; ".join(part(x) for x in sessions)


def exporter_label(text: str) -> str:
    """The exporter as the artifacts table shows it: a release without its build suffix (OpenVINO's
    `2026.4.1-22982-e213a147257-releases/2026/4` widened the table past the page); the manifest keeps it whole."""
    return re.sub(r"(\d+\.\d+\.\d+)-\S+", r"\1", text)


def _export(m: dict, run: Run, gone: dict[str, str]) -> list[Block]:
    """The artifacts table; `gone`: `_changed_on_disk`, each file hashed once for the whole report."""
    e = m.get("stages", {}).get("export")
    if not e:
        return []
    older = _of_older_weights(e, run, gone)
    rows = [["format", "precision", "file", "input", "exporter", "opset", "size", "sha256"]]
    for fmt, a in e.get("artifacts", {}).items():
        shape = "×".join("N" if d == -1 else str(d) for d in a["input"]["shape"])
        files = [run.file(a["path"])] + ([run.file(a["weights"]["path"])] if isinstance(a.get("weights"), dict) else [])
        # as the precision table and the summary count it: the model's files together (an IR's .xml and .bin)
        size = sum(os.path.getsize(f) for f in files) / 2**20 if all(f.exists() for f in files) else None
        rows.append([fmt, a.get("precision", "fp32"), f"`{a['path']}`", f"{a['input']['name']} {shape} {a['input']['dtype']}",
                     exporter_label(a.get("exporter", "")), str(a.get("opset", "–")),
                     num(size, "{:.2f} MB") if fmt not in gone else ("missing" if size is None else "changed on disk"),
                     a["sha256"][:12] + (" (older weights)" if fmt in older else "")])
    notes = [f"**Changed on disk**: {'; '.join(gone.values())}: the size, sha256 and every figure of "
             f"{'it' if len(gone) == 1 else 'them'} in this report are of the file as it was made; re-create "
             f"{'it' if len(gone) == 1 else 'them'} (`export/reproduce.sh`)."] if gone else []
    notes += [f"**Of older weights**: {why}; its figures in this report are not of the model the run trained."
              for why in older.values()]
    return [Block("h2", "Exported artifacts"), Block("table", rows=rows),
            Block("p", f"{_inputs(m['model'], e)} `export/reproduce.sh` re-creates them.")] + \
        [Block("p", n) for n in notes + _export_notes(e)]


def _inputs(spec: dict, e: dict) -> str:
    """What the artifacts take: raw pixels, with the normalisation inside the graph named by its figures (a
    tutorial's `Normalize((0.5,), (0.5,))` given to `export --mean/--std` is not ImageNet's)."""
    from cnnpack.spec import IMAGENET_MEAN, IMAGENET_STD

    kind = {1: "grayscale", 3: "RGB"}.get(c := spec.get("channels", 3), f"{c}-channel")
    mean, std = tuple(spec.get("mean", IMAGENET_MEAN)), tuple(spec.get("std", IMAGENET_STD))
    which = " (ImageNet's)" if (mean, std) == (IMAGENET_MEAN, IMAGENET_STD) else ""
    text = (f"Inputs are raw {kind} pixels 0–255; scaling to 0–1 and normalisation with mean {', '.join(map(num, mean))} "
            f"and std {', '.join(map(num, std))}{which} happen inside the graph")
    taken = sorted(f for f, a in (e.get("artifacts") or {}).items()  # (an int8 model: as its fp32 source, input_kind)
                   if "normalized" in ((a.get("config") or {}).get("input"), a.get("input_kind")))
    return text + (f", except in {', '.join(f'`{f}`' for f in taken)}, exported with `--input normalized`: "
                   f"{'it takes' if len(taken) == 1 else 'they take'} tensors normalised so." if taken else ".")


def _changed_on_disk(m: dict, run: Run) -> dict[str, str]:
    """The artifacts whose files are no longer the ones recorded (deleted, or changed since): format -> why."""
    arts = m.get("stages", {}).get("export", {}).get("artifacts", {})
    return {f: why for f, a in arts.items() if (why := artifact_changed(run, a))}


def _of_older_weights(e: dict, run: Run, gone: dict[str, str]) -> dict[str, str]:
    """The artifacts made from another checkpoint than the run holds now (a training since): format -> why."""
    now = checkpoint_digest(run)  # hashed once for every artifact
    return {f: why for f, a in e.get("artifacts", {}).items()
            if f not in gone and now and (why := other_source(run, f, a, now))}


def _export_notes(e: dict) -> list[str]:
    """What a reader of the table must know about pt2 and TorchScript."""
    arts, out = e.get("artifacts", {}), []
    if "pt2" in arts:
        a = arts["pt2"]
        isa = f" ({a['extra']['cpu_isa']})" if a.get("extra", {}).get("cpu_isa") else ""
        out.append(f"pt2: torch.export + AOTInductor package compiled for {a.get('device', 'cpu')}{isa} by torch "
                   f"{a.get('torch_version', '?')} in {num(a.get('compile_s'), '{:.0f}')} s; it runs there, with "
                   "that torch or a newer one (Python: `torch._inductor.aoti_load_package`, C++: "
                   "`AOTIModelPackageLoader`, Triton: `platform: \"torch_aoti\"`).")
    if "torchscript" in arts:
        why = arts["torchscript"].get("extra", {}).get("deprecated") or "deprecated upstream in favour of torch.export"
        out.append(f"**torchscript**: {why}.")
    return out


def _verify(m: dict, run: Run | None = None, gone: dict[str, str] | None = None) -> list[Block]:
    """Every (artifact, runtime) pair verify checked, each under its own precision's contract."""
    from cnnpack.precision import parity_table, stale, unverified

    v = m.get("stages", {}).get("verify")
    if not v or (v.get("status") != "ok" and "passed" not in v):  # never run, or stopped before its verdict (Ctrl-C)
        if not m.get("stages", {}).get("export", {}).get("artifacts"):
            return []
        why = f"verify stopped ({v['status']}) before its verdict" if v else "no artifact here has been checked " \
            "against the eager model"
        return [Block("h2", "Parity against eager PyTorch"),
                Block("p", f"**Not verified**: {why}; `cnnpack verify` proves each one computes what it computes.")]
    old, missing, gone = stale(m["stages"], "verify"), unverified(m["stages"]), gone or {}
    rows = [["artifact", "runtime", "precision", "max abs err", "top-1 agreement", "accuracy", "contract", "verdict"]]
    for r in parity_table(m["stages"]):
        rows.append([r["artifact"], r["runtime"], r["precision"], num(r["max_abs_err"], "{:.2e}"),
                     pct(r["top1_agreement"]) + (f" ({pct(r['agreement_gated'])} without {r['tie_disagreements']} "
                                                  "on ties)" if r["tie_disagreements"] else ""),
                     pct(r["accuracy"]), r["contract"] or "–",
                     ("pass" if r["passed"] else "FAIL") + (" (an earlier file)" if r["artifact"] in old else
                                                             " (file changed since)" if r["artifact"] in gone else "")])
    verdict = ("every artifact x runtime pair is within the contract of its precision (fp32: tensor parity; "
               "fp16/bf16: relative tolerances; int8: task parity)" if v.get("passed") else "**parity FAILED**")
    if (old or missing or gone) and v.get("passed"):
        verdict = "every pair verify checked is within the contract of its precision, but not every current artifact was checked"
    stopped = v.get("status") not in (None, "ok") and v.get("passed")  # (a parity failure records its own rows)
    if stopped:  # the last verify stopped on an error before its verdict: the rows are of the one before
        verdict = (f"**the last verify {v['status']}** ({v.get('error', 'no reason recorded')}); the rows below are of "
                   "the verify before it")
    out = [Block("h2", "Parity against eager PyTorch"), Block("p", f"Verdict: {verdict}.")]
    redo = f"run `cnnpack verify --run {shell(run.path) if run else 'RUN'}` to check the files as they are now"
    if old:
        out.append(Block("p", f"**Stale**: {', '.join(old)} {'was' if len(old) == 1 else 'were'} exported again "
                              f"after verify checked {'it' if len(old) == 1 else 'them'}: those rows are the earlier "
                              f"file's; {redo}."))
    if missing:
        out.append(Block("p", f"**Not verified**: {', '.join(missing)} (exported after verify, or left out by its "
                              f"--formats); {redo}."))
    if gone and not stopped:
        out.append(Block("p", f"**Changed on disk since verify**: {', '.join(gone)}: those rows are of the file as "
                              f"it was; {redo}."))
    out.append(Block("table", rows=rows))
    if any(r[4].endswith("on ties)") for r in rows[1:]):
        out.append(Block("p", "A tie: an image whose eager logits for two classes lie within one step of the target's "
                              "precision (its machine epsilon x the image's largest logit), so that rounding decides "
                              "which wins; the agreement gate does not count a difference there."))
    return out


PRECISION_PNG = "precision.png"


def _precision(m: dict, run: Run) -> list[Block]:
    """The precision table and the accuracy-vs-speed plot (only when the run has more than one precision)."""
    from cnnpack.precision import plot_precision, precision_table

    rows = precision_table(m.get("stages", {}))
    if len({r["precision"] for r in rows}) < 2:
        return []
    big = rows[0]["batch_size"]  # None: not benchmarked
    table = [["artifact", "runtime", "precision", "size MB", "top-1", "drop vs fp32 (pt)", "p50 ms @ batch 1",
              f"images/s @ batch {big}" if big else "images/s", "× fp32 ONNX Runtime"]]
    def mark(r: dict, key: str, text: str) -> str:
        return f"{text} †" if key in r.get("doubtful", ()) and text != "–" else text

    for r in rows:
        table.append([r["artifact"], r["runtime"], r["precision"], num(r["size_mb"], "{:.2f}"), pct(r["top1"]),
                      num(r["drop_pt"], "{:+.2f}"), mark(r, "latency_ms_p50_b1", num(r["latency_ms_p50_b1"], "{:.3f}")),
                      mark(r, "images_per_s", num(r["images_per_s"], "{:,.0f}")),
                      mark(r, "speedup_vs_fp32", times(r["speedup_vs_fp32"]))])
    out = [Block("h2", "Precisions"), Block("table", rows=table)]
    if any(r.get("doubtful") for r in rows):
        out.append(Block("p", "† from a bench row measured unstable or while the machine was busy or slower (its "
                              "caution is under Latency and throughput), or, for × fp32, against such a baseline; "
                              "rerun `cnnpack bench` on a quiet machine for figures to quote."))
    if unbenched := [r for r in rows if big and r["latency_ms_p50_b1"] is None and r["images_per_s"] is None]:
        benched = [r["runtime"] for r in m["stages"]["bench"]["results"] if r["runtime"] != "triton"]
        every = ",".join(dict.fromkeys([*benched, *(r["runtime"] for r in unbenched)]))  # a bench replaces local rows
        out.append(Block("p", f"Not benchmarked: {', '.join(r['artifact'] + ' in ' + r['runtime'] for r in unbenched)} "
                              f"(`cnnpack bench --run {shell(run.path)} --runtimes {every}` measures them beside the "
                              "others)."))
    from cnnpack.precision import stale

    if old := sorted({*stale(m["stages"], "verify"), *stale(m["stages"], "bench")} & {r["artifact"] for r in rows}):
        out.append(Block("p", f"**Stale**: the figures of {', '.join(old)} are an earlier export's (see above)."))
    for stage, fmt, ref in (("quantize", "onnx_int8", "the fp32 ONNX model"),
                            ("quantize_openvino", "openvino_int8", "the fp32 OpenVINO IR")):
        q = m.get("stages", {}).get(stage) or {}
        if q.get("status") != "ok":
            continue
        g, c, kept_float = q["gate"], q["calibration"], q.get("kept_float", [])
        kept = ", ".join(f"`{n}`" for n in kept_float) or "none"
        n_kept, n_all = q.get("kept_float_quantizable"), q.get("quantizable_nodes")  # (older records: not said)
        of = f" ({n_kept} of its {n_all} quantizable)" if n_all and n_kept is not None else ""
        mostly = (" — **most of it computes in float**: its speed and size are close to fp32's"
                  if of and n_kept * 2 > n_all else "")
        out.append(Block("p", f"{fmt}: calibrated on {c['images']} training images ({c['method']}, seed {c['seed']}); "
                              f"gate: top-1 drop ≤ {g['max_drop_pt']:g} pt and agreement ≥ "
                              f"{100 * g.get('min_agreement', 0.99):g}% against {ref}; reached "
                              f"{g['drop_pt']:+.2f} pt and {100 * g['top1_agreement_vs_fp32']:.2f}% after "
                              f"{g['steps']} fallback step(s); nodes kept in float{of}: {kept}{mostly}."))
    for stage, fmt in (("quantize", "onnx_int8"), ("quantize_openvino", "openvino_int8")):
        last = m.get("stages", {}).get(stage) or {}
        art = (m.get("stages", {}).get("export", {}).get("artifacts", {}) or {}).get(fmt)
        if last.get("status") == "failed" and art:  # the refused attempt kept the earlier model: said, not hidden
            g = art.get("gate") or {}
            was = (f" (made under top-1 drop ≤ {g['max_drop_pt']:g} pt, agreement ≥ "
                   f"{100 * g.get('min_agreement', 0.99):g}%)" if "max_drop_pt" in g else "")
            asked = last.get("config") or {}
            out.append(Block("p", f"**The last `cnnpack quantize` for {fmt} found no model within its gate** (top-1 "
                                  f"drop ≤ {asked.get('max_drop', 0):g} pt, agreement ≥ "
                                  f"{100 * asked.get('min_agreement', 0.99):g}%): the {fmt} model here is the earlier "
                                  f"one{was}, which that gate did not hold to."))
    if plot_precision(rows, run.file(PRECISION_PNG)):
        out.append(Block("img", text="accuracy vs speed per precision", path=PRECISION_PNG))
    return out


def _unfinished(m: dict) -> list[Block]:
    """The stages whose last run failed or was interrupted, said first: the report of a pipeline that stopped at its
    quantize stage read like a finished one (no word of the stage, or of the failure)."""
    stages = m.get("stages", {})
    bad = [(name, s) for name, s in stages.items()
           if name != "pipeline" and isinstance(s, dict) and s.get("status") in ("failed", "interrupted")
           and (s.get("error") or s["status"] == "interrupted")]  # (a tune with nothing in its budget: said there)
    said = "; ".join([*(f"`{name}` {s['status']}" + (f" ({one_line(s['error'], 800)})" if s.get("error") else "")
                        for name, s in bad), *_gates_missed(stages)])
    p = stages.get("pipeline") or {}
    if p.get("status") in ("failed", "interrupted", "running"):  # running: killed (or at work now), marked nothing
        lead = (f"**The last `cnnpack pipeline` {p['status']}**" if p["status"] != "running" else "**The last `cnnpack "
                "pipeline` did not finish** (killed, or at work now)") + (f" at its {bad[0][0]} stage" if len(bad) == 1 else "")
    elif said:
        lead = "**Not every stage finished**"
    else:
        return []
    return [Block("p", f"{lead}{': ' + said if said else ''}. What follows is what the run holds.")]


def _gates_missed(stages: dict) -> list[str]:
    """A `cnnpack quantize` that found no int8 model within its gate, in a run with none from before (where there is
    one, the precision section says it is the earlier one): its report had no word of int8 or of the attempt."""
    said = []
    for stage, fmt in (("quantize", "onnx_int8"), ("quantize_openvino", "openvino_int8")):
        q, g = stages.get(stage) or {}, (stages.get(stage) or {}).get("gate") or {}
        if (q.get("status") == "failed" and not q.get("error") and "drop_pt" in g
                and fmt not in ((stages.get("export") or {}).get("artifacts") or {})):
            judged = (f" on {g['int8_images']} of {g['val_images']} validation images"
                      if g.get("int8_images") and g["int8_images"] != g.get("val_images") else "")
            said.append(f"`{stage}` found no {fmt} model within its gate (top-1 drop ≤ {g['max_drop_pt']:g} pt, "
                        f"agreement ≥ {100 * g.get('min_agreement', 0.99):g}%): its best attempt reached "
                        f"{g['drop_pt']:+.2f} pt and {100 * g['top1_agreement_vs_fp32']:.2f}%{judged} after "
                        f"{g.get('steps', 0)} fallback step(s), and this run has no {fmt} model")
    return said


def build(run: Run) -> list[Block]:
    m = run.read()
    head = [Block("p", f"Run `{run.path}` · cnnpack {m['tool']['version']} · torch {m['libraries'].get('torch')} · "
                       f"onnxruntime {m['libraries'].get('onnxruntime-gpu') or m['libraries'].get('onnxruntime')} · "
                       f"{m['machine']['platform']}, {m['machine']['cpu_count']} CPUs")]
    gone = _changed_on_disk(m, run)
    return (head + _unfinished(m) + _data_and_training(m, run) + _export(m, run, gone) + _verify(m, run, gone) + bench_section(m, run)
            + _precision(m, run) + triton_section(m, run) + served_section(m) + tune_section(m, run)
            + deploy_section(m, run))


def write_report(run_dir: str | Path) -> dict:
    """Writes report.md and report.html into the run; returns their paths."""
    run = Run.open(run_dir)
    data = run.trained_on
    on = f" on {Path(data).name if Path(data).is_absolute() else data}" if data else ""  # `cnn on p` named the folder
    title = f"cnnpack report: {run.path.name} ({display(run.model_spec['arch'])}{on})"
    blocks = [b if b.kind != "img" or run.file(b.path).is_file() else  # a figure deleted since: said, not a crash
              Block("p", f"({b.text}: `{b.path}` is missing from the run directory)") for b in build(run)]
    md, html = run.file("report.md"), run.file("report.html")
    for path in (md, html):  # a folder in the way failed the second rename, after report.md was replaced
        if path.is_dir():
            import errno

            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
    with scratch_beside(md) as md_tmp, scratch_beside(html) as html_tmp:  # both written, then both put in place
        md_tmp.write_text(to_markdown(title, blocks), encoding="utf-8")
        html_tmp.write_text(to_html(title, blocks, run), encoding="utf-8")
        with sigint_deferred():
            place(md_tmp, md)
            place(html_tmp, html)
    return {"markdown": str(run.file("report.md")), "html": str(run.file("report.html"))}
