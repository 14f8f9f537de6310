"""Sample echo frames / clips / CMR volumes from a HeartBeat checkpoint into a synthetic dataset.

    torchrun --nproc_per_node=N tools/sample.py --ckpt=RUN_OR_FILE [--data=DIR --split=test] [--num=K]
        [--seed=S] [--steps=50] [--sampler=ddim|dpmpp2m|ddpm|lcm] [--eta=0] [--conditions=text,image,mask]
        [--guidance=3.0 | --guidance=mask=2,text=1] [--out=DIR] [--frames=F] [--batch=B] [--force]
        [--mask=DIR_OR_NPY] [--prior=PNG] [--prompt="..."] [--sketch=PNG] [--flow=NPY] [--gif=PATH]
        [--anatomy=model --ef=0.35|0.2:0.7 --view=4CH|2CH]
        [--filter_copies --segmenter=FILE [--copy_ref=DIR] [--copy_quantile=1]]
        [--compile] [--cuda_graph]
    A distilled student (bash train.sh distill) samples with --sampler=lcm --steps=1..4, one UNet
    call per step whatever the guidance (one scale or one per condition, within what it learned).
    (also `python tools/sample.py ...` on one process)

Under torchrun write --num_samples=K: torchrun's own parser (torch 2.13) rejects `--num` anywhere on
its command line as an ambiguous abbreviation of its --numa-binding / --numa_binding.

Conditions come from a dataset split (sample k is driven by clip k % N of DIR/SPLIT.h5) or from
files, which replace the clip's (then source_index = -1). --conditions picks any subset of those the
checkpoint was trained with (default: all it was trained with that the source provides); the rest
are dropped exactly as in training. --anatomy=model takes the text, mask and MV conditions from
the parametric heart model at the requested area EF instead (heartbeat/anatomy.py; the request is
stored in each sample's meta JSON as source.ef_requested). The MV skeleton of a --mask is derived as data_prep does.
Stage-1 checkpoints make F independent frames per sample (default 1; --frames F with a clip's
per-frame masks); stage-2 and cmr checkpoints make clips / volumes of F frames.

Sample k uses seed S + k and its own generator; samples are split across ranks (k = rank, rank +
world, ...), so the same seeds give the same samples on 1 or 8 GPUs. Writes OUT/samples.h5 (the
docs/ARCHITECTURE.md §Data schema: video, the conditioning maps given, mask_valid, text, view, patient, meta JSON;
plus source_index and conditions per sample, root attrs checkpoint/sampler/steps/guidance/seed),
OUT/sample_XXXXX.gif previews (generated | mask overlay | sketch | MV), OUT/grid.png and
OUT/sample_args.json. OUT defaults to RUN/samples. --filter_copies then drops the samples closer to
a real training clip than the copy threshold (heartbeat/privacy.py, docs/METRICS.md §Privacy) and
records them in samples.h5's `copy_filter` attribute and OUT/copies.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from heartbeat.config import CONDITIONS, Config, ConfigError  # noqa: E402
from heartbeat.diffusion import SAMPLERS, SPACINGS, make_timesteps  # noqa: E402
from heartbeat.guidance import GuidanceError, GuidanceSpec  # noqa: E402
from heartbeat import sampling as S  # noqa: E402
from heartbeat.preview import write_gif, write_previews  # noqa: E402
from heartbeat.distill import StudentError, check_request, student_scales  # noqa: E402
from heartbeat.stages import model_stage, sampling_stages  # noqa: E402

FILE_OPTIONS = {"mask": "mask", "prior": "image", "prompt": "text", "sketch": "sketch", "flow": "flow"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run folder (newest checkpoint) or ckpt-N.safetensors")
    p.add_argument("--data", default="", help="folder of <split>.h5 files whose clips drive the samples")
    p.add_argument("--split", default="test")
    p.add_argument("--num", "--num_samples", dest="num", type=int, default=0,
                   help="samples (default: clips in the split, or 1); under torchrun write --num_samples")
    p.add_argument("--seed", type=int, default=0, help="sample k uses seed + k")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim", choices=SAMPLERS)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--spacing", default="leading", choices=SPACINGS)
    p.add_argument("--conditions", default="",
                   help=f"comma-separated subset of {','.join(CONDITIONS)}, or none (unconditional)")
    p.add_argument("--guidance", default="3.0", help="one scale (3.0) or per condition (mask=2,text=1)")
    p.add_argument("--guidance_rescale", type=float, default=0.0)
    p.add_argument("--out", default="", help="output folder (default RUN/samples)")
    p.add_argument("--frames", type=int, default=0, help="frames per sample (stage 1: independent frames)")
    p.add_argument("--batch", type=int, default=4, help="samples per model call per rank")
    p.add_argument("--force", action="store_true", help="write into an existing output folder")
    p.add_argument("--mask", default="", help="label maps: folder of PNG/NPY, or one .npy (F, H, W)")
    p.add_argument("--prior", default="", help="image-prior frame (PNG)")
    p.add_argument("--prompt", default=None, help="text prompt")
    p.add_argument("--sketch", default="", help="sketch / edge map (PNG)")
    p.add_argument("--flow", default="", help="optical flow .npy (F, 2, H, W) in pixels")
    p.add_argument("--prior_frame", type=int, default=-1, help="clip frame used as image prior (-1: middle)")
    p.add_argument("--previews", type=int, default=4, help="samples previewed as GIF/MP4")
    p.add_argument("--gif", default="", help="also write sample 0 beside its conditions as this GIF (Pillow)")
    p.add_argument("--no_ema", action="store_true", help="raw weights instead of the EMA")
    p.add_argument("--save_latents", action="store_true", help="also store the sampled latents")
    p.add_argument("--compile", action="store_true", help="run the UNet through torch.compile (slow first batch)")
    p.add_argument("--cuda_graph", action="store_true", help="replay each step's UNet call from a CUDA graph (GPU)")
    p.add_argument("--device", default="", help="default: cuda:LOCAL_RANK if CUDA, else cpu")
    p.add_argument("--anatomy", default="", choices=("", "model"),
                   help="model: masks and MV from the parametric heart model (heartbeat/anatomy.py)")
    p.add_argument("--ef", default="", help="with --anatomy=model: area EF, 0.35 or a uniform range 0.2:0.7")
    p.add_argument("--view", default="4CH", help="with --anatomy=model: 2CH or 4CH")
    p.add_argument("--filter_copies", action="store_true",
                   help="drop samples that copy a training patient (heartbeat/privacy.py); needs --segmenter")
    p.add_argument("--copy_ref", default="", help="real folder (train.h5, test.h5) for --filter_copies "
                   "(default: --data)")
    p.add_argument("--segmenter", default="", help="segmenter .safetensors whose encoder is the copy check's features")
    p.add_argument("--copy_quantile", type=float, default=1.0,
                   help="threshold: this percentile of real test-to-train distances")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------ validation

def read_checkpoint_config(ckpt: str):
    """(weights path, meta, Config) from the safetensors metadata alone (no tensors read)."""
    from heartbeat.checkpoint import CheckpointError, find_weights, read_meta, FORMAT
    try:
        path = find_weights(ckpt)
        meta = read_meta(path)
    except CheckpointError as e:
        raise S.SampleError(str(e)) from None
    if meta.get("format") != FORMAT or "config" not in meta:
        raise S.SampleError(f"--ckpt={ckpt}: {path} is not a HeartBeat checkpoint (no heartbeat metadata); "
                            f"pass a run folder or ckpt-N.safetensors written by tools/train.py")
    if meta.get("stage") not in sampling_stages():
        raise S.SampleError(f"--ckpt={ckpt}: a '{meta.get('stage')}' checkpoint cannot sample; pass a "
                            f"{' / '.join(sampling_stages())} checkpoint")
    try:
        cfg = Config.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise S.SampleError(f"--ckpt={ckpt}: the config in {path} is unreadable ({e})") from None
    return path, meta, cfg


def resolve_conditions(args, cfg, video: bool) -> tuple:
    """The conditions this run uses, in CONDITIONS order, checked against the checkpoint and the source."""
    trained = tuple(cfg.model.conditions)
    if not video:
        trained = tuple(c for c in trained if c != "flow")
    files = [FILE_OPTIONS[o] for o in FILE_OPTIONS if getattr(args, o) not in ("", None)]
    if args.anatomy:                                  # the heart model gives these (heartbeat/anatomy.py)
        from heartbeat.anatomy import CONDITIONS as MODEL_CONDITIONS
        files += [c for c in MODEL_CONDITIONS if c in trained and c not in files]
    for name in files:
        if name not in trained:
            opt = [o for o, c in FILE_OPTIONS.items() if c == name][0]
            raise S.SampleError(f"--{opt} gives the '{name}' condition, but this checkpoint was trained with "
                                f"{', '.join(trained) or 'no condition'} only")
    if args.conditions:
        asked = [c.strip() for c in args.conditions.split(",") if c.strip() and c.strip() != "none"]
        bad = [c for c in asked if c not in CONDITIONS]
        if bad:
            raise S.SampleError(f"--conditions: unknown condition(s) {', '.join(bad)}; valid: {', '.join(CONDITIONS)}")
        untrained = [c for c in asked if c not in trained]
        if untrained:
            why = " (stage-1 models have no flow encoder)" if "flow" in untrained and not video else ""
            raise S.SampleError(f"--conditions: this checkpoint was not trained with {', '.join(untrained)}{why}; "
                                f"it knows {', '.join(trained) or 'no condition'}")
        if not args.data:
            derivable = set(files) | ({"mv"} if "mask" in files else set())
            missing = [c for c in asked if c not in derivable]
            if missing:
                opts = {v: k for k, v in FILE_OPTIONS.items()}
                need = ", ".join(f"{c} (--{opts[c]}=...)" if c in opts else f"{c} (derived from --mask)"
                                 for c in missing)
                raise S.SampleError(f"--conditions asks for {need} but no such input is given; give it, or "
                                    f"--data=DIR to take conditions from a dataset split")
        ignored = [c for c in files if c not in asked and not args.anatomy]
        if ignored:
            raise S.SampleError(f"a file is given for {', '.join(ignored)} but --conditions leaves it out; "
                                f"add it to --conditions or drop the file option")
        used = set(asked)
    elif args.data:
        used = set(trained)
    else:
        used = set(files) | ({"mv"} if "mask" in files and "mv" in trained else set())
    return tuple(c for c in CONDITIONS if c in used)


def load_file_conditions(args, cfg, used) -> dict:
    m, conds = cfg.model, {}
    size = m.image_size
    if args.mask:
        conds["mask"] = S.load_mask_sequence(args.mask, m.mask_classes, size)
        if "mv" in used:
            conds["mv"], conds["mv_points"] = S.derive_mv(conds["mask"])
    if args.prior:
        conds["prior"] = S.load_image(args.prior, size, "prior")
    if args.prompt is not None:
        conds["text"] = args.prompt
    if args.sketch:
        conds["sketch"] = S.load_binary_image(args.sketch, size, "sketch")[None]
    if args.flow:
        conds["flow"] = S.load_flow(args.flow, size)
    return conds


def plan(args) -> dict:
    """Everything checked before any process group, folder or model exists."""
    from heartbeat.data import DataError, find_split
    path, meta, cfg = read_checkpoint_config(args.ckpt)
    stage = model_stage(meta["stage"], cfg.model)          # a distilled student: its teacher's stage
    video = stage.video
    used = resolve_conditions(args, cfg, video)
    try:
        spec = GuidanceSpec.parse(args.guidance)
        spec.cond_sets(used)
    except GuidanceError as e:
        raise S.SampleError(f"--guidance: {e}") from None
    try:
        make_timesteps(args.steps, args.spacing, cfg.model.timesteps)
    except ValueError as e:
        raise S.SampleError(f"--steps={args.steps}: {e}") from None
    try:                                                   # a student: lcm, its steps, its scales
        check_request(cfg.model, args.sampler, args.steps)
        if args.sampler == "lcm":
            student_scales(cfg.model, spec)
    except StudentError as e:
        raise S.SampleError(f"--ckpt={args.ckpt}: {e}") from None
    if args.batch < 1 or args.num < 0 or args.frames < 0:
        raise S.SampleError("--batch must be >= 1, --num and --frames >= 0")
    if video and args.frames > cfg.model.max_frames:
        raise S.SampleError(f"--frames={args.frames}: the model's temporal layers take at most {cfg.model.max_frames}")
    files = load_file_conditions(args, cfg, used)
    if args.anatomy and (args.data or files):
        raise S.SampleError("--anatomy=model makes its own masks: drop --data and the file options")
    if args.anatomy:
        if not args.ef:
            raise S.SampleError("--anatomy=model needs --ef=0.35 (or a range, --ef=0.2:0.7)")
        from heartbeat.anatomy import AnatomySource
        source = AnatomySource(cfg, used, args.frames or None, video, args.ef, args.view)
        from data_prep.h5io import ECHO_LABELS
        labels = {str(k): v for k, v in ECHO_LABELS.items()}
    elif args.data:
        try:
            source = S.DatasetSource(cfg, find_split(args.data, args.split), used, args.frames or None, video,
                                     args.prior_frame)
        except DataError as e:
            raise S.SampleError(str(e)) from None
        for name in ("mask", "flow"):
            if name in files and len(files[name]) < source.frames:
                raise S.SampleError(f"--{name} gives {len(files[name])} frames, {source.frames} are needed")
        source.overrides = files
        labels = source.ds.labels
    else:
        source = S.FileSource(cfg, used, args.frames or None, video, files)
        from data_prep.h5io import CMR_LABELS, ECHO_LABELS
        modality_labels = CMR_LABELS if stage.modality == "cmr" else ECHO_LABELS
        labels = {str(k): v for k, v in modality_labels.items()}
    out = Path(args.out) if args.out else path.parent / "samples"
    if out.exists() and not out.is_dir():
        raise S.SampleError(f"--out={out} is a file; name a folder")
    if out.exists() and not args.force:
        raise S.SampleError(f"output folder {out} already exists; pass --force to write into it "
                            f"(samples.h5 is replaced only once the new one is complete) or another --out")
    num = args.num or len(source)
    if args.filter_copies:                            # heartbeat/privacy.py; checked before any sampling
        from heartbeat.privacy import PrivacyError, check_reference
        from heartbeat.segmenter import load_segmenter
        if not (args.copy_ref or args.data):
            raise S.SampleError("--filter_copies needs the real folder (train.h5, test.h5): --copy_ref=DIR or --data")
        try:
            check_reference(args.copy_ref or args.data, args.copy_quantile)
            load_segmenter(args.segmenter) if args.segmenter else None
        except (PrivacyError, FileNotFoundError, ValueError) as e:
            raise S.SampleError(f"--filter_copies: {e}") from None
        if not args.segmenter:
            raise S.SampleError("--filter_copies needs --segmenter=FILE (python tools/train.py --stage=seg, or the "
                                "segmenter.safetensors tools/eval.py writes)")
    if args.gif and Path(args.gif).exists() and not args.force:
        raise S.SampleError(f"--gif={args.gif} already exists; pass --force to replace it or name another file")
    return dict(path=path, meta=meta, cfg=cfg, video=video, used=used, spec=spec, source=source, out=out,
                num=num, labels=labels)


# ---------------------------------------------------------------------------------- running

class ModelLoadError(Exception):
    """The checkpoint's tensors do not build the model its config describes (corrupt or mismatched)."""


