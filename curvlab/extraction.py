"""BackPACK glue: the one module that imports BackPACK.

It decides which BackPACK extension delivers each Fisher type, prepares models and
losses (``extend``, support checks, a loss hook recording the batch's reduction),
runs the backward pass with the union of the requested extensions, and reads the
results out of the parameters' attributes into plain dictionaries, deleting the
attributes so no memory stays on the ``Parameter`` objects.

Every Fisher type is delivered as *factor rows*: per parameter ``p`` a tensor ``V_p``
of shape ``[K, p.numel()]`` such that the batch's curvature block between parameters
``p`` and ``q`` is ``V_pᵀ V_q`` on the loss's own scale (DESIGN.md "Conventions"):

* ``"exact"``: ``SqrtGGNExact``, ``K = C·N`` (loss-Hessian square root, scale R);
* ``"mc"``: ``SqrtGGNMC(mc_samples=M)``, ``K = M·N``;
* ``"empirical"``: ``BatchGrad`` rows ``R∇ℓ_n`` times ``sqrt(1/R)``, ``K = N``
  (so ``VᵀV = R Σ_n ∇ℓ_n ∇ℓ_nᵀ``, MATH.md §1.2 rule 2).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import sqrt
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from backpack import backpack, extend
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
from backpack.extensions.secondorder.base import SecondOrderBackpropExtension
from backpack.extensions.secondorder.hbp import LossHessianStrategy
from backpack.extensions.secondorder.sqrt_ggn import SqrtGGN
from backpack.extensions.secondorder.sqrt_ggn.base import SqrtGGNBaseModule
from backpack.extensions.secondorder.sqrt_ggn.losses import SqrtGGNBaseLossModule
from backpack.utils.module_classification import is_no_op
from backpack.utils.subsampling import subsample
from torch import Tensor, nn

from curvlab import layers
from curvlab.losses import BatchScale, batch_scale, check_loss, sample_targets

if TYPE_CHECKING:
    from curvlab.curvature.base import Curvature

FisherType = Literal["exact", "mc", "empirical"]
FISHER_TYPES: tuple[str, ...] = ("exact", "mc", "empirical")

_SAVEFIELDS: dict[str, str] = {
    "exact": "sqrt_ggn_exact",
    "mc": "sqrt_ggn_mc",
    "empirical": "grad_batch",
}

__all__ = [
    "FISHER_TYPES",
    "BackwardResult",
    "FisherType",
    "check_fisher_type",
    "extract",
    "fisher_extension",
    "fisher_rows",
]


def check_fisher_type(fisher_type: str, allowed: Sequence[str], owner: str) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``fisher_type`` is in ``allowed``."""
    if fisher_type not in allowed:
        raise ValueError(
            f"{owner}: unknown fisher_type {fisher_type!r}; choose one of {list(allowed)}."
        )


def check_mc_samples(mc_samples: int, owner: str) -> None:
    """Raise a ``ValueError`` unless ``mc_samples`` is a positive integer."""
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
        raise ValueError(f"{owner}: mc_samples must be a positive integer, got {mc_samples!r}.")


# --- loss-Hessian square root for multi-output BCE -----------------------------------


class _BCEWithLogitsDerivatives(BCELossWithLogitsDerivatives):
    """BCE-with-logits derivatives for ``[N, C]`` outputs with any ``C``.

    BackPACK 1.7.1 supports ``C = 1`` only and divides by ``N`` under ``mean``; PyTorch
    divides by ``N·C``. The loss Hessian is ``diag(σ(f)(1−σ(f)))`` (MATH.md §1.2), its
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


def fisher_extension(fisher_type: str, mc_samples: int = 1) -> BackpropExtension:
    """The BackPACK extension that delivers ``fisher_type``'s factor rows."""
    ext: BackpropExtension
    if fisher_type == "exact":
        ext = SqrtGGNExact()
    elif fisher_type == "mc":
        ext = SqrtGGNMC(mc_samples=mc_samples)
    elif fisher_type == "empirical":
        return BatchGrad()
    else:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; choose one of {FISHER_TYPES}.")
    ext.set_module_extension(
        nn.BCEWithLogitsLoss, SqrtGGNBaseLossModule(_BCEWithLogitsDerivatives()), overwrite=True
    )
    return ext


