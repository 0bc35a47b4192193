"""Tests for curvlab.linalg.cholesky (float64 retry, clear errors, solves vs scipy)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st

from curvlab.linalg import LinAlgError, cholesky_factor, cholesky_solve, damped_cholesky

from ._helpers import (
    assert_rel,
    cond,
    dims,
    dtypes,
    f64,
    gen,
    hsettings,
    kappas,
    randn,
    resid_ok,
    seeds,
    solve_rtol,
    spd,
)


@hsettings(120)
@given(
    seed=seeds,
    n=dims,
    kappa=kappas,
    lam=st.sampled_from([0.0, 1e-3, 1.0]),
    rhs=st.sampled_from(["vector", "matrix", "batched"]),
    dtype=dtypes,
)
def test_cholesky_factor_and_solve(
    seed: int, n: int, kappa: float, lam: float, rhs: str, dtype: torch.dtype
) -> None:
    g = gen(seed)
    M = spd(n, kappa, g, dtype)
    L = damped_cholesky(M, lam, name="M") if lam else cholesky_factor(M, name="M")
    assert L.dtype == dtype and L.shape == (n, n)
    assert torch.equal(L, torch.tril(L))
    Md = f64(M) + lam * np.eye(n)
    eps = torch.finfo(dtype).eps
    # backward stability of Cholesky: ‖L Lᵀ − M‖ ≲ c·n·eps·‖M‖
    assert np.linalg.norm(f64(L) @ f64(L).T - Md) <= 10 * n * eps * np.linalg.norm(Md)
    shape = {"vector": (n,), "matrix": (n, 3), "batched": (2, n, 3)}[rhs]
    B = randn(*shape, g=g, dtype=dtype)
    X = cholesky_solve(L, B)
    assert X.dtype == dtype and X.shape == B.shape
    rtol = solve_rtol(dtype, cond(Md))
    Bs, Xs = f64(B).reshape(-1, n, shape[-1] if rhs != "vector" else 1), f64(X)
    Xs = Xs.reshape(Bs.shape)
    for b in range(Bs.shape[0]):
        ref = scipy.linalg.solve(Md, Bs[b], assume_a="pos")
        for k in range(Bs.shape[2]):
            assert resid_ok(Md, Xs[b][:, k], Bs[b][:, k], dtype, c=10 * n)
        if rtol < 0.1:
            assert_rel(Xs[b], ref, rtol, "cholesky_solve")


def _float32_cholesky_failure() -> torch.Tensor:
    """A float32 matrix that is PD in exact arithmetic but fails float32 Cholesky."""
    for seed in range(500):
        g = gen(seed)
        M = spd(6, 1e10, g, torch.float32)
        M = (M + M.T) / 2
        if (
            int(torch.linalg.cholesky_ex(M).info) > 0
            and int(torch.linalg.cholesky_ex(M.double()).info) == 0
        ):
            return M
    pytest.skip("no float32 Cholesky failure found for this torch/LAPACK build")


def test_cholesky_retries_in_float64_real_failure() -> None:
    M = _float32_cholesky_failure()
    L = cholesky_factor(M, name="A")
    assert L.dtype == torch.float32 and torch.isfinite(L).all()
    assert_rel(L.double() @ L.double().T, M.double(), 1e-6, "float32 result of the retry")
    L64 = cholesky_factor(M, name="A", keep_float64=True)
    assert L64.dtype == torch.float64
    assert_rel(L64 @ L64.T, M.double(), 1e-14, "kept float64 factor")
    # the solve with a float64 factor returns the right-hand side's dtype
    X = cholesky_solve(L64, torch.ones(6, dtype=torch.float32))
    assert X.dtype == torch.float32


def test_cholesky_retry_path_monkeypatched(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.cholesky_ex
    calls: list[torch.dtype] = []

    def flaky(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(M.dtype)
        L, info = real(M)
        if M.dtype == torch.float32:
            return L, torch.ones_like(info)  # report "leading minor 1 not PD"
        return L, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    M = spd(4, 1e2, gen(1), torch.float32)
    L = cholesky_factor(M)
    assert calls == [torch.float32, torch.float64]
    assert L.dtype == torch.float32
    assert_rel(L @ L.T, M, 1e-6, "after retry")


def test_cholesky_non_finite_factor_triggers_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch.linalg.cholesky_ex

    def nan_factor(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        L, info = real(M)
        return (L * float("nan"), info) if M.dtype == torch.float32 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", nan_factor)
    L = cholesky_factor(torch.eye(3))
    assert torch.equal(L, torch.eye(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_not_pd_error_names_matrix(dtype: torch.dtype) -> None:
    M = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=dtype)  # eigenvalues 3, -1
    with pytest.raises(LinAlgError, match=r"layer 3: G.*leading minor of order 2"):
        cholesky_factor(M, name="layer 3: G")
    with pytest.raises(LinAlgError, match=r"layer 3: G"):
        damped_cholesky(M, 0.5, name="layer 3: G")
    damped_cholesky(M, 1.5, name="layer 3: G")  # M + 1.5 I is PD


def test_cholesky_input_errors() -> None:
    with pytest.raises(LinAlgError, match=r"layer 0: A contains non-finite values"):
        cholesky_factor(torch.tensor([[float("nan")]]), name="layer 0: A")
    with pytest.raises(ValueError, match=r"M must be a square 2-D matrix, got shape \[2, 3\]"):
        cholesky_factor(torch.zeros(2, 3), name="M")
    with pytest.raises(ValueError, match=r"square 2-D"):
        cholesky_factor(torch.zeros(2, 2, 2))
    with pytest.raises(TypeError, match="floating-point"):
        cholesky_factor(torch.eye(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"damping must be finite and non-negative"):
        damped_cholesky(torch.eye(2), -1e-3)
    with pytest.raises(ValueError, match=r"damping must be finite and non-negative"):
        damped_cholesky(torch.eye(2), float("inf"))
    with pytest.raises(ValueError, match=r"B has shape \[3, 2\] but L \[2, 2\]"):
        cholesky_solve(torch.eye(2), torch.zeros(3, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cholesky_low_precision(dtype: torch.dtype) -> None:
    M = spd(5, 10.0, gen(2), torch.float64)
    L = cholesky_factor(M.to(dtype))
    assert L.dtype == dtype
    X = cholesky_solve(L, torch.ones(5, 2, dtype=dtype))
    assert X.dtype == dtype
    assert_rel(X.double(), np.linalg.solve(f64(M), np.ones((5, 2))), 0.1, "low precision")
