"""Beyond one process (CPU, gloo): two torchrun "nodes" on 127.0.0.1 train and sample like one process;
a node whose peer never joins stops with one line; FSDP2 on 2 ranks trains what DDP / one process
trains, for stage 1 and stage 2; sharded resume states load at another world size (2 -> 1 -> 2)."""
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from heartbeat import checkpoint as ckpt
from tests.test_train import TINY, _worst, run

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["--batch_size=4", "--max_steps=6", "--ckpt_every=2", "--keep_ckpts=0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, nproc=1, nodes=1, timeout=300, **env):
    """tools/launch.py as a user runs it: one subprocess per node; every node must succeed."""
    port = _port()
    procs = []
    for node in range(nodes):
        e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NPROC=str(nproc), NNODES=str(nodes),
                 NODE_RANK=str(node), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **env)
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tools" / "launch.py"), *args], env=e, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    return outs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A phantom, its VAE run, and the reference: stage 1 on one process, 6 steps."""
    from data_prep.phantom import build
    root = tmp_path_factory.mktemp("scale")
    build(root / "echo", clips=6, frames=4, size=32, seed=0, progress=False)
    common = TINY + [f"--data={root / 'echo'}"]
    run("--stage=vae", *common, f"--out={root / 'vae'}", "--batch_size=4", "--max_steps=2", "--ckpt_every=2")
    pre = common + ["--stage=pretrain", f"--vae={root / 'vae' / '000-vae-tiny'}", *STEPS]
    run(*pre, f"--out={root / 'one'}")                     # also writes the encoder cache the others read
    return root, pre


def _weights(out, step=None):
    run_dir = next(Path(out).glob("000-*"))
    return ckpt.read_weights(ckpt.weights_path(run_dir, step) if step else ckpt.find_weights(run_dir))


def test_two_nodes_train_and_sample_like_one_process(setup):
    root, pre = setup
    _launch([str(ROOT / "tools" / "train.py"), *pre, f"--out={root / 'nodes'}"], nodes=2)
    a, b = _weights(root / "nodes"), _weights(root / "one")
    assert a.meta["step"] == "6" and _worst(a, b) < 1e-4
    assert a.model["unet.out.2.weight"].abs().max() > 1e-4          # zero-initialised: it trained
    sample = [str(ROOT / "tools" / "sample.py"), f"--data={root / 'echo'}", "--num_samples=3", "--steps=4", "--batch=1",
              "--previews=0"]
    ckpt_dir = next((root / "nodes").glob("000-*"))
    _launch(sample + [f"--ckpt={ckpt_dir}", f"--out={root / 's2'}"], nodes=2)
    _launch(sample + [f"--ckpt={ckpt_dir}", f"--out={root / 's1'}"])
    with h5py.File(root / "s2" / "samples.h5") as f2, h5py.File(root / "s1" / "samples.h5") as f1:
        assert f2.attrs["world_size"] == 2 and f1.attrs["world_size"] == 1
        assert f1["video"][()].std() > 0 and (f2["video"][()] == f1["video"][()]).all()     # bit-identical


def test_a_node_that_never_joins_is_one_clear_line(setup):
    root, pre = setup
    e = dict(os.environ, PYTHONPATH=str(ROOT), NPROC="1", NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1",
             MASTER_PORT=str(_port()), HEARTBEAT_JOIN_TIMEOUT="5")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "launch.py"), str(ROOT / "tools" / "train.py"), *pre,
                        f"--out={root / 'alone'}"], env=e, cwd=ROOT, capture_output=True, text=True, timeout=120)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1, r.stderr[-3000:]
    assert "did not join the rendezvous at 127.0.0.1" in errors[0] and "within 5 s" in errors[0]
    assert "Traceback" not in r.stderr and not (root / "alone").exists()


def test_fsdp_trains_what_one_process_trains_and_resumes_across_world_sizes(setup):
    """FSDP on 2 ranks == one process (so == DDP) at every checkpoint; its sharded state at step 2
    resumes on one process (plain) to step 6, whose step-4 state resumes sharded on 2 ranks to step 6:
    both end where the uninterrupted runs end."""
    root, pre = setup
    _launch([str(ROOT / "tools" / "train.py"), *pre, f"--out={root / 'fsdp'}", "--shard=fsdp"], nproc=2)
    full = next((root / "fsdp").glob("000-*"))
    assert (full / "state-0000002").is_dir() and (full / "state-0000002" / "meta.pt").is_file()
    for step in (2, 4, 6):
        a, b = _weights(root / "fsdp", step), _weights(root / "one", step)
        assert set(a.ema) == set(b.ema) and _worst(a, b) < 1e-4, step
    assert a.model["unet.out.2.weight"].abs().max() > 1e-4                  # zero-initialised: it trained
    half = root / "half" / full.name
    shutil.copytree(full, half)
    ckpt.remove_checkpoints(half, [4, 6])
    run("--stage=pretrain", f"--resume={half}", "--shard=ddp")                          # 2 ranks -> 1
    assert ckpt.state_path(half, 4).is_file() and not ckpt.sharded_state_path(half, 4).exists()
    assert _worst(_weights(root / "half", 6), _weights(root / "fsdp", 6)) < 1e-4
    ckpt.remove_checkpoints(half, [6])
    _launch([str(ROOT / "tools" / "train.py"), "--stage=pretrain", f"--resume={half}", "--shard=fsdp"],
            nproc=2)                                                                     # 1 -> 2 ranks
    assert ckpt.sharded_state_path(half, 6).is_dir()
    end, ref = _weights(root / "half", 6), _weights(root / "fsdp", 6)
    assert _worst(end, ref) < 1e-4
    assert max((end.ema[k] - ref.ema[k]).abs().max().item() for k in ref.ema) < 1e-4


