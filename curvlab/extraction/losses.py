"""Supported losses: validation, reduction bookkeeping and output-space columns.

A loss ``L = R · Σ_n ℓ_n`` over the rows ``n`` of an ``[N, C]`` output is summarised per
batch by its row count and the inverse reduction factor ``1/R`` (docs page
"Conventions"): ``N`` for ``CrossEntropyLoss(mean)`` (the rows whose target is not
``ignore_index``), ``N·C`` for ``MSELoss``/``BCEWithLogitsLoss`` with ``mean`` (PyTorch
divides by ``numel``), ``1`` for ``sum``.

Every Fisher type is delivered to the engines as *output-space columns* ``[K, N, C]``;
the rule of each type lives with the type (:mod:`curvlab.extraction.fisher_types`) and
uses the primitives here: the square root of the loss's output matrix
(:func:`output_matrix_sqrt`), labels drawn from the model (:func:`sample_targets`), the
label gradient (:func:`label_gradient`) and the observed labels (:func:`observed_labels`).
Backpropagating the columns to a layer output gives its ``g`` vectors on the loss's scale;
to the parameters, the factor rows of the dense Fisher (see
``concepts/models.md#extraction-engines``).
Rows whose target is ``ignore_index`` have zero columns: they are not part of the loss.

A loss that is none of torch's own states its likelihood itself by subclassing
:class:`LikelihoodLoss` (the policy losses of :mod:`curvlab.extraction.policies`); every
function here hands such a loss its own rows, scale, columns and output-matrix products.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt

import torch
from torch import Tensor, nn

SUPPORTED_LOSSES: tuple[type[nn.Module], ...] = (
    nn.CrossEntropyLoss,
    nn.MSELoss,
    nn.BCEWithLogitsLoss,
)
SUPPORTED_REDUCTIONS = ("mean", "sum")


class LikelihoodLoss(nn.Module):
    """A loss that states its own likelihood: the extension point for non-torch losses.

    A subclass has ``reduction`` (``"mean"`` or ``"sum"``) and defines the methods below
    on its ``[N, C]`` rows (:meth:`observed_labels` has a default); the functions of this
    module then treat it like torch's losses, so every backend, engine (the hooks engine;
    BackPACK knows only torch's losses) and Fisher type takes it as ``loss_fn``.
    """

    reduction: str

    def validate(self) -> None:
        """Raise a ``ValueError`` for unsupported options (called by :func:`check_loss`)."""
        if self.reduction not in SUPPORTED_REDUCTIONS:
            raise ValueError(
                f"{type(self).__name__}(reduction={self.reduction!r}) is not supported; use "
                "'mean' or 'sum'."
            )

    def rows(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``outputs``/``targets`` as ``[N, C]`` rows and their per-row targets."""
        raise NotImplementedError

    def scale(self, outputs: Tensor, targets: Tensor) -> BatchScale:
        """Validate a batch of rows and return its :class:`BatchScale`."""
        raise NotImplementedError

    def output_sqrt(self, outputs: Tensor) -> Tensor:
        """``[K, N, C]`` columns ``s_k`` with ``Σ_k s_k[n] s_k[n]ᵀ = M_n``, the exact output
        matrix of row ``n`` of the ``sum``-reduced loss."""
        raise NotImplementedError

    def label_gradient(self, outputs: Tensor, labels: Tensor) -> Tensor:
        """``∇_f log p(y | f_n)`` per row at ``labels`` (of :meth:`sample` or
        :meth:`observed_labels`; any sign): ``[..., N, C]`` for ``outputs`` ``[..., N, C]``."""
        raise NotImplementedError

    def observed_labels(self, targets: Tensor) -> Tensor:
        """The labels inside a batch's ``targets`` (default: the targets themselves)."""
        return targets

    def output_matrix_apply(self, outputs: Tensor, u: Tensor, targets: Tensor | None) -> Tensor:
        """``R·M_n u_n`` per row, ``M_n`` the exact output matrix: ``[N, C]``."""
        raise NotImplementedError

    def sample(self, outputs: Tensor, num: int | None) -> Tensor:
        """Targets drawn from the model's distribution (leading axis ``num`` if given)."""
        raise NotImplementedError


