"""``ACKTR``: K-FAC natural policy gradient with a KL trust region (Wu et al. 2017).

Per step (concepts/policy_gradients.md#the-trust-region-step):

1. the gradient ``g`` of the loss (for a :class:`~curvlab.extraction.policies.PolicyLoss`
   the negative policy gradient) and, every ``update_every`` steps, K-FAC statistics of
   the policy's Fisher (moving average, inverses every ``invert_every`` steps): a
   :class:`~curvlab.NaturalGradient` over the curvature does this and gives
   ``ĝ = (F̂ + λI)⁻¹ g``;
2. the step size ``η = min(lr, sqrt(2δ / ĝᵀg))``: the largest step along ``−ĝ``, at most
   ``lr``, whose predicted KL ``½ η² ĝᵀF̂ĝ ≤ ½ η² ĝᵀg`` stays within ``δ = max_kl``. This is
   the preconditioner's KL clipping with the bound ``2δ``
   (``η = lr·ν``, ``ν = min(1, sqrt(2δ / (lr² ĝᵀg)))``), applied by the
   :class:`~curvlab.NaturalGradient` itself;
3. a heavy-ball update ``b ← μ b + η/lr · ĝ``, ``θ ← θ − lr·b``, as ACKTR's reference
   implementation (the trust region bounds each fresh step; momentum carries the earlier
   ones).

Nothing is read back to the host in ``step``; :attr:`ACKTR.last` holds the step's
predicted KL and clipping factor as 0-dim tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from curvlab.curvature.base import Curvature
from curvlab.curvature.kronecker.kfac import KFC
from curvlab.optim.damping import DampingSchedule
from curvlab.optim.natural_gradient import NaturalGradient


class ACKTR(torch.optim.Optimizer):
    """K-FAC natural gradient whose step size keeps the predicted KL within ``max_kl``.

    A loop::

        policy = curvlab.CategoricalPolicy()
        opt = curvlab.ACKTR(net, policy)
        opt.zero_grad()
        opt.backward(policy(net(states), policy.pack(actions, advantages)))
        opt.step()

    Args:
        model: the policy network (or a critic: any loss curvlab supports works, e.g. an
            ``MSELoss`` value function, whose Fisher is that of a Gaussian of variance ½).
        loss_fn: its loss, usually a :class:`~curvlab.extraction.policies.PolicyLoss` with
            ``reduction="mean"`` (then ``max_kl`` bounds the KL averaged over the states).
        curvature: the approximation; default ``KFC(model, loss_fn, fisher_type="mc")``
            (one sampled action per state, ACKTR's sampled Fisher). Any backend works.
        lr: ``η_max``, the largest step size (ACKTR: 0.25).
        max_kl: ``δ``, the trust region on the predicted KL per step (ACKTR: 10⁻³).
        damping: ``λ`` of ``(F̂ + λI)⁻¹``: a float or a schedule ``step -> float``.
        momentum: ``μ`` in ``[0, 1)`` (ACKTR: 0.9).
        update_every, invert_every, ema_decay: as for :class:`~curvlab.NaturalGradient`.

    Attributes:
        precond: the :class:`~curvlab.NaturalGradient` that preconditions and clips.
        last: ``{"predicted_kl": ½ η² ĝᵀg, "clip": ν}`` of the last step (0-dim tensors).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        curvature: Curvature | None = None,
        lr: float = 0.25,
        max_kl: float = 1e-3,
        damping: float | DampingSchedule = 1e-2,
        momentum: float = 0.9,
        update_every: int = 1,
        invert_every: int = 10,
        ema_decay: float = 0.95,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"ACKTR: model must be an nn.Module, got {type(model).__name__}.")
        for name, value in (("lr", lr), ("max_kl", max_kl)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"ACKTR: {name} must be a float, got {type(value).__name__}.")
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"ACKTR: {name} must be finite and > 0, got {value}.")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"ACKTR: momentum must be a float, got {type(momentum).__name__}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"ACKTR: momentum must lie in [0, 1), got {momentum}.")
        if curvature is None:
            curvature = KFC(model, loss_fn, fisher_type="mc")
        elif not isinstance(curvature, Curvature):
            raise TypeError(
                f"ACKTR: curvature must be a curvlab.Curvature, got {type(curvature).__name__}."
            )
        if curvature.model is not model or curvature.loss_fn is not loss_fn:
            raise ValueError("ACKTR: the curvature belongs to another model or loss function.")
        super().__init__(curvature.params, defaults={"lr": float(lr), "momentum": float(momentum)})
        self.model, self.loss_fn, self.max_kl = model, loss_fn, float(max_kl)
        self.precond = NaturalGradient(
            curvature,
            damping=damping,
            update_every=update_every,
            invert_every=invert_every,
            ema_decay=ema_decay,
            kl_clip=2.0 * self.max_kl,  # η = lr·ν = min(lr, sqrt(2δ / ĝᵀg))
            optimizer=self,  # the rates of the param groups, read at every step
            distribution="local",
        )
        self.steps = 0
        self.last: dict[str, Tensor] = {}

    @property
    def curvature(self) -> Curvature:
        return self.precond.curvature

    def backward(self, loss: Tensor) -> None:
        """``loss.backward()``, after accumulating its batch's curvature when due."""
        self.precond.backward(loss)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One trust-region step from the gradients of :meth:`backward`.

        ``closure``, if given, evaluates the loss (without ``backward``): the step then
        runs ``zero_grad`` and :meth:`backward` on it first and returns it.
        """
        loss = None
        if closure is not None:
            self.zero_grad()
            with torch.enable_grad():
                loss = closure()
            self.backward(loss)
        params = self.curvature.params
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        self.precond.step()  # p.grad <- ν ĝ
        lrs = self.precond.learning_rate.per_parameter(self.precond.steps - 1)
        used = [
            (p.grad, g, lr)
            for p, g, lr in zip(params, grads, lrs)
            if g is not None and p.grad is not None
        ]
        # t = Σ lrᵢ² ⟨ν ĝᵢ, gᵢ⟩ = ν x with x = Σ lrᵢ² ⟨ĝᵢ, gᵢ⟩; ν = min(1, sqrt(2δ/x)) gives
        # ν² x = min(t, 2δ): twice the predicted KL of the fresh step
        t = torch.stack([lr**2 * torch.vdot(n.reshape(-1), g.reshape(-1)) for n, g, lr in used])
        t = t.sum().abs().clamp(min=torch.finfo(t.dtype).tiny)
        twice_kl = t.clamp(max=2.0 * self.max_kl)
        self.last = {"predicted_kl": 0.5 * twice_kl, "clip": twice_kl / t}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None or group["momentum"] == 0:
                    buf = p.grad.clone()
                else:
                    buf.mul_(group["momentum"]).add_(p.grad)
                state["momentum_buffer"] = buf
                p.add_(buf, alpha=-group["lr"])
        self.steps += 1
        return None if loss is None else loss.detach()

    def close(self) -> None:
        """Remove the curvature's hooks from the model (see :meth:`NaturalGradient.close`)."""
        self.precond.close()

    def __enter__(self) -> ACKTR:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffers and rates (``torch.optim``'s layout) and, under ``"acktr"``,
        the step count and the preconditioner's state (statistics, decompositions)."""
        state = super().state_dict()
        state["acktr"] = {"steps": self.steps, "precond": self.precond.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result into an ACKTR over the same model."""
        if not isinstance(state_dict, dict) or "acktr" not in state_dict:
            raise ValueError(
                "ACKTR.load_state_dict: not an ACKTR state (no 'acktr' entry); pass the result "
                "of ACKTR.state_dict()."
            )
        extra = state_dict["acktr"]
        self.precond.load_state_dict(extra["precond"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "acktr"})
        for state in self.state.values():  # owned here: step() updates them in place
            if isinstance(state.get("momentum_buffer"), Tensor):
                state["momentum_buffer"] = state["momentum_buffer"].clone()
        self.steps = int(extra["steps"])