def load_model(path, cfg, use_ema: bool, device):
    """The sampling modules (unet, conditioner, vae) with EMA weights (heartbeat/models.py)."""
    from heartbeat.checkpoint import CheckpointError
    from heartbeat.models import load_for_sampling
    from heartbeat.weights import WeightsError
    try:
        _, parts, _ = load_for_sampling(path, use_ema=use_ema, device=device)
    except (CheckpointError, WeightsError) as e:
        raise ModelLoadError(str(e)) from None
    return parts


def run(args, p: dict, rank: int, world: int, device) -> Path | None:
    cfg, source, out, used = p["cfg"], p["source"], p["out"], p["used"]
    parts = load_model(p["path"], cfg, not args.no_ema, device)
    for m in parts.values():
        if isinstance(m, torch.nn.Module):
            m.eval()
    label = S.conditions_label(used)
    Fr, size = source.frames, cfg.model.image_size
    latent_shape = (Fr, cfg.model.latent_channels, cfg.model.latent_size, cfg.model.latent_size)
    ks = list(range(rank, p["num"], world))                     # DiT sample_ddp.py: round-robin over ranks
    part = out / f".part-{rank:03d}-of-{world:03d}.h5"
    common = dict(checkpoint=str(Path(p["path"]).resolve()), stage=p["meta"]["stage"], sampler=args.sampler,
                  steps=args.steps, eta=args.eta, spacing=args.spacing, guidance=args.guidance, conditions=label)
    t0 = time.time()
    try:
        _sample_part(args, p, parts, source, ks, part, common, label, latent_shape, rank)
    except BaseException:
        part.unlink(missing_ok=True)              # no half-written part left behind in OUT
        raise
    elapsed = time.time() - t0
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    final = out / "samples.h5"
    attrs = dict(common, seed=args.seed, num=p["num"], frames=Fr, size=size, labels=p["labels"],
                 source="heartbeat-sample", preset=p["meta"].get("preset", ""), ema=not args.no_ema,
                 world_size=world, data=str(args.data), split=args.split if args.data else "")
    parts_files = [out / f".part-{r:03d}-of-{world:03d}.h5" for r in range(world)]
    S.merge_parts(parts_files, final, attrs)
    for f in parts_files:
        f.unlink(missing_ok=True)
    if args.filter_copies:
        from heartbeat.privacy import filter_file, summary
        from heartbeat.segmenter import load_segmenter
        rep = filter_file(final, args.copy_ref or args.data, load_segmenter(args.segmenter), args.copy_quantile,
                          record=out / "copies.json")
        print(f"{summary(rep)}; dropped {len(rep['info']['dropped'])}, kept {rep['info']['kept']} "
              f"(record: {out / 'copies.json'})")
    previews = write_previews(final, out, count=args.previews)
    if args.gif:
        previews.append(write_gif(final, args.gif))
    (out / "sample_args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    n = p["num"]
    print(f"wrote {n} samples ({label or 'unconditional'}; {Fr} frame(s) each) to {final} and "
          f"{len(previews)} preview files; rank 0 sampled {len(ks)} in {elapsed:.1f}s "
          f"({len(ks) / max(elapsed, 1e-9):.3f} samples/s per rank)")
    return final


def _sample_part(args, p, parts, source, ks, part, common, label, latent_shape, rank):
    """This rank's samples ks, in batches, into its part file."""
    from tqdm import tqdm
    cfg, used, Fr = p["cfg"], p["used"], source.frames
    device = next(parts["unet"].parameters()).device
    bar = tqdm(total=len(ks), desc="sampling", unit="sample", disable=rank != 0)
    with S.PartWriter(part, Fr, cfg.model.image_size, used, latent_shape if args.save_latents else None) as w:
        for b in range(0, len(ks), args.batch):
            jobs = [source.job(k, args.seed + k) for k in ks[b:b + args.batch]]
            z0, video = S.generate(parts, cfg, jobs, steps=args.steps, sampler=args.sampler, eta=args.eta,
                                   guidance=p["spec"], used=used, device=device, spacing=args.spacing,
                                   rescale=args.guidance_rescale, compile=args.compile,
                                   cuda_graph=args.cuda_graph)
            for j, job in enumerate(jobs):
                rec = job["record"]
                meta = dict(common, seed=rec["seed"], source_index=rec["source_index"], frames=Fr,
                            source_frames=list(range(Fr)) if rec["source_index"] >= 0 else [],
                            source=rec["source_meta"])
                w.add(job, video[j].numpy(), meta, label, z0[j].numpy() if args.save_latents else None)
            bar.update(len(jobs))
    bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    try:
        p = plan(args)
    except (S.SampleError, ConfigError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.cuda_graph:
        if rank == 0:
            print(f"error: --cuda_graph needs a CUDA device (this run samples on {device}); drop it", file=sys.stderr)
        return 2
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    created = not p["out"].exists()
    try:
        p["out"].mkdir(parents=True, exist_ok=True)   # every rank checked it first (plan) before the rendezvous
        if world > 1:
            dist.barrier()
        run(args, p, rank, world, device)
    except ModelLoadError as e:
        if rank == 0:
            print(f"error: --ckpt={args.ckpt}: {e}", file=sys.stderr)
        if created:
            try:
                p["out"].rmdir()                       # only if still empty
            except OSError:
                pass
        return 2
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