def check_loss(loss_fn: nn.Module) -> None:
    """Raise a ``ValueError`` unless ``loss_fn`` is a supported loss with supported options.

    A subclass that overrides ``forward`` is refused: its curvature would be that of the
    base class's likelihood, silently wrong for whatever the override computes.
    """
    if isinstance(loss_fn, LikelihoodLoss):
        loss_fn.validate()
        return
    if not isinstance(loss_fn, SUPPORTED_LOSSES):
        names = ", ".join(cls.__name__ for cls in SUPPORTED_LOSSES)
        raise ValueError(
            f"Unsupported loss function {type(loss_fn).__name__}; curvlab supports {names}, "
            "and losses that state their likelihood (a LikelihoodLoss such as "
            "curvlab.CategoricalPolicy)."
        )
    base = next(cls for cls in SUPPORTED_LOSSES if isinstance(loss_fn, cls))
    name = type(loss_fn).__name__
    if type(loss_fn).forward is not base.forward:
        raise ValueError(
            f"{name} overrides forward(): curvlab derives the curvature from "
            f"{base.__name__}'s likelihood and cannot see what the override computes. Use "
            f"{base.__name__} itself (transform the model's output inside the model instead)."
        )
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
    """How one batch enters the loss.

    ``num_samples``: rows ``N`` of the output that count (``ignore_index`` rows excluded);
    ``inv_reduction``: ``1/R``; ``valid``: ``[N]`` bool mask of the counted rows, or
    ``None`` when every row counts.
    """

    num_samples: int
    inv_reduction: float
    valid: Tensor | None = None


def batch_scale(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> BatchScale:
    """Validate ``outputs``/``targets`` for ``loss_fn`` and return the batch's scale.

    Outputs must be ``[N, C]``; ``CrossEntropyLoss`` takes class indices ``[N]`` in
    ``[0, C)`` (rows
    equal to its ``ignore_index`` are left out, which costs one host synchronisation when
    the targets may contain it), the other losses targets shaped like the outputs.
    """
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.scale(outputs, targets)
    name = type(loss_fn).__name__
    if not isinstance(outputs, Tensor) or outputs.dim() != 2:
        shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"{name}: the loss rows must have shape [N, C], got {shape} (outputs with extra "
            "axes are turned into rows by loss_rows: [N, C, d1, ...] for CrossEntropyLoss)."
        )
    n, c = outputs.shape
    if n == 0:
        raise ValueError(f"{name}: the batch is empty (0 rows); no curvature can be taken.")
    valid = None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if targets.shape != (n,) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{name}: targets must be class indices of shape [{n}] (int64), got "
                f"shape {tuple(targets.shape)} and dtype {targets.dtype}."
            )
        mask = targets != loss_fn.ignore_index
        outside = mask & ((targets < 0) | (targets >= c))
        # one host synchronisation (curvature steps only) for both counts
        counted, wrong = (int(v) for v in torch.stack([mask.sum(), outside.sum()]).tolist())
        if wrong:
            first = int(targets[outside][0])
            raise ValueError(
                f"{name}: targets must be class indices in [0, {c}) or "
                f"ignore_index={loss_fn.ignore_index}; {wrong} target(s) are not, the first "
                f"is {first}."
            )
        if counted == 0:
            raise ValueError(
                f"{name}: every target of the batch is ignore_index={loss_fn.ignore_index}; "
                "the loss has no terms, so there is no curvature to take."
            )
        if counted != n:
            valid = mask
        inv_reduction = float(counted)
        rows = counted
    else:
        if targets.shape != outputs.shape:
            raise ValueError(
                f"{name}: targets must have the output's shape {tuple(outputs.shape)}, "
                f"got {tuple(targets.shape)}."
            )
        inv_reduction = float(n * c)
        rows = n
    if loss_fn.reduction == "sum":
        inv_reduction = 1.0
    return BatchScale(num_samples=rows, inv_reduction=inv_reduction, valid=valid)


