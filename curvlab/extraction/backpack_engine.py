"""The BackPACK engine: the one module that imports BackPACK.

It serves :class:`~curvlab.extraction.requests.FactorRows` and
:class:`~curvlab.extraction.requests.KroneckerStatistics` for models BackPACK can run
(``nn.Sequential`` containers of supported layers) in **one** backward pass: the exact
Fisher's loss-Hessian square root (``SqrtGGNExact``), its Monte-Carlo version
(``SqrtGGNMC``) or per-sample gradients (``BatchGrad``) travel through the network
together. Its hooks are installed on the model for one extraction and removed afterwards;
BackPACK's results are read off the parameters into a ``BatchResult`` and deleted at once,
so nothing stays on ``Parameter`` objects. BackPACK keeps process-wide state (its active
extensions), so runs are serialised by a lock.

Factor rows per parameter ``p``: ``V_p`` ``[K, p.numel()]`` such that ``V_pᵀ V_q`` is the
batch's curvature block on the loss's own scale:

* ``"exact"``: ``SqrtGGNExact``, ``K = C·N`` (loss-Hessian square root, scale R);
* ``"mc"``: ``SqrtGGNMC(mc_samples=M)``, ``K = M·N``;
* ``"empirical"``: ``BatchGrad`` rows ``R∇ℓ_n`` times ``sqrt(1/R)``, ``K = N``.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import sqrt
from typing import Any, cast

import torch
from backpack import backpack, hook_run_extensions, hook_store_io, memory_cleanup
from backpack.core.derivatives.bcewithlogitsloss import BCELossWithLogitsDerivatives
from backpack.core.derivatives.conv1d import Conv1DDerivatives
from backpack.core.derivatives.conv2d import Conv2DDerivatives
from backpack.core.derivatives.conv3d import Conv3DDerivatives
from backpack.core.derivatives.linear import LinearDerivatives
from backpack.extensions import BatchGrad, SqrtGGNExact, SqrtGGNMC
from backpack.extensions.backprop_extension import BackpropExtension
from backpack.extensions.firstorder.base import (
    FirstOrderBackpropExtension,
    FirstOrderModuleExtension,
)
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNBaseLossModule
from backpack.utils.module_classification import is_no_op
from backpack.utils.subsampling import subsample
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from curvlab.extraction import layers
from curvlab.extraction.fisher_types import FisherType
from curvlab.extraction.losses import LikelihoodLoss, batch_scale, loss_rows
from curvlab.extraction.replay import replayable
from curvlab.extraction.requests import (
    Batch,
    BatchResult,
    FactorRows,
    KroneckerBatch,
    KroneckerStatistics,
    ParameterDiagonal,
    Request,
)

#: BackPACK's active extensions are process-wide: one extraction at a time.
_LOCK = threading.Lock()

__all__ = ["BackpackEngine", "run", "unsupported_reason"]


# --- loss-Hessian square root for multi-output BCE -----------------------------------


class _BCEWithLogitsDerivatives(BCELossWithLogitsDerivatives):
    """BCE-with-logits derivatives for ``[N, C]`` outputs with any ``C``.

    BackPACK 1.7.1 supports ``C = 1`` only and divides by ``N`` under ``mean``; PyTorch
    divides by ``N·C``. The loss Hessian is ``diag(σ(f)(1−σ(f)))`` (concepts/fisher_types.md), its
    square root is diagonal too; MC gradients ``σ(f) − ỹ`` with ``ỹ ~ Bernoulli(σ(f))``.
    The Fisher does not depend on the observed targets, so soft targets are allowed.
    """

    def __init__(self) -> None:
        super().__init__(use_autograd=False)

    def _verify_support(self, module: nn.BCEWithLogitsLoss) -> None:
        self._check_is_default(module)
        logits = cast(Tensor, module.input0)
        if logits.dim() != 2:
            raise NotImplementedError("BCEWithLogitsLoss: only [N, C] inputs are supported.")

    @staticmethod
    def _get_mean_normalization(input: Tensor) -> int:
        return input.numel()

    def _sqrt_hessian(
        self,
        module: nn.BCEWithLogitsLoss,
        g_inp: tuple[Tensor, ...],
        g_out: tuple[Tensor, ...],
        subsampling: list[int] | None,
    ) -> Tensor:
        self._verify_support(module)
        full = cast(Tensor, module.input0)
        logits = subsample(full, subsampling=subsampling)
        prob = logits.sigmoid()
        diag = (prob * (1 - prob)).sqrt()  # [N, C]
        sqrt_h = torch.diag_embed(diag).permute(1, 0, 2)  # [C, N, C]: δ_cc' √(σ(1−σ))_nc
        if module.reduction == "mean":
            sqrt_h = sqrt_h / sqrt(self._get_mean_normalization(full))
        return sqrt_h


@dataclass(frozen=True)
class _FisherSupport:
    """How BackPACK serves one Fisher type (the table :data:`_SUPPORT`)."""

    #: the extension that delivers the factor rows, given ``mc_samples``
    rows: Callable[[int], BackpropExtension]
    #: where that extension leaves them on each parameter
    savefield: str
    #: the rows are per-sample gradients ``R∇ℓ_n`` (first order), brought onto the loss's
    #: scale by ``sqrt(1/R)``; otherwise backpropagated loss-Hessian square-root columns
    gradient_rows: bool
    #: Kronecker statistics from backpropagated square-root columns with this strategy, or
    #: (``None``) from the output gradients of the reduced loss
    kronecker_strategy: str | None
    #: BackPACK's one backward beats the hooks engine for this type's Kronecker statistics
    #: of convolutional networks (``benchmarks/kfac_extraction``, docs/benchmarks.md)
    fast_kronecker: bool


#: The Fisher types BackPACK serves; any other is refused by :func:`unsupported_reason`.
_SUPPORT: dict[FisherType, _FisherSupport] = {
    FisherType.EXACT: _FisherSupport(
        lambda mc_samples: SqrtGGNExact(),
        "sqrt_ggn_exact",
        gradient_rows=False,
        kronecker_strategy=LossHessianStrategy.EXACT,
        fast_kronecker=True,
    ),
    FisherType.MC: _FisherSupport(
        lambda mc_samples: SqrtGGNMC(mc_samples=mc_samples),
        "sqrt_ggn_mc",
        gradient_rows=False,
        kronecker_strategy=LossHessianStrategy.SAMPLING,
        fast_kronecker=False,
    ),
    FisherType.EMPIRICAL: _FisherSupport(
        lambda mc_samples: BatchGrad(),
        "grad_batch",
        gradient_rows=True,
        kronecker_strategy=None,
        fast_kronecker=False,
    ),
}


def fisher_extension(fisher_type: FisherType, mc_samples: int = 1) -> BackpropExtension:
    """The BackPACK extension that delivers ``fisher_type``'s factor rows."""
    support = _SUPPORT[fisher_type]
    ext = support.rows(mc_samples)
    if not support.gradient_rows:
        ext.set_module_extension(
            nn.BCEWithLogitsLoss,
            SqrtGGNBaseLossModule(_BCEWithLogitsDerivatives()),
            overwrite=True,
        )
    return ext


