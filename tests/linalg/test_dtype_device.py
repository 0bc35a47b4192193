"""Every public curvlab.linalg function keeps the inputs' dtype and device."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import curvlab.linalg as cl

from ._helpers import contraction, gen, spd, sqrtm_spd

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _inputs(dtype: torch.dtype, device: str) -> dict[str, torch.Tensor]:
    g = gen(0)
    G, A = spd(3, 10.0, g), spd(2, 10.0, g)
    SG, SA = sqrtm_spd(G), sqrtm_spd(A)
    C, D = SG @ contraction(3, g, 0.5) @ SG, SA @ contraction(2, g, 0.5) @ SA
    V = torch.randn(3, 2, generator=g, dtype=torch.float64)
    out = {"G": G, "A": A, "C": C, "D": D, "V": V}
    return {k: v.to(dtype=dtype, device=device) for k, v in out.items()}


CASES: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {
    "kron_matvec": lambda t: cl.kron_matvec(t["G"], t["A"], t["V"]),
    "kron_dense": lambda t: cl.kron_dense(t["G"], t["A"]),
    "kron_trace": lambda t: cl.kron_trace(t["G"], t["A"]),
    "kron_frobenius_norm": lambda t: cl.kron_frobenius_norm(t["G"], t["A"]),
    "kron_logdet": lambda t: cl.kron_logdet(t["G"], t["A"]),
    "kron_cholesky_solve": lambda t: cl.kron_cholesky_solve(
        cl.cholesky_factor(t["G"]), cl.cholesky_factor(t["A"]), t["V"]
    ),
    "cholesky_factor": lambda t: cl.cholesky_factor(t["G"]),
    "damped_cholesky": lambda t: cl.damped_cholesky(t["G"], 0.1),
    "cholesky_solve": lambda t: cl.cholesky_solve(cl.cholesky_factor(t["G"]), t["V"]),
    "symeig": lambda t: tuple(cl.symeig(t["G"])),
    "kron_eigen_matvec": lambda t: cl.kron_eigen_matvec(
        cl.symeig(t["G"]), cl.symeig(t["A"]), t["V"], power=-0.5
    ),
    "kron_eigen_damped_solve": lambda t: cl.kron_eigen_damped_solve(
        cl.symeig(t["G"]), cl.symeig(t["A"]), t["V"], 0.01
    ),
    "generalized_symeig": lambda t: tuple(cl.generalized_symeig(t["C"], t["G"])),
    "pi_correction": lambda t: cl.pi_correction(t["G"], t["A"]),
    "factored_damping": lambda t: cl.factored_damping(t["G"], t["A"], 0.01),
    "kron_sum_solve+": lambda t: cl.kron_sum_solve(t["G"], t["A"], t["C"], t["D"], t["V"], 1),
    "kron_sum_solve-": lambda t: cl.kron_sum_solve(t["G"], t["A"], t["C"], t["D"], t["V"], -1),
    "KronSumInverse": lambda t: tuple(
        getattr(cl.KronSumInverse.from_factors(t["G"], t["A"], t["C"], t["D"], -1), f)
        for f in ("U_row", "s_row", "U_col", "s_col", "denominator")
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_dtype_and_device_preserved(case: str, dtype: torch.dtype, device: str) -> None:
    out = CASES[case](_inputs(dtype, device))
    outs = out if isinstance(out, tuple) else (out,)
    for o in outs:
        assert isinstance(o, torch.Tensor)
        assert o.dtype == dtype, (case, o.dtype)
        assert o.device.type == device
        assert torch.isfinite(o.float()).all(), case


def test_all_is_complete() -> None:
    public = {n for n in dir(cl) if not n.startswith("_")} - {
        "cholesky",
        "damping",
        "eigen",
        "estimators",
        "kron",
        "kron_series",
        "kron_sum",
        "polar",
        "low_rank",
        "annotations",
    }
    assert public == set(cl.__all__)
    assert {"LinAlgError"} <= set(cl.__all__)
    assert issubclass(cl.LinAlgError, RuntimeError)
