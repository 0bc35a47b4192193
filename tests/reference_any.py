"""Independent dense float64 curvature references for *any* model, with ``torch.func``.

Nothing here imports curvlab. Unlike ``tests/reference.py`` (per-sample ``vmap``, plain
``Sequential`` models), every quantity is computed on the **whole batch** at once, so
models that couple samples (BatchNorm in train mode), emit several output rows per
sample (per-token / per-pixel logits), share or tie weights, or freeze parameters are
all handled by definition. Meant for tiny float64 models; clarity over speed.

Conventions
-----------
* The model maps ``X`` to a 2-D output ``f`` of shape ``[N_rows, C]``; the loss is
  ``L = R Σ_n ℓ_n`` over the output *rows* ``n``, with ``R = 1/N_rows`` for
  CrossEntropy (mean) — ``1/#(rows whose target is not ignore_index)`` when targets are
  ignored, ignored rows contributing nothing — ``R = 1/(N_rows·C)`` for MSE/BCE
  (mean), and ``R = 1`` for ``reduction="sum"``.
* Parameter order: ``[p for _, p in model.named_parameters() if p.requires_grad]``
  (tied parameters appear once), each flattened row-major, concatenated: ``P``.
* Every computation runs on a float64 deep copy of the model without module hooks
  (``copy.deepcopy`` keeps weight tying); the caller's model is never touched.

Matrices
--------
* ``ggn = Jᵀ H J`` with ``J = ∂vec(f)/∂θ`` of the whole batch and ``H = ∇²_f L``;
* ``empirical_fisher = (1/R) Σ_n b_n b_nᵀ`` with ``b_n = J_nᵀ ∇_{f_n} L``;
* ``kfac_reference``: K-FAC factors ``(A, G)`` from their definition (see there),
  ``kfac_dense`` the block-diagonal matrix ``G ⊗ A`` in parameter order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

from tests.reference import flat_params
from tests.reference import unhooked_copy as _unhooked

__all__ = [
    "empirical_fisher",
    "flat_params",
    "ggn",
    "jacobian",
    "kfac_dense",
    "kfac_reference",
    "layer_io",
    "output_gradient",
    "output_hessian",
    "outputs",
    "reduction_factor",
    "unhooked_copy",
    "valid_rows",
]

DTYPE = torch.float64
KFAC_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


# --- model and loss plumbing -----------------------------------------------------------


def unhooked_copy(model: nn.Module) -> nn.Module:
    """A float64 deep copy of ``model`` without module hooks; weight tying is preserved
    (:func:`tests.reference.unhooked_copy`, in float64)."""
    return _unhooked(model).to(DTYPE)


def _unhooked_loss(loss_fn: nn.Module) -> nn.Module:
    """A float64 deep copy of the loss module without hooks (same reduction, options)."""
    supported = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss)
    if not isinstance(loss_fn, supported):
        raise TypeError(f"reference_any: unsupported loss {type(loss_fn).__name__}")
    if loss_fn.reduction not in ("mean", "sum"):
        raise ValueError(f"reference_any: unsupported reduction {loss_fn.reduction!r}")
    return _unhooked(loss_fn).to(DTYPE)


def _double(t: Tensor) -> Tensor:
    """``t`` detached, in float64 if it is floating point (integer tokens/labels stay)."""
    t = t.detach()
    return t.to(DTYPE) if t.is_floating_point() else t


def valid_rows(loss_fn: nn.Module, y: Tensor, num_rows: int) -> Tensor:
    """Boolean mask ``[N_rows]`` of the rows that enter the loss (not ``ignore_index``)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and not y.is_floating_point():
        return y.reshape(-1) != loss_fn.ignore_index
    return torch.ones(num_rows, dtype=torch.bool)


def reduction_factor(loss_fn: nn.Module, f: Tensor, y: Tensor) -> float:
    """``R`` in ``L = R Σ_n ℓ_n`` for the ``[N_rows, C]`` output ``f`` and targets ``y``."""
    num_rows, num_out = f.shape
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            raise NotImplementedError("reference_any: class weights are not supported")
        count = int(valid_rows(loss_fn, y, num_rows).sum())
        if count == 0:
            raise ValueError("reference_any: every target is ignore_index")
        return 1.0 / count
    return 1.0 / (num_rows * num_out)


