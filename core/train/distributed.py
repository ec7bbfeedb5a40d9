"""Data-parallel training across processes (`torchrun`): who this process is, and how ranks talk.

Under `torchrun --nproc_per_node N` every process runs the same command. `Dist.from_env` joins
the process group (gloo on CPU, NCCL on GPU); each rank then trains on its own shard of the
images, gradients are averaged by `DistributedDataParallel`, and only rank 0 writes the run.
Outside torchrun `Dist()` is a single process and every method is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto") -> Dist:
        """Join the process group torchrun describes in the environment, if any.

        NCCL when this process will train on a GPU, gloo otherwise.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device != "cpu" and torch.cuda.is_available()
        if not dist.is_initialized():
            if use_cuda:
                torch.cuda.set_device(local)
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(rank=rank, world=world, local_rank=local)

    def device(self, device: torch.device) -> torch.device:
        """The GPU of this rank when training on CUDA."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of a set: every `world`-th item from `rank`."""
        return x[self.rank::self.world] if self.enabled else x

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along dim 0 (lengths may differ); same on all ranks."""
        if not self.enabled:
            return x
        device = _comm_device(x)
        n = torch.tensor([len(x)], device=device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=device)
        padded[:len(x)] = x.to(device)
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes, strict=True)]
                         ).to(x.device)

    def any(self, flag: bool, device: torch.device | None = None) -> bool:
        """True on every rank when `flag` is true on at least one (a stop everyone agrees on)."""
        return self.any_of(flag, device=device)[0]

    def any_of(self, *flags: bool, device: torch.device | None = None) -> tuple[bool, ...]:
        """`any` of several flags in one collective call."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags], device=device or _default_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def all_equal(self, x: torch.Tensor) -> bool:
        """Whether `x` is bit-identical on every rank (replicas must not drift apart)."""
        if not self.enabled:
            return True
        lo, hi = x.detach().double().clone(), x.detach().double().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(torch.equal(lo, hi))

    def broadcast_buffers(self, module: torch.nn.Module) -> None:
        """Copy rank 0's buffers (batch-norm statistics) to every rank.

        DDP averages gradients, so parameters stay in step, but each rank's last forward pass
        updates its own running statistics.
        """
        if self.enabled:
            for b in module.buffers():
                dist.broadcast(b.data, src=0)

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters to every rank (after an initialisation from local data)."""
        if self.enabled:
            for p in module.parameters():
                dist.broadcast(p.data, src=0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _default_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _comm_device(x: torch.Tensor) -> torch.device:
    return _default_device() if x.device.type == "cpu" else x.device
