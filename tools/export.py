"""Export a synthetic dataset to nnU-Net v2, the CAMUS 2023 layout, or MP4 clips
(heartbeat/export.py, docs/ARCHITECTURE.md §Sampling).

    python tools/export.py --fake=samples.h5 --format=nnunet|camus|mp4 --out=DIR [--force]
        [--spacing=MM] [--view=4CH] [--name=HeartBeatSynthetic] [--fps=8]

nnunet: DIR/imagesTr, DIR/labelsTr (one 2-D case per annotated frame), DIR/dataset.json.
camus:  DIR/database_nifti/patientNNNN/..., DIR/database_split/ (python -m data_prep.camus --src=DIR).
mp4:    DIR/clip_NNNNN.mp4 (.avi where the mp4v codec is missing).
An existing non-empty DIR is replaced only with --force; a failure leaves nothing half-written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heartbeat.export import FORMATS, ExportError, export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fake", required=True, help="samples.h5 (or any file in the §Data schema)")
    p.add_argument("--format", required=True, help="|".join(FORMATS))
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--spacing", type=float, default=1.0,
                   help="pixel spacing in mm where the clip's meta has none (default 1.0)")
    p.add_argument("--view", default="4CH", help="camus: view of clips that record none")
    p.add_argument("--name", default="HeartBeatSynthetic", help="nnunet: dataset name and case prefix")
    p.add_argument("--fps", type=int, default=8, help="mp4: frames per second")
    a = p.parse_args(argv)
    try:
        if a.spacing <= 0:
            raise ExportError(f"--spacing={a.spacing}: a pixel spacing in mm, > 0")
        out, n = export(a.fake, a.out, a.format, force=a.force, spacing=a.spacing, view=a.view, name=a.name,
                        fps=a.fps)
    except ExportError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} {'cases' if a.format == 'nnunet' else 'clips'} ({a.format}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
