"""Multi-process training through ``torchrun``, and nothing when run as one process.

``torchrun --nproc_per_node=N -m dinobench run ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
:func:`init` then joins the process group (NCCL on CUDA, gloo on CPU). A plain
``python -m dinobench run`` never creates a process group, and every helper here is a
no-op for it.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistInfo()
_HOST_GROUP = None  # a gloo group for host-side agreement (the stop flag), any backend


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None) -> tuple[DistInfo, str | None]:
    """Join the process group when launched by torchrun; return the rank's info and the
    device it should use (``cuda:<local_rank>`` on GPUs)."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE, device
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]),
                    int(os.environ.get("LOCAL_RANK", 0)))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    global _HOST_GROUP
    if use_cuda:
        # Before the process group: NCCL binds its communicator to the current device,
        # and without this every rank would first touch GPU 0 (a context there each).
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        kwargs = {}
        if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
            # Binds the group to the rank's GPU up front, where this torch takes it: NCCL
            # connects now, not at the first collective, and never guesses the device.
            kwargs["device_id"] = torch.device("cuda", info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", **kwargs)
    # Collective on every rank, here, so that no rank creates it late.
    _HOST_GROUP = dist.new_group(backend="gloo")
    return info, f"cuda:{info.local_rank}" if use_cuda else "cpu"


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", 0)))
    return SINGLE


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of every rank, in rank order. Ranks may hold
    different numbers of rows."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad = t.new_zeros((max(sizes) - t.shape[0],) + tuple(t.shape[1:]))
    parts = [t.new_empty((max(sizes),) + tuple(t.shape[1:])) for _ in range(world)]
    dist.all_gather(parts, torch.cat([t, pad]))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank (every rank must call it at the same point).
    A CPU all-reduce on a gloo group: it never waits for the GPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return bool(t.item())


def signal_over_ranks(signum: int | None) -> int | None:
    """The signal any rank received (the largest number, if they differ), or None: a rank
    stops with the others when only another got the signal, and reports it as theirs.
    Every rank must call it at the same point (a CPU all-reduce on the gloo group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return signum
    t = torch.tensor([signum or 0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_HOST_GROUP)
    return int(t.item()) or None


def min_over_ranks_(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
