"""K-FAC for recurrent layers (concepts/recurrent.md): ``KFAC(recurrent=...)``.

References, in float64: the per-time-step Jacobians of the model output with respect to a
perturbation of each map's bias at each step, through PyTorch's own ``nn.RNNCell``/
``nn.LSTMCell``/``nn.GRUCell`` stepped by hand (``torch.func.jacrev``), so neither the
unrolled replay of :mod:`curvlab.extraction.recurrent` nor its gate equations are used.
The series block is checked against the paper's sum ``Σ_d (T-|d|) Ψ^{|d|} V_0`` formed densely.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import curvlab
from curvlab.extraction import layers as layer_rules
from tests.reference import output_gradients, output_hessians, reduction_factor

DTYPE = torch.float64
N, T, D, H, C = 5, 4, 3, 3, 2
CELLS = {nn.RNN: nn.RNNCell, nn.LSTM: nn.LSTMCell, nn.GRU: nn.GRUCell}


class Net(nn.Module):
    """A recurrent module whose output sequence and last hidden state both reach the loss."""

    def __init__(self, cls: type[nn.RNNBase], batch_first: bool, **kw) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(D, H, batch_first=batch_first, **kw)
        dirs = 2 if self.rnn.bidirectional else 1
        self.head = nn.Linear(dirs * H, C)
        self.head2 = nn.Linear(H, C, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out, state = self.rnn(x)
        h_n = state[0] if isinstance(state, tuple) else state
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.sum(1)) + self.head2(h_n[-1])


def _net(cls, batch_first=True, seed=0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(cls, batch_first, **kw).to(DTYPE)


def _data(batch_first=True, seed=1) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, T, D, generator=gen, dtype=DTYPE)
    y = torch.randn(N, C, generator=gen, dtype=DTYPE)
    return (x if batch_first else x.transpose(0, 1).contiguous()), y


def _reference(net: Net, x_bf: Tensor):
    """Per map ``block``: inputs ``[N, T, D(+1)]`` and ``J`` ``[N, C, T, gH]`` (∂f_n / ∂ map
    output at each step), from bias perturbations through PyTorch's cells."""
    rnn = net.rnn
    dirs = 2 if rnn.bidirectional else 1
    cell = CELLS[type(rnn)](1, 1, nonlinearity=rnn.nonlinearity) if type(rnn) is nn.RNN else None
    cell = cell or CELLS[type(rnn)](1, 1)
    gates = rnn.weight_ih_l0.shape[0]

    def bias(name: str) -> Tensor:  # a module without biases: zero biases, perturbed
        return getattr(rnn, name).detach() if rnn.bias else torch.zeros(gates, dtype=DTYPE)

    blocks = [
        f"{kind}_l{layer}" + ("_reverse" if d else "")
        for layer in range(rnn.num_layers)
        for d in range(dirs)
        for kind in ("ih", "hh")
    ]

    def run(eps: dict[str, Tensor], x: Tensor, record: dict | None = None) -> Tensor:
        seq = x  # [T, D]
        last_h = []
        for layer in range(rnn.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                params = {
                    "weight_ih": getattr(rnn, f"weight_ih{sfx}").detach(),
                    "weight_hh": getattr(rnn, f"weight_hh{sfx}").detach(),
                }
                h = torch.zeros(1, H, dtype=DTYPE)
                c = torch.zeros(1, H, dtype=DTYPE)
                hs: list[Tensor] = [h] * T
                for t in range(T - 1, -1, -1) if d else range(T):
                    params["bias_ih"] = bias(f"bias_ih{sfx}") + eps[f"ih{sfx}"][t]
                    params["bias_hh"] = bias(f"bias_hh{sfx}") + eps[f"hh{sfx}"][t]
                    if record is not None:
                        record.setdefault(f"ih{sfx}", {})[t] = seq[t].detach()
                        record.setdefault(f"hh{sfx}", {})[t] = h[0].detach()
                    state = (h, c) if type(rnn) is nn.LSTM else h
                    new = functional_call(cell, params, (seq[t : t + 1], state))
                    h, c = new if type(rnn) is nn.LSTM else (new, c)
                    hs[t] = h[0]
                outs.append(torch.stack(hs))
                last_h.append(h[0])
            seq = torch.cat(outs, dim=-1)
        head = net.head(seq.sum(0))
        return head + net.head2(last_h[-1])

    zeros = {b: torch.zeros(T, gates, dtype=DTYPE) for b in blocks}
    inputs: dict[str, list[Tensor]] = {b: [] for b in blocks}
    jac: dict[str, list[Tensor]] = {b: [] for b in blocks}
    outputs = []
    for n in range(x_bf.shape[0]):
        record: dict = {}
        outputs.append(run(zeros, x_bf[n], record))
        for b, j in jacrev(run)(zeros, x_bf[n]).items():
            jac[b].append(j)  # [C, T, gH]
            inputs[b].append(torch.stack([record[b][t] for t in range(T)]))
    ones = torch.ones(x_bf.shape[0], T, int(rnn.bias), dtype=DTYPE)
    return (
        {b: torch.cat([torch.stack(v), ones], dim=-1) for b, v in inputs.items()},
        {b: torch.stack(v) for b, v in jac.items()},
        torch.stack(outputs),
    )


def _g(jac: Tensor, weights: Tensor, lag: int = 0) -> Tensor:
    """``Σ_{n,t} J_{n,t}ᵀ W_n J_{n,t+lag}``.

    ``jac`` ``[N, C, T, gH]``, ``weights`` ``[N, C, C]``.
    """
    left, right = jac[:, :, : T - lag], jac[:, :, lag:]
    return torch.einsum("nctg,ncd,ndth->gh", left, weights, right)


def _weights(net: Net, loss_fn: nn.Module, fisher_type: str, x_bf, y, outputs) -> Tensor:
    if fisher_type == "exact":
        return output_hessians(loss_fn, outputs, y)
    grads = output_gradients(loss_fn, outputs, y)
    return torch.einsum("nc,nd->ncd", grads, grads) / reduction_factor(loss_fn, outputs)


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("fisher_type", ["exact", "empirical"])
def test_independent_factors_match_their_definition(cls, batch_first, fisher_type) -> None:
    bidirectional = cls is nn.LSTM  # one bidirectional, two-layer case, the others plain
    net = _net(cls, batch_first, num_layers=2 if cls is nn.LSTM else 1, bidirectional=bidirectional)
    x, y = _data(batch_first)
    loss_fn = nn.MSELoss()
    kfac = curvlab.KFAC(net, loss_fn, fisher_type=fisher_type, recurrent="independent")
    kfac.update(x, y)
    x_bf = x if batch_first else x.transpose(0, 1)
    inputs, jac, outputs = _reference(net, x_bf)
    weights = _weights(net, loss_fn, fisher_type, x_bf, y, outputs)
    found = {layer.name: f for layer, f in zip(kfac.layers, kfac.factors())}
    assert {f"rnn.{b}" for b in inputs} <= set(found)
    for block, a in inputs.items():
        flat = a.reshape(-1, a.shape[-1])
        torch.testing.assert_close(found[f"rnn.{block}"].A, flat.T @ flat / flat.shape[0])
        torch.testing.assert_close(found[f"rnn.{block}"].G, _g(jac[block], weights))
    assert kfac.coverage()["rnn.weight_hh_l0"] == "kronecker"


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_mc_factors_estimate_the_exact_ones(cls) -> None:
    net = _net(cls)
    x, y = _data()
    exact = curvlab.KFAC(net, nn.MSELoss(), fisher_type="exact", recurrent="independent")
    mc = curvlab.KFAC(net, nn.MSELoss(), fisher_type="mc", mc_samples=400, recurrent="independent")
    exact.update(x, y)
    torch.manual_seed(0)
    mc.update(x, y)
    for e, m in zip(exact.factors(), mc.factors()):
        torch.testing.assert_close(m.A, e.A)
        err = torch.linalg.matrix_norm(m.G - e.G) / torch.linalg.matrix_norm(e.G)
        assert float(err) < 0.25


def _paper_series(g0, g1, a0, a1, steps: int) -> Tensor:
    """``Σ_{d=-(T-1)}^{T-1} (T-|d|) V_{|d|}`` with per-step ``V_0 = G_0 ⊗ A_0``,
    ``V_1 = G_1 ⊗ A_1`` and ``V_d = (V_1 V_0⁻¹)^d V_0`` (the linear-Gaussian model)."""
    g0, g1, a0, a1 = (m.detach().contiguous() for m in (g0, g1, a0, a1))
    v0 = torch.kron(g0, a0)
    psi = torch.kron(g1, a1) @ torch.linalg.inv(v0)
    total = steps * v0
    power = v0
    for d in range(1, steps):
        power = psi @ power
        total = total + 2 * (steps - d) * power
    return total


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_series_block_is_the_papers_sum(cls) -> None:
    global N
    n_saved, N = N, 40  # full-rank zero-lag factors
    try:
        # without biases: the homogeneous 1 is perfectly correlated over time (ψ = 1), which
        # the series model clips (tested in tests/linalg/test_kron_series.py)
        net = _net(cls, bias=False)
        x, y = _data()
        kfac = curvlab.KFAC(net, nn.MSELoss(), fisher_type="exact", recurrent="series")
        kfac.update(x, y)
        inputs, jac, outputs = _reference(net, x)
        weights = output_hessians(nn.MSELoss(), outputs, y)
        dense = kfac.to_dense()
        start = 0
        for layer in kfac.layers:
            size = layer.numel
            if layer.name.startswith("rnn."):
                block = layer.name[4:]
                a = inputs[block]
                a0 = a.reshape(-1, a.shape[-1]).T @ a.reshape(-1, a.shape[-1]) / (N * T)
                lag = torch.einsum("nti,ntj->ij", a[:, :-1], a[:, 1:]) / (N * (T - 1))
                g0 = _g(jac[block], weights) / T
                g1 = _g(jac[block], weights, lag=1) / (T - 1)
                sym = lambda m: (m + m.T) / 2  # noqa: E731
                paper = _paper_series(g0, sym(g1), a0, sym(lag), T)
                perm = layer_rules.parameter_order(layer.module)
                expected = paper[perm][:, perm]
                torch.testing.assert_close(
                    dense[start : start + size, start : start + size], expected
                )
            start += size
    finally:
        N = n_saved


@pytest.mark.parametrize("recurrent", ["independent", "series"])
def test_solve_inverts_matvec_and_checkpoint_round_trip(recurrent) -> None:
    net = _net(nn.LSTM, bias=False)
    x, y = _data()
    x = torch.cat([x] * 8)
    y = torch.cat([y] * 8)
    kfac = curvlab.KFAC(net, nn.MSELoss(), fisher_type="exact", recurrent=recurrent)
    kfac.update(x, y)
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in kfac.params]
    dense = kfac.to_dense()
    flat = torch.cat([t.reshape(-1) for t in kfac.matvec(v)])
    torch.testing.assert_close(flat, dense @ torch.cat([t.reshape(-1) for t in v]))
    torch.testing.assert_close(kfac.trace(), torch.trace(dense))
    torch.testing.assert_close(kfac.diagonal(), torch.diagonal(dense))
    torch.testing.assert_close(kfac.frobenius_norm(), torch.linalg.matrix_norm(dense))
    back = kfac.solve(kfac.matvec(v), 0.0)
    for a, b in zip(back, v):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    solved = kfac.solve(v, 0.1)
    copy = curvlab.KFAC(_net(nn.LSTM, bias=False, seed=5), nn.MSELoss(), recurrent=recurrent)
    copy.load_state_dict(kfac.state_dict())
    for a, b in zip(copy.solve(v, 0.1), solved):
        torch.testing.assert_close(a, b)


