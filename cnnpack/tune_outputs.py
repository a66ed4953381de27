"""What `cnnpack tune` shows: the Pareto front of its points, tune.png (images/s against p99) and the one-line
description of its winner that the CLI, the pipeline and the report print, and what a `cnnpack tune --undo` since
took out of it.
"""

from __future__ import annotations

from pathlib import Path

from cnnpack.errors import ratio
from cnnpack.triton_publish import PREVIOUS


def within_budget(p: dict, budget_ms: float) -> bool:
    """A point that may win: its p99 within the budget, and its precision measured (not bf16 computed in f32)."""
    return p["latency_ms_p99"] <= budget_ms and "computed" not in p


def adopted(winner: dict | None, verdict: dict | None) -> bool:
    """Whether the tune's best point is the config it chose to serve: not where its model's own config.pbtxt was kept
    as good (within the noise, or unsteady), though the table starred it and tune.png's legend said "winner"."""
    return bool(winner) and (bool(winner.get("default")) or not (verdict or {}).get("as_good"))


def role(section: dict, p: dict) -> str:
    """What a point of the table was to the verdict: "winner", or, where the default was kept, "best measured, not
    adopted" and "kept" (its model's own config at that concurrency); "" for the others."""
    w = section.get("winner")
    if not w:
        return ""
    chosen = adopted(w, section.get("verdict"))
    if (p["label"], p["concurrency"]) == (w["label"], w["concurrency"]):
        return "winner" if chosen else "best measured, not adopted"
    kept = not chosen and p["default"] and p["model"] == w["model"] and p["concurrency"] == w["concurrency"]
    return "kept" if kept else ""


def figure(p: dict, key: str, fmt: str) -> str:
    """A point's figure, with its other measurement beside it where it was measured twice (`tune._settle`): the table
    showed the first alone, 1,155 images/s, of a winner measured again at 826, below the kept default's 902."""
    text = fmt.format(p[key])
    for other, said in (("second_measure", "again"), ("first_measure", "first")):
        if (p.get(other) or {}).get(key) is not None:
            return f"{text} ({said} {fmt.format(p[other][key])})"
    return text


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both images/s and p99 (sorted by p99)."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p["latency_ms_p99"], -p["throughput_ips"])):
        if p["throughput_ips"] > best:
            front.append(p)
            best = p["throughput_ips"]
    return front