# --- Kronecker factors, computed inside the backward pass ----------------------------
#
# For K-FAC/KFC a layer's statistics are small (two factors), so they are computed in
# BackPACK's module hooks and stored instead of the large per-parameter quantities:
# ``{"A": Σ ā āᵀ, "count": N·T or N, "G": Σ g gᵀ}`` on the layer's weight (rules in
# ``curvlab.extraction.layers``). For "exact"/"mc" the ``g`` are BackPACK's backpropagated
# loss-Hessian square-root columns at the layer output (already on the loss's scale); for
# "empirical" they are the output gradients of the reduced loss, ``R ∂ℓ_n/∂s``, and ``G``
# is rescaled by ``1/R`` when read (concepts/conventions.md).

_KRON_DERIVATIVES = {
    nn.Linear: LinearDerivatives,
    nn.Conv1d: Conv1DDerivatives,
    nn.Conv2d: Conv2DDerivatives,
    nn.Conv3d: Conv3DDerivatives,
}


def _kron_statistics(
    module: nn.Module, grad: Tensor, ext: Any, from_gradient: bool = False
) -> dict[str, Any]:
    x = cast(Tensor, module.input0)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = layers.statistics_dtype(x.detach())
        grad = layers.statistics_dtype(grad.detach())
        a_sum, count = layers.input_factor_sum(module, x, ext.kfac_approx)
        g = layers.output_factor(module, grad, ext.kfac_approx)
        stats: dict[str, Any] = {"A": a_sum, "count": count, "G": g, "gradient": from_gradient}
        if ext.keep_raw:  # EKFAC refits its diagonal from the per-sample quantities
            stats["patches"] = layers.layer_patches(module, x)
            stats["columns"] = layers.layer_columns(module, grad)
    return stats


