"""Exact curvature products for the quadratic model of K-FAC's step
(concepts/natural_gradient.md#step-size-and-momentum-from-the-quadratic-model, App. C).

``ggn_gram(model, loss_fn, call, params, vectors)`` returns the ``[k, k]`` matrix of
``vᵢᵀ G vⱼ`` for parameter-space vectors ``v₁..v_k`` with ``G`` the exact GGN (= Fisher for
the supported losses) of the loss on the batch of ``call`` (a :class:`CapturedCall`, what
:func:`evaluate_capturing` recorded while the closure ran).

The products ``J vᵢ`` use reverse mode only (reverse-over-reverse, concepts page
"Natural gradient", *Exact curvature products without forward-mode AD*; the helpers are
shared with the matrix-free operators, :mod:`curvlab.extraction.products`): one backward
pass with ``create_graph`` gives ``u ↦ Jᵀu`` as a graph that is linear in a dummy output
cotangent ``u``; differentiating ``⟨Jᵀu, vᵢ⟩`` w.r.t. ``u`` gives ``J vᵢ``. So every model
whose backward is differentiable works, whether or not its kernels have forward-mode AD
(PyTorch's fused CPU attention, oneDNN RNNs). The re-evaluation:

* replays the model call of the closure (positional and keyword arguments, dicts and
  nested containers), on the first ``num_samples`` samples when asked (every tensor whose
  leading dimension is the batch size is sliced; the loss targets are cut to the rows of
  the re-evaluated output, i.e. flattened per-token or per-pixel targets must be
  batch-major);
* runs with the model's hooks suspended, under the random state the closure started
  from (the same dropout masks on the whole batch; the global random stream is not
  advanced), on copies of the buffers (BatchNorm's running statistics and its batch
  counter are left as the closure left them);
* runs scaled-dot-product attention with its composite (math) kernel, whose backward is
  differentiable; the fused CPU/GPU attention kernels have no double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from curvlab.extraction.hooks import suspended_hooks
from curvlab.extraction.losses import loss_rows, output_hessian_apply
from curvlab.extraction.products import jacobian_vector_products, transposed_jacobian


@dataclass(frozen=True)
class CapturedCall:
    """The last model call and loss call of one closure evaluation.

    ``args``/``kwargs``: the model's inputs (detached); ``targets``: the loss's targets;
    ``rng``: the random state the closure started from (CPU and the model's accelerator).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Tensor
    rng: tuple[Tensor, Tensor | None]

    @property
    def batch_size(self) -> int:
        """The leading dimension of the first tensor among the model's inputs."""
        leaves = [t for t in tree_flatten((self.args, self.kwargs))[0] if isinstance(t, Tensor)]
        sized = [t for t in leaves if t.dim() > 0]
        if not sized:
            raise ValueError("the model call has no batched tensor input to take samples from.")
        return int(sized[0].shape[0])

    def subset(self, num_samples: int) -> CapturedCall:
        """The call on the first ``num_samples`` samples (itself when that is all of them)."""
        n = self.batch_size
        if num_samples >= n:
            return self

        def cut(t: Any) -> Any:
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n:
                return t[:num_samples]
            return t

        args, kwargs = tree_map(cut, (self.args, self.kwargs))
        return replace(self, args=args, kwargs=kwargs)


def evaluate_capturing(
    model: nn.Module, loss_fn: nn.Module, closure: Callable[[], Tensor], owner: str
) -> tuple[Tensor, CapturedCall]:
    """Run ``closure()`` and return its loss with the model and loss calls it made.

    The quadratic model's curvature products re-evaluate that batch. ``owner`` names the
    caller in errors (a closure that does not call the model or ``loss_fn``).
    """
    rng = _rng_state(model)
    model_calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    targets: list[Tensor] = []

    def on_model(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        model_calls.append(_detached((args, kwargs)))

    def on_loss(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        target = args[1] if len(args) > 1 else kwargs.get("target")
        if isinstance(target, Tensor):
            targets.append(target.detach())

    handles = [
        model.register_forward_pre_hook(on_model, with_kwargs=True),
        loss_fn.register_forward_hook(on_loss, with_kwargs=True),
    ]
    try:
        loss = closure()
    finally:
        for handle in handles:
            handle.remove()
    if not model_calls:
        raise RuntimeError(f"{owner}: the closure did not call the model.")
    if not targets:
        raise RuntimeError(
            f"{owner}: the closure did not call the loss function it was built with "
            f"({type(loss_fn).__name__}); the quadratic model needs its targets."
        )
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise RuntimeError(f"{owner}: the closure must return the scalar loss tensor.")
    args, kwargs = model_calls[-1]
    return loss, CapturedCall(args, kwargs, targets[-1], rng)


def ggn_gram(
    model: nn.Module,
    loss_fn: nn.Module,
    call: CapturedCall,
    params: Sequence[nn.Parameter],
    vectors: Sequence[Sequence[Tensor | None]],
    num_samples: int | None = None,
) -> Tensor:
    """``[k, k]`` matrix ``(vᵢᵀ G vⱼ)`` of the exact GGN w.r.t. ``params`` on ``call``'s batch.

    A ``None`` entry of a vector is zero: the products of vectors that live on a few
    parameters (one layer's) only traverse the graph that reaches them. With
    ``num_samples``, the loss of the first ``num_samples`` samples (its own reduction).
    """
    if num_samples is not None:
        call = call.subset(num_samples)
    with torch.enable_grad(), _replayed(model, call.rng):
        # on copies of the buffers: BatchNorm's in-place running statistics leave the
        # model's own untouched (and the graph's saved copies stay valid)
        buffers = {name: b.clone() for name, b in model.named_buffers()}
        outputs = torch.func.functional_call(model, buffers, call.args, call.kwargs)
        if not isinstance(outputs, Tensor):
            raise TypeError(
                "the quadratic model needs the model to return the loss's input tensor, got "
                f"{type(outputs).__name__}."
            )
        cotangent, transposed = transposed_jacobian(outputs, params)
    connected = {i for i, t in enumerate(transposed) if t is not None and t.requires_grad}
    # vectors with the same support share their passes
    supports: dict[tuple[int, ...], list[int]] = {}
    for k, v in enumerate(vectors):
        support = tuple(i for i, t in enumerate(v) if t is not None and i in connected)
        supports.setdefault(support, []).append(k)
    jvps: list[Tensor] = [outputs] * len(vectors)
    for support, members in supports.items():
        products = jacobian_vector_products(
            outputs,
            cotangent,
            [t for i in support if (t := transposed[i]) is not None],
            [[x for i in support if (x := vectors[k][i]) is not None] for k in members],
        )
        for k, product in zip(members, products):
            jvps[k] = product
    with torch.no_grad():
        rows, targets = loss_rows(loss_fn, outputs.detach(), call.targets)
        targets = _rows_of(targets, rows.shape[0])
        row_jvps = torch.stack([loss_rows(loss_fn, jv, call.targets)[0] for jv in jvps])
        h_jvps = torch.stack([output_hessian_apply(loss_fn, rows, jv, targets) for jv in row_jvps])
        gram = row_jvps.flatten(1) @ h_jvps.flatten(1).T
        gram = 0.5 * (gram + gram.T)  # symmetric up to rounding
    return gram


def row_count(loss_fn: nn.Module, targets: Tensor) -> int:
    """The loss rows of a batch with these ``targets`` (:func:`loss_rows`, from the targets
    alone): a row per class-index target of ``CrossEntropyLoss`` (samples, tokens, pixels),
    else one per vector of the last dimension (``[N, C]``: ``N``; ``[N, T, C]``: ``N·T``)."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and not targets.is_floating_point():
        return max(1, targets.numel())
    if isinstance(loss_fn, nn.CrossEntropyLoss):  # class probabilities, classes on dim 1
        return max(1, targets.numel() // targets.shape[1]) if targets.dim() > 1 else 1
    return max(1, targets.numel() // targets.shape[-1]) if targets.dim() > 1 else targets.numel()


def _rows_of(targets: Tensor, rows: int) -> Tensor:
    """The targets of the first ``rows`` output rows (a subset's output is batch-major)."""
    if targets.shape[0] < rows:
        raise ValueError(
            f"the loss targets have {targets.shape[0]} rows, fewer than the {rows} output rows "
            "of the model."
        )
    return targets[:rows]


@contextlib.contextmanager
def _replayed(model: nn.Module, rng: tuple[Tensor, Tensor | None]) -> Iterator[None]:
    """A re-evaluation of ``model`` without side effects: hooks suspended, the closure's
    random state replayed without advancing the global stream, and attention on its
    twice-differentiable kernel."""
    device = _accelerator(model)
    devices = [device] if device is not None else []
    with contextlib.ExitStack() as stack:
        stack.enter_context(suspended_hooks(model))
        stack.enter_context(torch.random.fork_rng(devices=devices, device_type=_kind(device)))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        torch.set_rng_state(rng[0])
        if device is not None and rng[1] is not None:
            _device_module(device).set_rng_state(rng[1], device)
        yield


def _accelerator(model: nn.Module) -> torch.device | None:
    """The model's non-CPU device, if any."""
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "cpu":
            return t.device
    return None


def _kind(device: torch.device | None) -> str:
    return "cuda" if device is None else device.type


def _device_module(device: torch.device) -> Any:
    return getattr(torch, device.type)


def _rng_state(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    device = _accelerator(model)
    if device is None:
        return torch.get_rng_state(), None
    return torch.get_rng_state(), _device_module(device).get_rng_state(device)


def _detached(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)
