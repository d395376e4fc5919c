#!/bin/sh
# Run a SkyEye command that drives the Ray cluster at RAY_ADDRESS (the scheduler, the serving
# job) from its own container:
# - a Ray driver must run on a node of the cluster, so this container joins it first, as a
#   node with no CPUs (nothing is scheduled on it);
# - `skyeye serve` and the rollout flow check a deployment at 127.0.0.1:<port of
#   configs/serve.yaml>, where Ray Serve's proxy answers only on the head and on nodes with
#   replicas: that port is forwarded to the head's proxy.
# Usage: ray-node.sh COMMAND [ARGS...]
# Env: RAY_ADDRESS (host:port of the head's GCS); RAY_SERVE_HOST (default: the head's host);
#      SKYEYE_SERVE_PORT (default 8000, the port of configs/serve.yaml).
set -eu
: "${RAY_ADDRESS:?RAY_ADDRESS must name the head, e.g. ray-head:6379}"
serve_host="${RAY_SERVE_HOST:-${RAY_ADDRESS%:*}}"
serve_port="${SKYEYE_SERVE_PORT:-8000}"

ray start --address="$RAY_ADDRESS" --num-cpus=0 --disable-usage-stats
socat "TCP-LISTEN:${serve_port},bind=127.0.0.1,fork,reuseaddr" "TCP:${serve_host}:${serve_port}" &
exec "$@"
