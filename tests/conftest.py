import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # pytest-xdist runs one worker per core

# Without CUDA the kernel tests run in Triton's CPU interpreter, which must be chosen before the first
# `import triton` in the process. Any test module may import Triton first (diffusers does, through
# tools/bench_e2e.py), so the choice is made here, before any test module is collected.
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
