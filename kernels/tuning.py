"""Opt-in autotuning of the attention kernels' launch configs on a GPU.

    HEARTBEAT_AUTOTUNE=1 python tools/sample.py ...      # or: python tools/bench.py --autotune
    cfg = choose("attention.fwd", key, candidates, lambda c: launch(c))
    print(report())                                        # what was chosen, per kernel and shape key

By default every launch uses the heuristic config of its kernel file (FWD_CONFIGS / BWD_CONFIGS in
kernels/_common.py), which was chosen without a GPU to time it on. With tuning on, the first call
of a kernel for a shape key times each candidate (triton.testing.do_bench: warm-up, then the
median of CUDA-event timings), keeps the fastest for the rest of the process and uses it from then
on; a candidate that fails to launch (too much shared memory on a smaller GPU) is skipped. The
first call per shape therefore costs a compile and a few runs per candidate: that is why it is off
by default. The candidates are the lists in kernels/_common.py (FWD_CANDIDATES, BWD_CANDIDATES,
used by the spatial and the dual cross-attention kernels, fp16/bf16 only; fp32 keeps the heuristic).
Every candidate is compiled offline for sm_90 and sm_80 in the tests (compile_variants), so one
that cannot compile fails CI rather than a user's first tuned run.

Re-running a kernel to time it is harmless: none of these kernels accumulate into their outputs
(no atomics), each launch overwrites what it writes.
"""
from __future__ import annotations

import os

_best: dict = {}
_times: dict = {}


ENABLED = os.environ.get("HEARTBEAT_AUTOTUNE", "0") not in ("", "0")   # read once, at import


def enabled() -> bool:
    return ENABLED


def pow2_bucket(n: int) -> int:
    """Shape keys round lengths up to a power of two, so nearby shapes share one measurement."""
    return 1 << max(0, int(n) - 1).bit_length()


def cuda_time_ms(fn) -> float:
    """Median milliseconds of fn: CUDA events through triton.testing.do_bench; without CUDA (the
    interpreter, e.g. `tools/bench.py --dry-run --autotune`) wall-clock over 3 runs, meaningless but
    exercising the same path."""
    import torch
    if not torch.cuda.is_available():
        import statistics
        import time
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=5, rep=20, return_mode="median"))


def choose(name: str, key: tuple, candidates, launch, timer=None):
    """The fastest of `candidates` for (name, key), measured once with `timer(lambda: launch(c))`
    (CUDA events by default) and remembered. Raises the first error when no candidate launches."""
    k = (name, key)
    if k in _best:
        return _best[k]
    timer = timer or cuda_time_ms
    times, first_error = {}, None
    for c in candidates:
        try:
            times[c] = timer(lambda: launch(c))
        except Exception as e:        # OutOfResources, a compile error on an older GPU, ...
            first_error = first_error or e
    if not times:
        raise first_error
    best = min(times, key=times.get)
    _best[k], _times[k] = best, times
    return best


def report() -> str:
    """One line per tuned (kernel, shape key): the chosen config and every candidate's time."""
    lines = []
    for (name, key), best in sorted(_best.items(), key=lambda kv: repr(kv[0])):
        times = "  ".join(f"{c}: {t:.3f} ms" for c, t in _times[(name, key)].items())
        lines.append(f"{name} {key}: {best}   [{times}]")
    return "\n".join(lines)


def reset() -> None:
    _best.clear()
    _times.clear()