class _KronFromSqrt(SqrtGGNBaseModule):
    """Backpropagates the loss-Hessian square root like BackPACK, stores factors on weight."""

    def __init__(self, derivatives: Any) -> None:
        super().__init__(derivatives, params=["weight"])

    def weight(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: Any, backproped: Tensor
    ) -> dict[str, Any]:
        return _kron_statistics(module, backproped, ext)


class _KronFromGradient(FirstOrderModuleExtension):
    """Factors from the output gradient of the reduced loss (one column, empirical)."""

    def __init__(self) -> None:
        super().__init__(params=["weight"])

    def weight(
        self, ext: Any, module: nn.Module, g_inp: Any, g_out: tuple[Tensor, ...], bp: Any
    ) -> dict[str, Any]:
        return _kron_statistics(module, g_out[0].unsqueeze(0), ext, from_gradient=True)


class KroneckerSqrt(SqrtGGN):
    """``SqrtGGNExact``/``SqrtGGNMC`` whose Linear/Conv hooks store Kronecker factors."""

    def __init__(
        self,
        fisher_type: FisherType,
        strategy: str,
        kfac_approx: str,
        mc_samples: int = 1,
        keep_raw: bool = False,
    ) -> None:
        super().__init__(strategy, _kron_savefield(fisher_type, kfac_approx, keep_raw), None)
        self.kfac_approx = kfac_approx
        self.keep_raw = keep_raw
        self._mc_samples = mc_samples
        for cls, derivatives in _KRON_DERIVATIVES.items():
            self.set_module_extension(cls, _KronFromSqrt(derivatives()), overwrite=True)
        self.set_module_extension(
            nn.BCEWithLogitsLoss, SqrtGGNBaseLossModule(_BCEWithLogitsDerivatives()), overwrite=True
        )

    def get_num_mc_samples(self) -> int:
        return self._mc_samples


class KroneckerGradient(FirstOrderBackpropExtension):
    """First-order extension storing Kronecker factors from the loss's output gradients.

    With the observed labels this is the empirical Fisher's K-FAC.
    """

    def __init__(self, fisher_type: FisherType, kfac_approx: str, keep_raw: bool = False) -> None:
        super().__init__(
            savefield=_kron_savefield(fisher_type, kfac_approx, keep_raw),
            module_exts={cls: _KronFromGradient() for cls in _KRON_DERIVATIVES},
            fail_mode="SILENT",  # applicability is checked up front (unsupported_reason)
        )
        self.kfac_approx = kfac_approx
        self.keep_raw = keep_raw


def _kron_savefield(fisher_type: FisherType, kfac_approx: str, keep_raw: bool) -> str:
    return f"curvlab_kron_{fisher_type.value}_{kfac_approx}" + ("_raw" if keep_raw else "")


def kronecker_extension(
    fisher_type: FisherType, kfac_approx: str, mc_samples: int = 1, keep_raw: bool = False
) -> BackpropExtension:
    """The extension that stores ``fisher_type``'s Kronecker factors on each layer's weight.

    With ``keep_raw`` it also keeps the layer's homogeneous input patches ``[N, T, D_in]``
    and output columns ``[K, N, T, D_out]`` of the batch (for EKFAC's refit).
    """
    strategy = _SUPPORT[fisher_type].kronecker_strategy
    if strategy is None:
        return KroneckerGradient(fisher_type, kfac_approx, keep_raw)
    return KroneckerSqrt(fisher_type, strategy, kfac_approx, mc_samples, keep_raw)


