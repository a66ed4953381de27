#!/usr/bin/env bash
# Checks cnnpack's GPU paths on a machine with an NVIDIA GPU, in about 6 minutes, and prints one short table:
#   training with AMP and channels_last (and without either, for the speed-up), torch.compile, fp32 and fp16
#   exports (ONNX, TorchScript, pt2 = torch.export + AOTInductor compiled for CUDA, needs g++), parity of each
#   on the GPU, CUDA bench rows, and KIND_GPU Triton configs.
#
# Runs cnnpack from this checkout (PYTHONPATH), on the python it is given, with nothing installed from the
# network: a machine that reaches nothing works. Packages that python lacks (tritonclient for the Triton
# configs, say) travel as wheels in .whl/ (or $WHEELS) and are unpacked with pip --no-index into a scratch folder.
# The wheels the H200's python 3.12 lacked (tritonclient, python-rapidjson; 1.9 MB), fetched on a machine with pip:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl tritonclient python-rapidjson
# ONNX Runtime's CUDA and TensorRT providers are checked only where the installed onnxruntime has them
# (onnxruntime-gpu); a CPU-only build leaves those rows as skipped, with the reason.
#
# Usage (from the repository root):  bash scripts/gpu_check.sh [OUT_DIR]
#   PYTHON=python3   the interpreter (default: python3)
#   DEVICE=cuda      cpu runs the same steps here, to try the script before spending GPU time on it
#   IMAGE_SIZE=224 EPOCHS=2 BATCH=256 MAX_SECONDS=5   smaller for that dry run
#   BUDGET=0         seconds for the whole script (0: none); near it, the remaining steps are cut or skipped
#                    (exit 124 in the table) so that the summary is still written
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-${OUT:-gpu_check_out}}" && cd "${1:-${OUT:-gpu_check_out}}" && pwd)
WORK=${WORK:-$(mktemp -d /tmp/cnnpack-gpu-check.XXXXXX)}; mkdir -p "$WORK"
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
IMAGE_SIZE=${IMAGE_SIZE:-224}
EPOCHS=${EPOCHS:-2}
BATCH=${BATCH:-256}
MAX_SECONDS=${MAX_SECONDS:-5}
BUDGET=${BUDGET:-0}
START=$(date +%s)
export CNNPACK_CACHE=$WORK/cache PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
WHEELS=${WHEELS:-$ROOT/.whl}
if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
: > "$OUT/steps.tsv"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/gpu_check.log"; }
# step NAME cnnpack ARGS...: runs one check (from this checkout), its output in $WORK/NAME.out; records exit status and seconds, goes on
step() {
  local name=$1 t0 rc left=0; shift
  [ "$1" = cnnpack ] && { shift; set -- "$PY" -m cnnpack "$@"; }
  if [ "$BUDGET" -gt 0 ]; then
    left=$(( BUDGET - ($(date +%s) - START) - 20 ))
    if [ "$left" -lt 15 ]; then
      log "$name: skipped, the budget is spent"; printf '%s\t124\t0\n' "$name" >> "$OUT/steps.tsv"; return
    fi
  fi
  log "$name"
  t0=$(date +%s%N)
  if [ "$left" -gt 0 ]; then
    timeout -k 10 "$left" "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; rc=$?
  else
    "$@" > "$WORK/$name.out" 2> "$WORK/$name.err"; rc=$?
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" $(( ($(date +%s%N) - t0) / 1000000 )) >> "$OUT/steps.tsv"
  if [ "$rc" != 0 ]; then echo "   exit $rc: $(grep -v '^\s*$' "$WORK/$name.err" | tail -3)" | tee -a "$OUT/gpu_check.log"; fi
}

log "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores, flags:" \
    "$(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_vnni|avx512_bf16|amx_.*)$' | xargs)"
  "$PY" - <<'PY'
import sys, numpy, torch, onnxruntime as ort
cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "numpy", numpy.__version__, "| torch", torch.__version__, "cuda",
      torch.version.cuda, "| device", torch.cuda.get_device_name(0) if cuda else "none",
      "| bf16", cuda and torch.cuda.is_bf16_supported())
