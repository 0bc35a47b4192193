"""Per-example gradients of Kronecker layers in factored form (concepts/influence.md).

A layer with a Kronecker rule (``Linear``, ``ConvNd``, ``Embedding``) has the per-example
gradient ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ`` on its ``[W | b]`` matrix ``[D_out, D_in(+1)]``:
``ā`` the homogeneous input patches, ``g`` the output gradients of example ``n``'s loss
at the ``T`` positions sharing the weight. One forward and one backward pass of the
batch's summed loss give every ``(ā, g)``; scores then never form ``G_n`` where ``T = 1``:

* pairwise, query matrix ``H_q``: ``⟨H_q, G_n⟩ = Σ_t g_tᵀ H_q ā_t``, and for a rank-``r``
  ``H_q = L_q R_q``: ``Σ_t Σ_r (g_tᵀ L_q)_r (R_q ā_t)_r``, ``O(T·r·(D_out + D_in))``;
* self, eigenbasis ``(Q_G, Q_A)`` and eigenvalues ``S``: ``‖(Q_Gᵀ G_n Q_A) ⊘ √(S+λ)‖²``,
  which for ``T = 1`` is ``(Q_Gᵀg)²ᵀ [1 ⊘ (S+λ)] (Q_Aᵀā)²``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from curvlab.curvature.base import Layer
from curvlab.extraction import layers as layer_rules

#: Per-example gradient matrices are formed for at most this many entries at a time.
_CHUNK_ELEMENTS = 1 << 24


def layer_records(
    model: nn.Module, layers: list[Layer], loss: Callable[[], Tensor]
) -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(ā [N, T, D_in(+1)], g [N, T, D_out])`` of the batch whose summed loss
    ``loss()`` computes (several calls of a layer are concatenated along ``T``).

    ``p.grad`` is untouched (the gradient is taken with respect to the layer outputs).
    """
    calls: list[list[tuple[Tensor, Tensor]]] = [[] for _ in layers]
    handles: list[RemovableHandle] = []

    def record(k: int) -> Callable[[nn.Module, tuple[Any, ...], Tensor], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            calls[k].append((args[0].detach(), output))

        return hook

    for k, layer in enumerate(layers):
        handles.append(layer.module.register_forward_hook(record(k)))
    try:
        with torch.enable_grad():
            value = loss()
    finally:
        for handle in handles:
            handle.remove()
    missing = [layers[k].name for k, c in enumerate(calls) if not c]
    if missing:
        raise RuntimeError(f"Influence: layers {missing} were not called by the training loss.")
    outputs = [out for c in calls for _, out in c]
    grads = iter(torch.autograd.grad(value, outputs, allow_unused=True, materialize_grads=True))
    records = []
    for layer, c in zip(layers, calls):
        acts, outs = [], []
        for x, _ in c:
            acts.append(layer_rules.layer_patches(layer.module, x))
            outs.append(layer_rules.layer_columns(layer.module, next(grads).unsqueeze(0))[0])
        records.append((torch.cat(acts, dim=1), torch.cat(outs, dim=1)))
    return records


def pairwise_dots(query: Tensor | tuple[Tensor, Tensor], a: Tensor, g: Tensor) -> Tensor:
    """``[Q, N]``: ``⟨H_q, G_n⟩`` for query matrices ``H`` ``[Q, D_out, D_in]`` or their
    factors ``(L [Q, D_out, r], R [Q, r, D_in])``, and ``G_n = Σ_t g_{n,t} ā_{n,t}ᵀ``."""
    if isinstance(query, tuple):
        left, right = query
        gl = torch.einsum("nto,qor->qntr", g.to(left.dtype), left)
        ra = torch.einsum("qri,nti->qntr", right, a.to(right.dtype))
        return (gl * ra).sum(dim=(2, 3))
    a, g = a.to(query.dtype), g.to(query.dtype)
    if a.shape[1] == 1:  # no weight sharing: g_nᵀ H_q ā_n, no per-example matrix
        return torch.einsum("no,qoi,ni->qn", g[:, 0], query, a[:, 0])
    out = []
    for start, stop in _chunks(a, g):
        grads = torch.einsum("nto,nti->noi", g[start:stop], a[start:stop])
        out.append(query.flatten(1) @ grads.flatten(1).T)
    return torch.cat(out, dim=1)


def self_dots(q_g: Tensor, q_a: Tensor, inverse: Tensor, a: Tensor, g: Tensor) -> Tensor:
    """``[N]``: ``Σ_ij (Q_Gᵀ G_n Q_A)²_ij · inverse_ij`` (``inverse = 1 ⊘ (S + λ)``)."""
    rot_a = a.to(q_a.dtype) @ q_a  # [N, T, D_in]: Q_Aᵀ ā
    rot_g = g.to(q_g.dtype) @ q_g  # [N, T, D_out]: Q_Gᵀ g
    if a.shape[1] == 1:
        return torch.einsum("no,oi,ni->n", rot_g[:, 0] ** 2, inverse, rot_a[:, 0] ** 2)
    out = []
    for start, stop in _chunks(a, g):
        rotated = torch.einsum("nto,nti->noi", rot_g[start:stop], rot_a[start:stop])
        out.append((rotated**2 * inverse).sum(dim=(1, 2)))
    return torch.cat(out)


def _chunks(a: Tensor, g: Tensor) -> list[tuple[int, int]]:
    n, per = a.shape[0], a.shape[-1] * g.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // max(per, 1))
    return [(s, min(s + step, n)) for s in range(0, n, step)]
