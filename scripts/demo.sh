#!/usr/bin/env bash
# Set up (if needed) and run the main job: `kdcache demo fashion-mnist`, local Ray, local
# cache under runs/fashion-mnist. Extra arguments go to the job (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/kdcache demo fashion-mnist "$@"
