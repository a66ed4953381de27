"""The runtime of a served model (`triton`): what verify and bench see of a Triton server, beside the runtimes
of local files (`cnnpack.runtimes`, which registers it with them).

    rt = RUNTIMES.get("triton").load(served_ref(run, "127.0.0.1:8000", "cnn_onnx"))  # served_ref: in runtimes
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from cnnpack.errors import UserInputError

if TYPE_CHECKING:
    from cnnpack.artifacts import ArtifactRef


class TritonRuntime:
    """A model served by Triton, through tritonclient (HTTP or gRPC): what verify and bench see of a server.

    There is no file: the ArtifactRef's record names the server (`url`, `protocol`, `timeout_s`) and
    the `model`; its format key is `triton:<model>`. Everything else (input name, size, dtype, batch
    limits) comes from the server's own model config. An unreachable server is a usage error.
    """

    name = "triton"
    format = "triton"

    def __init__(self, client, model, fmt: str) -> None:
        self.client, self.model, self.format = client, model, fmt
        self.info = {"url": client.url, "protocol": client.protocol, **model.describe()}

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", **_: object) -> TritonRuntime:
        from cnnpack.client import DEFAULT_TIMEOUT_S, Client

        rec = artifact.record
        if not rec.get("model"):
            raise UserInputError("the triton runtime needs the served model's name (--model NAME)")
        client = Client(rec.get("url"), rec.get("protocol", "http"), timeout_s=rec.get("timeout_s", DEFAULT_TIMEOUT_S),
                        url_flag="--triton-url").check_ready()
        model = client.model(rec["model"])
        if model.takes_images:
            from cnnpack.triton_config import PREPROCESS, classifier_of

            classifier = classifier_of(model.name)
            what = ("is the image ensemble's preprocessing step, not a classifier" if model.name.endswith(PREPROCESS)
                    else "takes encoded image bytes (an ensemble)")
            raise UserInputError(f"{model.name} {what}; verify and bench the classifier it wraps instead "
                                 f"(--model {classifier})")
        rt = cls(client, model, artifact.format)
        rt.info["versions"] = client.versions(model.name)
        if artifact.run is not None:
            rt.check_fits(artifact.run.model_spec)
            rt.check_version(artifact.run)
        return rt

    def check_version(self, run) -> None:
        """Refuses a server that answers for the run's model with an older version of its repository than the one
        `cnnpack triton` laid out (a server started before the new version was added): bench recorded that version's
        figures as the run's and verify failed on a bare parity error. A higher version, or one the repository never
        held, is another repository's: not refused here (verify's parity says whether it computes the same)."""
        from cnnpack.errors import shell

        stage = run.read().get("stages", {}).get("triton") or {}
        served = self.info["versions"]
        if stage.get("status") != "ok" or stage.get("name") != self.model.name or not served:
            return
        laid, now = stage.get("version"), served[-1]
        history = {str(v) for v in stage.get("versions") or [laid]}  # versions the run's repository held at layout
        if str(now).isdigit() and str(laid).isdigit() and int(now) < int(laid) and str(now) in history:
            raise UserInputError(
                f"Triton at {self.client.url} answers for {self.model.name} with version {served[-1]}, but the run's "
                f"model is version {stage.get('version')} of it (in {stage.get('repository')}): the server has not "
                f"loaded it; restart the server on that repository (`cnnpack serve --run {shell(run.path)}`), or "
                "name another --model")

    def check_fits(self, spec: dict) -> None:
        """Refuses a served model whose input or classes do not fit the run's model."""
        want = (spec.get("channels", 3), spec["image_size"], spec["image_size"])
        if tuple(self.model.input_shape) != want or self.model.num_classes != spec["num_classes"]:
            raise UserInputError(f"served model {self.model.name} at {self.client.url} takes {list(self.model.input_shape)} "
                                 f"-> {self.model.num_classes} classes, the run's model {list(want)} -> "
                                 f"{spec['num_classes']}: is it served from this run? (`cnnpack triton --run RUN`)")

    def check_batch(self, batch_size: int) -> None:
        m = self.model
        if m.static_batch and batch_size != m.static_batch:
            raise UserInputError(f"batch size {batch_size}: {m.name} is served with a static batch of "
                                 f"{m.static_batch}; use --batch-sizes {m.static_batch}")
        if m.max_batch_size and batch_size > m.max_batch_size:
            raise UserInputError(f"batch size {batch_size} exceeds {m.name}'s max_batch_size {m.max_batch_size} "
                                 f"on the server; use --batch-sizes <= {m.max_batch_size}")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Served logits (N, K) for raw pixels (N, C, H, W), in requests within the model's max batch."""
        step = self.model.max_batch_size or len(batch)
        out = [self.client.infer(self.model, batch[i:i + step]) for i in range(0, len(batch), step)]
        return np.concatenate(out).astype(np.float32, copy=False)
