"""Run a HeartBeat tool on every GPU of this node, and across nodes, with torchrun's rendezvous.

    python tools/launch.py tools/train.py --stage=pretrain ...      # what `bash train.sh pretrain` runs
    python tools/launch.py tools/sample.py --ckpt=RUN --num_samples=1000 ...

Read from the environment (none set: one node, one process per visible GPU, one on a CPU):
    NPROC            processes on this node (default: the visible GPUs, 1 without CUDA)
    NNODES           nodes in the job (default 1)
    NODE_RANK        this node's rank, 0 .. NNODES-1 (static rendezvous: node 0 hosts it)
    MASTER_ADDR      the host of node 0 (default 127.0.0.1), MASTER_PORT (default 29500)
    RDZV_ENDPOINT    host:port of a c10d rendezvous instead of the static one (elastic: nodes need no
                     NODE_RANK), RDZV_ID its job id (default "heartbeat")
    HEARTBEAT_JOIN_TIMEOUT   seconds a node waits for the others before it gives up (default 900)

One process on one node runs the tool directly (no torchrun). Otherwise this is torchrun itself
(`torch.distributed.run`), with its options filled from the environment: a node whose peers never
join stops after HEARTBEAT_JOIN_TIMEOUT seconds with one line saying so, not a hang. Every process
must see the same data and runs folders (docs/ARCHITECTURE.md §Training); tools/train.py checks it.
A SLURM example is in the README.
"""
from __future__ import annotations

import os
import sys


def plan(env=os.environ) -> tuple[int, int, list[str]]:
    """(processes on this node, nodes, torchrun's options) from the environment."""
    if env.get("NPROC"):
        nproc = int(env["NPROC"])
    else:
        import torch
        nproc = max(1, torch.cuda.device_count())
    nnodes = int(env.get("NNODES", "1") or 1)
    if nproc < 1 or nnodes < 1:
        raise SystemExit(f"error: NPROC={nproc} and NNODES={nnodes} must be >= 1")
    timeout = int(env.get("HEARTBEAT_JOIN_TIMEOUT", "900"))
    opts = [f"--nproc_per_node={nproc}"]
    if nnodes == 1 and not env.get("RDZV_ENDPOINT"):
        return nproc, nnodes, opts + ["--standalone"]
    opts.append(f"--nnodes={nnodes}")
    if env.get("RDZV_ENDPOINT"):
        opts += ["--rdzv_backend=c10d", f"--rdzv_endpoint={env['RDZV_ENDPOINT']}",
                 f"--rdzv_id={env.get('RDZV_ID', 'heartbeat')}", f"--rdzv_conf=join_timeout={timeout}"]
    else:
        if "NODE_RANK" not in env:
            raise SystemExit(f"error: NNODES={nnodes} needs NODE_RANK (0 on the node at MASTER_ADDR), or "
                             f"RDZV_ENDPOINT=host:port for a c10d rendezvous")
        opts += [f"--node_rank={int(env['NODE_RANK'])}", f"--master_addr={env.get('MASTER_ADDR', '127.0.0.1')}",
                 f"--master_port={env.get('MASTER_PORT', '29500')}", f"--rdzv_conf=timeout={timeout}"]
    return nproc, nnodes, opts


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(__doc__, file=sys.stderr)
        return 2
    nproc, nnodes, opts = plan()
    if nproc == 1 and nnodes == 1:
        os.execv(sys.executable, [sys.executable] + argv)
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run
    where = os.environ.get("RDZV_ENDPOINT") or f"{os.environ.get('MASTER_ADDR', '127.0.0.1')}:" \
                                                f"{os.environ.get('MASTER_PORT', '29500')}"
    try:
        run(parse_args(opts + argv))
    except (DistStoreError, RendezvousError, TimeoutError) as e:
        print(f"error: node {os.environ.get('NODE_RANK', '?')} of {nnodes}: the other nodes did not join the "
              f"rendezvous at {where} within {os.environ.get('HEARTBEAT_JOIN_TIMEOUT', '900')} s "
              f"({type(e).__name__}); check that every node was launched with the same NNODES, "
              f"MASTER_ADDR and MASTER_PORT, and that the port is open", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a worker failed: torchrun has printed which, with its error
        if type(e).__name__ == "ChildFailedError":
            codes = [f.exitcode for f in getattr(e, "failures", {}).values() if f.exitcode and f.exitcode > 0]
            return codes[0] if codes else 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
