"""Benchmark: does pt2 fit the default pipeline's 150 s target on 2 cores? (issue 20: pt2 joins the default
formats only if it does.)

Both commands, each from an empty folder, an empty dataset cache and an empty inductor cache (a new user's:
a clean clone's source paths miss the compiled kernels of any other checkout), back to back on the same 2 cores,
then each once more in its folder (every stage must be skipped):

    A  cnnpack pipeline --openvino no              the main job as it runs by default (pt2 opt-in)
    B  cnnpack pipeline --openvino no --pt2 auto   with the pt2 package (a C++ compiler is here)

(`--openvino no`: the README's first command installs no openvino extra; the venv measured here has it.)
Per-stage times come from each run's manifest; the extra time of B is what pt2 costs the main job.

    .venv/bin/python benchmarks/pipeline_pt2.py   # writes benchmarks/results/pipeline-pt2-cpu2.{json,md}
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORES, machine, pin_cores, save_json, save_md, simd, wait_for_quiet  # noqa: E402
from pipeline_default import TARGET_S, one  # noqa: E402

from cnnpack.peak import cpu_info  # noqa: E402

NAME = f"pipeline-pt2-cpu{CORES}"
OPTIONS = {"without pt2": ("--openvino", "no"), "with pt2": ("--openvino", "no", "--pt2", "auto")}


def write(result: dict) -> None:
    save_json(NAME, result)
    a, b, m = result["runs"]["without pt2"], result["runs"]["with pt2"], result["machine"]
    stages = list(dict.fromkeys([*a["first"]["stages"], *b["first"]["stages"]]))
    lines = [f"# `cnnpack pipeline` with and without pt2 on {CORES} CPU cores", "",
             f"Target: the default pipeline within {TARGET_S:.0f} s. Without pt2 (the default): {a['first']['wall_s']} s; "
             f"with pt2 (--pt2 auto, a C++ compiler here): {b['first']['wall_s']} s "
             f"(+{b['first']['wall_s'] - a['first']['wall_s']:.1f} s). Decision: **{result['decision']}**.", "",
             "| stage | without pt2 (s) | with pt2 (s) | with pt2: what it did |", "|---|--:|--:|---|"]
    for name in stages:
        sa, sb = a["first"]["stages"].get(name, {}), b["first"]["stages"].get(name, {})
        lines.append(f"| {name} | {sa.get('seconds', '–')} | {sb.get('seconds', '–')} | {sb.get('summary', '')} |")
    lines += ["", "| run | wall s | CPU s | other processes' CPU s on these cores | re-run wall s (stages skipped) |",
              "|---|--:|--:|--:|--:|"]
    for key, r in result["runs"].items():
        skipped = sum(s["status"] == "skipped" for s in r["again"]["stages"].values())
        lines.append(f"| {key} | {r['first']['wall_s']} | {r['first']['cpu_s']} | {r['first']['others_cpu_s']} | "
                     f"{r['again']['wall_s']} ({skipped} of {len(r['again']['stages'])}) |")
    lines += ["", f"Machine: {m['cpu']} (flags: {simd(cpu_info()['flags'])}), "
                  f"cores {m['cores_used']} of {m['cores_visible']}, torch {m['torch']}, cnnpack {m['commit']}. "
                  f"{result['date']}. Shared with other engineers' work (waited {result['waited_for_quiet_s']:.0f} s "
                  "for quiet cores first; the table gives the CPU time others took).", "",
              f"Reproduce: `{result['reproduce']}`", ""]
    save_md(NAME, "\n".join(lines))


def main() -> int:
    cores = pin_cores()
    waited = wait_for_quiet(cores, time.monotonic() + 900)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="cnnpack-pipeline-pt2-") as tmp:
        for key, options in OPTIONS.items():
            cwd, cache = Path(tmp) / key.replace(" ", "-") / "work", Path(tmp) / key.replace(" ", "-") / "cache"
            cwd.mkdir(parents=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")  # the children inherit it
            first = one(cwd, cache, cores, options)
            print(f"{key}: {first['wall_s']} s", file=sys.stderr)
            runs[key] = {"options": list(options), "first": first, "again": one(cwd, cache, cores, options)}
    fits = runs["with pt2"]["first"]["wall_s"] <= TARGET_S
    decision = ("pt2 could join the default pipeline (--pt2 auto: where a C++ compiler is found)" if fits else
                f"pt2 stays opt-in: with it the main job took {runs['with pt2']['first']['wall_s']} s > "
                f"{TARGET_S:.0f} s")
    write({"benchmark": NAME, "target_s": TARGET_S, "decision": decision,
           "reproduce": ".venv/bin/python benchmarks/pipeline_pt2.py",
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(cores),
           "waited_for_quiet_s": waited, "load_1min_end": round(os.getloadavg()[0], 2), "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
