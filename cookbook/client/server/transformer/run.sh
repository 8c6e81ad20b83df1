#!/usr/bin/env bash
# Start a Ray head on this machine, then the Twinkle server on it (transformers backend).
#
# Worker machines join the cluster with:
#   ray start --address=<this-host>:6379
# and the server then places model workers on them (set ray.address: auto in server_config.yaml).
# On a cloud cluster:  ray up clusters/gpu.yaml, then
#   ray job submit --address http://<head>:8265 -- twinkle serve --config cookbook/client/server/transformer/server_config.yaml
set -euo pipefail
cd "$(dirname "$0")"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
RAY="${RAY:-ray}"
PYTHON="${PYTHON:-python}"

if ! "$RAY" status >/dev/null 2>&1; then
  "$RAY" start --head --port=6379 --include-dashboard=false
fi
exec "$PYTHON" server.py --state-dir "${STATE_DIR:-twinkle_state}" "$@"
