"""Data-parallel training under ``torch.distributed`` (started by torchrun): the few collective steps
the trainer needs, each a no-op in a single process.

Every process holds the same training data and draws the same seeded batch
order; each takes its contiguous share of every batch, and
DistributedDataParallel averages the gradients. Rank 0 trains the faiss
start (RQ, k-means) and broadcasts it; rank 0 writes checkpoints and files.
NCCL on GPUs, gloo on CPUs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world():
    """(rank, world size): (0, 1) outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def init_from_environment(device: torch.device) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR...), if it describes one.

    NCCL for a cuda device, gloo otherwise. Returns whether a group was joined.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def device_for_rank(device: torch.device) -> torch.device:
    """On a multi-GPU process group, each process's own GPU (its LOCAL_RANK); else ``device``."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_module(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every process's module (in place)."""
    if not active():
        return
    device = _collective_device()
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            staged = tensor.detach().to(device).contiguous()
            dist.broadcast(staged, 0)
            tensor.copy_(staged.to(tensor.device))


def broadcast_array(array):
    """Rank 0's numpy array on every process (same shape and dtype on all ranks is required)."""
    if not active():
        return array
    import numpy as np

    staged = torch.from_numpy(np.ascontiguousarray(array)).to(_collective_device())
    dist.broadcast(staged, 0)
    return staged.cpu().numpy()


def wrap(model: torch.nn.Module, device: torch.device):
    """The callable the training forward goes through: DistributedDataParallel in a group, else the model."""
    if not active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def my_share(rows: torch.Tensor) -> torch.Tensor:
    """This process's contiguous share of a batch's rows (all of them in a single process)."""
    rank, world = rank_and_world()
    return rows if world == 1 else torch.tensor_split(rows, world)[rank]


def any_rank(flag: bool) -> bool:
    """True on every process when it is True on any (e.g. one process ran out of time)."""
    if not active():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def from_rank0(value: float) -> float:
    """Rank 0's value of a float on every process (so schedule decisions agree exactly)."""
    if not active():
        return value
    staged = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(staged, 0)
    return float(staged.item())


def mean_over_ranks(value: float) -> float:
    """The mean of a float over the processes."""
    if not active():
        return value
    staged = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(staged)
    return float(staged.item()) / dist.get_world_size()