print("onnxruntime", ort.__version__, ort.get_available_providers())
PY
} | tee "$OUT/machine.txt"

R=$WORK/r18
# the GPU paths first (AMP + channels_last training, fp32 exports, parity, bench with torch.compile),
# then fp16, Triton's GPU configs, and the comparisons
step train_amp cnnpack train --arch resnet18 --image-size "$IMAGE_SIZE" --epochs "$EPOCHS" --batch-size "$BATCH" \
  --device "$DEVICE" --amp --channels-last --run "$R" --force --no-progress --json
step export_fp32 cnnpack export --run "$R" --format onnx,torchscript,pt2 --device "$DEVICE" --json
rm -rf "$R"_fp16 && cp -r "$R" "$R"_fp16
step verify_fp32 cnnpack verify --run "$R" --device "$DEVICE" --batch-sizes 1,32 --no-progress --json
step bench_fp32 cnnpack bench --run "$R" --device "$DEVICE" --batch-sizes 1,32 --max-seconds "$MAX_SECONDS" \
  --no-plot --no-progress --json
step export_fp16 cnnpack export --run "$R"_fp16 --format onnx,torchscript,pt2 --device "$DEVICE" --half --json
step verify_fp16 cnnpack verify --run "$R"_fp16 --device "$DEVICE" --batch-sizes 1,32 --atol 5e-2 --rtol 5e-2 \
  --min-agreement 0.99 --no-progress --json
