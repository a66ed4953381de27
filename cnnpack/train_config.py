"""`cnnpack train`'s options as one record (what a run's manifest keeps, and what `--resume` continues), checked
before any data is read. Importing it imports no torch: the checks that need the data and model modules import
them when they run."""

from __future__ import annotations

from dataclasses import dataclass

from cnnpack.errors import UserInputError
from cnnpack.host import check_device

MAX_SEED = 2**32 - 1  # numpy's and torch's generators, with seed x 100,003 + epoch within torch's int64
DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-2}  # per optimizer, where --lr is not given


@dataclass(frozen=True)
class TrainConfig:
    data: str = "shapes"
    arch: str = "cnn"
    image_size: int = 64
    epochs: int = 8
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | sgd
    lr: float | None = None  # default per optimizer
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    patience: int = 4  # early stopping: epochs without a val-accuracy gain
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # CUDA: bf16 where supported, else fp16 with a scaler; a CPU with native bf16: bf16 (autocast_for)
    channels_last: bool | None = None  # default (None): on; NHWC convs are faster on CPU (oneDNN) and GPU
    pretrained: bool = False
    val_fraction: float = 0.2
    data_root: str | None = None
    download: bool = False
    workers_note: str = "in-memory dataset, no loader workers"

    def validate(self) -> None:
        if self.epochs < 1:
            raise UserInputError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:  # a batch of one is skipped: BatchNorm cannot train on it, and nothing would train
            raise UserInputError(f"--batch-size must be >= 2 (BatchNorm trains on 2 images or more), got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED:  # numpy's generators take no negative seed; epochs reseed from seed x 100,003
            raise UserInputError(f"--seed must be an integer from 0 to {MAX_SEED:,}, got {self.seed}")
        if self.patience < 1:
            raise UserInputError(f"--patience must be >= 1 (epochs without a val-accuracy gain), got {self.patience}")
        if not 0 <= self.label_smoothing < 1:
            raise UserInputError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.lr is not None and not 0 <= self.lr < float("inf"):  # nan too
            raise UserInputError(f"--lr must be >= 0, got {self.lr}")
        if not self.weight_decay >= 0:  # (also refuses NaN)
            raise UserInputError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in ("adamw", "sgd"):
            raise UserInputError(f"--optimizer {self.optimizer!r}; valid: adamw, sgd")
        if not 0 < self.val_fraction < 1:
            raise UserInputError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        from cnnpack import data as data_mod
        from cnnpack.models import check_arch

        check_device(self.device)
        check_arch(self.arch)
        data_mod.check_data(self.data, self.image_size)  # an empty --data was the current folder
        data_mod.check_torchvision_options(self.data, self.data_root, self.download)
