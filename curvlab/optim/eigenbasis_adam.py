"""``EigenbasisAdam``: AdamW run in the eigenbasis of the K-FAC Fisher.

The idea of EKFAC (George et al. 2018) and SOAP (Vyas et al. 2024): a layer's K-FAC block
``G ⊗ A`` has the eigenbasis ``Q_G ⊗ Q_A``; in that basis Adam's diagonal second moment
is a good model of the curvature, so Adam is run there instead of in the parameters'
coordinates (concepts/natural_gradient.md#adam-in-the-k-fac-eigenbasis).

Per step, for every layer with a dense Kronecker block (weight and bias as one homogeneous
matrix ``[W | b]`` of shape ``[D_out, D_in(+1)]``,
concepts/kronecker.md#notation-and-the-vec-convention):

1. the gradient matrix is rotated, ``g' = Q_Gᵀ g Q_A``;
2. Adam's moments live in the rotated basis: ``m' ← β₁m' + (1−β₁)g'``,
   ``v' ← β₂v' + (1−β₂)g'²``;
3. the update is rotated back, ``u = Q_G (m̂' / (√v̂' + ε)) Q_Aᵀ`` (``m̂', v̂'`` bias
   corrected as in Adam), and applied with decoupled weight decay:
   ``θ ← θ(1 − lr·wd) − lr·u``.

Every other trainable parameter (normalisation layers, raw parameters, tied weights, the
recurrent weights of a curvature without recurrent Kronecker blocks, layers whose output
factor is kept structured) takes plain AdamW; :meth:`EigenbasisAdam.coverage` says which
parameter takes which and why. Every ``update_every`` steps the K-FAC factors of the
step's batch are blended into a moving average (``factor_decay``); every
``refresh_every`` steps (and at the first step with factors) the eigenbases are
recomputed from the average and the moments carried over: ``m'`` exactly, ``v'``
approximately (:func:`rotate_moments`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.curvature.base import Curvature, Layer
from curvlab.curvature.kronecker.factored import STRUCTURED_OUTPUT_THRESHOLD, KroneckerFactored
from curvlab.curvature.kronecker.kfac import KFC
from curvlab.extraction import layers as layer_rules
from curvlab.extraction import recurrent as rnn_rules
from curvlab.optim.components import MovingAverage, graph_used_once

#: ``coverage()``'s value for a parameter updated in the K-FAC eigenbasis.
EIGENBASIS = "eigenbasis"
#: Version of the extra entry of :meth:`EigenbasisAdam.state_dict`.
STATE_FORMAT = 1


class EigenbasisAdam(torch.optim.Optimizer):
    """AdamW in the eigenbasis of each layer's K-FAC factors (EKFAC-style Adam, SOAP's idea).

    A training loop::

        opt = curvlab.EigenbasisAdam(model, loss_fn, lr=3e-3)
        for x, y in loader:
            opt.zero_grad()
            opt.backward(loss_fn(model(x), y))   # loss.backward() + K-FAC factors when due
            opt.step()

    Args:
        model: the network; its trainable parameters are the optimizer's (one param group).
        loss_fn: its loss (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``); needed
            when ``curvature`` is not given, else ``None`` or the curvature's own loss.
        curvature: the source of the factors: a Kronecker-factored backend over ``model``
            (:class:`~curvlab.KFAC`, :class:`~curvlab.KFC`, ...; its per-layer
            :meth:`~curvlab.curvature.kronecker.factored.KroneckerFactored.factors` are
            used, never its solves). Default: ``KFC(model, loss_fn, fisher_type=...,
            statistics_fraction=..., recurrent=...)`` restricted to the layers that get a
            dense Kronecker block, so that no statistics are taken for the parameters that
            take plain AdamW. The optimizer arms its recording and :meth:`close` closes it.
        lr, betas, eps, weight_decay: AdamW's (``torch.optim.AdamW``'s meaning: decoupled
            weight decay ``θ ← θ(1 − lr·weight_decay)``, also for biases); kept in the
            param group, so learning-rate schedulers work.
        factor_decay: decay of the moving average of the factors,
            ``ε = min(1 − 1/u, factor_decay)`` after ``u`` updates (a plain average at
            first; concepts/natural_gradient.md#moving-averages-of-the-statistics).
        update_every: take K-FAC factors on every this many steps (the steps whose
            :meth:`backward` runs the extra Fisher backward pass).
        refresh_every: recompute the eigenbases from the averaged factors every this many
            steps (also at the first step that has factors).
        fisher_type, statistics_fraction, recurrent: of the default curvature
            (``recurrent="independent"`` gives an LSTM's maps Kronecker blocks, hence an
            eigenbasis; concepts/recurrent.md).

    Parameters without a dense Kronecker block take plain AdamW, by these rules (the
    reason is in :meth:`coverage`): a parameter the curvature gives a diagonal block or
    does not cover; a layer whose output factor the curvature keeps structured (diagonal
    plus low rank: at least
    :data:`~curvlab.curvature.kronecker.factored.STRUCTURED_OUTPUT_THRESHOLD` outputs by
    default), which has no dense ``G`` to diagonalise; a recurrent map of
    ``recurrent="series"``, whose block is not a Kronecker product. A parameter whose
    ``.grad`` is ``None`` at ``step`` is skipped, as ``torch.optim`` does (a layer: when
    its weight has none).

    Single process only: with ``torch.distributed`` initialised over several processes
    each would compute its own eigenbasis from its own batch, so the construction
    raises.

    Attributes:
        curvature: the Kronecker-factored backend (``None`` when no layer has a block).
        blocks: the layers updated in the eigenbasis (:class:`~curvlab.Layer`: module,
            parameters, names).
        average: the :class:`~curvlab.optim.components.MovingAverage` of the factors,
            per block ``(A, G)``.
        steps: completed ``step()`` calls.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | None = None,
        *,
        curvature: Curvature | None = None,
        lr: float = 3e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        factor_decay: float = 0.95,
        update_every: int = 10,
        refresh_every: int = 100,
        fisher_type: str = "mc",
        statistics_fraction: float = 1.0,
        recurrent: str = "diagonal",
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if not (isinstance(factor_decay, (int, float)) and 0.0 <= factor_decay < 1.0):
            raise ValueError(f"{OWNER}: factor_decay must lie in [0, 1), got {factor_decay!r}.")
        for name, value in (("update_every", update_every), ("refresh_every", refresh_every)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{OWNER}: {name} must be an int >= 1, got {value!r}.")
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{OWNER}: model must be a torch.nn.Module, got {type(model).__name__}."
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                raise RuntimeError(
                    f"{OWNER}: runs in one process only (each process would compute its own "
                    "eigenbasis from its own batch and the replicas would drift apart)."
                )
        params = _unique(p for p in model.parameters() if p.requires_grad)
        if not params:
            raise ValueError(f"{OWNER}: the model has no trainable parameter.")
        names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
        if curvature is None:
            if loss_fn is None:
                raise ValueError(
                    f"{OWNER}: pass loss_fn (the default curvature is KFC(model, loss_fn)) "
                    "or curvature=."
                )
            source, reasons = _default_curvature(
                model, loss_fn, fisher_type, statistics_fraction, recurrent
            )
        else:
            if not isinstance(curvature, KroneckerFactored):
                raise TypeError(
                    f"{OWNER}: curvature must be a Kronecker-factored backend (KFAC, KFC, ...), "
                    f"got {type(curvature).__name__}."
                )
            if curvature.model is not model:
                raise ValueError(f"{OWNER}: the curvature belongs to another model.")
            if loss_fn is not None and curvature.loss_fn is not loss_fn:
                raise ValueError(f"{OWNER}: loss_fn is not the curvature's loss.")
            source, reasons = curvature, {}
        super().__init__(
            params, defaults={"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )
        self.model = model
        self.factor_decay = float(factor_decay)
        self.update_every = update_every
        self.refresh_every = refresh_every
        self.curvature = source
        self.average = MovingAverage(self.factor_decay)
        self.steps = 0
        self.blocks: list[Layer] = []
        self._indices: list[int] = []  # per block, its layer's index in curvature.layers
        self._reasons: dict[int, str] = {}  # id(param) -> why it takes plain AdamW
        in_basis: set[int] = set()
        if source is not None:
            diagonal = source.coverage()
            for k, layer in enumerate(source.layers):
                why = _no_eigenbasis_reason(source, k)
                if why is not None:
                    for p in layer.params:
                        self._reasons[id(p)] = why
                    continue
                self.blocks.append(layer)
                self._indices.append(k)
                in_basis.update(id(p) for p in layer.params)
            for name, p in zip(source.param_names, source.params):
                if id(p) not in in_basis and id(p) not in self._reasons:
                    self._reasons[id(p)] = f"{diagonal[name]} block in the curvature"
        for p in params:
            if id(p) not in in_basis and id(p) not in self._reasons:
                name = names.get(id(p), "")
                self._reasons[id(p)] = reasons.get(name, "not covered by the curvature")
        self._names = names
        self._in_basis = frozenset(in_basis)  # ids of the parameters of self.blocks
        self._gathering = False  # factors of the current step are being accumulated
        self._arm_recording()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only at construction: the optimizer keeps one group, the model's parameters
        (a layer's weight and bias share one eigenbasis and one state)."""
        if self.param_groups:
            raise NotImplementedError(
                f"{OWNER}: keeps one param group (the model's trainable parameters); build "
                "another optimizer for other parameters."
            )
        super().add_param_group(param_group)

    # --- what is where ----------------------------------------------------------------

    def coverage(self) -> dict[str, str]:
        """``{parameter name: how it is updated}`` for every parameter of the optimizer,
        in the model's order: :data:`EIGENBASIS` (``"eigenbasis"``) or ``"adamw (<why>)"``,
        e.g. ``"adamw (no Kronecker block in KFC (diagonal block))"`` for a LayerNorm's weight."""
        return {
            self._names.get(id(p), f"<parameter {i}>"): (
                EIGENBASIS if id(p) not in self._reasons else f"adamw ({self._reasons[id(p)]})"
            )
            for i, p in enumerate(self.param_groups[0]["params"])
        }

    @property
    def curvature_due(self) -> bool:
        """Whether the current step takes K-FAC factors (in :meth:`backward`)."""
        return (
            self.curvature is not None
            and bool(self.blocks)
            and (self.steps % self.update_every == 0)
        )

    # --- the training-loop API ----------------------------------------------------------

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, after accumulating its batch's K-FAC factors when due.

        ``loss`` must come from the curvature's ``loss_fn`` applied to the model's output in
        this step. Several calls before one :meth:`step` (gradient accumulation) give the
        factors of the union of their batches. A plain ``loss.backward()`` also works; the
        step then takes no factors.
        """
        self._check_open("backward")
        if not self.curvature_due:
            with graph_used_once():
                loss.backward()
            return
        assert self.curvature is not None
        if not bool(torch.isfinite(loss.detach()).all()):
            raise FloatingPointError(
                f"{OWNER}.backward: the loss is not finite ({float(loss.detach())}); no "
                "factors taken. Lower the learning rate."
            )
        if not self._gathering:
            self.curvature.reset()
            self._gathering = True
        self.curvature.accumulate(loss)
        with graph_used_once():
            loss.backward()

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """Blend new factors, refresh the eigenbases when due, take the AdamW step.

        ``closure`` (optional, as for ``torch.optim``) re-evaluates the loss and runs the
        backward pass (call ``opt.backward(loss)`` inside to take factors); its loss is
        returned.
        """
        self._check_open("step")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._gathering:
            self._gathering = False
            self._blend_factors()
        if self.average.value is not None and (
            self.steps % self.refresh_every == 0 or self._never_refreshed()
        ):
            self._refresh()
        group = self.param_groups[0]
        for layer in self.blocks:
            self._block_step(layer, group)
        for p in group["params"]:
            if id(p) not in self._in_basis and p.grad is not None:
                self._adamw_step(p, group)
        self.steps += 1
        self._arm_recording()
        return loss

    # --- factors and eigenbases ---------------------------------------------------------

    def _blend_factors(self) -> None:
        assert self.curvature is not None
        factors = self.curvature.factors()
        batch = [(factors[k].A, factors[k].G) for k in self._indices]
        self.average.update(batch)

    def _never_refreshed(self) -> bool:
        return any("basis_out" not in self.state[layer.params[0]] for layer in self.blocks)

    def _refresh(self) -> None:
        """New eigenbases from the averaged factors; the moments carried over
        (:func:`rotate_moments`)."""
        for layer, (A, G) in zip(self.blocks, self.average.value):
            weight = layer.params[0]
            state = self.state[weight]
            q_out = _eigenvectors(G).to(weight.dtype)
            q_in = None if A.ndim == 1 else _eigenvectors(A).to(weight.dtype)
            if "exp_avg" in state:
                old_out = state.get("basis_out")
                old_in = state.get("basis_in")
                rot_out = q_out if old_out is None else old_out.mT @ q_out
                rot_in = q_in if old_in is None or q_in is None else old_in.mT @ q_in
                state["exp_avg"], state["exp_avg_sq"] = rotate_moments(
                    state["exp_avg"], state["exp_avg_sq"], rot_out, rot_in
                )
            state["basis_out"] = q_out
            if q_in is not None:
                state["basis_in"] = q_in

    # --- the updates --------------------------------------------------------------------

    def _block_step(self, layer: Layer, group: dict[str, Any]) -> None:
        """One AdamW step of a Kronecker layer in its eigenbasis (module docstring)."""
        weight = layer.params[0]
        if weight.grad is None:
            return  # as torch.optim skips a parameter without gradient
        module = layer.module
        bias = layer.params[1] if len(layer.params) > 1 else None
        bias_grad = None
        if bias is not None:
            bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
        g = layer_rules.to_matrix(module, weight.grad, bias_grad)
        state = self.state[weight]
        q_out, q_in = state.get("basis_out"), state.get("basis_in")
        rotated = _rotate(g, q_out, q_in)
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(rotated)
            state["exp_avg_sq"] = torch.zeros_like(rotated)
        direction, step_size = self._adam_direction(state, rotated, group)
        update = _rotate_back(direction, q_out, q_in)
        lr, wd = group["lr"], group["weight_decay"]
        parts = layer_rules.from_matrix(module, update)
        for p, u in zip(layer.params, parts):
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_(u, alpha=-step_size)

    def _adamw_step(self, p: Tensor, group: dict[str, Any]) -> None:
        """One plain AdamW step (``torch.optim.AdamW``'s arithmetic)."""
        assert p.grad is not None
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        direction, step_size = self._adam_direction(state, p.grad, group)
        lr, wd = group["lr"], group["weight_decay"]
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.add_(direction, alpha=-step_size)

    @staticmethod
    def _adam_direction(
        state: dict[str, Any], grad: Tensor, group: dict[str, Any]
    ) -> tuple[Tensor, float]:
        """Update the moments with ``grad``; ``m / (√v̂ + ε)`` and the step size
        ``lr / (1 − β₁ᵗ)`` (``torch.optim.AdamW``'s arithmetic and order)."""
        beta1, beta2 = group["betas"]
        state["step"] = int(state["step"]) + 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
        return m / denom, group["lr"] / (1 - beta1**t)

    # --- recording and lifecycle --------------------------------------------------------

    def _arm_recording(self) -> None:
        """Record the forward passes of the coming step if it takes factors."""
        if self.curvature is None or self.curvature.closed:
            return
        recording = self.curvature.recording()
        recording.__exit__(None, None, None)
        recording.clear()
        if self.curvature_due:
            recording.__enter__()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def close(self) -> None:
        """Remove every hook and recording of the curvature from the model and the loss
        (closes the curvature; idempotent). Later ``backward``/``step`` calls raise a
        ``RuntimeError``; ``state_dict`` stays usable. ``with EigenbasisAdam(...) as opt:``
        closes on exit; without ``close`` the hooks go when the optimizer and its curvature
        are garbage collected."""
        self._closed = True
        if self.curvature is not None:
            self.curvature.close()

    _closed = False

    def __enter__(self) -> EigenbasisAdam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self, op: str) -> None:
        if self._closed:
            raise RuntimeError(
                f"{OWNER}.{op}: the optimizer is closed (close() removed its curvature's "
                "hooks); build a new one and load this one's state_dict() to continue."
            )

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """``torch.optim``'s state (per parameter ``step``, ``exp_avg``, ``exp_avg_sq`` —
        a Kronecker layer's in its weight's entry, as ``[D_out, D_in(+1)]`` matrices in the
        eigenbasis, with the bases ``basis_out``/``basis_in``), plus ``"eigenbasis"``: the
        step count and the moving average of the factors."""
        state = super().state_dict()
        state["eigenbasis"] = {
            "format": STATE_FORMAT,
            "steps": self.steps,
            "num_updates": self.average.num_updates,
            "average": self.average.value,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result into an optimizer over the same model (the
        tensors are copied, so the state of a live optimizer can be loaded)."""
        if "eigenbasis" not in state_dict:
            raise ValueError(
                f"{OWNER}.load_state_dict: the state lacks 'eigenbasis'; is it an "
                "EigenbasisAdam state?"
            )
        extra = state_dict["eigenbasis"]
        if extra.get("format") != STATE_FORMAT:
            raise ValueError(
                f"{OWNER}.load_state_dict: state format {extra.get('format')!r} is not "
                f"supported (this version reads {STATE_FORMAT})."
            )
        average = extra["average"]
        if average is not None and len(average) != len(self.blocks):
            raise ValueError(
                f"{OWNER}.load_state_dict: the state has factors of {len(average)} layers, "
                f"this optimizer has {len(self.blocks)} eigenbasis layers."
            )
        # copies: the moments are updated in place, and a state taken from a live optimizer
        # shares its tensors
        rest = copy.deepcopy({k: v for k, v in state_dict.items() if k != "eigenbasis"})
        super().load_state_dict(rest)
        if average is not None:
            device = self.blocks[0].params[0].device
            average = [(a.to(device).clone(), g.to(device).clone()) for a, g in average]
        self.average.value = average
        self.average.num_updates = int(extra["num_updates"])
        self.steps = int(extra["steps"])
        self._gathering = False
        self._arm_recording()


OWNER = "EigenbasisAdam"


def rotate_moments(
    exp_avg: Tensor, exp_avg_sq: Tensor, rot_out: Tensor, rot_in: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Adam's moments of one layer carried from an old eigenbasis to a new one.

    ``rot = Q_oldᵀ Q_new`` per side (``rot_in = None``: the input side keeps its basis).
    The first moment is linear in the gradients, so it is carried exactly:
    ``m_new = R_Gᵀ m R_A`` (the same matrix expressed in the new basis). The second
    moment is not: the exact one would need the full covariance of the rotated gradients,
    of which ``v`` keeps only the diagonal. Treating the old coordinates as uncorrelated,
    ``E[(Rᵀx)_j²] = Σ_i R_ij² E[x_i²]``, gives ``v_new = (R_G∘R_G)ᵀ v (R_A∘R_A)`` (``∘``:
    entrywise product), which is non-negative, keeps ``Σ v`` and is exact when a rotation
    only permutes or flips the basis vectors
    (concepts/natural_gradient.md#adam-in-the-k-fac-eigenbasis).
    """
    m = rot_out.mT @ exp_avg
    v = rot_out.square().mT @ exp_avg_sq
    if rot_in is not None:
        m = m @ rot_in
        v = v @ rot_in.square()
    return m, v


def _rotate(g: Tensor, q_out: Tensor | None, q_in: Tensor | None) -> Tensor:
    """``Q_Gᵀ g Q_A`` (a missing basis: the identity)."""
    if q_out is not None:
        g = q_out.mT @ g
    if q_in is not None:
        g = g @ q_in
    return g


def _rotate_back(u: Tensor, q_out: Tensor | None, q_in: Tensor | None) -> Tensor:
    """``Q_G u Q_Aᵀ`` (a missing basis: the identity)."""
    if q_out is not None:
        u = q_out @ u
    if q_in is not None:
        u = u @ q_in.mT
    return u


def _eigenvectors(factor: Tensor) -> Tensor:
    """The eigenvectors (columns) of a symmetric PSD factor, by ``torch.linalg.eigh`` in
    float32 (float64 for a float64 factor, or where float32 fails to converge)."""
    dtype = torch.float64 if factor.dtype == torch.float64 else torch.float32
    sym = factor.to(dtype)
    sym = 0.5 * (sym + sym.mT)
    try:
        return torch.linalg.eigh(sym).eigenvectors
    except torch.linalg.LinAlgError:
        return torch.linalg.eigh(sym.double()).eigenvectors.to(dtype)


def _no_eigenbasis_reason(curvature: KroneckerFactored, k: int) -> str | None:
    """Why Kronecker layer ``k`` of ``curvature`` gets no eigenbasis, or ``None``."""
    module = curvature.layers[k].module
    if curvature._is_structured(k):
        return (
            "structured output factor (diagonal plus low rank, no dense G to diagonalise; "
            f"output_factor, {STRUCTURED_OUTPUT_THRESHOLD} outputs or more by default)"
        )
    if isinstance(module, rnn_rules.RecurrentAffine) and getattr(curvature, "recurrent", "") == (
        "series"
    ):
        return "recurrent='series' block, not a Kronecker product"
    return None


def _default_curvature(
    model: nn.Module,
    loss_fn: nn.Module,
    fisher_type: str,
    statistics_fraction: float,
    recurrent: str,
) -> tuple[KroneckerFactored | None, dict[str, str]]:
    """``KFC`` over the layers that get a dense Kronecker block (none: ``None``), and why
    each other parameter gets none (by name)."""
    options: dict[str, Any] = {
        "fisher_type": fisher_type,
        "statistics_fraction": statistics_fraction,
        "recurrent": recurrent,
    }
    probe = KFC(model, loss_fn, output_factor="dense", **options)  # no hook until recording
    reasons: dict[str, str] = {}
    coverage = probe.coverage()
    chosen: list[nn.Module] = []
    for layer in probe.layers:
        if coverage[layer.param_names[0]] != "kronecker":
            continue  # e.g. a tied head's Kronecker-sum block: AdamW, the reason set below
        d_out, _ = layer_rules.weight_matrix_shape(layer.module)
        if d_out >= STRUCTURED_OUTPUT_THRESHOLD:
            for name in layer.param_names:
                reasons[name] = (
                    f"{d_out} outputs (≥ {STRUCTURED_OUTPUT_THRESHOLD}): a dense G and its "
                    "eigenvectors would be too large"
                )
            continue
        module = layer.module
        owner = module.rnn if isinstance(module, rnn_rules.RecurrentAffine) else module
        if not any(owner is m for m in chosen):
            chosen.append(owner)
    for name, kind in coverage.items():
        if kind != "kronecker":
            reasons[name] = f"{kind} block in KFC (no dense Kronecker block)"
    probe.close()
    if not chosen:
        return None, reasons
    return KFC(model, loss_fn, layers=chosen, output_factor="dense", **options), reasons


def _check_hyperparameters(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> None:
    def number(value: Any) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, float))

    if not (number(lr) and math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"{OWNER}: lr must be a finite float >= 0, got {lr!r}.")
    if not (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(number(b) and 0.0 <= b < 1.0 for b in betas)
    ):
        raise ValueError(f"{OWNER}: betas must be two floats in [0, 1), got {betas!r}.")
    if not (number(eps) and math.isfinite(eps) and eps >= 0.0):
        raise ValueError(f"{OWNER}: eps must be a finite float >= 0, got {eps!r}.")
    if not (number(weight_decay) and math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(
            f"{OWNER}: weight_decay must be a finite float >= 0, got {weight_decay!r}."
        )


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


__all__ = ["EIGENBASIS", "EigenbasisAdam", "rotate_moments"]
