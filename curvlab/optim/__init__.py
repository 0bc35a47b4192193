"""Optimisers over any :class:`~curvlab.Curvature`.

* :class:`NaturalGradient` — a preconditioner for any ``torch.optim`` optimizer
  (moving averages, inversion schedule, damping, KL clipping, distribution);
* :class:`KFACOptimizer` — Martens & Grosse's full recipe (quadratic model, adaptive
  damping);
* :class:`ACKTR` — K-FAC natural policy gradient with a KL trust region
  (concepts/policy_gradients.md);
* :class:`EigenbasisAdam` — AdamW in the eigenbasis of the K-FAC factors (EKFAC/SOAP-style;
  concepts/natural_gradient.md#adam-in-the-k-fac-eigenbasis);
* :class:`LevenbergMarquardt` — the damping rule both use;
* :class:`NoisyKFAC` — noisy natural gradient: variational inference with a
  Kronecker-factored Gaussian posterior (concepts/noisy_natural_gradient.md);
* :class:`Distribution` — how a :class:`NaturalGradient` shares its work over processes:
  :class:`Local`, :class:`CommOpt`, :class:`MemOpt` (:mod:`curvlab.optim.strategies`; their
  collectives: :mod:`curvlab.optim.distributed`);
* :func:`save_checkpoint` / :func:`load_checkpoint` — atomic checkpoint files, clear errors.

The math of each piece is on the docs page ``concepts/natural_gradient.md``.
"""

from curvlab.optim import distributed
from curvlab.optim.acktr import ACKTR
from curvlab.optim.checkpoint import load_checkpoint, save_checkpoint
from curvlab.optim.damping import LevenbergMarquardt
from curvlab.optim.eigenbasis_adam import EigenbasisAdam
from curvlab.optim.kfac_optimizer import KFACOptimizer
from curvlab.optim.natural_gradient import NaturalGradient
from curvlab.optim.noisy import NoisyKFAC
from curvlab.optim.strategies import CommOpt, Distribution, Local, MemOpt

__all__ = [
    "ACKTR",
    "CommOpt",
    "Distribution",
    "EigenbasisAdam",
    "KFACOptimizer",
    "LevenbergMarquardt",
    "Local",
    "MemOpt",
    "NaturalGradient",
    "NoisyKFAC",
    "distributed",
    "load_checkpoint",
    "save_checkpoint",
]