# --- Kronecker factors, computed inside the backward pass ----------------------------
#
# For K-FAC/KFC a layer's statistics are small (two factors), so they are computed in
# BackPACK's module hooks and stored instead of the large per-parameter quantities:
# ``{"A": Σ ā āᵀ, "count": N·T or N, "G": Σ g gᵀ}`` on the layer's weight (rules in
# ``curvlab.layers``). For "exact"/"mc" the ``g`` are BackPACK's backpropagated loss-Hessian
# square-root columns at the layer output (already on the loss's scale, MATH.md §1.3);
# for "empirical" they are the output gradients of the reduced loss, ``R ∂ℓ_n/∂s``, and
# ``G`` is rescaled by ``1/R`` when read (MATH.md §1.2 rule 3).

_KRON_DERIVATIVES = {
    nn.Linear: LinearDerivatives,
    nn.Conv1d: Conv1DDerivatives,
    nn.Conv2d: Conv2DDerivatives,
    nn.Conv3d: Conv3DDerivatives,
}


def _statistics_dtype(t: Tensor) -> Tensor:
    """Half-precision activations (autocast) are promoted: statistics stay float32/64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _kron_statistics(
    module: nn.Module, grad: Tensor, ext: Any, from_gradient: bool = False
) -> dict[str, Any]:
    x = cast(Tensor, module.input0)
    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
        x = _statistics_dtype(x.detach())
        grad = _statistics_dtype(grad.detach())
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
        self, fisher_type: str, kfac_approx: str, mc_samples: int = 1, keep_raw: bool = False
    ) -> None:
        strategy = (
            LossHessianStrategy.EXACT if fisher_type == "exact" else (LossHessianStrategy.SAMPLING)
        )
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

    With the observed labels this is the empirical Fisher's K-FAC; differentiating a loss
    on labels sampled from the model (``sampled=True``) gives the one-sample Monte-Carlo
    Fisher's factors in a single ordinary backward pass.
    """

    def __init__(self, kfac_approx: str, keep_raw: bool = False, sampled: bool = False) -> None:
        fisher_type = "mc" if sampled else "empirical"
        super().__init__(
            savefield=_kron_savefield(fisher_type, kfac_approx, keep_raw),
            module_exts={cls: _KronFromGradient() for cls in _KRON_DERIVATIVES},
            fail_mode="SILENT",  # coverage is checked up front (check_model), by name
        )
        self.kfac_approx = kfac_approx
        self.keep_raw = keep_raw


def _kron_savefield(fisher_type: str, kfac_approx: str, keep_raw: bool) -> str:
    return f"curvlab_kron_{fisher_type}_{kfac_approx}" + ("_raw" if keep_raw else "")


def kronecker_extension(
    fisher_type: str, kfac_approx: str, mc_samples: int = 1, keep_raw: bool = False
) -> BackpropExtension:
    """The extension that stores ``fisher_type``'s Kronecker factors on each layer's weight.

    With ``keep_raw`` it also keeps the layer's homogeneous input patches ``[N, T, D_in]``
    and output columns ``[K, N, T, D_out]`` of the batch (for EKFAC's refit).
    """
    if fisher_type == "empirical":
        return KroneckerGradient(kfac_approx, keep_raw)
    return KroneckerSqrt(fisher_type, kfac_approx, mc_samples, keep_raw)


@dataclass(frozen=True)
class KroneckerBatch:
    """One batch's statistics of one layer: ``A = a_sum / count``, ``G`` on the loss's scale.

    ``patches`` ``[N, T, D_in]`` and ``columns`` ``[K, N, T, D_out]`` are set when the
    extension kept them; ``column_scale`` brings ``Σ columns²`` onto the loss's scale.
    """

    a_sum: Tensor
    count: int
    g: Tensor
    patches: Tensor | None = None
    columns: Tensor | None = None
    column_scale: float = 1.0


