"""torchrun + DDP on the CPU (gloo): 2 processes train a complete run, close to a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """Two colour classes with noise: learnable in a few epochs, so accuracies are comparable."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 32)):
        for cls, rgb in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(rgb, 50, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


def _train(args: list[str], run: Path, launcher: list[str]) -> dict:
    cmd = launcher + ["train", "--data", args[0], "--image-size", "32", "--epochs", "3", "--batch-size", "16",
                      "--no-progress", "--run-dir", str(run)]
    env = {**os.environ, "CNNPACK_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((run / "cnnpack.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(colour_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "cnnpack"]
    ddp = _train([str(colour_data)], tmp_path / "ddp", torchrun)
    single = _train([str(colour_data)], tmp_path / "single", [sys.executable, "-m", "cnnpack"])
    t = ddp["stages"]["train"]
    assert t["status"] == "ok" and t["metrics"]["epochs"] == 3
    assert t["distributed"] == {"world_size": 2, "backend": "gloo"}
    for f in ("checkpoint.pt", "last.pt", "history.json", "curves.png", "confusion.png", "samples.png"):
        assert (tmp_path / "ddp" / f).is_file(), f
    assert not list((tmp_path / "ddp").glob(".*.tmp")), "a rank left a temp file behind"
    acc_ddp, acc_single = t["metrics"]["best_val_acc"], single["stages"]["train"]["metrics"]["best_val_acc"]
    assert acc_ddp >= 0.9 and abs(acc_ddp - acc_single) <= 0.05, (acc_ddp, acc_single)
    # each rank saw half of every epoch: the training steps per epoch halve
    assert ddp["stages"]["train"]["steps_per_epoch"] * 2 == single["stages"]["train"]["steps_per_epoch"]


def test_resume_of_a_torchrun_run_in_one_process(colour_data, tmp_path):
    """Interrupted after epoch 1, resumed: the run completes (also the path a torchrun run resumes by)."""
    from cnnpack.train import Interrupted, TrainConfig, train

    run = tmp_path / "r"
    cfg = TrainConfig(data=str(colour_data), image_size=32, epochs=2, batch_size=16)

    def stop(epoch, _):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(run, cfg, progress=False, on_epoch_end=stop)
    section = train(run, cfg, resume=True, progress=False)
    assert section["status"] == "ok" and section["metrics"]["epochs"] == 2


class _HalfShard:
    """A Context stand-in for rank 0 of 2 without a process group: half of each epoch, no reduction."""

    rank, world_size, backend = 0, 2, "gloo"

    def shard(self, n: int, *, epoch: int = 0, seed: int = 0):
        import torch

        return torch.arange(n)[::2]

    def wrap(self, model):
        return model

    def reduce_stats(self, stats: dict) -> dict:
        return stats

    def started(self, *, failed: bool = False) -> None:
        pass

    def same_model(self, model) -> None:
        pass

    def from_main(self, stats: dict) -> dict:
        return stats


def test_processes_left_one_training_image_each_are_refused_before_training(colour_data, tmp_path):
    """4 images over 2 processes... each of 200 ranks got one: batches of one never train (BatchNorm), so no
    optimizer step ran, and the run was recorded ok with a training loss of 0."""
    from cnnpack.errors import UserInputError
    from cnnpack.train import TrainConfig, train

    class Crowd(_HalfShard):
        world_size = 200  # 192 training images: one each

        def shard(self, n: int, *, epoch: int = 0, seed: int = 0):
            import torch

            return torch.arange(n)[:1]

    with pytest.raises(UserInputError, match=r"^192 training images over 200 processes leave each 1 per epoch, and a "
                                             r"batch of 1 image cannot train; use fewer processes or more images$"):
        train(tmp_path / "r", TrainConfig(data=str(colour_data), image_size=32, epochs=1), progress=False,
              dist=Crowd())
    assert not (tmp_path / "r").exists()


def test_a_torchrun_run_resumes_in_one_process(colour_data, tmp_path):
    """Resumed with another number of processes, the epochs have other step counts: the LR schedule is
    re-divided (it used to raise "Tried to step 33 times. The specified number of total steps is 32")."""
    from cnnpack.train import Interrupted, TrainConfig, train

    run = tmp_path / "r"
    cfg = TrainConfig(data=str(colour_data), image_size=32, epochs=3, batch_size=16)

    def stop(epoch, _):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(run, cfg, progress=False, on_epoch_end=stop, dist=_HalfShard())
    section = train(run, cfg, resume=True, progress=False)
    assert section["status"] == "ok" and section["metrics"]["epochs"] == 3
    assert section["steps_per_epoch"] == 12  # 192 images / 16, in one process
    # the record keeps how each part ran (it said nothing of the 2 processes of epoch 1)
    assert [(x["epochs"], x["processes"], x["steps_per_epoch"]) for x in section["sessions"]] == [
        ([1, 1], 2, 6), ([2, 3], 1, 12)]
    assert section["distributed"] == {"world_size": 2, "backend": "gloo"}


BAD_LAUNCHES = {  # environment -> (exit code, what the error line says)
    "peer-never-comes": ({"RANK": "0", "MASTER_PORT": "free"}, 1, "Timed out after"),
    "master-unreachable": ({"RANK": "1", "MASTER_PORT": "free"}, 1, "timed out"),
    "not-torchrun": ({"RANK": None, "MASTER_ADDR": None, "MASTER_PORT": None}, 2,
                     "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set; start multi-process training with `torchrun"),
    "bad-timeout": ({"RANK": "0", "MASTER_PORT": "free", "CNNPACK_DIST_TIMEOUT_S": "soon"}, 2,
                    "CNNPACK_DIST_TIMEOUT_S='soon' is not a number of seconds > 0"),
    "bad-port": ({"RANK": "0", "MASTER_PORT": "abc"}, 2, "MASTER_PORT='abc' is not a port number (1-65535)"),
    "rank-past-world": ({"RANK": "5", "MASTER_PORT": "free"}, 2, "RANK=5 with WORLD_SIZE=2: a rank is from 0 to 1"),
    "no-world": ({"WORLD_SIZE": "0", "RANK": "0", "MASTER_PORT": "free"}, 2, "WORLD_SIZE=0: the number of processes"),
}


@pytest.fixture(scope="module")
def bad_launches(colour_data, tmp_path_factory) -> dict:
    """Each launch in its own process, all at once; a 3 s timeout, so a hang shows as subprocess timeout."""
    tmp = tmp_path_factory.mktemp("bad-dist")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", CNNPACK_DIST_TIMEOUT_S="3", OMP_NUM_THREADS="1")
    from cnnpack.ports import free_ports

    ports = iter(free_ports("127.0.0.1", len(BAD_LAUNCHES)))  # distinct: two cases on one port formed a world of 2
    procs = {}
    for case, (env, _, _) in BAD_LAUNCHES.items():
        env = {**base, **{k: (str(next(ports)) if v == "free" else v) for k, v in env.items()}}
        env = {k: v for k, v in env.items() if v is not None}
        cmd = [sys.executable, "-m", "cnnpack", "train", "--data", str(colour_data), "--image-size", "32",
               "--epochs", "1", "--no-progress", "--run", str(tmp / case)]
        procs[case] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out = _ended(procs, timeout=120)
    out["_tmp"] = tmp
    return out


def _ended(procs: dict, *, timeout: float) -> dict:
    """Each process's CompletedProcess, once all have ended."""
    out = {}
    for key, p in procs.items():
        stdout, stderr = p.communicate(timeout=timeout)
        out[key] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_LAUNCHES)
def test_bad_distributed_launch_is_one_error_line(bad_launches, case):
    """A missing or unreachable peer ends in CNNPACK_DIST_TIMEOUT_S with one line (no C++ stack), not a hang."""
    out, (_, code, message) = bad_launches[case], BAD_LAUNCHES[case]
    assert out.returncode == code, out.stderr[-2000:]
    assert [line for line in out.stderr.splitlines() if line.strip()] == [out.stderr.strip()], out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert not (bad_launches["_tmp"] / case).exists(), "a failed start wrote a run directory"


@pytest.fixture(scope="module")
def one_rank_stops(colour_data, tmp_path_factory) -> dict:
    """Two trainings of two ranks started by hand, each with one rank whose start fails: in `refused`, rank 0 alone
    judges the run folder (not empty, not a run) and refuses it; in `no-data`, rank 1's data folder is missing
    while rank 0 creates a new run."""
    tmp = tmp_path_factory.mktemp("one-rank")
    (tmp / "refused").mkdir()
    (tmp / "refused" / "notes.txt").write_text("mine\n")
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_PORT")}
    base.update(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", CNNPACK_DIST_TIMEOUT_S="60", OMP_NUM_THREADS="1")
    from cnnpack.ports import free_ports

    ports = iter(free_ports("127.0.0.1", 2))
    procs = {}
    for case in ("refused", "no-data"):
        port = str(next(ports))
        for rank in (0, 1):
            data = tmp / "nowhere" if (case, rank) == ("no-data", 1) else colour_data
            cmd = [sys.executable, "-m", "cnnpack", "train", "--data", str(data), "--image-size", "32", "--epochs", "1",
                   "--no-progress", "--run", str(tmp / case)]
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_PORT": port}
            procs[case, rank] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                 env=env)
    out = _ended(procs, timeout=180)
    out["_tmp"] = tmp
    return out


@pytest.mark.slow
def test_a_refusal_of_one_rank_stops_every_rank_with_one_line(one_rank_stops):
    """Rank 0 alone judges the run folder: its refusal left rank 1 a 54-line traceback from DDP's first broadcast."""
    for rank, code, said in ((0, 2, "is not empty and not a cnnpack run; choose another --run"),
                             (1, 1, "rank 0 of this training stopped before the training began (its error says why); "
                                    "rank 1 of 2 stops too")):
        out = one_rank_stops["refused", rank]
        assert out.returncode == code, out.stderr[-2000:]
        assert [ln for ln in out.stderr.splitlines() if ln.strip()] == [out.stderr.strip()], out.stderr[-2000:]
        assert out.stderr.startswith("error: ") and said in out.stderr
    assert [p.name for p in (one_rank_stops["_tmp"] / "refused").iterdir()] == ["notes.txt"]


@pytest.mark.slow
def test_a_new_run_whose_peer_stops_at_its_start_is_recorded_failed(one_rank_stops):
    """A peer that stops before training (its data missing) left the run rank 0 had created "running" for good."""
    missing = one_rank_stops["no-data", 1]
    assert missing.returncode == 2 and "not found" in missing.stderr, missing.stderr[-2000:]
    main = one_rank_stops["no-data", 0]
    assert main.returncode == 1, main.stderr[-2000:]
    assert [ln for ln in main.stderr.splitlines() if ln.strip()] == [main.stderr.strip()], main.stderr[-2000:]
    assert "stopped before the training began" in main.stderr
    section = json.loads((one_rank_stops["_tmp"] / "no-data" / "cnnpack.json").read_text())["stages"]["train"]
    assert section["status"] == "failed" and "stopped before the training began" in section["error"]


def test_each_rank_draws_its_own_augmentation_and_rank_0_the_single_process_stream():
    from cnnpack.train import _epoch_rng

    draws = {rank: torch_rand(_epoch_rng(3, 2, rank)) for rank in (0, 1)}
    assert draws[0] != draws[1]
    assert draws[0] == torch_rand(_epoch_rng(3, 2))  # a single process's run is trained as before


def torch_rand(g) -> list[float]:
    import torch

    return torch.rand(4, generator=g).tolist()


_SAME_MODEL = """
import os, sys, torch
from cnnpack.distributed import context_from_env
ctx = context_from_env("cpu")
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
model[1].running_mean.fill_(float(ctx.rank + 1))  # as each rank's last batch left them
model[1].num_batches_tracked.fill_(10 + ctx.rank)
ctx.same_model(model)
stats = ctx.from_main({"val_acc": 0.5 + ctx.rank / 10, "val_loss": 1.0 + ctx.rank})
print(model[1].running_mean.tolist(), int(model[1].num_batches_tracked), stats["val_acc"], stats["val_loss"])
ctx.close()
"""


@pytest.mark.slow
def test_every_rank_validates_rank_0_s_model_and_decides_on_its_figures():
    """BatchNorm's running statistics differ per rank after an epoch's last step (DDP copies rank 0's at each forward's
    start): each rank validated its own, they disagreed on early stopping, one left and the other failed."""
    from cnnpack.ports import free_ports

    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports("127.0.0.1", 1)[0]),
           "CNNPACK_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", _SAME_MODEL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0] == "[1.0, 1.0, 1.0, 1.0] 10 0.5 1.0\n"


