"""The one HDF5 writer every converter uses (docs/ARCHITECTURE.md §Data schema).

    with ClipWriter("data/phantom/train.h5", frames=16, size=256, labels=ECHO_LABELS,
                    source="phantom", force=False) as w:
        w.add(clip)          # one dict per clip, see ClipWriter.add
    # on leaving the block the temporary file is renamed to train.h5; on an exception it is deleted

Layout, N clips of F frames of H x W pixels:
    video, mask, sketch, mv   uint8 (N, F, H, W)
    mask_valid                bool (N, F)
    mv_points                 float32 (N, F, 2, 2)   two annulus points (x, y), NaN where undefined
    flow                      float16 (N, F, 2, H, W) frame f -> f+1 in pixels, last frame 0
    flow_true                 float16 (N, F, 2, H, W) optional (phantom): the simulated motion
    text, view, patient, meta str (N,)               meta is a JSON object per clip
Root attrs: schema (int), frames, size, labels (JSON {value: name}), source, count.

Chunks (docs/ARCHITECTURE.md §Data): per-frame arrays are chunked one FRAME per chunk, (1, 1, H, W) and (1, 1, 2, H, W), so that stage 1's random single-frame reads decompress
one frame, not sixteen; whole-clip reads cost F chunk look-ups, which is cheap.
Compression: shuffle + deflate level 1 (standard HDF5 filters, readable by every HDF5 tool).
Flow values are rounded to 1/64 px before storing (error <= 0.008 px, far below any flow
estimator's; it makes flow chunks ~5x smaller and 3x faster to compress).
The chunks can be compressed in worker processes (`encode(clip)`) and written as they are
(`write_direct_chunk`), so the single writing process is not the bottleneck of a conversion.
"""
from __future__ import annotations

import json
import os
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np

SCHEMA = 1
DEFLATE_LEVEL = 1
ECHO_LABELS = {0: "background", 1: "LV cavity", 2: "myocardium", 3: "LA"}
CMR_LABELS = {0: "background", 1: "LV", 2: "MYO", 3: "RV"}
FRAME_ARRAYS = ("video", "mask", "sketch", "mv")        # uint8 (N, F, H, W)
PER_FRAME = {"video": np.uint8, "mask": np.uint8, "sketch": np.uint8, "mv": np.uint8,
             "flow": np.float16, "flow_true": np.float16}   # one chunk per frame
FLOW_STEP = 1 / 64                                          # flow quantisation, pixels
STRING_ARRAYS = ("text", "view", "patient", "meta")


class DataPrepError(Exception):
    """Bad input for a converter: the message names the patient/file and what is wrong."""


def check_output(path, force: bool) -> Path:
    """Fail early (before any work) when `path` exists and --force was not given."""
    path = Path(path)
    if path.exists() and not force:
        raise DataPrepError(f"{path} already exists; pass --force to overwrite it")
    return path


class Encoded:
    """One clip's per-frame array as compressed HDF5 chunks: byte shuffle, then zlib (= the
    file's shuffle + deflate filter pipeline)."""

    def __init__(self, a: np.ndarray, dtype):
        if dtype == np.float16:
            a = np.round(np.asarray(a, np.float32) / FLOW_STEP) * FLOW_STEP
        a = np.ascontiguousarray(a, dtype=dtype)
        self.shape = a.shape
        s = a.dtype.itemsize
        self.chunks = [zlib.compress(f.view(np.uint8).reshape(-1, s).T.tobytes(), DEFLATE_LEVEL) for f in a]


def encode(clip: dict) -> dict:
    """Compress a clip's per-frame arrays (call it in worker processes); other keys unchanged."""
    out = dict(clip)
    for name, dtype in PER_FRAME.items():
        if name in clip and not isinstance(clip[name], Encoded):
            out[name] = Encoded(clip[name], dtype)
    return out


