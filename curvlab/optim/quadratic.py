"""Exact curvature products for the quadratic model of K-FAC's step
(concepts/natural_gradient.md#step-size-and-momentum-from-the-quadratic-model, App. C).

``ggn_gram(model, loss_fn, inputs, vectors)`` returns the ``[k, k]`` matrix of
``vᵢᵀ G vⱼ`` for parameter-space vectors ``v₁..v_k`` with ``G`` the exact GGN (= Fisher for
the supported losses) of the loss on ``inputs``: one forward-mode JVP per vector gives
``J vᵢ`` ``[N, C]``, the loss Hessians are applied in closed form. Model hooks are
suspended meanwhile (``torch.func`` cannot run through BackPACK's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from curvlab.extraction.hooks import suspended_hooks
from curvlab.extraction.losses import output_hessian_apply


def ggn_gram(
    model: nn.Module,
    loss_fn: nn.Module,
    inputs: Tensor,
    params: Sequence[nn.Parameter],
    vectors: Sequence[Sequence[Tensor]],
) -> Tensor:
    """``[k, k]`` matrix ``(vᵢᵀ G vⱼ)`` of the exact GGN w.r.t. ``params`` on ``inputs``."""
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def forward(*values: Tensor) -> Tensor:
        return torch.func.functional_call(model, {**fixed, **dict(zip(keys, values))}, (inputs,))

    primals = tuple(p.detach() for p in params)
    with suspended_hooks(model), torch.no_grad():
        if len(vectors) > 1 and _batchable(model):
            # one primal forward for all tangents: the JVPs run batched under vmap
            tangents = tuple(
                torch.stack([v[i].detach() for v in vectors]) for i in range(len(keys))
            )
            result = torch.func.vmap(
                lambda *t: torch.func.jvp(forward, primals, t)[:2],
                out_dims=(None, 0),  # type: ignore[arg-type]  # the primal is not batched
                randomness="same",
            )(*tangents)
            outputs, jvps = result[0], list(result[1].unbind(0))
        else:
            outputs, jvps = None, []
            for v in vectors:
                single = torch.func.jvp(forward, primals, tuple(t.detach() for t in v))
                outputs = single[0]
                jvps.append(single[1])
        assert outputs is not None
        h_jvps = [output_hessian_apply(loss_fn, outputs, jv) for jv in jvps]
        k = len(vectors)
        gram = torch.empty(k, k, dtype=outputs.dtype, device=outputs.device)
        for i in range(k):
            for j in range(i, k):
                gram[i, j] = gram[j, i] = (jvps[i] * h_jvps[j]).sum()
    return gram


def _batchable(model: nn.Module) -> bool:
    """Whether the tangents may be batched: no buffers (e.g. batch-norm running statistics,
    updated in place during the forward, which vmap cannot batch)."""
    return next(iter(model.buffers()), None) is None


def evaluate_capturing_inputs(
    model: nn.Module, closure: Callable[[], Tensor], owner: str
) -> tuple[Tensor, Tensor]:
    """Run ``closure()`` and return its loss with the inputs of ``model``'s last call.

    The quadratic model's curvature products need the batch the closure evaluates.
    """
    captured: list[Tensor] = []
    handle = model.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        loss = closure()
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{owner}: the closure did not call the model.")
    return loss, captured[-1].detach()
