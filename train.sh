#!/usr/bin/env bash
# bash train.sh {vae|pretrain|finetune|cmr|seg} [--key=value ...]
# Runs tools/train.py under torchrun on every visible GPU (1 process on CPU).
# Installs what it needs on first run (scripts/env.sh).
set -euo pipefail
cd "$(dirname "$0")"
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
  echo "usage: bash train.sh {vae|pretrain|finetune|cmr|seg} [--key=value ...]" >&2; exit 2
fi
stage="$1"; shift
. scripts/env.sh
nproc="${NPROC:-$(python -c 'import torch;print(max(1, torch.cuda.device_count()))')}"
if [ "$nproc" -gt 1 ]; then
  exec torchrun --standalone --nproc_per_node="$nproc" tools/train.py --stage="$stage" "$@"
fi
exec python tools/train.py --stage="$stage" "$@"