def test_series_damps_the_zero_lag_factors() -> None:
    """With damping, a series block's solve is the model of the factored-damped factors."""
    net = _net(nn.RNN, bias=False)
    x, y = _data()
    kfac = curvlab.KFAC(net, nn.MSELoss(), fisher_type="exact", recurrent="series")
    kfac.update(torch.cat([x] * 8), torch.cat([y] * 8))
    k = next(i for i, layer in enumerate(kfac.layers) if layer.name == "rnn.hh_l0")
    g0, g1, a0, a1, steps = kfac._series_factors(k)
    g0d, a0d = curvlab.linalg.factored_damping(g0, a0, 0.3)
    basis = curvlab.linalg.series_basis(g0d, g1, a0d, a1, steps)
    v = torch.randn(g0.shape[0], a0.shape[0], dtype=DTYPE)
    expected = torch.linalg.solve(curvlab.linalg.series_dense(basis), v.reshape(-1))
    parts = layer_rules.from_matrix(kfac.layers[k].module, v)
    vec = [torch.zeros_like(p) for p in kfac.params]
    offset = sum(len(layer.params) for layer in kfac.layers[:k])
    vec[offset] = parts[0]
    got = kfac.solve(vec, 0.3)[offset]
    torch.testing.assert_close(got.reshape(-1), expected)


