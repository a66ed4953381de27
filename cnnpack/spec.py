"""The model spec: everything downstream needs to rebuild, feed and label the model.

Written once by `train` (or `export --arch`) into the manifest's `model` key; nothing
downstream re-derives it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    classes: tuple[str, ...]
    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_layout: str = "NCHW"
    arch_kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["classes"] = tuple(known["classes"])
        known["mean"] = tuple(known.get("mean", IMAGENET_MEAN))
        known["std"] = tuple(known.get("std", IMAGENET_STD))
        return cls(**known)
