"""Matrix-free GGN and Hessian on a ~1M-parameter MLP (concepts/matrix_free.md#cost).

Measures, on one batch of ``--batch`` random MNIST-shaped inputs (784-1000-200-10, ReLU,
cross-entropy, 987 010 parameters, float32):

* agreement of ``MatrixFreeGGN @ v`` with an independent GGN product built with
  ``torch.func`` (forward-mode ``jvp``, the loss Hessian, ``vjp``) in float64;
* the peak resident memory the products add (``ru_maxrss`` before and after; a dense
  ``P × P`` float32 matrix would need 3.9 TB);
* the Hutch++ trace estimate against the exact trace ``Σ_n tr(H_n J_n J_nᵀ)``
  (per-sample Jacobians, chunked);
* the time per product (one vector, and per vector in a block of 8) for the GGN and the
  Hessian, against curvlinops' ``GGNLinearOperator`` / ``HessianLinearOperator``.

Prints a table; asserts nothing. Usage:
``python -m benchmarks.matrix_free [--threads 1] [--batch 128] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

import curvlab


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 200), nn.ReLU(), nn.Linear(200, 10)
    )


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def func_ggn_product(model: nn.Module, x: Tensor, v: Tensor) -> Tensor:
    """``Jᵀ H J v`` with torch.func (float64 copy of the model), for the mean CE loss."""
    double = build_model().double()
    double.load_state_dict(model.state_dict())
    names = [n for n, _ in double.named_parameters()]
    params = tuple(p.detach() for p in double.parameters())
    x = x.double()

    def f(*ps: Tensor) -> Tensor:
        return functional_call(double, dict(zip(names, ps)), (x,))

    tangents, start = [], 0
    for p in params:
        tangents.append(v[start : start + p.numel()].double().reshape(p.shape))
        start += p.numel()
    out, jv = jvp(f, params, tuple(tangents))
    p_soft = out.softmax(dim=1)
    hjv = (p_soft * jv - p_soft * (p_soft * jv).sum(dim=1, keepdim=True)) / x.shape[0]
    _, pullback = vjp(f, *params)
    return torch.cat([t.reshape(-1) for t in pullback(hjv)])


def exact_trace(model: nn.Module, x: Tensor, chunk: int = 4) -> float:
    """``tr G = (1/N) Σ_n tr(H_n J_n J_nᵀ)`` from per-sample Jacobians (float64)."""
    double = build_model().double()
    double.load_state_dict(model.state_dict())
    names = [n for n, _ in double.named_parameters()]
    params = tuple(p.detach() for p in double.parameters())

    def single(ps: tuple[Tensor, ...], xi: Tensor) -> Tensor:
        return functional_call(double, dict(zip(names, ps)), (xi.unsqueeze(0),)).squeeze(0)

    total = 0.0
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk].double()
        jacs = vmap(jacrev(single), in_dims=(None, 0))(params, xs)
        gram = sum(torch.einsum("ncp,ndp->ncd", j.flatten(2), j.flatten(2)) for j in jacs)
        with torch.no_grad():
            p_soft = functional_call(double, dict(zip(names, params)), (xs,)).softmax(dim=1)
        hess = torch.diag_embed(p_soft) - p_soft.unsqueeze(2) * p_soft.unsqueeze(1)
        total += float(torch.einsum("ncd,ndc->", hess, gram))
    return total / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--trace-matvecs", type=int, default=99)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model = build_model()
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 784, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    params = list(model.parameters())
    P = sum(p.numel() for p in params)
    print(f"# MLP 784-1000-200-10, P = {P}, batch {args.batch}, float32, {args.threads} thread(s)")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}")

    v = torch.randn(P, generator=gen)
    V = torch.randn(P, 8, generator=gen)
    ggn = curvlab.MatrixFreeGGN(model, loss_fn)
    hess = curvlab.MatrixFreeHessian(model, loss_fn)
    before = peak_rss_mb()
    ggn.update(x, y)
    hess.update(x, y)
    product = ggn @ v
    block = ggn @ V
    hess @ V
    added = peak_rss_mb() - before

    reference = func_ggn_product(model, x, v)
    rel = float(torch.linalg.vector_norm(product.double() - reference))
    rel /= float(torch.linalg.vector_norm(reference))
    column = func_ggn_product(model, x, V[:, 3])
    rel_block = float(torch.linalg.vector_norm(block[:, 3].double() - column))
    rel_block /= float(torch.linalg.vector_norm(column))

    ggn64 = curvlab.MatrixFreeGGN(build_model().double(), loss_fn)
    ggn64.model.load_state_dict(model.state_dict())
    ggn64.update(x.double(), y)
    rel64 = float(torch.linalg.vector_norm(ggn64 @ v.double() - reference))
    rel64 /= float(torch.linalg.vector_norm(reference))

    print("\n## agreement with torch.func (float64 jvp/vjp GGN product)")
    print(f"relative error, float32 operator, one vector      {rel:.2e}")
    print(f"relative error, float32 operator, block of 8      {rel_block:.2e}")
    print(f"relative error, float64 operator                  {rel64:.2e}")
    print(f"peak memory added by update + products            {added:.0f} MB")

    start = time.perf_counter()
    estimate = ggn.estimate_trace(args.trace_matvecs)
    trace_time = time.perf_counter() - start
    truth = exact_trace(model, x)
    print("\n## trace")
    print(f"exact trace (per-sample Jacobians, float64)      {truth:.6g}")
    print(
        f"Hutch++ ({args.trace_matvecs} products)                   {float(estimate.value):.6g} "
        f"± {float(estimate.error):.2g} (std. error), relative error "
        f"{abs(float(estimate.value) - truth) / truth:.2%}, {trace_time:.1f} s"
    )
    hutch = ggn.estimate_trace(args.trace_matvecs, method="hutchinson")
    print(
        f"Hutchinson ({args.trace_matvecs} products)                {float(hutch.value):.6g} "
        f"± {float(hutch.error):.2g}, relative error "
        f"{abs(float(hutch.value) - truth) / truth:.2%}"
    )
    top = ggn.estimate_eigenvalues(3)
    print(
        f"top-3 eigenvalues (Lanczos, {top.num_matvecs} products)       "
        f"{[f'{t:.4g}' for t in top.value.tolist()]}, bounds "
        f"{[f'{e:.1g}' for e in top.error.tolist()]}"
    )

    print("\n## time per product (median of", args.repeats, "runs)")
    rows = [
        ("curvlab MatrixFreeGGN", lambda: ggn @ v, lambda: ggn @ V),
        ("curvlab MatrixFreeHessian", lambda: hess @ v, lambda: hess @ V),
    ]
    try:
        from curvlinops import GGNLinearOperator, HessianLinearOperator

        data = [(x, y)]
        theirs_ggn = GGNLinearOperator(model, loss_fn, params, data, check_deterministic=False)
        theirs_hess = HessianLinearOperator(model, loss_fn, params, data, check_deterministic=False)
        rows += [
            ("curvlinops GGNLinearOperator", lambda: theirs_ggn @ v, lambda: theirs_ggn @ V),
            ("curvlinops HessianLinearOperator", lambda: theirs_hess @ v, lambda: theirs_hess @ V),
        ]
        agreement = float(torch.linalg.vector_norm(theirs_ggn @ v - product))
        agreement /= float(torch.linalg.vector_norm(product))
        print(f"(curvlinops GGN vs curvlab GGN, relative difference {agreement:.1e})")
    except ImportError:
        print("(curvlinops not installed: no comparison)")
    print(f"{'operator':34s} {'1 vector':>10s} {'per vector of 8':>16s}")
    for name, one, eight in rows:
        t1 = timed(one, args.repeats)
        t8 = timed(eight, args.repeats) / 8
        print(f"{name:34s} {t1 * 1e3:8.1f} ms {t8 * 1e3:14.1f} ms")


if __name__ == "__main__":
    main()
