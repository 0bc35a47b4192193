"""An independent dense reference for the curvature tests, built with ``torch.func``.

Nothing here uses BackPACK or curvlab: Jacobians come from ``jacrev`` + ``vmap`` over
single-sample forward passes, loss Hessians and gradients from ``torch.func`` applied to
the *reduced* loss exactly as PyTorch computes it, and the Fisher from an exact
enumeration of the model's predictive distribution. Everything is dense ``[P, P]``,
in the order of ``model.named_parameters()`` (trainable ones), each parameter flattened
row-major — the order curvlab uses for these ``Sequential`` models. Meant for float64
and tiny models; clarity over speed.

Conventions (concepts/conventions.md, concepts/kronecker.md#notation-and-the-vec-convention;
concepts/fisher_types.md): the loss is
``L = R Σ_n ℓ_n`` with ``R = 1/N`` (CrossEntropy, mean), ``1/(N·C)`` (MSE or BCE, mean),
``1`` (sum); ``ℓ_n`` is sample n's loss under ``reduction="sum"``.

* GGN ``G = Σ_n J_nᵀ (∇²_{f_n} L) J_n`` (R and MSE's factor 2 included);
* empirical Fisher ``EF = (1/R) Σ_n b_n b_nᵀ``, ``b_n = J_nᵀ ∇_{f_n} L`` (= ``R ∇_θ ℓ_n``);
* true Fisher ``F = R Σ_n J_nᵀ E_{ỹ~p(·|f_n)}[∇_f ℓ(f_n, ỹ) ∇_f ℓ(f_n, ỹ)ᵀ] J_n``.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev, vmap

__all__ = [
    "block_diagonal",
    "empirical_fisher",
    "fisher_via_label_expectation",
    "flat_params",
    "ggn",
    "label_gradient_moments",
    "mc_single_sample_variance",
    "output_gradients",
    "output_hessians",
    "per_sample_jacobians",
    "reduction_factor",
]


# --- model and loss plumbing -----------------------------------------------------------


def flat_params(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Trainable parameters ``(name, tensor)`` in ``model.named_parameters()`` order."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def unhooked_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without any module hooks (BackPACK's included).

    Non-leaf tensors cached on modules (BackPACK keeps ``input0``/``output`` after a
    forward pass with grad enabled) cannot be deep-copied; they become ``None``.
    """
    memo: dict[int, object] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = None
    clone = copy.deepcopy(model, memo)
    for module in clone.modules():
        for hooks in (
            module._forward_hooks,
            module._forward_pre_hooks,
            module._backward_hooks,
            module._backward_pre_hooks,
        ):
            hooks.clear()
    return clone


def unhooked_loss(loss_fn: nn.Module) -> nn.Module:
    """A fresh loss module of the same class and reduction (no hooks attached)."""
    supported = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
    if not isinstance(loss_fn, supported):
        raise TypeError(f"reference: unsupported loss {type(loss_fn).__name__}")
    return type(loss_fn)(reduction=loss_fn.reduction)


def reduction_factor(loss_fn: nn.Module, outputs: Tensor) -> float:
    """``R`` in ``L = R Σ_n ℓ_n`` for ``[N, C]`` outputs."""
    n, c = outputs.shape
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / n
    return 1.0 / (n * c)


def _outputs(model: nn.Module, X: Tensor) -> Tensor:
    with torch.no_grad():
        return unhooked_copy(model)(X)


# --- Jacobians, output derivatives -----------------------------------------------------