def sample_targets(loss_fn: nn.Module, outputs: Tensor, num: int | None = None) -> Tensor:
    """Targets drawn from the model's predictive distribution ``p(y | f)``.

    ``CrossEntropyLoss``: a class from ``softmax(f)``; ``BCEWithLogitsLoss``: Bernoulli
    with ``σ(f)``; ``MSELoss``: ``f + N(0, ½)`` — PyTorch's squared error is the negative
    log-likelihood of a Gaussian with variance ½ (the "factor 2"). With ``num``, a leading
    axis of ``num`` independent draws.
    """
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.sample(outputs.detach(), num)
    f = outputs.detach()
    shape = (num, *f.shape) if num is not None else f.shape
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        probs = f.float().softmax(dim=1)
        draws = torch.multinomial(probs, num_samples=num or 1, replacement=True)  # [N, M]
        return draws.T if num is not None else draws.squeeze(1)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        # a uniform draw compared with σ(f): Bernoulli(σ(f)) exactly, and on CPU several
        # times faster than torch.bernoulli with a tensor of probabilities
        return (torch.rand(shape, dtype=f.dtype, device=f.device) < f.sigmoid()).to(f.dtype)
    return f + torch.randn(shape, dtype=f.dtype, device=f.device) * 0.5**0.5


def label_gradient(loss_fn: nn.Module, f: Tensor, labels: Tensor) -> Tensor:
    """``∇_f ℓ(f_n, y_n)`` per row at ``labels`` (the ``sum``-reduced loss's gradient, or a
    :class:`LikelihoodLoss`'s score): ``[..., N, C]`` for ``f`` ``[..., N, C]``."""
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.label_gradient(f, labels)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=-1)
        safe = labels.clamp(min=0, max=f.shape[-1] - 1)
        return p - nn.functional.one_hot(safe, f.shape[-1]).to(p.dtype)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        return f.sigmoid() - labels.to(f.dtype)
    return 2.0 * (f - labels.to(f.dtype))


def observed_labels(loss_fn: nn.Module, targets: Tensor) -> Tensor:
    """The observed labels of a batch's ``targets`` (torch's losses: the targets)."""
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.observed_labels(targets.detach())
    return targets


def output_matrix_sqrt(loss_fn: nn.Module, f: Tensor) -> Tensor:
    """``[K, N, C]`` columns ``s_k`` with ``Σ_k s_k[n] s_k[n]ᵀ = M_n``, the loss Hessian of
    row ``n`` of the ``sum``-reduced loss, for detached rows ``f`` ``[N, C]``."""
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.output_sqrt(f)
    n, c = f.shape
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        # S = diag(√p) − p √pᵀ: column c is √p_c (e_c − p), and S Sᵀ = diag(p) − p pᵀ
        p = f.softmax(dim=1)
        sqrt_p = p.sqrt()
        eye = torch.eye(c, dtype=f.dtype, device=f.device)
        return sqrt_p.T.unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))  # [C, N, C]
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = f.sigmoid()
        return torch.diag_embed((s * (1 - s)).sqrt()).permute(1, 0, 2)  # [C, N, C]
    eye = torch.eye(c, dtype=f.dtype, device=f.device)
    return (sqrt(2.0) * eye).unsqueeze(1).expand(c, n, c)


