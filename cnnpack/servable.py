"""The served models of a run that a cluster or a sweep may take: laid out by `cnnpack triton`, passed `cnnpack
verify`, of the weights the run holds now, and served as the very file verify checked (Triton serves the latest
version). `cnnpack tune` sweeps them, `cnnpack deploy` ships them."""

from __future__ import annotations

from pathlib import Path

from cnnpack.errors import UserInputError, shell
from cnnpack.rundir import Run, sha256


def servable(run: Run, models: tuple[str, ...] = (), *, required_by: str = "tune") -> list[tuple[str, str]]:
    """(model name, format) of each served model of the run that passed verify; UserInputError when none.

    `cnnpack deploy` ships exactly these (`required_by` names the command in the error).
    """
    from cnnpack.triton_repo import MODEL_FILES, PLATFORMS, check_laid_out, default_name, versions

    stages = run.read().get("stages", {})
    first = next((s for s in ("export", "verify") if (stages.get(s) or {}).get("status") != "ok"), None)
    hint = f"`cnnpack triton --run {shell(run.path)}`"
    if first:  # the triton stage needs them first: the line names the first missing one, then the rest
        hint = (f"`cnnpack {first} --run {shell(run.path)}`, then "
                + ("`cnnpack verify` and " if first == "export" else "") + "`cnnpack triton`")
    triton = run.stage("triton", required_by=required_by, hint=hint)
    check_laid_out(run)
    root = Path(triton["repository"])
    verify = run.read().get("stages", {}).get("verify", {})
    arch = run.model_spec["arch"]
    passed = [fmt for fmt, v in verify.get("formats", {}).items() if fmt in PLATFORMS and v.get("passed")]
    found = [(default_name(arch, fmt), fmt) for fmt in passed]
    if triton.get("format") in passed and triton.get("name") not in dict(found):  # laid out last with --name
        found.append((triton["name"], triton["format"]))
    found = [(m, fmt) for m, fmt in found if (root / m / "config.pbtxt").is_file()]
    if models:
        unknown = [m for m in models if m not in dict(found)]
        if unknown:
            raise UserInputError(f"--models {unknown[0]!r} is not a verified model of {root} "
                                 f"(verified and laid out: {', '.join(m for m, _ in found) or 'none'})")
        found = [(m, f) for m, f in found if m in models]
    from cnnpack.artifacts import checkpoint_digest, other_source

    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
    now = checkpoint_digest(run)  # hashed once for every model
    for name, fmt in found:  # Triton serves the latest version: it must hold the very file verify checked
        if now and fmt in arts and (why := other_source(run, fmt, arts[fmt], now)):  # a training since verify
            raise UserInputError(f"{name} serves {why}, then `cnnpack verify` and `cnnpack triton`")
        latest = root / name / str(max(versions(root / name), default=0)) / MODEL_FILES[fmt]
        checked = verify.get("artifacts", {}).get(fmt, {})
        files = [(latest, checked.get("sha256"))] + ([(latest.with_suffix(".bin"), checked["weights_sha256"])]
                                                     if "weights_sha256" in checked else [])
        if not all(f.is_file() and sha256(f) == digest for f, digest in files):
            raise UserInputError(_not_verified(run, root, name, fmt, latest, checked))
    if not found:
        raise UserInputError(f"{root} holds no model that passed `cnnpack verify`; run `cnnpack verify --run "
                             f"{shell(run.path)}` and `cnnpack triton --run {shell(run.path)} --repository "
                             f"{shell(root)} --format FORMAT` first")
    return found


def not_laid_out(run: Run, found: list[tuple[str, str]]) -> list[str]:
    """The formats that passed `cnnpack verify` and that `servable` did not take (`found`) because the repository holds
    no config.pbtxt of their model (moved away, deleted, or never laid out), each as "name (why: the command that lays
    it out)": a default `cnnpack tune` swept the others without a word."""
    from cnnpack.triton_repo import PLATFORMS, default_name, lay_out

    stages = run.read().get("stages", {})
    triton, taken = stages["triton"], {fmt for _, fmt in found}
    root, out = Path(triton["repository"]), []
    for fmt, v in stages.get("verify", {}).get("formats", {}).items():
        name = default_name(run.model_spec["arch"], fmt) if fmt in PLATFORMS else ""
        if name and v.get("passed") and fmt not in taken and not (root / name / "config.pbtxt").is_file():
            out.append(f"{name} ({root / name / 'config.pbtxt'} is missing: "
                       f"{lay_out(run.path, triton, name, [(name, fmt)])} lays it out)")
    return out


def unverified(run: Run, found: list[tuple[str, str]]) -> list[str]:
    """The classifiers laid out in the run's repository under their default names that `servable` did not take
    (`found`), each with why: no verdict of its artifact now, or a failed one (deploy names what it leaves out)."""
    from cnnpack.triton_repo import PLATFORMS, default_name, latest_from

    stages = run.read().get("stages", {})
    root, verdicts = Path(stages["triton"]["repository"]), stages.get("verify", {}).get("formats", {})
    out = []
    for fmt in PLATFORMS:
        name = default_name(run.model_spec["arch"], fmt)
        if name not in dict(found) and (root / name / "config.pbtxt").is_file():
            verdict = verdicts.get(fmt)
            if (origin := latest_from(root / name)) and Path(origin) != run.path.resolve():
                out.append(f"{name} (laid out from another run, {origin}: verify this run's {fmt} artifact and lay "
                           "it out, or ship that run)")  # (this run's verify cannot speak for another run's model)
                continue
            out.append(f"{name} ({'failed' if verdict else 'has no verdict of'} `cnnpack verify`"
                       + (" as its artifact is now" if not verdict else "") + ")")
    return out


def _not_verified(run: Run, root: Path, name: str, fmt: str, latest: Path, checked: dict) -> str:
    """Why the latest version is not the file verify checked, and the command that mends it."""
    from cnnpack.triton_publish import read_sidecar

    lay_out = f"`cnnpack triton --run {shell(run.path)} --repository {shell(root)} --format {fmt}`"
    origin = ((read_sidecar(root / name) or {}).get("versions", {}).get(latest.parent.name) or {}).get("run")
    if origin and Path(origin) != run.path.resolve():
        return (f"{latest} is version {latest.parent.name} of {name}, laid out from another run ({origin}), and "
                f"Triton serves the latest version; run {lay_out} to lay this run's out again as the latest, or give "
                "each run its own --repository")
    exported = run.read().get("stages", {}).get("export", {}).get("artifacts", {}).get(fmt, {}).get("sha256")
    if exported and exported == checked.get("sha256"):  # verify is current: the repository is behind it
        return f"{latest} is not the {fmt} artifact `cnnpack verify` checked; run {lay_out} to lay that one out"
    return (f"{latest} is not the {fmt} artifact `cnnpack verify` checked (exported again since?); run "
            f"`cnnpack verify --run {shell(run.path)}`, then {lay_out}")
