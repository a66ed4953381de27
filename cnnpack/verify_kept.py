"""Which verdicts of an earlier `cnnpack verify` still hold beside a later one that checked only some artifacts
(`verify --formats X`): each one's file unchanged and of the weights the run holds, judged on the same data, under
the same contract or a pass under a stricter one."""

from __future__ import annotations

import json

from cnnpack.artifacts import checkpoint_digest, other_source
from cnnpack.contracts import gate_damage, int8_contract
from cnnpack.rundir import Run, artifact_changed, artifact_digest, sha256


def keep_earlier(run: Run, result: dict, output: str) -> dict:
    """`result` plus the earlier verify's results of the artifacts not checked this time, each kept only while the
    artifact is the one it checked (same sha256), on the same data, under the same tolerances (or a pass under
    stricter ones); `kept` names them. A served model (triton:NAME) is not kept: what
    a server serves can change without the run knowing."""
    path = run.file(output)
    stages = run.read().get("stages", {})
    recorded = stages.get("verify", {}).get("outputs", {}).get("verify_json", {}).get("sha256")
    if not path.is_file() or recorded != sha256(path):  # no earlier verify of this run (or not the recorded one)
        return result
    earlier = json.loads(path.read_text())
    then, now = earlier.get("config", {}), result["config"]
    checked = {r["format"] for r in result["results"]}
    others = [r for r in earlier.get("results", []) if r["format"] not in checked
              and not r["format"].startswith("triton:")]
    if any(then.get(k) != now.get(k) for k in ("data", "device")):  # judged on other data: not this verify's verdicts
        return _dropped(result, {(r["format"], r.get("runtime", "")):
                                 f"judged on other {'data' if then.get('data') != now.get('data') else 'device'}"
                                 for r in others})
    arts = stages.get("export", {}).get("artifacts", {})
    weights = checkpoint_digest(run)  # hashed once for every earlier verdict
    old_arts = earlier.get("artifacts", {})
    kept, dropped = [], {}
    for r in others:
        if why := _why_not_kept(run, r, then, now, arts.get(r["format"]), old_arts.get(r["format"], {}), weights):
            dropped[r["format"], r.get("runtime", "")] = why  # (one runtime of a format may stay, another go)
        else:
            kept.append(r)
    if not kept:
        return _dropped(result, dropped)
    results = result["results"] + kept
    return _dropped({**result, "passed": all(r["passed"] for r in results),
                     "failures": [f for r in results for f in r["failures"]], "results": results,
                     "artifacts": {**{f: a for f, a in old_arts.items() if f in {r["format"] for r in kept}},
                                   **result["artifacts"]},
                     "kept": sorted({r["format"] for r in kept})}, dropped)


def _why_not_kept(run: Run, r: dict, then: dict, now: dict, art: dict | None, old_art: dict, weights) -> str | None:
    """Why an earlier verdict no longer stands (None: it does): the artifact it judged is gone, changed or of other
    weights, or the contract it was judged under is looser than this verify's."""
    if art is None:
        return "no longer exported"
    if "sha256" not in old_art or artifact_digest(old_art) != artifact_digest(art):
        return "exported again since"
    if changed := artifact_changed(run, art):  # the file verify checked is still there as it was
        return changed
    if other_source(run, r["format"], art, weights):  # of the weights the run holds now
        return "made from other weights than the run's checkpoint"
    if not _still_holds(r, then, now, art):
        return "judged under another contract"
    return None


def _dropped(result: dict, dropped: dict[tuple[str, str], str]) -> dict:
    """`result` naming the earlier verdicts that were not kept, each with its reason (said, not lost unseen)."""
    return {**result, "dropped": [{"format": f, "runtime": rt, "reason": why}
                                  for (f, rt), why in sorted(dropped.items())]} if dropped else result


def _still_holds(r: dict, then: dict, now: dict, art: dict) -> bool:
    """Whether an earlier verdict `r` holds under this verify's contract: judged under the same one, or a pass under
    one at least as strict. An int8 result by its own recorded contract (its gate's drop and agreement, or an
    --int8-min-agreement given), set against the one it gets now; the others by the fp32 tolerances."""
    if r.get("precision") == "int8":
        tol, gate = r.get("tolerance", {}), art.get("gate", {})
        if gate_damage(gate.get("max_drop_pt"), gate.get("min_agreement")):  # not kept: checked again, which says it
            return False
        agree, drop, _ = int8_contract(now.get("int8_min_agreement"), gate.get("max_drop_pt"), gate.get("min_agreement"))
        had_agree, had_drop = tol.get("min_agreement"), tol.get("max_drop_pt")
        if had_agree is None or had_drop is None:  # recorded before int8 results kept their contract
            return False
        return (had_agree == agree and had_drop == drop) or (r["passed"] and had_agree >= agree and had_drop <= drop)
    if all(then.get(k) == now.get(k) for k in ("atol", "rtol", "min_agreement")):
        return True
    # under other tolerances only a pass under ones at least as strict still holds (a fail may not)
    return r["passed"] and all(then.get(k, float("inf")) <= now[k] for k in ("atol", "rtol")) and \
        then.get("min_agreement", 0.0) >= now["min_agreement"]
