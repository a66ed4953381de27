"""The model registry: the built-in cnn, torchvision classifiers by name, heads, weights files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnpack.data import normalize
from cnnpack.errors import UserInputError
from cnnpack.models import (
    MODELS,
    RawPixels,
    _replace_head,
    arch_names,
    build_model,
    check_arch,
    load_state_dict_file,
    load_weights,
)
from cnnpack.registry import Registry
from cnnpack.spec import ModelSpec


def _spec(arch: str = "cnn", k: int = 5, size: int = 32) -> ModelSpec:
    return ModelSpec(arch=arch, num_classes=k, classes=tuple(f"c{i}" for i in range(k)), image_size=size)


def _logits(model: nn.Module, size: int, n: int = 2) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(torch.randn(n, 3, size, size))


def test_registry_names_the_builtin_and_torchvision_models():
    names = arch_names()
    assert names[0] == "cnn" and "cnn" in MODELS
    for arch in ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "vit_b_16"):
        assert arch in names
        check_arch(arch)
    # torchvision's detection / segmentation / video models are not classifiers of images
    assert not {"fasterrcnn_resnet50_fpn", "deeplabv3_resnet50", "r3d_18"} & set(names)


@pytest.mark.parametrize("arch", ["cnn", "resnet18", "mobilenet_v3_small"])
def test_built_models_have_one_output_per_class(arch):
    torch.manual_seed(0)
    model = build_model(_spec(arch, k=7, size=64))
    out = _logits(model, 64, n=3)
    assert out.shape == (3, 7) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch, head", [("resnet18", "fc"), ("mobilenet_v3_small", "classifier.3")])
def test_pretrained_head_is_resized_to_the_class_count(arch, head):
    """The path --pretrained takes: an ImageNet model (1000 outputs) gets a K-way head."""
    import torchvision

    model = torchvision.models.get_model(arch)  # 1000 classes, random weights (no download in tests)
    before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(head)}
    _replace_head(model, 4)
    assert model.get_submodule(head).out_features == 4
    assert _logits(model, 64).shape == (2, 4)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the backbone is untouched


def test_googlenet_trains_without_its_auxiliary_heads_and_a_vit_refuses_a_size_it_cannot_take():
    """googlenet's training forward returned a namedtuple of logits and aux logits, which training cannot use."""
    from cnnpack.models import check_input_size

    spec = _spec("googlenet", k=3, size=32)
    model = build_model(spec)
    check_input_size(model, spec)
    assert model.train()(torch.zeros(2, 3, 32, 32)).shape == (2, 3)
    import torchvision  # torchvision's own, with its auxiliary heads (a --weights file): those weights are left out

    load_weights(model, torchvision.models.googlenet(num_classes=3, aux_logits=True, init_weights=True).state_dict(),
                 source="torchvision's googlenet")
    with pytest.raises(UserInputError, match=r"--arch vit_b_32 cannot classify 32px images \(Wrong image height"):
        check_input_size(build_model(_spec("vit_b_32", k=3, size=32)), _spec("vit_b_32", k=3, size=32))


@pytest.mark.parametrize("size", [32, 48, 64, 96, 224])
def test_cnn_works_from_32_to_224_px(size):
    model = build_model(_spec("cnn", k=3, size=size))
    assert _logits(model, size).shape == (2, 3)


def test_cnn_is_compact():
    n = sum(p.numel() for p in build_model(_spec("cnn", k=6)).parameters())
    assert 20_000 < n < 1_000_000


def test_unknown_arch_lists_the_valid_ones():
    with pytest.raises(UserInputError) as e:
        check_arch("resnet19")
    msg = str(e.value)
    assert "unknown arch 'resnet19'" in msg and "closest: resnet18" in msg
    assert "valid: cnn, " in msg and "mobilenet_v3_small" in msg and "\n" not in msg
    with pytest.raises(UserInputError, match=r"unknown arch 'RESNET18' \(closest: resnet18\); valid"):  # by case
        check_arch("RESNET18")
    with pytest.raises(UserInputError, match="unknown arch 'nope'; valid: cnn"):
        build_model(_spec("nope"))


def test_pretrained_cnn_is_refused_clearly():
    with pytest.raises(UserInputError, match="no pretrained weights"):
        build_model(_spec("cnn"), pretrained=True)


