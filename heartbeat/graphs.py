"""Faster fixed-shape model calls for sampling: torch.compile (opt-in) and CUDA graphs.

    fn = compiled(unet)                         # torch.compile(unet), made once per module and reused
    g = GraphedCall(lambda z, t: unet(z, t, **ctx), z, t)   # capture one call as a CUDA graph
    out = g(z_next, t_next)                     # copy into the static inputs, replay, a fresh output

A sampling loop calls the UNet with the same shapes at every step (docs/ARCHITECTURE.md §Sampling):
the latents and timesteps change, the conditioner's contexts do not. A CUDA graph records the
kernels of one such call once and replays them without Python or launch overhead (the PyTorch
"CUDA Graphs" notes: warm up on a side stream, capture, then copy new inputs into the captured
tensors). Caveats: inputs must keep their shape, dtype and device; tensors the callable closes over
(the contexts) must stay alive and unchanged; autocast's weight cache is off during capture, as
torch.cuda.graphs requires. Nothing here runs on the CPU: `GraphedCall` refuses a non-CUDA input.
"""
from __future__ import annotations

import weakref

import torch

_COMPILED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module):
    """torch.compile(module), built on first use and kept for the module's lifetime (compiling is
    slow: one per model, not one per batch). Parameter names are untouched (the module is wrapped,
    not replaced)."""
    fn = _COMPILED.get(module)
    if fn is None:
        fn = torch.compile(module)
        _COMPILED[module] = fn
    return fn


class GraphedCall:
    """fn(*inputs) -> tensor, captured as one CUDA graph at construction (inputs: CUDA tensors whose
    shapes every later call repeats). Calling copies the new inputs into the captured ones, replays,
    and returns a clone of the captured output."""

    def __init__(self, fn, *inputs: torch.Tensor, warmup: int = 2, autocast_dtype=torch.bfloat16):
        if not inputs or any(not torch.is_tensor(x) or x.device.type != "cuda" for x in inputs):
            raise ValueError("CUDA graphs need CUDA tensor inputs; run on a GPU or leave --cuda_graph off")
        self.static = [x.clone() for x in inputs]
        amp = dict(device_type="cuda", dtype=autocast_dtype, cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.autocast(**amp):
            for _ in range(warmup):                          # kernels chosen, workspaces allocated
                fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.autocast(**amp):
            self.out = fn(*self.static)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for s, x in zip(self.static, inputs):
            if s.shape != x.shape:
                raise ValueError(f"a CUDA graph replays one shape: captured {tuple(s.shape)}, got {tuple(x.shape)}")
            s.copy_(x)
        self.graph.replay()
        return self.out.clone()
