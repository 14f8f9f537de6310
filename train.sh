#!/usr/bin/env bash
# bash train.sh {vae|pretrain|finetune|cmr|distill|seg} [--key=value ...]
# Runs tools/train.py on every visible GPU (1 process on CPU), across nodes when NNODES is set:
# tools/launch.py reads NPROC, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (or RDZV_ENDPOINT).
# Installs what it needs on first run (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash train.sh {vae|pretrain|finetune|cmr|distill|seg} [--key=value ...]" >&2; exit 2
fi
stage="$1"; shift
. scripts/env.sh
exec python tools/launch.py tools/train.py --stage="$stage" "$@"
