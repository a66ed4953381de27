#!/usr/bin/env bash
# Checks every GPU path of cnnpack on a machine with an NVIDIA GPU, in well under 8 minutes:
#   AMP + channels_last training (resnet18 @ 224), fp16 export, ONNX Runtime CUDA/TensorRT
#   parity and latency, a KIND_GPU + TensorRT Triton config; then prints one short table.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]        (from the repository root, venv active)
set -euo pipefail
OUT=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT"
export CNNPACK_CACHE=${CNNPACK_CACHE:-$OUT/cache}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }

log "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python - <<'PY' | tee -a "$OUT/gpu.txt"
import torch, onnxruntime as ort
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0),
      "bf16", torch.cuda.is_bf16_supported())
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
# ONNX Runtime's TensorRT provider needs TensorRT 10 (libnvinfer.so.10) built for ORT's CUDA major
if ! python -c "import ctypes; ctypes.CDLL('libnvinfer.so.10')" 2>/dev/null; then
  cuda_major=$(python -c "import torch; print(torch.version.cuda.split('.')[0])")
  pip install -q "tensorrt-cu${cuda_major}-libs>=10.13,<11" 2>&1 | tail -1 || true
  trt_libs=$(python -c "import tensorrt_libs, os; print(os.path.dirname(tensorrt_libs.__file__))" 2>/dev/null || true)
  [ -n "$trt_libs" ] && export LD_LIBRARY_PATH="$trt_libs:${LD_LIBRARY_PATH:-}"
fi

log "train resnet18@224, AMP + channels_last (2 epochs)"
cnnpack train --arch resnet18 --image-size 224 --epochs 2 --batch-size 256 --device cuda \
  --run "$OUT/r18" --force --no-progress --json > "$OUT/train.json"

log "train the built-in cnn (default settings) on the GPU"
cnnpack train --device cuda --run "$OUT/cnn" --force --no-progress --json > "$OUT/train_cnn.json"

log "export fp32 and fp16"
cnnpack export --run "$OUT/r18" --format all --device cuda > /dev/null
cp -r "$OUT/r18" "$OUT/r18_fp16"
cnnpack export --run "$OUT/r18_fp16" --format all --device cuda --half > /dev/null

log "verify fp32 (CPU, CUDA, TensorRT providers) and fp16 (fp16 tolerances)"
cnnpack verify --run "$OUT/r18" --device cuda --json > "$OUT/verify_fp32.json" || echo "verify fp32 exit $?"
cnnpack verify --run "$OUT/r18_fp16" --device cuda --atol 5e-2 --rtol 5e-2 --min-agreement 0.995 --json \
  > "$OUT/verify_fp16.json" || echo "verify fp16 exit $?"

log "bench batch 1 and 32"
cnnpack bench --run "$OUT/r18" --device cuda --runtimes eager,compiled,torchscript,onnxruntime-cuda,onnxruntime-tensorrt \
  --batch-sizes 1,32 --max-seconds 8 --json > "$OUT/bench_fp32.json"
cnnpack bench --run "$OUT/r18_fp16" --device cuda --runtimes onnxruntime-tensorrt,onnxruntime-cuda \
  --batch-sizes 1,32 --max-seconds 8 --json > "$OUT/bench_fp16.json"

log "triton config: KIND_GPU + TensorRT fp16"
cnnpack triton --run "$OUT/r18_fp16" --repository "$OUT/model_repository" --device gpu --tensorrt-fp16 --json \
  > "$OUT/triton.json"
cp "$OUT/model_repository"/*/config.pbtxt "$OUT/config_gpu.pbtxt"

log "summary"
python - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    return json.loads((out / name).read_text())
t = load("train.json")["metrics"]
print(f"| check | figure |\n|---|---|")
print(f"| resnet18@224 training (AMP, channels_last) | {t['train_images_per_s']:,.0f} images/s |")
print(f"| built-in cnn on the GPU | top-1 {100 * load('train_cnn.json')['metrics']['best_val_acc']:.2f}% |")
for tag in ("fp32", "fp16"):
    v = load(f"verify_{tag}.json")
    for fmt, f in v.get("formats", {}).items():
        print(f"| parity {tag} {fmt} | max_abs_err {f.get('max_abs_err'):.2e}, top-1 agreement "
              f"{100 * f.get('top1_agreement', 0):.2f}% |")
for tag in ("fp32", "fp16"):
    for r in load(f"bench_{tag}.json").get("results", []):
        print(f"| latency {tag} {r['runtime']} batch {r['batch_size']} | p50 {r['latency_ms_p50']:.3f} ms, "
              f"{r['throughput_ips']:,.0f} images/s |")
PY
log "done"
