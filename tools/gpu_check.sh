#!/usr/bin/env bash
# One GPU window, one call:  bash tools/gpu_check.sh OUTDIR [--dry-run]
#
# On a bare GPU machine with torch and Triton (no xformers needed; used when importable), in order,
# each section under its own timeout so that one failure loses nothing else, one JSON per section
# in OUTDIR (plus SECTION.status.json: exit code and seconds), then OUTDIR/summary.txt (< 10 KB),
# which is printed last. Budget: under 8 minutes wall on an H200, JIT compiles included.
#   env      versions and the device                                         (tools/gpu_check.py env)
#   tests    the CUDA tests: every kernel, forward and backward, bf16/fp16/fp32, against float64 and SDPA
#   kernels  each kernel at the sd15 shapes against every SDPA backend that runs (+ xformers)
#   e2e      the sd15 video-UNet training step, triton vs sdpa, with/without gradient checkpointing
#   clip     a guided 16-frame clip: a student-shaped UNet (4 LCM steps) and the teacher (50 DDIM
#            steps), eager and from a CUDA graph; rows saved as they finish
# --dry-run: the structure only, without a GPU (the CPU test tests/test_gpu_check.py runs it).
# Uses the current python3 (the machine's own torch); set PYTHON to choose another.
set -u
out="${1:?usage: bash tools/gpu_check.sh OUTDIR [--dry-run]}"
dry="${2:-}"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$out/triton-cache}"
unset TRITON_INTERPRET HEARTBEAT_ATTN_BACKEND HEARTBEAT_AUTOTUNE

run() {  # run NAME TIMEOUT_S COMMAND...: records exit code and seconds in NAME.status.json
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  printf '{"rc": %d, "seconds": %d, "timeout_s": %d, "timed_out": %s}\n' "$rc" $((SECONDS - t0)) "$limit" \
    "$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo true || echo false)" > "$out/$name.status.json"
  echo "[gpu_check] $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s), log $out/$name.log"
  tail -n 3 "$out/$name.log"
}

run env 30 "$py" tools/gpu_check.py env "$out" $dry

if [ "$dry" = "--dry-run" ]; then
  echo '{"dry_run": true, "command": "pytest -n 8 tests/test_kernels_*.py -k \"not offline and not bench\""}' > "$out/tests.json"
else
  run tests 150 "$py" -m pytest -q -p no:cacheprovider -n 8 -k "not offline and not bench" \
    tests/test_kernels_spatial.py tests/test_kernels_temporal.py tests/test_kernels_dual_cross.py \
    tests/test_kernels_group_norm.py tests/test_kernels_dispatch.py
  "$py" - "$out" <<'EOF'
import json, re, sys
out = sys.argv[1]
log = open(f"{out}/tests.log").read()
counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", log.splitlines()[-1] if log else "")}
fails = re.findall(r"^FAILED (\S+)", log, re.M)[:20]
json.dump(dict(counts=counts, failed=fails, tail=log[-1500:]), open(f"{out}/tests.json", "w"), indent=1)
EOF
fi

run kernels 150 "$py" tools/gpu_check.py kernels "$out" $dry
run e2e 90 "$py" tools/gpu_check.py e2e "$out" $dry
run clip 50 "$py" tools/gpu_check.py clip "$out" $dry
echo "================ summary ($out/summary.txt)"
"$py" tools/gpu_check.py summary "$out"
