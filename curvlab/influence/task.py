"""What influence is measured on: a :class:`Task` (close to kronfluence's ``Task``).

A task says, for a batch of examples, what the *training loss* of each example is (its
gradient is the training gradient ``∇L(z)``) and what the *measurement* of each query is
(its gradient is ``∇L(q)``; by default the query's loss too). Both return the **sum** over
the examples of the batch, as kronfluence's ``compute_train_loss``/``compute_measurement``
do; :class:`~curvlab.influence.Influence` calls them on batches of one example (under
``torch.func.vmap``), so the sum is that example's loss.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.extraction.losses import check_loss


class Task:
    """Override :meth:`compute_train_loss` (and optionally :meth:`compute_measurement`,
    :meth:`get_attention_mask`) for models whose batches are not ``(inputs, targets)``.

    ``model`` in the methods is a callable with the model's signature (the model with the
    influence parameters substituted functionally); call it as ``model(inputs)``.
    """

    def compute_train_loss(self, batch: Any, model: Any) -> Tensor:
        """Scalar: the sum over the batch's examples of each example's training loss."""
        raise NotImplementedError(f"{type(self).__name__}.compute_train_loss")

    def compute_measurement(self, batch: Any, model: Any) -> Tensor:
        """Scalar: the sum over the batch's queries of the measured quantity (default:
        the training loss of the query)."""
        return self.compute_train_loss(batch, model)

    def get_attention_mask(self, batch: Any) -> Tensor | None:
        """``[N, T]`` bool, ``True`` at real (non-padding) positions, or ``None``; rows of
        padding positions are left out of the losses of :class:`LossTask`."""
        return None


class LossTask(Task):
    """The task of a supervised model trained with ``loss_fn``: batches are ``(inputs,
    targets)`` with the examples along the leading axis; an example's training loss (and
    measurement) ``ℓ_n`` is ``loss_fn`` on that example alone, with ``loss_fn``'s reduction
    over the example's rows and outputs; a batch's loss is ``Σ_n ℓ_n``.

    With ``reduction="mean"`` this is ``ℓ_n`` in ``L = (1/N) Σ_n ℓ_n`` (for MSE the mean
    over the outputs is part of ``ℓ_n``), so ``∇ℓ_n`` is the gradient whose influence is
    that of up-weighting example ``n`` in the mean training loss.

    Args:
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.
        pad_mask: optional ``mask(batch) -> [N, T] bool`` (``True``: real position) for
            per-token models whose ``forward`` returns ``[N·T, C]`` rows (targets ``[N,
            T]``); masked rows are left out of the loss (and of its mean).
    """

    def __init__(self, loss_fn: nn.Module, pad_mask: Any = None) -> None:
        check_loss(loss_fn)
        self.loss_fn = loss_fn
        self.pad_mask = pad_mask

    def _unpack(self, batch: Any) -> tuple[Any, Tensor]:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "LossTask: a batch must be an (inputs, targets) pair, got "
                f"{type(batch).__name__}; write a Task subclass for other batches."
            )
        return batch[0], batch[1]

    def compute_train_loss(self, batch: Any, model: Any) -> Tensor:
        inputs, targets = self._unpack(batch)
        n = targets.shape[0]  # examples: the leading axis of the batch
        outputs = model(inputs)
        if outputs.shape[0] != n and targets.dim() >= 2:
            targets = targets.reshape(outputs.shape[0], *targets.shape[2:])  # [N, T] -> [N·T]
        unreduced = copy.copy(self.loss_fn)  # the loss per entry; reduced per example below
        setattr(unreduced, "reduction", "none")  # noqa: B010 (nn.Module's typed __setattr__)
        rows = unreduced(outputs, targets)
        weights = torch.ones_like(rows)
        if isinstance(self.loss_fn, nn.CrossEntropyLoss):
            weights = weights * (targets != self.loss_fn.ignore_index).to(rows.dtype)
        mask = self.get_attention_mask(batch)
        if mask is not None:
            # weights, not boolean indexing: shapes stay fixed under torch.func.vmap
            weights = weights * mask.reshape(rows.shape[0], *([1] * (rows.dim() - 1)))
        per_example = (rows * weights).reshape(n, -1).sum(dim=1)
        if self.loss_fn.reduction == "mean":
            per_example = per_example / weights.reshape(n, -1).sum(dim=1).clamp(min=1.0)
        return per_example.sum()

    def get_attention_mask(self, batch: Any) -> Tensor | None:
        if self.pad_mask is None:
            return None
        mask: Tensor = self.pad_mask(batch)
        if mask.dtype != torch.bool:
            raise TypeError(f"LossTask: pad_mask must return a bool tensor, got {mask.dtype}.")
        return mask
