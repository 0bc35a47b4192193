"""
The spectrum of the Fisher against K-FAC and EKFAC
==================================================

Every curvature is a linear operator with ``trace()``, ``logdet()`` and
``eigenvalues()`` (closed forms for the Kronecker structures: the products of the
factors' eigenvalues for K-FAC, the refitted diagonal for EKFAC). Here the top of the
spectrum of the exact Fisher of a small ConvNet, its K-FAC (KFC) and its EKFAC.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X[:256] / 16.0, dtype=torch.float64).reshape(-1, 1, 8, 8)
y = torch.tensor(y[:256])
model = nn.Sequential(
    nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(64, 10),
).double()  # fmt: skip
loss_fn = nn.CrossEntropyLoss()
exact = curvlab.ExactFisher(model, loss_fn)
kfc = curvlab.KFC(model, loss_fn, fisher_type="exact")
ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
curvlab.extract(model, loss_fn, X, y, [exact, kfc, ekfac])

# %%
# Traces agree where they should: K-FAC keeps each layer's trace only up to its
# Kronecker error, EKFAC's diagonal in K-FAC's eigenbasis is the Fisher's (so its trace
# is the layer blocks' trace, the same as the exact Fisher's).
for name, c in (("exact Fisher", exact), ("KFC", kfc), ("EKFAC", ekfac)):
    print(
        f"{name:12s}: trace {float(c.trace()):.4f}, ‖·‖_F {float(c.frobenius_norm()):.4f}, "
        f"logdet(C + 1e-3 I) {float(c.logdet(1e-3)):.1f}"
    )

# %%
k = 60
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, c in (("exact Fisher", exact), ("KFC", kfc), ("EKFAC", ekfac)):
    ax.semilogy(range(1, k + 1), c.eigenvalues(k), label=name)
ax.set(
    xlabel="index",
    ylabel="eigenvalue",
    title=f"top {k} eigenvalues ({exact.num_params} parameters)",
)
ax.legend()
fig.tight_layout()
