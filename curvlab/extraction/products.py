"""Jacobian and Hessian products by reverse mode only (reverse-over-reverse)
(concepts/matrix_free.md#products-without-forward-mode-ad).

For a model output ``f`` with parameters ``θ``:

* :func:`transposed_jacobian` runs one backward pass with ``create_graph`` for a dummy
  output cotangent ``u`` (zeros, requiring grad) and returns ``Jᵀu``, a graph linear in
  ``u``;
* :func:`jacobian_vector_products`: ``J v = ∂⟨Jᵀu, v⟩/∂u``, a backward pass through that
  graph (so no forward-mode AD, which some CPU kernels lack);
* :func:`vector_jacobian_products`: ``Jᵀ w``, a plain backward pass;
* :func:`hessian_vector_products`: ``H v = ∂⟨∇L, v⟩/∂θ`` for a scalar ``L``.

Several vectors share one batched pass (``is_grads_batched``, i.e. ``vmap`` over the
backward) where every op of the backward has a batching rule; otherwise a loop gives
the same numbers. Used by the quadratic model of K-FAC's step
(:mod:`curvlab.optim.quadratic`) and by the matrix-free operators
(:mod:`curvlab.curvature.matrix_free`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: More vectors than this go through one batched double-backward pass (``vmap``).
BATCH_ABOVE = 2


def transposed_jacobian(
    outputs: Tensor, params: Sequence[Tensor]
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """``(u, Jᵀu)``: a zero cotangent ``u`` shaped like ``outputs`` (requires grad) and the
    per-parameter ``Jᵀu`` as a differentiable graph (``None`` where ``outputs`` does not
    depend on a parameter)."""
    cotangent = torch.zeros_like(outputs, requires_grad=True)
    transposed = torch.autograd.grad(
        outputs, list(params), cotangent, create_graph=True, allow_unused=True
    )
    return cotangent, transposed


def jacobian_vector_products(
    outputs: Tensor,
    cotangent: Tensor,
    transposed: list[Tensor],
    tangents: list[list[Tensor]],
) -> list[Tensor]:
    """``J v`` for every ``v`` in ``tangents``: ``∂⟨Jᵀu, v⟩/∂u`` through the graph of
    ``transposed = Jᵀu`` (entries of ``v`` aligned with ``transposed``). Many vectors share
    one batched pass where the backward supports ``vmap``; otherwise (and for one or two
    vectors, where the loop is as fast) one pass each, with the same result."""
    if not transposed:
        return [torch.zeros_like(outputs) for _ in tangents]
    if len(tangents) > BATCH_ABOVE:
        stacked = [
            torch.stack([v[i].detach().to(t.dtype) for v in tangents])
            for i, t in enumerate(transposed)
        ]
        try:
            (batched,) = torch.autograd.grad(
                transposed,
                cotangent,
                stacked,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError:  # no batching rule for some op of this backward
            pass
        else:
            if batched is None:
                return [torch.zeros_like(outputs) for _ in tangents]
            return list(batched.detach().unbind(0))
    jvps = []
    for v in tangents:
        (jv,) = torch.autograd.grad(
            transposed,
            cotangent,
            [x.detach().to(t.dtype) for x, t in zip(v, transposed)],
            retain_graph=True,  # other supports may follow
            allow_unused=True,
        )
        jvps.append(torch.zeros_like(outputs) if jv is None else jv.detach())
    return jvps


def _batched_grad(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], cotangents: Sequence[Tensor]
) -> list[Tensor]:
    """``∂⟨outputs, w_k⟩/∂inputs`` for the ``K`` cotangents stacked on dim 0 of each entry
    of ``cotangents``: per input a ``[K, *input.shape]`` tensor (zeros where unused)."""
    k = cotangents[0].shape[0]
    grads: Sequence[Tensor | None] | None = None
    if k > BATCH_ABOVE:
        try:
            grads = torch.autograd.grad(
                list(outputs),
                list(inputs),
                list(cotangents),
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
        except RuntimeError:  # no batching rule for some op of this backward
            grads = None
    if grads is None:
        columns = [
            torch.autograd.grad(
                list(outputs),
                list(inputs),
                [w[j] for w in cotangents],
                retain_graph=True,
                allow_unused=True,
            )
            for j in range(k)
        ]
        grads = [
            None
            if all(c[i] is None for c in columns)
            else torch.stack([torch.zeros_like(x) if (g := c[i]) is None else g for c in columns])
            for i, x in enumerate(inputs)
        ]
    return [
        torch.zeros(k, *x.shape, dtype=x.dtype, device=x.device) if g is None else g.detach()
        for g, x in zip(grads, inputs)
    ]


def vector_jacobian_products(
    outputs: Tensor, params: Sequence[Tensor], cotangents: Tensor
) -> list[Tensor]:
    """``Jᵀ w_k`` for ``cotangents`` ``[K, *outputs.shape]``: per parameter ``[K, *p.shape]``."""
    return _batched_grad([outputs], params, [cotangents.to(outputs.dtype)])


def hessian_vector_products(
    gradient: Sequence[Tensor | None], params: Sequence[Tensor], tangents: Sequence[Tensor]
) -> list[Tensor]:
    """``H v_k`` for ``gradient`` = ``∇L`` built with ``create_graph`` and ``tangents`` per
    parameter ``[K, *p.shape]``: per parameter ``[K, *p.shape]`` (zeros where ``∇L`` does
    not depend on the parameters, e.g. a loss linear in them)."""
    k = tangents[0].shape[0]
    live = [i for i, g in enumerate(gradient) if g is not None and g.requires_grad]
    if not live:
        return [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) for p in params]
    outputs = [g for i in live if (g := gradient[i]) is not None]
    return _batched_grad(outputs, params, [tangents[i].to(outputs[0].dtype) for i in live])
