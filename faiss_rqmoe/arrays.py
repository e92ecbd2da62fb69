"""The package's one array layer: validation and conversion at the public boundary.

Rules, the same for the index, the model and the trainer (as faiss's Python
layer converts, ``np.ascontiguousarray(x, dtype='float32')``):

- vectors are (n, d); any real numeric dtype is accepted (float16/32/64,
  integers such as SIFT's uint8) and converted to float32; bool, complex,
  strings and objects raise TypeError; NaN and inf raise ValueError;
- numpy arrays, nested lists and torch tensors on any device are accepted;
- a method whose input is a torch tensor returns tensors on that tensor's
  device (``returns_like`` below), as ``faiss.contrib.torch_utils`` does.
"""
from __future__ import annotations

import functools
import inspect

import numpy as np
import torch

_TORCH_REAL = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8, torch.int8,
               torch.int16, torch.int32, torch.int64)


def to_host(x):
    """A torch tensor (any device, any grad mode) as a numpy array on the host; anything else as is."""
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # numpy has no bfloat16
        return x.cpu().numpy()
    return x


def _is_real_numpy(dtype: np.dtype) -> bool:
    return dtype != np.bool_ and (np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.integer))


def _check_layout(x, d: int, name: str, allow_empty: bool, real: bool) -> None:
    """The checks every vector input passes: a real dtype (``real``, as the caller decided it), two
    dimensions, d columns, and at least one row unless ``allow_empty``."""
    if not real:
        raise TypeError(f"{name} must be a real numeric array or tensor (float32), got dtype {x.dtype}")
    if len(x.shape) != 2:
        raise ValueError(f"{name} must be a 2-D array of shape (n, {d}), got shape {tuple(x.shape)}")
    if x.shape[1] != d:
        raise ValueError(f"{name} has {x.shape[1]} columns, expected d={d}")
    if not allow_empty and x.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one vector of dimension {d}")


def as_vectors(x, d: int, name: str = "x", allow_empty: bool = True) -> np.ndarray:
    """Vectors as (n, d) C-contiguous float32 numpy (see the module rules).

    x: numpy array, nested list or torch tensor (copied to the host).
    """
    if isinstance(x, torch.Tensor) and x.dtype not in _TORCH_REAL:
        _check_layout(x, d, name, allow_empty, real=False)
    x = np.asarray(to_host(x))
    _check_layout(x, d, name, allow_empty, real=_is_real_numpy(x.dtype))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def as_vectors_on(x, d: int, device: torch.device, name: str = "x", allow_empty: bool = True) -> torch.Tensor:
    """Vectors as an (n, d) float32 torch tensor on ``device``; a tensor already there is not copied
    through the host. Same rules as ``as_vectors``."""
    if not isinstance(x, torch.Tensor):
        return torch.from_numpy(as_vectors(x, d, name, allow_empty)).to(device)
    _check_layout(x, d, name, allow_empty, real=x.dtype in _TORCH_REAL)
    x = x.detach().to(device=device, dtype=torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x.contiguous()


def as_codes(codes, M: int, K: int, device: torch.device, name: str = "codes") -> torch.Tensor:
    """Codes as an (n, M) int64 tensor on ``device``, every value in [0, K); n >= 1.

    Codes as bytes (uint8, as indexes store them) with K >= 256 need no range check. Other codes are
    checked where they lie, before the copy: only codes already on a GPU make the call wait for the
    device (a small decode then serialises host and device)."""
    if isinstance(codes, torch.Tensor):
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got dtype {codes.dtype}")
        as_bytes = codes.dtype == torch.uint8
    elif isinstance(codes, np.ndarray):
        if codes.dtype == np.bool_ or not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array, got dtype {codes.dtype}")
        as_bytes = codes.dtype == np.uint8
        codes = torch.from_numpy(codes.astype(np.int64))
    else:
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(codes).__name__}")
    if codes.ndim != 2 or codes.shape[1] != M:
        raise ValueError(f"{name} must have shape (n, M={M}), got {tuple(codes.shape)}")
    if codes.shape[0] == 0:
        raise ValueError(f"{name} is empty: expected at least one code")
    # every byte is a valid code when K >= 256: no range check. Other codes are checked where they are,
    # before they move: codes from the host need no round trip to the device for their check
    codes = codes.to(dtype=torch.int64)
    if not (as_bytes and K >= 256):
        low, high = (int(v) for v in torch.aminmax(codes))
        if low < 0 or high >= K:
            raise ValueError(f"{name} must lie in [0, K={K}), got values in [{low}, {high}]")
    return codes.to(device=device)