class ClipWriter:
    """Appends clips to a temporary HDF5 file, renamed to `path` by close() (atomic on POSIX)."""

    def __init__(self, path, *, frames: int, size: int, labels: dict, source: str,
                 force: bool = False, flow_true: bool = False):
        self.path = check_output(path, force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self.F, self.S = int(frames), int(size)
        self.n = 0
        self.f = h5py.File(self.tmp, "w")
        self.f.attrs.update(schema=SCHEMA, frames=self.F, size=self.S, source=source,
                            labels=json.dumps({str(k): v for k, v in labels.items()}))
        F, S = self.F, self.S
        for name in FRAME_ARRAYS:
            self._create(name, (F, S, S), np.uint8, (1, 1, S, S))
        self._create("flow", (F, 2, S, S), np.float16, (1, 1, 2, S, S))
        if flow_true:
            self._create("flow_true", (F, 2, S, S), np.float16, (1, 1, 2, S, S))
        self._create("mask_valid", (F,), bool, (256, F))
        self._create("mv_points", (F, 2, 2), np.float32, (256, F, 2, 2))
        for name in STRING_ARRAYS:
            self._create(name, (), h5py.string_dtype(), (256,))

    def _create(self, name, shape, dtype, chunks):
        big = name in PER_FRAME
        self.f.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dtype, chunks=chunks,
                              compression="gzip" if big else None,
                              compression_opts=DEFLATE_LEVEL if big else None, shuffle=big)

    def add(self, clip: dict) -> None:
        """clip: video/mask/sketch/mv uint8 (F, H, W); mask_valid bool (F,); mv_points (F, 2, 2);
        flow (F, 2, H, W); [flow_true]; text, view, patient str; meta dict (JSON-serialisable)."""
        i = self.n
        clip = encode(clip)
        for name, ds in self.f.items():
            ds.resize(i + 1, axis=0)
            if name == "meta":
                ds[i] = json.dumps(clip["meta"], sort_keys=True)
            elif name in STRING_ARRAYS:
                ds[i] = str(clip[name])
            elif name in PER_FRAME:
                enc = clip[name]
                if enc.shape != ds.shape[1:]:
                    raise ValueError(f"{name}: clip {clip.get('patient')} has shape {enc.shape}, "
                                     f"the file expects {ds.shape[1:]}")
                zeros = (0,) * (ds.ndim - 2)
                for f, chunk in enumerate(enc.chunks):
                    ds.id.write_direct_chunk((i, f, *zeros), chunk)
            else:
                a = np.asarray(clip[name])
                if a.shape != ds.shape[1:]:
                    raise ValueError(f"{name}: clip {clip.get('patient')} has shape {a.shape}, "
                                     f"the file expects {ds.shape[1:]}")
                ds[i] = a
        self.n += 1

    def close(self) -> Path:
        """Finish the file and move it into place; returns the final path."""
        self.f.attrs["count"] = self.n
        self.f.close()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


# ------------------------------------------------------------------- parallel conversion driver

def _guarded(args):
    fn, case = args
    try:
        return encode(fn(case)), None
    except DataPrepError as e:
        return None, str(e)
    except Exception as e:  # an unreadable file etc.: report it with the case, not a traceback
        return None, f"{case}: {type(e).__name__}: {e}"


def convert(splits: dict, make_clip, out_dir, *, frames: int, size: int, labels: dict, source: str,
            workers: int = 1, skip_bad: bool = False, force: bool = False, log=None):
    """Convert cases to OUT_DIR/<split>.h5, one file per split.

    splits: {split: [case, ...]}; make_clip(case) -> clip dict (see ClipWriter.add), raising
    DataPrepError with a message naming the patient and file. Cases are processed by `workers`
    processes, in order (output does not depend on the worker count). Without skip_bad the
    first bad case stops everything (no output is left behind); with it the case is skipped.
    Returns ({split: path}, [messages of skipped cases])."""
    from multiprocessing import Pool

    out_dir = Path(out_dir)
    for split in splits:
        check_output(out_dir / f"{split}.h5", force)
    skipped, paths = [], {}
    pool = Pool(workers) if workers > 1 else None
    try:
        for split, cases in splits.items():
            with ClipWriter(out_dir / f"{split}.h5", frames=frames, size=size, labels=labels,
                            source=source, force=force) as w:
                jobs = [(make_clip, c) for c in cases]
                it = pool.imap(_guarded, jobs, chunksize=1) if pool else map(_guarded, jobs)
                for i, (clip, err) in enumerate(it):
                    if err is not None:
                        if not skip_bad:
                            raise DataPrepError(err + " (use --skip-bad to skip such cases)")
                        skipped.append(err)
                        continue
                    w.add(clip)
                    if log and (i + 1) % 100 == 0:
                        log(f"  {split}: {i + 1}/{len(cases)}")
                if w.n == 0:
                    raise DataPrepError(f"no clip could be converted for split '{split}'")
            paths[split] = w.path
    except BaseException:
        if pool:
            pool.terminate()
        for p in paths.values():      # all or nothing: do not leave half a dataset behind
            p.unlink(missing_ok=True)
        raise
    finally:
        if pool:
            pool.close()
            pool.join()
    return paths, skipped


def add_cli_args(ap, what: str) -> None:
    """The options every converter shares (after its own --src / --csv)."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--split", choices=("official", "random"), default="official")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--skip-bad", action="store_true", help=f"skip unreadable/inconsistent {what}, list them at the end")
    ap.add_argument("--force", action="store_true", help="overwrite existing output files")


def run_cli(build) -> int:
    """The converters' command-line tail: build(log) -> (paths by split, skipped cases); prints what it
    wrote, what it skipped and the time; a DataPrepError becomes one `error:` line and exit code 1."""
    t0 = time.time()
    try:
        paths, skipped = build(lambda s: print(s, file=sys.stderr))
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for p in paths.values():
        print(f"wrote {p}")
    if skipped:
        print(f"skipped {len(skipped)} case(s):", file=sys.stderr)
        for s in skipped:
            print(f"  {s}", file=sys.stderr)
    print(f"done in {time.time() - t0:.1f} s", file=sys.stderr)
    return 0
