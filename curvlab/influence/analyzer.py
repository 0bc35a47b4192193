"""``Influence``: training-data attribution with any curvature's damped inverse
(concepts/influence.md).

The influence of training example ``z`` on query ``q`` is

    ``I(q, z) = −∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z``,

the first-order change of the query's measurement when ``z`` is up-weighted in the
training loss (by ``ε``, divided by ``ε``), with ``C`` the curvature of the training loss as
the backend approximates it and ``λ`` the damping on the loss's scale. Negative scores
are helpful (up-weighting ``z`` lowers the query loss), positive ones harmful.

Per-example gradients come from ``torch.func.vmap(grad(...))`` over the examples of one
batch at a time (``[B, *p.shape]`` per parameter; never the whole data set). Queries are
preconditioned once per query batch; with K-FAC (``damping_mode="exact"``) and EKFAC the
preconditioning runs for all queries at once in the layers' Kronecker eigenbases, and
where every covered parameter is in a Kronecker layer the training gradients are taken
in factored form, ``Σ_t g_t ā_tᵀ`` per layer (:mod:`curvlab.influence.kronecker`):
self-influence is ``−Σ (Qᵀ G Q)² ⊘ (S + λ)`` on rotated gradients and pairwise scores
never form a per-example parameter vector where no weight is shared. Every other backend
is called through ``solve`` example by example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_map

from curvlab.curvature.base import Curvature, Layer
from curvlab.curvature.kronecker.damping import EigenDamping
from curvlab.curvature.kronecker.ekfac import EKFAC
from curvlab.curvature.kronecker.factored import KroneckerFactored
from curvlab.curvature.kronecker.kfac import KFAC
from curvlab.extraction import layers as layer_rules
from curvlab.influence import kronecker
from curvlab.influence.scores import InfluenceScores
from curvlab.influence.task import LossTask, Task

Grads = list[Tensor]  # per covered parameter, [B, *p.shape]
_SCORE_DTYPES = (torch.float64, torch.float32, torch.bfloat16)


class _Functional:
    """Calls ``model`` with some of its parameters replaced (``torch.func.functional_call``);
    other attributes are the model's."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.values: dict[str, Tensor] = {}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return functional_call(self.model, self.values, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


