"""Shared validation helpers and the :class:`LinAlgError` exception (private module)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LOW_PRECISION",
    "LinAlgError",
    "check_finite",
    "check_same_dtype_device",
    "check_scalar",
    "check_square",
    "working_dtype",
]

#: Dtypes for which torch has no CPU/GPU factorization kernels; they are computed in float32.
LOW_PRECISION = (torch.float16, torch.bfloat16)


class LinAlgError(RuntimeError):
    """A factorization failed (also after the float64 retry) or its input was unusable.

    The message names the offending matrix (the ``name`` argument of the failing function),
    so that callers can report which Kronecker factor / layer caused the problem.
    """


def _fmt(shape: torch.Size | tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def check_square(M: Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``M`` is a 2-D square floating-point tensor."""
    if not isinstance(M, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(M).__name__}")
    if M.ndim != 2 or M.shape[0] != M.shape[1]:
        raise ValueError(f"{name} must be a square 2-D matrix, got shape {_fmt(M.shape)}")
    if not M.dtype.is_floating_point:
        raise TypeError(f"{name} must have a real floating-point dtype, got {M.dtype}")


def check_finite(M: Tensor, name: str) -> None:
    """Raise :class:`LinAlgError` if ``M`` contains NaN or Inf (synchronizes on GPU)."""
    if not bool(torch.isfinite(M).all()):
        raise LinAlgError(f"{name} contains non-finite values (NaN or Inf); shape {_fmt(M.shape)}")


def check_same_dtype_device(**tensors: Tensor) -> None:
    """Raise ``ValueError`` if the given tensors do not share one dtype and one device."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.dtype != t0.dtype or t.device != t0.device:
            raise ValueError(
                f"{name} ({t.dtype}, {t.device}) must have the same dtype and device as "
                f"{name0} ({t0.dtype}, {t0.device})"
            )


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype used for factorizations: float16/bfloat16 are promoted to float32."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def check_scalar(value: float | Tensor, like: Tensor, name: str = "damping") -> float | Tensor:
    """Validate a finite non-negative scalar (``damping``, ``π``) without a device sync.

    A Python number is checked and returned as ``float``. A one-element tensor is reshaped to
    0-d and cast to ``like``'s dtype and device; its value is checked only when it lives on
    the CPU (checking a GPU tensor would force a host-device synchronization).
    """
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {_fmt(value.shape)}")
        t = value.reshape(()).to(dtype=like.dtype, device=like.device)
        if value.device.type == "cpu":
            _check_nonneg(float(value), name)
        return t
    v = float(value)
    _check_nonneg(v, name)
    return v


def _check_nonneg(v: float, name: str) -> None:
    if not (v >= 0.0 and v != float("inf")):
        raise ValueError(f"{name} must be finite and non-negative, got {v}")