def kronecker_statistics(
    result: BackwardResult,
    fisher_type: str,
    kfac_approx: str,
    weight: Tensor,
    name: str,
    keep_raw: bool = False,
) -> KroneckerBatch:
    """The batch's factors of the layer owning ``weight``, ``G`` on the loss's scale."""
    raw = result.get(_kron_savefield(fisher_type, kfac_approx, keep_raw), weight, name)
    # gradient columns are R·∂ℓ_n/∂s: their outer products need 1/R (MATH.md §1.2 rule 3);
    # BackPACK's square-root columns are already on the loss's scale
    scale = result.scale.inv_reduction if raw["gradient"] else 1.0
    return KroneckerBatch(
        a_sum=raw["A"],
        count=int(raw["count"]),
        g=raw["G"] * scale,
        patches=raw.get("patches"),
        columns=raw.get("columns"),
        column_scale=scale,
    )


def _extension_key(ext: BackpropExtension) -> tuple[object, ...]:
    mc = ext.get_num_mc_samples() if hasattr(ext, "get_num_mc_samples") else None
    return (type(ext), ext.savefield, mc)


def union_extensions(groups: Iterable[Sequence[BackpropExtension]]) -> list[BackpropExtension]:
    """Deduplicate extensions by savefield; conflicting settings raise a ``ValueError``."""
    chosen: dict[str, BackpropExtension] = {}
    for exts in groups:
        for ext in exts:
            known = chosen.get(ext.savefield)
            if known is None:
                chosen[ext.savefield] = ext
            elif _extension_key(known) != _extension_key(ext):
                raise ValueError(
                    f"Backends need incompatible BackPACK extensions for '{ext.savefield}': "
                    f"{_extension_key(known)} vs {_extension_key(ext)} (e.g. different "
                    "mc_samples); extract them in separate backward passes."
                )
    return list(chosen.values())


# --- model and loss preparation -------------------------------------------------------


def _module_map(ext: BackpropExtension) -> dict[type[nn.Module], object]:
    # BackPACK keeps the layer-type table private; reading it lets us fail at construction
    # with the module's name instead of deep inside a backward pass.
    return ext._BackpropExtension__module_extensions


def check_model(
    model: nn.Module,
    extensions: Sequence[BackpropExtension],
    owner: str,
    covered: Sequence[nn.Module] | None = None,
) -> None:
    """Raise a ``ValueError`` naming the first module BackPACK cannot handle.

    Second-order extensions backpropagate through every leaf module; first-order
    extensions only need the modules whose parameters are ``covered`` (default: all).
    """
    covered_ids = None if covered is None else {id(m) for m in covered}
    second_order = any(isinstance(e, SecondOrderBackpropExtension) for e in extensions)
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            has_own = next(module.parameters(recurse=False), None) is not None
            if has_own:
                raise ValueError(
                    f"{owner}: module '{name}' ({type(module).__name__}) holds parameters and "
                    "children; BackPACK cannot attribute its computation. Move its parameters "
                    "into a supported layer."
                )
            if second_order and not is_no_op(module):
                raise ValueError(
                    f"{owner}: container '{name or '<model>'}' ({type(module).__name__}) is a "
                    "custom nn.Module; BackPACK's second-order extensions (exact and MC "
                    "Fisher types) need nn.Sequential containers. Rewrite it as nn.Sequential "
                    "or use fisher_type='empirical'."
                )
            continue
        owns_params = any(p.requires_grad for p in module.parameters(recurse=False))
        if covered_ids is not None and id(module) not in covered_ids:
            owns_params = False  # left out by the backend: only the backpropagation matters
        for ext in extensions:
            needs = owns_params or isinstance(ext, SecondOrderBackpropExtension)
            table = _module_map(ext)
            if needs and type(module) not in table:
                supported = sorted({cls.__name__ for cls in table})
                raise ValueError(
                    f"{owner}: module '{name or '<model>'}' ({type(module).__name__}) is not "
                    f"supported by BackPACK's {type(ext).__name__}. Supported modules: "
                    f"{', '.join(supported)}."
                )