class Influence:
    """Influence scores ``−∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z`` from any :class:`~curvlab.Curvature`.

    Args:
        curvature: the backend (its ``model`` and covered ``params`` are the influence's);
            fit it with :meth:`fit` or beforehand with ``curvature.update(loader)``.
        task: what the losses and measurements are (default: :class:`LossTask` of the
            curvature's ``loss_fn``, batches ``(inputs, targets)``).
        damping: ``λ > 0`` on the training loss's scale (with ``reduction="sum"`` the
            curvature is ``N`` times larger than with ``"mean"``, and so is the right ``λ``).
        score_dtype: the dtype scores are accumulated in: ``torch.float32`` or
            ``torch.bfloat16`` (half the memory of ``[Q, N]``), or ``torch.float64``;
            ``None``: the parameters' dtype. Gradients and solves stay in the parameters'
            (and the backend's factor) dtype.
        factored: take the training examples' gradients of Kronecker layers in factored
            form, ``Σ_t g_t ā_tᵀ`` from one forward and backward pass of the batch (no
            per-example parameter vector where no weight is shared), for K-FAC with
            ``damping_mode="exact"`` and EKFAC when every covered parameter is in a
            Kronecker layer; ``None``: wherever that holds, ``False``: never (per-example
            gradients by ``vmap``), ``True``: required (else a ``ValueError``). The task's
            ``compute_train_loss`` must then sum independent per-example losses.
        progress: tqdm bars over the batches of long loops.

    The model must not couple the examples of a batch (``BatchNorm`` in training mode):
    call ``model.eval()`` first.
    """

    def __init__(
        self,
        curvature: Curvature,
        task: Task | None = None,
        damping: float = 1e-3,
        *,
        score_dtype: torch.dtype | None = None,
        factored: bool | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"Influence: curvature must be a curvlab.Curvature, got {type(curvature).__name__}."
            )
        if task is not None and not isinstance(task, Task):
            raise TypeError(
                f"Influence: task must be a curvlab.influence.Task, got {type(task).__name__}."
            )
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise TypeError(f"Influence: damping must be a float, got {type(damping).__name__}.")
        if not 0.0 < damping < math.inf:
            raise ValueError(f"Influence: damping must be finite and > 0, got {damping}.")
        if score_dtype is not None and score_dtype not in _SCORE_DTYPES:
            raise ValueError(
                f"Influence: score_dtype must be one of {_SCORE_DTYPES} or None, got {score_dtype}."
            )
        self.curvature = curvature
        self.model = curvature.model
        self.task = task if task is not None else LossTask(curvature.loss_fn)
        self.damping = float(damping)
        self.score_dtype = score_dtype or curvature.params[0].dtype
        if factored not in (None, True, False):
            raise TypeError(f"Influence: factored must be None, True or False, got {factored!r}.")
        self.factored = factored
        self.progress = progress
        self._names = list(curvature.param_names)
        self._modules = [name.rpartition(".")[0] for name in self._names]
        self._fit_samples: int | None = None  # examples seen by fit() (None: fitted elsewhere)

    # --- fitting and gradients ---------------------------------------------------------

    def fit(self, loader: Iterable[Any], *, refit_basis: bool = True) -> Influence:
        """Accumulate the curvature of the training data (``curvature.update(loader)``).

        EKFAC fixes its eigenbasis at the first batch; with ``refit_basis`` (and more than
        one batch) the basis is refitted from the K-FAC factors of the whole data set and
        the diagonal ``S*`` taken in a second pass (as kronfluence does), so ``loader``
        must be iterable twice (a list or a ``DataLoader``).
        """
        c = self.curvature
        c.update(loader, progress=self.progress)
        self._fit_samples = c.num_samples
        if isinstance(c, EKFAC) and refit_basis and c.num_batches > 1:
            c.refresh_basis()
            c.update(loader, progress=self.progress)
        return self

    def train_gradients(self, batch: Any) -> Grads:
        """Per-example ``∇ℓ_z`` of ``task.compute_train_loss``: ``[B, *p.shape]`` per
        covered parameter (``curvature.params`` order)."""
        return self._per_example(self.task.compute_train_loss, batch)

    def query_gradients(self, batch: Any) -> Grads:
        """Per-query ``∇ℓ_q`` of ``task.compute_measurement``, shaped as
        :meth:`train_gradients`."""
        return self._per_example(self.task.compute_measurement, batch)

    def _per_example(self, loss: Callable[[Any, Any], Tensor], batch: Any) -> Grads:
        self._check_model()
        proxy = _Functional(self.model)
        names = self._names

        def single(values: tuple[Tensor, ...], example: Any) -> Tensor:
            proxy.values = dict(zip(names, values))
            return loss(tree_map(lambda t: t.unsqueeze(0), example), proxy)

        values = tuple(p.detach() for p in self.curvature.params)
        leaves = [t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)]
        if not leaves:
            raise ValueError("Influence: a batch must contain tensors (examples on axis 0).")
        grads = vmap(grad(single), in_dims=(None, 0), randomness="different")(values, batch)
        return list(grads)

    def _check_model(self) -> None:
        for name, module in self.model.named_modules():
            if isinstance(module, _BatchNorm) and module.training:
                raise RuntimeError(
                    f"Influence: module {name!r} is a BatchNorm in training mode, which "
                    "couples the examples of a batch; call model.eval() first."
                )

    # --- preconditioning ---------------------------------------------------------------

    def precondition(self, grads: Grads) -> Grads:
        """``(C + λI)⁻¹ g`` for each example of ``grads`` (``[B, *p.shape]`` per parameter).

        K-FAC (exact damping) and EKFAC: all examples at once in the Kronecker eigenbases;
        other backends: ``curvature.solve`` per example.
        """
        eigen = self._eigenbases()
        if eigen is None:
            count = grads[0].shape[0]
            solved = [
                self.curvature.solve([g[b] for g in grads], self.damping) for b in range(count)
            ]
            return [torch.stack([s[i] for s in solved]) for i in range(len(grads))]
        return self._eigen_apply(grads, eigen, rotate_back=True)

    def _eigenbases(self) -> list[tuple[Tensor, Tensor, Tensor]] | None:
        """Per Kronecker layer ``(Q_G, Q_A, S)`` with ``C``'s block ``(Q_G ⊗ Q_A) diag(S)
        (Q_G ⊗ Q_A)ᵀ`` on the ``[W | b]`` matrix, or ``None`` if the backend is not
        block-diagonal in such eigenbases."""
        c = self.curvature
        if isinstance(c, EKFAC):
            return [(q_g, q_a, s) for (q_g, q_a), s in zip(c.eigenbasis(), c.scalings())]
        if isinstance(c, KFAC) and type(c)._solve_layer is KFAC._solve_layer:
            if not isinstance(c.damping_strategy, EigenDamping):
                return None  # the scores' eigenbasis form is the eigen-damped inverse's
            if any(c._is_joint(k) for k in range(len(c.layers))):
                return None  # a tied embedding/head block is a Kronecker sum: no such basis
            out = []
            for k in range(len(c.layers)):
                eig = c._layer_eigen(k)
                if isinstance(eig.A, Tensor):  # a diagonal A: eigenvectors the identity
                    q_a = torch.eye(eig.A.shape[0], dtype=eig.A.dtype, device=eig.A.device)
                    d_a = eig.A
                else:
                    q_a, d_a = eig.A.eigenvectors, eig.A.eigenvalues
                s = torch.outer(eig.G.eigenvalues, d_a)
                out.append((eig.G.eigenvectors, q_a, s))
            return out
        return None

    def _use_factored(self, op: str) -> bool:
        """Whether scores take the Kronecker layers' gradients in factored form."""
        if self.factored is False:
            return False
        c = self.curvature
        possible = self._eigenbases() is not None and sum(
            len(layer.params) for layer in c.layers
        ) == len(c.params)
        if self.factored and not possible:
            raise ValueError(
                f"Influence.{op}: factored=True needs K-FAC (damping_mode='exact') or EKFAC "
                "with every covered parameter in a Kronecker layer; "
                f"{type(c).__name__} covers {sorted(set(c.coverage().values()))} blocks."
            )
        return possible

    def _eigen_apply(
        self, grads: Grads, eigen: list[tuple[Tensor, Tensor, Tensor]], rotate_back: bool
    ) -> Grads:
        """Kronecker layers: ``Q_G [(Q_Gᵀ G Q_A) ⊘ (S + λ)] Q_Aᵀ`` for all examples at once
        and the backend's diagonal blocks elementwise; with ``rotate_back=False`` only the
        Kronecker layers' rotated ``(Q_Gᵀ G Q_A) ⊘ √(S + λ)``, ``[B, D_out, D_in]`` each."""
        c = self.curvature
        out: Grads = []
        start = 0
        for layer, (q_g, q_a, s) in zip(c.layers, eigen):
            parts = grads[start : start + len(layer.params)]
            start += len(layer.params)
            rotated = q_g.T @ _to_matrices(layer, parts).to(q_g.dtype) @ q_a
            if not rotate_back:
                out.append(rotated / (s + self.damping).sqrt())
                continue
            solved = (q_g @ (rotated / (s + self.damping)) @ q_a.T).to(parts[0].dtype)
            out.extend(_from_matrices(layer, solved))
        tail = grads[start:]
        if tail and rotate_back:
            out.extend(self._tail_solve(tail))
        return out

    def _tail_solve(self, tail: Grads) -> Grads:
        """The Kronecker backend's diagonal blocks: ``g ⊘ (d + λ)``, all examples at once."""
        c = self.curvature
        return list(c._diag().solve(tail, self.damping, c._normalizer))  # type: ignore[attr-defined]

    # --- scores ------------------------------------------------------------------------

    def pairwise(
        self,
        queries: Any,
        train: Iterable[Any],
        *,
        query_batch_size: int | None = None,
        query_rank: int | None = None,
        per_module: bool = False,
    ) -> InfluenceScores:
        """Scores ``[Q, N]``: ``−∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z`` for every query and training example.

        Args:
            queries: one batch or an iterable of batches of queries.
            train: an iterable of training batches (e.g. a ``DataLoader`` without
                shuffling: columns follow its order); streamed once per query batch.
            query_batch_size: precondition and score at most this many queries at a time
                (``None``: all at once); the training data are streamed once per chunk.
            query_rank: keep the rank-``r`` truncated SVD of each preconditioned query
                gradient matrix (a Kronecker layer's ``[W | b]`` matrix; any other
                parameter viewed ``[p.shape[0], -1]``); the relative Frobenius error over
                all queries is reported in ``settings["query_error"]``.
            per_module: also return each module's share (``modules``; they sum to the
                scores).
        """
        if query_rank is not None and (
            isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1
        ):
            raise ValueError(
                f"Influence.pairwise: query_rank must be a positive int, got {query_rank!r}."
            )
        if query_batch_size is not None and (
            isinstance(query_batch_size, bool)
            or not isinstance(query_batch_size, int)
            or query_batch_size < 1
        ):
            raise ValueError(
                "Influence.pairwise: query_batch_size must be a positive int, got "
                f"{query_batch_size!r}."
            )
        factored = self._use_factored("pairwise")
        query_grads = self._gather(self.query_gradients, queries)
        total_q = query_grads[0].shape[0]
        chunk = query_batch_size or max(total_q, 1)
        rows: list[Tensor] = []
        module_rows: dict[str, list[Tensor]] = {m: [] for m in dict.fromkeys(self._modules)}
        err_num, err_den = 0.0, 0.0
        for q0 in range(0, total_q, chunk):
            pre = self.precondition([g[q0 : q0 + chunk] for g in query_grads])
            factors: list[tuple[Tensor, Tensor] | None] = []
            if query_rank is not None:
                pre, factors, num, den = self._low_rank(pre, query_rank)
                err_num, err_den = err_num + num, err_den + den
            layer_queries: list[Tensor | tuple[Tensor, Tensor]] = []
            if factored:
                for k, (layer, parts) in enumerate(self._layer_parts(pre)):
                    low = factors[k] if factors else None
                    layer_queries.append(low if low is not None else _to_matrices(layer, parts))
            columns: list[Tensor] = []
            module_columns: dict[str, list[Tensor]] = {m: [] for m in module_rows}
            for batch in self._bar(train, "Influence.pairwise"):
                if factored:
                    records = self._records(batch)
                    per_mod = {
                        layer.name: (-kronecker.pairwise_dots(h, a, g)).to(self.score_dtype)
                        for layer, h, (a, g) in zip(self.curvature.layers, layer_queries, records)
                    }
                else:
                    per_mod = self._module_dots(pre, self.train_gradients(batch))
                columns.append(_add_up(per_mod, module_columns if per_module else None))
            if not columns:
                raise ValueError("Influence.pairwise: the training data have no batches.")
            rows.append(torch.cat(columns, dim=1))
            for name in module_rows:
                if per_module:
                    module_rows[name].append(torch.cat(module_columns[name], dim=1))
        settings = self._settings(
            query_rank=query_rank,
            query_batch_size=query_batch_size,
            factored=factored,
            query_error=math.sqrt(err_num / err_den)
            if query_rank is not None and err_den > 0
            else None,
        )
        modules = {m: torch.cat(r) for m, r in module_rows.items()} if per_module else None
        return InfluenceScores(torch.cat(rows), "pairwise", modules, settings)

    def self_influence(self, train: Iterable[Any], *, per_module: bool = False) -> InfluenceScores:
        """Scores ``[N]``: ``−∇ℓ_zᵀ (C + λI)⁻¹ ∇ℓ_z`` (never positive) for every example."""
        eigen = self._eigenbases()
        factored = self._use_factored("self_influence")
        values: list[Tensor] = []
        module_values: dict[str, list[Tensor]] = {m: [] for m in dict.fromkeys(self._modules)}
        for batch in self._bar(train, "Influence.self_influence"):
            if factored:
                assert eigen is not None
                per_mod = {
                    layer.name: (-kronecker.self_dots(q_g, q_a, 1.0 / (s + self.damping), a, g)).to(
                        self.score_dtype
                    )
                    for layer, (q_g, q_a, s), (a, g) in zip(
                        self.curvature.layers, eigen, self._records(batch)
                    )
                }
            elif eigen is not None:  # −‖(Q_Gᵀ G Q_A) ⊘ √(S + λ)‖² per layer, in the eigenbasis
                grads = self.train_gradients(batch)
                per_mod = self._self_dots(self._eigen_apply(grads, eigen, rotate_back=False))
                n_kron = sum(len(layer.params) for layer in self.curvature.layers)
                if len(grads) > n_kron:
                    tail = grads[n_kron:]
                    tail_mod = self._module_dots(
                        self._tail_solve(tail), tail, diagonal=True, modules=self._modules[n_kron:]
                    )
                    for name, value in tail_mod.items():
                        per_mod[name] = per_mod[name] + value if name in per_mod else value
            else:
                grads = self.train_gradients(batch)
                per_mod = self._module_dots(self.precondition(grads), grads, diagonal=True)
            values.append(_add_up(per_mod, module_values if per_module else None))
        if not values:
            raise ValueError("Influence.self_influence: the training data have no batches.")
        modules = {m: torch.cat(v) for m, v in module_values.items()} if per_module else None
        return InfluenceScores(
            torch.cat(values), "self", modules, self._settings(factored=factored)
        )

    # --- helpers ---------------------------------------------------------------------------

    def _module_dots(
        self, pre: Grads, grads: Grads, diagonal: bool = False, modules: list[str] | None = None
    ) -> dict[str, Tensor]:
        """Per module ``−Σ_p ⟨pre_q, g_z⟩`` as ``[Q, B]`` (or ``[B]`` for ``diagonal``), in
        ``score_dtype``."""
        out: dict[str, Tensor] = {}
        for module, h, g in zip(modules or self._modules, pre, grads):
            h_flat, g_flat = h.reshape(h.shape[0], -1), g.reshape(g.shape[0], -1).to(h.dtype)
            dots = (h_flat * g_flat).sum(dim=1) if diagonal else h_flat @ g_flat.T
            value = (-dots).to(self.score_dtype)
            out[module] = out[module] + value if module in out else value
        return out

    def _self_dots(self, halves: Grads) -> dict[str, Tensor]:
        """Per Kronecker layer ``−‖half‖²`` (halves from :meth:`_eigen_apply`)."""
        out: dict[str, Tensor] = {}
        for layer, h in zip(self.curvature.layers, halves):
            module = layer.name
            value = (-(h.reshape(h.shape[0], -1) ** 2).sum(dim=1)).to(self.score_dtype)
            out[module] = out[module] + value if module in out else value
        return out

    def _records(self, batch: Any) -> list[tuple[Tensor, Tensor]]:
        self._check_model()
        return kronecker.layer_records(
            self.model,
            self.curvature.layers,
            lambda: self.task.compute_train_loss(batch, self.model),
        )

    def _layer_parts(self, v: Grads) -> list[tuple[Layer, Grads]]:
        out, start = [], 0
        for layer in self.curvature.layers:
            out.append((layer, v[start : start + len(layer.params)]))
            start += len(layer.params)
        return out

    def _low_rank(
        self, pre: Grads, rank: int
    ) -> tuple[Grads, list[tuple[Tensor, Tensor] | None], float, float]:
        """Rank-``rank`` truncated SVDs of the preconditioned queries: a Kronecker
        backend's layers as ``[W | b]`` matrices (their factors ``(L, R)`` returned, ``None``
        where the rank is full), every other parameter as ``[p.shape[0], -1]``. Returns the
        approximations, the factors, and the squared Frobenius norms of error and whole."""
        out = list(pre)
        factors: list[tuple[Tensor, Tensor] | None] = []
        den = sum(float((h.double() ** 2).sum()) for h in pre)
        num, start = 0.0, 0
        if isinstance(self.curvature, KroneckerFactored):
            for layer, parts in self._layer_parts(pre):
                mats = _to_matrices(layer, parts)
                stop = start + len(parts)
                if min(mats.shape[1:]) <= rank:
                    factors.append(None)
                else:
                    left, right = _truncated_svd(mats, rank)
                    approx = left @ right
                    num += float(((mats - approx).double() ** 2).sum())
                    out[start:stop] = _from_matrices(layer, approx)
                    factors.append((left, right))
                start = stop
        for i in range(start, len(pre)):
            h = pre[i]
            if h.dim() < 3 or min(h.shape[1], h[0].numel() // h.shape[1]) <= rank:
                continue
            mats = h.reshape(h.shape[0], h.shape[1], -1)
            left, right = _truncated_svd(mats, rank)
            approx = left @ right
            num += float(((mats - approx).double() ** 2).sum())
            out[i] = approx.reshape(h.shape)
        return out, factors, num, den

    def _gather(self, fn: Callable[[Any], Grads], data: Any) -> Grads:
        batches = [data] if _is_batch(data) else list(data)
        if not batches:
            raise ValueError("Influence.pairwise: no queries.")
        parts = [fn(b) for b in self._bar(batches, "Influence: query gradients")]
        return [torch.cat([p[i] for p in parts]) for i in range(len(parts[0]))]

    def _bar(self, data: Iterable[Any], desc: str) -> Iterator[Any]:
        if not self.progress:
            return iter(data)
        from tqdm.auto import tqdm

        return iter(tqdm(data, desc=desc, leave=False))

    def _settings(self, **extra: Any) -> dict[str, Any]:
        c = self.curvature
        return {
            "backend": type(c).__name__,
            "fisher_type": str(c.fisher_type) if hasattr(c, "fisher_type") else None,
            "damping": self.damping,
            "score_dtype": str(self.score_dtype).removeprefix("torch."),
            "param_dtype": str(c.params[0].dtype).removeprefix("torch."),
            "task": type(self.task).__name__,
            "num_params": c.num_params,
            "fit_samples": self._fit_samples,
            "eigenbasis": self._eigenbases() is not None,
            **extra,
        }


def _is_batch(data: Any) -> bool:
    """A single batch (a tuple/list/dict of tensors) rather than an iterable of batches."""
    if isinstance(data, dict):
        return True
    return isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data)


