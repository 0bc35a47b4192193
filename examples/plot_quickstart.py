"""
Quickstart: the exact Fisher and K-FAC on a small MLP
=====================================================

Build two curvature backends on the same network, feed both from **one** backward
pass with :func:`curvlab.extract`, and compare the dense matrices (``to_dense()``).
Data: scikit-learn's handwritten digits (8×8 images, 10 classes), which ship with
the package.
"""

import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X[:256] / 16.0, dtype=torch.float32)
y = torch.tensor(y[:256])

model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))
loss_fn = nn.CrossEntropyLoss()

# %%
# One extraction feeds both backends (the union of their requests).
exact = curvlab.ExactFisher(model, loss_fn)
kfac = curvlab.KFAC(model, loss_fn, fisher_type="exact")
loss = curvlab.extract(model, loss_fn, X, y, [exact, kfac])
F, F_kfac = exact.to_dense(), kfac.to_dense()
print(f"loss {loss:.3f}; {len(exact.params)} parameter tensors, P = {F.shape[0]}")
print("relative Frobenius error of K-FAC:", float((F_kfac - F).norm() / F.norm()))

# %%
# K-FAC is block-diagonal by layer; each block is ``kron(G, A)`` on the ``[W | b]``
# matrix, permuted into the parameter order ``[vec(W), b]``.
fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
scale = float(F.abs().max())
for ax, mat, title in zip(axes, [F, F_kfac], ["exact Fisher", "K-FAC (exact type)"]):
    ax.imshow(mat.abs().clamp(min=1e-6 * scale).log10(), cmap="viridis")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("log10 |F| on 256 digits, MLP 64-16-10")
fig.tight_layout()

# %%
# Natural gradient: ``solve`` applies ``(F + λI)⁻¹`` (K-FAC: exactly in the factors'
# eigenbases). The cosine below measures how well K-FAC's direction matches the exact
# one at this damping (it drops as the damping shrinks and the approximation matters
# more).
grads = list(torch.autograd.grad(loss_fn(model(X), y), exact.params))
damping = 1e-3
nat_exact = torch.cat([t.flatten() for t in exact.solve(grads, damping)])
nat_kfac = torch.cat([t.flatten() for t in kfac.solve(grads, damping)])
cos = torch.nn.functional.cosine_similarity(nat_exact, nat_kfac, dim=0)
print(f"cosine(natural gradient: exact, K-FAC) = {float(cos):.3f}")