class _LossRecorder:
    """Forward pre-hook on the loss module: validates each call and keeps its ``BatchScale``."""

    def __init__(self, loss_fn: nn.Module) -> None:
        self.last: BatchScale | None = None
        self.autocast: tuple[str, torch.dtype] | None = None  # half-precision outputs
        loss_fn.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        outputs, targets = inputs[0], inputs[1]
        self.last = batch_scale(module, outputs, targets)
        half = outputs.dtype in (torch.float16, torch.bfloat16)
        self.autocast = (outputs.device.type, outputs.dtype) if half else None


_RECORDERS: weakref.WeakKeyDictionary[nn.Module, _LossRecorder] = weakref.WeakKeyDictionary()


def prepare(
    model: nn.Module,
    loss_fn: nn.Module,
    extensions: Sequence[BackpropExtension],
    owner: str,
    covered: Sequence[nn.Module] | None = None,
) -> None:
    """Validate ``model``/``loss_fn`` for ``extensions`` and make them BackPACK-ready.

    ``covered`` are the modules whose parameters the backend approximates (default: all).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module, got {type(model).__name__}.")
    check_loss(loss_fn)
    check_model(model, extensions, owner, covered)
    extend(model)
    extend(loss_fn)
    # BackPACK's full backward hooks make PyTorch warn on every backward whose inputs do
    # not require grad (the usual case); the warning carries no information for users.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    if loss_fn not in _RECORDERS:
        _RECORDERS[loss_fn] = _LossRecorder(loss_fn)


def last_batch_scale(loss_fn: nn.Module) -> BatchScale:
    """The ``BatchScale`` of the most recent call of ``loss_fn``."""
    recorder = _RECORDERS.get(loss_fn)
    if recorder is None or recorder.last is None:
        raise RuntimeError(
            "No loss evaluation recorded: call loss_fn(model(inputs), targets) and backward "
            "before accumulate()."
        )
    return recorder.last


# --- running the backward pass and reading results ------------------------------------


@dataclass
class BackwardResult:
    """What one backward pass left: the batch's scale and, per savefield, per parameter."""

    scale: BatchScale
    quantities: dict[str, dict[Tensor, Any]] = field(default_factory=dict)

    def get(self, savefield: str, param: Tensor, name: str) -> Any:
        """The quantity ``savefield`` of ``param`` (``name`` is used in the error)."""
        found = self.quantities.get(savefield, {}).get(param)
        if found is None:
            raise RuntimeError(
                f"BackPACK left no '{savefield}' on parameter '{name}'. Run the backward pass "
                "inside `with backpack(*curvature.extensions())` (or use update()/extract()), "
                "and make sure the parameter takes part in the loss."
            )
        return found


def collect(
    loss_fn: nn.Module, params: Iterable[Tensor], extensions: Sequence[BackpropExtension]
) -> BackwardResult:
    """Move the extensions' results off ``params`` into a ``BackwardResult``."""
    params = list(params)
    result = BackwardResult(scale=last_batch_scale(loss_fn))
    for ext in extensions:
        store = result.quantities.setdefault(ext.savefield, {})
        for p in params:
            value = getattr(p, ext.savefield, None)
            if value is not None:
                store[p] = value
                delattr(p, ext.savefield)
    return result


def fisher_rows(result: BackwardResult, fisher_type: str, param: Tensor, name: str) -> Tensor:
    """Factor rows ``[K, param.numel()]`` whose Gram matrix is the batch's curvature."""
    raw = result.get(_SAVEFIELDS[fisher_type], param, name)
    rows = _statistics_dtype(raw).reshape(-1, param.numel())
    if fisher_type == "empirical":
        rows = rows * sqrt(result.scale.inv_reduction)
    return rows


def _check_finite_loss(loss: Tensor) -> None:
    if not torch.isfinite(loss).all():
        raise FloatingPointError(f"The loss is not finite ({loss.item()}); no curvature taken.")


