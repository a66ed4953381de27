#!/usr/bin/env bash
# Checks every GPU path of cnnpack on a machine with an NVIDIA GPU, in well under 8 minutes:
#   AMP + channels_last training (resnet18 @ 224), fp16 export, ONNX Runtime CUDA/TensorRT
#   parity and latency, a pt2 package compiled for CUDA (torch.export + AOTInductor, needs g++) in
#   the aoti runtime, KIND_GPU + TensorRT and KIND_GPU torch_aoti Triton configs; then one short table.
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

log "export fp32 and fp16 (all: pt2 too where a C++ compiler is found)"
cnnpack export --run "$OUT/r18" --format all --device cuda > /dev/null
cp -r "$OUT/r18" "$OUT/r18_fp16"
cnnpack export --run "$OUT/r18_fp16" --format all --device cuda --half > /dev/null

log "pt2 for CUDA: the package and its record (device, compile time, size against the weights)"
if ! python -c "import json, sys; sys.exit('pt2' not in json.load(open('$OUT/r18/cnnpack.json'))['stages']['export']['artifacts'])"; then
  cnnpack export --run "$OUT/r18" --format pt2 --device cuda > /dev/null || echo "pt2 export exit $?"
fi
python - "$OUT" <<'PY' | tee "$OUT/pt2.txt"
import json, sys
a = json.load(open(f"{sys.argv[1]}/r18/cnnpack.json"))["stages"]["export"]["artifacts"].get("pt2")
print("pt2:", "not exported" if a is None else
      f"device {a['device']}, torch {a['torch_version']}, compile {a['compile_s']} s, "
      f"{a['extra']['package_mb']:.1f} MB package for {a['extra']['weights_mb']:.1f} MB of weights")
PY

log "verify fp32 (CPU, CUDA, TensorRT providers) and fp16 (fp16 tolerances)"
cnnpack verify --run "$OUT/r18" --device cuda --json > "$OUT/verify_fp32.json" || echo "verify fp32 exit $?"
cnnpack verify --run "$OUT/r18_fp16" --device cuda --atol 5e-2 --rtol 5e-2 --min-agreement 0.995 --json \
  > "$OUT/verify_fp16.json" || echo "verify fp16 exit $?"

log "bench batch 1 and 32"
cnnpack bench --run "$OUT/r18" --device cuda --runtimes eager,compiled,aoti,torchscript,onnxruntime-cuda,onnxruntime-tensorrt \
  --batch-sizes 1,32 --max-seconds 8 --json > "$OUT/bench_fp32.json"
cnnpack bench --run "$OUT/r18_fp16" --device cuda --runtimes onnxruntime-tensorrt,onnxruntime-cuda \
  --batch-sizes 1,32 --max-seconds 8 --json > "$OUT/bench_fp16.json"

log "triton config: KIND_GPU + TensorRT fp16"
cnnpack triton --run "$OUT/r18_fp16" --repository "$OUT/model_repository" --device gpu --tensorrt-fp16 --json \
  > "$OUT/triton.json"
cp "$OUT/model_repository"/*/config.pbtxt "$OUT/config_gpu.pbtxt"
cnnpack triton --run "$OUT/r18" --format pt2 --repository "$OUT/model_repository_pt2" --device gpu --json \
  > "$OUT/triton_pt2.json" || echo "triton pt2 exit $?"
cp "$OUT/model_repository_pt2"/*/config.pbtxt "$OUT/config_gpu_pt2.pbtxt" 2>/dev/null || true

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
print(f"| {(out / 'pt2.txt').read_text().strip()} | |")
for tag in ("fp32", "fp16"):
    for r in load(f"bench_{tag}.json").get("results", []):
        print(f"| latency {tag} {r['runtime']} batch {r['batch_size']} | p50 {r['latency_ms_p50']:.3f} ms, "
              f"{r['throughput_ips']:,.0f} images/s |")
PY
log "done"
