"""The processes of a run: rank, world, node, device, the few collectives the tools use, and the check
that every process sees the same folders. docs/ARCHITECTURE.md §Training.

    d = Dist()                        # from torchrun's environment; one process without it
    d.broadcast(obj), d.barrier(), d.all_ok(ok, message)
    check_shared_storage([cfg.train.data, cfg.train.out], d)

Rank 0 decides every look at the disk that leads to a collective (the phantom build, the encoder
cache, run folders) and broadcasts the answer, so those folders must be one storage that every node
sees (a shared filesystem). `check_shared_storage` proves it at start-up: rank 0 writes a token into
each folder, every rank must read it back, and a rank that cannot stops the run on every rank with
one message naming its host and the folder.
"""
from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

from .runs import TrainError


class Dist:
    """rank / world / device of this process; a process group only when torchrun set RANK (nccl on
    GPU, gloo on CPU). `nodes` counts the machines (WORLD_SIZE / LOCAL_WORLD_SIZE)."""

    def __init__(self):
        env = os.environ
        self.enabled = "RANK" in env and "LOCAL_RANK" in env and int(env.get("WORLD_SIZE", "1")) >= 1
        self.rank = int(env.get("RANK", 0)) if self.enabled else 0
        self.world = int(env.get("WORLD_SIZE", 1)) if self.enabled else 1
        self.local = int(env.get("LOCAL_RANK", 0)) if self.enabled else 0
        self.local_world = int(env.get("LOCAL_WORLD_SIZE", self.world)) if self.enabled else 1
        self.nodes = max(1, self.world // max(1, self.local_world))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.main = self.rank == 0

    def barrier(self):
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's `obj`, on every rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_ok(self, ok: bool, message: str = "") -> None:
        """Raise TrainError on every rank if any rank failed (keeps ranks from hanging)."""
        bad = [m for o, m in self.gather((ok, message)) if not o]
        if bad:
            raise TrainError(bad[0])

    def close(self):
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def check_shared_storage(folders, d) -> None:
    """Every rank must see what rank 0 writes in each folder (created if absent); otherwise a
    TrainError on every rank. Nothing is left behind."""
    folders = [Path(f) for f in folders]
    name = d.broadcast(f".heartbeat-shared-{uuid.uuid4().hex}" if d.main else None)
    if d.main:
        for f in folders:
            f.mkdir(parents=True, exist_ok=True)
            (f / name).write_text(socket.gethostname())
    d.barrier()
    unseen = [str(f) for f in folders if not (f / name).is_file()]
    try:
        d.all_ok(not unseen, f"rank {d.rank} on {socket.gethostname()} does not see {', '.join(unseen)} as rank 0 "
                             f"writes it: the data folder (with its encoder cache) and the runs folder must be on "
                             f"storage every node sees (a shared filesystem); point --data and --out there")
    finally:
        d.barrier()
        if d.main:
            for f in folders:
                (f / name).unlink(missing_ok=True)
