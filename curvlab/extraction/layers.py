"""Layer rules for Kronecker-factored curvature: how each layer type yields ``a`` and ``g``.

A rule turns a layer's input into *patches* ``[N, T, D_in]`` (``T`` = positions sharing
the weight: 1 for a plain ``Linear``, the positions of a ``[N, …, D]`` input, the output
locations of a convolution, the tokens of an embedding) and its backpropagated output
quantities ``[K, N, *out]`` (``K`` loss-Hessian columns, MC samples or 1) into
``[K, N, T, D_out]``. The weight is viewed as the matrix ``[D_out, D_in]``
(``weight.reshape(D_out, -1)``, which for convolutions matches the (channel, kernel
offset) order of the patches, concepts/kronecker.md#convolutions-kfc; an embedding's ``[V, D]``
weight is the transpose of its matrix, whose inputs are one-hot vectors); a *trainable*
bias joins as the last column through the homogeneous coordinate.

Rules live in ``KRONECKER_RULES`` (layer type → rule), which users may extend with
:func:`register_kronecker_rule`; nothing else inspects layer types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from math import prod
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_CONV_FN: dict[int, Callable[..., Tensor]] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _linear_patches(module: nn.Module, x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _linear_columns(module: nn.Module, grad: Tensor) -> Tensor:
    return grad.reshape(grad.shape[0], grad.shape[1], -1, grad.shape[-1])


def _check_linear(module: nn.Module) -> None:
    return None


def _conv_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Unfolded input patches ``[N, T, C_in·|Δ|]`` of a convolution (im2col, any dim).

    Conv2d uses ``F.unfold``. Conv1d/Conv3d use a grouped convolution with one-hot
    kernels, which copies every kernel offset of every input channel into its own output
    channel: channel ``c·|Δ| + k`` holds offset ``k`` of input channel ``c``, the order of
    ``weight.reshape(C_out, -1)`` (the order ``F.unfold`` uses too).
    """
    conv = _as_conv(module)
    dims = len(conv.kernel_size)
    if dims == 2:
        padding = 0 if conv.padding == "valid" else conv.padding  # strings rejected by the rule
        patches = F.unfold(
            x,
            conv.kernel_size,
            dilation=conv.dilation,
            padding=cast(tuple[int, ...], padding),
            stride=conv.stride,
        )  # [N, C_in·k, T]
        return patches.transpose(1, 2)
    c_in, kernel = conv.in_channels, conv.kernel_size
    k = prod(kernel)
    eye = torch.eye(k, dtype=x.dtype, device=x.device).reshape(k, 1, *kernel)
    weight = eye.repeat(c_in, *([1] * (dims + 1)))  # [C_in·k, 1, *kernel]
    patches = _CONV_FN[dims](
        x,
        weight,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=c_in,
    )  # [N, C_in·k, *out]
    return patches.flatten(start_dim=2).transpose(1, 2)


def _conv_columns(module: nn.Module, grad: Tensor) -> Tensor:
    # [K, N, C_out, *out] -> [K, N, T, C_out]
    return grad.flatten(start_dim=3).transpose(2, 3)


def _embedding_patches(module: nn.Module, x: Tensor) -> Tensor:
    """One-hot rows ``[N, T, V]``; ``padding_idx`` tokens get a zero row (no gradient)."""
    emb = _as_embedding(module)
    idx = x.reshape(x.shape[0], -1)
    onehot = F.one_hot(idx, emb.num_embeddings).to(emb.weight.dtype)
    if emb.padding_idx is not None:
        onehot[..., emb.padding_idx] = 0
    return onehot


def _embedding_input_sum(module: nn.Module, x: Tensor) -> tuple[Tensor, int]:
    """``Σ ā āᵀ`` of one-hot inputs is diagonal; its diagonal ``[V]`` is the token counts
    (``padding_idx`` left out)."""
    emb = _as_embedding(module)
    counts = torch.bincount(x.reshape(-1), minlength=emb.num_embeddings).to(emb.weight.dtype)
    if emb.padding_idx is not None:
        counts[emb.padding_idx] = 0
    return counts, x.numel()


