"""core/train/distributed.py: one process is a no-op; two gloo processes agree."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.train.distributed import Dist


def test_a_single_process_changes_nothing() -> None:
    d = Dist()
    x = torch.arange(5)
    assert not d.enabled and d.is_main
    assert d.shard(x) is x and d.gather(x) is x
    assert d.any_of(False, True) == (False, True) and d.all_equal(x)
    d.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    d = Dist.from_env("cpu")
    try:
        shard = d.shard(torch.arange(7.0))  # rank 0: 0, 2, 4, 6; rank 1: 1, 3, 5
        gathered = d.gather(shard[:, None] * torch.ones(1, 2))
        flags = d.any_of(rank == 1, False)
        same = d.all_equal(torch.ones(3))
        differ = d.all_equal(torch.full((3,), float(rank)))
        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(rank + 1.0)
        d.broadcast_buffers(bn)
        torch.save({"gathered": gathered, "flags": flags, "same": same, "differ": differ,
                    "bn": bn.running_mean.clone()}, Path(out) / f"{rank}.pt")
    finally:
        d.close()


def test_two_gloo_processes_gather_agree_and_share_buffers(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in range(2)]
    for r in results:
        assert r["gathered"][:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5]  # rank order, unpadded
        assert r["flags"] == (True, False)
        assert r["same"] and not r["differ"]
        assert r["bn"].tolist() == [1.0, 1.0]  # rank 0's statistics everywhere
    assert not dist.is_initialized()
