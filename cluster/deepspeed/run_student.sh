#!/usr/bin/env bash
# The student stage on several nodes without Ray: the DeepSpeed launcher starts one rank
# per GPU on every host of the hostfile and each rank runs `kdcache train CONFIG`. The
# launcher sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; kdcache's
# trainer initialises the nccl process group from them.
#
#   bash cluster/deepspeed/run_student.sh train.yaml [key=value ...]
#
# Needs: the same kdcache environment on every host (same path), passwordless ssh from
# this node to the others, and a cache root every host can read (an s3:// URI, or a shared
# file system). The loader's order is a function of (seed, epoch), not of the world size,
# so 2 x 8 ranks see the same samples per epoch as 1 x 16. Environment: HOSTFILE
# (cluster/deepspeed/hostfile), MASTER_ADDR (first host), MASTER_PORT (29500).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ $# -lt 1 ]]; then
  echo "usage: $0 TRAIN_CONFIG [key=value ...]" >&2
  exit 2
fi
HOSTFILE=${HOSTFILE:-cluster/deepspeed/hostfile}
MASTER_ADDR=${MASTER_ADDR:-$(grep -v '^\s*#' "$HOSTFILE" | awk 'NF {print $1; exit}')}
MASTER_PORT=${MASTER_PORT:-29500}
DEEPSPEED=${DEEPSPEED:-.venv/bin/deepspeed}
exec "$DEEPSPEED" --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --no_local_rank --module kdcache.cli train "$@"
