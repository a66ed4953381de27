"""Training into a run directory: manifest, checkpoint, plots, exact resume, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnpack.data import load_image_folder
from cnnpack.errors import StageFailed, UserInputError
from cnnpack.models import build_model
from cnnpack.rundir import Run, sha256
from cnnpack.spec import ModelSpec
from cnnpack.train import TRAIN_FILES, Interrupted, TrainConfig, load_checkpoint, predict, sample_indices, train

PLOTS = ("curves.png", "confusion.png", "samples.png")


def _stop_after(k: int):
    def on_epoch_end(epoch: int, _stats: dict) -> None:
        if epoch == k:
            raise KeyboardInterrupt  # what Ctrl-C raises

    return on_epoch_end


def _copy(run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(run, dest)
    return dest


def test_manifest_has_the_fixed_keys(tiny_run):
    m = json.loads((tiny_run / "cnnpack.json").read_text())
    assert m["schema_version"] == 1
    model = m["model"]
    assert model["arch"] == "cnn" and model["num_classes"] == 6 and len(model["classes"]) == 6
    assert model["classes"] == sorted(model["classes"]) and model["channels"] == 3 and model["image_size"] == 32
    assert len(model["mean"]) == len(model["std"]) == 3
    t = m["stages"]["train"]
    assert t["status"] == "ok"
    assert t["metrics"]["epochs"] == 2 and 0 < t["metrics"]["wall_s"] < 600
    # (2 epochs of 12 steps end near chance, 15-19 of 90 images by seed and by the host's kernels, bf16 autocast on
    # AMX or fp32: whether the model learns is not this test's question; benchmarks/train_shapes.py asks it)
    assert t["config"]["epochs"] == 2 and t["data"]["train_images"] == 360 and t["data"]["val_images"] == 90
    for key, rec in t["outputs"].items():  # relative paths with the hash of what is on disk
        assert not Path(rec["path"]).is_absolute(), key
        assert rec["sha256"] == sha256(tiny_run / rec["path"]), key
    history = json.loads((tiny_run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert max(h["val_acc"] for h in history) == t["metrics"]["best_val_acc"]
    assert not list(tiny_run.glob(".*.tmp")), "an atomic write left its temp file"


def test_checkpoint_loads_safely_and_reproduces_the_best_accuracy(tiny_run, tiny_data):
    ckpt = torch.load(tiny_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(ckpt["spec"])
    assert spec.to_dict() == json.loads((tiny_run / "cnnpack.json").read_text())["model"]
    model = build_model(spec)
    model.load_state_dict(ckpt["state_dict"])
    val = load_image_folder(tiny_data, spec.image_size).val
    correct = (predict(model, val, spec, torch.device("cpu")).argmax(1) == val.labels).sum().item()
    best = json.loads((tiny_run / "cnnpack.json").read_text())["stages"]["train"]["metrics"]["best_val_acc"]
    assert correct / len(val) == best
    last = torch.load(tiny_run / "last.pt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2 and {"model", "optimizer", "scheduler", "history"} <= last.keys()
    loaded, _, digest = load_checkpoint(Run.open(tiny_run))
    assert digest == sha256(Path(tiny_run) / "checkpoint.pt")
    assert not loaded.training


def test_plots_are_real_pngs(tiny_run):
    for name in PLOTS:
        path = tiny_run / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        with Image.open(path) as img:
            img.load()
            assert img.width >= 300 and img.height >= 300, (name, img.size)
            assert np.asarray(img.convert("L")).std() > 10, f"{name} is blank"


def test_samples_grid_shows_mistakes_first_then_every_class():
    true = np.repeat(np.arange(4), 10)  # val splits are sorted by class
    pred = true.copy()
    pred[[3, 25]] = 1
    idx = sample_indices(pred, true, n=12)
    assert idx[:2].tolist() == [3, 25]
    assert set(true[idx[2:]]) == {0, 1, 2, 3} and (pred[idx[2:]] == true[idx[2:]]).all()
    assert len(set(idx.tolist())) == 12
    pred = (true + 1) % 4  # every image wrong: the 16 mistakes shown were all of the first class
    idx = sample_indices(pred, true, n=12, max_wrong=8)
    assert sorted(true[idx[:8]].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3] and len(idx) == 8  # and none right to show


def _deterministic(history: list[dict]) -> list[dict]:
    timing = {"train_images_per_s", "train_wall_s"}
    return [{k: v for k, v in h.items() if k not in timing} for h in history]


def test_interrupted_and_resumed_equals_uninterrupted(tiny_data, tmp_path):
    cfg = TrainConfig(data=str(tiny_data), image_size=32, epochs=3, batch_size=32, seed=7)
    full = train(tmp_path / "full", cfg, progress=False)

    with pytest.raises(Interrupted, match="after epoch 2.*--resume"):
        train(tmp_path / "cut", cfg, progress=False, on_epoch_end=_stop_after(2))
    cut = Run.open(tmp_path / "cut")
    assert cut.read()["stages"]["train"]["status"] == "interrupted"
    assert torch.load(cut.file("last.pt"), weights_only=True)["epoch"] == 2
    resumed = train(tmp_path / "cut", TrainConfig(epochs=99), resume=True, progress=False)  # recorded cfg wins

    for name in ("last.pt", "checkpoint.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)
        b = torch.load(tmp_path / "cut" / name, weights_only=True)
        sa, sb = (a["model"], b["model"]) if name == "last.pt" else (a["state_dict"], b["state_dict"])
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k} differs after resume"
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["optimizer"]["state"]
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert all(torch.equal(a[p]["exp_avg_sq"], b[p]["exp_avg_sq"]) for p in a)
    assert _deterministic(json.loads((tmp_path / "full/history.json").read_text())) == \
        _deterministic(json.loads((tmp_path / "cut/history.json").read_text()))
    for key in ("best_val_acc", "best_epoch", "epochs", "final_train_acc"):
        assert full["metrics"][key] == resumed["metrics"][key], key
    assert resumed["resumed"] is True and resumed["status"] == "ok"
    assert resumed["confusion_matrix"] == full["confusion_matrix"]
    # the record covers both invocations: the wall time of each, the epochs each finished
    assert [x["epochs"] for x in resumed["sessions"]] == [[1, 2], [3, 3]]
    assert resumed["metrics"]["wall_s"] == pytest.approx(sum(x["wall_s"] for x in resumed["sessions"]), abs=0.02)
    assert [x["epochs"] for x in full["sessions"]] == [[1, 3]] and "distributed" not in resumed


def test_ctrl_c_while_the_last_epochs_plots_are_drawn_keeps_every_epoch_and_resume_finishes(colours, tmp_path,
                                                                                           monkeypatch):
    """The Ctrl-C after the last epoch (the plots take a second) was a bare `interrupted`: the manifest said
    `running` for good and export warned the training had not finished."""
    import cnnpack.train as train_mod

    draw = train_mod._write_plots
    monkeypatch.setattr(train_mod, "_write_plots", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16)
    with pytest.raises(Interrupted, match=r"after the last epoch \(1\).*every epoch is kept.*--resume"):
        train(tmp_path / "r", cfg, progress=False)
    record = Run.open(tmp_path / "r").read()["stages"]["train"]
    assert record["status"] == "interrupted" and [x["epochs"] for x in record["sessions"]] == [[1, 1]]
    monkeypatch.setattr(train_mod, "_write_plots", draw)
    done = train(tmp_path / "r", cfg, resume=True, progress=False)
    assert done["status"] == "ok" and done["metrics"]["epochs"] == 1
    assert [x["epochs"] for x in done["sessions"]] == [[1, 1], []]  # the second drew the plots, trained nothing
    assert (tmp_path / "r" / "curves.png").is_file()


def test_an_unforeseen_error_while_the_plots_are_drawn_records_the_run_failed_and_resume_finishes(colours, tmp_path,
                                                                                                 monkeypatch):
    """matplotlib raising on a class name ("x$^$y") left the run "running" for good: every later `train` of it was
    refused without --force."""
    from cnnpack import plots

    draw = plots.samples
    monkeypatch.setattr(plots, "samples", lambda *a, **k: (_ for _ in ()).throw(ValueError("font cache broken")))
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16)
    with pytest.raises(ValueError, match="font cache broken"):
        train(tmp_path / "r", cfg, progress=False)
    record = Run.open(tmp_path / "r").read()["stages"]["train"]
    assert record["status"] == "failed" and record["error"] == "ValueError: font cache broken"
    monkeypatch.setattr(plots, "samples", draw)
    done = train(tmp_path / "r", cfg, resume=True, progress=False)
    assert done["status"] == "ok" and (tmp_path / "r" / "samples.png").is_file()


def test_resume_refuses_a_truncated_or_foreign_last_pt(tiny_run, tmp_path):
    run = _copy(tiny_run, tmp_path)
    Run(run).update(lambda m: m["stages"]["train"].update(status="interrupted"))  # a finished run has nothing to resume
    good = (run / "last.pt").read_bytes()
    before = {f: sha256(run / f) for f in ("checkpoint.pt", "cnnpack.json", "history.json")}
    foreign = {
        "truncated": good[: len(good) // 3],
        "state dict of another model": _torch_bytes(build_model(ModelSpec("cnn", 3, ("a", "b", "c"), 32)).state_dict()),
        "another arch": _torch_bytes({**torch.load(tiny_run / "last.pt", weights_only=True),
                                      "model": build_model(ModelSpec("resnet18", 6, tuple("abcdef"), 32)).state_dict()}),
        "text": b"hello",
    }
    for case, data in foreign.items():
        (run / "last.pt").write_bytes(data)
        with pytest.raises(UserInputError, match="--resume: .*last.pt is truncated or not a cnnpack resume state"):
            train(run, resume=True, progress=False)
        assert {f: sha256(run / f) for f in before} == before, f"{case}: a failed resume changed the run"
    (run / "last.pt").unlink()
    with pytest.raises(UserInputError, match="has no last.pt"):
        train(run, resume=True, progress=False)


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_resume_needs_a_run(tmp_path):
    with pytest.raises(UserInputError, match="no such run directory"):
        train(tmp_path / "nothing", resume=True, progress=False)
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserInputError, match="is not a cnnpack run"):
        train(tmp_path / "plain", resume=True, progress=False)


def test_existing_run_is_refused_unless_force(tiny_run, tiny_data, tmp_path):
    run = _copy(tiny_run, tmp_path)
    before = {p.name: sha256(p) for p in run.iterdir()}
    cfg = TrainConfig(data=str(tiny_data), image_size=24, epochs=1, batch_size=64)
    with pytest.raises(UserInputError, match="already holds a run; pass --force to replace it or --resume"):
        train(run, cfg, progress=False)
    assert {p.name: sha256(p) for p in run.iterdir()} == before  # nothing already written is lost

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not empty and not a cnnpack run"):
        train(other, cfg, progress=False)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]

    # the replaced model's exports, results and report go with it (report.md quoted its accuracy); the user's stay
    (run / "export" / "openvino").mkdir(parents=True)
    (run / "export" / "openvino" / "model.xml").write_text("<net/>")
    (run / "deploy" / "kubernetes").mkdir(parents=True)  # cnnpack deploy writes it again: it may hold the user's
    for name in ("report.md", "report.html", "bench.json", "verify.json", "eval-onnx.json", "notes.txt"):
        (run / name).write_text("old")
    section = train(run, cfg, force=True, progress=False)
    assert section["status"] == "ok" and section["metrics"]["epochs"] == 1 and not section["resumed"]
    left = sorted(p.name for p in run.iterdir() if not p.name.startswith("."))  # .cnnpack.lock
    assert left == sorted([*TRAIN_FILES, "cnnpack.json", "deploy", "notes.txt"])
    assert Run.open(run).model_spec["image_size"] == 24
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """Two flat colours with noise: 100 % val accuracy within an epoch or two."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 33), ("val", 8)):  # 66 train images: with --batch-size 65 the last batch is 1
        for cls, rgb in (("blue", (40, 40, 200)), ("red", (200, 40, 40))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(rgb, 30, size=(16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


def test_early_stopping_after_patience_epochs_without_gain(colours, tmp_path):
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=12, batch_size=16, patience=2, lr=3e-3)
    section = train(tmp_path / "r", cfg, progress=False)
    m = section["metrics"]
    assert m["best_val_acc"] == 1.0
    assert m["epochs"] == m["best_epoch"] + 2 < 12


def test_a_last_batch_of_one_image_trains(colours, tmp_path, monkeypatch, caplog):
    """resnet18 at 16 px has a 1x1 feature map: BatchNorm cannot train on a batch of one. The data folder, given
    relative, is recorded absolute: evaluate, verify and resume read it from any directory. Its layer4.0.conv1 strides
    over that 1x1 map, where a CPU's bf16 weight gradients came out NaN now and then (on AMX; on a Zen 4 when the host
    was loaded: such trainings ended Diverged, at random, CI's among them): it trains in fp32 there, and says so."""
    from cnnpack.host import cpu_flags

    monkeypatch.chdir(colours.parent)
    cfg = TrainConfig(data=colours.name, arch="resnet18", image_size=16, epochs=1, batch_size=65)  # amp on
    with caplog.at_level("WARNING"):
        section = train(tmp_path / "r", cfg, progress=False)
    assert section["status"] == "ok" and section["config"]["data"] == str(colours.resolve())
    said = [r.getMessage() for r in caplog.records if "not bf16" in r.getMessage()]
    flags = cpu_flags()
    assert section["autocast"] is None
    if flags & {"amx_bf16", "avx512_bf16"}:
        assert said == ["warning: training in fp32, not bf16: layer4.0.conv1 strides over a 1x1 map at 16 px, where "
                        "the CPU's bf16 weight gradient is NaN now and then (a larger --image-size trains in bf16)"]
    else:
        assert not said  # fp32 anyway: nothing turned off


@pytest.mark.parametrize("flags", [{"amx_bf16", "avx512_bf16"}, {"avx512_bf16"}])
@pytest.mark.parametrize(("size", "mixed"), [(16, None), (24, "bf16")])
def test_any_cpu_bf16_trains_in_fp32_where_a_convolution_strides_over_a_1x1_map(monkeypatch, caplog, flags, size,
                                                                                  mixed):
    """AMX and AVX-512 BF16 alike: a Zen 4 under load gave 63-140 NaN weight gradients in 900 steps there."""
    import cnnpack.host
    from cnnpack.models import build_model
    from cnnpack.spec import ModelSpec
    from cnnpack.train_precision import autocast_for

    monkeypatch.setattr(cnnpack.host, "cpu_flags", lambda: set(flags))
    spec = ModelSpec(arch="resnet18", num_classes=2, classes=("a", "b"), image_size=size)
    with caplog.at_level("WARNING"):
        _, scaler, got = autocast_for(torch.device("cpu"), TrainConfig(), build_model(spec), spec)
    assert (got, scaler) == (mixed, None)
    assert any("not bf16: layer4.0.conv1" in r.getMessage() for r in caplog.records) == (mixed is None)


@pytest.mark.parametrize(("arch", "size", "found"), [("resnet18", 16, ["layer4.0.conv1"]), ("resnet18", 24, []),
                                                     ("resnet50", 16, ["layer4.0.conv2"]), ("cnn", 16, [])])
def test_the_convolutions_that_stride_over_a_one_pixel_map_are_found(arch, size, found):
    from cnnpack.models import build_model, strided_convs_on_one_pixel
    from cnnpack.spec import ModelSpec

    spec = ModelSpec(arch=arch, num_classes=2, classes=("a", "b"), image_size=size)
    model = build_model(spec).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert strided_convs_on_one_pixel(model, spec) == found
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched


@pytest.mark.parametrize("field, value, message", [
    ("epochs", 0, "--epochs must be >= 1"),
    ("batch_size", 0, "--batch-size must be >= 2"),
    ("batch_size", 1, r"--batch-size must be >= 2 \(BatchNorm trains on 2 images or more\), got 1"),
    ("patience", 0, "--patience must be >= 1"),
    ("weight_decay", -1.0, "--weight-decay must be >= 0, got -1.0"),
    ("optimizer", "adam", "--optimizer 'adam'; valid: adamw, sgd"),
    ("device", "tpu", "--device 'tpu'; valid: auto, cpu, cuda"),
    ("arch", "resnet-18", "unknown arch 'resnet-18'"),
    ("image_size", 4, "--image-size 4 is too small"),
    ("image_size", 100_000, r"--image-size 100000 is too large \(maximum 4096\)"),
    ("data", "", "--data is empty"),  # it trained on the current folder
    ("seed", -3, "--seed must be an integer from 0 to 4,294,967,295, got -3"),
    ("seed", 2**47, "--seed must be an integer from 0 to 4,294,967,295"),  # it failed in epoch 1, the run replaced
])
def test_bad_config_is_refused_before_anything_is_written(tmp_path, field, value, message):
    with pytest.raises(UserInputError, match=message):
        train(tmp_path / "r", TrainConfig(**{field: value}), progress=False)
    assert not (tmp_path / "r").exists()


def test_an_arch_that_cannot_take_the_size_is_refused_before_anything_is_written(colours, tmp_path):
    """alexnet's pooling shrinks 16 px to nothing: said in one line before the run exists (it was a traceback
    that left a run `running` forever)."""
    cfg = TrainConfig(data=str(colours), arch="alexnet", image_size=16, epochs=1, batch_size=16)
    with pytest.raises(UserInputError, match=r"--arch alexnet cannot classify 16px images \(.+\); try a larger "):
        train(tmp_path / "r", cfg, progress=False)
    assert not (tmp_path / "r").exists()


def test_a_training_that_fails_before_an_epoch_is_recorded_failed_and_said_so(colours, tmp_path, monkeypatch):
    import cnnpack.train as training

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (planted)")

    cfg = TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16)
    monkeypatch.setattr(training, "_train_one_epoch", out_of_memory)
    planted = r"^training failed in epoch 1 \(RuntimeError: CUDA out of memory \(planted\)\)$"
    with pytest.raises(StageFailed, match=planted):
        train(tmp_path / "r", cfg, progress=False)
    monkeypatch.undo()
    stage = Run.open(tmp_path / "r").read()["stages"]["train"]
    assert stage["status"] == "failed" and stage["error"] == "RuntimeError: CUDA out of memory (planted)"
    with pytest.raises(UserInputError, match=r"already holds a run; pass --force to replace it$"):  # no --resume
        train(tmp_path / "r", cfg, progress=False)
    with pytest.raises(UserInputError, match=r"training did not finish an epoch \(train failed: RuntimeError: CUDA"):
        load_checkpoint(Run.open(tmp_path / "r"))  # what export and the others say: not "the weights are gone"
    assert train(tmp_path / "r", cfg, force=True, progress=False)["status"] == "ok"


def test_a_training_that_diverges_is_a_failure_not_a_checkpoint(colours, tmp_path):
    """A learning rate that turns the weights to NaN: reported as a success with a checkpoint that predicted one class
    for every image (evaluate called it an accuracy; verify blamed every export). Now the epoch is not kept, the stage
    is failed and the line says what to change."""
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=2, batch_size=16, optimizer="sgd", lr=1e30)
    with pytest.raises(StageFailed, match=r"^training failed in epoch 1 \(training diverged: the weights or the loss "
                                          r"became NaN or infinite \(.+\); train again with a lower learning rate "
                                          r"than --lr 1e\+30\)$"):
        train(tmp_path / "r", cfg, progress=False)
    assert Run.open(tmp_path / "r").read()["stages"]["train"]["status"] == "failed"
    assert not (tmp_path / "r" / "checkpoint.pt").exists() and not (tmp_path / "r" / "history.json").exists()
    huge_decay = TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16, weight_decay=1e308)
    with pytest.raises(StageFailed, match=r"than --lr 0.01 or a lower --weight-decay than 1e\+308\)$"):
        train(tmp_path / "wd", huge_decay, progress=False)  # the default --lr was blamed alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_device_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="--device cuda: no CUDA GPU"):
        train(tmp_path / "r", TrainConfig(device="cuda"), progress=False)


