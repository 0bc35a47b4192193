"""``KFAC`` (Martens & Grosse 2015; convolutions as in Grosse & Martens 2016) and its other
name ``KFC``: one independent block ``kron(G, A)`` per layer of the rule table.

The factors, the layer selection and the diagonal blocks of every other parameter are
:class:`~curvlab.curvature.kronecker.factored.KroneckerFactored`'s; how a block is damped and
solved (exactly in the factors' eigenbases, or with Martens & Grosse's factored damping) is
a strategy of :mod:`~curvlab.curvature.kronecker.damping`; this module adds the closed forms
of the Kronecker identities. The block-tridiagonal structure is its own class,
:class:`~curvlab.BlockTridiagonalKFAC`.

With ``recurrent="independent"`` or ``"series"`` each affine map of an ``nn.RNN``/``nn.LSTM``/
``nn.GRU`` is a layer of its own (a :class:`~curvlab.extraction.recurrent.RecurrentAffine`
view) whose statistics come from a :class:`~curvlab.extraction.RecurrentStatistics`
request; a series map's block is the temporal model of :mod:`curvlab.linalg.kron_series`
(concepts/recurrent.md).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from curvlab import linalg
from curvlab.curvature.base import (
    STATE_LAYOUT,
    BatchResult,
    Layer,
    LayerMemory,
    NamedTensor,
    RunningCount,
    RunningSum,
)
from curvlab.curvature.kronecker.damping import (
    FactoredDamping,
    KroneckerDamping,
    LayerEigen,
    damping_strategy,
    eigenvalues_of,
    psd_eig,
)
from curvlab.curvature.kronecker.factored import (
    TIED_MODES,
    BlockDiagonalKronecker,
    KroneckerFactors,
    LayerSpec,
    _as_matrix,
    _unused_layer_batch,
    check_dtype,
)
from curvlab.curvature.registry import register
from curvlab.extraction import KroneckerBatch, KroneckerStatistics, Request
from curvlab.extraction import layers as layer_rules
from curvlab.extraction import recurrent as rnn_rules
from curvlab.extraction.requests import RecurrentStatistics

#: Settings of ``KFAC(recurrent=...)`` (concepts/recurrent.md).
RECURRENT_MODES = ("diagonal", "independent", "series")

#: The exact-damping solve of a tied embedding/head block (a sum of three Kronecker
#: products) by conjugate gradients stops at this many iterations at the latest.
TIED_CG_MAX_ITERATIONS = 100

__all__ = [
    "KFAC",
    "KFC",
    "RECURRENT_MODES",
    "TIED_MODES",
    "KroneckerFactors",
    "LayerSpec",
]


@register("kfac")
class KFAC(BlockDiagonalKronecker):
    """Kronecker-factored approximate curvature, one ``kron(G, A)`` block per layer.

    Args:
        model: the network; every layer type of the rule table gets Kronecker blocks
            (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and the types registered
            with :func:`curvlab.extraction.layers.register_kronecker_rule`), every other
            trainable parameter a diagonal block.
        loss_fn: ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss`` (mean or sum).
        fisher_type: ``"mc"`` (default, Martens & Grosse's sampled labels), ``"exact"``
            (the loss Hessian's square root: K-FAC of the exact Fisher/GGN) or
            ``"empirical"`` (observed labels).
        mc_samples: sampled labels per input for ``"mc"``.
        kfac_approx: ``"expand"`` (positions sharing a weight act like extra samples; KFC
            for convolutions) or ``"reduce"`` (positions are averaged/summed first).
        damping_mode: how ``solve`` damps, a name of
            :data:`~curvlab.curvature.kronecker.damping.DAMPING_MODES` or a
            :class:`~curvlab.curvature.kronecker.damping.KroneckerDamping` strategy:
            ``"exact"`` (default, :class:`~curvlab.curvature.kronecker.damping.EigenDamping`)
            applies ``(kron(G, A) + λI)⁻¹`` exactly in the factors' eigenbases;
            ``"factored"`` (:class:`~curvlab.curvature.kronecker.damping.FactoredDamping`)
            applies ``(G + γ/π I)⁻¹ ⊗ (A + πγ I)⁻¹`` with ``γ = √λ`` and π the trace-norm
            correction (concepts/kronecker.md#damped-inverse), the damped inverse Martens &
            Grosse use (two Cholesky factorisations per layer, no eigendecomposition).
            The block-tridiagonal structure is :class:`~curvlab.BlockTridiagonalKFAC`.
        layers: only these modules (objects or names from ``model.named_modules()``).
        exclude: modules to leave out (objects, names or glob patterns over names, e.g.
            ``["*norm*", "head"]``); their parameters are not in ``params``.
        strict: refuse (``ValueError`` naming the module and the reason) any trainable
            parameter without a Kronecker block instead of giving it a diagonal block.
        engine: ``"auto"``, ``"hooks"`` or ``"backpack"`` (see :class:`~curvlab.Curvature`).
        statistics_fraction: Kronecker factors from this share of each batch (its first
            samples; ``G`` rescaled to the whole batch), as Martens & Grosse do to cut the
            cost of the statistics. The gradient still uses the whole batch.
        factor_dtype: the dtype ``A`` and ``G`` are accumulated and kept in (``None``: the
            statistics' own, float32 or float64 — float32 also under bf16 autocast).
        inverse_dtype: the dtype of the eigendecompositions / damped inverses and of the
            solves with them (``None``: the factors'); ``torch.float64`` steadies
            ill-conditioned factors of a float32 model. Gradients are cast to it and the
            results back to the parameters' dtype.
        separate_bias: weight and bias in separate blocks, ``G ⊗ A_w`` and ``G ⊗ [a]``
            (curvlinops' ``separate_weight_and_bias``, what laplace-torch's ``Kron``
            uses): the joint ``A`` with its weight–bias cross entries set to zero, so its
            eigenvalues are ``A_w``'s and the homogeneous corner ``a``.
        recurrent: the blocks of ``nn.RNN``/``nn.LSTM``/``nn.GRU`` weights
            (concepts/recurrent.md): ``"diagonal"`` (default; the exact diagonal of the
            Fisher, as for any parameter without a Kronecker rule), ``"independent"``
            (Martens, Ba & Johnson's independent time steps: per layer and direction one
            ``kron(G, A)`` block for ``[W_ih | b_ih]`` over the inputs ``x_t`` and one for
            ``[W_hh | b_hh]`` over ``h_{t-1}``, ``G`` over all gates' pre-activation
            gradients, summed over the time steps) or ``"series"`` (their temporal model,
            option 1: the same factors plus lag-one factors, the block
            ``V_0^{1/2} ζ_T(Ψ) V_0^{1/2}``; its ``solve`` damps the zero-lag factors as
            ``damping_mode="factored"`` does, whatever ``damping_mode``, which then applies
            to the other layers). Both Kronecker settings replay the recurrence with plain
            torch operations (an extra forward and backward pass per batch); ``kfac_approx``
            does not apply to them (time steps always "expand").
        output_factor: how each layer keeps ``G``: ``"dense"`` (``[D_out, D_out]``),
            ``"structured"`` (diagonal plus rank ``output_rank``, for vocabulary-sized
            output layers; concepts/kronecker.md#vocabulary-sized-output-layers) or
            ``"auto"`` (default: structured from
            :data:`~curvlab.curvature.kronecker.factored.STRUCTURED_OUTPUT_THRESHOLD`
            outputs on); a dict from module names (or glob patterns) to these overrides
            single layers, the others being ``"auto"``. A structured layer needs damping
            > 0, is served by the hooks engine, and has no ``logdet``/``eigenvalues``.
        output_rank: the rank of a structured ``G``'s low-rank part.
        tied: the block of a weight ``W`` ``[V, d]`` tied between one ``nn.Embedding`` and
            one ``nn.Linear`` head (``head.weight = emb.weight``;
            concepts/kronecker.md#tied-embedding-and-output-head): ``"kronecker"``
            (default) joins the head's ``[W | b]`` and the embedding's use of ``W`` in one
            block ``G_h ⊗ A_h + D_e ⊗ B_e`` (the head's factors plus the embedding's
            diagonal input factor and output-gradient factor, a zero row and column for the
            bias), solved exactly as a sum of two Kronecker products; damping must be > 0.
            ``damping_mode="factored"`` damps the head's factors as for any layer and solves
            the sum in closed form (generalized eigendecompositions); ``"exact"`` (and a
            custom strategy) solves ``G_h ⊗ A_h + D_e ⊗ B_e + λI`` by conjugate gradients
            preconditioned with that closed form. ``coverage()`` calls the block
            :data:`~curvlab.curvature.kronecker.factored.TIED_KRONECKER_SUM`. A head with
            a structured output factor (``output_factor``) keeps the diagonal block, which
            ``coverage()`` says
            (:data:`~curvlab.curvature.kronecker.factored.TIED_STRUCTURED_DIAGONAL`).
            ``"diagonal"``: the tied weight (and the head's bias) in diagonal blocks of the
            Fisher, as for any shared parameter. Weights shared in any other way (two
            ``nn.Linear``, three modules, reduce) always get a diagonal block.
    """

    #: K-FAC's factors and, per map of ``recurrent="series"`` (``None`` elsewhere), the
    #: lag-one sums (concepts/recurrent.md#the-series-model): ``Σ ā_t ā_{t+1}ᵀ`` and the
    #: number of step pairs, both per sequence, and ``Σ_b w_b Σ g_t g_{t+1}ᵀ``.
    running_state = (
        *BlockDiagonalKronecker.running_state,
        RunningSum("lag_A", "_lag_a", per="lag_sequences", label="_layer_label", legacy="lag_A"),
        RunningSum("lag_G", "_lag_g", label="_layer_label", legacy="lag_G"),
        RunningSum(
            "lag_steps", "_lag_steps", per="lag_sequences", label="_layer_label", legacy="lag_steps"
        ),
        RunningCount("lag_sequences", "_lag_sequences", legacy="lag_sequences"),
        # per joint layer (None elsewhere) the tied embedding's factor sums
        # (concepts/kronecker.md#tied-embedding-and-output-head)
        RunningSum("tied_A", "_tied_a", per="tied_count", label="_layer_label"),
        RunningSum("tied_G", "_tied_g", symmetric=True, label="_layer_label"),
        RunningCount("tied_count", "_tied_count"),
    )

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "mc",
        mc_samples: int = 1,
        kfac_approx: str = "expand",
        damping_mode: str | KroneckerDamping | None = None,
        layers: Sequence[LayerSpec] | None = None,
        exclude: Sequence[LayerSpec] | None = None,
        strict: bool = False,
        engine: str = "auto",
        statistics_fraction: float = 1.0,
        separate_bias: bool = False,
        factor_dtype: torch.dtype | None = None,
        inverse_dtype: torch.dtype | None = None,
        recurrent: str = "diagonal",
        output_factor: str | Mapping[str, str] = "auto",
        output_rank: int = 64,
        tied: str = "kronecker",
    ) -> None:
        owner = type(self).__name__
        if tied not in TIED_MODES:
            raise ValueError(f"{owner}: unknown tied {tied!r}; choose one of {TIED_MODES}.")
        self.tied = tied
        # per layer (None but for joint layers): the tied embedding's factor sums
        self._tied_a: list[Tensor | None] | None = None
        self._tied_g: list[Tensor | None] | None = None
        if recurrent not in RECURRENT_MODES:
            raise ValueError(
                f"{owner}: unknown recurrent {recurrent!r}; choose one of {RECURRENT_MODES}."
            )
        self.recurrent = recurrent
        # per layer (None but for the maps of recurrent="series"): the lag-one sums
        self._lag_a: list[Tensor | None] | None = None
        self._lag_g: list[Tensor | None] | None = None
        self._lag_steps: list[Tensor | None] | None = None
        self._series: dict[int, tuple[float, linalg.SeriesBasis]] = {}
        self.inverse_dtype = check_dtype(inverse_dtype, "inverse_dtype", owner)
        #: the damped inverse of the Kronecker blocks (``damping_mode``)
        self.damping_strategy = damping_strategy(damping_mode, owner)
        super().__init__(
            model,
            loss_fn,
            fisher_type=fisher_type,
            mc_samples=mc_samples,
            kfac_approx=kfac_approx,
            layers=layers,
            exclude=exclude,
            strict=strict,
            engine=engine,
            statistics_fraction=statistics_fraction,
            separate_bias=separate_bias,
            factor_dtype=factor_dtype,
            output_factor=output_factor,
            output_rank=output_rank,
        )
        self._lag_sequences = [0] * len(self.layers)
        self._tied_count = [0] * len(self.layers)
        #: per joint layer (damping, the factored Kronecker sum's inverse)
        self._joint: dict[int, tuple[float, linalg.KronSumInverse]] = {}
        self._eigen: list[LayerEigen | None] | None = None  # per layer, computed lazily
        #: per structured layer, (damping, A's eigenpairs or damped inverse, capacitances)
        self._structured_cache: dict[int, tuple[float, Any, Tensor]] = {}
        self._inverses: tuple[float, list[tuple[Tensor, Tensor] | None]] | None = None

    @property
    def damping_mode(self) -> str:
        """The name of :attr:`damping_strategy` (``"exact"``, ``"factored"``, or a custom
        strategy's ``name``)."""
        return self.damping_strategy.name

    def _in_inverse_dtype(self, t: Tensor) -> Tensor:
        return t if self.inverse_dtype is None else t.to(self.inverse_dtype)

    def _invalidate(self) -> None:
        self._eigen = None
        self._inverses = None
        self._series = {}
        self._structured_cache = {}
        self._joint = {}

    # --- recurrent modules (concepts/recurrent.md) ------------------------------------------

    def _split_layer(self, layer: Layer) -> list[Layer] | None:
        module = layer.module
        if self.recurrent == "diagonal" or not isinstance(module, rnn_rules.RECURRENT_TYPES):
            return None
        owner = type(self).__name__
        rnn_rules.check_recurrent(module, layer.name, owner)
        own = dict(module.named_parameters(recurse=False))
        if any(not p.requires_grad for p in own.values()) or any(
            id(p) in self._tied for p in own.values()
        ):
            raise ValueError(
                f"{owner}: module '{layer.name}' ({type(module).__name__}) has frozen or tied "
                f"parameters; recurrent={self.recurrent!r} needs all of its weights "
                "trainable and its own. Pass recurrent='diagonal' or exclude=['"
                + layer.name
                + "']."
            )
        prefix = f"{layer.name}." if layer.name else ""
        return [
            Layer(
                name=prefix + m.block,
                module=m,
                params=tuple(p for p in (m.weight, m.bias) if p is not None),
                param_names=tuple(prefix + n for n in m.parameter_names()),
            )
            for m in rnn_rules.affine_maps(module)  # type: ignore[arg-type]
        ]

    def _is_recurrent(self, k: int) -> bool:
        return isinstance(self.layers[k].module, rnn_rules.RecurrentAffine)

    def _is_series(self, k: int) -> bool:
        return self.recurrent == "series" and self._is_recurrent(k)

    def _recurrent_modules(self) -> dict[str, nn.Module]:
        """The recurrent modules with Kronecker blocks, by name."""
        found: dict[str, nn.Module] = {}
        for layer in self.layers:
            if isinstance(layer.module, rnn_rules.RecurrentAffine):
                found[layer.name.rpartition(".")[0]] = layer.module.rnn
        return found

    def _recurrent_request(self) -> RecurrentStatistics:
        modules = self._recurrent_modules()
        return RecurrentStatistics(
            self.fisher_type,
            tuple(modules.values()),
            names=tuple(name or "<model>" for name in modules),
            mc_samples=self.mc_samples,
            lagged=self.recurrent == "series",
            sample_fraction=self.statistics_fraction,
        )

    def _kronecker_request(self) -> KroneckerStatistics:
        request = super()._kronecker_request()
        modules = tuple(m for m in request.modules if not isinstance(m, rnn_rules.RecurrentAffine))
        return dataclasses.replace(request, modules=modules)

    def _requests(self) -> list[Request]:
        requests = super()._requests()
        if self._recurrent_modules():
            requests.append(self._recurrent_request())
        return requests

    def _recurrent_batch(self, result: BatchResult, module: rnn_rules.RecurrentAffine) -> Any:
        request = self._recurrent_request()
        return result.recurrent.get(request.key, {}).get(id(module.rnn), {}).get(module.block)

    def _layer_batch(
        self, result: BatchResult, request: KroneckerStatistics, layer: Layer, k: int
    ) -> KroneckerBatch:
        module = layer.module
        if not isinstance(module, rnn_rules.RecurrentAffine):
            return super()._layer_batch(result, request, layer, k)
        found = self._recurrent_batch(result, module)
        return self._unused_layer_batch(k) if found is None else found.kron

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        super()._accumulate(result, weight)
        if self._partners:
            self._accumulate_partners(result, weight)
        if self.recurrent != "series":
            return
        for k, layer in enumerate(self.layers):
            if not isinstance(layer.module, rnn_rules.RecurrentAffine):
                continue
            found = self._recurrent_batch(result, layer.module)
            if found is None:
                continue
            a_lag = self._in_factor_dtype(found.a_lag)
            g_lag = self._in_factor_dtype(found.g_lag) * weight
            steps = a_lag.new_tensor(float(found.lag_count))
            if self._lag_a is None or self._lag_g is None or self._lag_steps is None:
                count = len(self.layers)
                self._lag_a, self._lag_g, self._lag_steps = (
                    [None] * count,
                    [None] * count,
                    [None] * count,
                )
            old_a, old_g, old_steps = self._lag_a[k], self._lag_g[k], self._lag_steps[k]
            self._lag_a[k] = a_lag if old_a is None else old_a + a_lag
            self._lag_g[k] = g_lag if old_g is None else old_g + g_lag
            self._lag_steps[k] = steps if old_steps is None else old_steps + steps
            self._lag_sequences[k] += found.sequences

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """As :meth:`~curvlab.Curvature.load_state_dict`; a state saved before ``tied=``
        existed (no tied embedding sums) holds none, which fits a model without a tied
        embedding and head (with one, its layers do not match and loading is refused)."""
        statistics = state.get("statistics")
        if state.get("layout") == STATE_LAYOUT and isinstance(statistics, dict):
            sums, counts = statistics.get("sums"), statistics.get("counts")
            if isinstance(sums, dict) and isinstance(counts, dict) and "tied_A" not in sums:
                sums = {**sums, "tied_A": None, "tied_G": None}
                counts = {**counts, "tied_count": None}
                state = {**state, "statistics": {**statistics, "sums": sums, "counts": counts}}
        super().load_state_dict(state)

    # --- tied embedding and head (concepts/kronecker.md#tied-embedding-and-output-head) ----

    def _accumulate_partners(self, result: BatchResult, weight: float) -> None:
        """Add the tied embeddings' factor sums of the batch (``D_e``'s counts, ``B_e``)."""
        request = self._kronecker_request()
        if self._tied_a is None or self._tied_g is None:
            self._tied_a, self._tied_g = [None] * len(self.layers), [None] * len(self.layers)
        for k, partner in self._partners.items():
            module = partner.module
            found = result.kronecker.get(request.key, {}).get(id(module))
            if found is None:
                found = _unused_layer_batch(module, self.kfac_approx, False)
            a = self._in_factor_dtype(found.a_sum)
            a = torch.diagonal(a) if a.ndim == 2 else a
            g = self._in_factor_dtype(found.g) * weight
            old_a, old_g = self._tied_a[k], self._tied_g[k]
            self._tied_a[k] = a if old_a is None else old_a + a
            self._tied_g[k] = g if old_g is None else old_g + g
            self._tied_count[k] += found.count

    def _is_joint(self, k: int) -> bool:
        """Whether layer ``k`` is a head tied to an embedding, in one Kronecker-sum block."""
        return k in self._partners

    def _partner_factors(self, k: int) -> tuple[Tensor, Tensor]:
        """``(D_e, B)`` of joint layer ``k``: the embedding's diagonal input factor ``[V]``
        and its output-gradient factor ``B_e`` ``[d, d]``, with a zero row and column for the
        head's bias coordinate (``[d + 1, d + 1]`` with a bias), on the head's ``[W | b]``."""
        f = self._factor(k)
        v, d_in = f.G.shape[0], f.A.shape[0]
        a = None if self._tied_a is None else self._tied_a[k]
        g = None if self._tied_g is None else self._tied_g[k]
        if a is None or g is None:
            return f.A.new_zeros(v), f.A.new_zeros(d_in, d_in)
        d_e = a / max(self._tied_count[k], 1)
        b_e = g / self._normalizer
        if d_in > b_e.shape[0]:  # the bias coordinate: the embedding has no bias
            b_e = torch.nn.functional.pad(b_e, (0, d_in - b_e.shape[0], 0, d_in - b_e.shape[0]))
        return d_e.to(f.A.dtype), b_e.to(f.A.dtype)

    def _joint_inverse(self, k: int, damping: float) -> linalg.KronSumInverse:
        """The closed-form inverse of ``(G_h + γ/π I) ⊗ (A_h + πγ I) + D_e ⊗ B_e``
        (``γ = √λ``, π of the head's factors), cached per damping."""
        cached = self._joint.get(k)
        if cached is not None and cached[0] == damping:
            return cached[1]
        self._check_joint_damping(k, damping)
        f = self._factor(k)
        d_e, b_e = self._partner_factors(k)
        g, a = self._in_inverse_dtype(f.G), self._in_inverse_dtype(f.A)
        damped_g, damped_a = linalg.factored_damping(g, a, damping)
        inverse = linalg.KronSumInverse.from_factors(
            damped_g,
            damped_a,
            torch.diag(self._in_inverse_dtype(d_e)),
            self._in_inverse_dtype(b_e),
            name=f"{self._layer_label(k)} (tied Kronecker sum)",
        )
        self._joint[k] = (damping, inverse)
        self.num_decompositions += 1
        return inverse

    def _check_joint_damping(self, k: int, damping: float) -> None:
        if damping <= 0.0:
            raise linalg.LinAlgError(
                f"{type(self).__name__}.solve: {self._layer_label(k)} is tied to embedding "
                f"'{self._partners[k].name}' and its block is the Kronecker sum "
                "G_h ⊗ A_h + D_e ⊗ B_e, which may be singular: it is solved with damping > 0 "
                "only (or construct the backend with tied='diagonal')."
            )

    def _joint_matvec(self, k: int, mat: Tensor) -> Tensor:
        """``G_h X A_h + D_e ⊙_rows (X B_e)`` for ``X`` = ``mat`` ``[V, d(+1)]``."""
        f = self._factor(k)
        d_e, b_e = self._partner_factors(k)
        return _kron_sum_apply(f.G, f.A, d_e, b_e, mat.to(f.G.dtype))

    def _joint_solve(self, k: int, mat: Tensor, damping: float) -> Tensor:
        """``damping_mode="factored"``: the factored Kronecker sum in closed form; otherwise
        ``(G_h ⊗ A_h + D_e ⊗ B_e + λI)⁻¹`` by conjugate gradients preconditioned with it, to a
        relative residual of ``1000·eps`` of the inverse dtype (at most
        :data:`TIED_CG_MAX_ITERATIONS` iterations; a ``RuntimeWarning`` names the layer and
        the residual if it stops short)."""
        inverse = self._joint_inverse(k, damping)  # checks damping > 0
        dtype = inverse.denominator.dtype
        y = mat.to(dtype)
        if isinstance(self.damping_strategy, FactoredDamping):
            return inverse.solve(y)
        f = self._factor(k)
        d_e, b_e = self._partner_factors(k)
        g, a = f.G.to(dtype), f.A.to(dtype)
        d_e, b_e = d_e.to(dtype), b_e.to(dtype)

        def operator(x: Tensor) -> Tensor:
            return _kron_sum_apply(g, a, d_e, b_e, x) + damping * x

        y_norm = float(torch.linalg.vector_norm(y))
        tol = 1000 * torch.finfo(dtype).eps * y_norm
        x = inverse.solve(y)
        r = y - operator(x)
        z = inverse.solve(r)
        p, rz = z, torch.sum(r * z)
        for _ in range(TIED_CG_MAX_ITERATIONS):
            if float(torch.linalg.vector_norm(r)) <= tol:
                break
            mp = operator(p)
            alpha = rz / torch.sum(p * mp)
            x = x + alpha * p
            r = r - alpha * mp
            z = inverse.solve(r)
            rz_new = torch.sum(r * z)
            p = z + (rz_new / rz) * p
            rz = rz_new
        else:
            residual = float(torch.linalg.vector_norm(r))
            if residual > tol:  # an approximate solve is said, never returned silently
                warnings.warn(
                    f"{type(self).__name__}: {self._layer_label(k)}: the tied block's solve "
                    f"stopped after {TIED_CG_MAX_ITERATIONS} conjugate-gradient iterations at "
                    f"relative residual {residual / y_norm:.2e} (a larger damping, "
                    "damping_mode='factored' or tied='diagonal' avoid it).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return x

    def _joint_dense(self, k: int) -> Tensor:
        """Joint layer ``k``'s ``kron(G_h, A_h) + kron(diag(D_e), B_e)`` in ``[vec(W), b]``
        order (small models)."""
        f = self._factor(k)
        d_e, b_e = self._partner_factors(k)
        perm = layer_rules.parameter_order(self.layers[k].module)
        dense = linalg.kron_dense(f.G, f.A) + linalg.kron_dense(torch.diag(d_e), b_e)
        return dense[perm][:, perm]

    def _lag_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(A1, G1, T)`` of series map ``k``: the symmetrised lag-one factors (``A1`` per
        step pair, ``G1`` on ``G``'s scale, summed over the steps) and the mean sequence
        length ``T``, from the lag sums (per sequence: ``Σ ā_t ā_{t+1}ᵀ`` and the step pairs,
        whose ratio is ``A1``)."""
        if self._lag_a is None or self._lag_g is None or self._lag_steps is None:
            return None
        a_lag, g_lag, lag_count = self._lag_a[k], self._lag_g[k], self._lag_steps[k]
        sequences = self._lag_sequences[k]
        if a_lag is None or g_lag is None or lag_count is None or sequences == 0:
            return None
        if float(lag_count) == 0.0:
            return None
        steps = 1.0 + float(lag_count) / sequences
        a1 = a_lag / lag_count
        g1 = g_lag / self._normalizer * (steps / (steps - 1.0))
        return (a1 + a1.mT) / 2, (g1 + g1.mT) / 2, a_lag.new_tensor(steps)

    def _series_factors(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
        """``(G0, G1, A0, A1, T)`` of series map ``k`` (concepts/recurrent.md#the-series-model):
        the zero-lag factors are the independent ones (``G0`` summed over the steps)."""
        f = self._factor(k)
        g0, a0 = self._in_inverse_dtype(f.G), self._in_inverse_dtype(f.A)
        lag = self._lag_factors(k)
        if lag is None:
            return g0, torch.zeros_like(g0), a0, torch.zeros_like(a0), 1.0
        a1, g1, steps = lag
        return g0, self._in_inverse_dtype(g1), a0, self._in_inverse_dtype(a1), float(steps)

    def _series_layers(self) -> list[int]:
        return [k for k in range(len(self.layers)) if self._is_series(k)]

    def _series_basis(self, k: int, damping: float) -> linalg.SeriesBasis:
        cached = self._series.get(k)
        if cached is not None and cached[0] == damping:
            return cached[1]
        g0, g1, a0, a1, steps = self._series_factors(k)
        if damping > 0.0:
            g0, a0 = linalg.factored_damping(g0, a0, damping)
        basis = linalg.series_basis(g0, g1, a0, a1, steps, name=self._layer_label(k))
        self._series[k] = (damping, basis)
        self.num_decompositions += 1
        return basis

    def _layer_eigen(self, k: int) -> LayerEigen:
        if self._is_joint(k):
            raise NotImplementedError(
                f"{type(self).__name__}: {self._layer_label(k)} shares its weight with "
                f"embedding '{self._partners[k].name}' and its block is a Kronecker sum "
                "(tied='kronecker'), which has no Kronecker-factored eigenbasis. Construct "
                "the backend with tied='diagonal' where one is needed."
            )
        if self._is_structured(k):
            raise NotImplementedError(
                f"{type(self).__name__}: {self._layer_label(k)} has a structured output "
                "factor, whose eigendecomposition is not formed (logdet, eigenvalues and "
                "eigenbases need it). Pass output_factor={'" + self.layers[k].name + "': "
                "'dense'} where the dense G fits."
            )
        if self._eigen is None:
            self._eigen = [None] * len(self.layers)
        eig = self._eigen[k]
        if eig is None:
            f = self._factor(k)
            a = self._in_inverse_dtype(f.A)
            eig = LayerEigen(
                G=psd_eig(self._in_inverse_dtype(f.G), f"{self._layer_label(k)} G"),
                A=a.clamp(min=0.0) if a.ndim == 1 else psd_eig(a, f"{self._layer_label(k)} A"),
            )
            self._eigen[k] = eig
            self.num_decompositions += 1
        return eig

    def _layer_memory(self, k: int) -> LayerMemory:
        """The factor sums, and per solve what the damping strategy keeps (``"exact"``: the
        eigenpairs of ``G`` and ``A``, a diagonal ``A`` its clamped diagonal; ``"factored"``:
        the two damped inverses) in ``inverse_dtype``."""
        factors = super()._layer_memory(k).factors
        d_out, d_in = layer_rules.weight_matrix_shape(self.layers[k].module)
        a_numel, g_numel = self._factor_numel(k)
        if self._is_joint(k):
            return self._joint_memory(k, factors, d_out, d_in)
        numel = self.damping_strategy.numel(
            d_out,
            d_in,
            a_numel,
            g_numel,
            self._is_diagonal_factor(k),
            self.output_rank if self._is_structured(k) else None,
        )
        itemsize = (
            self.inverse_dtype.itemsize
            if self.inverse_dtype is not None
            else self._factor_itemsize(k)
        )
        return LayerMemory(factors, numel * itemsize)

    def _joint_memory(self, k: int, factors: int, d_out: int, d_in: int) -> LayerMemory:
        """A joint layer: the head's factor sums and the embedding's (``D_e`` ``[V]``,
        ``B_e`` ``[d, d]``); per solve the Kronecker sum's generalized eigenvectors and
        values and its ``[V, d(+1)]`` denominators."""
        emb_weight: Tensor = self._partners[k].module.weight  # type: ignore[assignment]
        d = emb_weight.shape[1]
        factors += (d_out + d * d) * self._factor_itemsize(k)
        itemsize = (
            self.inverse_dtype.itemsize
            if self.inverse_dtype is not None
            else self._factor_itemsize(k)
        )
        numel = d_out * d_out + d_out + d_in * d_in + d_in + d_out * d_in
        return LayerMemory(factors, numel * itemsize)

    # --- one layer's block ---------------------------------------------------------------

    def _matvec_layer(self, k: int, parts: list[Tensor]) -> list[Tensor]:
        layer, f = self.layers[k], self._factor(k)
        if self._is_joint(k):
            out = self._joint_matvec(k, _as_matrix(layer, parts))
            return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))
        if self._is_series(k):
            basis = self._series_basis(k, 0.0)
            out = linalg.series_matvec(basis, _as_matrix(layer, parts).to(basis.z.dtype))
            return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))
        if isinstance(f.G, linalg.DiagonalPlusLowRank):  # G (V Aᵀ), G never dense
            mat = _as_matrix(layer, parts).to(f.A.dtype)
            right = mat * f.A if f.A.ndim == 1 else mat @ f.A.mT
            return layer_rules.from_matrix(layer.module, f.G.matmul(right).to(parts[0].dtype))
        mat = _as_matrix(layer, parts).to(f.G.dtype)
        out = linalg.kron_matvec(f.G, f.A, mat).to(parts[0].dtype)
        return layer_rules.from_matrix(layer.module, out)

    def _solve_layer(self, k: int, parts: list[Tensor], damping: float) -> list[Tensor]:
        """The block-diagonal damped solve of layer ``k`` (``parts``: its parameters)."""
        layer = self.layers[k]
        if self._is_series(k):  # the series model damps its zero-lag factors
            basis = self._series_basis(k, damping)
            out = linalg.series_solve(basis, _as_matrix(layer, parts).to(basis.z.dtype))
            return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))
        mat = _as_matrix(layer, parts)
        if self._is_joint(k):
            out = self._joint_solve(k, mat, damping)
            return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))
        if self._is_structured(k):  # never a [D_out, D_out] matrix
            if damping <= 0.0:
                raise linalg.LinAlgError(
                    f"{type(self).__name__}.solve: {self._layer_label(k)} has a structured "
                    "output factor, which is solved with damping > 0 only."
                )
            out = self.damping_strategy.solve_structured(self, k, mat, damping)
        else:
            out = self.damping_strategy.solve(self, k, mat, damping)
        return layer_rules.from_matrix(layer.module, out.to(parts[0].dtype))

    def _dense_layer(self, k: int) -> Tensor:
        if self._is_series(k):
            perm = layer_rules.parameter_order(self.layers[k].module)
            return linalg.series_dense(self._series_basis(k, 0.0))[perm][:, perm]
        if self._is_joint(k):
            return self._joint_dense(k)
        return self._kronecker_block(k)

    # --- closed forms (concepts/kronecker.md#kronecker-identities) --------------------------

    def _layer_spectra(self) -> list[Tensor]:
        """Per Kronecker layer, the eigenvalues ``d_G d_Aᵀ`` ``[D_out, D_in]``."""
        spectra = []
        for k in range(len(self.layers)):
            if self._is_series(k) or self._is_joint(k):
                # no closed form: the dense block's (small layers only)
                values = torch.linalg.eigvalsh(self._dense_layer(k)).clamp(min=0.0)
                spectra.append(
                    values.reshape(layer_rules.weight_matrix_shape(self.layers[k].module))
                )
            else:
                e = self._layer_eigen(k)
                spectra.append(torch.outer(e.G.eigenvalues, eigenvalues_of(e.A)))
        return spectra

    def _layer_diagonal_grid(self, k: int) -> Tensor:
        """Layer ``k``'s block diagonal as a ``[D_out, D_in]`` grid of ``[W | b]``."""
        if self._is_series(k):
            return linalg.series_diagonal(self._series_basis(k, 0.0))
        f = self._factor(k)
        grid = torch.outer(_diag_of(f.G), _diag_of(f.A))
        if self._is_joint(k):
            d_e, b_e = self._partner_factors(k)
            grid = grid + torch.outer(d_e, torch.diagonal(b_e))
        return grid

    def _trace(self) -> Tensor:
        parts = [self._layer_diagonal_grid(k).sum() for k in range(len(self.layers))]
        parts += [d.sum() for d in self._tail_diagonal()]
        return torch.stack(parts).sum()

    def _diagonal(self) -> Tensor:
        parts = []
        for k, layer in enumerate(self.layers):
            grid = self._layer_diagonal_grid(k).reshape(-1)
            parts.append(grid[layer_rules.parameter_order(layer.module).to(grid.device)])
        return torch.cat(parts + self._tail_diagonal())

    def _frobenius_norm(self) -> Tensor:
        squares = []
        for k in range(len(self.layers)):
            if self._is_series(k):
                squares.append(linalg.series_frobenius_norm(self._series_basis(k, 0.0)) ** 2)
            elif self._is_joint(k):  # ‖G⊗A‖² + ‖D⊗B‖² + 2 tr(G D) tr(A B)
                f = self._factor(k)
                d_e, b_e = self._partner_factors(k)
                squares.append(
                    _frobenius(f.G) ** 2 * torch.linalg.vector_norm(f.A) ** 2
                    + torch.linalg.vector_norm(d_e) ** 2 * torch.linalg.vector_norm(b_e) ** 2
                    + 2 * (torch.diagonal(f.G) * d_e).sum() * (f.A * b_e).sum()
                )
            else:
                f = self._factor(k)
                squares.append(_frobenius(f.G) ** 2 * torch.linalg.vector_norm(f.A) ** 2)
        squares += [d.square().sum() for d in self._tail_diagonal()]
        return torch.stack(squares).sum().sqrt()

    # --- distribution: a layer's decomposition is its eigenpairs or damped inverses ---------

    def _decompose(self, index: int, damping: float) -> None:
        if self._is_diagonal_block(index):
            return  # nothing to factorise: (d + λ)⁻¹
        if self._is_series(index):
            self._series_basis(index, damping)
            return
        if self._is_joint(index):
            self._joint_inverse(index, damping)
            return
        if self._is_structured(index):
            # its capacitances are formed by the solve that needs them (every process with
            # comm_opt, from the same reduced statistics; the owner with mem_opt): not shared
            return
        self.damping_strategy.decompose(self, index, damping)

    def _export_decomposition(self, index: int, damping: float) -> list[NamedTensor]:
        if self._is_diagonal_block(index) or self._is_structured(index):
            return []
        if self._is_series(index):
            cached = self._series.get(index)
            if cached is None or cached[0] != damping:
                raise RuntimeError(
                    f"{type(self).__name__}: {self._layer_label(index)} is not decomposed yet."
                )
            return [
                NamedTensor(f"{self._layer_label(index)} series {name}", t)
                for name, t in zip(linalg.SeriesBasis._fields, cached[1])
            ]
        if self._is_joint(index):
            joint = self._joint.get(index)
            if joint is None or joint[0] != damping:
                raise RuntimeError(
                    f"{type(self).__name__}: {self._layer_label(index)} is not decomposed yet."
                )
            inverse = joint[1]
            return [
                NamedTensor(f"{self._layer_label(index)} tied {name}", getattr(inverse, name))
                for name in _KRON_SUM_FIELDS
            ]
        return self.damping_strategy.export(self, index, damping)

    def _import_decomposition(self, index: int, damping: float, tensors: list[Tensor]) -> None:
        if self._is_diagonal_block(index) or self._is_structured(index):
            return
        if self._is_series(index):
            self._series[index] = (damping, linalg.SeriesBasis(*tensors))
            return
        if self._is_joint(index):
            fields = dict(zip(_KRON_SUM_FIELDS, tensors))
            self._joint[index] = (damping, linalg.KronSumInverse(**fields, sign=1))
            return
        self.damping_strategy.load(self, index, damping, tensors)


@register("kfc")
class KFC(KFAC):
    """K-FAC with convolutions (Grosse & Martens 2016): the same backend as :class:`KFAC`,
    which covers convolutions too; kept as the name of the convolutional recipe.

    For a convolution, ``kfac_approx="expand"`` is KFC: ``A = Ω/|T|`` from the unfolded input
    patches and ``G = |T|·Γ`` from the per-location output gradients
    (concepts/kronecker.md#convolutions-kfc). Stride,
    padding (zeros) and dilation are supported; grouped convolutions raise a clear error.
    Arguments as for :class:`KFAC`.
    """


#: The tensors of a :class:`~curvlab.linalg.KronSumInverse` a tied block exports.
_KRON_SUM_FIELDS = ("U_row", "s_row", "U_col", "s_col", "denominator")


def _kron_sum_apply(G: Tensor, A: Tensor, d: Tensor, B: Tensor, X: Tensor) -> Tensor:
    """``(G ⊗ A + diag(d) ⊗ B) vec(X)`` as a matrix: ``G X A + d ⊙_rows (X B)`` for ``X``
    ``[V, D]`` (row-major vec, symmetric factors)."""
    return G @ X @ A + d[:, None] * (X @ B)


def _diag_of(A: Any) -> Tensor:
    """The diagonal of a factor kept as a matrix, as its diagonal or structured."""
    if isinstance(A, linalg.DiagonalPlusLowRank):
        return A.diagonal()
    return A if A.ndim == 1 else torch.diagonal(A)


def _frobenius(G: Any) -> Tensor:
    if isinstance(G, linalg.DiagonalPlusLowRank):
        return G.frobenius_norm()
    return torch.linalg.matrix_norm(G)
