"""`cnnpack serve`: the real Triton Inference Server over a model repository, without Docker.

`cnnpack.triton_dist` finds the tritonserver that the nvidia-pytriton wheel ships (2.51, the NGC 24.10
container's) and builds the backend directory it runs with: the wheel's Python backend and cnnpack's own
Python-based CPU backends, so the repository that the NGC container serves with native backends runs
unchanged here. This module picks the ports, starts the server in its own process group, waits until
every model is ready (or says which failed and why, from the server's own answer and log), reports
what serves each model, and stops it (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

from cnnpack.atomic import owner_tag
from cnnpack.errors import CnnpackError, StageFailed, UserInputError, file_error, first_few
from cnnpack.ports import Ports, bind_address, url_host
from cnnpack.rundir import MANIFEST
from cnnpack.serve_config import ModelInfo, ServeConfig, resolve_ports, server_args
from cnnpack.serve_leftovers import (
    SCRATCH_PREFIX,
    SHM_LIST,
    SHM_PREFIX,  # noqa: F401 - re-exported
    listed_regions,
    mapped_regions,
    remove_dead_scratch,
    remove_regions,
    unmapped_regions,
)
from cnnpack.triton_dist import TritonDist, build_backend_dir, check_stub, locate, server_env
from cnnpack.triton_publish import stray_folders
from cnnpack.triton_release import local_repository

NOISE = ("CudaDriverHelper has not been initialized",)  # E-level lines Triton prints on every CPU-only start


def repository_of(run_dir: str | Path) -> str:
    """The model repository a run's `cnnpack triton` stage wrote."""
    from cnnpack.rundir import Run

    return Run.open(run_dir).stage("triton", required_by="serve")["repository"]


INTERRUPTED_GRACE_S = 2.0  # a server stopped by a Ctrl-C: the time it gets before SIGKILL


class PortTaken(UserInputError):
    """A port Triton was to listen on was in use when it bound it."""


# -- the server process ---------------------------------------------------------------------------
def _in_main_thread() -> bool:
    # PR_SET_PDEATHSIG fires when the forking *thread* ends: only safe from the main thread
    return threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    """In the child before exec: the server gets SIGTERM if the process that started it dies."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def http_get(url: str, method: str = "GET") -> tuple[int, bytes]:
    """One request to a server's HTTP endpoint: (status, body); (0, b"") when nothing answers within 5 s."""
    req = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, b""