def test_a_peer_lost_mid_training_is_said_as_such_without_gloo_s_source_path():
    from cnnpack.distributed import peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by "
                        "peer [127.0.0.1]:33174. This is typically caused by a remote worker crashing. Check the logs "
                        "of the remote worker before reporting an error. GLHF! \U0001f3d6\ufe0f")
    assert peer_lost(gloo) == ("another process of this training stopped or was cut off (Connection closed by peer "
                               "[127.0.0.1]:33174); its own error says why, or it was killed")
    assert peer_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None
    assert peer_lost(ValueError("Connection closed by peer")) is None


_SLOW_START = """
import os, pathlib, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a suite started with & ignores SIGINT)
from cnnpack import distributed
real = distributed.Context.started
def started(self, *, failed=False):
    if not failed and self.rank == 1:
        time.sleep(float(os.environ["CNNPACK_TEST_DELAY"]))  # rank 0 waits in the exchange meanwhile
    elif not failed:
        pathlib.Path(os.environ["CNNPACK_TEST_MARK"]).touch()
    return real(self, failed=failed)
distributed.Context.started = started
from cnnpack.cli import main
sys.argv = ["cnnpack", *sys.argv[1:]]
main()
"""


@pytest.mark.slow
def test_a_ctrl_c_while_a_rank_waits_for_the_others_to_start_leaves_them_no_timeout_to_wait(colour_data, tmp_path):
    """A Ctrl-C to one rank in the start exchange was raised once it was done, and that rank then sent a failure
    flag the others (gone on into DDP's first broadcast) never took: they waited the whole timeout, then a traceback."""
    import signal
    import time

    from cnnpack.ports import free_ports

    mark = tmp_path / "rank0-waits"
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_ports("127.0.0.1", 1)[0]),
           "CNNPACK_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1", "CNNPACK_TEST_DELAY": "4",
           "CNNPACK_TEST_MARK": str(mark)}
    cmd = [sys.executable, "-c", _SLOW_START, "train", "--data", str(colour_data), "--image-size", "32", "--epochs",
           "1", "--no-progress", "--run", str(tmp_path / "run")]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    while not mark.exists() and time.monotonic() - t0 < 60:
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGINT)
    outs = [p.communicate(timeout=120) for p in procs]
    took = time.monotonic() - t0
    assert procs[0].returncode == 130 and "interrupted" in outs[0][1], outs[0][1][-2000:]
    err = outs[1][1]
    assert procs[1].returncode == 1 and [ln for ln in err.splitlines() if ln.strip()] == [err.strip()], err[-2000:]
    assert "another process of this training stopped" in err
    assert took < 45, f"rank 1 waited {took:.0f} s (the timeout is 60)"
    section = json.loads((tmp_path / "run" / "cnnpack.json").read_text())["stages"]["train"]
    assert section["status"] == "interrupted"


def test_each_epoch_validates_rank_0_s_model_and_takes_its_figures(colour_data, tmp_path):
    """The epoch loop's part of it (the collectives themselves: the test above): after the training step's figures
    are reduced, rank 0's buffers go to every rank before validation, and rank 0's figures after it."""
    from cnnpack.train import TrainConfig, train

    calls = []

    class Recording(_HalfShard):
        def reduce_stats(self, stats):
            calls.append("reduce")
            return stats

        def same_model(self, model):
            calls.append("same_model")

        def from_main(self, stats):
            calls.append(("from_main", "val_acc" in stats))
            return stats

    train(tmp_path / "r", TrainConfig(data=str(colour_data), image_size=32, epochs=2, batch_size=16), progress=False,
          dist=Recording())
    assert calls == ["reduce", "same_model", ("from_main", True)] * 2