def test_skipped_files_are_recorded(colours, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG nope")
    (data / "val" / "blue" / "readme.txt").write_text("hi")
    cfg = TrainConfig(data=str(data), image_size=16, epochs=1, batch_size=32)
    section = train(tmp_path / "r", cfg, progress=False)
    assert section["data"]["skipped_files"] == 2
    assert any("broken.png" in s for s in section["data"]["skipped_examples"])
    assert "skipped 2 unreadable or non-image files" in caplog.text
    assert "no validation image of" not in caplog.text
    shutil.rmtree(data / "val" / "red")  # val/ without red: its accuracy is not measured, and said so
    train(tmp_path / "r2", cfg, progress=False)
    assert "warning: no validation image of red: the validation accuracy leaves it out" in caplog.text


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_every_small_schedule_runs_to_the_end(optimizer):
    """`--epochs 1` on a few batches: 4 steps in all used to be a ZeroDivisionError in OneCycleLR."""
    from cnnpack.train import make_optimizer

    for steps in range(1, 13):
        opt, sched = make_optimizer(TrainConfig(optimizer=optimizer), torch.nn.Linear(2, 2), steps)
        for _ in range(steps):  # as the training loop does: one scheduler step per batch
            opt.step()
            sched.step()


def test_resume_conflicts_are_the_options_that_differ_from_the_recorded_ones(tiny_run, monkeypatch):
    from cnnpack.train_resume import resume_conflicts

    recorded = json.loads((tiny_run / "cnnpack.json").read_text())["stages"]["train"]["config"]
    same = {k: recorded[k] for k in ("data", "image_size", "epochs", "batch_size", "lr")}
    assert resume_conflicts(tiny_run, same) == {}
    assert resume_conflicts(tiny_run, {**same, "epochs": 9, "seed": recorded["seed"]}) == {"epochs": (9, 2)}
    # the data folder as the user typed it first (relative, a trailing slash): the run records its absolute path
    data = Path(recorded["data"])
    monkeypatch.chdir(data.parent)
    for typed in (data.name, f"./{data.name}/"):
        assert resume_conflicts(tiny_run, {**same, "data": typed}) == {}
    assert resume_conflicts(tiny_run, {**same, "data": "elsewhere"}) == {"data": ("elsewhere", str(data))}
    # an option given as what the recorded default came to is no change (it was refused as one)
    assert recorded["channels_last"] is None and recorded["lr"] is None and recorded["device"] == "auto"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert resume_conflicts(tiny_run, {"channels_last": True, "lr": 1e-2, "device": device}) == {}
    assert resume_conflicts(tiny_run, {"channels_last": False, "lr": 0.1}) == {"channels_last": (False, None),
                                                                              "lr": (0.1, None)}
    # tiny_data has train/ and val/, so --val-fraction never applied: a different one is no change
    assert resume_conflicts(tiny_run, {**same, "val_fraction": 0.5}) == {}


def test_only_a_folder_of_class_folders_is_split_by_val_fraction(tiny_data, tmp_path):
    from cnnpack.train_resume import _split_given

    (tmp_path / "cats").mkdir()
    assert _split_given("shapes") and _split_given("torchvision:CIFAR10") and _split_given(str(tiny_data))
    assert not _split_given(str(tmp_path)) and not _split_given(str(tmp_path / "missing"))
    from cnnpack.data import check_val_fraction

    for data in ("shapes", "torchvision:CIFAR10", str(tiny_data)):  # given there, it split nothing, and was recorded
        with pytest.raises(UserInputError, match="--val-fraction splits a folder of class folders, and .*; drop "):
            check_val_fraction(data)
    check_val_fraction(str(tmp_path))


def test_a_run_inside_the_data_folder_is_refused_before_anything_is_written(colours, tmp_path, monkeypatch):
    """`--data .` from the data folder with the default runs/ there: the run's plots were read back as a class."""
    import shutil

    from cnnpack.pipeline import PipelineConfig, default_run_dir, pipeline

    data = tmp_path / "photos"
    shutil.copytree(colours, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with pytest.raises(UserInputError, match=rf"--run {data / 'runs/r'} is inside --data {data}: what it writes "):
        train(data / "runs" / "r", TrainConfig(data=str(data), image_size=16, epochs=1))
    monkeypatch.chdir(data)
    assert default_run_dir(PipelineConfig(data=".")).name.startswith("pipeline-photos-")  # the folder's own name
    with pytest.raises(UserInputError, match=r"--run runs/pipeline-photos-cnn-64px is inside --data \."):
        pipeline(cfg=PipelineConfig(data="."), progress=False, say=lambda _: None)
    with pytest.raises(UserInputError, match=r"--repository model_repository is inside --data \."):
        pipeline(tmp_path / "run", PipelineConfig(data="."), progress=False, say=lambda _: None)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written there


def test_the_pipeline_knows_one_data_folder_however_it_is_spelled(colours, monkeypatch):
    """`--data dss`, `./dss/` and `/abs/dss` trained everything again: the fingerprint held the string as typed."""
    from cnnpack.pipeline import PipelineConfig, Stages

    monkeypatch.chdir(colours.parent)
    spellings = (colours.name, f"./{colours.name}/", str(colours))
    inputs = [Stages(PipelineConfig(data=d), progress=False, say=print).train_inputs(None) for d in spellings]
    assert inputs[0] == inputs[1] == inputs[2] and inputs[0]["config"]["data"] == str(colours)


@pytest.mark.parametrize("flags, amp, mixed", [({"amx_bf16", "amx_tile"}, True, "bf16"), ({"amx_bf16"}, False, None),
                                               ({"avx512_bf16", "avx2"}, True, "bf16"), ({"avx512f", "avx2"}, True, None)])
def test_a_cpu_with_native_bf16_trains_in_bf16_autocast_and_the_run_says_so(colours, tmp_path, monkeypatch, flags, amp,
                                                                             mixed):
    """bf16 autocast on the CPU where AMX or AVX-512 BF16 computes it (the default training 1.40x the images/s of fp32
    on an Emerald Rapids Xeon, 1.42x on a Zen 4); fp32 elsewhere and with --no-amp. The checkpoint's weights are fp32
    either way."""
    import cnnpack.host
    from cnnpack.report import write_report

    seen = []
    real = torch.autocast.__init__

    def spy(self, device_type, *a, **k):
        seen.append((device_type, k.get("dtype"), k.get("enabled", True)))
        real(self, device_type, *a, **k)

    monkeypatch.setattr(cnnpack.host, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(torch.autocast, "__init__", spy)
    section = train(tmp_path / "r", TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16, amp=amp),
                    progress=False)
    assert section["autocast"] == mixed
    assert (("cpu", torch.bfloat16, True) in seen) == (mixed == "bf16")
    model, _, _ = load_checkpoint(Run.open(tmp_path / "r"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    write_report(tmp_path / "r")
    assert ("with bf16 autocast" in (tmp_path / "r" / "report.md").read_text()) == (mixed == "bf16")


def test_resume_on_data_that_changed_is_refused(colours, tmp_path):
    """Images added after the stop: the epochs after it trained on another split (images of the first epoch's
    training now scored as validation) and the record kept the old counts; a class added read as a damaged last.pt."""
    data = tmp_path / "data"
    shutil.copytree(colours, data)
    cfg = TrainConfig(data=str(data), image_size=16, epochs=3, batch_size=16)
    with pytest.raises(Interrupted):
        train(tmp_path / "r", cfg, progress=False, on_epoch_end=_stop_after(1))
    shutil.copy(data / "train" / "red" / "0.png", data / "train" / "red" / "extra.png")
    with pytest.raises(UserInputError, match=r"--resume: .* has changed since the training began \(2 classes, 66 \+ 16 "
                                             r"images then, 2 classes, 67 \+ 16 images now\)"):
        train(tmp_path / "r", resume=True, progress=False)
    (data / "train" / "red" / "extra.png").unlink()
    assert train(tmp_path / "r", resume=True, progress=False)["status"] == "ok"  # the same data again: it resumes


def test_a_full_disk_while_an_epoch_is_saved_fails_the_stage_and_keeps_the_epoch_before_whole(colours, tmp_path,
                                                                                               monkeypatch):
    """No space for last.pt: checkpoint.pt already held the new epoch while last.pt and history.json held the one
    before, and the stage stayed "running" after the process ended. The error names last.pt (a full disk's error
    carries no file name, and history.json's, written beside it, was given to it)."""
    import errno

    real, epochs = Path.write_bytes, []

    def write_bytes(self, data):
        if ".last.pt." in self.name:  # the temp file of last.pt, written after the checkpoint's
            epochs.append(len(epochs) + 1)
            if len(epochs) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")  # as a write() says it: no file name
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=2, batch_size=16, lr=1e-3)
    with pytest.raises(StageFailed, match=r"^training failed in epoch 2 \(\S*/r/last\.pt: No space left on device\); "
                                          r"epoch 1 is kept in"):
        train(tmp_path / "r", cfg, progress=False)
    monkeypatch.undo()
    t = Run.open(tmp_path / "r").read()["stages"]["train"]
    assert t["status"] == "failed" and "No space left" in t["error"] and t["sessions"][-1]["epochs"] == [1, 1]
    epochs = {torch.load(tmp_path / "r" / n, weights_only=True)["epoch"] for n in ("checkpoint.pt", "last.pt")}
    assert epochs == {1} and len(json.loads((tmp_path / "r" / "history.json").read_text())) == 1
    assert not [p for p in (tmp_path / "r").glob(".*") if p.name != ".cnnpack.lock"], "a temp file was left"


def test_a_replacement_that_fails_or_is_interrupted_before_its_first_epoch_puts_the_old_run_back(colours, tmp_path,
                                                                                               monkeypatch):
    """`train --force` (and a pipeline whose training options changed) deleted the run it replaced first: a Ctrl-C or
    a failure in the new training's first epoch lost the old checkpoint, its exports and its report for good."""
    from dataclasses import replace

    import cnnpack.train as train_mod

    run = tmp_path / "r"
    cfg = TrainConfig(data=str(colours), image_size=16, epochs=1, batch_size=16)
    train(run, cfg, progress=False)
    (run / "export").mkdir()
    (run / "export" / "model.onnx").write_bytes(b"a later stage's output")
    (run / "report.md").write_text("# the old run's report\n")
    (run / "notes.txt").write_text("a user's own file: never moved\n")

    def files() -> dict[str, bytes]:
        return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
                if p.is_file() and p.name != ".cnnpack.lock"}

    before = files()
    for exc, error, says in ((KeyboardInterrupt(), Interrupted, "interrupted during epoch 1, before any epoch finished"),
                             (RuntimeError("out of memory"), StageFailed, r"training failed in epoch 1 \(RuntimeError: "
                                                                          r"out of memory\)")):
        monkeypatch.setattr(train_mod, "_train_one_epoch", lambda *a, e=exc, **k: (_ for _ in ()).throw(e))
        with pytest.raises(error, match=says + f"; the run it was replacing in {run} is back as it was$"):
            train(run, replace(cfg, epochs=2), force=True, progress=False)
        assert files() == before and not list(run.glob(".replaced-*"))
        assert Run.open(run).read()["stages"]["train"]["status"] == "ok"
    monkeypatch.undo()
    seen = []
    train(run, replace(cfg, epochs=2), force=True, progress=False,
          on_epoch_end=lambda epoch, _: seen.append((epoch, (run / "export").exists(), (run / "report.md").exists(),
                                                     [p.name for p in run.glob(".replaced-*")])))
    assert seen == [(1, False, False, []), (2, False, False, [])]  # the new run kept an epoch: the old one is gone
    assert (run / "notes.txt").is_file() and Run.open(run).read()["stages"]["train"]["config"]["epochs"] == 2


def test_an_error_nobody_foresaw_in_an_epoch_leaves_the_run_failed_not_running(tiny_data, tmp_path):
    """Only RuntimeError, ValueError and OSError were recorded: another (a label out of range's IndexError) left the
    manifest saying "running" for good."""
    def broken(epoch, _):
        raise LookupError("a bug's error")

    cfg = TrainConfig(data=str(tiny_data), image_size=32, epochs=2, batch_size=16)
    with pytest.raises(LookupError):
        train(tmp_path / "r", cfg, progress=False, on_epoch_end=broken)
    section = Run.open(tmp_path / "r").read()["stages"]["train"]
    assert section["status"] == "failed" and section["error"] == "LookupError: a bug's error"


def test_each_epoch_s_progress_line_is_whole_in_a_log(capsys):
    """`cnnpack train > log`: rich took the file for 80 columns and cut each epoch's line to "57…" and "0:…"."""
    from cnnpack.train import _progress

    with _progress(True) as bar:
        task = bar.add_task("epoch 1/1", total=57, loss="-", acc="-", ips="", val="")
        bar.update(task, advance=57, loss="2.003", acc="17.1%", ips="2,120 img/s", val="  val loss 1.987 acc 15.67%")
    line = capsys.readouterr().out.strip()
    assert "…" not in line and "57/57" in line and line.endswith("0:00:00"), line
