"""Matrix-free exact curvature: the GGN/Fisher and the Hessian as operators
(concepts/matrix_free.md).

:class:`MatrixFreeGGN` and :class:`MatrixFreeHessian` hold *data* instead of statistics:
``update(inputs, targets)`` (or ``update(loader)``) adds batches, and every product runs
over all of them at the parameters the model has at that moment, from Jacobian-vector and
vector-Jacobian products by reverse mode only
(concepts/matrix_free.md#products-without-forward-mode-ad). Nothing of size ``P × P``
is ever formed; a product costs about one forward and three backward passes per batch
(GGN) or one forward and two backward passes (Hessian).

Scale: the curvature of the loss exactly as it is reduced over the union of the batches,
the same convention as :class:`curvlab.ExactFisher` and :class:`curvlab.EmpiricalFisher`
(concepts/conventions.md).

They are ``Curvature`` subclasses for the operator interface and ``update`` (the union
of batches on the loss's scale), but not registered backends: a registered backend takes
batch statistics (``curvlab.extract``, ``recording``/``accumulate``, ``statistics``, a
``NaturalGradient``), which an operator that needs the batch itself cannot; those raise a
``TypeError`` saying so.

``trace``, ``diagonal``, ``eigenvalues(k)``, ``frobenius_norm`` and ``logdet`` are
estimates (Hutch++, Diag++, Lanczos, stochastic Lanczos quadrature from
:mod:`curvlab.linalg.estimators`); the ``estimate_*`` methods return them with their
errors. ``solve`` runs conjugate gradients.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvlab import linalg
from curvlab.curvature.base import (
    Curvature,
    StateTag,
    Vector,
    find_layers,
    top_symmetric_eigenvalues,
)
from curvlab.extraction import FisherType, check_mc_samples
from curvlab.extraction.hooks import suspended_hooks
from curvlab.extraction.losses import (
    BatchScale,
    batch_scale,
    loss_rows,
    output_hessian_apply,
)
from curvlab.extraction.products import (
    hessian_vector_products,
    jacobian_vector_products,
    transposed_jacobian,
    vector_jacobian_products,
)
from curvlab.extraction.requests import BatchResult
from curvlab.linalg import Estimate, SpectralDensity

Batch = tuple[Any, Tensor]


class MatrixFreeCurvature(Curvature):
    """Shared machinery of the matrix-free operators: data, products over batches, CG
    solves, dense export column by column, and the estimators.

    Args:
        model, loss_fn: as for every backend.
        seed: seeds the estimators' probes and, per batch, the random stream of every
            evaluation (batch ``b`` runs under ``torch.manual_seed(seed + b)``): dropout
            masks and Monte-Carlo labels are the same at every product, so the operator is
            a fixed linear map; the global random stream is not advanced.
        num_matvecs: products the estimates of ``trace``/``diagonal``/``frobenius_norm``
            spend by default.
        block_size: vectors that share one batched pass (memory ``block_size × P``).
        cg_tol, cg_max_iter: stopping rule of ``solve`` (relative residual; iterations,
            default ``P``).
    """

    #: The held batches (data sources) are its state: checkpoints carry them as they are.
    running_state = (StateTag("sources", "_sources", copy=False, legacy="sources"),)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        *,
        seed: int = 0,
        num_matvecs: int = 99,
        block_size: int = 8,
        cg_tol: float = 1e-6,
        cg_max_iter: int | None = None,
    ) -> None:
        owner = type(self).__name__
        for name, value in (("seed", seed), ("num_matvecs", num_matvecs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{owner}: {name} must be a non-negative int, got {value!r}.")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"{owner}: block_size must be a positive int, got {block_size!r}.")
        if not (isinstance(cg_tol, (int, float)) and cg_tol > 0):
            raise ValueError(f"{owner}: cg_tol must be a positive float, got {cg_tol!r}.")
        super().__init__(model, loss_fn, engine="auto")
        self._cover(find_layers(self.model), [])  # no statistics: products from the data
        self.seed = seed
        self.num_matvecs = num_matvecs
        self.block_size = block_size
        self.cg_tol = float(cg_tol)
        self.cg_max_iter = cg_max_iter
        self._sources: list[Iterable[Batch]] = []
        #: ``(iterations, relative residual)`` of the last ``solve``.
        self.last_cg: tuple[int, float] | None = None

    # --- data ----------------------------------------------------------------------------

    def _update(self, inputs: Any, targets: Tensor | None, progress: bool) -> Tensor:
        owner = f"{type(self).__name__}.update"
        if targets is not None:
            source: Iterable[Batch] = [(inputs, targets)]
        elif isinstance(inputs, Tensor) or not isinstance(inputs, Iterable):
            raise TypeError(
                f"{owner}: pass targets with a tensor batch, update(inputs, targets), or an "
                "iterable of (inputs, targets) batches."
            )
        else:
            # a re-iterable (list, DataLoader) is held and iterated at every product; a
            # one-shot iterator is materialised
            source = inputs if iter(inputs) is not inputs else list(inputs)
        loss = self._scan(source, owner, progress)
        self._sources.append(source)
        self._statistics_changed()
        return loss

    def _scan(self, source: Iterable[Batch], owner: str, progress: bool) -> Tensor:
        """Validate the batches of ``source`` (one forward each) and count them in."""
        batches: Iterable[Batch] = source
        if progress and not isinstance(source, list):
            from tqdm.auto import tqdm

            batches = tqdm(source, desc=owner, leave=False)
        loss: Tensor | None = None
        index = self.num_batches
        weight, samples = 0.0, 0
        for position, batch in enumerate(batches):
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise ValueError(
                    f"{owner}: batch {position} of the data is not an (inputs, targets) pair "
                    f"(got {type(batch).__name__})."
                )
            with torch.no_grad(), self._evaluation(index):
                outputs = self._forward(batch[0], owner)
                rows, targets = loss_rows(self.loss_fn, outputs, batch[1])
                scale = batch_scale(self.loss_fn, rows, targets)
                loss = self.loss_fn(outputs, batch[1]).detach()
            weight += self._batch_weight(scale)
            samples += scale.num_samples
            index += 1
        if loss is None:
            raise ValueError(f"{owner}: the data has no batches.")
        self._weight_sum += weight
        self.num_samples += samples
        self.num_batches = index
        return loss

    def _batches(self) -> Iterator[Batch]:
        for source in self._sources:
            for batch in source:
                yield batch[0], batch[1]

    def _batch_weight(self, scale: BatchScale) -> float:
        """The batch's weight in the union (``1/R_b`` for a mean, 1 for a sum)."""
        return scale.inv_reduction if self._normalized else 1.0

    @contextlib.contextmanager
    def _evaluation(self, index: int) -> Iterator[None]:
        """Batch ``index``'s evaluation: hooks off, its own random stream, attention on its
        twice-differentiable kernel."""
        device = self.device
        accelerators = [device] if device.type != "cpu" else []
        kind = device.type if device.type != "cpu" else "cuda"
        with contextlib.ExitStack() as stack:
            stack.enter_context(suspended_hooks(self.model))
            stack.enter_context(suspended_hooks(self.loss_fn))
            stack.enter_context(torch.random.fork_rng(devices=accelerators, device_type=kind))
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            torch.manual_seed(self.seed + index)
            yield

    def _forward(self, inputs: Any, owner: str) -> Tensor:
        # on copies of the buffers: BatchNorm's running statistics stay as they are
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        outputs = torch.func.functional_call(self.model, buffers, (inputs,))
        if not isinstance(outputs, Tensor):
            raise TypeError(
                f"{owner}: the model must return the loss's input tensor, got "
                f"{type(outputs).__name__}."
            )
        return outputs

    # --- products ------------------------------------------------------------------------

    def _batch_product(
        self, outputs: Tensor, targets: Tensor, scale: BatchScale, tangents: list[Tensor]
    ) -> list[Tensor]:
        """The batch's curvature (on its own scale ``R_b``) applied to ``tangents`` (per
        parameter ``[K, *p.shape]``); same layout back."""
        raise NotImplementedError

    def _products(self, tangents: list[Tensor]) -> list[Tensor]:
        """``C V`` for per-parameter ``[K, *p.shape]`` tangents, summed over the batches."""
        owner = f"{type(self).__name__} product"
        total = [torch.zeros_like(t) for t in tangents]
        index = -1
        for index, (inputs, targets) in enumerate(self._batches()):
            with torch.enable_grad(), self._evaluation(index):
                outputs = self._forward(inputs, owner)
                rows, row_targets = loss_rows(self.loss_fn, outputs.detach(), targets)
                scale = batch_scale(self.loss_fn, rows, row_targets)
                factor = self._batch_weight(scale) / self._normalizer
                part = self._batch_product(outputs, targets, scale, tangents)
            for acc, p in zip(total, part):
                acc.add_(p.to(acc.dtype), alpha=factor)
        if index + 1 != self.num_batches:
            raise RuntimeError(
                f"{owner}: the data yielded {index + 1} batches, {self.num_batches} when it "
                "was given to update(); a held loader must yield the same batches every time."
            )
        return total

    def _matmat(self, X: Tensor) -> Tensor:
        """``C X`` for a flat ``[P, K]`` tensor in the parameters' dtype and device."""
        out = []
        for start in range(0, X.shape[1], self.block_size):
            block = X[:, start : start + self.block_size]
            k = block.shape[1]
            tangents, offset = [], 0
            for p in self.params:
                part = block[offset : offset + p.numel()].T.reshape(k, *p.shape)
                tangents.append(part)
                offset += p.numel()
            products = self._products(tangents)
            out.append(torch.cat([t.reshape(k, -1) for t in products], dim=1).T)
        return torch.cat(out, dim=1)

    def _matvec(self, v: Vector) -> Vector:
        return [t.squeeze(0) for t in self._products([t.unsqueeze(0) for t in v])]

    def __matmul__(self, v: Tensor | Sequence[Tensor]) -> Tensor | Vector:
        """``C @ v`` for a flat ``[P]`` or ``[P, K]`` tensor (the columns share batched
        passes, ``block_size`` at a time) or a list of tensors shaped like ``params``."""
        if not isinstance(v, Tensor):
            return self.matvec(v)
        owner = f"{type(self).__name__}.__matmul__"
        self._check_ready("__matmul__")
        if v.dim() not in (1, 2) or v.shape[0] != self.num_params:
            raise ValueError(
                f"{owner}: expected [{self.num_params}] or [{self.num_params}, K], got "
                f"{tuple(v.shape)}."
            )
        X = v.unsqueeze(1) if v.dim() == 1 else v
        out = self._matmat(X.to(device=self.device, dtype=self.dtype)).to(v.dtype)
        return out.squeeze(1) if v.dim() == 1 else out

    def _flat_matmat(self, X: Tensor) -> Tensor:
        return self._matmat(X.to(device=self.device, dtype=self.dtype))

    def _to_dense(self) -> Tensor:
        """``[P, P]`` built column by column (``P`` products, in blocks): small models."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self._matmat(eye)

    def _solve(self, v: Vector, damping: float) -> Vector:
        b = self._flatten(v)
        x, iterations, residual = linalg.conjugate_gradient(
            self._flat_matmat, b, damping=damping, tol=self.cg_tol, max_iter=self.cg_max_iter
        )
        self.last_cg = (iterations, residual)
        if residual > self.cg_tol:
            warnings.warn(
                f"{type(self).__name__}.solve: conjugate gradients stopped after {iterations} "
                f"iterations at relative residual {residual:.2e} > cg_tol={self.cg_tol:g}; "
                "raise cg_max_iter or the damping.",
                RuntimeWarning,
                stacklevel=3,
            )
        return self._unflatten(x)

    # --- estimators ------------------------------------------------------------------------

    def _estimator_kwargs(self, seed: int | None) -> dict[str, Any]:
        return {
            "seed": self.seed if seed is None else seed,
            "dtype": self.dtype,
            "device": self.device,
            "block_size": self.block_size,
        }

    def estimate_trace(
        self, num_matvecs: int | None = None, *, method: str = "hutch++", seed: int | None = None
    ) -> Estimate:
        """``tr(C)`` by Hutch++ (``method="hutch++"``) or Hutchinson (``"hutchinson"``) with
        ``num_matvecs`` products (default ``self.num_matvecs``); ``error`` is the standard
        error (concepts/matrix_free.md#estimators-and-their-errors). ``method="exact"``
        sums ``eᵢᵀ C eᵢ`` over all ``P`` unit vectors (small models; error 0)."""
        self._check_ready("estimate_trace")
        m = self.num_matvecs if num_matvecs is None else num_matvecs
        if method == "exact":
            value = torch.diagonal(self._to_dense()).sum()
            return Estimate(value, torch.zeros_like(value), self.num_params)
        functions = {"hutch++": linalg.hutchpp_trace, "hutchinson": linalg.hutchinson_trace}
        if method not in functions:
            raise ValueError(
                f"{type(self).__name__}.estimate_trace: method must be one of "
                f"{[*functions, 'exact']}, got {method!r}."
            )
        return functions[method](
            self._flat_matmat, self.num_params, m, **self._estimator_kwargs(seed)
        )

    def estimate_diagonal(
        self, num_matvecs: int | None = None, *, method: str = "diag++", seed: int | None = None
    ) -> Estimate:
        """``diag(C)`` (flat ``[P]``) by Diag++ or Hutchinson (``method``), per-entry standard
        errors; ``method="exact"`` from the dense matrix (small models)."""
        self._check_ready("estimate_diagonal")
        m = self.num_matvecs if num_matvecs is None else num_matvecs
        if method == "exact":
            value = torch.diagonal(self._to_dense()).clone()
            return Estimate(value, torch.zeros_like(value), self.num_params)
        return linalg.diagonal_estimate(
            self._flat_matmat, self.num_params, m, method=method, **self._estimator_kwargs(seed)
        )

    def estimate_eigenvalues(
        self, k: int, *, num_steps: int | None = None, seed: int | None = None
    ) -> Estimate:
        """The ``k`` largest eigenvalues (descending) by Lanczos with ``num_steps`` products
        (default ``2k + 30``); ``error``: residual bounds (an eigenvalue lies within each)."""
        self._check_ready("estimate_eigenvalues")
        kwargs = self._estimator_kwargs(seed)
        kwargs.pop("block_size")
        return linalg.lanczos_eigenvalues(
            self._flat_matmat, self.num_params, k, num_steps=num_steps, **kwargs
        )

    def spectral_density(
        self, *, num_probes: int = 8, num_steps: int = 40, seed: int | None = None
    ) -> SpectralDensity:
        """Stochastic Lanczos quadrature of ``C`` (``num_probes · num_steps`` products):
        ``.density(grid)`` for spectrum plots, ``.trace_function(f)`` for ``tr f(C)``."""
        self._check_ready("spectral_density")
        kwargs = self._estimator_kwargs(seed)
        kwargs.pop("block_size")
        return linalg.spectral_density(
            self._flat_matmat,
            self.num_params,
            num_probes=num_probes,
            num_steps=num_steps,
            **kwargs,
        )

    def _trace(self) -> Tensor:
        return self.estimate_trace().value

    def _diagonal(self) -> Tensor:
        return self.estimate_diagonal().value

    def _eigenvalues(self, k: int | None) -> Tensor:
        if k is None:  # every eigenvalue: the dense matrix (small models)
            return top_symmetric_eigenvalues(self._to_dense(), None)
        return self.estimate_eigenvalues(k).value

    def _frobenius_norm(self) -> Tensor:
        """``‖C‖_F = √tr(C²)``, Hutch++ on ``C²`` (two products per probe)."""
        probes = max(self.num_matvecs // 2, 3)
        estimate = linalg.hutchpp_trace(
            lambda X: self._flat_matmat(self._flat_matmat(X)),
            self.num_params,
            probes,
            **self._estimator_kwargs(None),
        )
        return estimate.value.clamp(min=0).sqrt()

    def _logdet(self, damping: float) -> Tensor:
        """``log det(C + damping·I) = tr log(C + damping·I)`` by stochastic Lanczos
        quadrature (an estimate; the operator must be positive definite once damped)."""
        density = self.spectral_density()
        return density.trace_function(lambda t: torch.log(t + damping)).value.to(self.dtype)

    # --- what a data-holding operator does not have ---------------------------------------

    def _not_statistics(self, op: str) -> TypeError:
        return TypeError(
            f"{type(self).__name__}.{op}: a matrix-free operator holds batches, not "
            "statistics; give it data with update(inputs, targets) or update(loader)."
        )

    def recording(self) -> Any:
        """Not available: a matrix-free operator needs the batch itself (``update``)."""
        raise self._not_statistics("recording")

    def accumulate(self, loss: Tensor | None = None, *, check_finite: bool = True) -> None:
        """Not available: a matrix-free operator needs the batch itself (``update``)."""
        raise self._not_statistics("accumulate")

    def _consume(self, result: BatchResult) -> None:
        raise self._not_statistics("extract")

    def _accumulate(self, result: BatchResult, weight: float) -> None:
        raise self._not_statistics("accumulate")

    def statistics(self) -> dict[str, Any]:
        """Not available: a matrix-free operator holds batches, not statistics."""
        raise self._not_statistics("statistics")

    def load_statistics(self, stats: dict[str, Any]) -> None:
        """Not available: a matrix-free operator holds batches, not statistics."""
        raise self._not_statistics("load_statistics")

    def _reset(self) -> None:
        self._sources = []


class MatrixFreeGGN(MatrixFreeCurvature):
    """The exact GGN / Fisher as a matrix-free operator (concepts/matrix_free.md).

    ``C v = Σ_b w_b Jᵦᵀ M_b Jᵦ v`` over the held batches, with ``J_b`` the Jacobian of the
    batch's loss rows and ``M_b`` the Fisher type's output matrix on the loss's scale:
    ``"exact"`` the loss Hessian (= true Fisher = GGN for the supported losses), ``"mc"``
    its Monte-Carlo estimate with ``mc_samples`` labels drawn from the model per row
    (seeded per batch: the same labels at every product), ``"empirical"`` the observed
    labels' gradient outer product. The same matrices as :class:`curvlab.ExactFisher` /
    :class:`curvlab.EmpiricalFisher`, without storing them. Further arguments: see
    :class:`MatrixFreeCurvature`.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        fisher_type: str = "exact",
        mc_samples: int = 1,
        **kwargs: Any,
    ) -> None:
        owner = type(self).__name__
        self.fisher_type = FisherType.parse(fisher_type, owner)
        check_mc_samples(mc_samples, owner)
        self.mc_samples = mc_samples
        super().__init__(model, loss_fn, **kwargs)

    def _batch_product(
        self, outputs: Tensor, targets: Tensor, scale: BatchScale, tangents: list[Tensor]
    ) -> list[Tensor]:
        rows, row_targets = loss_rows(self.loss_fn, outputs, targets)
        cotangent, transposed = transposed_jacobian(rows, self.params)
        live = [i for i, t in enumerate(transposed) if t is not None and t.requires_grad]
        k = tangents[0].shape[0]
        jvps = jacobian_vector_products(
            rows,
            cotangent,
            [t for i in live if (t := transposed[i]) is not None],
            [[tangents[i][j] for i in live] for j in range(k)],
        )
        U = torch.stack(jvps)  # [K, R, C]
        MU = self._output_matrix(rows.detach(), row_targets, scale, U)
        return vector_jacobian_products(rows, self.params, MU)

    def _output_matrix(self, rows: Tensor, targets: Tensor, scale: BatchScale, U: Tensor) -> Tensor:
        """``M u`` row by row for ``U`` ``[K, R, C]`` (the batch's scale ``R_b`` included)."""
        if self.fisher_type.exact_output_matrix:
            return torch.stack([output_hessian_apply(self.loss_fn, rows, u, targets) for u in U])
        cols = self.fisher_type.columns(self.loss_fn, rows, targets, scale, self.mc_samples).to(
            U.dtype
        )  # [M, R, C], Σ_m cols_m cols_mᵀ = M row by row
        coefficients = torch.einsum("mrc,krc->kmr", cols, U)
        return torch.einsum("mrc,kmr->krc", cols, coefficients)


class MatrixFreeHessian(MatrixFreeCurvature):
    """The Hessian of the loss w.r.t. the parameters as a matrix-free operator
    (concepts/matrix_free.md#the-hessian).

    ``C v = Σ_b w_b ∇²L_b v`` over the held batches, each ``∇²L_b v`` a double backward
    pass. Unlike the GGN it can be indefinite: ``solve`` (conjugate gradients) raises a
    :class:`curvlab.linalg.LinAlgError` when ``H + damping·I`` is not positive definite
    along its search directions, and ``logdet`` needs a damping above ``−λ_min``.
    """

    def _batch_product(
        self, outputs: Tensor, targets: Tensor, scale: BatchScale, tangents: list[Tensor]
    ) -> list[Tensor]:
        loss = self.loss_fn(outputs, targets)
        gradient = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return hessian_vector_products(gradient, self.params, tangents)


__all__ = ["MatrixFreeCurvature", "MatrixFreeGGN", "MatrixFreeHessian"]