def plot(points: list[dict], winner: dict | None, latency_budget_ms: float, path: Path, *,
         is_adopted: bool = True) -> None:
    """Images/s against p99 per point (one colour per model), the Pareto front, the budget, the winner (hollow and
    "not adopted" where its model's own config was kept)."""
    from matplotlib.figure import Figure

    from cnnpack.atomic import atomic_path

    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    for model, precision in dict.fromkeys((p["model"], p.get("precision", "fp32")) for p in points):
        mine = [p for p in points if (p["model"], p.get("precision", "fp32")) == (model, precision)]
        ax.scatter([p["latency_ms_p99"] for p in mine], [p["throughput_ips"] for p in mine], s=30,
                   label=f"{model} ({precision})")
        for p in mine:
            if p["default"]:
                ax.scatter(p["latency_ms_p99"], p["throughput_ips"], s=120, facecolors="none", edgecolors="black")
    front = pareto(points)
    if len(front) > 1:  # one point draws no line: the legend listed a front that is not there
        ax.plot([p["latency_ms_p99"] for p in front], [p["throughput_ips"] for p in front], "k--", lw=1,
                label="Pareto front")
    ax.axvline(latency_budget_ms, color="red", lw=1, label=f"budget p99 {latency_budget_ms:g} ms")
    if winner:
        ax.scatter(winner["latency_ms_p99"], winner["throughput_ips"], marker="*", s=300, edgecolors="black", zorder=5,
                   facecolors="gold" if is_adopted else "none",
                   label=f"{'winner' if is_adopted else 'best measured, not adopted'}: {winner['label']}")
    from cnnpack.plots import spaced_log_ticks

    ax.set(xlabel="p99 latency (ms)", ylabel="images/s", xscale="log",
           title=f"{len(points)} served configs (circled: each model's config.pbtxt as laid out)")
    spaced_log_ticks(ax, fontsize=8)
    ax.tick_params(axis="x", which="both", labelsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def describe(section: dict) -> str:
    w, v = section["winner"], section["verdict"] or {}
    line = (f"{'winner' if adopted(w, v) else 'best measured, not adopted'}: {w['label']} at concurrency {w['concurrency']}: {w['throughput_ips']:,.0f} images/s, "
            f"p99 {w['latency_ms_p99']:.2f} ms")
    if w.get("default"):  # nothing else measured beat the model's own config
        line += "; it is its model's own config.pbtxt (no config to write)"
    elif v.get("objective") == "latency" and v.get("p99_gain") is not None:  # what it was chosen on
        line += f"; p99 {v['p99_gain']:.2f}x lower than the default's ({v['default']}, noise {100 * v['noise']:.0f} %)"
    elif v.get("gain") is not None:
        line += f"; {v['gain']:.2f}x the default ({v['default']}, noise {100 * v['noise']:.0f} %)"
    today = v.get("vs_served_default")
    if today and today["model"] != w["model"]:
        shaky = f", whose own noise was {100 * today['noise']:.0f} %" if (today.get("noise") or 0) > 0.1 else ""
        line += f"; {ratio(today['gain'])} {today['model']} as laid out (its config.pbtxt, in this sweep){shaky}"
    sweep = section.get("sweep") or {}
    if sweep.get("truncated"):  # the models take turns: each was cut about as far
        line += (f"; the sweep was cut at --time-limit after {len(section.get('points', []))} of "
                 f"{sweep.get('planned', '?')} planned points, so not every config was tried")
    if errors := sweep.get("errors"):  # said here too: on a terminal the progress line that said it is overwritten
        line += (f"; {len(errors)} of {sweep.get('planned', '?')} planned points could not be measured (the first: "
                 f"{errors[0]}; all in tune.json)")
    if v.get("as_good") and v.get("unsteady"):  # the noise is the machine's: nothing says the default is as good
        settle = (section.get("sweep") or {}).get("settle") or {}
        twice = "error" not in settle and {f"{u} c{w['concurrency']}" for u in v["unsteady"]} <= set(
            settle.get("points") or [])  # measured again at the winner's concurrency
        again = " even measured twice" if twice else ""
        line += (f"; unsteady{again} ({', '.join(v['unsteady'])}: its windows of load did not agree, the machine "
                 "being busy), so no figure tells the two apart: the default config was kept; tune again on a quieter "
                 "machine or with a longer --max-seconds")
    elif v.get("as_good"):
        line += f"; within the noise: {w['model']}'s own config.pbtxt is as good and was kept"
    elif section.get("written"):
        line += f"; written to {section['written']['config']} (previous: {PREVIOUS})"
    return line


def undone(section: dict) -> tuple[bool, dict | None, list[str]]:
    """What `cnnpack tune --undo` put back since this tune: whether this tune's own winner (it wrote its config), the
    winner an earlier tune wrote that this one kept on record (`kept`), and the models of any other config an earlier
    tune wrote. The undo clears `written`, so the summary printed an undone winner as in effect."""
    models = [Path(u["config"]).parent.name for u in section.get("undone") or []]
    w, v, kept = section.get("winner") or {}, section.get("verdict") or {}, (section.get("kept") or {}).get("winner")
    own = adopted(w, v) and not w.get("default") and w.get("model") in models  # (a kept default wrote nothing)
    earlier = kept if kept and kept.get("model") in models else None
    named = {w.get("model") if own else None, earlier and earlier["model"]}
    return own, earlier, [m for m in models if m not in named]


def undone_note(section: dict) -> str:
    """`undone` in one clause, naming each winner it took out ("" where nothing was undone)."""
    own, earlier, others = undone(section)
    parts = ([f"undone since: `cnnpack tune --undo` put back {section['winner']['model']}'s config.pbtxt from before "
              "any tune"] if own else [])
    if earlier:
        parts.append(f"the config an earlier tune wrote, {earlier['label']} at concurrency {earlier['concurrency']} "
                     f"({earlier['throughput_ips']:,.0f} images/s), was undone since (`cnnpack tune --undo`)")
    if others:
        parts.append(f"the config.pbtxt an earlier tune wrote for {', '.join(others)} was undone since"
                     f"{' too' if parts else ''} (`cnnpack tune --undo`)")
    return "; ".join(parts)
