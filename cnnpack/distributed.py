"""Multi-process training under `torchrun`: DistributedDataParallel with gloo (CPU) or NCCL (GPU).

`torchrun --nproc-per-node N -m cnnpack train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; the
train command turns them into a `Context`. Each rank trains on its shard of every epoch,
metrics are averaged across ranks, and only rank 0 writes the run directory.

A rank waits at most `CNNPACK_DIST_TIMEOUT_S` seconds (default 120) for the others, when the
process group starts and at every collective, so a missing peer is an error, never a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from cnnpack.errors import StageFailed, UserInputError, one_line


class PeerStopped(StageFailed):
    """Another process of the same training stopped (its own error says why); `record`: what the run's manifest
    keeps of it (the message speaks to the moment)."""

    def __init__(self, message: str, record: str | None = None) -> None:
        super().__init__(message)
        self.record = record or message


TIMEOUT_ENV = "CNNPACK_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0
TORCHRUN_VARS = ("RANK", "MASTER_ADDR", "MASTER_PORT")  # torchrun sets them (and LOCAL_RANK) with WORLD_SIZE


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    exchanged: bool = False  # `started` heard every rank: a failure after it is no longer said by its flags

    def shard(self, n: int, *, epoch: int = 0, seed: int = 0):
        """This rank's indices for an epoch: a seeded permutation, padded so every rank gets as many."""
        import torch

        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(n, generator=g)
        per_rank = -(-n // self.world_size)
        perm = torch.cat([perm, perm[: per_rank * self.world_size - n]])  # equal steps on every rank
        return perm[self.rank::self.world_size]

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel as DDP

        try:
            return DDP(model, device_ids=[self.local_rank]) if self.backend == "nccl" else DDP(model)
        except RuntimeError as e:  # its first broadcast, to a peer gone since `started`
            if (why := peer_lost(e)) is None:
                raise
            raise PeerStopped(why) from None

    def started(self, *, failed: bool = False) -> None:
        """Every rank says whether its start (the run folder, the resume state) went well before the first collective
        of training: a refusal one rank made (rank 0 alone judges the run folder) stops the others with one line,
        not a traceback from DistributedDataParallel's first broadcast. `failed`: this rank's start failed; it tells
        the others and returns (its own error says why).

        Raises:
            PeerStopped: another rank's start failed, or that rank is gone.
        """
        import time

        import torch
        import torch.distributed as dist

        from cnnpack.atomic import sigint_deferred

        flags = torch.zeros(self.world_size, dtype=torch.int32, device=self._device())
        flags[self.rank] = int(failed)
        # a Ctrl-C during the exchange is raised once it is done and known to be: a failure flag sent after the
        # others went on would meet their first DDP broadcast and leave them waiting the whole timeout
        lost = None
        with sigint_deferred():
            try:
                dist.all_reduce(flags)
            except RuntimeError as e:  # a peer gone already (its process group closed), or one too slow
                lost = e
            self.exchanged = True
        others = [r for r, f in enumerate(flags.tolist()) if f and r != self.rank]
        if failed or (lost is None and not others):
            return
        stops = f"rank {self.rank} of {self.world_size} stops too"
        if lost is not None:  # (not a peer's flag: what the exchange itself said)
            why = (peer_lost(lost, " before the training began") or
                   f"the exchange before the training began failed ({type(lost).__name__}: {one_line(lost)})")
            raise PeerStopped(f"{why}; {stops}", record=why.split(";")[0])
        who = f"{'rank' if len(others) == 1 else 'ranks'} {', '.join(map(str, others))}"
        time.sleep(2)  # the process that failed ends first: the launcher names it as the cause (torchrun's summary)
        raise PeerStopped(f"{who} of this training stopped before the training began (its error says why); {stops}",
                          record=f"{who} of this training's {self.world_size} processes stopped before the training "
                                 "began")

    def same_model(self, model) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank. DDP copies them at the start of each
        forward pass, so after an epoch's last step each rank holds its own, and each validated a different model
        than the one rank 0 saves: the ranks disagreed on early stopping, one left, and the other failed."""
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer.data, 0)

    def from_main(self, stats: dict) -> dict:
        """Rank 0's figures on every rank (one epoch's record and early-stopping decision everywhere, whatever
        rounding a node's kernels add)."""
        import torch
        import torch.distributed as dist

        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.broadcast(t, 0)
        return dict(zip(keys, t.tolist()))

    def _device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def reduce_stats(self, stats: dict) -> dict:
        """Mean of losses/accuracies, sum of throughput, across ranks."""
        import torch
        import torch.distributed as dist

        keys = sorted(stats)
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        out = {k: v / self.world_size for k, v in zip(keys, t.tolist())}
        out["train_images_per_s"] = out["train_images_per_s"] * self.world_size
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


_LOST = ("Connection closed by peer", "Connection reset by peer", "remote worker", "Timed out", "timed out",
         "NCCL communicator was aborted", "Broken pipe")


def peer_lost(e: BaseException, when: str = "") -> str | None:
    """What to say where a collective failed because another process stopped (`when`: " before ...") or was cut
    off (gloo's message starts with a source path and ends "GLHF!"); None for another error."""
    import re

    text = " ".join(str(e).split())
    if not isinstance(e, RuntimeError) or not any(s in text for s in _LOST):
        return None
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)  # gloo's [.../pair.cc:561]
    text = re.split(r"(?<=\.) ", text)[0].rstrip(".")  # its first sentence
    return (f"another process of this training stopped{when} or was cut off ({text}); its own error says why, "
            f"or it was killed")