def _extensions(requests: Sequence[Request]) -> list[BackpropExtension]:
    """One extension per distinct savefield; conflicting settings raise a ``ValueError``."""
    chosen: dict[str, tuple[tuple[Any, ...], BackpropExtension]] = {}
    for r in requests:
        key: tuple[Any, ...]
        if isinstance(r, (FactorRows, ParameterDiagonal)):
            rows = r if isinstance(r, FactorRows) else r.rows()
            ext, key = fisher_extension(rows.fisher_type, rows.mc_samples), rows.key
        elif isinstance(r, KroneckerStatistics):
            ext = kronecker_extension(r.fisher_type, r.kfac_approx, r.mc_samples, r.keep_raw)
            key = r.key
        else:
            raise ValueError(f"{type(r).__name__} is served by the hooks engine only")
        known = chosen.get(ext.savefield)
        if known is None:
            chosen[ext.savefield] = (key, ext)
        elif known[0] != key:
            raise ValueError(
                f"Backends need incompatible BackPACK extensions for '{ext.savefield}' "
                f"({known[0]} vs {key}, e.g. different mc_samples); extract them in separate "
                "passes or use engine='hooks'."
            )
    return [ext for _, ext in chosen.values()]


# --- applicability ----------------------------------------------------------------------


def _module_map(ext: BackpropExtension) -> dict[type[nn.Module], object]:
    # BackPACK keeps the layer-type table private; reading it lets us say which module it
    # cannot handle before any backward pass.
    return ext._BackpropExtension__module_extensions  # type: ignore[no-any-return,unused-ignore]


def unsupported_reason(model: nn.Module, requests: Sequence[Request]) -> str | None:
    """Why BackPACK cannot serve ``requests`` on ``model``, or ``None`` if it can."""
    names = {id(m): name or "<model>" for name, m in model.named_modules()}
    for r in requests:
        if r.fisher_type not in _SUPPORT:
            return f"BackPACK has no extension for the {r.fisher_type.value!r} Fisher type"
        if not isinstance(r, (FactorRows, KroneckerStatistics, ParameterDiagonal)):
            modules = getattr(r, "modules", ())
            culprit = (
                f"module '{names.get(id(modules[0]), '?')}' ({type(modules[0]).__name__}) needs "
                if modules
                else ""
            )
            return f"{culprit}{type(r).__name__}, served by the hooks engine only"
        if isinstance(r, KroneckerStatistics) and r.low_rank_output:
            m = r.low_rank_output[0]
            return (
                f"module '{names.get(id(m), '?')}' ({type(m).__name__}) has a structured "
                "output factor, served by the hooks engine only"
            )
        if isinstance(r, KroneckerStatistics) and r.sample_fraction < 1.0:
            return "statistics on a subset of the batch are served by the hooks engine only"
        if isinstance(r, KroneckerStatistics):
            for m in r.modules:
                if type(m) not in _KRON_DERIVATIVES:
                    return (
                        f"BackPACK has no Kronecker statistics for module "
                        f"'{names.get(id(m), '?')}' ({type(m).__name__})"
                    )
    try:
        extensions = _extensions(requests)
    except ValueError as err:
        return str(err)
    seen: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            return f"parameter '{name}' is tied to '{seen[id(p)]}'"
        seen[id(p)] = name
    second_order = [e for e in extensions if not isinstance(e, FirstOrderBackpropExtension)]
    first_order = [e for e in extensions if isinstance(e, FirstOrderBackpropExtension)]
    for name, module in model.named_modules():
        label = f"module '{name or '<model>'}' ({type(module).__name__})"
        if next(module.children(), None) is not None:
            if next(module.parameters(recurse=False), None) is not None:
                return f"{label} holds parameters and children"
            if not is_no_op(module):
                return f"{label} is a custom container (BackPACK needs nn.Sequential)"
            if (
                isinstance(module, nn.Sequential)
                and type(module).forward is not nn.Sequential.forward
            ):
                # BackPACK runs the children in order and never sees what forward does
                return f"{label} subclasses nn.Sequential with its own forward"
            continue
        # second-order quantities travel through every module; first-order ones are
        # computed on the modules that own trainable parameters
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        for ext in second_order + (first_order if owns else []):
            if type(module) not in _module_map(ext):
                return f"{label} is not supported by BackPACK's {type(ext).__name__}"
        if isinstance(module, _BatchNorm) and module.training:
            # BackPACK's per-sample quantities treat the samples as independent: it refuses
            # second-order ones and gives wrong per-sample gradients (a warning) for first-order
            return (
                f"{label} is in training mode, which couples the samples; BackPACK treats "
                "them as independent"
            )
        if owns and isinstance(module, nn.Embedding):
            reason = _embedding_reason(module)
            if reason is not None:
                return f"{label} {reason}"
    return None