def per_sample_jacobians(model: nn.Module, X: Tensor) -> Tensor:
    """``J`` of shape ``[N, C, P]``: ``J[n] = ∂f(x_n)/∂θ``, each sample run on its own."""
    plain = unhooked_copy(model)
    named = flat_params(plain)
    names = [name for name, _ in named]
    params = tuple(p.detach() for _, p in named)

    def f_single(params: tuple[Tensor, ...], x: Tensor) -> Tensor:
        out = functional_call(plain, dict(zip(names, params)), (x.unsqueeze(0),))
        return out.squeeze(0)

    jacs = vmap(jacrev(f_single), in_dims=(None, 0))(params, X)  # ([N, C, *p.shape], ...)
    n, c = jacs[0].shape[:2]
    return torch.cat([j.reshape(n, c, -1) for j in jacs], dim=2)


def output_hessians(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[N, C, C]``: the Hessian of the *reduced* loss w.r.t. each sample's output row.

    Computed as the full ``[N, C, N, C]`` Hessian of ``L(outputs)``; asserts that the
    blocks coupling different samples vanish (the loss is a sum over samples).
    """
    loss = unhooked_loss(loss_fn)
    outputs = outputs.detach()
    full = hessian(lambda f: loss(f, targets))(outputs)  # [N, C, N, C]
    n = outputs.shape[0]
    idx = torch.arange(n)
    blocks = full[idx, :, idx, :]  # [N, C, C]
    off = full.clone()
    off[idx, :, idx, :] = 0.0
    scale = max(float(blocks.abs().max()), 1e-300)
    assert float(off.abs().max()) <= 1e-12 * scale, "loss Hessian couples different samples"
    return blocks


def output_gradients(loss_fn: nn.Module, outputs: Tensor, targets: Tensor) -> Tensor:
    """``[N, C]``: ``∇_{f_n} L`` of the *reduced* loss (so ``R ∇_{f_n} ℓ_n``)."""
    loss = unhooked_loss(loss_fn)
    return jacrev(lambda f: loss(f, targets))(outputs.detach())


# --- the matrices ------------------------------------------------------------------------


def ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """GGN ``Σ_n J_nᵀ (∇²_{f_n} L) J_n`` on the loss's own scale, ``[P, P]``."""
    J = per_sample_jacobians(model, X)
    H = output_hessians(loss_fn, _outputs(model, X), y)
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def empirical_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Empirical Fisher ``(1/R) Σ_n b_n b_nᵀ`` with ``b_n = J_nᵀ ∇_{f_n} L``, ``[P, P]``."""
    J = per_sample_jacobians(model, X)
    outputs = _outputs(model, X)
    b = torch.einsum("ncp,nc->np", J, output_gradients(loss_fn, outputs, y))
    return b.T @ b / reduction_factor(loss_fn, outputs)


def _per_sample_nll(loss_fn: nn.Module):
    """``ℓ(f, ỹ)`` for one sample's output row ``f`` [C] (the ``reduction="sum"`` loss)."""
    loss = type(loss_fn)(reduction="sum")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return lambda f, label: loss(f.unsqueeze(0), label.reshape(1))
    return lambda f, label: loss(f, label)


def _label_support(loss_fn: nn.Module, f: Tensor) -> tuple[Tensor, Tensor]:
    """All labels of ``p(·|f)`` for CE/BCE with their probabilities: ``(labels, probs)``."""
    c = f.shape[0]
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return torch.arange(c), torch.softmax(f, dim=0)
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        labels = torch.tensor(list(itertools.product((0.0, 1.0), repeat=c)), dtype=f.dtype)
        sig = torch.sigmoid(f)
        probs = torch.prod(labels * sig + (1 - labels) * (1 - sig), dim=1)
        return labels, probs
    raise TypeError(f"no finite label support for {type(loss_fn).__name__}")


def label_gradient_moments(loss_fn: nn.Module, outputs: Tensor) -> Tensor:
    """``[N, C, C]``: ``E_{ỹ~p(·|f_n)}[∇_f ℓ(f_n, ỹ) ∇_f ℓ(f_n, ỹ)ᵀ]``, per-sample scale.

    CE: ỹ ~ Categorical(softmax f), enumerated; BCE: ỹ ∈ {0,1}^C ~ Π Bernoulli(σ(f_c)),
    all ``2^C`` label vectors enumerated; gradients of ``ℓ`` by autograd.
    MSE: ``ℓ = ‖f − ỹ‖²`` is ``−log N(ỹ; f, ½ I)`` up to a constant, ``∇_f ℓ = 2(f − ỹ)``,
    so the moment is ``4 · ½ I = 2 I`` in closed form.
    """
    outputs = outputs.detach()
    n, c = outputs.shape
    if isinstance(loss_fn, nn.MSELoss):
        eye = torch.eye(c, dtype=outputs.dtype)
        return (2.0 * eye).expand(n, c, c).clone()
    nll_grad = torch.func.grad(_per_sample_nll(loss_fn))
    moments = []
    for f in outputs:
        labels, probs = _label_support(loss_fn, f)
        grads = torch.stack([nll_grad(f, label) for label in labels])  # [K, C]
        moments.append(torch.einsum("k,kc,kd->cd", probs, grads, grads))
    return torch.stack(moments)


def fisher_via_label_expectation(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> Tensor:
    """True Fisher ``R Σ_n J_nᵀ E_ỹ[∇_f ℓ ∇_f ℓᵀ] J_n``, expectation computed exactly."""
    J = per_sample_jacobians(model, X)
    outputs = _outputs(model, X)
    moments = label_gradient_moments(loss_fn, outputs)
    return reduction_factor(loss_fn, outputs) * torch.einsum("ncp,ncd,ndq->pq", J, moments, J)


def mc_single_sample_variance(model: nn.Module, loss_fn: nn.Module, X: Tensor) -> float:
    """``E‖F̂_1 − F‖²_F`` for the one-label-per-sample Monte-Carlo Fisher ``F̂_1``.

    ``F̂_1 = R Σ_n J_nᵀ g̃_n g̃_nᵀ J_n`` with ``g̃_n = ∇_f ℓ(f_n, ỹ_n)``, ``ỹ_n ~ p(·|f_n)``
    independent; the terms are independent and unbiased, so their variances add and
    ``E‖F̂_M − F‖²_F = mc_single_sample_variance / M``. CE/BCE by enumeration; MSE
    from the Gaussian moments (``g̃ = √2 z``, z standard normal):
    ``E‖B(2zzᵀ − 2I)Bᵀ‖² = 4((tr S)² + tr S²)`` with ``S = BᵀB``.
    """
    J = per_sample_jacobians(model, X)
    outputs = _outputs(model, X)
    r = reduction_factor(loss_fn, outputs)
    total = 0.0
    if isinstance(loss_fn, nn.MSELoss):
        for Jn in J:
            S = Jn @ Jn.T  # [C, C] = BᵀB for B = J_nᵀ
            total += float(4.0 * r**2 * (torch.trace(S) ** 2 + torch.trace(S @ S)))
        return total
    nll_grad = torch.func.grad(_per_sample_nll(loss_fn))
    for Jn, f in zip(J, outputs):
        labels, probs = _label_support(loss_fn, f)
        grads = torch.stack([nll_grad(f, label) for label in labels]) @ Jn  # [K, P]
        terms = r * torch.einsum("kp,kq->kpq", grads, grads)
        mean = torch.einsum("k,kpq->pq", probs, terms)
        total += float(torch.einsum("k,k->", probs, ((terms - mean) ** 2).sum(dim=(1, 2))))
    return total


def block_diagonal(dense: Tensor, sizes: list[int]) -> Tensor:
    """``dense`` with everything outside the diagonal blocks of ``sizes`` set to zero."""
    if sum(sizes) != dense.shape[0] or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"block sizes {sizes} do not tile a {tuple(dense.shape)} matrix")
    out = torch.zeros_like(dense)
    start = 0
    for size in sizes:
        stop = start + size
        out[start:stop, start:stop] = dense[start:stop, start:stop]
        start = stop
    return out
