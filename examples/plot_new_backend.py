"""
Writing a new backend: one module and a registry line
======================================================

A backend is a subclass of :class:`curvlab.Curvature` that implements a few private
hooks; the public methods (validation, accumulation bookkeeping, ``extract``, the
recording of forward passes) come from the base class. It states what it needs from a
batch as *requests* (:mod:`curvlab.extraction`) and never names an engine. Here: a
**layer-wise scaled identity** — each layer's Fisher block replaced by ``(tr F_l / n_l) I``
— in six methods, and it works with :class:`curvlab.NaturalGradient` at once.

A :class:`~curvlab.extraction.FactorRows` request delivers every Fisher type as *factor
rows* ``V_p`` per parameter, with ``V_pᵀ V_q`` the batch's curvature block — so a layer's
trace is the sum of squares of its rows.

The backend **declares what it accumulates once**, in ``running_state``: here one
:class:`~curvlab.curvature.RunningSum`, the weighted sum of the layers' traces, divided by
the batches' weight sum to give the curvature of their union. ``reset``, ``statistics`` /
``load_statistics`` (what a moving average mixes), ``state_dict`` / ``load_state_dict``
and the sums a distributed preconditioner adds over processes all come from that
declaration; a backend writes none of them. (Sums normalised by their own counters
declare a :class:`~curvlab.curvature.RunningCount` and name it in ``per``; what a backend
fixes while accumulating without adding it up, e.g. an eigenbasis, is a
:class:`~curvlab.curvature.StateTag`.)

Construction: ``super().__init__`` validates the model and loss and runs no hook of the
backend, so the backend sets its attributes afterwards and ends with ``_cover``: the
layers it covers and the requests it takes from every batch.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab
from curvlab.curvature import RunningSum, find_layers
from curvlab.extraction import FactorRows


@curvlab.register("scaled_identity_example")
class LayerwiseScaledIdentity(curvlab.Curvature):
    """Each layer's Fisher block approximated by its mean eigenvalue times the identity."""

    running_state = (RunningSum("traces", "_traces"),)  # Σ_b w_b tr(F_b) per layer

    def __init__(self, model: nn.Module, loss_fn: nn.Module, fisher_type: str = "exact"):
        super().__init__(model, loss_fn)
        self._traces: torch.Tensor | None = None
        layers = find_layers(self.model)  # every module with trainable parameters
        params = tuple(p for layer in layers for p in layer.params)
        self._cover(layers, [FactorRows(fisher_type, params)])

    def _accumulate(self, result, weight):
        request = self.requests()[0]
        batch = (
            torch.stack(
                [
                    sum(
                        result.factor_rows(request, p, n).square().sum()
                        for p, n in zip(layer.params, layer.param_names)
                    )
                    for layer in self.layers
                ]
            )
            * weight
        )
        self._traces = batch if self._traces is None else self._traces + batch

    def _scales(self) -> list[torch.Tensor]:
        means = (
            self._traces / self._normalizer / torch.tensor([layer.numel for layer in self.layers])
        )
        return [means[k] for k, layer in enumerate(self.layers) for _ in layer.params]

    def _matvec(self, v):
        return [s * t for s, t in zip(self._scales(), v)]

    def _solve(self, v, damping):
        return [t / (s + damping) for s, t in zip(self._scales(), v)]

    def _to_dense(self):
        return torch.diag(
            torch.cat([s.expand(p.numel()) for s, p in zip(self._scales(), self.params)])
        )


# %%
# The registry line above makes it available by name, next to the built-in backends.
print(curvlab.available())

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X[:200] / 16.0, dtype=torch.float32), torch.tensor(y[:200])
model = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
loss_fn = nn.CrossEntropyLoss()

scaled = curvlab.make("scaled_identity_example", model, loss_fn)
exact = curvlab.BlockDiagonal(model, loss_fn)
curvlab.extract(model, loss_fn, X, y, [scaled, exact])

# %%
# Each layer's scale is its exact Fisher block's mean eigenvalue; the backend inherits
# accumulation over batches, ``solve``'s validation and, from its declaration, ``reset``,
# ``statistics`` and ``state_dict``.
for k, block in enumerate(exact.blocks()):
    mean = float(torch.trace(block)) / block.shape[0]
    start = sum(layer.numel for layer in exact.layers[:k])
    print(
        f"layer {k}: mean eigenvalue {mean:.4f}, scale {float(scaled.to_dense()[start, start]):.4f}"
    )
    assert abs(mean - float(scaled.to_dense()[start, start])) < 1e-5 * max(mean, 1.0)

print("statistics:", {k: v.tolist() for k, v in scaled.statistics().items()})
restored = curvlab.make("scaled_identity_example", model, loss_fn)
restored.load_state_dict(scaled.state_dict())  # a checkpoint round trip
assert torch.equal(restored.to_dense(), scaled.to_dense())

# %%
# The preconditioner needs nothing else: it averages ``statistics()`` over steps and
# calls ``solve``.
opt = torch.optim.SGD(model.parameters(), lr=0.5)
precond = curvlab.NaturalGradient(
    curvlab.make("scaled_identity_example", model, loss_fn), damping=1.0, optimizer=opt
)
with torch.no_grad():
    start = float(loss_fn(model(X), y))
for _ in range(20):
    opt.zero_grad()
    precond.backward(loss_fn(model(X), y))
    precond.step()
    opt.step()
with torch.no_grad():
    end = float(loss_fn(model(X), y))
print(f"loss {start:.3f} -> {end:.3f} after 20 preconditioned steps")

# %%
# Distributed training needs nothing else either. A distributed preconditioner reaches a
# backend through :class:`~curvlab.curvature.distribution.DistributionInterface`, an
# extension interface that is not on the backend's public face: statistic *sums* that
# add over processes (the declared running sums and counters, as they are) and
# *decomposition blocks* (default: one block, decomposed by ``solve`` itself). A backend
# with per-layer factorisations overrides the hooks ``_decomposition_blocks``,
# ``_decompose``, ``_export_decomposition``/``_import_decomposition`` and ``_solve_block``
# (the docs page "Distributed K-FAC" lists them with their defaults). Here, the sums of
# two half batches, added as an all-reduce would, give the curvature of the whole batch:
from curvlab.curvature.distribution import DistributionInterface  # noqa: E402

halves = []
for part in (slice(0, 100), slice(100, 200)):
    half = curvlab.make("scaled_identity_example", model, loss_fn)
    half.update(X[part], y[part])
    halves.append(DistributionInterface(half).statistic_sums())
union = curvlab.make("scaled_identity_example", model, loss_fn)
union.update(X[:100], y[:100])  # some state, replaced by the summed sums below
DistributionInterface(union).load_statistic_sums([a.tensor + b.tensor for a, b in zip(*halves)])
whole = curvlab.make("scaled_identity_example", model, loss_fn)
whole.update(X, y)
print("sums of the halves == whole batch:", torch.allclose(union.to_dense(), whole.to_dense()))
assert torch.allclose(union.to_dense(), whole.to_dense(), rtol=1e-5, atol=1e-7)