def _embedding_reason(module: nn.Embedding) -> str | None:
    """Why BackPACK's embedding derivatives cannot serve ``module``, or ``None``."""
    if module.padding_idx is not None or module.max_norm is not None:
        return "has padding_idx or max_norm, which BackPACK does not support"
    default = torch.get_default_dtype()
    if module.weight.dtype != default:
        # its weight Jacobian builds the one-hot inputs in the default dtype
        return (
            f"is {module.weight.dtype}; BackPACK's embedding derivatives work in the "
            f"default dtype ({default}) only"
        )
    return None


# --- one extraction -----------------------------------------------------------------------


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not is_no_op(m)]


def run(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    requests: Sequence[Request],
) -> tuple[Tensor, BatchResult]:
    """Forward and one backward pass with BackPACK; ``(detached loss, result)``.

    Parameter gradients (``.grad``) are left as they were. Check
    :func:`unsupported_reason` first.
    """
    extensions = _extensions(requests)
    with _LOCK, warnings.catch_warnings():
        # BackPACK's full backward hooks make PyTorch warn when the inputs do not require
        # grad (the usual case); the warning carries no information here.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        modules = [*_leaves(model), loss_fn]
        handles = [m.register_forward_hook(hook_store_io) for m in modules]
        handles += [m.register_full_backward_hook(hook_run_extensions) for m in modules]
        try:
            # detached: an input that requires grad (e.g. a laplace-torch fit with
            # enable_backprop) would otherwise keep the first layer's full backward hook
            # from firing, since only the parameters' gradients are asked for below
            outputs = model(inputs.detach())
            # clear errors before PyTorch's (also for outputs with extra axes, which the
            # engine choice keeps from BackPACK when the targets show them)
            scale = batch_scale(loss_fn, *loss_rows(loss_fn, outputs, targets))
            loss = loss_fn(outputs, targets)
            if not bool(torch.isfinite(loss).all()):
                raise FloatingPointError(
                    f"The loss is not finite ({loss.item()}); no curvature taken."
                )
            try:
                with backpack(*extensions):
                    torch.autograd.grad(loss, _probe_parameters(model), allow_unused=True)
            except (AssertionError, NotImplementedError) as err:
                raise RuntimeError(
                    "BackPACK could not backpropagate through the model (use "
                    f"engine='hooks'). BackPACK said: {err}"
                ) from err
            result = _collect(model, requests, BatchResult(scale=scale, engine="backpack"))
        finally:
            for h in handles:
                h.remove()
            for m in modules:
                memory_cleanup(m)
            for p in model.parameters():  # whatever BackPACK left, even after a failure
                for ext in extensions:
                    if hasattr(p, ext.savefield):
                        delattr(p, ext.savefield)
    return loss.detach(), result