def _truncated_svd(mats: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """``(L [Q, m, r], R [Q, r, n])`` with ``L R`` the rank-``r`` truncated SVD of each
    ``[m, n]`` matrix."""
    u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    return u[..., :rank] * s[:, None, :rank], vh[:, :rank]


def _to_matrices(layer: Layer, parts: Grads) -> Tensor:
    """``[B, *p.shape]`` weight (and bias) of a Kronecker layer → ``[B, D_out, D_in(+1)]``."""
    module = layer.module
    if len(parts) > 1:
        return vmap(lambda w, b: layer_rules.to_matrix(module, w, b))(*parts)
    return vmap(lambda w: layer_rules.to_matrix(module, w, None))(parts[0])


def _from_matrices(layer: Layer, mats: Tensor) -> Grads:
    """Inverse of :func:`_to_matrices`."""
    module = layer.module
    return list(vmap(lambda m: tuple(layer_rules.from_matrix(module, m)))(mats))


def _add_up(per_module: dict[str, Tensor], store: dict[str, list[Tensor]] | None) -> Tensor:
    """The sum over modules of per-module scores (each module's also appended to ``store``
    when given)."""
    total = torch.zeros_like(next(iter(per_module.values())))
    for name, value in per_module.items():
        total += value
        if store is not None:
            store[name].append(value)
    return total