def test_fsdp_stage2_matches_one_process(setup):
    """Stage 2 (only the temporal layers and the flow encoder train; the spatial UNet is sharded and
    frozen), with gradient checkpointing inside the FSDP units: 2 ranks == one process."""
    root, pre = setup
    init = next((root / "one").glob("000-*"))
    args = TINY + ["--stage=finetune", f"--init={init}", f"--data={root / 'echo'}", "--batch_size=2",
                   "--max_steps=2", "--ckpt_every=2", "--drop_all_prob=0.5", "--grad_checkpointing=true"]
    _launch([str(ROOT / "tools" / "train.py"), *args, f"--out={root / 'f2'}", "--shard=fsdp"], nproc=2)
    run(*args, f"--out={root / 'f1'}")
    a, b = _weights(root / "f2"), _weights(root / "f1")
    assert _worst(a, b) < 1e-4
    moved = [k for k in a.ema if k.endswith("attn_temporal.to_out.0.weight")]
    assert moved and all(a.model[k].abs().max() > 1e-5 for k in moved)
    frozen = "unet.input_blocks.1.0.in_layers.2.weight"                  # spatial: sharded, frozen, intact
    assert torch.equal(a.model[frozen], ckpt.read_weights(ckpt.find_weights(init)).ema_model_state()[frozen])


def test_memory_plan_counts_and_measures(tmp_path):
    """--plan: parameter counts are the model's, sharding divides what it should, checkpointing
    saves less, and a clip's activations grow with its frames."""
    from heartbeat.memory import format_plan, memory_plan, per_rank
    from heartbeat.models import build_model
    from tools.train import resolve_config
    opts = TINY[:13] + [f"--out={tmp_path}"]                       # no previous run: the preset's model
    cfg = resolve_config("finetune", "tiny", opts)
    plan = memory_plan(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    trainable = sum(p.numel() for _, p in model.trainable_parameters())
    assert plan.params_trainable == trainable and plan.frames == 4
    assert plan.params_frozen_sharded + plan.params_frozen_replicated + trainable == sum(
        p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert 0 < plan.act_ckpt_per_item < plan.act_per_item and plan.act_block_max_per_item < plan.act_per_item
    one, eight = per_rank(plan, 1, "fsdp", False), per_rank(plan, 8, "fsdp", False)
    assert one == per_rank(plan, 1, "ddp", False)                         # one process shards nothing
    assert abs(eight["optimizer+ema"] * 8 - one["optimizer+ema"]) < 1e-9
    assert per_rank(plan, 8, "ddp", True)["activations"] < per_rank(plan, 8, "ddp", False)["activations"]
    assert "| 8 | fsdp | yes |" in format_plan(plan, (1, 8))
    longer = memory_plan(resolve_config("finetune", "tiny", opts + ["--frames=8"]))
    assert longer.act_per_item > 1.5 * plan.act_per_item


class _ThreadRank:
    """One rank of a 2-rank run simulated by a thread: broadcast / barrier / all_ok over shared state."""

    def __init__(self, rank, shared):
        self.rank, self.main, self.enabled, self.s = rank, rank == 0, True, shared

    def barrier(self):
        self.s["barrier"].wait()

    def broadcast(self, obj):
        if self.main:
            self.s["box"] = obj
        self.barrier()
        value = self.s["box"]
        self.barrier()
        return value

    def all_ok(self, ok, message=""):
        from heartbeat.runs import TrainError
        self.s["oks"][self.rank] = (ok, message)
        self.barrier()
        bad = [m for o, m in self.s["oks"] if not o]
        self.barrier()
        if bad:
            raise TrainError(bad[0])


def _two_ranks(folders_of):
    import threading
    from heartbeat.distributed import check_shared_storage
    shared = {"barrier": threading.Barrier(2), "oks": [None, None]}
    errors = [None, None]

    def go(rank):
        try:
            check_shared_storage(folders_of(rank), _ThreadRank(rank, shared))
        except Exception as e:  # noqa: BLE001
            errors[rank] = e
    threads = [threading.Thread(target=go, args=(r,)) for r in (0, 1)]
    [t.start() for t in threads]
    [t.join(timeout=60) for t in threads]
    return errors


def test_a_node_that_does_not_see_the_shared_folders_stops_every_rank(tmp_path):
    data, runs, local = tmp_path / "data", tmp_path / "runs", tmp_path / "node1-local"
    assert _two_ranks(lambda r: [data, runs]) == [None, None]               # one storage: fine
    assert not list(data.iterdir()) and not list(runs.iterdir())             # nothing left behind
    errors = _two_ranks(lambda r: [data, runs] if r == 0 else [data, local / "runs"])
    assert all(e is not None and "rank 1" in str(e) and str(local / "runs") in str(e)
               and "storage every node sees" in str(e) for e in errors), errors
    assert not list(runs.iterdir())