@dataclass
class TritonServer:
    """A tritonserver process over a model repository, as a context manager.

        with TritonServer("model_repository") as server:  # or TritonServer(ServeConfig(...))
            client = tritonclient.http.InferenceServerClient(server.http_address)

    `start()` returns once every model is READY; a model that fails to load raises StageFailed
    with Triton's own error text (and the server is stopped). `stop()` ends only the process
    this object started (and the Python backend stubs in its process group).
    """

    cfg: ServeConfig | str | Path = field(default_factory=ServeConfig)  # a path: that repository, free ports
    # known once started
    ports: Ports | None = field(default=None, init=False)
    models: list[ModelInfo] = field(default_factory=list, init=False)
    backend_dir: Path | None = field(default=None, init=False)
    version: str = field(default="", init=False)  # the server's own, e.g. 2.51.0
    load_s: float | None = field(default=None, init=False)  # from the process start until every model was ready
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _pid: int | None = field(default=None, init=False)  # kept after stop: a caller can check the process is gone
    _tmp: Path | None = field(default=None, init=False, repr=False)
    _log_path: Path | None = field(default=None, init=False, repr=False)
    _log_start: int = field(default=0, init=False, repr=False)  # where this server's lines begin in its log

    def __post_init__(self) -> None:
        if not isinstance(self.cfg, ServeConfig):
            self.cfg = ServeConfig(repository=str(self.cfg))

    # - addresses -
    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def http_address(self) -> str:
        """host:port, as tritonclient.http wants it."""
        return f"{url_host(self.cfg.host)}:{self.ports.http}"

    @property
    def grpc_address(self) -> str:
        """host:port, as tritonclient.grpc wants it."""
        return f"{url_host(self.cfg.host)}:{self.ports.grpc}"

    @property
    def urls(self) -> dict[str, str]:
        h = url_host(self.cfg.host)
        return {"http": f"http://{h}:{self.ports.http}", "grpc": f"grpc://{h}:{self.ports.grpc}",
                "metrics": f"http://{h}:{self.ports.metrics}/metrics"}

    @property
    def pid(self) -> int | None:
        """The server's process id (also after stop)."""
        return self._pid

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    def __enter__(self) -> TritonServer:
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # a Ctrl-C (or SIGTERM, SIGHUP) in the block: out at once, not after Triton waits out its exit timeout for
        # a client's keep-alive connection (20 s, with nothing said)
        interrupted = exc_type is not None and (issubclass(exc_type, KeyboardInterrupt)
                                                or getattr(exc, "exit_code", None) == 130)
        self.stop(grace_s=INTERRUPTED_GRACE_S if interrupted else None)

    # - lifecycle -
    def start(self) -> TritonServer:
        """Starts the server and waits until it and every model are ready."""
        if self._proc is not None and self._proc.poll() is None:
            return self  # already running
        self.cfg = replace(self.cfg, host=bind_address(self.cfg.host))
        repo = self._check_repository()
        dist = locate()
        env = server_env(dist)
        remove_dead_scratch()
        self._tmp = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{owner_tag()}"))
        try:
            self.backend_dir = self._backend_dir(dist, env)
            repo = local_repository(repo, self._tmp / "repository")  # pt2 models: a 2.51-readable config beside them
            for attempt in (1, 2):  # a free port another process took before Triton bound it: other free ones, once
                self.ports = resolve_ports(self.cfg)
                t0 = time.perf_counter()
                self._launch(dist, env, repo)
                try:
                    self._wait_ready()
                    break
                except PortTaken:
                    if attempt == 2 or all((self.cfg.http_port, self.cfg.grpc_port, self.cfg.metrics_port)):
                        raise
            self.load_s = round(time.perf_counter() - t0, 2)
            with contextlib.suppress(OSError):  # for the next serve, where this one is killed
                (self._tmp / SHM_LIST).write_text("\n".join(sorted(map(str, self._shm_regions()))))
            self.models = self._describe()
            status, body = self._get("/v2")
            self.version = json.loads(body).get("version", "") if status == 200 else ""
        except BaseException:
            self.stop()
            raise
        return self

    def _check_repository(self) -> Path:
        repo = Path(self.cfg.repository)
        if not repo.is_dir():
            raise UserInputError(f"model repository {repo} is not a directory; create it with "
                                 "`cnnpack triton --run RUN --repository DIR` or pass --repository")
        folders = sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise UserInputError(f"model repository {repo} holds no model folders; add one with `cnnpack triton`")
        # Triton polls every folder and reports one it cannot read only in its log, then waits as if loading
        strays = stray_folders(repo)
        if strays:
            shown = first_few(strays, 4)
            hint = _run_dir_hint(repo) or "pass the folder `cnnpack triton` wrote (--repository), or move these out"
            raise UserInputError(f"{repo} is not a Triton model repository: {shown} {'holds' if len(strays) == 1 else 'hold'} "
                                 f"no config.pbtxt and no version folder; {hint}")
        return repo.resolve()

    def _backend_dir(self, dist: TritonDist, env: dict[str, str]) -> Path:
        if self.cfg.backend_directory:
            native = Path(self.cfg.backend_directory)
            if not native.is_dir():
                raise UserInputError(f"--backend-directory {native} is not a directory")
            return native.resolve()
        check_stub(dist, env)
        return build_backend_dir(dist, self._tmp / "backends")

    def _command(self, dist: TritonDist, repo: Path) -> list[str]:
        # --backend-directory is local-only: cnnpack's Python-based backends stand in for the native ones
        # that the NGC container brings in its default backend directory
        return [str(dist.binary), *server_args(repo, host=self.cfg.host, ports=self.ports, explicit=self.cfg.explicit,
                                               stop_timeout_s=self.cfg.stop_timeout_s),
                f"--backend-directory={self.backend_dir}"]

    def _launch(self, dist: TritonDist, env: dict[str, str], repo: Path) -> None:
        self._log_path = Path(self.cfg.log_file) if self.cfg.log_file else self._tmp / "tritonserver.log"
        if self.cfg.log_append and not self._log_path.parent.is_dir():  # a typo made folders from the root down
            raise UserInputError(f"--log {self._log_path}: no folder {self._log_path.parent}; make it first")
        if self.cfg.log_file and self._log_path.name == MANIFEST:
            raise UserInputError(f"--log {self._log_path} would write the server log into a cnnpack run's manifest; "
                                 "choose another file")
        try:  # a user's file is appended to (an earlier log of theirs is not emptied); tune's and served's are its own
            if not self.cfg.log_append:
                self._log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self._log_path, "ab" if self.cfg.log_append else "wb")  # noqa: SIM115 - the child holds it
        except OSError as e:
            raise UserInputError(f"cannot write the server log: {file_error(e)}") from None
        self._log_start = log.tell()  # this server's lines begin here
        self._launched_at = time.time() - 1  # (a region's times are the kernel's clock ticks: a second's margin)
        with log:
            # A new session: Ctrl-C in the terminal reaches cnnpack, which stops the server in order,
            # and the process group holds exactly the server and its Python backend stubs.
            self._proc = subprocess.Popen(self._command(dist, repo), env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=_die_with_parent if _in_main_thread() else None)
        self._pid = self._proc.pid

    def _get(self, path: str, method: str = "GET") -> tuple[int, bytes]:
        return http_get(f"http://{self.http_address}{path}", method)

    def _wait_ready(self) -> None:
        """Polls /v2/health/ready until the deadline; fails fast on exit or a model that did not load."""
        deadline = time.monotonic() + self.cfg.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise self._exited()
            if not self._listening():
                time.sleep(0.2)
                continue
            if self._get("/v2/health/ready")[0] == 200:
                if not self.cfg.explicit:
                    self._raise_unpolled_models()
                return
            if self._get("/v2/health/live")[0] == 200:
                self._raise_failed_models()  # with the default model control, live means loading is over
            time.sleep(0.2)
        raise StageFailed(f"Triton at {self.http_address} was not ready within {self.cfg.ready_timeout_s:.0f} s "
                          f"(still loading? raise the timeout); {self._log_hint()}")

    def _listening(self) -> bool:
        """Whether this server says it listens on all three ports: before that, what answers on the HTTP port may
        be another server (one started at the same moment on the same ports: this one fails to bind, and exits)."""
        started = "\n".join(ln for ln in self._log_lines() if "Started " in ln)
        return all(f"Started {service}" in started for service in ("GRPCInferenceService", "HTTPService",
                                                                    "Metrics Service"))

    def _index(self) -> list[dict]:
        status, body = self._get("/v2/repository/index", method="POST")
        return json.loads(body) if status == 200 else []

    def _raise_failed_models(self) -> None:
        index = self._index()
        failed = [m for m in index if m.get("state") == "UNAVAILABLE"]
        if any(m.get("state") in ("LOADING", "UNLOADING") for m in index):
            return
        if not failed:  # a folder Triton refused before loading (no version folder, a hidden folder): only its log says
            unlisted = self._log_failures() if not self.cfg.explicit else []
            if unlisted:
                raise self._could_not_load([f"model '{n}': {_reason(why)}" for n, why in unlisted])
            return
        raise self._could_not_load([f"model '{m['name']}' version {m.get('version', '?')}: "
                                    f"{_reason(m.get('reason', ''))}" for m in failed])

    def _could_not_load(self, reasons: list[str]) -> StageFailed:
        return StageFailed(f"Triton could not load {len(reasons)} model(s) from {self.cfg.repository}: "
                           + "; ".join(reasons) + f" ({self._log_hint()})")

    def _raise_unpolled_models(self) -> None:
        """A model folder Triton could not even read (a config.pbtxt it cannot parse) is left out of loading, so
        the server says ready without it: the index lists it with no state, the log says why."""
        missing = [m["name"] for m in self._index() if m.get("state") != "READY"]
        if not missing:
            return
        lines = self._log_lines()
        reasons = []
        for name in missing:
            why = [m.group(1) for ln in lines
                   if (m := re.search(rf"Poll failed for model directory '{re.escape(name)}': (.*?)\"?$", ln))]
            # else an error of the repository manager's that names it: an ensemble whose step refuses its batch size
            why = why or [_strip_prefix(ln) for ln in lines
                          if ln.startswith("E") and re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w.-])", ln)]
            reasons.append(f"model '{name}': {_reason(why[-1]) if why else 'not loaded (no reason in the log)'}")
        raise self._could_not_load(reasons)

    def _log_failures(self) -> list[tuple[str, str]]:
        """(model, reason) of each "failed to load model" line of the server's log."""
        found = {}
        for ln in self._log_lines():
            if m := re.search(r"failed to load model '(.+?)': (.*?)\"?$", ln):
                found[m.group(1)] = m.group(2)
        return list(found.items())

    def _log_lines(self) -> list[str]:
        """This server's lines of its log (an appended --log file holds earlier ones before them)."""
        with contextlib.suppress(OSError):
            with open(self._log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode(errors="replace").splitlines()
        return []

    def _log_hint(self) -> str:
        return f"server log: {self._log_path}" if self.cfg.log_file else "rerun with --log FILE to keep the server log"

    def _exited(self) -> CnnpackError:
        """The error for a server that exited during startup, from its log."""
        lines = self._log_lines()
        in_use = [_strip_prefix(ln) for ln in lines if re.search(r"failed to start .* already in use", ln)]
        if in_use:  # taken between our check and Triton's bind
            return PortTaken(f"Triton could not listen: {in_use[0].strip()}; stop the process using that port "
                             "or choose other ports (0: any free port)")
        errors = [ln for ln in lines if (ln.startswith("E") or ln.startswith("error:")) and not any(n in ln for n in NOISE)]
        text = " | ".join(_strip_prefix(ln) for ln in errors[-3:]) or " | ".join(lines[-3:]) or "no output"
        return StageFailed(f"tritonserver exited during startup (exit code {self._proc.returncode}): {_reason(text)} "
                           f"({self._log_hint()})")

    def _describe(self) -> list[ModelInfo]:
        """Every model in the repository index with the backend that serves it."""
        out = []
        for m in self._index():
            info = {}
            if m.get("state") == "READY":
                status, body = self._get(f"/v2/models/{m['name']}/versions/{m['version']}/config")
                info = json.loads(body) if status == 200 else {}
            out.append(ModelInfo(name=m["name"], version=str(m.get("version", "")), state=m.get("state", ""),
                                 platform=info.get("platform", ""), backend=info.get("backend", ""),
                                 served_by=self._served_by(info), reason=m.get("reason", "")))
        return out

    def _served_by(self, config: dict) -> str:
        backend, runtime = config.get("backend", ""), config.get("runtime", "")
        if config.get("platform") == "ensemble":
            return "ensemble scheduler"
        if runtime == "model.py" and backend != "python":
            if self.cfg.backend_directory:
                return f"Python-based {backend} backend ({self.backend_dir / backend / 'model.py'})"
            return f"cnnpack's Python-based {backend} backend"
        if backend == "python":
            return "Python backend (the model's own model.py)"
        return f"native {backend} backend ({runtime or f'libtriton_{backend}.so'})" if backend else ""

    def peak_rss_bytes(self) -> int | None:
        """The peak resident memory so far of the server and its backend stubs (its process group), summed.

        Each process's own peak (VmHWM), so the sum bounds the group's peak from above; None off Linux or
        when the server is not running.
        """
        if self._proc is None or self._proc.poll() is not None:
            return None
        total = 0
        for proc, _ in self._group():
            with contextlib.suppress(OSError, ValueError):
                hwm = re.search(r"^VmHWM:\s+(\d+) kB", (proc / "status").read_text(), re.M)
                total += int(hwm.group(1)) * 1024 if hwm else 0
        return total or None

    def cpu_seconds(self) -> tuple[float, float] | None:
        """CPU seconds so far of the tritonserver process and of the rest of its process group (the backend stubs
        that run the models; a live child's time is not in its parent's); None when the server is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        own = stubs = 0.0
        for proc, fields in self._group():
            cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
            if proc.name == str(self._proc.pid):
                own = cpu
            else:
                stubs += cpu
        return own, stubs

    def _group(self):
        """(/proc/PID, the fields of its stat after the command) of each process in the server's process group."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == self._proc.pid:  # field 5: pgrp
                    yield stat.parent, fields

    def _shm_regions(self) -> set[Path]:
        """The shared-memory files the server's processes map: its Python-based backends' regions, shared with
        their stubs."""
        return mapped_regions(proc_dir / "maps" for proc_dir, _ in self._group())

    def alive(self) -> bool:
        """Whether the server runs and answers its liveness endpoint: a killed one can take a moment to be reaped
        (its process not yet seen to exit), a stopped one never answers."""
        return self._proc is not None and self._proc.poll() is None and self._get("/v2/health/live")[0] == 200

    def wait(self) -> int:
        """Blocks until the server exits (serving until then); returns its exit code."""
        return self._proc.wait() if self._proc else 0

    def stop(self, grace_s: float | None = None) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (default `stop_timeout_s`); only this server's process group. The
        shared memory its backends made is removed too: a killed server leaves it in /dev/shm (memory), 1 MiB or
        more a model, for good."""
        # (a server that died on its own: its stubs may still map them, and the list has the rest)
        regions = self._shm_regions() if self._proc is not None else set()
        if self._tmp is not None:
            regions |= listed_regions(self._tmp)
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=self.cfg.stop_timeout_s if grace_s is None else grace_s)
                except (subprocess.TimeoutExpired, KeyboardInterrupt):  # too slow, or a second Ctrl-C
                    _kill_group(proc.pid)
                    proc.wait()
            _kill_group(proc.pid)  # stubs that outlived their server (they quit on their own soon after)
            # (a server that stopped in time removed them itself, but not one a backend made after the list was
            # taken: a stop while a model loaded, as a Ctrl-C of tune's can land)
            remove_regions(regions | unmapped_regions(self._launched_at))
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


def _run_dir_hint(folder: Path) -> str:
    """For a run directory given as the repository: name the repository its triton stage laid out."""
    if not (folder / "cnnpack.json").is_file():
        return ""
    try:
        return f"it is a run directory; serve its repository, {repository_of(folder)} (or pass --run)"
    except CnnpackError:
        return "it is a run directory: lay out its repository with `cnnpack triton --run` and serve that"


def _kill_group(pgid: int) -> None:
    """SIGKILL to the process group this module created with the server (its id is the server's pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reason(text: str) -> str:
    """Triton's error text on one line, without the Python traceback the stub appends ("At: ...")."""
    text = re.split(r"\n\s*At:\s*\n|\\n\\nAt:", text or "no reason given")[0]
    return " ".join(text.replace("\\n", " ").split())


def _strip_prefix(line: str) -> str:
    """`E1128 21:14:38.299 9259 file.cc:241] "text"` -> `text`."""
    m = re.match(r'^[EWI]\d{4} [\d:.]+ +\d+ [^\]]+\] "?(.*?)"?$', line)
    return m.group(1) if m else line