def _as_embedding(module: nn.Module) -> nn.Embedding:
    assert isinstance(module, nn.Embedding)
    return module


def _check_embedding(module: nn.Module) -> None:
    emb = _as_embedding(module)
    if emb.max_norm is not None:
        raise ValueError(
            "Embedding with max_norm renormalises its weight in place during the forward "
            "pass; the Kronecker backends do not support it."
        )
    if emb.sparse:
        raise ValueError("Embedding(sparse=True): sparse gradients are not supported.")


def _as_conv(module: nn.Module) -> nn.Conv1d | nn.Conv2d | nn.Conv3d:
    assert isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    return module


def _check_conv(module: nn.Module) -> None:
    conv = _as_conv(module)
    if conv.groups != 1:
        raise ValueError(
            f"{type(conv).__name__} with groups={conv.groups}: grouped convolutions are not "
            "supported by the Kronecker backends (one block per group is not implemented)."
        )
    if conv.padding_mode != "zeros":
        raise ValueError(
            f"{type(conv).__name__} with padding_mode={conv.padding_mode!r}: only 'zeros' "
            "padding is supported by the Kronecker backends."
        )
    if isinstance(conv.padding, str) and conv.padding != "valid":
        raise ValueError(
            f"{type(conv).__name__} with padding={conv.padding!r}: give the padding as "
            "integers (or 'valid') for the Kronecker backends."
        )


@dataclass(frozen=True)
class KroneckerRule:
    """How one layer type enters a Kronecker factorization (see the module docstring).

    ``input_sum`` marks a layer whose input factor is *diagonal* under expand (one-hot
    inputs: an embedding) and computes ``(diag(Σ ā āᵀ), N·T)`` directly, the diagonal as a
    vector ``[D_in]``; such a layer has no trainable bias. Its ``A`` is then kept, solved,
    saved and all-reduced as that vector (concepts/kronecker.md#diagonal-input-factors).
    ``transposed``: the weight is stored as ``[D_in, D_out]``;
    ``channels_first``: the output gradient is laid out ``[K, N, D_out, *positions]``
    (convolutions), so expand's ``G`` is formed per (column, sample) without a transposed
    copy of the gradient.
    """

    patches: Callable[[nn.Module, Tensor], Tensor]
    columns: Callable[[nn.Module, Tensor], Tensor]
    check: Callable[[nn.Module], None]
    input_sum: Callable[[nn.Module, Tensor], tuple[Tensor, int]] | None = None
    transposed: bool = False
    channels_first: bool = False


KRONECKER_RULES: dict[type[nn.Module], KroneckerRule] = {
    nn.Linear: KroneckerRule(_linear_patches, _linear_columns, _check_linear),
    nn.Conv1d: KroneckerRule(_conv_patches, _conv_columns, _check_conv, channels_first=True),
    nn.Conv2d: KroneckerRule(_conv_patches, _conv_columns, _check_conv, channels_first=True),
    nn.Conv3d: KroneckerRule(_conv_patches, _conv_columns, _check_conv, channels_first=True),
    nn.Embedding: KroneckerRule(
        _embedding_patches,
        _linear_columns,
        _check_embedding,
        input_sum=_embedding_input_sum,
        transposed=True,
    ),
}


def register_kronecker_rule(layer_type: type[nn.Module], rule: KroneckerRule) -> None:
    """Give ``layer_type`` (exactly this class) a Kronecker rule; the hooks engine then
    covers it with a Kronecker block. The layer must own ``weight`` (and optionally
    ``bias``) and compute ``output = f(weight-matrix @ patches)`` per position."""
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_kronecker_rule: {layer_type!r} is not an nn.Module class.")
    if not isinstance(rule, KroneckerRule):
        raise TypeError("register_kronecker_rule: rule must be a KroneckerRule.")
    KRONECKER_RULES[layer_type] = rule


def rule_for(module: nn.Module) -> KroneckerRule | None:
    """The rule of ``module``'s exact type, or ``None``."""
    return KRONECKER_RULES.get(type(module))


