"""What a training records of each invocation (`stages.train.sessions`): a run stopped and resumed, maybe in
another number of processes, is several; its wall time and the report's account of it are theirs together."""

from __future__ import annotations

import time

from cnnpack.rundir import Run


def session(start_epoch: int, kept: int | None, t_start: float, steps_per_epoch: int, dist, *,
            autocast: str | None = None) -> dict:
    """One invocation of the training: the epochs it finished, its wall time (data loading included), its processes
    and the mixed precision its forward passes ran in (None: fp32). A run resumed in another world size, or on
    another host, has sessions of each: the manifest keeps them all."""
    return {"epochs": [start_epoch + 1, kept] if kept is not None and kept > start_epoch else [],
            "wall_s": round(time.perf_counter() - t_start, 2), "steps_per_epoch": steps_per_epoch,
            "processes": dist.world_size if dist is not None else 1, "autocast": autocast,
            **({"backend": dist.backend} if dist is not None else {})}


def record_session(run: Run, status: str, start_epoch: int, kept: int | None, t_start: float,
                   steps_per_epoch: int, dist, *, autocast: str | None = None, **extra) -> None:
    """The invocation that stops here (interrupted, failed): its status and its session, in one manifest write."""
    this = session(start_epoch, kept, t_start, steps_per_epoch, dist, autocast=autocast)

    def record(m):
        m["stages"]["train"].update(status=status, **extra)
        m["stages"]["train"].setdefault("sessions", []).append(this)

    run.update(record)