step triton_onnx_trt cnnpack triton --run "$R"_fp16 --repository "$WORK/repo" --device gpu --tensorrt-fp16 --json
step triton_pt2 cnnpack triton --run "$R" --format pt2 --repository "$WORK/repo" --device gpu --json
# the fp16 artifacts the export wrote (pt2 is refused where torch's loader fails), not the fp32 checkpoint again
fp16=$("$PY" -c "import json, sys; a = json.load(open(sys.argv[1]))['stages']['export']['artifacts']
print(','.join(f for f in ('pt2', 'torchscript', 'onnx') if a.get(f, {}).get('precision') == 'fp16'))" \
  "$R"_fp16/cnnpack.json 2>/dev/null)
if [ -n "$fp16" ]; then
  step bench_fp16 cnnpack bench --run "$R"_fp16 --device "$DEVICE" --artifacts "$fp16" \
    --batch-sizes 1,32 --max-seconds "$MAX_SECONDS" --no-plot --no-progress --json
else
  log "bench_fp16: skipped, no fp16 artifact was exported"; printf 'bench_fp16\t-\t0\n' >> "$OUT/steps.tsv"
fi
step train_fp32 cnnpack train --arch resnet18 --image-size "$IMAGE_SIZE" --epochs "$EPOCHS" --batch-size "$BATCH" \
  --device "$DEVICE" --no-amp --no-channels-last --run "$WORK/r18_plain" --force --no-progress --json
step train_cnn cnnpack train --device "$DEVICE" --run "$WORK/cnn" --force --no-progress --json
# the built-in cnn's global max pool: torch before 2.13 (this machine's 2.11) cannot take it to ONNX by itself
step export_cnn cnnpack export --run "$WORK/cnn" --format onnx --device "$DEVICE" --json
step verify_cnn cnnpack verify --run "$WORK/cnn" --formats onnx --device "$DEVICE" --no-progress --json

log "summary"
"$PY" - "$WORK" "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
rc = {n: None if c == "-" else int(c) for n, c, _ in steps}
secs = {n: int(s) / 1000 for n, _, s in steps}


def load(name):
    try:
        return json.loads((work / f"{name}.out").read_text()) if rc.get(name) == 0 else None
    except ValueError:
        return None


def last_epoch(run):  # steady state: the first epoch carries cuDNN's autotuning and the warm-up
    return json.loads((work / run / "history.json").read_text())[-1]["train_images_per_s"]


def training():
    amp, plain, cnn = load("train_amp"), load("train_fp32"), load("train_cnn")
    if amp:
        a = amp["metrics"]
        print(f"| train resnet18@{amp['config']['image_size']} on {amp['device']}, AMP + channels_last, "
              f"{a['epochs']} epochs | {a['train_images_per_s']:,.0f} images/s overall, {last_epoch('r18'):,.0f} in "
              f"the last epoch; top-1 {100 * a['best_val_acc']:.1f}% |")
    if amp and plain:
        p = plain["metrics"]
        print(f"| the same, fp32 and contiguous | {p['train_images_per_s']:,.0f} images/s overall, "
              f"{last_epoch('r18_plain'):,.0f} in the last epoch: AMP + channels_last "
              f"{last_epoch('r18') / last_epoch('r18_plain'):.2f}x there |")
    if cnn:
        print(f"| built-in cnn, default settings | top-1 {100 * cnn['metrics']['best_val_acc']:.2f}% after "
              f"{cnn['metrics']['epochs']} epochs, {cnn['metrics']['wall_s']:.0f} s |")


def exports_and_parity(tag):
    for fmt, a in (load(f"export_{tag}") or {}).get("artifacts", {}).items():
        extra = f", compiled for {a['device']} in {a['compile_s']} s" if a.get("compile_s") is not None else ""
        print(f"| export {tag} {fmt} | {a['precision']}, input {a['input']['dtype']}, {a['size_mb']:.1f} MB{extra} |")
    v = load(f"verify_{tag}") or {}
    for r in v.get("results", []):
        t, task = r.get("tensor") or {}, r.get("task") or {}
        err = t.get("max_abs_err")
        print(f"| parity {tag} {r['format']} in {r['runtime']} | {'pass' if r['passed'] else 'FAIL'} "
              f"({r['tolerance']['contract']} contract): max abs err {'-' if err is None else f'{err:.2e}'}, "
              f"top-1 agreement {100 * (task.get('top1_agreement') or 0):.2f}% |")
    for r in v.get("skipped", []):
        print(f"| parity {tag} {r['format']} in {r['runtime']} | skipped: {r['reason']} |")


def bench(tag):
    b = load(f"bench_{tag}") or {}
    for p, c in (b.get("ceilings") or {}).items():
        print(f"| ceiling {p} ({tag} bench) | {c['gflops']:,.0f} G(FL)OP/s on {c.get('matrix_engine')} ({c['best']}) |")
    for r in b.get("results", []):
        print(f"| bench {tag} {r['runtime']} {r.get('artifact', '')} batch {r['batch_size']} | p50 "
              f"{r['latency_ms_p50']:.3f} ms, {r['throughput_ips']:,.0f} images/s, {100 * r['matmul_share']:.0f}% of "
              f"its ceiling |")
    for name, why in b.get("skipped", {}).items():
        print(f"| bench {tag} {name} | skipped: {why} |")


def triton():
    for name in ("triton_onnx_trt", "triton_pt2"):
        t = load(name)
        if t:
            print(f"| {name} | {t['name']}: {t.get('platform') or t.get('backend')}, input {t['input']['dtype']} |")


print("| step | exit | s |\n|---|---|---|")
for n in rc:
    print(f"| {n} | {'skipped' if rc[n] is None else rc[n]} | {secs[n]:.0f} |")
print("\n| check | figure |\n|---|---|")
for section, args in ((training, ()), (exports_and_parity, ("fp32",)), (exports_and_parity, ("fp16",)),
                      (bench, ("fp32",)), (bench, ("fp16",)), (triton, ())):
    try:  # one section's surprise costs that section, not the table
        section(*args)
    except Exception as e:  # noqa: BLE001
        print(f"| {section.__name__}{args} | summary failed: {type(e).__name__}: {e} |")
PY
for f in "$WORK"/repo/*/config.pbtxt; do [ -f "$f" ] && { echo "# $f"; cat "$f"; }; done > "$OUT/configs.pbtxt" 2>/dev/null
tar -czf "$OUT/outputs.tar.gz" -C "$WORK" --exclude='*.onnx' --exclude='*.pt*' --exclude='*.data' --exclude='cache' \
  --exclude='*.bin' --exclude='repo' . 2>/dev/null
log "done: $OUT"
