"""``KFACOptimizer``: Martens & Grosse's full K-FAC recipe as a ``torch.optim.Optimizer``.

Per step (concepts/natural_gradient.md):

1. gradient ``g`` of ``h(θ) = L(θ) + (η/2)‖θ‖²`` and, every ``update_every`` steps, K-FAC
   statistics (moving average, inverses refreshed every ``invert_every`` steps) — a
   :class:`~curvlab.NaturalGradient` over the curvature does this;
2. proposal ``Δ = −F̆⁻¹ g`` with factored Tikhonov damping ``γ = √(λ + η)`` and π, ``λ``
   read at the last inversion step: the damped inverses are computed once per
   ``invert_every`` steps (Martens & Grosse's ``T3``), not again whenever ``λ`` adapts;
3. step sizes and momenta (one pair per layer by default, ``step_sizes``) from the
   exact-Fisher quadratic model with
   ``C = F + (λ+η)I``: ``[ΔᵀCΔ ΔᵀCδ₀; δ₀ᵀCΔ δ₀ᵀCδ₀][α; μ] = −[gᵀΔ; gᵀδ₀]`` (``F`` products
   by reverse-over-reverse products, :mod:`curvlab.optim.quadratic`), ``δ = αΔ + μδ₀``;
4. every ``damping_interval`` steps, ``λ`` adapts to ``ρ = (h(θ+δ) − h(θ)) / (M(δ) − M(0))``
   with ``M(δ) − M(0) = gᵀδ + ½δᵀ(F + ηI)δ`` (the λ term excluded, as the authors'
   implementations do).

The 2×2 solve and ``ρ`` read scalars back to the host (a few per step, documented).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import Curvature
from curvlab.curvature.kronecker.kfac import KFC
from curvlab.optim.damping import Damping, LevenbergMarquardt, OffsetDamping
from curvlab.optim.natural_gradient import NaturalGradient
from curvlab.optim.quadratic import CapturedCall, evaluate_capturing, ggn_gram, row_count


class KFACOptimizer(torch.optim.Optimizer):
    """K-FAC with adaptive damping and automatic step size and momentum.

    Args:
        model: the network.
        loss_fn: its loss (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``).
        curvature: the approximation; default ``KFC(model, loss_fn, fisher_type="mc",
            damping_mode="factored", statistics_fraction=statistics_fraction)``. Any backend
            works; its ``solve`` gives ``Δ``.
        damping: initial ``λ``. Levenberg–Marquardt adapts it by a factor of at most
            ``(19/20)^T1 ≈ 0.77`` per ``T1`` steps, so a start far above the λ the problem
            settles at costs tens of steps (Martens & Grosse start at 150 for losses summed
            over the outputs; the default 0.01 suits ``reduction="mean"`` losses, see
            docs/benchmarks.md, "Default settings across problems").
        l2: ``η``, the ℓ2 regularisation included in the objective (paper: 1e-5).
        damping_interval: ``T1``, steps between ``λ`` adaptations.
        update_every, invert_every, ema_decay: as for :class:`~curvlab.NaturalGradient`.
        momentum: use ``μ δ₀`` (otherwise ``μ = 0``).
        step_sizes: ``"layer"`` (default): the quadratic model chooses one ``(α_l, μ_l)``
            per layer, ``δ = Σ_l α_l Δ_l + μ_l δ₀_l`` (``Δ_l``: ``Δ`` restricted to layer
            ``l``'s parameters), a per-layer trust region that corrects the block-diagonal
            approximation's relative scale between layers (a module without a weight
            matrix, such as a normalisation layer, shares the pair of the module before it
            in the model's parameter order); ``"global"``: one ``(α, μ)``
            for the whole network, as Martens & Grosse. Layers are the modules that own
            parameters; beyond ``max_step_groups`` of them, consecutive layers share a
            coefficient pair (concepts/natural_gradient.md#per-layer-step-sizes).
        max_step_groups: the most coefficient pairs of ``step_sizes="layer"`` (each costs
            two Jacobian-vector products per step in the quadratic model).
        orthogonalize: ``True``: replace each weight matrix's proposal ``Δ_l``
            (convolutions as ``[out, in·k…]``; not embeddings) by its approximate polar
            factor (:func:`curvlab.linalg.orthogonalize`: the same singular vectors, a flat
            spectrum), as Muon does to the gradient, the quadratic model choosing its length
            per layer; ``"mix"``: give the quadratic model both ``Δ_l`` and its polar factor
            (three coefficients per layer); ``False`` (default): ``Δ`` as it is
            (concepts/natural_gradient.md#orthogonalised-directions).
        quadratic_fraction, quadratic_min_rows: the exact Fisher products of the
            quadratic model are computed on the batch's first
            ``min(N, max(round(quadratic_fraction·N), ⌈quadratic_min_rows / r⌉))`` samples,
            ``r`` the loss rows per sample (1 for ``[N, C]`` outputs, ``T`` for a sequence
            of ``T`` tokens, ``H·W`` per-pixel; a ``sum`` loss is rescaled to the whole
            batch). A small subset misjudges the curvature along the step on some batches
            (with 32 of 128 samples the digits classifiers of docs/benchmarks.md ended 2–4×
            higher), hence the minimum number of loss rows.
        layer_model_every: with ``step_sizes="layer"``, the per-layer model (two Jacobian-
            vector products per layer) runs every ``layer_model_every`` steps; the steps in
            between keep its coefficients' shape across layers, ``δ = s_α Σ_l α_l Δ_l +
            s_μ Σ_l μ_l δ₀_l``, and fit only the two scales ``s`` with the exact-Fisher model
            (two products) (concepts/natural_gradient.md#amortised-per-layer-step-sizes).
            ``1`` (default): every step.
        statistics_fraction: the share of the batch the default curvature takes its
            Kronecker statistics from (``KFC(statistics_fraction=...)``).

    ``step(closure)``: ``closure()`` evaluates the model on the current batch and returns
    the loss *without* calling ``backward`` (the optimizer runs the backward pass itself
    and calls the closure again, under ``no_grad``, to measure ``ρ``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        curvature: Curvature | None = None,
        damping: float = 0.01,
        l2: float = 1e-5,
        damping_interval: int = 5,
        update_every: int = 1,
        invert_every: int = 20,
        ema_decay: float = 0.95,
        momentum: bool = True,
        step_sizes: str = "layer",
        max_step_groups: int = 16,
        orthogonalize: bool | str = False,
        quadratic_fraction: float = 0.25,
        quadratic_min_rows: int = 128,
        layer_model_every: int = 1,
        statistics_fraction: float = 0.25,
    ) -> None:
        if not 0.0 < quadratic_fraction <= 1.0:
            raise ValueError(
                f"KFACOptimizer: quadratic_fraction must lie in (0, 1], got {quadratic_fraction}."
            )
        for name, value in (
            ("quadratic_min_rows", quadratic_min_rows),
            ("layer_model_every", layer_model_every),
        ):
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
                raise ValueError(f"KFACOptimizer: {name} must be an int >= 1, got {value!r}.")
        self.quadratic_fraction = quadratic_fraction
        self.quadratic_min_rows = quadratic_min_rows
        self.layer_model_every = layer_model_every
        if step_sizes not in STEP_SIZES:
            raise ValueError(
                f"KFACOptimizer: unknown step_sizes {step_sizes!r}; choose one of {STEP_SIZES}."
            )
        if isinstance(max_step_groups, bool) or not (
            isinstance(max_step_groups, int) and max_step_groups >= 1
        ):
            raise ValueError(
                f"KFACOptimizer: max_step_groups must be an int >= 1, got {max_step_groups!r}."
            )
        if orthogonalize not in (False, True, "mix"):
            raise ValueError(
                f"KFACOptimizer: orthogonalize must be False, True or 'mix', got {orthogonalize!r}."
            )
        self.step_sizes = step_sizes
        self.orthogonalize = orthogonalize
        if curvature is None:
            curvature = KFC(
                model,
                loss_fn,
                fisher_type="mc",
                damping_mode="factored",
                statistics_fraction=statistics_fraction,
            )
        if curvature.model is not model or curvature.loss_fn is not loss_fn:
            raise ValueError("KFACOptimizer: the curvature belongs to another model or loss.")
        if not (l2 >= 0 and math.isfinite(l2)):
            raise ValueError(f"KFACOptimizer: l2 must be finite and >= 0, got {l2}.")
        super().__init__(curvature.params, defaults={})
        self.model, self.loss_fn, self.l2, self.momentum = model, loss_fn, l2, momentum
        self.lm = LevenbergMarquardt(initial=damping, interval=damping_interval)
        self.precond = NaturalGradient(
            curvature,
            # λ + η for the factored inverses: read on inversion steps, held in between; the
            # preconditioner reads self.lm, never this optimizer
            damping=Damping(OffsetDamping(self.lm, l2), hold=True),
            update_every=update_every,
            invert_every=invert_every,
            ema_decay=ema_decay,
            kl_clip=None,  # the quadratic model chooses the step size
            distribution="local",  # the quadratic model reads this process's batch only
        )
        names = curvature.param_names
        self._matrices = [
            p.dim() >= 2 and not isinstance(_owner(curvature.model, n), nn.Embedding)
            for n, p in zip(names, curvature.params)
        ]  # the proposals orthogonalize=True replaces by polar factors
        self._groups = (
            _groups_in_model_order(model, names, curvature.params, max_step_groups)
            if step_sizes == "layer"
            else [list(range(len(names)))]
        )
        # the last per-layer model's coefficients: the shape the steps in between rescale
        self._held_coeffs: Tensor | None = None
        self.steps = 0
        # α, μ (per-layer means with step_sizes="layer"), ρ, λ of the last step, for logging
        self.last: dict[str, float] = {}

    def _objective(self, loss: Tensor, params: Sequence[Tensor]) -> float:
        """``h(θ) = L(θ) + (η/2)‖θ‖²`` for the batch loss ``L(θ)``."""
        return float(loss.detach()) + 0.5 * self.l2 * float(_dot(params, params))

    def _quadratic_samples(self, batch: int, rows: int) -> int:
        """How many of a batch of ``batch`` samples (``rows`` loss rows) the quadratic model
        uses."""
        per_sample = max(1, rows // batch)
        floor = -(-self.quadratic_min_rows // per_sample)
        wanted = max(round(self.quadratic_fraction * batch), floor)
        return max(1, min(batch, wanted))

    def _shape_due(self, coefficients: int) -> bool:
        """Whether this step runs the per-layer model (else it rescales the held
        coefficients, which must be as many as this step's pieces)."""
        held = self._held_coeffs
        if len(self._groups) == 1 or held is None or held.shape[0] != coefficients:
            return True
        return self.steps % self.layer_model_every == 0

    @staticmethod
    def _inner_products(
        vectors: list[list[Tensor | None]], grads: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """``vᵢᵀvⱼ`` and ``gᵀvᵢ`` of parameter-space ``vectors`` (``None``: zero); vectors
        on disjoint parameters (pieces of different step groups) are orthogonal."""
        present = [{i: x for i, x in enumerate(v) if x is not None} for v in vectors]
        inner = grads[0].new_zeros(len(vectors), len(vectors))
        linear = grads[0].new_zeros(len(vectors))
        for a, va in enumerate(present):
            linear[a] = _dot([grads[i] for i in va], list(va.values()))
            for b in range(a, len(vectors)):
                vb = present[b]
                common = [i for i in va if i in vb]
                if common:
                    value = _dot([va[i] for i in common], [vb[i] for i in common])
                    inner[a, b] = inner[b, a] = value
        return inner, linear

    def _split(self, vector: list[Tensor]) -> list[list[Tensor | None]]:
        """``vector`` restricted to each step group (``None``: zero elsewhere)."""
        if len(self._groups) == 1:
            return [list(vector)]
        pieces: list[list[Tensor | None]] = []
        for group in self._groups:
            members = set(group)
            pieces.append([v if i in members else None for i, v in enumerate(vector)])
        return pieces

    @property
    def params(self) -> list[nn.Parameter]:
        return self.precond.curvature.params

    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One K-FAC step on the batch ``closure`` evaluates; returns its loss."""
        if closure is None:
            raise ValueError("KFACOptimizer.step needs a closure that returns the loss.")
        params = self.params
        with torch.enable_grad():
            loss, call = evaluate_capturing(self.model, self.loss_fn, closure, "KFACOptimizer.step")
        for p in params:
            p.grad = None
        self.precond.backward(loss)
        # a parameter the loss does not use (a module the forward did not call) is left as
        # it is, as torch.optim skips a parameter without gradient
        used = [p.grad is not None for p in params]
        if not any(used):
            raise RuntimeError("KFACOptimizer: no covered parameter got a gradient from the loss.")
        with torch.no_grad():
            for p, present in zip(params, used):
                if not present:
                    p.grad = torch.zeros_like(p)
            grads = [
                (_grad(p) + self.l2 * p) if present else _grad(p)  # ∇h with the ℓ2 term
                for p, present in zip(params, used)
            ]
            for p, g in zip(params, grads):
                _grad(p).copy_(g)
        self.precond.step()  # p.grad <- F̆⁻¹ g
        with torch.no_grad():
            proposal = [
                -_grad(p) if present else torch.zeros_like(p) for p, present in zip(params, used)
            ]
            directions = [proposal]
            if self.orthogonalize:
                # bf16 iterations, as Muon: only a direction, measured by the exact model
                polar = [
                    linalg.orthogonalize(d, dtype=torch.bfloat16) if matrix else d
                    for d, matrix in zip(proposal, self._matrices)
                ]
                directions = [proposal, polar] if self.orthogonalize == "mix" else [polar]
            previous = [self.state[p].get("delta") for p in params]
            use_momentum = self.momentum and previous[0] is not None
            if use_momentum:
                directions.append(previous)
            vectors = [piece for d in directions for piece in self._split(d)]
            if self._shape_due(len(vectors)):  # per-layer model: 2 products per layer
                coeffs, model_change, h0 = self._quadratic_model(call, params, grads, vectors, loss)
                self._held_coeffs = coeffs
            else:  # amortised: the held per-layer shape, one global (α, μ) on it
                coeffs, model_change, h0 = self._rescaled_model(call, params, grads, vectors, loss)
            coeffs = coeffs.to(grads[0].dtype)
            delta = [
                sum(c * v[i] for c, v in zip(coeffs, vectors) if v[i] is not None)
                for i in range(len(params))
            ]
            adapt = self.lm.due(self.steps)
            if adapt and h0 is None:
                h0 = self._objective(loss, params)
            for p, d, present in zip(params, delta, used):
                self.state[p]["delta"] = d  # zero where the parameter is not used
                if present:
                    p.add_(d)
                else:
                    p.grad = None
            rho = float("nan")
            if adapt:
                assert h0 is not None
                rho = self.lm.observe(h0, self._objective(closure(), params), model_change)
        self.last = {
            "alpha": float(coeffs[: len(self._groups)].mean()),
            "mu": float(coeffs[-len(self._groups) :].mean()) if use_momentum else 0.0,
            "rho": rho,
            "damping": self.lm.value,
            "model_change": model_change,
        }
        self.steps += 1
        return loss.detach()

    def _quadratic_model(
        self,
        call: CapturedCall,
        params: Sequence[nn.Parameter],
        grads: list[Tensor],
        vectors: list[list[Tensor | None]],
        loss: Tensor,
    ) -> tuple[Tensor, float, float | None]:
        """The coefficients minimising the exact-Fisher quadratic model on the span of
        ``vectors``, its predicted change, and ``h(θ)`` when it was needed (else ``None``)."""
        batch = call.batch_size
        subset = self._quadratic_samples(batch, row_count(self.loss_fn, call.targets))
        gram = ggn_gram(self.model, self.loss_fn, call, params, vectors, subset)  # vᵢᵀFvⱼ
        if self.loss_fn.reduction == "sum":  # a sum over fewer samples: rescale
            gram = gram * (batch / subset)
        inner, linear = self._inner_products(vectors, grads)  # vᵢᵀvⱼ, gᵀvᵢ
        lam = self.lm.value
        coeffs, model_change = _model_minimum(gram, inner, linear, lam + self.l2, self.l2)
        h0 = None
        # The losses are ≥ 0, so h(θ + δ) ≥ 0: a model that predicts a decrease larger
        # than h(θ) is wrong that far out (a saturated softmax: the Fisher vanishes along
        # a direction the gradient does not). Raise λ until it does not
        # (concepts/natural_gradient.md#defaults-and-why).
        if -model_change > float(loss):  # h(θ) ≥ L(θ): the exact check only when close
            h0 = self._objective(loss, params)
            while -model_change > h0 and self.lm.value < self.lm.maximum:
                lam = self.lm.grow()
                coeffs, model_change = _model_minimum(gram, inner, linear, lam + self.l2, self.l2)
        return coeffs, model_change, h0

    def _rescaled_model(
        self,
        call: CapturedCall,
        params: Sequence[nn.Parameter],
        grads: list[Tensor],
        pieces: list[list[Tensor | None]],
        loss: Tensor,
    ) -> tuple[Tensor, float, float | None]:
        """The per-layer model's held coefficients ``c`` as a shape: per direction ``a``
        the combination ``u_a = Σ_l c_{a,l} v_{a,l}`` of its pieces, then the quadratic
        model on the span of the ``u_a`` (two products per step instead of two per layer).
        Returns the pieces' coefficients ``s_a c_{a,l}``."""
        assert self._held_coeffs is not None
        held = self._held_coeffs
        k = len(self._groups)
        combined: list[list[Tensor | None]] = []
        for a in range(0, len(pieces), k):
            total: list[Tensor | None] = [None] * len(params)
            for piece, c in zip(pieces[a : a + k], held[a : a + k].tolist()):
                for i, x in enumerate(piece):
                    if x is not None:
                        total[i] = c * x
            combined.append(total)
        scales, model_change, h0 = self._quadratic_model(call, params, grads, combined, loss)
        return held * scales.to(held.dtype).repeat_interleave(k), model_change, h0

    def close(self) -> None:
        """Remove every hook and recording on the model and the loss: closes the
        preconditioner and its curvature (idempotent; see :meth:`NaturalGradient.close`).
        Later steps raise a ``RuntimeError``. ``with KFACOptimizer(...) as opt:`` closes on
        exit; without ``close`` the hooks go when the optimizer is garbage collected."""
        self.precond.close()

    def __enter__(self) -> KFACOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["kfac"] = {
            "steps": self.steps,
            "lm": self.lm.state_dict(),
            "held_coeffs": self._held_coeffs,
            "precond": self.precond.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict["kfac"]
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfac"})
        self.steps = int(extra["steps"])
        self.lm.load_state_dict(extra["lm"])
        self._held_coeffs = extra.get("held_coeffs")
        self.precond.load_state_dict(extra["precond"])
        if extra.get("held_damping") is not None:  # written before the preconditioner held λ
            self.precond.damping_policy.held = float(extra["held_damping"])


#: How the quadratic model's step sizes are shared: per layer, or one for the network.
STEP_SIZES = ("layer", "global")


def step_groups(
    names: Sequence[str], limit: int, matrices: Sequence[bool] | None = None
) -> list[list[int]]:
    """Indices of ``names`` grouped by the module that owns each parameter (its dotted
    path without the last part), in order. With ``matrices`` (whether each parameter is a
    weight matrix), a module without one (a normalisation layer, a lone bias) joins the
    group before it: its few parameters do not need a step size of their own, and each
    group costs two double-backward passes. More than ``limit`` groups are merged into
    ``limit`` runs of consecutive groups."""
    owners: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        owners.setdefault(name.rpartition(".")[0], []).append(i)
    groups: list[list[int]] = []
    for members in owners.values():
        if groups and matrices is not None and not any(matrices[i] for i in members):
            groups[-1].extend(members)
        else:
            groups.append(list(members))
    if len(groups) <= limit:
        return groups
    merged: list[list[int]] = [[] for _ in range(limit)]
    for k, group in enumerate(groups):
        merged[k * limit // len(groups)].extend(group)
    return merged


def _groups_in_model_order(
    model: nn.Module, names: Sequence[str], params: Sequence[Tensor], limit: int
) -> list[list[int]]:
    """:func:`step_groups` of the covered parameters taken in the model's order
    (``named_parameters``), as indices into ``names``: a curvature lists the parameters of
    its diagonal blocks (normalisation layers, raw parameters) after its Kronecker blocks,
    and in that order every normalisation layer would join the group of the last
    Kronecker layer or raw parameter instead of the layer before it in the model."""
    position = {id(p): k for k, p in enumerate(model.parameters())}
    order = sorted(range(len(names)), key=lambda i: position.get(id(params[i]), len(position)))
    groups = step_groups([names[i] for i in order], limit, [params[i].dim() >= 2 for i in order])
    return [[order[j] for j in group] for group in groups]


def _owner(model: nn.Module, name: str) -> nn.Module | None:
    """The module that owns the parameter called ``name`` (``None`` if not found)."""
    try:
        return model.get_submodule(name.rpartition(".")[0])
    except AttributeError:
        return None


def _grad(p: Tensor) -> Tensor:
    if p.grad is None:
        raise RuntimeError("KFACOptimizer: a covered parameter got no gradient from the loss.")
    return p.grad


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``Σᵢ ⟨aᵢ, bᵢ⟩`` without a temporary per pair."""
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b)]).sum()


def _model_minimum(
    gram: Tensor, inner: Tensor, linear: Tensor, damping: float, l2: float
) -> tuple[Tensor, float]:
    """The coefficients minimising the quadratic model with ``C = F + damping·I`` on the
    span (``gram``: ``vᵢᵀFvⱼ``, ``inner``: ``vᵢᵀvⱼ``, ``linear``: ``gᵀvᵢ``), in float64, and
    its change ``M(δ) − M(0) = gᵀδ + ½ δᵀ(F + ηI)δ`` without the λ term."""
    gram, inner, linear = gram.double(), inner.double(), linear.double()
    coeffs = _solve_model(gram + damping * inner, linear)
    quad = coeffs @ (gram + l2 * inner) @ coeffs
    return coeffs, float(coeffs @ linear + 0.5 * quad)


def _solve_model(curvature: Tensor, linear: Tensor) -> Tensor:
    """Minimiser of ``½ cᵀ C c + linearᵀ c``
    (concepts/natural_gradient.md#step-size-and-momentum-from-the-quadratic-model): ``c = −C⁺
    linear``, the minimum-norm one. ``C`` (float64, PSD) is singular when two directions
    coincide (``δ₀ ∥ Δ``; a layer without gradient; with ``orthogonalize="mix"``, a layer
    without a matrix, whose polar direction is its proposal): the pseudo-inverse splits
    the coefficient between them instead of blowing up."""
    if curvature.shape[0] == 1:
        return -linear / curvature[0, 0]
    return -torch.linalg.pinv(curvature, hermitian=True, rtol=1e-12) @ linear