def softmax_output_factor(logits: Tensor, scale: BatchScale) -> tuple[Tensor, Tensor]:
    """The exact output factor of cross-entropy logits ``[N, C]`` in structured form:
    ``Σ_n w (diag(p_n) − p_n p_nᵀ) = diag(d) − P Pᵀ`` on the loss's scale (``w`` the
    reduction's ``1/N`` or 1; rows the loss ignores left out). Returns ``d`` ``[C]`` and
    ``P`` ``[C, N']`` (columns ``√w p_n``), never a ``[C, C]`` matrix
    (concepts/kronecker.md#vocabulary-sized-output-layers). The expectation of the
    ``"mc"`` factor over the sampled labels is the same matrix."""
    f = logits.detach()
    if f.dtype not in (torch.float32, torch.float64):
        f = f.float()
    p = f.softmax(dim=1)
    if scale.valid is not None:
        p = p[scale.valid]
    w = 1.0 / scale.inv_reduction if scale.inv_reduction > 0 else 0.0
    return p.sum(dim=0) * w, p.T * sqrt(w)


def loss_rows(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``outputs``/``targets`` as the ``[R, C]`` rows the loss treats independently.

    ``CrossEntropyLoss`` takes classes on dimension 1 (``[N, C, d₁, …]``, targets
    ``[N, d₁, …]``): every position is a row. ``MSELoss``/``BCEWithLogitsLoss`` treat
    every element alike: the last dimension becomes the columns. ``[N, C]`` stays as is.
    """
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.rows(outputs, targets)
    name = type(loss_fn).__name__
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if outputs.dim() <= 2:
            return outputs, targets
        expected = (outputs.shape[0], *outputs.shape[2:])
        if tuple(targets.shape) != expected:
            raise ValueError(
                f"{name}: an output of shape {tuple(outputs.shape)} (classes on dimension 1, "
                f"one row per position) needs class-index targets of shape {expected}, got "
                f"{tuple(targets.shape)}."
            )
        return outputs.movedim(1, -1).reshape(-1, outputs.shape[1]), targets.reshape(-1)
    if outputs.dim() == 2:
        return outputs, targets
    if targets.shape != outputs.shape:
        raise ValueError(
            f"{name}: targets must have the output's shape {tuple(outputs.shape)}, got "
            f"{tuple(targets.shape)}."
        )
    width = outputs.shape[-1] if outputs.dim() > 1 else 1
    return outputs.reshape(-1, width), targets.reshape(-1, width)


def has_extra_axes(loss_fn: nn.Module, targets: Tensor) -> bool:
    """Whether a batch with these ``targets`` has outputs beyond ``[N, C]``."""
    if isinstance(loss_fn, LikelihoodLoss):
        return False
    return torch.as_tensor(targets).dim() > (1 if isinstance(loss_fn, nn.CrossEntropyLoss) else 2)


def output_hessian_apply(
    loss_fn: nn.Module, outputs: Tensor, u: Tensor, targets: Tensor | None = None
) -> Tensor:
    """``∇²_f L · u`` row by row: ``[N, C]`` for ``u`` ``[N, C]``.

    The Hessian of the *reduced* loss w.r.t. each row's output (so it includes ``R``):
    CE ``R(diag(p) − ppᵀ)``, MSE ``2R·I``, BCE ``R·diag(σ(1−σ))``. It does not depend on
    the targets, which is why it equals the Fisher's output matrix — except through the
    rows they leave out: with ``targets``, rows equal to ``ignore_index`` are no part of
    the loss (zero rows) and ``R`` counts the others.
    """
    if isinstance(loss_fn, LikelihoodLoss):
        return loss_fn.output_matrix_apply(outputs.detach(), u, targets)
    f = outputs.detach()
    n, c = f.shape
    valid = None
    if targets is not None:
        scale = batch_scale(loss_fn, f, targets)
        r = 1.0 / scale.inv_reduction
        valid = scale.valid
    elif loss_fn.reduction == "sum":
        r = 1.0
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        r = 1.0 / n
    else:
        r = 1.0 / (n * c)
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        p = f.softmax(dim=1)
        result = r * (p * u - p * (p * u).sum(dim=1, keepdim=True))
    elif isinstance(loss_fn, nn.BCEWithLogitsLoss):
        s = f.sigmoid()
        result = r * s * (1 - s) * u
    else:
        result = 2.0 * r * u
    if valid is not None:
        result = result * valid.to(result.dtype).unsqueeze(-1)
    return result