def test_diagonal_is_the_default_and_unchanged() -> None:
    net = _net(nn.GRU)
    kfac = curvlab.KFAC(net, nn.MSELoss())
    assert kfac.recurrent == "diagonal"
    assert kfac.coverage()["rnn.weight_ih_l0"] == "diagonal"


class _Projected(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(D, H, proj_size=2, batch_first=True)
        self.head = nn.Linear(2, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def test_unsupported_configurations_raise_naming_the_module() -> None:
    with pytest.raises(ValueError, match="unknown recurrent"):
        curvlab.KFAC(_net(nn.RNN), nn.MSELoss(), recurrent="both")
    with pytest.raises(ValueError, match=r"'lstm'.*proj_size"):
        curvlab.KFAC(_Projected().to(DTYPE), nn.MSELoss(), recurrent="independent")
    net = _net(nn.GRU)
    net.rnn.weight_hh_l0.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'rnn'.*frozen"):
        curvlab.KFAC(net, nn.MSELoss(), recurrent="independent")
    dropped = _net(nn.LSTM, num_layers=2, dropout=0.5)
    kfac = curvlab.KFAC(dropped, nn.MSELoss(), recurrent="independent")
    x, y = _data()
    with pytest.raises(ValueError, match=r"'rnn' \(LSTM\).*does not reproduce"):
        kfac.update(x, y)


def _flat_list(v: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in v])


@pytest.mark.parametrize("recurrent", ["independent", "series"])
def test_statistic_sums_add_up_and_decompositions_travel(recurrent) -> None:
    """What distribution relies on: sums of two batches give the union's curvature, and a
    decomposition exported by one backend solves the same on another."""
    from curvlab.curvature.distribution import DistributionInterface as ops

    def build() -> curvlab.KFAC:
        return curvlab.KFAC(_net(nn.GRU), nn.MSELoss(), fisher_type="exact", recurrent=recurrent)

    (x1, y1), (x2, y2) = _data(seed=1), _data(seed=2)
    first, second, union, target = build(), build(), build(), build()
    first.update(x1, y1)
    second.update(x2, y2)
    union.update(x1, y1)
    union.update(x2, y2)
    target.update(x2, y2)
    a, b = ops(first).statistic_sums(), ops(second).statistic_sums()
    assert [e.name for e in a] == [e.name for e in b]
    ops(target).load_statistic_sums([ea.tensor + eb.tensor for ea, eb in zip(a, b)])
    gen = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in union.params]
    torch.testing.assert_close(_flat_list(target.solve(v, 0.1)), _flat_list(union.solve(v, 0.1)))
    importer = build()
    importer.update(x1, y1)
    importer.update(x2, y2)
    for block in ops(union).decomposition_blocks():
        ops(union).decompose(block, 0.1)
        exported = ops(union).export_decomposition(block, 0.1)
        ops(importer).import_decomposition(block, 0.1, [e.tensor.clone() for e in exported])
    assert torch.equal(_flat_list(importer.solve(v, 0.1)), _flat_list(union.solve(v, 0.1)))
    assert importer.num_decompositions == 0


