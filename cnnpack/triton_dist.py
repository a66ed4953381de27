"""The Triton server cnnpack starts without Docker: the nvidia-pytriton wheel's, and the backend directory it runs with.

The `nvidia-pytriton` wheel (Linux, glibc >= 2.35) ships a complete `tritonserver` 2.51 (the
release of the NGC 24.10 container) with its Python backend:

    site-packages/pytriton/tritonserver/bin/tritonserver
    site-packages/pytriton/tritonserver/backends/python/{libtriton_python.so, triton_python_backend_utils.py}
    site-packages/pytriton/tritonserver/python_backend_stubs/3.X/triton_python_backend_stub
    site-packages/nvidia_pytriton.libs/          libtritonserver + the libraries it links (LD_LIBRARY_PATH)

It has no ONNX Runtime or libtorch backend. Triton 2.51 resolves a model's backend like this
(core `TritonModel::GetBackendLibraryProperties`): the platform names a backend
(`onnxruntime_onnx` -> `onnxruntime`, `pytorch_libtorch` -> `pytorch`); Triton looks for
`libtriton_<backend>.so` in the version folder, the model folder and `<backend-dir>/<backend>/`;
if there is none it looks for `<backend-dir>/<backend>/model.py`, a *Python-based backend*, and runs
that with `<backend-dir>/python/libtriton_python.so` (the served config then says
`runtime: "model.py"`). cnnpack builds such a backend directory, holding the wheel's Python backend
and its own two small CPU backends (`cnnpack/backends/{onnxruntime,pytorch}/model.py`), so the
repository that the NGC container serves with native backends runs unchanged here.

The Python backend stub embeds libpython: it must match the running interpreter (3.X stub,
that interpreter's LIBDIR on LD_LIBRARY_PATH) and it finds this environment's packages (numpy,
onnxruntime, torch) through the `python3` first on PATH, as pytriton itself arranges.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from cnnpack.errors import RuntimeUnavailable, shell
from cnnpack.triton_release import LOCAL_RELEASE, needs_gpu, release_for

NGC_RELEASE = LOCAL_RELEASE  # 24.10: the NGC container whose Triton (2.51) the wheel ships; newer where a model needs it
SHIPPED_BACKENDS = ("onnxruntime", "pytorch", "openvino")  # cnnpack/backends/<name>/model.py
SHARED_MODULE = "cnnpack_batching.py"  # cnnpack/backends/, copied beside each backend's model.py


def ngc_release(repository: str | Path | None = None) -> str:
    """The oldest NGC release that serves every model in `repository` (read from each model's config.pbtxt):
    NGC_RELEASE, or 26.06 when a model is a pt2 package (`platform: "torch_aoti"`, see triton_release.py)."""
    return release_for(repository)[0]


def ngc_image(repository: str | Path | None = None) -> str:
    """The NGC Triton image of the release that serves every model in `repository`."""
    return f"nvcr.io/nvidia/tritonserver:{ngc_release(repository)}-py3"


def docker_line(repository: str | Path = "model_repository") -> str:
    """The NGC container command that serves `repository` with Triton's native backends.

    A relative `repository` is mounted from the current directory ($PWD), an absolute one as it is.
    """
    path = Path(repository)
    here = "" if path.is_absolute() else "$PWD/"
    volume = f"{here}{path}:/models"
    if shell(path) != str(path):  # a space or the like: in double quotes, where $PWD still expands
        escaped = re.sub(r'([\\"`$])', r"\\\1", str(path))
        volume = f'"{here}{escaped}:/models"'
    gpus = "--gpus all " if needs_gpu(repository) else ""  # a KIND_GPU instance group fails to load without it
    return (f"docker run --rm {gpus}-p8000:8000 -p8001:8001 -p8002:8002 "
            f"-v {volume} {ngc_image(repository)} "
            "tritonserver --model-repository=/models")


def _unavailable(why: str) -> RuntimeUnavailable:
    return RuntimeUnavailable(f"{why}. Serve the repository with the NGC container instead: {docker_line()}")


# -- the server the wheel ships ------------------------------------------------------------------
@dataclass(frozen=True)
class TritonDist:
    """Where the wheel's tritonserver, its libraries and its Python backend are."""

    binary: Path
    libs: Path
    python_backend: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this interpreter's Python version


def locate() -> TritonDist:
    """The tritonserver of the nvidia-pytriton wheel, or RuntimeUnavailable saying why not."""
    if not sys.platform.startswith("linux"):
        raise _unavailable(f"the local Triton server (nvidia-pytriton wheel) runs on Linux only, this is {sys.platform}")
    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise _unavailable("the nvidia-pytriton wheel, which ships tritonserver, is not installed "
                           "(pip install 'cnnpack[serve]')")
    pkg = Path(next(iter(spec.submodule_search_locations)))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    dist = TritonDist(binary=pkg / "tritonserver" / "bin" / "tritonserver", libs=pkg.parent / "nvidia_pytriton.libs",
                      python_backend=pkg / "tritonserver" / "backends" / "python",
                      stub=pkg / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub")
    for what, path in (("tritonserver binary", dist.binary), ("server libraries", dist.libs),
                       ("Python backend", dist.python_backend / "libtriton_python.so")):
        if not path.exists():
            raise _unavailable(f"the nvidia-pytriton wheel at {pkg} has no {what} ({path})")
    if not dist.stub.is_file():
        raise _unavailable(f"the nvidia-pytriton wheel has no Python backend stub for Python {version} ({dist.stub})")
    return dist


def server_env(dist: TritonDist) -> dict[str, str]:
    """The environment for tritonserver and the Python backend stubs it forks."""
    env = dict(os.environ)
    libs = [str(dist.libs)]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # the stub links libpython3.X.so: use this interpreter's
        libs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    # The stub's embedded Python finds its prefix (and so this venv's site-packages) from the
    # `python3` first on PATH.
    bins = dict.fromkeys([str(Path(sys.executable).parent), str(Path(sys.exec_prefix) / "bin")])
    env["PATH"] = os.pathsep.join([*bins, env.get("PATH", "")])
    return env


def check_stub(dist: TritonDist, env: dict[str, str]) -> None:
    """Runs the stub without arguments: it answers 1 (usage); 127 means a library is missing."""
    try:
        proc = subprocess.run([str(dist.stub)], env=env, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _unavailable(f"the Python backend stub {dist.stub} does not run: {e}") from None
    if proc.returncode != 1:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        raise _unavailable(f"the Python backend stub {dist.stub} does not run here: {detail[0]}")


def build_backend_dir(dist: TritonDist, dest: Path) -> Path:
    """`dest/python/` (the wheel's Python backend + stub) and `dest/<name>/` for cnnpack's backends."""
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist.python_backend / name, py / name)
    shutil.copy2(dist.stub, py / "triton_python_backend_stub")
    shipped = resources.files("cnnpack") / "backends"
    for name in SHIPPED_BACKENDS:
        (dest / name).mkdir(exist_ok=True)
        (dest / name / "model.py").write_bytes((shipped / name / "model.py").read_bytes())
        (dest / name / SHARED_MODULE).write_bytes((shipped / SHARED_MODULE).read_bytes())
    return dest