class RowsInForward(nn.Module):
    """``inner`` with its output positions flattened into ``[N_rows, C]`` rows inside
    ``forward`` (classes on dimension 1 moved last first, where ``classes_first``): the
    same function as ``inner`` with rows the references take as samples."""

    def __init__(self, inner: nn.Module, classes_first: bool) -> None:
        super().__init__()
        self.inner = inner
        self.classes_first = classes_first

    def forward(self, inputs: Tensor) -> Tensor:
        out = self.inner(inputs)
        if self.classes_first:
            out = out.movedim(1, -1)
        return out.reshape(-1, out.shape[-1])


def outputs(model: nn.Module, X: Tensor) -> Tensor:
    """The float64 ``[N_rows, C]`` output of an unhooked copy of ``model`` (no graph)."""
    with torch.no_grad():
        f = unhooked_copy(model)(_double(X))
    if f.ndim != 2:
        raise ValueError(f"reference_any: model output must be [N_rows, C], got {tuple(f.shape)}")
    return f


def output_hessian(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """``[N_rows, C, N_rows, C]``: ``∇²_f L`` of the reduced loss, as PyTorch computes it."""
    loss = _unhooked_loss(loss_fn)
    y = _double(y)
    return hessian(lambda out: loss(out, y))(_double(f))


def output_gradient(loss_fn: nn.Module, f: Tensor, y: Tensor) -> Tensor:
    """``[N_rows, C]``: ``∇_f L`` of the reduced loss (row n is ``R ∇_{f_n} ℓ_n``)."""
    loss = _unhooked_loss(loss_fn)
    y = _double(y)
    return jacrev(lambda out: loss(out, y))(_double(f))


# --- Jacobian, GGN, empirical Fisher --------------------------------------------------


def jacobian(model: nn.Module, X: Tensor) -> Tensor:
    """``[N_rows·C, P]``: Jacobian of the whole-batch output (row-major) w.r.t. ``θ``.

    One ``functional_call`` on the full batch under ``jacrev`` (no per-sample ``vmap``),
    so couplings between samples (BatchNorm in train mode) are included. Tied
    parameters are passed once; ``functional_call`` ties the aliases.
    """
    plain = unhooked_copy(model)
    named = flat_params(plain)
    names = [name for name, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = dict(plain.named_buffers())
    X = _double(X)

    def f(flat: Tensor) -> Tensor:
        chunks = flat.split(sizes)
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        # fresh buffers inside the transform: BatchNorm (train) may update them in place
        params.update({n: b.clone() for n, b in buffers.items()})
        out = functional_call(plain, params, (X,))
        if out.ndim != 2:
            raise ValueError(
                f"reference_any: model output must be [N_rows, C], got {tuple(out.shape)}"
            )
        return out.reshape(-1)

    return jacrev(f)(theta)


def ggn(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """GGN ``Jᵀ (∇²_f L) J`` on the loss's own scale, ``[P, P]`` (exact Fisher for CE/MSE/BCE)."""
    f = outputs(model, X)
    J = jacobian(model, X)
    H = output_hessian(loss_fn, f, y).reshape(f.numel(), f.numel())
    return J.T @ H @ J


def empirical_fisher(model: nn.Module, loss_fn: nn.Module, X: Tensor, y: Tensor) -> Tensor:
    """Empirical Fisher ``(1/R) Σ_n b_n b_nᵀ``, ``b_n = J_nᵀ ∇_{f_n} L``, ``[P, P]``.

    ``J_n`` are the rows of the whole-batch Jacobian that belong to output row ``n``;
    rows whose target is ``ignore_index`` are skipped.
    """
    f = outputs(model, X)
    num_rows, num_out = f.shape
    J = jacobian(model, X).reshape(num_rows, num_out, -1)
    b = torch.einsum("ncp,nc->np", J, output_gradient(loss_fn, f, y))
    b = b[valid_rows(loss_fn, y, num_rows)]
    return b.T @ b / reduction_factor(loss_fn, f, y)


# --- layer inputs and outputs -----------------------------------------------------------


def _module_names(model: nn.Module, modules: Iterable[nn.Module | str]) -> list[str]:
    """Names in ``model.named_modules()`` of ``modules`` (given as modules or names)."""
    by_id = {id(m): name for name, m in model.named_modules()}
    names = []
    for m in modules:
        if isinstance(m, str):
            model.get_submodule(m)  # raises if unknown
            names.append(m)
        elif id(m) in by_id:
            names.append(by_id[id(m)])
        else:
            raise ValueError(f"reference_any: {type(m).__name__} is not a submodule of the model")
    return names


def layer_io(
    model: nn.Module, X: Tensor, modules: Sequence[nn.Module]
) -> dict[nn.Module, list[tuple[Tensor, Tensor]]]:
    """For each module, ``(input, output)`` in float64 for each of its calls in one forward.

    ``input`` is the call's first positional argument. Recorded with forward hooks on an
    unhooked float64 copy; keys are the given modules of the original model.
    """
    plain = unhooked_copy(model)
    names = _module_names(model, modules)
    records: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}
    handles = []
    for name in set(names):

        def hook(_mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
            records[name].append((inp[0].detach(), out.detach()))

        handles.append(plain.get_submodule(name).register_forward_hook(hook))
    with torch.no_grad():
        plain(_double(X))
    for handle in handles:
        handle.remove()
    return {m: list(records[name]) for m, name in zip(modules, names)}


# --- K-FAC ------------------------------------------------------------------------------


def _conv_patches(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """``[B, T, C_in·k]`` patches in the ``(channel, kernel offset)`` order of ``weight``."""
    if module.groups != 1:
        raise NotImplementedError("reference_any: grouped convolutions are not supported")
    if module.padding_mode != "zeros":
        raise NotImplementedError("reference_any: only zero padding is supported")
    if isinstance(module.padding, str):
        if module.padding != "valid":
            raise NotImplementedError("reference_any: padding='same' is not supported")
        padding = (0,) * len(module.kernel_size)
    else:
        padding = module.padding
    if isinstance(module, nn.Conv1d):
        x = x.unsqueeze(-2)  # [B, C_in, 1, L]: a 1 × k two-dimensional convolution
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *padding), (1, *module.stride)
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(1, 2)  # [B, T, C_in·k]


def _positions(module: nn.Module, x: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """One call's input and output gradient as ``[B, T, D_in]`` and ``[B, T, C_out]``."""
    if isinstance(module, nn.Linear):
        if x.ndim == 1:  # unbatched
            x, g = x.reshape(1, 1, -1), g.reshape(1, 1, -1)
        return x.reshape(x.shape[0], -1, x.shape[-1]), g.reshape(g.shape[0], -1, g.shape[-1])
    if isinstance(module, nn.Embedding):  # one-hot inputs; padding tokens get no gradient
        onehot = F.one_hot(x.reshape(x.shape[0], -1), module.num_embeddings).to(g.dtype)
        if module.padding_idx is not None:
            onehot[..., module.padding_idx] = 0
        return onehot, g.reshape(g.shape[0], -1, g.shape[-1])
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        if x.ndim == spatial + 1:  # unbatched
            x, g = x.unsqueeze(0), g.unsqueeze(0)
        a = _conv_patches(module, x)
        g = g.flatten(start_dim=2).transpose(1, 2)  # [B, T, C_out]
        if a.shape[1] != g.shape[1]:
            raise RuntimeError("reference_any: patch count does not match the output size")
        return a, g
    raise NotImplementedError(f"reference_any: K-FAC of {type(module).__name__}")


def _trainable(module: nn.Module) -> tuple[bool, bool]:
    """Whether the module's weight and bias are trainable (``requires_grad``)."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    return (
        weight is not None and weight.requires_grad,
        bias is not None and bias.requires_grad,
    )


def _homogeneous(a: Tensor, weight: bool, bias: bool) -> Tensor:
    """``[B, T, D]``: the inputs (if the weight trains) and a trailing 1 (if the bias trains)."""
    parts = [a] if weight else []
    if bias:
        parts.append(torch.ones_like(a[..., :1]))
    return torch.cat(parts, dim=-1)


def _symmetric_sqrt(H: Tensor) -> Tensor:
    """Batched symmetric PSD square root ``S = Q diag(√λ₊) Qᵀ`` (so ``S Sᵀ = H₊``)."""
    lam, Q = torch.linalg.eigh((H + H.transpose(-1, -2)) / 2)
    return Q @ torch.diag_embed(lam.clamp(min=0).sqrt()) @ Q.transpose(-1, -2)


def kfac_reference(
    model: nn.Module,
    loss_fn: nn.Module,
    X: Tensor,
    y: Tensor,
    modules: Iterable[nn.Module | str] | None = None,
    fisher_type: str = "exact",
    kfac_approx: str = "expand",
    sqrt: str = "symmetric",
) -> dict[str, tuple[Tensor, Tensor]]:
    """K-FAC factors ``{name: (A, G)}`` from their definition, for Linear/Conv1d/Conv2d.

    Inputs ``a`` are per-position vectors ``[B, T, D_in]`` of each call (Linear: all
    middle dimensions are positions; Conv: unfolded patches), extended by a homogeneous
    1 if the module's bias is trainable (and reduced to that 1 alone if its weight is
    frozen). ``g_c = (∂f/∂s)ᵀ V_c`` backpropagates an output-space column ``V_c``
    ``[N_rows, C]`` to the call's output ``s`` (autograd through the whole batch):

    * ``fisher_type="exact"``: ``V_c[n] = S_n[:, c]`` with ``S_n`` the symmetric square
      root of row ``n``'s block of ``∇²_f L`` (ignored rows have ``S_n = 0``); scale 1.
      ``sqrt="curvlinops"`` takes BackPACK's and curvlinops' square root instead, for
      cross-entropy ``√R (diag(√p) − p √pᵀ)`` (the same for the diagonal Hessians of
      MSE and BCE). The two agree whenever each row has its own layer outputs.
    * ``fisher_type="empirical"``: one column ``V = ∇_f L``; ``G`` is scaled by ``1/R``.

    ``kfac_approx="expand"``: ``A`` is the mean of ``a aᵀ`` over all ``(b, t, call)``
    vectors (``1/(N·T_total)`` for batch-first inputs), ``G = scale Σ_c Σ_{call,b,t} g gᵀ``.
    ``kfac_approx="reduce"``: ``A`` is the mean over ``(b, call)`` of ``ā āᵀ`` with ``ā``
    the position mean of ``a``, ``G = scale Σ_c Σ_{call,b} (Σ_t g)(Σ_t g)ᵀ``.
    Calls of a module used several times are extra positions (expand) or extra rows
    (reduce). ``modules=None`` takes every Linear/Conv1d/Conv2d with trainable
    parameters. Keys are names in ``model.named_modules()``.
    """
    if fisher_type not in ("exact", "empirical"):
        raise ValueError(f"reference_any: unknown fisher_type {fisher_type!r}")
    if kfac_approx not in ("expand", "reduce"):
        raise ValueError(f"reference_any: unknown kfac_approx {kfac_approx!r}")
    if modules is None:
        modules = [m for m in model.modules() if isinstance(m, KFAC_MODULES) and any(_trainable(m))]
    names = list(dict.fromkeys(_module_names(model, modules)))
    for name in names:
        if not isinstance(model.get_submodule(name), KFAC_MODULES):
            raise NotImplementedError(
                f"reference_any: K-FAC of {type(model.get_submodule(name)).__name__} ({name})"
            )

    plain = unhooked_copy(model)
    for p in plain.parameters():  # a graph everywhere, so every layer output has a gradient
        p.requires_grad_(True)
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in names}
    handles = []
    for name in names:

        def hook(_mod: nn.Module, inp: tuple, out: Tensor, name: str = name) -> None:
            calls[name].append((inp[0].detach(), out))

        handles.append(plain.get_submodule(name).register_forward_hook(hook))
    f = plain(_double(X))
    for handle in handles:
        handle.remove()
    if f.ndim != 2:
        raise ValueError(f"reference_any: model output must be [N_rows, C], got {tuple(f.shape)}")
    for name in names:
        if not calls[name]:
            raise ValueError(
                f"reference_any: module {name!r} was never called as a module "
                "(its parameters may be used functionally)"
            )

    num_rows, num_out = f.shape
    fd = f.detach()
    if fisher_type == "exact":
        H = output_hessian(loss_fn, fd, y)  # [N_rows, C, N_rows, C]
        rows = torch.arange(num_rows)
        S = _symmetric_sqrt(H[rows, :, rows, :])  # [N_rows, C, C]
        if sqrt == "curvlinops" and isinstance(loss_fn, nn.CrossEntropyLoss):
            p = fd.softmax(dim=1)
            r = reduction_factor(loss_fn, fd, y)
            S = (torch.diag_embed(p.sqrt()) - p.unsqueeze(2) * p.sqrt().unsqueeze(1)) * r**0.5
            S = S * valid_rows(loss_fn, y, num_rows).to(S.dtype)[:, None, None]
        columns = [S[:, :, c] for c in range(num_out)]
        scale = 1.0
    else:
        columns = [output_gradient(loss_fn, fd, y)]
        scale = 1.0 / reduction_factor(loss_fn, fd, y)

    layer_outputs = [out for name in names for _, out in calls[name]]
    column_grads = [
        torch.autograd.grad(f, layer_outputs, grad_outputs=V, retain_graph=True, allow_unused=True)
        for V in columns
    ]

    factors: dict[str, tuple[Tensor, Tensor]] = {}
    start = 0
    for name in names:
        module = model.get_submodule(name)
        weight, bias = _trainable(module)
        A_sum, G_sum, count = 0.0, 0.0, 0
        for k, (x, out) in enumerate(calls[name]):
            grads = [g[start + k] for g in column_grads]
            grads = [torch.zeros_like(out) if g is None else g.detach() for g in grads]
            a = None
            for g in grads:
                a, gp = _positions(module, x, g)
                if kfac_approx == "reduce":
                    gp = gp.sum(dim=1, keepdim=True)
                gp = gp.reshape(-1, gp.shape[-1])
                G_sum = G_sum + gp.T @ gp
            a = _homogeneous(a, weight, bias)
            if kfac_approx == "reduce":
                a = a.mean(dim=1, keepdim=True)
            a = a.reshape(-1, a.shape[-1])
            A_sum = A_sum + a.T @ a
            count += a.shape[0]
        start += len(calls[name])
        factors[name] = (A_sum / count, scale * G_sum)
    return factors


def kfac_dense(model: nn.Module, factors: dict[str, tuple[Tensor, Tensor]]) -> Tensor:
    """The ``[P, P]`` block-diagonal K-FAC matrix in parameter order.

    Each ``kron(G, A)`` lives on the row-major ``[W | b]`` matrix of its module
    (``W`` flattened to ``[C_out, D_in]``, its columns only if the weight trains, the
    bias column only if the bias trains) and is scattered into the positions of
    ``vec(W)`` (row-major) and ``b`` in the flat parameter vector. Parameters of no
    listed module get zero rows/columns; blocks of modules sharing a tied parameter add.
    """
    named = flat_params(model)
    offsets, start = {}, 0
    for _, p in named:
        offsets[id(p)] = start
        start += p.numel()
    dense = torch.zeros(start, start, dtype=DTYPE)
    for name, (A, G) in factors.items():
        module = model.get_submodule(name)
        weight, bias = _trainable(module)
        if isinstance(module, nn.Embedding):  # the matrix is weightᵀ [D, V]
            vocab, c_out = module.weight.shape
            idx = offsets[id(module.weight)] + torch.arange(vocab * c_out).view(vocab, c_out).T
            idx = idx.reshape(-1)
            dense[idx[:, None], idx[None, :]] += torch.kron(G.to(DTYPE), A.to(DTYPE))
            continue
        c_out = module.weight.shape[0]
        d_in = module.weight[0].numel() if weight else 0
        if A.shape[0] != d_in + int(bias) or G.shape[0] != c_out:
            raise ValueError(f"reference_any: factor shapes do not fit module {name!r}")
        idx = torch.empty(c_out, d_in + int(bias), dtype=torch.long)
        if weight:
            idx[:, :d_in] = offsets[id(module.weight)] + torch.arange(c_out * d_in).view(
                c_out, d_in
            )
        if bias:
            idx[:, d_in] = offsets[id(module.bias)] + torch.arange(c_out)
        idx = idx.reshape(-1)
        dense[idx[:, None], idx[None, :]] += torch.kron(G.to(DTYPE), A.to(DTYPE))
    return dense
