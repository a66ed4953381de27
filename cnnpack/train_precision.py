"""What a training step computes in, and the check that an epoch left finite weights: bf16 autocast on a CPU with
native bf16 (AMX, or AVX-512 BF16; not over a convolution that strides over a 1x1 map), bf16 or fp16 on CUDA,
fp32 elsewhere; `Diverged` when an epoch's weights or validation loss are NaN or infinite."""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

from cnnpack.errors import first_few
from cnnpack.models import strided_convs_on_one_pixel
from cnnpack.spec import ModelSpec
from cnnpack.train_config import TrainConfig

log = logging.getLogger("cnnpack")


class Diverged(ValueError):
    """An epoch left the model's weights or its validation loss NaN or infinite: it is not kept."""


def check_finite(model, stats: dict, lr: float, weight_decay: float = 0.0) -> None:
    """Raises Diverged when an epoch's weights (parameters and BatchNorm statistics) or validation loss are not
    finite: saved, such a checkpoint predicts one class for every image, which evaluate reported as an accuracy and
    verify as every export's parity failure. The weights rather than the training loss: under a CUDA GradScaler an
    overflowing step is skipped, and its loss alone says nothing of the model."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    if math.isfinite(stats["val_loss"]) and bool(torch.stack([t.isfinite().all() for t in tensors]).all()):
        return
    raise Diverged(f"training diverged: the weights or the loss became NaN or infinite (training loss "
                   f"{stats['train_loss']:.4g}, validation loss {stats['val_loss']:.4g}); train again with a lower "
                   f"learning rate than --lr {lr:g}"
                   + (f" or a lower --weight-decay than {weight_decay:g}" if weight_decay > 1 else ""))


def autocast_for(device: torch.device, cfg: TrainConfig, model: nn.Module, spec: ModelSpec, say: bool = True):
    """(context, grad scaler, what it computes in: "bf16", "fp16" or None) for the forward pass of a training step.

    On a CPU with native bf16, bf16 autocast: its convolutions and matmuls run on the tile unit (amx_bf16) or on
    AVX-512 BF16's dot products (avx512_bf16). The default training, at the same top-1, took 1.40x the images/s of
    fp32 and 30.7 s for 38.3 s on an Emerald Rapids Xeon (benchmarks/results/train-amp-cnn-64px-cpu2-amx.md), 1.42x
    and 31.7 s for 38.5 s on an AMD Zen 4 (…-avx512.md); the weights, the validation and the checkpoint stay fp32.
    Not where a convolution strides over a 1x1 map (`strided_convs_on_one_pixel`): its bf16 weight gradient is NaN
    now and then there, at a tap that reads only padding, and resnet18 at 16 px ended its first epoch with NaN weights
    (Diverged), at random. On AMX even on a quiet host; on a Zen 4's AVX-512 BF16 only on a loaded one, but there
    often (63-140 of 900 steps with two busy loops beside it, none quiet: benchmarks/results/bf16-conv-grad-*.md).
    Elsewhere on a CPU it trains in fp32 (AVX2 emulates bf16)."""
    if not cfg.amp:
        return contextlib.nullcontext(), None, None
    if device.type == "cpu":
        from cnnpack.host import cpu_flags

        flags = cpu_flags()
        if not flags & {"amx_bf16", "avx512_bf16"}:
            return contextlib.nullcontext(), None, None
        if convs := strided_convs_on_one_pixel(model, spec):
            if say:
                log.warning(f"warning: training in fp32, not bf16: {first_few(convs)} "
                            f"{'strides' if len(convs) == 1 else 'stride'} over a 1x1 map at {spec.image_size} px, "
                            "where the CPU's bf16 weight gradient is NaN now and then (a larger --image-size "
                            "trains in bf16)")
            return contextlib.nullcontext(), None, None
        return torch.autocast("cpu", dtype=torch.bfloat16), None, "bf16"
    if device.type != "cuda":
        return contextlib.nullcontext(), None, None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler, "bf16" if dtype == torch.bfloat16 else "fp16"
