"""Multi-process training under `torchrun`: DistributedDataParallel with gloo (CPU) or NCCL (GPU).

`torchrun --nproc-per-node N -m cnnpack train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; the
train command turns them into a `Context`. Each rank trains on its shard of every epoch,
metrics are averaged across ranks, and only rank 0 writes the run directory.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

from cnnpack.errors import StageFailed, UserInputError

INIT_TIMEOUT_S = int(os.environ.get("CNNPACK_DIST_TIMEOUT_S", "120"))


@dataclass
class Context:
    rank: int
    world_size: int
    local_rank: int
    backend: str

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

        if self.backend == "nccl":
            return DDP(model, device_ids=[self.local_rank])
        return DDP(model)

    def reduce_stats(self, stats: dict) -> dict:
        """Mean of losses/accuracies, sum of throughput, across ranks."""
        import torch
        import torch.distributed as dist

        keys = sorted(stats)
        device = torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        out = {k: v / self.world_size for k, v in zip(keys, t.tolist())}
        out["train_images_per_s"] = out["train_images_per_s"] * self.world_size
        return out

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def context_from_env(device: str) -> Context | None:
    """A Context when launched by torchrun (WORLD_SIZE > 1), else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is visible to PyTorch on this machine; use --device cpu")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=INIT_TIMEOUT_S))
    except (RuntimeError, ValueError) as e:
        raise StageFailed(f"cannot start {backend} process group (rank {rank}/{world}): {e}".splitlines()[0]) from None
    return Context(rank=rank, world_size=world, local_rank=local_rank, backend=backend)
