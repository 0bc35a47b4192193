"""
KFC on a ConvNet: expand versus reduce
======================================

:class:`curvlab.KFC` approximates convolution layers by Kronecker factors computed
from the unfolded input patches and the per-location output gradients (Grosse &
Martens 2016). Two settings (Eschenhagen et al. 2023) treat the locations that share
a weight differently:

* ``expand``: locations act like extra samples — this is KFC;
* ``reduce``: inputs are averaged and output gradients summed over locations first.

We compare both with the exact Fisher's layer blocks on digits.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

import curvlab

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X = torch.tensor(X[:128] / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
y = torch.tensor(y[:128])

model = nn.Sequential(
    nn.Conv2d(1, 8, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, stride=2, padding=1),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(32, 10),
)
loss_fn = nn.CrossEntropyLoss()

blocks = curvlab.BlockDiagonal(model, loss_fn)
expand = curvlab.KFC(model, loss_fn, fisher_type="exact", kfac_approx="expand")
reduce = curvlab.KFC(model, loss_fn, fisher_type="exact", kfac_approx="reduce")
curvlab.extract(model, loss_fn, X, y, [blocks, expand, reduce])

# %%
# Relative Frobenius error per layer block. This network classifies whole images, so
# the weight-sharing axis is pooled away before the loss — Eschenhagen et al.'s *reduce*
# setting; compare the two columns on the convolution layers. (The last Linear layer sees
# one position per sample, where both settings coincide.)
exact_dense, dense = blocks.to_dense(), {"expand": expand.to_dense(), "reduce": reduce.to_dense()}
start = 0
print(f"{'layer':>6} {'type':>7} {'expand':>8} {'reduce':>8}")
for layer in blocks.layers:
    stop = start + layer.numel
    ref = exact_dense[start:stop, start:stop]
    errs = [float((d[start:stop, start:stop] - ref).norm() / ref.norm()) for d in dense.values()]
    print(f"{layer.name:>6} {type(layer.module).__name__:>7} {errs[0]:8.3f} {errs[1]:8.3f}")
    start = stop

# %%
# Factor shapes: ``A`` is ``[C_in·k_h·k_w + 1]²`` (the homogeneous bias coordinate),
# ``G`` is ``[C_out]²``. ``reduce`` is cheaper: its statistics cost O(N D²) instead of
# O(N T D²) for ``T`` output locations.
for layer, f in zip(expand.layers, expand.factors()):
    print(layer.name, "A", tuple(f.A.shape), "G", tuple(f.G.shape))
