"""Does synthetic data train a better segmenter? Train the project's segmenter on real, synthetic,
real+synthetic and a fraction of real (+ synthetic), test each on the real test split
(heartbeat/utility.py, docs/METRICS.md §Utility).

    python tools/utility.py --real=DIR --fake=H5[,H5...] [--real_fraction=1.0,0.1] [--steps=300]
        [--seeds=3] [--size=64] [--batch=16] [--out=DIR] [--force] [--threads=N]

--real holds train.h5 and test.h5 (split by patient); every --fake needs masks. Writes
OUT/utility.md and OUT/utility.json (OUT defaults to the first fake file's folder + /utility).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heartbeat.utility import UtilityError, markdown, run, write  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--real", required=True, help="folder with train.h5 and test.h5")
    p.add_argument("--fake", required=True, help="comma-separated samples.h5 files")
    p.add_argument("--real_fraction", default="1.0,0.1", help="comma-separated fractions of real patients")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="")
    p.add_argument("--force", action="store_true", help="replace an existing report")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    fakes = [s.strip() for s in a.fake.split(",") if s.strip()]
    out = Path(a.out) if a.out else Path(fakes[0] if fakes else ".").resolve().parent / "utility"
    try:
        try:
            fractions = [float(x) for x in a.real_fraction.split(",") if x.strip()]
        except ValueError:
            raise UtilityError(f"--real_fraction={a.real_fraction}: comma-separated numbers in (0, 1]") from None
        if (out / "utility.json").exists() and not a.force:
            raise UtilityError(f"{out / 'utility.json'} exists; pass --force to replace it, or another --out")
        if a.threads > 0:
            import torch
            torch.set_num_threads(a.threads)
        rep = run(a.real, fakes, fractions, steps=a.steps, seeds=a.seeds, size=a.size, batch_size=a.batch)
    except UtilityError as e:
        print(f"utility: error: {e}", file=sys.stderr)
        return 2
    write(rep, out)
    print(markdown(rep), end="")
    print(f"wrote {out / 'utility.md'} and {out / 'utility.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