def test_series_statistics_round_trip_as_a_moving_average_uses_them() -> None:
    """``load_statistics(statistics())`` (NaturalGradient's moving average) keeps the block."""
    net = _net(nn.LSTM, bias=False)
    x, y = _data()
    kfac = curvlab.KFAC(net, nn.MSELoss(), fisher_type="exact", recurrent="series")
    kfac.update(torch.cat([x] * 8), torch.cat([y] * 8))
    before = kfac.to_dense()
    stats = kfac.statistics()
    # the lag sums per layer (None but for the two series maps), per sequence: the step
    # pairs per sequence are T - 1
    series = [k for k, s in enumerate(stats["lag_steps"]) if s is not None]
    assert len(series) == 2 and all(stats["lag_A"][k] is not None for k in series)
    assert 1.0 + float(stats["lag_steps"][series[0]]) == T
    kfac.load_statistics(stats)
    torch.testing.assert_close(kfac.to_dense(), before)


class _Seeded(nn.Module):
    """A recurrent module started from a given state, reading ``[T, N, D]`` (batch second)."""

    def __init__(self, cls: type[nn.RNNBase], **kw) -> None:
        super().__init__()
        self.rnn = cls(D, H, **kw)
        self.h0 = nn.Parameter(torch.randn(1, 1, H))
        self.head = nn.Linear(H, C)

    def forward(self, x: Tensor) -> Tensor:
        h0 = self.h0.expand(1, x.shape[1], H).contiguous()
        hx = (h0, torch.tanh(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        out, _ = self.rnn(x, hx)
        return self.head(out).reshape(-1, C)  # one loss row per sample and step


@pytest.mark.parametrize("cls", [nn.RNN, nn.LSTM, nn.GRU])
def test_initial_state_and_per_step_rows(cls) -> None:
    """An initial state enters the first step's ``h_{t-1}``; with one loss row per step the
    independent factors are those of the sample's columns holding all its rows."""
    torch.manual_seed(0)
    kw = {"nonlinearity": "relu"} if cls is nn.RNN else {}
    model = _Seeded(cls, **kw).to(DTYPE)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(T, N, D, generator=gen, dtype=DTYPE)
    y = torch.randn(T * N, C, generator=gen, dtype=DTYPE)
    loss_fn = nn.MSELoss(reduction="sum")
    kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact", recurrent="independent")
    kfac.update(x, y)
    found = {layer.name: f for layer, f in zip(kfac.layers, kfac.factors())}
    with torch.no_grad():
        hx = model.h0.expand(1, N, H).contiguous()
        state = (hx, torch.tanh(hx)) if cls is nn.LSTM else hx
        out, _ = model.rnn(x, state)  # [T, N, H]
    h_prev = torch.cat([hx, out[:-1]]).transpose(0, 1)  # [N, T, H]
    a = torch.cat([h_prev, torch.ones(N, T, 1, dtype=DTYPE)], -1).reshape(-1, H + 1)
    torch.testing.assert_close(found["rnn.hh_l0"].A, a.T @ a / (N * T))
    # G: column c of the sum loss's Hessian square root (√2 e_c on every row) pulled back
    # through the whole sequence of each sample, per step, by the per-step bias trick
    gates = model.rnn.weight_ih_l0.shape[0]
    cell = CELLS[cls](D, H, **kw).to(DTYPE)

    def outputs(eps: Tensor, n: int) -> Tensor:
        rnn = model.rnn
        params = {k: getattr(rnn, f"{k}_l0").detach() for k in ("weight_ih", "weight_hh")}
        h = state[0][0, n : n + 1] if cls is nn.LSTM else state[0, n : n + 1]
        c = state[1][0, n : n + 1] if cls is nn.LSTM else None
        rows = []
        for t in range(T):
            params["bias_ih"] = rnn.bias_ih_l0.detach() + eps[t]
            params["bias_hh"] = rnn.bias_hh_l0.detach()
            new = functional_call(cell, params, (x[t, n : n + 1], (h, c) if c is not None else h))
            h, c = new if cls is nn.LSTM else (new, None)
            rows.append(model.head(h[0]))
        return torch.stack(rows)  # [T, C]

    g = torch.zeros(gates, gates, dtype=DTYPE)
    for n in range(N):
        jac = jacrev(outputs)(torch.zeros(T, gates, dtype=DTYPE), n)  # [T(row), C, T, gH]
        per_column = jac.sum(0) * 2**0.5  # the column e_c on every row: [C, T, gH]
        g += torch.einsum("ctg,cth->gh", per_column, per_column)
    torch.testing.assert_close(found["rnn.ih_l0"].G, g)