def _collect(model: nn.Module, requests: Sequence[Request], result: BatchResult) -> BatchResult:
    """Move BackPACK's results off the parameters into ``result``."""
    for r in requests:
        if isinstance(r, (FactorRows, ParameterDiagonal)):
            store = result.rows.setdefault(r.key, {})
            for p in r.params:
                raw = getattr(p, _SUPPORT[r.fisher_type].savefield, None)
                if raw is None:
                    continue
                rows = layers.statistics_dtype(raw).reshape(-1, p.numel())
                if _SUPPORT[r.fisher_type].gradient_rows:
                    rows = rows * sqrt(result.scale.inv_reduction)
                store[id(p)] = rows
            if isinstance(r, ParameterDiagonal):  # the squares of the rows, not the rows
                squares = result.rows.pop(r.key)
                result.diagonals[r.key] = {
                    id(p): squares[id(p)].square().sum(0).reshape(p.shape)
                    if id(p) in squares
                    else layers.statistics_dtype(torch.zeros_like(p))
                    for p in r.params
                }
        elif isinstance(r, KroneckerStatistics):
            field = _kron_savefield(r.fisher_type, r.kfac_approx, r.keep_raw)
            kstore = result.kronecker.setdefault(r.key, {})
            for m in r.modules:
                raw = getattr(m.weight, field, None)
                if raw is None:
                    continue
                # gradient columns are R·∂ℓ_n/∂s: their outer products need 1/R (docs page
                # "Fisher types"); BackPACK's square-root columns are on the loss's scale
                scale = result.scale.inv_reduction if raw["gradient"] else 1.0
                kstore[id(m)] = KroneckerBatch(
                    a_sum=raw["A"],
                    count=int(raw["count"]),
                    g=raw["G"] * scale,
                    patches=raw.get("patches"),
                    columns=raw.get("columns"),
                    column_scale=scale,
                )
    return result


def _probe_parameters(model: nn.Module) -> list[Tensor]:
    """One (the smallest) trainable parameter per module that owns any.

    Differentiating only w.r.t. these makes the gradient flow through every layer's output,
    so every BackPACK module hook fires, while most weight gradients are never formed.
    """
    probes: list[Tensor] = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            probes.append(min(own, key=lambda p: p.numel()))
    return probes


# --- the engine -----------------------------------------------------------------------


def _rerun_reason(batch: Batch) -> str | None:
    """Why a recorded batch cannot be run again under BackPACK, or ``None``."""
    recorded = batch.recorded
    if batch.inputs is None:
        return (
            "BackPACK runs the recorded batch again, which needs a model call with one "
            "positional input"
        )
    if not bool(torch.isfinite(recorded.loss.detach()).all()):
        return "the recorded loss is not finite"
    if not replayable(batch.model):
        return (
            "BackPACK runs the recorded batch again, and a second forward pass of this model "
            "differs (dropout or BatchNorm running statistics in training mode)"
        )
    return None


class BackpackEngine:
    """BackPACK's one backward pass (module docstring), for plain ``nn.Sequential`` models
    of supported layers, torch's own losses and ``[N, C]`` outputs."""

    name = "backpack"

    def unable_reason(self, batch: Batch) -> str | None:
        reason = _rerun_reason(batch) if batch.recorded is not None else None
        if reason is None:
            reason = unsupported_reason(batch.model, batch.requests)
        if reason is None and isinstance(batch.loss_fn, LikelihoodLoss):
            reason = f"BackPACK knows torch's own losses only, not {type(batch.loss_fn).__name__}"
        if reason is None and batch.has_ignored_rows():
            reason = "BackPACK counts targets equal to ignore_index as part of the loss"
        if reason is None and batch.extra_axes:
            reason = "curvlab's BackPACK engine takes [N, C] outputs only, not extra axes"
        return reason

    def preferred(self, batch: Batch) -> bool:
        """Where BackPACK's one backward beats the hooks engine (``benchmarks/kfac_extraction``,
        docs/benchmarks.md): dense factor rows (its per-sample Jacobian products are fused
        into the backward pass) and the exact Fisher's Kronecker statistics of
        convolutional networks. Monte-Carlo and empirical Kronecker statistics, and the exact
        ones of fully-connected networks, are faster with the hooks engine, which
        backpropagates the columns to the layer outputs only and never forms weight
        gradients."""
        convolutional = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
        for r in batch.requests:
            if isinstance(r, KroneckerStatistics):
                if not _SUPPORT[r.fisher_type].fast_kronecker:
                    return False
                if not any(isinstance(m, convolutional) for m in r.modules):
                    return False
        return True

    def run(self, batch: Batch) -> tuple[Tensor, BatchResult]:
        assert batch.loss_fn is not None and batch.targets is not None
        return run(batch.model, batch.loss_fn, batch.inputs, batch.targets, list(batch.requests))
