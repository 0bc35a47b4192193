"""
Natural gradient in an ordinary training loop
=============================================

:class:`curvlab.NaturalGradient` turns any curvature backend into a preconditioner
that composes with any ``torch.optim`` optimizer: ``precond.backward(loss)`` runs the
backward pass (plus the curvature's own passes when statistics are due) and
``precond.step()`` replaces every covered ``p.grad`` by ``(C + λI)⁻¹ p.grad`` in place,
before the optimizer's own step. Statistics are averaged over steps (EMA) and the
inverses refreshed every ``invert_every`` steps.

We train the same MLP on digits with SGD+momentum, Adam, SGD+momentum preconditioned
by K-FAC, and :class:`curvlab.KFACOptimizer` — Martens & Grosse's full recipe, which
picks the step size and momentum from the exact-Fisher quadratic model and adapts the
damping (Levenberg–Marquardt) — with identical initialisation and batches.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab

X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
loss_fn = nn.CrossEntropyLoss()


def train(kind: str, lr: float, steps: int = 120) -> list[float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    if kind == "Adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    precond = None
    kfac_optimizer = None
    if kind == "KFACOptimizer":  # lr is the initial damping here: α and μ are computed
        kfac_optimizer = curvlab.KFACOptimizer(model, loss_fn, damping=lr)
    if kind == "K-FAC + SGD":
        curvature = curvlab.KFAC(model, loss_fn, fisher_type="mc")
        precond = curvlab.NaturalGradient(curvature, optimizer=opt, damping=1e-2, invert_every=5)
    order = torch.Generator().manual_seed(1)
    history = []
    while len(history) < steps:
        perm = torch.randperm(len(X), generator=order)
        for start in range(0, len(X) - 127, 128):
            idx = perm[start : start + 128]
            if kfac_optimizer is not None:  # the closure evaluates the batch's loss
                kfac_optimizer.step(lambda idx=idx: loss_fn(model(X[idx]), y[idx]))
            else:
                opt.zero_grad()
                loss = loss_fn(model(X[idx]), y[idx])
                if precond is None:
                    loss.backward()
                else:
                    precond.backward(loss)  # plain backward (+ curvature when due)
                    precond.step()  # p.grad <- (F̃ + λI)⁻¹ p.grad
                opt.step()
            with torch.no_grad():
                history.append(float(loss_fn(model(X), y)))
    return history[:steps]


# %%
# Learning rates (initial damping for the KFACOptimizer): the best of a small grid for
# each (see ``tests/optim/test_natural_gradient.py``).
runs = {
    "SGD": train("SGD", 1.0),
    "Adam": train("Adam", 0.1),
    "K-FAC + SGD": train("K-FAC + SGD", 0.01),
    "KFACOptimizer": train("KFACOptimizer", 0.1),
}
for name, history in runs.items():
    hit = next((i + 1 for i, v in enumerate(history) if v < 0.1), None)
    print(f"{name:13s} final training loss {history[-1]:.4f}; below 0.1 after {hit} steps")

fig, ax = plt.subplots(figsize=(6, 4))
for name, history in runs.items():
    ax.semilogy(history, label=name)
ax.set_xlabel("iteration")
ax.set_ylabel("training loss (all 1797 digits)")
ax.legend()
fig.tight_layout()

# %%
# The preconditioner is checkpointable: ``precond.state_dict()`` with the model's and
# optimizer's state (and the RNG state, for Monte-Carlo labels) resumes bit-identically.