def has_trainable_bias(module: nn.Module) -> bool:
    """Whether ``module`` has a bias that requires grad (it joins the Kronecker block)."""
    bias = getattr(module, "bias", None)
    return isinstance(bias, Tensor) and bias.requires_grad


KFAC_APPROXES = ("expand", "reduce")


def statistics_dtype(t: Tensor) -> Tensor:
    """Half-precision quantities (autocast) are promoted: statistics stay float32/64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def homogeneous(patches: Tensor, module: nn.Module) -> Tensor:
    """Rows ``ā = [a, 1]`` (the 1 only with a trainable bias): ``[rows, D_in(+1)]``.

    ``patches`` ``[..., D_in]`` may be a strided view; they are written into the result
    with a single copy.
    """
    d = patches.shape[-1]
    rows = patches.numel() // max(d, 1)
    if not has_trainable_bias(module):
        return patches.reshape(rows, d)
    out = patches.new_empty(rows, d + 1)
    out[:, :d].view(*patches.shape).copy_(patches)
    out[:, d] = 1
    return out


def layer_patches(module: nn.Module, x: Tensor) -> Tensor:
    """Homogeneous input patches ``ā`` of a batch: ``[N, T, D_in(+1)]``."""
    patches = KRONECKER_RULES[type(module)].patches(module, x)
    n, t = patches.shape[:2]
    return homogeneous(patches, module).reshape(n, t, -1)


def layer_columns(module: nn.Module, grad: Tensor) -> Tensor:
    """Backpropagated output quantities ``[K, N, *out]`` as ``[K, N, T, D_out]``."""
    return KRONECKER_RULES[type(module)].columns(module, grad)


def input_factor_sum(
    module: nn.Module, x: Tensor, kfac_approx: str, keep: Tensor | None = None
) -> tuple[Tensor, int]:
    """``(Σ ā āᵀ, count)`` of one batch; ``A = Σ ā āᵀ / count``
    (concepts/kronecker.md#weight-sharing-expand-and-reduce). For a layer with a diagonal
    input factor (:func:`diagonal_input`) it is the diagonal ``[D_in]``, else ``[D_in, D_in]``.

    expand: the sum over samples and positions, ``count = N·T``; reduce: patches are
    averaged over positions first, ``count = N`` (the homogeneous 1 stays 1).

    ``keep`` ``[N, T]`` (bool): only these patches count (:func:`kept_patches`: the rows
    the loss ignores are left out); reduce averages each sample's kept positions and
    leaves out samples without any.
    """
    rule = KRONECKER_RULES[type(module)]
    if kfac_approx == "expand" and rule.input_sum is not None:
        if keep is None:
            return rule.input_sum(module, x)
        if x.numel() == keep.numel():  # one input element per position (token ids)
            return rule.input_sum(module, x.reshape(keep.shape)[keep].reshape(1, -1))
    patches = rule.patches(module, x)  # [N, T, D]
    if keep is not None:
        weights = keep.to(patches.dtype).unsqueeze(-1)
        if kfac_approx == "reduce":
            counts = weights.sum(dim=1)  # [N, 1]
            some = counts[:, 0] > 0
            patches = ((patches * weights).sum(dim=1) / counts.clamp(min=1))[some]
            patches = patches.unsqueeze(1)
        else:
            patches = patches[keep].unsqueeze(1)
    elif kfac_approx == "reduce":
        patches = patches.mean(dim=1, keepdim=True)
    a = homogeneous(patches, module)
    if diagonal_input(module, kfac_approx):  # one-hot rows: Σ ā āᵀ is diagonal
        return a.square().sum(dim=0), a.shape[0]
    return a.T @ a, a.shape[0]


def diagonal_input(module: nn.Module, kfac_approx: str) -> bool:
    """Whether ``module``'s input factor ``A`` is diagonal and kept as its diagonal ``[D_in]``:
    one-hot inputs (a rule with ``input_sum``, e.g. ``nn.Embedding``) under expand. Under
    reduce, positions are averaged first and ``A`` is a dense matrix."""
    rule = KRONECKER_RULES.get(type(module))
    return kfac_approx == "expand" and rule is not None and rule.input_sum is not None


def num_positions(module: nn.Module, output: Tensor) -> int:
    """``T``: the positions that share the weight in a call whose output is ``output``."""
    return int(KRONECKER_RULES[type(module)].columns(module, output.unsqueeze(0)).shape[2])


def kept_patches(valid: Tensor | None, n: int, t: int) -> Tensor | None:
    """``[N, T]`` (bool): the patches of a call (``N`` samples, ``T`` positions) that belong
    to loss rows the loss counts, given ``valid`` ``[R]`` (the loss rows that count, or
    ``None`` for all).

    Rows map to patches where their numbers match (concepts/models.md#rows-the-loss-ignores):
    one row per sample (``N = R``: every position of an ignored row's sample is left out)
    or one row per position, flattened sample-major like the layer's input
    (``N·T = R``: per-token layers of a language model whose padding targets are
    ``ignore_index``). Elsewhere the mapping is unknown and every patch counts (``None``).
    """
    if valid is None:
        return None
    if n == valid.shape[0]:
        return valid.reshape(n, 1).expand(n, t)
    if n * t == valid.shape[0]:
        return valid.reshape(n, t)
    return None


def output_factor(module: nn.Module, grad: Tensor, kfac_approx: str) -> Tensor:
    """``Σ g gᵀ`` over columns, samples and positions of ``grad`` ``[K, N, *out]``.

    expand sums the outer products over positions; reduce sums ``g`` over positions
    before the outer product (concepts/kronecker.md#weight-sharing-expand-and-reduce).
    """
    rule = KRONECKER_RULES[type(module)]
    if kfac_approx == "expand" and rule.channels_first and grad.dim() > 3:
        # [K, N, D_out, *positions] viewed as [K·N, D_out, T]: Σ_{k,n} g g ᵀ by one batched
        # GEMM over (column, sample), reading the gradient in its own memory layout
        flat = grad.reshape(-1, grad.shape[2], prod(grad.shape[3:]))
        return torch.bmm(flat, flat.transpose(1, 2)).sum(dim=0)
    cols = layer_columns(module, grad)  # [K, N, T, D_out]
    if kfac_approx == "reduce":
        cols = cols.sum(dim=2)
    # channels first: for convolutions this is (nearly) the gradient's own memory layout
    flat = cols.movedim(-1, 0).reshape(cols.shape[-1], -1)
    return flat @ flat.T


def output_factor_columns(module: nn.Module, grad: Tensor, kfac_approx: str) -> Tensor:
    """Columns ``C`` ``[D_out, M]`` with ``C Cᵀ`` = :func:`output_factor` (the factor in
    low-rank form: one column per backpropagated column, sample and, for expand,
    position)."""
    cols = layer_columns(module, grad)  # [K, N, T, D_out]
    if kfac_approx == "reduce":
        cols = cols.sum(dim=2)
    return cols.movedim(-1, 0).reshape(cols.shape[-1], -1)


def _transposed(module: nn.Module) -> bool:
    rule = KRONECKER_RULES.get(type(module))
    return rule is not None and rule.transposed


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """``(D_out, D_in)`` of the homogeneous weight matrix ``[W | b]``."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    bias = int(has_trainable_bias(module))
    if _transposed(module):
        return weight.shape[1], weight.shape[0] + bias
    return weight.shape[0], weight[0].numel() + bias


def to_matrix(module: nn.Module, weight_part: Tensor, bias_part: Tensor | None) -> Tensor:
    """Parameter-shaped tensors (weight, bias) → the homogeneous matrix ``[D_out, D_in(+1)]``."""
    if _transposed(module):
        mat = weight_part.T
    else:
        mat = weight_part.reshape(weight_part.shape[0], -1)
    if bias_part is None:
        return mat
    return torch.cat([mat, bias_part.reshape(-1, 1)], dim=1)


def from_matrix(module: nn.Module, mat: Tensor) -> list[Tensor]:
    """Inverse of :func:`to_matrix`: ``[weight-shaped, bias-shaped]`` (bias only if trainable)."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    w = mat[:, :-1] if has_trainable_bias(module) else mat
    w = w.T.contiguous() if _transposed(module) else w.reshape(weight.shape)
    if not has_trainable_bias(module):
        return [w]
    return [w, mat[:, -1].contiguous()]


def parameter_order(module: nn.Module) -> Tensor:
    """Indices into the row-major ``[W | b]`` matrix, listed in ``[vec(W), b]`` order
    (``vec`` row-major over the *parameter's* shape)."""
    d_out, d_in = weight_matrix_shape(module)
    index = torch.arange(d_out * d_in).reshape(d_out, d_in)
    weight_index = index[:, :-1] if has_trainable_bias(module) else index
    if _transposed(module):
        weight_index = weight_index.T
    order = weight_index.reshape(-1)
    if not has_trainable_bias(module):
        return order
    return torch.cat([order, index[:, -1]])


# --- diagonal rules: per-sample gradients at the layer ---------------------------------
#
# A rule maps a layer, its recorded input and its output gradients ``[K, N, ...]`` (one
# per column) to per-sample gradients of its trainable parameters, ``{param: [K, N,
# *param.shape]}``. Normalisation layers are affine in their normalised input ``x̂``:
# ``y = x̂ · w + b`` per channel, so ``∂/∂w = Σ g·x̂`` and ``∂/∂b = Σ g`` over the
# positions of each sample (the unit-wise view of ASDL and Osawa et al.).


def _affine_per_channel(
    module: nn.Module, x_hat: Tensor, grad: Tensor, channel_dims: int
) -> dict[Tensor, Tensor]:
    """Per-sample ``(Σ g·x̂, Σ g)`` over the dimensions that are neither sample nor channel.

    ``channel_dims``: ``1`` (channels at dim 1 of ``x``: BatchNorm, GroupNorm) or ``-d``
    (the last ``d`` dims: LayerNorm's normalized shape).
    """
    k, n = grad.shape[:2]
    if channel_dims == 1:
        c = x_hat.shape[1]
        gx = (grad * x_hat).reshape(k, n, c, -1).sum(-1)
        gb = grad.reshape(k, n, c, -1).sum(-1)
    else:
        shape = x_hat.shape[channel_dims:]
        gx = (grad * x_hat).reshape(k, n, -1, *shape).sum(2)
        gb = grad.reshape(k, n, -1, *shape).sum(2)
    out: dict[Tensor, Tensor] = {}
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(weight, Tensor) and weight.requires_grad:
        out[weight] = gx
    if isinstance(bias, Tensor) and bias.requires_grad:
        out[bias] = gb
    return out


def _batch_norm_rule(module: nn.Module, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    bn = cast(nn.modules.batchnorm._BatchNorm, module)
    batch_stats = bn.training or not bn.track_running_stats
    x_hat = F.batch_norm(
        x,
        None if batch_stats else bn.running_mean,
        None if batch_stats else bn.running_var,
        training=batch_stats,
        eps=bn.eps,
    )
    return _affine_per_channel(module, x_hat, grad, 1)


def _layer_norm_rule(module: nn.Module, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    ln = cast(nn.LayerNorm, module)
    x_hat = F.layer_norm(x, ln.normalized_shape, eps=ln.eps)
    return _affine_per_channel(module, x_hat, grad, -len(ln.normalized_shape))


def _group_norm_rule(module: nn.Module, x: Tensor, grad: Tensor) -> dict[Tensor, Tensor]:
    gn = cast(nn.GroupNorm, module)
    x_hat = F.group_norm(x, gn.num_groups, eps=gn.eps)
    return _affine_per_channel(module, x_hat, grad, 1)


DiagonalRule = Callable[[nn.Module, Tensor, Tensor], dict[Tensor, Tensor]]

DIAGONAL_RULES: dict[type[nn.Module], DiagonalRule] = {
    nn.BatchNorm1d: _batch_norm_rule,
    nn.BatchNorm2d: _batch_norm_rule,
    nn.BatchNorm3d: _batch_norm_rule,
    nn.LayerNorm: _layer_norm_rule,
    nn.GroupNorm: _group_norm_rule,
}
