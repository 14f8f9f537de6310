"""Data pipeline speed: CAMUS-layout conversion and HDF5 loading (numbers for BENCHMARKS.md).

    python tools/bench_data.py convert [--patients 500] [--frames 20] [--height 600] [--width 440]
                                       [--release 2019] [--workers 2] [--size 256] [--keep DIR]
    python tools/bench_data.py load [--data FILE.h5] [--size 256] [--seconds 10] [--cache KEY]

convert: writes a fake CAMUS tree (tests/test_camus.py's writer, 2 views per patient, noisy frames
so compression, edges and flow do real work), then times `python -m data_prep.camus` on it
(clips/s, and the extrapolation to 1,000 clips).
load: reads items in random order in ONE process (= per DataLoader worker) for --seconds each:
FrameDataset (stage 1) and ClipDataset without and with flow (and through the encoder cache KEY,
as training reads them once it exists); prints items/s and MB/s of tensors.
Without --data it first writes a 256x256 phantom (24 clips) to a temporary folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _fake_writer():
    spec = importlib.util.spec_from_file_location("test_camus", ROOT / "tests" / "test_camus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.write_fake_camus


def convert(a) -> None:
    tmp = Path(a.keep or tempfile.mkdtemp(prefix="bench_camus_"))
    src, out = tmp / "src", tmp / "out"
    if not src.exists():
        t = time.time()
        _fake_writer()(src, a.release, patients=a.patients, frames=a.frames, height=a.height,
                       width=a.width, noise=60)
        print(f"wrote fake CAMUS {a.release} tree: {a.patients} patients x 2 views, ~{a.frames + 1} frames "
              f"of {a.height}x{a.width}, in {time.time() - t:.1f} s")
    cmd = [sys.executable, "-m", "data_prep.camus", "--src", str(src), "--out", str(out), "--size",
           str(a.size), "--workers", str(a.workers), "--split", "random", "--force"]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    dt = time.time() - t
    clips = 2 * a.patients
    mb = sum(p.stat().st_size for p in out.glob("*.h5")) / 1e6
    print(f"convert: {clips} clips in {dt:.1f} s = {clips / dt:.2f} clips/s with --workers {a.workers} "
          f"(-> {1000 / clips * dt / 60:.1f} min per 1,000 clips); output {mb:.0f} MB")
    if not a.keep:
        shutil.rmtree(tmp)


def _rate(ds, seconds, nbytes):
    import torch
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    n, t0 = 0, time.time()
    while time.time() - t0 < seconds:
        item = ds[order[n % len(order)]]
        n += 1
    dt = time.time() - t0
    size = sum(v.numel() * v.element_size() for v in item.values() if hasattr(v, "numel"))
    return n / dt, n / dt * size / 1e6 if nbytes else 0.0


def load(a) -> None:
    import torch
    from heartbeat.data import ClipDataset, FrameDataset
    NO_FLOW = ("text", "image", "sketch", "mask", "mv")
    torch.set_num_threads(1)
    tmp = None
    path = a.data
    if not path:
        from data_prep import phantom
        tmp = tempfile.mkdtemp(prefix="bench_load_")
        t = time.time()
        phantom.build(tmp, clips=24, frames=16, size=256, workers=min(2, os.cpu_count() or 1), progress=False)
        print(f"wrote a 256x256 phantom (24 clips) in {time.time() - t:.1f} s")
        path = os.path.join(tmp, "train.h5")
    size = a.size or None
    sets = [("FrameDataset (stage 1)", FrameDataset(path, size=size)),
            ("ClipDataset, no flow", ClipDataset(path, size=size, conditions=NO_FLOW)),
            ("ClipDataset, with flow", ClipDataset(path, size=size))]
    if a.cache:    # what training reads once the encoder cache exists: latents + prior tokens, no prior frame
        sets += [("FrameDataset, cached", FrameDataset(path, size=size, cache=a.cache)),
                 ("ClipDataset, cached", ClipDataset(path, size=size, conditions=NO_FLOW, cache=a.cache))]
    for name, ds in sets:
        r, mbs = _rate(ds, a.seconds, True)
        unit = "frames/s" if isinstance(ds, FrameDataset) else "clips/s"
        print(f"load {name:24s} at {ds.size}x{ds.size}: {r:8.1f} {unit} per worker ({mbs:.0f} MB/s of tensors)")
    if tmp:
        shutil.rmtree(tmp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--patients", type=int, default=500)
    c.add_argument("--frames", type=int, default=20)
    c.add_argument("--height", type=int, default=600)
    c.add_argument("--width", type=int, default=440)
    c.add_argument("--release", choices=("2019", "2023"), default="2019")
    c.add_argument("--workers", type=int, default=2)
    c.add_argument("--size", type=int, default=256)
    c.add_argument("--keep", help="work folder to keep (reuses a tree written there before)")
    ld = sub.add_parser("load")
    ld.add_argument("--data", help="an HDF5 split file (default: a fresh 256x256 phantom)")
    ld.add_argument("--size", type=int, default=0, help="resize on load (0 = as stored)")
    ld.add_argument("--seconds", type=float, default=10.0)
    ld.add_argument("--cache", default="", help="also time reads through this encoder cache key "
                    "(the KEY of <split>.cache-KEY.h5 beside --data)")
    a = ap.parse_args()
    convert(a) if a.cmd == "convert" else load(a)


if __name__ == "__main__":
    main()