def test_registry_refuses_duplicates_and_lists_names_on_a_miss():
    reg: Registry = Registry("exporter")
    reg.register("onnx")(len)
    with pytest.raises(ValueError, match="exporter 'onnx' is already registered"):
        reg.register("onnx")(print)
    assert reg.get("onnx") is len
    with pytest.raises(UserInputError, match="unknown exporter 'tflite'; valid: onnx"):
        reg.get("tflite")
    original = MODELS.get("cnn")
    with pytest.raises(ValueError, match="already registered"):
        MODELS.register("cnn")(lambda spec, pretrained: nn.Identity())
    assert MODELS.get("cnn") is original


def _snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, snap: dict) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


def test_load_weights_rejects_a_foreign_state_dict_and_loads_nothing():
    torch.manual_seed(0)
    model = build_model(_spec("cnn", k=6))
    snap = _snapshot(model)
    other_k = build_model(_spec("cnn", k=4)).state_dict()  # same keys, head shape differs
    with pytest.raises(UserInputError, match=r"2 with wrong shape \(e.g. head.2.weight: \(4, 256\) vs \(6, 256\)\)"):
        load_weights(model, other_k, source="w.pt")
    assert _unchanged(model, snap)  # the matching conv weights were not loaded either

    resnet = build_model(_spec("resnet18", k=6)).state_dict()
    with pytest.raises(UserInputError, match="w.pt is not a state dict for this model: .* missing .* unexpected"):
        load_weights(model, resnet, source="w.pt")
    assert _unchanged(model, snap)

    mostly = {**{k: v + 1 for k, v in snap.items()}, "extra.weight": torch.zeros(1)}
    with pytest.raises(UserInputError, match="1 unexpected"):
        load_weights(model, mostly, source="w.pt")
    assert _unchanged(model, snap)

    fitting = {k: v + 1 if v.is_floating_point() else v for k, v in snap.items()}
    load_weights(model, fitting, source="w.pt")
    assert torch.equal(model.state_dict()["head.2.bias"], snap["head.2.bias"] + 1)


def test_weights_files_load_safely(tmp_path):
    model = build_model(_spec("cnn"))
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    torch.save({"spec": _spec("cnn").to_dict(), "state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    # as training scripts save them: PyTorch's tutorials' checkpoint dict, a DataParallel/DDP model, a compiled one
    torch.save({"epoch": 3, "model_state_dict": model.state_dict(), "optimizer_state_dict": {}}, tmp_path / "tut.pt")
    torch.save(nn.DataParallel(model).state_dict(), tmp_path / "dp.pt")
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "compiled.pt")
    torch.save({f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "compiled_ddp.pt")
    for name in ("plain.pt", "ckpt.pt", "tut.pt", "dp.pt", "compiled.pt", "compiled_ddp.pt"):
        other = build_model(_spec("cnn"))
        load_weights(other, load_state_dict_file(tmp_path / name), source=name)  # (a wrapper's prefix unwrapped)
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values())), name
    # a network with a child named `module` keeps its own names
    wrapped = nn.Sequential()
    wrapped.module = nn.Linear(2, 2)
    torch.save(wrapped.state_dict(), tmp_path / "own.pt")
    load_weights(wrapped, load_state_dict_file(tmp_path / "own.pt"), source="own.pt")
    torch.save(nn.DataParallel(wrapped).state_dict(), tmp_path / "own_dp.pt")  # module.module.: unwrapped once
    load_weights(wrapped, load_state_dict_file(tmp_path / "own_dp.pt"), source="own_dp.pt")

    good = (tmp_path / "plain.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    torch.save({"a": "not a tensor"}, tmp_path / "foreign.pt")
    torch.save(nn.Linear(2, 2), tmp_path / "pickled_module.pt")  # weights_only refuses arbitrary classes
    (tmp_path / "text.pt").write_text("hello")
    for name in ("truncated.pt", "foreign.pt", "pickled_module.pt", "text.pt"):
        with pytest.raises(UserInputError) as e:
            load_state_dict_file(tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
        if name == "pickled_module.pt":
            assert "torch.save(model.state_dict(), PATH)" in str(e.value)
    with pytest.raises(UserInputError, match="weights file not found"):
        load_state_dict_file(tmp_path / "missing.pt")


def test_raw_pixels_wrapper_normalises_inside():
    torch.manual_seed(0)
    spec = _spec("cnn", k=3)
    net = build_model(spec).eval()
    x = torch.randint(0, 256, (4, 3, 32, 32)).float()
    with torch.inference_mode():
        torch.testing.assert_close(RawPixels(net, spec.mean, spec.std)(x), net(normalize(x, spec.mean, spec.std)),
                                   atol=1e-5, rtol=1e-5)
