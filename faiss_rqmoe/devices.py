"""Where the codec runs: one rule for every entry point."""
from __future__ import annotations

import torch


def resolve_device(device=None) -> torch.device:
    """``None`` -> cuda when available, else cpu; 'cpu', 'cuda', 'cuda:N' or a torch.device pass through.

    Raises ValueError naming the argument for an unknown device string or a cuda device that
    this machine does not have.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N' or a torch.device, got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a cuda device, got {device!r} (faiss_rqmoe runs on "
                         "CPUs and NVIDIA GPUs)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but torch.cuda.is_available() is False "
                             "(a CPU build of torch, or no GPU)")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} cuda device(s)")
    return resolved
