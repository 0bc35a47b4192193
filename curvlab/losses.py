"""Supported losses and their reduction bookkeeping (DESIGN.md "Conventions").

A loss ``L = R · Σ_n ℓ_n`` is summarised per batch by its sample count ``N`` and the
inverse reduction factor ``1/R`` (MATH.md §0): ``N`` for ``CrossEntropyLoss(mean)``,
``N·C`` for ``MSELoss``/``BCEWithLogitsLoss`` with ``mean`` (PyTorch divides by
``numel``), ``1`` for ``sum``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (
    nn.CrossEntropyLoss,
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
)
SUPPORTED_REDUCTIONS = ("mean", "sum")


def check_loss(loss_fn: nn.Module) -> None:
    """Raise a ``ValueError`` unless ``loss_fn`` is a supported loss with supported options."""
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise ValueError(
            f"Unsupported loss function {type(loss_fn).__name__}; curvlab supports {names}."
        )
    name = type(loss_fn).__name__
    reduction = getattr(loss_fn, "reduction", None)
    if reduction not in SUPPORTED_REDUCTIONS:
        raise ValueError(f"{name}(reduction={reduction!r}) is not supported; use 'mean' or 'sum'.")
    if getattr(loss_fn, "weight", None) is not None:
        raise ValueError(f"{name} with class/element weights is not supported.")
    if getattr(loss_fn, "pos_weight", None) is not None:
        raise ValueError(f"{name} with pos_weight is not supported.")
    if getattr(loss_fn, "label_smoothing", 0.0) != 0.0:
        raise ValueError(f"{name} with label_smoothing is not supported.")


@dataclass(frozen=True)
class BatchScale:
    """How one batch enters the loss: ``num_samples`` N and ``inv_reduction`` 1/R."""

    num_samples: int
    inv_reduction: float


def batch_scale(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> BatchScale:
    """Validate ``outputs``/``targets`` for ``loss_fn`` and return the batch's scale.

    Outputs must be ``[N, C]``; ``CrossEntropyLoss`` takes class indices ``[N]``,
    the other losses targets shaped like the outputs. Only shapes and dtypes are read
    (no host-device synchronisation); PyTorch itself rejects out-of-range class indices.
    """
    name = type(loss_fn).__name__
    if outputs.dim() != 2:
        raise ValueError(
            f"{name}: the model output must have shape [N, C], got {tuple(outputs.shape)}."
        )
    n, c = outputs.shape
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.shape != (n,) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name}: targets must be class indices of shape [{n}] (int64), got "
                f"shape {tuple(targets.shape)} and dtype {targets.dtype}."
            )
        inv_reduction = float(n)
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{name}: targets must have the output's shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}."
            )
        inv_reduction = float(n * c)
    if loss_fn.reduction == "sum":
        inv_reduction = 1.0
    return BatchScale(num_samples=n, inv_reduction=inv_reduction)


def sample_targets(loss_fn: nn.Module, outputs: Tensor) -> Tensor:
    """Targets drawn from the model's predictive distribution ``p(y | f)`` (MATH.md §1.2).

    ``CrossEntropyLoss``: a class from ``softmax(f)``; ``BCEWithLogitsLoss``: Bernoulli
    with ``σ(f)``; ``MSELoss``: ``f + N(0, ½)`` — PyTorch's squared error is the negative
    log-likelihood of a Gaussian with variance ½ (the "factor 2"). The gradient of the
    loss at these targets is ``R·g̃`` with ``g̃`` a Monte-Carlo loss-Hessian column.
    """
    f = outputs.detach().float()
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.multinomial(f.softmax(dim=1), num_samples=1).squeeze(1)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return torch.bernoulli(f.sigmoid())
    return f + torch.randn_like(f) * 0.5**0.5


def output_hessian_apply(loss_fn: nn.Module, outputs: Tensor, u: Tensor) -> Tensor:
    """``∇²_f L · u`` sample by sample: ``[N, C]`` for ``u`` ``[N, C]`` (MATH.md §1.2).

    The Hessian of the *reduced* loss w.r.t. each sample's output (so it includes ``R``):
    CE ``R(diag(p) − ppᵀ)``, MSE ``2R·I``, BCE ``R·diag(σ(1−σ))``. It does not depend on
    the targets, which is why it equals the Fisher's output matrix.
    """
    f = outputs.detach()
    n, c = f.shape
    if loss_fn.reduction == "sum":
        r = 1.0
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        r = 1.0 / n
    else:
        r = 1.0 / (n * c)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=1)
        return r * (p * u - p * (p * u).sum(dim=1, keepdim=True))
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = f.sigmoid()
        return r * s * (1 - s) * u
    return 2.0 * r * u