def as_id_list(ids, what: str = "ids") -> np.ndarray:
    """A scalar or 1-D collection of ids (numpy, list, torch on any device) as (n,) int64.

    Integer dtypes are taken as they are; floats are accepted only when they hold whole numbers
    (faiss casts them, which would silently truncate 2.5 to 2); other dtypes raise TypeError.
    """
    ids = np.asarray(to_host(ids))
    if ids.ndim > 1:
        raise ValueError(f"{what} must be a 1-D array, got shape {ids.shape}")
    if ids.size:
        if np.issubdtype(ids.dtype, np.floating):
            if not np.all(np.isfinite(ids)) or not np.all(ids == np.round(ids)):
                raise ValueError(f"{what} must be whole numbers (int64), got non-integer floats")
        elif ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"{what} must be integers (int64), got dtype {ids.dtype}")
    return np.ascontiguousarray(ids, dtype=np.int64).ravel()


def as_ids(ids, n: int) -> np.ndarray:
    """Ids of n vectors being added: (n,) int64. -1 is refused: faiss's search output uses it for
    'no result', so a stored -1 could not be told from a missing neighbour."""
    if ids is None:
        raise ValueError(f"ids must have shape ({n},), got None")
    shape = tuple(ids.shape) if hasattr(ids, "shape") else np.shape(ids)
    if shape != (n,):
        raise ValueError(f"ids must have shape ({n},), one id a vector, got {shape}")
    ids = as_id_list(ids)
    if (ids == -1).any():
        raise ValueError("ids must not contain -1: faiss uses -1 in search results for 'no result'; "
                         "other negative ids are stored and returned as they are")
    return ids


def _like(result, like, outs):
    """Numpy leaves of ``result`` as tensors on ``like``'s device; caller-given outputs pass as they are."""
    if isinstance(result, tuple):
        return tuple(_like(r, like, outs) for r in result)
    if isinstance(result, np.ndarray) and not any(result is out for out in outs):
        return torch.from_numpy(result).to(like.device)
    return result


def returns_like(arg: str, outputs: tuple = ()):
    """Method decorator: when argument ``arg`` is a torch tensor, the numpy arrays the method returns
    come back as tensors on that tensor's device (arrays the caller passed in ``outputs`` are returned
    as given). The one place of the returns-like-the-input rule."""
    def decorate(method):
        signature = inspect.signature(method)
        position = list(signature.parameters).index(arg)

        @functools.wraps(method)
        def wrapper(*args, **kwargs):
            # read arg without binding the whole signature: a single query on a GPU pays this on the host
            like = args[position] if len(args) > position else kwargs.get(arg)
            result = method(*args, **kwargs)
            if not isinstance(like, torch.Tensor):
                return result
            bound = signature.bind(*args, **kwargs)
            outs = tuple(bound.arguments[name] for name in outputs if bound.arguments.get(name) is not None)
            return _like(result, like, outs)
        return wrapper
    return decorate


def fill_output(result, out, name: str):
    """``result`` (numpy or tensor) copied into the caller's ``out`` (numpy or tensor, any device) and
    ``out`` returned; without ``out``, ``result`` itself."""
    if out is None:
        return result
    if tuple(out.shape) != tuple(result.shape):
        raise ValueError(f"{name} has shape {tuple(out.shape)}, expected {tuple(result.shape)}")
    if isinstance(out, torch.Tensor):
        out.copy_(result if isinstance(result, torch.Tensor) else torch.from_numpy(np.asarray(result)))
    else:
        out[...] = to_host(result)
    return out


def check_positive_int(value, name: str) -> int:
    """An int >= 1 from an int-like value; ValueError naming ``name`` for anything else (bools, 0, 2.5)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float, np.floating)) \
            or int(value) != value or int(value) < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
