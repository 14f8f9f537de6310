# Source me: creates/uses the project virtual environment and installs what HeartBeat needs.
#   . scripts/env.sh
# - An existing torch (e.g. a CUDA build in a conda env, or the system's) is kept: the venv is
#   made with --system-site-packages, and torch is installed only when none can be imported.
# - Otherwise torch==2.13.0 is installed (a CPU build from local disk on the project's machines).
# - Triton is installed when missing (its interpreter runs the kernel tests on CPU).
# - requirements.txt is (re)installed only when it changed (hash stamp in the venv).
# Set HEARTBEAT_VENV to use another venv folder, or HEARTBEAT_NO_VENV=1 to use the current Python.
_hb_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_hb_venv="${HEARTBEAT_VENV:-$_hb_root/.venv}"
_hb_py="${PYTHON:-python3}"
set -e
if [ "${HEARTBEAT_NO_VENV:-0}" != "1" ]; then
  if [ ! -x "$_hb_venv/bin/python" ]; then
    echo "[heartbeat] creating virtual environment $_hb_venv"
    "$_hb_py" -m venv --system-site-packages "$_hb_venv"
  fi
  . "$_hb_venv/bin/activate"
fi
_hb_stamp="$(python -c 'import sys;print(sys.prefix)')/.heartbeat-installed"
_hb_want="$( (cat "$_hb_root/requirements.txt"; python --version) | sha256sum | cut -c1-16)"
if [ "$(cat "$_hb_stamp" 2>/dev/null)" != "$_hb_want" ]; then
  if ! python -c "import torch" 2>/dev/null; then
    echo "[heartbeat] installing torch==2.13.0"
    python -m pip install -q torch==2.13.0 2>&1 | grep -v "is ignored" || true
    python -c "import torch" || { echo "[heartbeat] torch could not be installed; install a torch build for your machine first (see README)"; exit 1; }
  fi
  if ! python -c "import triton" 2>/dev/null; then
    echo "[heartbeat] installing triton==3.6.0"
    python -m pip install -q triton==3.6.0 2>&1 | grep -v "is ignored" || true
  fi
  echo "[heartbeat] installing requirements.txt"
  python -m pip install -q -r "$_hb_root/requirements.txt" 2>&1 | grep -v "is ignored" || true
  python -c "import numpy, h5py, SimpleITK, cv2, safetensors, tqdm" || { echo "[heartbeat] requirements.txt did not install"; exit 1; }
  echo "$_hb_want" > "$_hb_stamp"
fi
set +e
export PYTHONPATH="$_hb_root${PYTHONPATH:+:$PYTHONPATH}"
unset _hb_root _hb_venv _hb_py _hb_stamp _hb_want
