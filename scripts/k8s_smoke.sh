#!/usr/bin/env bash
# Smoke test of `cnnpack deploy` on your own kind or minikube cluster (the current kubectl context):
# deploy the run, build the repository image and load it into the cluster, apply the cpu overlay, wait
# for the rollout, classify an image through a port-forward, scale to 2 replicas, classify again.
#
#   scripts/k8s_smoke.sh runs/pipeline-shapes-cnn-64px [IMAGE_FILE]
#
# Needs: docker, kubectl, kind or minikube, curl, and cnnpack (with the run's data for the default image);
# a cluster with room for two pods of the size deploy/README.md states (CPU and memory requests).
# It was not run where cnnpack is developed: that machine has no container runtime and no cluster; the
# manifests are checked there without one (tests/test_deploy.py).
set -euo pipefail

RUN=${1:?usage: $0 RUN_DIR [IMAGE_FILE]}
FILE=${2:-}
OUT="$RUN/deploy"
LOCAL_HTTP=${LOCAL_HTTP:-18000}

cnnpack deploy --run "$RUN" --out "$OUT" --gpu no
field() { python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$OUT/cnnpack-deploy.json" "$1"; }
NAME=$(field name)
IMAGE=$(field repository_image)
REPO=$(field repository)
MODEL=$(field served_model)

docker build -f "$OUT/image/Dockerfile" -t "$IMAGE" "$REPO"
context=$(kubectl config current-context)
case "$context" in
  kind-*) kind load docker-image "$IMAGE" --name "${context#kind-}" ;;
  minikube*) minikube image load "$IMAGE" ;;
  *) echo "current context $context is neither kind nor minikube: push $IMAGE to a registry it pulls from" >&2; exit 2 ;;
esac

kubectl apply -k "$OUT/kubernetes/overlays/cpu"
kubectl rollout status "deployment/$NAME" --timeout=10m

if [ -z "$FILE" ]; then  # a validation image of the run's own data
  FILE=$(python3 - "$RUN" <<'EOF'
import sys
from cnnpack.rundir import Run
from cnnpack.served import pick_images
files = pick_images(Run.open(sys.argv[1]), 1)[2]
print(files[0] if files else "")
EOF
)
  [ -n "$FILE" ] || { echo "the run's data are not image files: pass IMAGE_FILE" >&2; exit 2; }
fi

kubectl port-forward "service/$NAME" "$LOCAL_HTTP:8000" >/dev/null &
FORWARD=$!
trap 'kill $FORWARD 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -fsS "localhost:$LOCAL_HTTP/v2/health/ready" && break; sleep 1; done

classify() { cnnpack infer "$FILE" --model "$MODEL" --url "localhost:$LOCAL_HTTP"; }
classify

# the HPA owns the replica count: raise its minimum (a plain `kubectl scale` would be undone by it)
kubectl patch "hpa/$NAME" --type merge -p '{"spec":{"minReplicas":2}}'
kubectl wait "deployment/$NAME" --for=jsonpath='{.status.readyReplicas}'=2 --timeout=10m
kubectl get pods -l "app.kubernetes.io/name=$NAME" -o wide
classify

echo "smoke test passed; remove it with: kubectl delete -k $OUT/kubernetes/overlays/cpu"
