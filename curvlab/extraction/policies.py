"""Policy losses: the Fisher of a policy distribution for every curvature backend.

A policy-gradient loss weights the log-likelihood of the actions a rollout took by their
advantages,

    ``L = −R · Σ_n A_n log π(a_n | f_n)``,   ``R = 1/N`` (``"mean"``) or ``1`` (``"sum"``),

with ``f_n`` the network's output row for state ``s_n``. Its gradient is the (negative)
policy gradient; its curvature in every backend is the **Fisher of the policy**,
``F = R · Σ_n E_{a∼π(·|f_n)}[∇log π(a|f_n) ∇log π(a|f_n)ᵀ]``, the Hessian at ``Δθ = 0``
of the state-averaged ``KL(π_θ ‖ π_{θ+Δθ})``
(concepts/policy_gradients.md#the-fisher-of-a-policy). The advantages enter no Fisher
type:

* ``"exact"``: the closed-form output matrix ``M_n = E_a[∇_f log π ∇_f log πᵀ]``
  (categorical ``diag(p) − ppᵀ``; diagonal Gaussian ``diag(1/σ², 2)`` on ``(μ, log σ)``);
* ``"mc"``: ``M_n`` estimated from ``mc_samples`` actions drawn from ``π(·|f_n)``;
* ``"empirical"``: the scores ``∇_f log π(a_n|f_n)`` of the rollout's own actions — an
  unbiased one-sample estimate of ``M_n`` when the actions were drawn from the current
  policy (the sampled Fisher of ACKTR).

Targets pack actions and advantages into one ``[N, W + 1]`` tensor (``W`` action
columns, then the advantage), so that the loss keeps torch's ``loss_fn(outputs,
targets)`` shape and batches travel through loaders and every backend unchanged:
``targets = policy.pack(actions, advantages)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from curvlab.extraction.losses import BatchScale, LikelihoodLoss

__all__ = ["CategoricalPolicy", "GaussianPolicy", "PolicyLoss", "StateIndependentLogStd"]


class PolicyLoss(LikelihoodLoss):
    """``−R Σ_n A_n log π(a_n | f_n)`` for a family of policy distributions (module doc).

    Subclasses define the distribution on an ``[N, C]`` output: :meth:`log_prob`,
    :meth:`score`, :meth:`fisher_sqrt`, :meth:`fisher_apply`, :meth:`sample_actions`,
    :meth:`entropy`, :meth:`kl`, and :attr:`action_width` (``W``).

    Args:
        reduction: ``"mean"`` (the average over the batch's states; the natural choice for
            a KL trust region per state), ``"sum"``, or ``"none"`` (the ``[N]`` terms, as
            torch's losses; no curvature backend takes it).
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(
                f"{type(self).__name__}: reduction must be 'mean', 'sum' or 'none', got "
                f"{reduction!r}."
            )
        self.reduction = reduction

    # --- the distribution (subclasses) ---------------------------------------------------

    def action_width(self, outputs: Tensor) -> int:
        """``W``: the action columns of the packed targets for output rows ``outputs``."""
        raise NotImplementedError

    def check_outputs(self, outputs: Tensor) -> None:
        """Raise a ``ValueError`` unless ``outputs`` is a valid ``[N, C]`` output."""
        name = type(self).__name__
        if not isinstance(outputs, Tensor) or outputs.dim() != 2:
            shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs)
            raise ValueError(f"{name}: the outputs must have shape [N, C], got {shape}.")
        if outputs.shape[0] == 0:
            raise ValueError(f"{name}: the batch is empty (0 rows).")

    def log_prob(self, outputs: Tensor, actions: Tensor) -> Tensor:
        """``log π(a_n | f_n)``: ``[N]`` for outputs ``[N, C]`` and actions ``[N, W]``."""
        raise NotImplementedError

    def score(self, outputs: Tensor, actions: Tensor) -> Tensor:
        """``∇_f log π(a | f)`` in closed form: ``[..., N, C]`` for actions ``[..., N, W]``."""
        raise NotImplementedError

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        """Columns ``[K, N, C]`` with ``Σ_k u_k[n] u_k[n]ᵀ = M_n`` (the output Fisher)."""
        raise NotImplementedError

    def fisher_apply(self, outputs: Tensor, u: Tensor) -> Tensor:
        """``M_n u_n`` per row: ``[N, C]``."""
        raise NotImplementedError

    def sample_actions(self, outputs: Tensor, num: int | None = None) -> Tensor:
        """Actions drawn from ``π(·|f_n)``: ``[N, W]``, or ``[num, N, W]`` with ``num``."""
        raise NotImplementedError

    def entropy(self, outputs: Tensor) -> Tensor:
        """``H(π(·|f_n))``: ``[N]``."""
        raise NotImplementedError

    def kl(self, old_outputs: Tensor, outputs: Tensor) -> Tensor:
        """``KL(π(·|f_old,n) ‖ π(·|f_n))``: ``[N]``."""
        raise NotImplementedError

    # --- targets -------------------------------------------------------------------------

    def pack(self, actions: Tensor, advantages: Tensor) -> Tensor:
        """Targets ``[N, W + 1]``: the actions (``[N]`` or ``[N, W]``), then the advantages
        ``[N]``, in the advantages' floating dtype (float32 if they are not floating)."""
        advantages = torch.as_tensor(advantages)
        actions = torch.as_tensor(actions, device=advantages.device)
        dtype = advantages.dtype if advantages.is_floating_point() else torch.float32
        if advantages.dim() != 1:
            raise ValueError(
                f"{type(self).__name__}.pack: advantages must have shape [N], got "
                f"{tuple(advantages.shape)}."
            )
        if actions.dim() == 1:
            actions = actions.unsqueeze(1)
        if actions.dim() != 2 or actions.shape[0] != advantages.shape[0]:
            raise ValueError(
                f"{type(self).__name__}.pack: actions must have shape [N] or [N, W] with N = "
                f"{advantages.shape[0]} (the advantages' length), got {tuple(actions.shape)}."
            )
        return torch.cat([actions.to(dtype), advantages.to(dtype).unsqueeze(1)], dim=1)

    def unpack(self, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(actions [N, W], advantages [N])`` of packed targets."""
        return targets[:, :-1], targets[:, -1]

    def check_targets(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise a ``ValueError`` unless ``targets`` are packed targets for ``outputs``."""
        self.check_outputs(outputs)
        width = self.action_width(outputs) + 1
        n = outputs.shape[0]
        if not isinstance(targets, Tensor) or not targets.is_floating_point():
            got = targets.dtype if isinstance(targets, Tensor) else type(targets).__name__
            raise ValueError(
                f"{type(self).__name__}: targets must be the floating [N, W + 1] tensor of "
                f"pack(actions, advantages), got {got}."
            )
        if tuple(targets.shape) != (n, width):
            raise ValueError(
                f"{type(self).__name__}: targets must have shape [{n}, {width}] (actions, "
                f"then the advantage; see pack), got {tuple(targets.shape)}."
            )

    # --- the loss ------------------------------------------------------------------------

    def forward(self, outputs: Tensor, targets: Tensor) -> Tensor:
        self.check_targets(outputs, targets)
        actions, advantages = self.unpack(targets)
        terms = -advantages.to(outputs.dtype) * self.log_prob(outputs, actions)
        if self.reduction == "none":
            return terms
        return terms.mean() if self.reduction == "mean" else terms.sum()

    # --- LikelihoodLoss ------------------------------------------------------------------

    def rows(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return outputs, targets

    def scale(self, outputs: Tensor, targets: Tensor) -> BatchScale:
        self.check_targets(outputs, targets)
        n = outputs.shape[0]
        return BatchScale(
            num_samples=n, inv_reduction=float(n) if self.reduction == "mean" else 1.0
        )

    def output_sqrt(self, outputs: Tensor) -> Tensor:
        return self.fisher_sqrt(outputs)

    def label_gradient(self, outputs: Tensor, labels: Tensor) -> Tensor:
        return self.score(outputs, labels)

    def observed_labels(self, targets: Tensor) -> Tensor:
        return self.unpack(targets)[0]

    def output_matrix_apply(self, outputs: Tensor, u: Tensor, targets: Tensor | None) -> Tensor:
        n = outputs.shape[0]
        r = 1.0 / n if self.reduction == "mean" else 1.0
        return r * self.fisher_apply(outputs.detach(), u)

    def sample(self, outputs: Tensor, num: int | None) -> Tensor:
        return self.sample_actions(outputs.detach(), num)


class CategoricalPolicy(PolicyLoss):
    """A categorical policy ``π(a|f) = softmax(f)_a`` over ``C`` actions (outputs ``[N, C]``
    are logits; actions are class indices, ``W = 1``).

    Output Fisher ``M = diag(p) − ppᵀ`` (that of ``CrossEntropyLoss``).
    """

    def action_width(self, outputs: Tensor) -> int:
        return 1

    def scale(self, outputs: Tensor, targets: Tensor) -> BatchScale:
        scale = super().scale(outputs, targets)
        actions = targets[:, 0]
        bad = (actions != actions.round()) | (actions < 0) | (actions >= outputs.shape[1])
        if bool(bad.any()):  # one host synchronisation
            first = float(actions[bad][0])
            raise ValueError(
                f"{type(self).__name__}: actions must be integers in [0, {outputs.shape[1]}); "
                f"{int(bad.sum())} are not, the first is {first}."
            )
        return scale

    @staticmethod
    def _index(actions: Tensor) -> Tensor:
        return actions[..., 0].round().long()

    def log_prob(self, outputs: Tensor, actions: Tensor) -> Tensor:
        logp = outputs.log_softmax(dim=-1)
        return logp.gather(-1, self._index(actions).unsqueeze(-1)).squeeze(-1)

    def score(self, outputs: Tensor, actions: Tensor) -> Tensor:
        onehot = nn.functional.one_hot(self._index(actions), outputs.shape[-1])
        return onehot.to(outputs.dtype) - outputs.softmax(dim=-1)

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        # column c is √p_c (e_c − p): Σ_c √p_c² (e_c − p)(e_c − p)ᵀ = diag(p) − ppᵀ
        p = outputs.softmax(dim=1)
        eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
        return p.sqrt().T.unsqueeze(2) * (eye.unsqueeze(1) - p.unsqueeze(0))

    def fisher_apply(self, outputs: Tensor, u: Tensor) -> Tensor:
        p = outputs.softmax(dim=1)
        return p * u - p * (p * u).sum(dim=1, keepdim=True)

    def sample_actions(self, outputs: Tensor, num: int | None = None) -> Tensor:
        probs = outputs.detach().float().softmax(dim=1)
        draws = torch.multinomial(probs, num_samples=num or 1, replacement=True)  # [N, M]
        draws = draws.to(outputs.dtype)
        return draws.T.unsqueeze(-1) if num is not None else draws

    def entropy(self, outputs: Tensor) -> Tensor:
        logp = outputs.log_softmax(dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)

    def kl(self, old_outputs: Tensor, outputs: Tensor) -> Tensor:
        old = old_outputs.log_softmax(dim=-1)
        return (old.exp() * (old - outputs.log_softmax(dim=-1))).sum(dim=-1)


class GaussianPolicy(PolicyLoss):
    """A diagonal Gaussian policy ``N(μ, diag σ²)`` over ``D``-dimensional actions.

    Outputs ``[N, 2D]`` are ``(μ, log σ)``; ``W = D``. The log-std may be an output of the
    network or one parameter shared by every state: end the network with
    :class:`StateIndependentLogStd`, which appends it to the mean (its parameter then gets
    a diagonal block, like every parameter without a Kronecker rule). Per dimension,
    with ``z = (a − μ)/σ``: ``∇_μ log π = z/σ``, ``∇_{log σ} log π = z² − 1``, and the output
    Fisher is ``M = diag(1/σ², 2)`` (``E[z²] = 1``, ``E[(z² − 1)²] = 2``, no cross term).
    """

    def action_width(self, outputs: Tensor) -> int:
        return outputs.shape[1] // 2

    def check_outputs(self, outputs: Tensor) -> None:
        super().check_outputs(outputs)
        if outputs.shape[1] % 2:
            raise ValueError(
                f"{type(self).__name__}: the outputs must be [N, 2D] (mean, then log-std), got "
                f"{outputs.shape[1]} columns; end a mean-only network with "
                "StateIndependentLogStd."
            )

    @staticmethod
    def _split(outputs: Tensor) -> tuple[Tensor, Tensor]:
        d = outputs.shape[-1] // 2
        return outputs[..., :d], outputs[..., d:]

    def log_prob(self, outputs: Tensor, actions: Tensor) -> Tensor:
        mean, log_std = self._split(outputs)
        z = (actions.to(outputs.dtype) - mean) * torch.exp(-log_std)
        return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(dim=-1)

    def score(self, outputs: Tensor, actions: Tensor) -> Tensor:
        mean, log_std = self._split(outputs)
        inv_std = torch.exp(-log_std)
        z = (actions.to(outputs.dtype) - mean) * inv_std
        return torch.cat([z * inv_std, z.square() - 1], dim=-1)

    def fisher_sqrt(self, outputs: Tensor) -> Tensor:
        _, log_std = self._split(outputs)
        diag = torch.cat([torch.exp(-log_std), torch.full_like(log_std, math.sqrt(2.0))], dim=1)
        return torch.diag_embed(diag).permute(1, 0, 2)  # [C, N, C]

    def fisher_apply(self, outputs: Tensor, u: Tensor) -> Tensor:
        _, log_std = self._split(outputs)
        return u * torch.cat([torch.exp(-2 * log_std), torch.full_like(log_std, 2.0)], dim=1)

    def sample_actions(self, outputs: Tensor, num: int | None = None) -> Tensor:
        mean, log_std = self._split(outputs.detach())
        shape = (num, *mean.shape) if num is not None else mean.shape
        noise = torch.randn(shape, dtype=mean.dtype, device=mean.device)
        return mean + noise * log_std.exp()

    def entropy(self, outputs: Tensor) -> Tensor:
        _, log_std = self._split(outputs)
        return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(dim=-1)

    def kl(self, old_outputs: Tensor, outputs: Tensor) -> Tensor:
        m0, s0 = self._split(old_outputs)
        m1, s1 = self._split(outputs)
        ratio = torch.exp(2 * (s0 - s1))
        return (s1 - s0 + 0.5 * (ratio + (m0 - m1).square() * torch.exp(-2 * s1) - 1)).sum(-1)


class StateIndependentLogStd(nn.Module):
    """Appends one learned log-std per action dimension to a mean: ``[N, D] → [N, 2D]``.

    Args:
        dim: ``D``, the action dimensions.
        init: the initial ``log σ`` of every dimension.
    """

    def __init__(self, dim: int, init: float = 0.0) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"StateIndependentLogStd: dim must be an int >= 1, got {dim!r}.")
        self.log_std = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, mean: Tensor) -> Tensor:
        if mean.shape[-1] != self.log_std.shape[0]:
            raise ValueError(
                f"StateIndependentLogStd: the mean has {mean.shape[-1]} columns, expected "
                f"{self.log_std.shape[0]}."
            )
        return torch.cat([mean, self.log_std.expand_as(mean)], dim=-1)