def timeout_s() -> float:
    """CNNPACK_DIST_TIMEOUT_S: how long a rank waits for the others (start-up and each collective)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:  # also NaN
        raise UserInputError(f"{TIMEOUT_ENV}={raw!r} is not a number of seconds > 0")
    return value


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise UserInputError(f"{name}={raw!r} is not an integer") from None


@contextlib.contextmanager
def _native_stderr_on_success() -> Iterator[None]:
    """Holds back what torch's C++ side prints while the group starts (c10d logs each failed connect
    with a C++ stack trace); passes it on if the group starts, drops it if not (the error says why)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                sink.seek(0)
                sys.stderr.write(sink.read().decode(errors="replace"))


def context_from_env(device: str) -> Context | None:
    """A Context when launched by torchrun (WORLD_SIZE > 1), else None.

    Raises:
        UserInputError: WORLD_SIZE > 1 without the rest of torchrun's variables, or a bad timeout.
        StageFailed: the process group did not start within the timeout (a peer missing or unreachable).
    """
    world = _env_int("WORLD_SIZE", "1")
    if world < 1:  # 0 or negative trained in one process, as if torchrun had not been used
        raise UserInputError(f"WORLD_SIZE={world}: the number of processes must be >= 1")
    if world == 1:
        return None
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise UserInputError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; start multi-process training "
                             "with `torchrun --nproc-per-node N -m cnnpack train ...`, which sets them")
    timeout = timeout_s()
    import torch
    import torch.distributed as dist

    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK", "0")
    if not 0 <= rank < world:  # no peer would ever come: it waited for the timeout
        raise UserInputError(f"RANK={rank} with WORLD_SIZE={world}: a rank is from 0 to {world - 1}")
    port = os.environ["MASTER_PORT"]
    if not (port.isdigit() and 1 <= int(port) <= 65535):  # it failed as the process group's, exit 1
        raise UserInputError(f"MASTER_PORT={port!r} is not a port number (1-65535)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is visible to PyTorch on this machine; use --device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        with _native_stderr_on_success():
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as e:  # DistStoreError/DistNetworkError are RuntimeErrors
        why = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else type(e).__name__
        raise StageFailed(f"cannot start the {backend} process group (rank {rank} of {world}, master "
                          f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}): {why}; check that every "
                          f"process was started and can reach the master ({TIMEOUT_ENV}={timeout:g} s)") from None
    return Context(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