class suspended_hooks:
    """Context manager: ``model``'s module hooks (BackPACK's included) are switched off.

    ``torch.func`` transforms cannot run through BackPACK's backward hooks; the exact
    curvature products of the quadratic model (``curvlab.quadratic``) run inside this.
    """

    _KINDS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.saved: list[tuple[nn.Module, str, Any]] = []

    def __enter__(self) -> None:
        for module in self.model.modules():
            for kind in self._KINDS:
                hooks = getattr(module, kind)
                self.saved.append((module, kind, hooks.copy()))
                hooks.clear()

    def __exit__(self, *exc: object) -> None:
        for module, kind, hooks in self.saved:
            getattr(module, kind).update(hooks)
        self.saved = []


def _probe_parameters(model: nn.Module) -> list[Tensor]:
    """One (the smallest) trainable parameter per module that owns any.

    Differentiating only w.r.t. these makes the gradient flow through every layer's output,
    so every BackPACK module hook fires, while the weight gradients — unused by
    ``update``/``extract`` — are never formed (saves one matmul per layer).
    """
    probes: list[Tensor] = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own:
            probes.append(min(own, key=lambda p: p.numel()))
    return probes


def backward(
    loss: Tensor,
    extensions: Sequence[BackpropExtension],
    loss_fn: nn.Module,
    inputs: Sequence[Tensor] | None = None,
) -> None:
    """Backward pass with ``extensions`` active; BackPACK failures become clear errors.

    ``inputs=None`` is ``loss.backward()`` (gradients accumulate into ``.grad``); otherwise
    ``torch.autograd.grad(loss, inputs)``, which leaves ``.grad`` untouched. When the
    model ran under autocast (half-precision outputs reached ``loss_fn``), BackPACK's
    backward computations run under the same autocast; the statistics themselves are
    computed in float32 (``_statistics_dtype``).
    """
    recorder = _RECORDERS.get(loss_fn)
    cast_to = recorder.autocast if recorder is not None else None
    amp = (
        torch.autocast(device_type=cast_to[0], dtype=cast_to[1])
        if cast_to is not None
        else contextlib.nullcontext()
    )
    try:
        with backpack(*extensions), amp:
            if inputs is None:
                loss.backward()
            else:
                torch.autograd.grad(loss, list(inputs), allow_unused=True)
    except (AssertionError, NotImplementedError) as err:
        raise RuntimeError(
            "BackPACK could not backpropagate through the model. Every operation must be "
            "a supported nn.Module (no functional or in-place ops between layers). "
            f"BackPACK said: {err}"
        ) from err


def extract(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    curvatures: Sequence[Curvature],
) -> Tensor:
    """One forward and one backward pass feeding every curvature in ``curvatures``.

    The backward runs with the union of their BackPACK extensions; parameter
    gradients (``.grad``) are left exactly as they were. When every backend can be fed
    from labels sampled from the model (one-sample Monte-Carlo K-FAC), the backward
    differentiates the loss at those labels instead. Returns the detached loss (at the
    given targets).
    """
    if not curvatures:
        raise ValueError("extract: pass at least one curvature.")
    for c in curvatures:
        if c.model is not model or c.loss_fn is not loss_fn:
            raise ValueError(
                f"extract: {type(c).__name__} was built for another model or loss function."
            )
    outputs = model(inputs)
    loss = loss_fn(outputs, targets)
    _check_finite_loss(loss)
    sampled = [c._sampled_label_extensions() for c in curvatures]
    if all(exts is not None for exts in sampled):
        # every backend is fed by the gradient of the loss at labels drawn from the model:
        # one ordinary backward instead of BackPACK's parallel square-root chain
        extensions = union_extensions(exts for exts in sampled if exts is not None)
        objective = loss_fn(outputs, sample_targets(loss_fn, outputs))
    else:
        extensions = union_extensions(c.extensions() for c in curvatures)
        objective = loss
    backward(objective, extensions, loss_fn, inputs=_probe_parameters(model))
    result = collect(loss_fn, model.parameters(), extensions)
    for c in curvatures:
        c._consume(result)
    return loss.detach()
