"""Triton Python-backend model: encoded image bytes -> pixels for the cnnpack classifier.

Shipped as a package file and copied as is into `<name>_preprocess/<version>/model.py` by
`cnnpack triton --ensemble`; it depends on nothing from cnnpack (only numpy and Pillow), so it
runs in the NGC container as well as under the local `tritonserver`.

Input  `image`  TYPE_STRING [1]: the bytes of one PNG/JPEG/... file per batch row.
Output `pixels` [C, H, W] of the classifier's input dtype: RGB, resized the way cnnpack's data
loader does (shorter side to the model size, centre crop), raw 0-255 values, or mean/std
normalised when the classifier was exported with `--input normalized`.
The output dims in config.pbtxt are the single source of the model size.
"""

import io
import json
import re

import numpy as np
import triton_python_backend_utils as pb_utils
from PIL import Image, ImageOps

INPUT, OUTPUT = "image", "pixels"
THIN = 16  # as cnnpack.images: a very thin image has only the part kept resampled (resized whole: gigabytes)


def gray8(img):
    """16-bit, 32-bit and float grayscale as 8 bits (Pillow's convert() clips at 255: a 16-bit photo turned white,
    and a float one in 0-1 black): 16 bits scaled by 1/257; a 32-bit image holding 0-255 kept, more scaled as 16
    bits; a float image in 0-1 scaled by 255, else kept. As cnnpack.images does for training."""
    x = np.asarray(img, dtype=np.float64)
    top = float(x.max()) if x.size else 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and top > 255):
        x = x / 257.0
    elif img.mode == "F" and top <= 1.0:
        x = x * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def to_rgb(img):
    """Grayscale (8/16 bit), RGBA, palette and CMYK images become RGB (alpha over white), as in training."""
    if img.mode == "RGB" and "transparency" not in img.info:  # a tRNS colour key is transparency too
        return img
    if img.mode.startswith("I") or img.mode == "F":  # 16/32-bit integer and float grayscale (PNG, TIFF)
        key = img.info.get("transparency")  # a 16-bit PNG's tRNS key: matched on the 16-bit values, not the 8
        gray = Image.fromarray(gray8(img), "L")
        img = (Image.merge("LA", (gray, Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))))
               if isinstance(key, int) else gray)
    if img.mode == "P" or (img.mode in ("1", "L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", img.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.split()[-1])
        return bg
    return img.convert("RGB")


def resize_center_crop(img, height, width):
    """Scales the image so it covers (width, height), then crops the centre."""
    w, h = img.size
    if (w, h) == (width, height):
        return img
    scale = max(width / w, height / h)
    big_w, big_h = max(width, round(w * scale)), max(height, round(h * scale))
    left, top = (big_w - width) // 2, (big_h - height) // 2
    if big_w * big_h > THIN * width * height:
        sx, sy = w / big_w, h / big_h
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        return img.resize((width, height), Image.BILINEAR, box=box)
    return img.resize((big_w, big_h), Image.BILINEAR).crop((left, top, left + width, top + height))


def upright(img):
    """Turned as its EXIF orientation says; as it is where the EXIF block is damaged (as cnnpack.images does)."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - whatever a damaged EXIF block makes Pillow raise
        return img


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        out = pb_utils.get_output_config_by_name(config, OUTPUT)
        self.channels, self.height, self.width = (int(d) for d in out["dims"][-3:])
        self.dtype = pb_utils.triton_string_to_numpy(out["data_type"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.normalize = params.get("input_kind", "raw") == "normalized"
        # (C, 1, 1) so they broadcast over (N, C, H, W)
        self.mean = np.asarray(json.loads(params.get("mean", "[0, 0, 0]")), np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(json.loads(params.get("std", "[1, 1, 1]")), np.float32).reshape(-1, 1, 1)

    def decode(self, data):
        """One encoded image -> (C, H, W) float32 in 0-255 (or normalised)."""
        with Image.open(io.BytesIO(data)) as img:
            if img.format in ("JPEG", "MPO"):  # decoded at a reduced scale down to twice the output size, as cnnpack.images
                img.draft(img.mode, (2 * self.width, 2 * self.height))
            img.load()
            img = resize_center_crop(to_rgb(upright(img)), self.height, self.width)
            if self.channels == 1:
                img = img.convert("L")
        x = np.asarray(img, dtype=np.float32).reshape(self.height, self.width, self.channels).transpose(2, 0, 1)
        if self.normalize:
            x = (x / 255.0 - self.mean) / self.std
        return x

    def respond(self, request):
        """One request (a batch of encoded images, shape (b, 1)) -> one response."""
        blobs = pb_utils.get_input_tensor_by_name(request, INPUT).as_numpy().reshape(-1)
        try:
            pixels = np.stack([self.decode(bytes(b)) for b in blobs]).astype(self.dtype)
        except Exception as e:  # noqa: BLE001 - whatever a file makes Pillow raise, it fails this request alone
            why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the bytes sent", str(e))
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"cannot decode image: {type(e).__name__}: {why}"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(OUTPUT, pixels)])

    def execute(self, requests):
        # Dynamic batching hands several requests to one call; each gets its own response, so one
        # undecodable image fails only the request that sent it.
        return [self.respond(r) for r in requests]
