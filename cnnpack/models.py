"""The model registry: the project's own `cnn` plus every torchvision classification model.

The checkpoint stores the model spec beside the weights, so `build_model(spec)` followed by
`load_state_dict` is all anyone needs to get the network back.
"""

from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from cnnpack import user_model
from cnnpack.errors import UserInputError, one_line
from cnnpack.registry import Registry
from cnnpack.spec import ModelSpec

MODELS: Registry = Registry("arch")


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class CompactCNN(nn.Module):
    """Conv-BN-ReLU stages with pooling, a concat (max + average) global pool and a linear head.

    A stride-2 stem keeps the cost low at 64 px. The global max pool answers "is this feature
    anywhere in the image", which is what shape-like classes need and what an average pool
    alone learns slowly; the adaptive pools make any input size from 32 to 224 px work.
    """

    def __init__(self, num_classes: int, channels: int = 3, width: int = 16, dropout: float = 0.1):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn_relu(channels, w, stride=2),  # (N, w, H/2, W/2)
            conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),  # (N, 2w, H/4, W/4)
            conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),  # (N, 4w, H/8, W/8)
            conv_bn_relu(4 * w, 8 * w),
        )
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(16 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (N, 8w, h, w)
        return self.head(torch.cat([self.max_pool(f), self.avg_pool(f)], dim=1))  # (N, K)


@MODELS.register("cnn")
def _cnn(spec: ModelSpec, pretrained: bool = False) -> nn.Module:
    return CompactCNN(spec.num_classes, spec.channels, **spec.arch_kwargs)


def torchvision_classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_head(model: nn.Module, num_classes: int) -> None:
    """Swaps the last nn.Linear for one with `num_classes` outputs (fc / classifier / heads)."""
    parent, attr, last = None, None, None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    if last is None:
        raise UserInputError(f"{type(model).__name__} has no linear classifier head to resize")
    *path, attr = last.split(".")
    parent = model
    for p in path:
        parent = getattr(parent, p)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


# their training forward returns the logits with auxiliary heads' (a namedtuple): trained and exported without them
# (torchvision's pretrained ones come without them already; their weights are left out of a state dict on loading)
_AUX_HEADS = ("googlenet", "inception_v3")
_AUX_KEYS = ("aux1.", "aux2.", "AuxLogits.")


def _torchvision_model(arch: str, spec: ModelSpec, pretrained: bool) -> nn.Module:
    import torchvision

    if not pretrained:  # init_weights given: their initialisation as it is, without the warning that it may change
        aux = {"aux_logits": False, "init_weights": True} if arch in _AUX_HEADS else {}
        return torchvision.models.get_model(arch, num_classes=spec.num_classes, **{**aux, **spec.arch_kwargs})
    try:
        model = torchvision.models.get_model(arch, weights="DEFAULT", **spec.arch_kwargs)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        raise UserInputError(
            f"--pretrained: cannot get torchvision weights for {arch} ({type(e).__name__}: {e}); "
            "train from scratch (without --pretrained), or give weights of your own to `cnnpack export --arch "
            f"{arch} --weights FILE`"
        ) from None
    _replace_head(model, spec.num_classes)
    return model


def arch_names() -> list[str]:
    return ["cnn", *torchvision_classifiers()]


def no_pretrained_weights(arch: str) -> str | None:
    """Why `--pretrained` cannot be had for `arch` whatever the network (the built-in cnn, your own network), or
    None: the pipeline says it before it writes anything, as train does."""
    if user_model.is_user_arch(arch):
        return (f"--pretrained: {arch} is your own model; give its weights to `cnnpack export --arch {arch} "
                "--weights FILE`, or train it")
    if arch == "cnn":
        return "--pretrained: the built-in `cnn` has no pretrained weights"
    return None


def build_model(spec: ModelSpec, *, pretrained: bool = False) -> nn.Module:
    """Builds the network named by `spec.arch` with `spec.num_classes` outputs (your own: `user_model`)."""
    if pretrained and (why := no_pretrained_weights(spec.arch)):
        raise UserInputError(why)
    if user_model.is_user_arch(spec.arch):
        model = user_model.build(spec.arch, spec.num_classes, spec.arch_kwargs, spec.arch_source)
        if any(map(nn.parameter.is_lazy, [*model.parameters(), *model.buffers()])):
            _materialise(model, spec)  # (nn.LazyLinear, LazyBatchNorm2d: shapes taken at the first forward)
        return model
    if spec.arch in MODELS:
        return MODELS.get(spec.arch)(spec, pretrained)
    if spec.arch in torchvision_classifiers():
        return _torchvision_model(spec.arch, spec, pretrained)
    raise _unknown_arch(spec.arch)


# what a forward of a blank batch may raise where the network cannot take it (your own forward: any of them)
FORWARD_ERRORS = (RuntimeError, ValueError, AssertionError, IndexError, TypeError, KeyError, AttributeError,
                  NotImplementedError)


@contextlib.contextmanager
def _as_it_was(model: nn.Module):
    """Around a probing forward: the model's mode and buffers (batch-norm statistics) put back after it, whatever
    it raised (a lazy buffer, shapeless before, keeps the shape the forward gave it)."""
    buffers = {k: v.clone() for k, v in model.named_buffers() if not nn.parameter.is_lazy(v)}
    was_training = model.training
    try:
        yield
    finally:
        model.train(was_training)
        with torch.no_grad():
            for k, v in model.named_buffers():
                if k in buffers and v.shape == buffers[k].shape:
                    v.copy_(buffers[k])


def flops_per_image(model: nn.Module, channels: int, image_size: int) -> int:
    """FLOPs of one image through `model` (convolutions and matmuls, 2 per multiply-add: torch's FlopCounterMode),
    on the model's device and in its dtype."""
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters(), None)
    x = torch.zeros(1, channels, image_size, image_size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    with _as_it_was(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def _materialise(model: nn.Module, spec: ModelSpec) -> None:
    """Gives lazy layers their shapes (one eval-mode forward of a blank image; buffers and mode as they were): the
    weights of a checkpoint load into them, an optimizer takes them."""
    try:
        with _as_it_was(model), torch.no_grad():
            model.eval()(torch.zeros(1, 3, spec.image_size, spec.image_size))
    except FORWARD_ERRORS as e:
        raise UserInputError(f"--arch {spec.arch}: its lazy layers could not take their shapes from a "
                             f"{spec.image_size}px image ({one_line(e, 160)}); try another --image-size") from None


def strided_convs_on_one_pixel(model: nn.Module, spec: ModelSpec) -> list[str]:
    """The convolutions of `model` that stride over a padded 1x1 map at spec.image_size (resnet18's layer4.0.conv1
    at 16 px or less), by name, each once; found by one eval-mode forward pass of a blank image (nothing of the
    model changes). In bf16 on the CPU their weight gradient is NaN at a padding tap now and then: oneDNN's bf16
    backward on an Emerald Rapids Xeon (AMX), torch 2.14.1, gave NaN in 2 to 4 of 900 steps of a lone Conv2d(256,
    512, 3, stride 2, padding 1) over 1x1 inputs (6 of 900 with 512 channels in), and in none over 2x2, 4x4 or 8x8
    inputs, in fp32, or at stride 1 (benchmarks/bf16_conv_grad.py)."""
    found: list[str] = []

    def hook(name: str):
        def seen(module, args, _out) -> None:
            x = args[0] if args else None  # (a keyword-called convolution is not seen)
            if isinstance(x, torch.Tensor) and tuple(x.shape[-2:]) == (1, 1) and name not in found:
                found.append(name)  # (a convolution called twice is named once)
        return seen

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, nn.Conv2d) and max(m.stride) > 1 and not isinstance(m.padding, str)
               and max(m.padding) > 0]
    was_training = model.training
    try:
        with torch.no_grad():
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            model.eval()(torch.zeros(1, 3, spec.image_size, spec.image_size, device=device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return found


def check_input_size(model: nn.Module, spec: ModelSpec) -> None:
    """Raises UserInputError where the network cannot classify spec.image_size images (a ViT built for 224, a
    pooling that shrinks 32 px to nothing): one forward pass of two blank images, in training and in eval mode,
    before anything is written. The model's batch-norm statistics are left as they were."""
    x = torch.zeros(2, 3, spec.image_size, spec.image_size, device=next(model.parameters()).device)
    try:
        with _as_it_was(model), torch.no_grad():
            for train_mode in (True, False):
                out = model.train(train_mode)(x)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, spec.num_classes):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ValueError(f"its forward gives {got}, not the (N, {spec.num_classes}) logits a classifier "
                                     "gives")
    except FORWARD_ERRORS as e:
        why = one_line(e, 200)
        if user_model.is_user_arch(spec.arch):
            heads = re.search(r"its forward gives \(2, (\d+)\)", why)
            fix = ("give it a num_classes argument (the number of class folders)" if heads else
                   "try another --image-size (a layer sized for one image size: nn.Linear after a flatten)")
            raise UserInputError(f"--arch {spec.arch} cannot classify {spec.image_size}px RGB images into "
                                 f"{spec.num_classes} classes ({why}); its forward must take (N, 3, H, W) and give "
                                 f"(N, classes): {fix}") from None
        raise UserInputError(f"--arch {spec.arch} cannot classify {spec.image_size}px images ({why}); try a larger "
                             "--image-size (torchvision's classifiers are made for 224), or another --arch") from None


def channels_last_problem(model: nn.Module, spec: ModelSpec) -> str | None:
    """Why the network cannot run channels-last (NHWC in memory, as training runs it by default: a `.view` of a
    convolution's output, `x.view(x.size(0), -1)`, needs NCHW), or None: one eval-mode forward of a blank batch, the
    model put back in NCHW, its buffers and mode as they were."""
    x = torch.zeros(2, 3, spec.image_size, spec.image_size, device=next(model.parameters()).device)
    with _as_it_was(model):
        try:
            model.to(memory_format=torch.channels_last)
            with torch.no_grad():
                model.eval()(x.contiguous(memory_format=torch.channels_last))
        except RuntimeError as e:
            return one_line(e, 160)
        finally:
            model.to(memory_format=torch.contiguous_format)
    return None


def check_arch(arch: str) -> None:
    """Raises UserInputError naming the valid archs (closest match first) if `arch` is unknown; your own
    (FILE.py:NAME, module:NAME): where its file cannot be found."""
    if user_model.is_user_arch(arch):
        user_model.source_record(arch)
        return
    if arch.endswith(".py"):  # a file without the name of its model
        raise UserInputError(f"--arch {arch}: name the model in it too: --arch {arch}:NAME (NAME a class or function "
                             "there that returns an nn.Module)")
    if arch not in MODELS and arch not in torchvision_classifiers():
        raise _unknown_arch(arch)


def _unknown_arch(arch: str) -> UserInputError:
    import difflib

    names = arch_names()
    lower = {n.lower(): n for n in names}
    close = [lower[arch.lower()]] if arch.lower() in lower else difflib.get_close_matches(arch.lower(), names, n=3)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return UserInputError(f"unknown arch {arch!r}{hint}; valid: {', '.join(names)}; or your own network: "
                          "FILE.py:NAME (a class or function of that file that returns an nn.Module)")


def load_state_dict_file(path: str | Path) -> dict:
    """Loads a state dict (or a cnnpack checkpoint holding one) without running pickled code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserInputError(f"weights file not found: {path}") from None
    except pickle.UnpicklingError:  # torch's text would advise weights_only=False, which runs the file's code
        raise UserInputError(f"{path} is not a loadable weights file: torch.load found no tensors it may read safely "
                             "(a foreign pickle, or a whole model saved with torch.save(model)); give a state dict "
                             "(torch.save(model.state_dict(), PATH)), or a cnnpack checkpoint.pt") from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt/foreign file
        raise UserInputError(f"{path} is not a loadable weights file ({type(e).__name__}: {e})".splitlines()[0]) from None
    # a training script's checkpoint holds the weights under a key of its own ({"model_state_dict": ...,
    # "optimizer_state_dict": ...} as PyTorch's tutorials save it); the weights of a model wrapped in DataParallel /
    # DistributedDataParallel or torch.compile have their names prefixed
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserInputError(f"{path} does not hold a state dict (a mapping of names to tensors; or one under "
                             "'state_dict', 'model_state_dict' or 'model')")
    return obj


def load_weights(model: nn.Module, state: dict, *, source: str) -> None:
    """Loads `state` into `model` strictly, or raises saying what did not fit (nothing loaded). The weights of
    auxiliary heads the model is built without (googlenet's, inception_v3's: a torchvision state dict has them) are
    left out."""
    own = model.state_dict()
    # a wrapped model's names (DataParallel/DDP's module., torch.compile's _orig_mod., both): unwrapped while that
    # fits the model's own names better (a network with a child named `module` keeps its names)
    layers = [state]  # the names as saved, then each wrapper's prefix taken off in turn
    while prefix := next((p for p in ("module.", "_orig_mod.") if layers[-1] and all(
            str(k).startswith(p) for k in layers[-1])), None):
        layers.append({k[len(prefix):]: v for k, v in layers[-1].items()})
    state = max(layers, key=lambda names: len(set(names) & set(own)))  # (the first of the best: as saved on a tie)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(_AUX_KEYS)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise UserInputError(f"{source} is not a state dict for this model: {'; '.join(parts)}")
    model.load_state_dict(state)


class RawPixels(nn.Module):
    """Wraps a network so it takes raw RGB pixels 0-255 (FP32, NCHW) and normalises inside.

    This is the exported model's contract (DESIGN.md §4): a client only needs the image size.
    """

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("scale", 1.0 / (255.0 * torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)))
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
                             / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (N, C, H, W) raw pixels
        return self.net(x * self.scale - self.shift)
