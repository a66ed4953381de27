"""Which Triton release serves which model config: the NGC release a repository needs, and the copy of a
repository that the local server (Triton 2.51, the NGC 24.10 release the nvidia-pytriton wheel ships) can read.

Every format cnnpack writes loads in the NGC 24.10 container except one: a `.pt2` package
(`platform: "torch_aoti"`). Triton's PyTorch backend loads those since 26.03 (the README of
triton-inference-server/pytorch_backend, "AOT Inductor Support (Beta)"), and with dynamic batching
since 26.06: the server's release branch r26.06 is the first whose QA (qa/L0_torch_aoti, commit
e5f5faf, a cherry-pick of #8814 "Enable PyTorch2 Batching Tests") serves a batched torchvision
model [N, 3, 224, 224] at batch 1..8 and checks the batch limit and the dynamic batcher's
coalescing. A repository is served by the newest release any of its models needs.

Triton 2.51 refuses that platform when it polls the repository ("unexpected 'platform' and
'backend' pair, got: torch_aoti, pytorch"). So `cnnpack serve` gives the local server a copy made
of symbolic links to the same model folders, in which only such a model's config.pbtxt differs:
without the `platform` line, 2.51 hands the model to cnnpack's Python-based `pytorch` backend,
which loads the identical `model.pt2` named by `default_model_filename`. The repository on disk
stays exactly as the NGC release reads it.
"""

from __future__ import annotations

from pathlib import Path

LOCAL_RELEASE = "24.10"  # Triton 2.51: the server the nvidia-pytriton wheel ships
# the first NGC release that serves a platform (or backend) with dynamic batching, where newer than LOCAL_RELEASE
FIRST_RELEASE = {"torch_aoti": "26.06"}
WHY = {"torch_aoti": "pt2 (torch.export + AOTInductor) packages load in Triton's PyTorch backend since 26.03, "
                     "batched since 26.06"}


def read_configs(repository: str | Path) -> dict[str, object]:
    """{model folder name: ModelConfig} of every model folder whose config.pbtxt parses (the others are
    left for Triton to report)."""
    root, out = Path(repository), {}
    configs = sorted(root.glob("*/config.pbtxt")) if root.is_dir() else []
    if not configs:
        return out  # (and nothing imported: the docker line is also what a broken installation is told)
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:  # a broken installation: it is told the docker line, for the release that serves most models
        return out
    for config in configs:
        try:
            out[config.parent.name] = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        except (text_format.ParseError, OSError, UnicodeDecodeError):
            continue
    return out


def needs_gpu(repository: str | Path | None) -> bool:
    """Whether a model in `repository` asks for GPU instances (KIND_GPU, or KIND_AUTO with GPUs listed)."""
    configs = read_configs(repository) if repository is not None else {}
    if not configs:
        return False
    from tritonclient.grpc import model_config_pb2

    group = model_config_pb2.ModelInstanceGroup
    return any(g.kind == group.KIND_GPU or (g.kind == group.KIND_AUTO and len(g.gpus))
               for mc in configs.values() for g in mc.instance_group)


def _key(release: str) -> tuple[int, ...]:
    return tuple(int(p) for p in release.split("."))


def release_for(repository: str | Path | None) -> tuple[str, dict[str, str]]:
    """The oldest NGC release that serves every model in `repository` (LOCAL_RELEASE when none needs more),
    and {model: why} for the models that need a newer one."""
    needs = {}
    for name, mc in (read_configs(repository) if repository is not None else {}).items():
        key = mc.platform if mc.platform in FIRST_RELEASE else mc.backend
        if key in FIRST_RELEASE:
            needs[name] = key
    release = max([LOCAL_RELEASE, *(FIRST_RELEASE[k] for k in needs.values())], key=_key)
    return release, {name: WHY[key] for name, key in needs.items()}


def local_config(mc):
    """The ModelConfig as Triton 2.51 reads it: a torch_aoti model without its `platform` (nothing else changes)."""
    if mc.platform != "torch_aoti":
        return mc
    local = type(mc)()
    local.CopyFrom(mc)
    local.ClearField("platform")
    return local


def local_repository(repository: Path, dest: Path) -> Path:
    """`repository` itself when the local server reads every config in it and its path has no whitespace;
    otherwise `dest`, built as a copy of symbolic links to the same model folders and files, with each torch_aoti
    model's config.pbtxt replaced by its local form. (The Python backend starts each model's stub with the model's
    path on a command line split at spaces: under a folder like `My Projects` no model loaded, the stubs dying with
    "stol" in the log. Triton resolves the repository's own path, not the model folders' links, so the links hold.)"""
    from google.protobuf import text_format

    changed = {name: mc for name, mc in read_configs(repository).items() if local_config(mc) is not mc}
    if not changed and not any(c.isspace() for c in str(repository)):
        return repository
    dest.mkdir(parents=True)
    for entry in sorted(repository.iterdir()):
        if entry.name not in changed:
            (dest / entry.name).symlink_to(entry.resolve())
            continue
        (dest / entry.name).mkdir()
        for item in entry.iterdir():
            if item.name != "config.pbtxt":
                (dest / entry.name / item.name).symlink_to(item.resolve())
        text = text_format.MessageToString(local_config(changed[entry.name]), use_short_repeated_primitives=True,
                                           as_utf8=True)
        (dest / entry.name / "config.pbtxt").write_text(text)
    return dest
